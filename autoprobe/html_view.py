"""A self-contained HTML page to browse a model's selection: ``autoprobe inspect MODEL --html FILE``.

Two steps, each handing a typed record to the next: ``model_view`` turns a selection and its
layer graph into a ``ModelView`` (the module tree as nested ``GroupRecord`` s, every layer-graph
node a ``NodeRecord`` with its shape, layout, depth, rules, reason, adapter size and graph
neighbours); ``render_html`` writes that view as one HTML document with inline CSS and
JavaScript and nothing fetched from the network.

The page shows the model as collapsible groups (``<details>``): the top-level modules (a
ResNet's stages, a ViT's ``blocks``), their children (blocks), down to the layers, each
group in execution order with its depth range, output shape and the points it holds. Chosen
points are red with their number, other candidates amber. Clicking a layer shows its record;
the points are listed at the top and along a depth strip; a search box filters layers by name,
module type or kind. The same selection always writes the same bytes.

Example:
    >>> from autoprobe.api import analyze
    >>> analysis = analyze("resnet18")
    >>> view = model_view(analysis.selection, analysis.graph)
    >>> [g.label for g in view.groups if isinstance(g, GroupRecord)][:3]
    ['layer1', 'layer2', 'layer3']
    >>> render_html(view).startswith("<!DOCTYPE html>")
    True
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

from .graph import LayerGraph, LayerInfo
from .adapters import DEFAULT_HEAD, AdapterHead
from .report import KIND_COLOURS, adapter_params, output_classes, output_dense_rank
from .select import Fired, Selection, can_be_point, why_not_point

__all__ = ["NodeRecord", "GroupRecord", "ModelView", "model_view", "render_html"]


@dataclass(frozen=True)
class NodeRecord:
    """One layer-graph node as the page shows it.

    Attributes:
        name: the node's name (unique); ``label`` is the part below its group's path.
        kind, op, module_type: what computes it (``conv``, ``call_module``, ``Conv2d``).
        shape, layout, depth, order: the feature's shape (batch included), layout, weight
            layers from the input, and execution order.
        point: 1-based point number when chosen, else ``None``; ``candidate`` when a rule fired.
        score, rules, reason: the selection's score and the rules that fired (the strongest first).
        eligible: ``""`` when the node can be a point (``Analysis.choose`` takes it), else why not
            (``layout``, ``untappable``, ``grid``, or ``input``/``output``).
        adapter_params: parameters of the adapter ``instrument`` would put here, when it can be a point
            and the sizes are known.
        inputs, outputs: neighbouring node names in the layer graph.
    """

    name: str
    label: str
    kind: str
    op: str
    module_type: str
    shape: tuple[int, ...]
    layout: str
    depth: int
    order: int
    point: int | None
    candidate: bool
    score: float | None
    rules: tuple[Fired, ...]
    reason: str
    eligible: str
    adapter_params: int | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class GroupRecord:
    """A module holding layers: a stage, a block, or any submodule, with its children in execution order.

    Attributes:
        path: the module path (``layer1.0``); ``label`` its last part.
        level: 1 for top-level modules (stages), 2 for their children (blocks), and so on.
        children: groups and nodes, in execution order.
        layers: nodes inside, at any level.
        depths: (first, last) depth inside.
        out_shape: the shape of the last node inside.
        points: the point numbers inside; ``candidates`` how many candidates.
    """

    path: str
    label: str
    level: int
    children: tuple[GroupRecord | NodeRecord, ...]
    layers: int
    depths: tuple[int, int]
    out_shape: tuple[int, ...]
    points: tuple[int, ...]
    candidates: int


@dataclass(frozen=True)
class ModelView:
    """Everything the page shows.

    Attributes:
        model, backend, mode, rules, depth, min_distance, input_shape, notes: the selection's facts.
        classes: K, when the output is logits (adapter sizes need it).
        points: the chosen points' nodes, in order.
        groups: the top level of the tree: groups and the nodes outside any module.
        nodes: every node, in execution order.
    """

    model: str
    backend: str
    mode: str
    rules: str
    depth: int
    min_distance: int
    input_shape: tuple[int, ...]
    notes: tuple[str, ...]
    classes: int | None
    points: tuple[NodeRecord, ...]
    groups: tuple[GroupRecord | NodeRecord, ...]
    nodes: tuple[NodeRecord, ...]


def _text(value: object) -> str:
    """An enum (a layout, a backend) or a plain value as the string shown."""
    return str(getattr(value, "value", value) or "")


def _parent(info: LayerInfo) -> str:
    """The module path a node is shown under: its scope for a function, the parent module for a module's output."""
    path = info.module_path
    if path and info.name.startswith(path + "."):
        return path
    return path.rsplit(".", 1)[0] if "." in path else ""


def model_view(selection: Selection, graph: LayerGraph, *, head: AdapterHead = DEFAULT_HEAD) -> ModelView:
    """The page's content: the module tree over the layer graph, points and candidates marked.

    Args:
        selection: the selection (``analyze(...).selection``, or one chosen by hand).
        graph: its layer graph.
        head: the adapter form each node's ``adapter_params`` counts (``instrument``'s ``head``).

    Returns:
        The ``ModelView``.

    Example:
        >>> from autoprobe.api import analyze
        >>> analysis = analyze("resnet18")
        >>> view = model_view(analysis.selection, analysis.graph)
        >>> [(p.point, p.name, p.adapter_params) for p in view.points][:1]
        [(1, 'layer1.1.act2', 69288)]
    """
    chosen = {p.name: i for i, p in enumerate(selection.points, 1)}
    scored = {s.node: s for s in selection.candidates}
    classes, rank = output_classes(graph), output_dense_rank(graph)
    infos = sorted(graph, key=lambda i: i.order)
    parents = {i.name: _parent(i) for i in infos}
    paths = {prefix for p in parents.values() if p for prefix in _prefixes(p)}

    nodes = []
    for info in infos:
        parent, found = parents[info.name], scored.get(info.name)
        eligible = can_be_point(graph, info)
        label = info.name[len(parent) + 1:] if parent and info.name.startswith(parent + ".") else info.name
        nodes.append(NodeRecord(
            name=info.name, label=label, kind=info.kind, op=info.op, module_type=info.module_type or "",
            shape=tuple(info.shape or ()), layout=_text(info.layout), depth=info.depth, order=info.order,
            point=chosen.get(info.name), candidate=found is not None,
            score=round(found.score, 6) if found else None, rules=found.fired if found else (),
            reason=found.fired[0].reason if found and found.fired else "",
            eligible="" if eligible else (info.kind if info.kind in ("input", "output") else why_not_point(graph, info)
                                          or "no shape"),
            adapter_params=adapter_params(info, classes, head=head, dense_rank=rank) if eligible else None,
            inputs=tuple(p.name for p in graph.predecessors(info.name)),
            outputs=tuple(s.name for s in graph.successors(info.name)),
        ))
    by_parent: dict[str, list[NodeRecord]] = {}
    for node in nodes:
        by_parent.setdefault(parents[node.name], []).append(node)

    def group(path: str, level: int) -> GroupRecord:
        children = _children(path, level)
        inside = _walk(children)
        return GroupRecord(
            path=path, label=path.rsplit(".", 1)[-1], level=level, children=children, layers=len(inside),
            depths=(min(n.depth for n in inside), max(n.depth for n in inside)), out_shape=inside[-1].shape,
            points=tuple(n.point for n in inside if n.point is not None), candidates=sum(n.candidate for n in inside),
        )

    def _children(path: str, level: int) -> tuple[GroupRecord | NodeRecord, ...]:
        subgroups = [group(p, level + 1) for p in sorted(paths) if _parent_path(p) == path]
        items: list[GroupRecord | NodeRecord] = [*subgroups, *by_parent.get(path, [])]
        return tuple(sorted(items, key=_first_order))

    top = _children("", 0)
    return ModelView(
        model=selection.model or "model", backend=_text(selection.backend), mode=selection.mode, rules=selection.rules,
        depth=selection.depth, min_distance=selection.min_distance, input_shape=tuple(selection.input_shape),
        notes=tuple(selection.notes), classes=classes,
        points=tuple(n for n in nodes if n.point is not None), groups=top, nodes=tuple(nodes),
    )


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _walk(items: tuple[GroupRecord | NodeRecord, ...]) -> list[NodeRecord]:
    out: list[NodeRecord] = []
    for item in items:
        out.extend(_walk(item.children) if isinstance(item, GroupRecord) else [item])
    return out


def _first_order(item: GroupRecord | NodeRecord) -> int:
    return item.order if isinstance(item, NodeRecord) else _first_order(item.children[0])


# ------------------------------------------------------------------------------------------ HTML


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape[1:])) if shape else ""


def _what(node: NodeRecord) -> str:
    """A module's class (``Conv2d``), else the op's kind (``add``): a function's scope type would mislead."""
    return node.module_type if node.op == "call_module" and node.module_type else node.kind


def _node_html(node: NodeRecord) -> str:
    classes = "node" + (" point" if node.point else " candidate" if node.candidate else "")
    badge = f'<span class="badge">P{node.point}</span>' if node.point else ""
    search = f"{node.name} {node.module_type} {node.kind}".lower()
    return (
        f'<div class="{classes}" data-node="{html.escape(node.name)}" data-search="{html.escape(search)}" tabindex="0">'
        f'{badge}<span class="label">{html.escape(node.label)}</span>'
        f'<span class="kind k-{html.escape(node.kind)}">{html.escape(_what(node))}</span>'
        f'<span class="meta">d{node.depth} {html.escape(_shape(node.shape))}</span></div>'
    )


def _group_html(group: GroupRecord) -> str:
    marks = "".join(f'<span class="badge">P{p}</span>' for p in group.points)
    others = group.candidates - len(group.points)
    if others:
        marks += f'<span class="cand">{others} candidate{"s" * (others != 1)}</span>'
    first, last = group.depths
    body = "".join(_item_html(c) for c in group.children)
    return (
        f'<details class="group level{min(group.level, 4)}" data-path="{html.escape(group.path)}">'
        f'<summary title="{html.escape(group.path)}"><span class="label">{html.escape(group.label)}</span>{marks}'
        f'<span class="meta">{group.layers} layers, depth {first}-{last}, out {html.escape(_shape(group.out_shape))}</span>'
        f"</summary><div class=\"children\">{body}</div></details>"
    )


def _item_html(item: GroupRecord | NodeRecord) -> str:
    return _group_html(item) if isinstance(item, GroupRecord) else _node_html(item)


def _record_json(node: NodeRecord) -> dict[str, Any]:
    return {
        "name": node.name, "kind": node.kind, "op": node.op, "module_type": node.module_type,
        "shape": list(node.shape), "layout": node.layout, "depth": node.depth, "order": node.order,
        "point": node.point, "candidate": node.candidate, "score": node.score, "reason": node.reason,
        "eligible": node.eligible,
        "rules": [{"detector": f.detector, "reason": f.reason, "score": round(f.score, 6)} for f in node.rules],
        "adapter_params": node.adapter_params, "inputs": list(node.inputs), "outputs": list(node.outputs),
    }


def _strip(view: ModelView) -> str:
    """The depth axis with a tick per candidate and per point."""
    ticks = []
    for node in view.nodes:
        if node.candidate:
            left = 100 * node.depth / max(view.depth, 1)
            cls, text = ("tick point", f"P{node.point}") if node.point else ("tick candidate", "")
            ticks.append(f'<span class="{cls}" style="left:{left:.2f}%" data-node="{html.escape(node.name)}" '
                         f'title="{html.escape(node.name)} (depth {node.depth})">{text}</span>')
    return f'<div id="strip"><span class="axis">depth 0</span><span class="axis end">D={view.depth}</span>{"".join(ticks)}</div>'


def render_html(view: ModelView) -> str:
    """The view as one self-contained HTML document (inline CSS and JavaScript, no network).

    Args:
        view: from ``model_view``.

    Returns:
        The document as a string.

    Example:
        >>> from autoprobe.api import analyze
        >>> analysis = analyze("resnet18")
        >>> page = render_html(model_view(analysis.selection, analysis.graph))
        >>> 'data-node="layer1.1.act2"' in page, "http" in page
        (True, False)
    """
    points = "".join(
        f'<li><a href="#" class="point-link" data-node="{html.escape(p.name)}"><span class="badge">P{p.point}</span>'
        f'{html.escape(p.name)}</a> <span class="meta">depth {p.depth}, {html.escape(_shape(p.shape))}, '
        f'{html.escape(", ".join(dict.fromkeys(f.detector for f in p.rules)))}</span></li>'
        for p in view.points
    )
    adapters = [p.adapter_params for p in view.points]
    total = f", adapters {sum(adapters):,} parameters (K={view.classes})" if adapters and None not in adapters else ""
    facts = (f"D={view.depth} weight layers, M={len(view.points)} points, rules={view.rules}, "
             f"input {tuple(view.input_shape[1:])}, mode={view.mode}, backend={view.backend}, "
             f"min_distance={view.min_distance}{total}")
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in view.notes)
    # "</" would end the script element early; "<\/" is the same JSON string.
    records = json.dumps({n.name: _record_json(n) for n in view.nodes}, sort_keys=True, separators=(",", ":"))
    records = records.replace("</", "<\\/")
    colours = "".join(f".k-{kind}{{background:{colour}}}" for kind, colour in sorted(KIND_COLOURS.items()))
    tree = "".join(_item_html(item) for item in view.groups)
    title = html.escape(view.model)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>autoprobe: {title}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}{colours}</style></head>\n'
        f"<body><header><h1>{title}</h1><p class=\"facts\">{html.escape(facts)}</p>"
        '<p class="legend"><span class="swatch point"></span>chosen point <span class="swatch candidate"></span>'
        "candidate (a rule fired) &mdash; click a layer for its record</p>"
        f"{_strip(view)}</header>\n"
        f'<section id="points"><h2>Points</h2><ol>{points}</ol>'
        f'{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}</section>\n'
        '<div id="bar"><input id="search" type="search" placeholder="search layers: name, module type or kind" '
        'autocomplete="off"><span id="count"></span><button id="expand" type="button">expand all</button>'
        '<button id="collapse" type="button">collapse all</button></div>\n'
        f'<main><section id="tree">{tree}</section>'
        '<aside id="record"><p class="hint">Click a layer to see its record.</p></aside></main>\n'
        f'<script type="application/json" id="records">{records}</script>\n'
        f"<script>{_JS}</script></body></html>\n"
    )


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header,#points,#bar{padding:8px 16px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:20px;margin:4px 0}h2{font-size:15px;margin:6px 0}.facts{margin:2px 0;color:#444}
.legend{margin:2px 0;color:#555;font-size:12px}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin:0 4px -1px 8px}
.swatch.point{background:#ffcdd2;border:2px solid #c62828}.swatch.candidate{background:#ffe9a8;border:1px solid #b26a00}
#strip{position:relative;height:26px;margin:8px 40px 4px 40px;border-bottom:2px solid #999}
#strip .axis{position:absolute;bottom:-18px;left:-30px;font-size:11px;color:#666}#strip .axis.end{left:auto;right:-40px}
.tick{position:absolute;bottom:0;transform:translateX(-50%);cursor:pointer;font-size:10px;font-weight:bold}
.tick.candidate{width:3px;height:10px;background:#e0a800}
.tick.point{background:#c62828;color:#fff;padding:0 3px;border-radius:3px;bottom:2px}
#points ol{margin:4px 0;padding-left:20px}#points li{margin:2px 0}
#bar{position:sticky;top:0;z-index:2;display:flex;gap:8px;align-items:center}
#search{flex:0 1 420px;padding:5px 8px;font-size:14px}#count{color:#666;font-size:12px}
main{display:flex;gap:16px;padding:12px 16px;align-items:flex-start}
#tree{flex:1 1 60%;min-width:0}
#record{flex:0 0 38%;position:sticky;top:52px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;
max-height:calc(100vh - 80px);overflow:auto}
#record table{border-collapse:collapse;width:100%;table-layout:fixed}
#record td{padding:2px 6px;vertical-align:top;border-bottom:1px solid #eee;overflow-wrap:anywhere}
#record h2{overflow-wrap:anywhere}#record td:first-child{width:8.5em}
#record td:first-child{color:#666;white-space:nowrap}.hint{color:#777}
details.group{margin:2px 0 2px 0;border-left:3px solid #cfd8dc;background:#fff}
details.group>summary{cursor:pointer;padding:3px 6px;list-style-position:inside}
details.group.level1>summary{font-weight:bold;background:#eceff1}
.children{padding-left:18px}
.node{display:flex;gap:8px;align-items:center;padding:2px 6px;margin:1px 0;border-radius:4px;cursor:pointer;border:1px solid transparent}
.node:hover{background:#f0f4ff}.node.selected{outline:2px solid #1565c0}
.node.point{background:#ffcdd2;border-color:#c62828}.node.candidate{background:#fff5d6;border-color:#e0a800}
.label{font-family:ui-monospace,Menlo,Consolas,monospace}
.kind{font-size:11px;padding:0 5px;border-radius:3px;background:#eee;color:#333}
.meta{color:#666;font-size:12px;margin-left:6px}
summary .label{margin-right:8px}
.badge{background:#c62828;color:#fff;font-weight:bold;font-size:11px;padding:0 5px;border-radius:3px;margin-right:6px}
.cand{background:#ffe9a8;color:#6d4c00;font-size:11px;padding:0 5px;border-radius:3px;margin-right:6px}
.hidden{display:none}.match>.label,.match>summary>.label{background:#fff176}
a.node-link{color:#1565c0;cursor:pointer}
"""

_JS = """
(function () {
  "use strict";
  var records = JSON.parse(document.getElementById("records").textContent);
  var WHY = {layout: "no layout the ops decide", untappable: "not a module output on this backend",
    grid: "a token feature whose grid the graph does not show", input: "the model's input", output: "the model's output"};
  var tree = document.getElementById("tree"), panel = document.getElementById("record");
  var search = document.getElementById("search"), count = document.getElementById("count");
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }
  function nodeEl(name) {
    var all = tree.querySelectorAll(".node");
    for (var i = 0; i < all.length; i++) { if (all[i].dataset.node === name) { return all[i]; } }
    return null;
  }
  function links(names) {
    return names.map(function (n) { return '<a class="node-link" data-node="' + esc(n) + '">' + esc(n) + "</a>"; }).join(", ") || "-";
  }
  function show(name) {
    var r = records[name], el = nodeEl(name);
    if (!r || !el) { return; }
    var prev = tree.querySelector(".node.selected");
    if (prev) { prev.classList.remove("selected"); }
    el.classList.add("selected");
    for (var p = el.parentElement; p && p !== tree; p = p.parentElement) {
      if (p.tagName === "DETAILS") { p.open = true; }
    }
    el.scrollIntoView({block: "nearest"});
    var role = r.point ? "chosen point P" + r.point : (r.candidate ? "candidate (not chosen)" : "not a candidate");
    var rows = [["role", role], ["kind", r.kind + " (" + r.op + (r.module_type ? ", " + r.module_type : "") + ")"],
      ["shape", r.shape.join(" x ") || "-"], ["layout", r.layout || "unknown (not eligible)"], ["depth", r.depth],
      ["score", r.score === null ? "-" : r.score], ["reason", r.reason || "-"],
      ["can be a point", r.eligible ? "no (" + (WHY[r.eligible] || r.eligible) + ")" : "yes: Analysis.choose takes it"],
      ["adapter", r.adapter_params === null ? "-" : r.adapter_params.toLocaleString("en-US") + " parameters"]];
    var html = "<h2>" + esc(name) + "</h2><table>" + rows.map(function (row) {
      return "<tr><td>" + row[0] + "</td><td>" + esc(row[1]) + "</td></tr>"; }).join("");
    html += "<tr><td>rules fired</td><td>" + (r.rules.length ? "<ul>" + r.rules.map(function (f) {
      return "<li><b>" + esc(f.detector) + "</b> (+" + f.score + "): " + esc(f.reason) + "</li>"; }).join("") + "</ul>" : "none") + "</td></tr>";
    html += "<tr><td>inputs</td><td>" + links(r.inputs) + "</td></tr><tr><td>feeds</td><td>" + links(r.outputs) + "</td></tr></table>";
    panel.innerHTML = html;
    panel.dataset.node = name;
  }
  document.addEventListener("click", function (ev) {
    var t = ev.target.closest("[data-node]");
    if (!t || t.tagName === "DETAILS") { return; }
    ev.preventDefault();
    show(t.dataset.node);
  });
  tree.addEventListener("keydown", function (ev) {
    var t = ev.target.closest(".node");
    if (t && (ev.key === "Enter" || ev.key === " ")) { ev.preventDefault(); show(t.dataset.node); }
  });
  function setAll(open) { tree.querySelectorAll("details").forEach(function (d) { d.open = open; }); }
  document.getElementById("expand").addEventListener("click", function () { setAll(true); });
  document.getElementById("collapse").addEventListener("click", function () { setAll(false); });
  function filter() {
    var q = search.value.trim().toLowerCase(), hits = 0;
    tree.querySelectorAll(".match").forEach(function (el) { el.classList.remove("match"); });
    tree.querySelectorAll(".node").forEach(function (el) {
      var hit = !q || el.dataset.search.indexOf(q) >= 0;
      el.classList.toggle("hidden", !hit);
      if (q && hit) { el.classList.add("match"); hits++; }
    });
    var groups = Array.prototype.slice.call(tree.querySelectorAll("details")).reverse();
    groups.forEach(function (d) {
      var any = d.querySelector(".node:not(.hidden)") !== null;
      var self = q && d.dataset.path.toLowerCase().indexOf(q) >= 0;
      d.classList.toggle("hidden", Boolean(q) && !any && !self);
      if (q) { d.open = any; }
      if (self) { d.classList.add("match"); }
    });
    if (!q) { setAll(false); }
    count.textContent = q ? (hits === 1 ? "1 layer matches" : hits + " layers match") : "";
  }
  search.addEventListener("input", filter);
  search.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter") { var first = tree.querySelector(".node.match"); if (first) { show(first.dataset.node); } }
  });
}());
"""
