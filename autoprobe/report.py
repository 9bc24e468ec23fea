"""Render a selection: a rich table, versioned JSON, and an SVG picture of the layer graph.

The JSON is described by ``autoprobe/inspect.schema.json`` (JSON Schema,
draft 2020-12). ``SCHEMA_VERSION`` changes whenever a field changes meaning
or disappears; adding a field does not change it. Floats are rounded to six
decimals and keys are sorted, so the same selection always prints the same
bytes (the lockfile builds on this).
"""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

import networkx as nx

from .adapters import DEFAULT_HEAD, AdapterHead, adapter_parameters
from .graph import LayerGraph, LayerInfo
from .select import Fired, Selection

__all__ = [
    "SCHEMA_VERSION",
    "KIND_COLOURS",
    "selection_to_dict",
    "to_json",
    "render_table",
    "render_svg",
    "json_schema",
    "output_classes",
    "output_dense_rank",
    "adapter_params",
]

SCHEMA_VERSION = 1


def _fired(fired: tuple[Fired, ...]) -> list[dict[str, Any]]:
    return [{"detector": f.detector, "reason": f.reason, "score": round(f.score, 6)} for f in fired]


def selection_to_dict(selection: Selection, graph: LayerGraph | None = None, *,
                      head: AdapterHead = DEFAULT_HEAD) -> dict[str, Any]:
    """The selection as plain JSON-able data (schema version ``SCHEMA_VERSION``).

    Args:
        selection: the selection.
        graph: its layer graph; adds module paths, depths and shapes to the candidates, and
            each point's ``adapter_params``.
        head: the adapter form ``adapter_params`` counts (``instrument``'s ``head``).

    Returns:
        A dict that validates against ``json_schema()``.
    """
    chosen = set(selection.names)
    classes = output_classes(graph) if graph is not None else None
    rank = output_dense_rank(graph) if graph is not None else None
    candidates = []
    for c in selection.candidates:
        entry: dict[str, Any] = {"name": c.node, "score": c.score, "chosen": c.node in chosen, "rules": _fired(c.fired)}
        if graph is not None:
            info = graph[c.node]
            entry.update(module_path=info.module_path, depth=info.depth, shape=list(info.shape or ()))
        candidates.append(entry)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": selection.model,
        "backend": selection.backend,
        "mode": selection.mode,
        "input_shape": list(selection.input_shape),
        "depth": selection.depth,
        "num_points": len(selection.points),
        "min_distance": selection.min_distance,
        "rules": {"name": selection.rules, "sha256": selection.rules_sha256},
        "notes": list(selection.notes),
        **({} if graph is None else {"adapter_head": head}),
        "points": [
            {
                "name": p.name,
                "fx_name": p.fx_name,
                "module_path": p.module_path,
                "depth": p.depth,
                "shape": list(p.shape),
                "layout": p.layout,
                "score": p.score,
                "reason": p.reason,
                "rules": _fired(p.fired),
                **({} if graph is None else {
                    "adapter_params": adapter_params(graph[p.name], classes, head=head, dense_rank=rank)}),
            }
            for p in selection.points
        ],
        "candidates": candidates,
    }


def output_classes(graph: LayerGraph) -> int | None:
    """K from the output's shape when it is logits, (B, K) or (B, K, H, W); else unknown.

    K = 1 counts: ``instrument`` builds adapters for one logit channel too (a binary or a
    single-map regression output), each ``C + 1`` parameters.

    Example:
        >>> from autoprobe.api import analyze
        >>> output_classes(analyze("resnet18").graph)
        1000
    """
    shape = graph[graph.output].shape
    return shape[1] if shape is not None and len(shape) in (2, 4) and shape[1] >= 1 else None


def output_dense_rank(graph: LayerGraph) -> int | None:
    """The output's number of spatial axes when it is dense (B, K, H, W) logits, else ``None`` (a vector).

    Example:
        >>> from autoprobe.api import analyze
        >>> output_dense_rank(analyze("resnet18").graph) is None
        True
    """
    shape = graph[graph.output].shape
    return len(shape) - 2 if shape is not None and len(shape) == 4 else None


def adapter_params(info: LayerInfo, classes: int | None, *, head: AdapterHead = DEFAULT_HEAD,
                   dense_rank: int | None = None) -> int | None:
    """Parameters of the adapter ``instrument`` would put at this node, when it can tell.

    Args:
        info: the node.
        classes: K, from ``output_classes``; ``None`` when unknown.
        head: the adapter form (``instrument``'s ``head``; ``"conv"`` by default).
        dense_rank: the output's spatial axes (``output_dense_rank``); ``None`` for a vector output.

    Returns:
        ``adapters.adapter_parameters`` for a node of C channels (C*K + K for ``"linear"``), or
        ``None`` when C or K is unknown.

    Example:
        >>> from autoprobe.api import analyze
        >>> graph = analyze("resnet18").graph
        >>> adapter_params(graph["layer1.1.act2"], output_classes(graph))   # 64*64 + 64 + 128 + 64*1000 + 1000
        69288
        >>> adapter_params(graph["layer1.1.act2"], output_classes(graph), head="linear")
        65000
    """
    if not classes or not info.channels:
        return None
    return adapter_parameters(info.channels, classes, head, dense_rank=dense_rank)


def to_json(data: Any) -> str:
    """Canonical JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``selection_to_dict``'s output."""
    return json.loads(resources.files("autoprobe").joinpath("inspect.schema.json").read_text(encoding="utf-8"))


def render_table(selection: Selection, graph: LayerGraph, *, all_candidates: bool = False,  # noqa: ANN201
                 head: AdapterHead = DEFAULT_HEAD):
    """A rich renderable: the header facts and one row per point (or per candidate).

    Args:
        selection: the selection.
        graph: its layer graph.
        all_candidates: one row per candidate, not only per point.
        head: the adapter form the ``adapter`` column counts (``instrument``'s ``head``).

    Returns:
        A ``rich.console.Group`` to print with a ``rich.console.Console``.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    title = Text.assemble(
        (selection.model or "model", "bold"),
        f"  D={selection.depth}  M={len(selection.points)}  rules={selection.rules}  "
        f"input={tuple(selection.input_shape[1:])}  mode={selection.mode}  backend={selection.backend}  "
        f"min_distance={selection.min_distance}",
    )
    table = Table(show_lines=False, header_style="bold")
    for column in ("#", "point", "depth", "shape", "adapter", "score", "rules", "reason"):
        table.add_column(column, overflow="fold", no_wrap=column in ("#", "depth", "score", "adapter"))
    chosen = {p.name: i for i, p in enumerate(selection.points, 1)}
    classes, rank = output_classes(graph), output_dense_rank(graph)
    rows = selection.candidates if all_candidates else [s for s in selection.candidates if s.node in chosen]
    for s in rows:
        info = graph[s.node]
        mark = f"P{chosen[s.node]}" if s.node in chosen else ""
        style = "bold" if mark else "dim"
        params = adapter_params(info, classes, head=head, dense_rank=rank)
        table.add_row(
            mark, s.node, str(info.depth), "x".join(map(str, info.shape or ())),
            "-" if params is None else f"{params:,}", f"{s.score:.2f}",
            ", ".join(dict.fromkeys(f.detector for f in s.fired)), s.fired[0].reason, style=style,
        )
    parts = [title, table]
    chosen_params = [adapter_params(graph[p.name], classes, head=head, dense_rank=rank) for p in selection.points]
    if chosen_params and None not in chosen_params:
        layers = "3x3 conv, BatchNorm, 1x1 conv" if rank else "Linear, LayerNorm, Linear"
        form = (f"C*K + K each, K={classes}" if head == "linear" else
                f"conv heads, K={classes}, H = min(C, 128): {layers}; --head linear: C*K + K each")
        parts.append(Text(f"adapters: {sum(chosen_params):,} parameters in all ({form})"))
    parts.extend(Text(f"note: {n}", style="yellow") for n in selection.notes)
    return Group(*parts)


KIND_COLOURS = {
    "input": "#e0e0e0", "output": "#e0e0e0", "conv": "#cfe2ff", "linear": "#cfe2ff", "weight": "#cfe2ff",
    "norm": "#eeeeee", "act": "#d1f0d1", "gate": "#d1f0d1", "pool": "#c8ecec", "attention": "#e3d4f5",
    "add": "#ffe0b3", "cat": "#ffe0b3", "mul": "#ffe0b3", "resize": "#c8ecec",
}
_SHOWN = frozenset(KIND_COLOURS)


def _contracted(graph: LayerGraph) -> nx.DiGraph:
    """The graph over the nodes worth drawing; reshapes, dropouts and the like are contracted away."""
    keep = {i.name for i in graph if i.kind in _SHOWN}
    out = nx.DiGraph()
    out.add_nodes_from(sorted(keep, key=lambda n: graph[n].order))
    for name in out.nodes:
        stack, seen = list(graph.nx_graph.successors(name)), set()
        while stack:
            nxt = stack.pop()
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt in keep:
                out.add_edge(name, nxt)
            else:
                stack.extend(graph.nx_graph.successors(nxt))
    return out


def render_svg(selection: Selection, graph: LayerGraph) -> str:
    """An SVG picture of the layer graph, top to bottom, with the chosen points highlighted.

    Rows are topological generations of the graph (reshapes and dropouts
    contracted away); chosen points are red with their number, other
    candidates amber. Hovering a node shows its full record and the rules
    that fired.

    Returns:
        The SVG document as a string.
    """
    drawn = _contracted(graph)
    rows = [sorted(g, key=lambda n: graph[n].order) for g in nx.topological_generations(drawn)]
    box_w, box_h, gap_x, gap_y, top = 210, 30, 20, 22, 110
    width = max(max(len(r) for r in rows) * (box_w + gap_x) + gap_x + 160, 900)
    height = top + len(rows) * (box_h + gap_y) + 20
    pos: dict[str, tuple[float, float]] = {}
    for r, row in enumerate(rows):
        offset = (width - len(row) * (box_w + gap_x) + gap_x) / 2
        for c, name in enumerate(row):
            pos[name] = (offset + c * (box_w + gap_x), top + r * (box_h + gap_y))
    chosen = {p.name: i for i, p in enumerate(selection.points, 1)}
    scored = {s.node: s for s in selection.candidates}

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{gap_x}" y="28" font-size="18" font-weight="bold">{html.escape(selection.model)}</text>',
        f'<text x="{gap_x}" y="50" font-size="13">D = {selection.depth} weight layers, M = {len(selection.points)} '
        f"points, rules = {html.escape(selection.rules)}, input {tuple(selection.input_shape[1:])}</text>",
        f'<text x="{gap_x}" y="70" font-size="12"><tspan fill="#c62828" font-weight="bold">red: chosen point</tspan>'
        '  <tspan fill="#b26a00">amber: candidate</tspan>  blue: weight layer  orange: merge  purple: attention'
        "  (hover a node for details)</text>",
    ]
    for u, v in drawn.edges:
        (x1, y1), (x2, y2) = pos[u], pos[v]
        if y2 - y1 > box_h + gap_y:
            # An edge that skips rows (a residual or U-Net skip) arcs around the boxes on the left.
            sx, sy, ex, ey = x1, y1 + box_h / 2, x2, y2 + box_h / 2
            bend = min(sx, ex) - 40 - min((y2 - y1) / 40, 60)
            path = f"M{sx:.0f},{sy:.0f} C{bend:.0f},{sy:.0f} {bend:.0f},{ey:.0f} {ex:.0f},{ey:.0f}"
            colour = "#ef8f00"
        else:
            sx, sy, ex, ey = x1 + box_w / 2, y1 + box_h, x2 + box_w / 2, y2
            path = f"M{sx:.0f},{sy:.0f} C{sx:.0f},{sy + 14:.0f} {ex:.0f},{ey - 14:.0f} {ex:.0f},{ey:.0f}"
            colour = "#9e9e9e"
        out.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.2"/>')
    for name in drawn.nodes:
        info, (x, y) = graph[name], pos[name]
        fill, stroke, sw = KIND_COLOURS.get(info.kind, "#ffffff"), "#616161", 1
        if name in scored:
            fill, stroke, sw = "#ffe9a8", "#b26a00", 1.5
        label = name if len(name) <= 30 else "…" + name[-29:]
        if name in chosen:
            fill, stroke, sw = "#ffcdd2", "#c62828", 3
            label = f"P{chosen[name]} {label}"[:32]
        out.append(f"<g><title>{html.escape(_tooltip(info, scored.get(name)))}</title>")
        out.append(
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{box_w}" height="{box_h}" rx="5" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{sw}"/>'
        )
        shape = "x".join(map(str, info.shape[1:])) if info.shape else ""
        out.append(f'<text x="{x + 6:.0f}" y="{y + 13:.0f}">{html.escape(label)}</text>')
        out.append(
            f'<text x="{x + 6:.0f}" y="{y + 25:.0f}" fill="#555" font-size="9">'
            f"{html.escape(info.kind)} d{info.depth} {html.escape(shape)}</text></g>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _tooltip(info: LayerInfo, scored: Any) -> str:
    lines = [
        info.name, f"op: {info.op} {info.target}", f"kind: {info.kind}  depth: {info.depth}",
        f"shape: {info.shape}  layout: {info.layout or 'unknown (not eligible)'}",
    ]
    if scored is not None:
        lines.append(f"score: {scored.score:.2f}")
        lines.extend(f"{f.detector}: {f.reason}" for f in scored.fired)
    return "\n".join(lines)
