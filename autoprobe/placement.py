"""Place supervision points by rule instead of by score: exactly spaced, by name, or at random.

``select.py`` chooses points by the detectors' scores, at least ``min_distance`` weight layers
apart. Experiments and users sometimes need the points somewhere else:

* ``spaced(analysis, m, spacing, position)``: ``m`` points *exactly* ``spacing`` weight layers
  apart (the paper's distance ablation), as a block near the input, at the centre or near the
  output of the usable depth (its position ablation);
* ``by_name(analysis, names)``: the points a person names, as layer-graph node names
  (``layer1.1.act2``) or module paths (``layer1``: that module's output);
* ``random_points(analysis, m, seed)``: ``m`` eligible nodes drawn uniformly (a control).

Each is a pure function of an ``autoprobe.api.analyze`` result: it reads the layer graph and
returns a new ``Selection`` (``dataclasses.replace`` of the analysis's own) whose notes say how
the points were placed. Pass it to ``autoprobe.instrument(model, selection)``.

Where a point sits on the depth axis: the depth of a node is the number of weight layers on the
longest input-to-node path. The *main path* is the longest input-to-output path (at each node,
the predecessor of largest depth, the later one on a tie); it holds every depth 1..D. The point
*at depth d* is the last node of depth d on the main path, that is the output of the d-th weight
layer after its norm and activation, views (flatten, reshape, dropout) skipped; in a ResNet the
odd depths are block outputs. A node is usable when ``select.can_be_point`` says so (the one
eligibility rule: a layout the ops decide and, on a graph from a fallback backend, the output of a
module call, since a tap on a function inside a module would move to that module's output).
``by_name`` resolves names and module paths, then hands the nodes to ``Analysis.choose``, the one
by-name entry point.

Eligible depths are ``1 .. select.usable_depth`` (D less the pack's head zone), as in ``select``.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from .errors import SelectionError
from .ops import is_view
from .select import Fired, Point, Scored, Selection, can_be_point, point_at, usable_depth

if TYPE_CHECKING:
    from .api import Analysis
    from .graph import LayerGraph, LayerInfo

__all__ = ["Position", "POSITIONS", "main_path", "depth_points", "spaced", "by_name", "random_points"]

Position = Literal["input", "centre", "output"]
POSITIONS: tuple[str, ...] = ("input", "centre", "output")
_VIEW_KINDS = frozenset({"reshape", "identity"})


def main_path(graph: LayerGraph) -> tuple[LayerInfo, ...]:
    """The longest input-to-output path, in execution order.

    Walks back from the output, at each node to the predecessor of largest depth (the one
    executed later on a tie), so the path holds every depth from 0 to D.

    Example:
        >>> import torch
        >>> from autoprobe.api import analyze
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
        ...                           torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> [i.name for i in main_path(analyze(net, input_size=(1, 6, 6)).graph)]
        ['input_1', '0', '1', '2', '3', '4', 'output']
    """
    path = [graph[graph.output]]
    while path[-1].name != graph.input:
        preds = graph.predecessors(path[-1].name)
        if not preds:
            break
        path.append(max(preds, key=lambda i: (i.depth, i.order)))
    return tuple(reversed(path))


def _limit(analysis: Analysis) -> int:
    return usable_depth(analysis.graph, analysis.pack.policy)


def _eligible(analysis: Analysis, info: LayerInfo) -> bool:
    return can_be_point(analysis.graph, info) and 1 <= info.depth <= _limit(analysis)


def depth_points(analysis: Analysis) -> dict[int, LayerInfo]:
    """Eligible depth -> the node that stands for it: the last eligible main-path node of that depth
    that is not a mere view (reshape, flatten, identity) of the node before it.

    Example:
        >>> import torch
        >>> from autoprobe.api import analyze
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
        ...                           torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> {d: i.name for d, i in depth_points(analyze(net, input_size=(1, 6, 6))).items()}
        {1: '1', 2: '3'}
    """
    out: dict[int, LayerInfo] = {}
    modules = dict(analysis.model.module.named_modules())
    for info in main_path(analysis.graph):
        # A reshape or identity (flatten, dropout) is a view of the node before it, not a new feature: by the op's
        # kind, or by its module's registry entry (``Flatten``'s kind is ``other``, its entry a view).
        view = info.kind in _VIEW_KINDS or is_view(modules.get(info.module_path))
        if _eligible(analysis, info) and not view:
            out[info.depth] = info  # the path is in execution order: the last one of a depth wins
    return out


def _point(analysis: Analysis, info: LayerInfo, why: str) -> Point:
    scored = {s.node: s for s in analysis.selection.candidates}.get(info.name)
    return point_at(info, scored or Scored(info.name, 0.0, (Fired("placement", why, 0.0),)))


def _selection(analysis: Analysis, infos: Sequence[LayerInfo], note: str, why: str, distance: int) -> Selection:
    infos = sorted(infos, key=lambda i: i.order)
    return replace(
        analysis.selection,
        points=tuple(_point(analysis, i, why) for i in infos),
        min_distance=distance,
        notes=(*analysis.selection.notes, note),
    )


def spaced(analysis: Analysis, m: int, spacing: int, position: Position = "centre") -> Selection:
    """``m`` points exactly ``spacing`` weight layers apart, placed near the input, centre or output.

    The points sit at depths ``a, a + spacing, ..., a + (m - 1) * spacing`` (see the module
    docstring for the node that stands for a depth). Among the anchors ``a`` for which every one
    of those depths is eligible and has a node, ``input`` takes the smallest, ``output`` the
    largest, and ``centre`` the one whose span's middle is closest to the middle of the usable
    depth (the smaller on a tie).

    Args:
        analysis: from ``autoprobe.api.analyze(model, ...)``.
        m: number of points (>= 1).
        spacing: weight layers between adjacent points (>= 1; ignored for ``m == 1``).
        position: ``input``, ``centre`` or ``output``.

    Returns:
        A new ``Selection`` with those points and a note saying how they were placed.

    Raises:
        SelectionError: bad arguments, or no anchor fits ``m`` points at that spacing.

    Example:
        >>> import torch
        >>> from autoprobe.api import analyze
        >>> layers = [torch.nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(8)]
        >>> net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(64, 2))
        >>> spaced(analyze(net, input_size=(1, 4, 4)), 2, 3, "input").names
        ('0', '3')
    """
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise SelectionError(f"spaced: m={m!r} must be a positive integer. Hint: m=3.")
    if not isinstance(spacing, int) or isinstance(spacing, bool) or spacing < 1:
        raise SelectionError(f"spaced: spacing={spacing!r} must be a positive integer (weight layers). Hint: spacing=2.")
    if position not in POSITIONS:
        raise SelectionError(f"spaced: position={position!r} is not one of {', '.join(POSITIONS)}. Hint: 'centre'.")
    by_depth = depth_points(analysis)
    step = spacing if m > 1 else 0
    anchors = [a for a in sorted(by_depth) if all(a + k * step in by_depth for k in range(m))]
    if not anchors:
        have = ", ".join(map(str, sorted(by_depth))) or "none"
        raise SelectionError(
            f"spaced: no {m} points exactly {spacing} weight layers apart fit {analysis.selection.model or 'the model'} "
            f"(D={analysis.graph.depth}; eligible depths with a point: {have}). "
            "Hint: fewer points or a smaller spacing."
        )
    if position == "input":
        anchor = anchors[0]
    elif position == "output":
        anchor = anchors[-1]
    else:
        middle = (1 + _limit(analysis)) / 2
        anchor = min(anchors, key=lambda a: (abs(a + step * (m - 1) / 2 - middle), a))
    depths = [anchor + k * step for k in range(m)]
    note = (f"placed by autoprobe.placement.spaced: {m} point(s) {spacing} weight layers apart near the {position} "
            f"(depths {', '.join(map(str, depths))} of D={analysis.graph.depth})")
    return _selection(analysis, [by_depth[d] for d in depths], note, "spaced placement", spacing)


def _module_output(graph: LayerGraph, path: str) -> LayerInfo | None:
    """The node a module's output is: the last node executed inside it."""
    inside = [i for i in graph.ordered if i.name.startswith(path + ".") or i.module_path == path
              or i.module_path.startswith(path + ".") or (i.call is not None and i.call[0] == path)]
    inside = [i for i in inside if i.name not in (graph.input, graph.output)]
    return max(inside, key=lambda i: i.order) if inside else None


def by_name(analysis: Analysis, names: Sequence[str]) -> Selection:
    """The points a person names: layer-graph node names, or module paths meaning that module's output.

    Args:
        analysis: from ``autoprobe.api.analyze(model, ...)``.
        names: node names (``layer1.1.act2``, as ``autoprobe inspect --all-candidates`` and the
            layer graph spell them) or module paths (``layer1``: the last node executed inside it).

    Returns:
        A new ``Selection`` with those points, in execution order, and a note.

    Raises:
        SelectionError: a name is neither a node nor a module (the message lists close
            matches), or two names give the same node.
        UsageError: a named node cannot be a point (from ``Analysis.choose``).

    Example:
        >>> import torch
        >>> from autoprobe.api import analyze
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(64, 2))
        >>> by_name(analyze(net, input_size=(1, 6, 6)), ["1"]).names
        ('1',)
    """
    if isinstance(names, str) or not names:
        raise SelectionError(f"by_name: names={names!r} must be a non-empty list of node names or module paths. "
                             "Hint: by_name(analysis, ['layer1', 'layer2']).")
    g = analysis.graph
    nodes = {i.name: i for i in g.ordered}
    modules = {p for p, _ in analysis.model.module.named_modules() if p}
    chosen: list[LayerInfo] = []
    for name in names:
        info = nodes.get(name)
        if info is None and name in modules:
            info = _module_output(g, name)
        if info is None or name in (g.input, g.output):
            close = difflib.get_close_matches(name, sorted(set(nodes) | modules), n=5, cutoff=0.5)
            raise SelectionError(
                f"by_name: {name!r} is not a node of the layer graph nor a module of "
                f"{analysis.selection.model or 'the model'}"
                + (f"; close matches: {', '.join(close)}" if close else "")
                + ". Hint: `autoprobe inspect MODEL --all-candidates` lists node names; a module path means its output."
            )
        if any(c.name == info.name for c in chosen):
            raise SelectionError(f"by_name: {name!r} gives node {info.name!r}, which is already chosen. "
                                 "Hint: name each point once.")
        chosen.append(info)
    selection = analysis.choose(*(i.name for i in chosen))  # the one eligibility check for named points
    note = f"placed by autoprobe.placement.by_name: {', '.join(names)} -> {', '.join(i.name for i in chosen)}"
    return replace(selection, notes=(*analysis.selection.notes, note))


def random_points(analysis: Analysis, m: int, seed: int) -> Selection:
    """``m`` distinct eligible nodes drawn uniformly at random (``random.Random(seed)``): a control.

    Eligible: not the input or output, inside the usable depth, with a shape and a channel axis,
    and (on a fallback backend) a module call. Every such node is equally likely, not only spine
    or candidate nodes.

    Example:
        >>> import torch
        >>> from autoprobe.api import analyze
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
        ...                           torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> len(random_points(analyze(net, input_size=(1, 6, 6)), 2, seed=0).points)
        2
    """
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise SelectionError(f"random_points: m={m!r} must be a positive integer. Hint: m=3.")
    pool = [i for i in analysis.graph.ordered if _eligible(analysis, i)]
    if len(pool) < m:
        raise SelectionError(f"random_points: only {len(pool)} eligible nodes, cannot draw {m}. Hint: fewer points.")
    drawn = random.Random(seed).sample(pool, m)
    note = (f"placed by autoprobe.placement.random_points: {m} of {len(pool)} eligible nodes drawn uniformly "
            f"with seed {seed}")
    return _selection(analysis, drawn, note, "drawn at random", 0)
