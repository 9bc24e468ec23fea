"""bottleneck: where the feature dimension is compressed, a local minimum of width.

A node is a bottleneck when its channel width is at least ``min_ratio`` times
narrower than the nearest wider feature upstream and the feature right after
it widens again by the same factor: the 3x3 conv of a ResNet bottleneck block,
the narrow output of an inverted-residual (MobileNet, EfficientNet) block. Of a
plateau of equal width, the last node (just before the expansion) is the point.
Squeeze-excite branches (one position) are not feature maps and are skipped.

Both widths are facts of the path, not of sizes that happen to differ. The
compression must happen on the way to the node: the walk upstream stops at a
merge of its own width (a residual add whose other input was already narrow), so
a transformer block's LayerNorm, which normalizes the residual stream, is no
bottleneck of the previous block's MLP. The expansion must be a weight layer
whose output is used as a feature: a concat appends the narrow feature to others
(DenseNet's growth), and a packed projection (``qkv``, split into heads by
reshapes) is three features of the narrow width, not a wider one.

Passing example (fires at the ReLU after the 8-channel conv)::

    Conv2d(3,32,1) -> Conv2d(32,8,1) -> ReLU -> Conv2d(8,32,1)

Failing example (width only grows)::

    Conv2d(3,8,1) -> ReLU -> Conv2d(8,32,1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..graph import LayerGraph, LayerInfo
from . import Candidate, Option
from ._walk import is_feature, nearest

ID = "bottleneck"
SUMMARY = "local minimum of channel width (compression before an expansion)"
OPTIONS = {
    "min_ratio": Option(float, 2.0, "how many times wider the neighbours must be"),
    "snap": Option(bool, False, "move the point to the nearest trunk node before it"),
}


_WEIGHT_KINDS = ("conv", "linear", "weight")


def _map(info: LayerInfo) -> bool:
    return is_feature(info) and (info.positions or 1) > 1


def detect(graph: LayerGraph, options: Mapping[str, Any]) -> tuple[Candidate, ...]:
    ratio = options["min_ratio"]
    found: dict[str, Candidate] = {}
    for info in graph:
        if not _map(info) or info.kind in ("input", "output"):
            continue
        width = info.channels
        after = [n for n in nearest(graph, info.name, upstream=False, accept=_map)]
        wider_after = [n for n in after if n.channels >= width * ratio and n.positions == info.positions
                       and _expands(graph, n)]
        if not wider_after or any(n.channels == width for n in after):
            continue  # not the end of the plateau, or no expansion follows
        before = max(_widths_before(graph, info), default=0)
        if before < width * ratio:
            continue
        node = graph.trunk_before(info.name) if options["snap"] else info.name
        reason = f"{before} -> {width} -> {wider_after[0].channels} channels at {info.name}"
        found.setdefault(node, Candidate(node, ID, f"bottleneck {reason}"))
    return tuple(found.values())


def _expands(graph: LayerGraph, info: LayerInfo) -> bool:
    """A weight layer whose output is read with its channels whole (not a concat, not a ``qkv`` that reshapes split
    into heads: their outputs have no channel axis)."""
    return info.kind in _WEIGHT_KINDS and any(s.channels is not None or s.kind == "output"
                                              for s in graph.successors(info.name))


def _widths_before(graph: LayerGraph, info: LayerInfo) -> set[int]:
    """Widths of the nearest upstream features whose width differs from ``info``'s, through its plateau but not
    through a merge of its width (there the narrow width was already on another path: the residual stream)."""
    width = info.channels

    def stop(n: LayerInfo) -> bool:
        return _map(n) and (n.channels != width or _merge(graph, n))

    return {
        n.channels
        for n in nearest(graph, info.name, upstream=True, accept=stop)
        if n.positions == info.positions and n.channels != width
    }


def _merge(graph: LayerGraph, info: LayerInfo) -> bool:
    return info.kind in ("add", "cat") and len(graph.predecessors(info.name)) >= 2
