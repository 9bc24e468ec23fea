"""Stage 4: score candidates by the rule pack and pick M points.

Score of a node = sum over the detectors that flagged it of (rule weight x
candidate strength), scaled by the position bias ``1 + s * b(t)`` where
``t = depth / D`` and ``b`` is ``1 - 2t`` (input), ``2t - 1`` (output),
``1 - 4|t - 1/2|`` (centre) or 0 (none).

M defaults to ``round(ln D)`` clamped to ``[min_points, max_points]`` (the
paper's M = O(log D), at most about 5 in practice). Points are picked
greedily by score, ties broken by execution order, never by hash or dict
order, keeping ``min_distance`` weight layers between adjacent points and
none in the last ``exclude_output * D`` of the depth (the head). When the
distance leaves fewer than M points it is halved, keeping the points placed so
far, and that is recorded in ``Selection.notes``: a relaxation is never silent. A node is a point only if
``instrument`` can tap it (``can_be_point``): its layout is one the graph's ops
decide, and on the export and hooks backends it is a module call's output (what a
forward hook sees); candidates left out for either reason are named in the notes.
When no detector fires,
the spine's feature nodes are the candidates, ``usable depth / M`` apart
(unless the pack fixes ``min_distance``), and a note says so.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import networkx as nx

from .detectors import Candidate, run_detectors
from .errors import UsageError
from .graph import LayerGraph, LayerInfo
from .layout import Layout
from .rules import Policy, RulePack
from .trace import Backend, Mode

__all__ = [
    "Fired", "Point", "Scored", "Selection", "select_points", "auto_points", "check_points", "can_be_point", "point_at",
    "why_not_point", "usable_depth",
]


@dataclass(frozen=True)
class Fired:
    """One rule that fired on a node: detector ID, its reason and the score it added."""

    detector: str
    reason: str
    score: float


@dataclass(frozen=True)
class Scored:
    """A candidate node with its total score and the rules that fired on it."""

    node: str
    score: float
    fired: tuple[Fired, ...]


@dataclass(frozen=True)
class Point:
    """A chosen supervision point.

    Attributes:
        name: layer graph node name (module-qualified).
        fx_name: the fx node's name, for rewriting.
        module_path: the module the node belongs to.
        depth: weight layers from the input.
        shape: the feature's shape (batch included).
        layout: the feature's layout (``NCHW``, ``NLC``, ...), derived from the graph's ops.
        score: the node's score.
        fired: the rules that fired, strongest first.
    """

    name: str
    fx_name: str
    module_path: str
    depth: int
    shape: tuple[int, ...]
    layout: Layout
    score: float
    fired: tuple[Fired, ...]

    @property
    def reason(self) -> str:
        """The strongest rule's reason, one line."""
        return self.fired[0].reason if self.fired else ""


@dataclass(frozen=True)
class Selection:
    """The points chosen for a model, and everything needed to explain and lock them.

    Attributes:
        model: the model's label (spec or class name).
        depth: D.
        points: the chosen points in execution order.
        candidates: every scored candidate in execution order.
        rules: the rule pack's name.
        rules_sha256: the resolved pack's content hash.
        min_distance: the distance actually used.
        input_shape: the traced input shape.
        mode: ``train`` or ``eval``.
        backend: the tracing backend.
        notes: relaxations and fallbacks, in plain words.
    """

    model: str
    depth: int
    points: tuple[Point, ...]
    candidates: tuple[Scored, ...]
    rules: str
    rules_sha256: str
    min_distance: int
    input_shape: tuple[int, ...]
    mode: Mode
    backend: Backend
    notes: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.points)


def auto_points(depth: int, policy: Policy) -> int:
    """M = round(ln D) clamped to ``[min_points, max_points]`` unless the policy fixes it.

    Example:
        >>> auto_points(50, Policy())
        4
    """
    if policy.points is not None:
        return policy.points
    m = round(math.log(depth)) if depth > 1 else 1
    return max(policy.min_points, min(policy.max_points, m))


def _bias(policy: Policy, t: float) -> float:
    shape = {"input": 1 - 2 * t, "output": 2 * t - 1, "centre": 1 - 4 * abs(t - 0.5), "none": 0.0}[policy.position]
    return 1 + policy.position_strength * shape


def _score(graph: LayerGraph, candidates: tuple[Candidate, ...], pack: RulePack) -> list[Scored]:
    fired: dict[str, list[Fired]] = defaultdict(list)
    for c in candidates:
        if c.node in (graph.input, graph.output):
            continue  # the raw input and the model output are never intermediate points
        fired[c.node].append(Fired(c.detector, c.reason, pack.detectors[c.detector].weight * c.strength))
    scored = []
    depth = max(graph.depth, 1)
    for node, rules in fired.items():
        info = graph[node]
        rules.sort(key=lambda f: (-f.score, f.detector, f.reason))
        raw = sum(f.score for f in rules)
        scored.append(Scored(node, round(raw * _bias(pack.policy, info.depth / depth), 6), tuple(rules)))
    scored.sort(key=lambda s: graph[s.node].order)
    return scored


def check_points(points: object) -> None:
    """Refuse a ``points`` that is not a positive integer (``0``, ``-1``, ``"3"``, ``True``).

    Raises:
        UsageError: the value and what to pass instead.
    """
    if points is None:
        return
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise UsageError(
            f"points must be a positive integer (the number M of points) or None for round(ln D), not {points!r}.\n"
            "Hint: pass points=3; to choose points by name, use "
            "`autoprobe.api.analyze(model, input_size=...).choose('layer1.0.act1', ...)`."
        )


def usable_depth(graph: LayerGraph, policy: Policy) -> int:
    """The deepest depth a point may have: D less the head's zone (``Policy.head``).

    ``fraction``: the last ``exclude_output * D`` are the head's. ``last-merge``: no more than the layers after the
    decoder's last merge (a fusion of parallel branches or a skip join, below the output's depth; residual adds do
    not count), so a decoder shorter than that fraction (DeepLabV3+'s ASPP and skip concats, three and six layers
    before the logits of 137) keeps its points.

    Example:
        >>> import torch
        >>> from autoprobe.trace import trace_fx
        >>> from autoprobe.graph import build_layer_graph
        >>> net = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 1) for _ in range(20)])
        >>> usable_depth(build_layer_graph(trace_fx(net, (3, 8, 8))), Policy())
        18
    """
    limit = graph.depth - math.ceil(policy.exclude_output * graph.depth)
    if policy.head == "last-merge":
        limit = max([limit, *(i.depth for i in graph if i.depth < graph.depth and _decoder_merge(graph, i))])
    return max(limit, 1)


def _decoder_merge(graph: LayerGraph, info: LayerInfo) -> bool:
    """An add or concat of maps that fuses parallel branches (an ASPP) or joins one that comes back from a lower
    resolution (``LayerGraph.native_positions``: a U-Net or DeepLabV3+ skip), not a residual ``x + f(x)``."""
    inputs = graph.predecessors(info.name)
    if info.kind not in ("add", "cat") or len(inputs) < 2 or info.positions is None or info.positions <= 1:
        return False
    native = graph.native_positions
    if any((native[p.name] or info.positions) < info.positions for p in inputs):
        return True
    return not any(nx.has_path(graph.nx_graph, a.name, b.name) for a in inputs for b in inputs if a is not b)


def _in_range(graph: LayerGraph, info: LayerInfo, policy: Policy) -> bool:
    return 1 <= info.depth <= usable_depth(graph, policy) and info.kind != "output" and info.shape is not None


def why_not_point(graph: LayerGraph, info: LayerInfo) -> str:
    """Why a node in the depth range cannot be a point: ``layout`` (no layout the ops decide), ``untappable``
    (on export/hooks, not a module call's output), ``grid`` (a token feature of a dense output whose grid the
    graph does not show); ``""`` when it can."""
    if info.layout is None or info.channels is None:
        return "layout"
    if graph.backend != "fx" and info.call is None:
        return "untappable"
    out = graph[graph.output].shape
    if out is not None and len(out) > 3 and info.spatial is not None and len(info.spatial) != len(out) - 2:
        # A dense output's adapter lays the tokens on a grid: only one the graph shows (the patch embedding's).
        if graph.token_grid(info.name, len(out) - 2) is None:
            return "grid"
    if out is not None and len(out) > 3 and info.spatial is not None and len(info.spatial) == len(out) - 2:
        # A dense adapter resizes the map to the output's grid: axes that do not scale alike onto it are no image
        # grid (MobileViT's (pixels in a patch, patches) axes between its unfold and fold).
        scales = [o / s for o, s in zip(out[2:], info.spatial)]
        if max(scales) >= 2 * min(scales):
            return "grid"
    return ""


def can_be_point(graph: LayerGraph, info: LayerInfo) -> bool:
    """Whether ``instrument`` can tap ``info`` exactly where it is named on its graph's backend: a feature with a
    layout the ops decide, not the input or output; on export/hooks the output of a module call (what a forward hook
    sees); and, for a dense output, a token feature only when the graph shows the grid its tokens form."""
    return info.kind not in ("input", "output") and info.shape is not None and not why_not_point(graph, info)


def _eligible(graph: LayerGraph, info: LayerInfo, policy: Policy) -> bool:
    return _in_range(graph, info, policy) and not why_not_point(graph, info)


def _skipped_notes(graph: LayerGraph, scored: list[Scored], policy: Policy) -> list[str]:
    """One note per reason candidates were left out although rules fired on them."""
    reasons: dict[str, list[str]] = defaultdict(list)
    for s in scored:
        info = graph[s.node]
        if _in_range(graph, info, policy) and s.score >= policy.min_score:
            why = why_not_point(graph, info)
            if why:
                reasons[why].append(s.node)
    notes = []
    if reasons["layout"]:
        names = reasons["layout"]
        notes.append(
            f"{len(names)} candidate(s) not eligible: the graph's ops do not decide their layout "
            f"(no channel axis an adapter can read): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        )
    if reasons["grid"]:
        names = reasons["grid"]
        notes.append(
            f"{len(names)} candidate(s) not eligible: token features whose grid the graph does not show (no map "
            f"before them with their token count), or maps whose axes do not scale alike onto the output's grid, "
            f"for a dense output: {', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''}"
        )
    if reasons["untappable"]:
        names = reasons["untappable"]
        notes.append(
            f"{len(names)} candidate(s) not eligible: functions outside a module's output cannot be tapped by "
            f"forward hooks on the {graph.backend} backend: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        )
    return notes


def _fallback(graph: LayerGraph) -> list[Candidate]:
    """Spine feature nodes, for a graph where no detector fired."""
    return [
        Candidate(n, "spine", "no detector fired; evenly spread spine node", 1.0)
        for n in graph.spine
        if graph[n].channels is not None and graph[n].kind not in ("input", "output")
    ]


def select_points(graph: LayerGraph, pack: RulePack, *, points: int | None = None, model: str = "") -> Selection:
    """Run the pack's detectors on ``graph`` and choose the points.

    Args:
        graph: the layer graph.
        pack: a loaded rule pack.
        points: override M (``--points``).
        model: a label for reports.

    Returns:
        The ``Selection``.

    Example:
        >>> import torch
        >>> from autoprobe.trace import trace_fx
        >>> from autoprobe.graph import build_layer_graph
        >>> from autoprobe.rules import load_rules
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        ...                           torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(512, 10))
        >>> select_points(build_layer_graph(trace_fx(net, (3, 16, 16))), load_rules()).names
        ('1',)
    """
    check_points(points)
    policy = pack.policy
    options = {k: v.options for k, v in pack.detectors.items()}
    candidates = run_detectors(graph, options)
    scored = _score(graph, candidates, pack)
    notes: list[str] = _skipped_notes(graph, scored, policy)
    eligible = [s for s in scored if _eligible(graph, graph[s.node], policy) and s.score >= policy.min_score]
    fell_back = not eligible
    if fell_back:
        notes.append("no detector fired inside the eligible depth range; fell back to evenly spread spine nodes")
        fallback = [c for c in _fallback(graph) if _eligible(graph, graph[c.node], policy)]
        eligible = [Scored(c.node, 1.0, (Fired(c.detector, c.reason, 1.0),)) for c in fallback]
        scored = list(eligible)  # the spine nodes are this selection's candidates: reports list the points from them
    m = points if points is not None else auto_points(graph.depth, policy)
    usable = usable_depth(graph, policy)
    # Equal-score spine nodes would otherwise bunch up at the input: spread them over the usable depth.
    spread = usable / m if fell_back else 0.6 * usable / m
    distance = policy.min_distance if policy.min_distance is not None else max(1, math.floor(spread))

    ranked = sorted(eligible, key=lambda s: (-s.score, graph[s.node].order))
    pick = _strata if policy.spread == "strata" and not fell_back else _greedy
    chosen = pick(graph, ranked, m, distance, usable)
    while len(chosen) < m and distance > 1:
        distance = max(1, distance // 2)
        # The points placed at the wider distance stay (a DenseNet's stage ends over its depth): the relaxed
        # distance only adds to them, instead of a fresh pick bunching the best scores near the input.
        chosen = _greedy(graph, ranked, m, distance, usable, tuple(chosen))
        notes.append(f"min_distance relaxed to {distance} to place {m} points")
    if policy.balance and not fell_back:
        chosen, moved = _balance(graph, ranked, chosen, distance)
        if moved:
            notes.append(f"{abs(moved)} point(s) moved to the {'decoder' if moved > 0 else 'encoder'} side: an "
                         "encoder-decoder's encoder and decoder each get M // 2 points where their candidates allow")
    if len(chosen) < m and not fell_back:
        # Detectors flagged too few depths (a leaf block hides its inside: NFNets): the spine's feature nodes
        # farthest from the points already chosen make up the rest, and the notes say how many.
        spine = [Scored(c.node, 0.0, (Fired(c.detector, c.reason, 0.0),)) for c in _fallback(graph)
                 if _eligible(graph, graph[c.node], policy)]
        filled = _farthest(graph, chosen, spine, m, distance)
        if len(filled) > len(chosen):
            notes.append(f"{len(filled) - len(chosen)} of {m} points are spine nodes spread over the depth: the "
                         "detectors flagged too few distinct depths")
            scored = sorted({*scored, *filled}, key=lambda x: graph[x.node].order)
            chosen = filled
    if len(chosen) < m:
        notes.append(f"only {len(chosen)} of {m} points could be placed: too few candidates at distinct depths")

    picked = sorted(chosen, key=lambda s: graph[s.node].order)
    return Selection(
        model=model,
        depth=graph.depth,
        points=tuple(point_at(graph[s.node], s) for s in picked),
        candidates=tuple(scored),
        rules=pack.name,
        rules_sha256=pack.sha256,
        min_distance=distance,
        input_shape=graph.input_shape,
        mode=graph.mode,
        backend=graph.backend,
        notes=tuple(notes),
    )


def _greedy(
    graph: LayerGraph, ranked: list[Scored], m: int, distance: int, usable: int, chosen: tuple[Scored, ...] = ()
) -> list[Scored]:
    """The best-scoring candidates (``ranked`` is best first) that keep ``distance`` from each other and ``chosen``."""
    picked = list(chosen)
    for s in ranked:
        if len(picked) >= m:
            break
        depth = graph[s.node].depth
        if s not in picked and all(abs(depth - graph[c.node].depth) >= distance for c in picked):
            picked.append(s)
    return picked


def _farthest(graph: LayerGraph, chosen: list[Scored], extra: list[Scored], m: int, distance: int) -> list[Scored]:
    """``chosen`` plus, one at a time, the node of ``extra`` farthest in depth from every point so far (at least
    ``distance`` away; ties to the earlier node), until there are ``m``."""
    picked = list(chosen)
    names = {c.node for c in picked}
    while len(picked) < m:
        gaps = [(min((abs(graph[e.node].depth - graph[c.node].depth) for c in picked), default=graph.depth), e)
                for e in extra if e.node not in names]
        gaps = [(gap, e) for gap, e in gaps if gap >= distance]
        if not gaps:
            break
        best = max(gaps, key=lambda ge: (ge[0], -graph[ge[1].node].order))[1]
        picked.append(best)
        names.add(best.node)
    return picked


def _strata(graph: LayerGraph, ranked: list[Scored], m: int, distance: int, usable: int) -> list[Scored]:
    """The best candidate of each of ``m`` equal strata of the usable depth, strongest stratum first, each keeping
    ``distance`` from those taken; strata with no such candidate are then filled greedily from the rest."""
    strata: dict[int, list[Scored]] = defaultdict(list)
    for s in ranked:
        strata[min(m - 1, (graph[s.node].depth - 1) * m // usable)].append(s)
    picked: list[Scored] = []
    for _, members in sorted(strata.items(), key=lambda kv: (-kv[1][0].score, kv[0])):
        picked = _greedy(graph, members, len(picked) + 1, distance, usable, tuple(picked))
    return _greedy(graph, ranked, m, distance, usable, tuple(picked))


def _balance(graph: LayerGraph, ranked: list[Scored], chosen: list[Scored], distance: int) -> tuple[list[Scored], int]:
    """``chosen`` with, in an encoder-decoder, each side holding ``len(chosen) // 2`` points where candidates allow.

    The encoder is the lowest-resolution feature (``LayerGraph.pivot``) and every node before it; the decoder is
    the rest. It applies only when the graph's trunk comes back up from the pivot (``trunk != spine``), so a
    classifier's head is no decoder. While a side is short, its best candidate that keeps ``distance`` from the
    other points replaces the other side's weakest point. Returns the points and how many moved (positive
    towards the decoder, negative towards the encoder).
    """
    if graph.trunk == graph.spine or len(chosen) < 2:
        return chosen, 0
    encoder = nx.ancestors(graph.nx_graph, graph.pivot) | {graph.pivot}
    picked, moved = list(chosen), 0
    for _ in range(len(chosen)):
        enc = [s for s in picked if s.node in encoder]
        dec = [s for s in picked if s.node not in encoder]
        short_decoder = len(dec) < len(picked) // 2
        if not short_decoder and len(enc) >= len(picked) // 2:
            break
        give, take = (enc, False) if short_decoder else (dec, True)
        weakest = min(give, key=lambda s: (s.score, -graph[s.node].order))
        rest = [s for s in picked if s is not weakest]
        best = next((s for s in ranked if (s.node in encoder) == take and s not in picked
                     and all(abs(graph[s.node].depth - graph[c.node].depth) >= distance for c in rest)), None)
        if best is None:
            break
        picked = [*rest, best]
        moved += 1 if short_decoder else -1
    return picked, moved


def point_at(info: LayerInfo, scored: Scored) -> Point:
    """The ``Point`` for an eligible node, with the score and rules of ``scored`` (the one way a Point is made)."""
    return Point(
        name=info.name,
        fx_name=info.fx_name,
        module_path=info.module_path,
        depth=info.depth,
        shape=info.shape or (),
        layout=info.layout,  # eligible nodes always have one
        score=scored.score,
        fired=scored.fired,
    )
