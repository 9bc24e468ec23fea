"""bottleneck: where the feature dimension is compressed, a local minimum of width.

A node is a bottleneck when its channel width is at least ``min_ratio`` times
narrower than the nearest wider feature upstream and the feature right after
it widens again by the same factor: the 3x3 conv of a ResNet bottleneck block,
the narrow output of an inverted-residual (MobileNet, EfficientNet) block, the
token width between a transformer's MLP expansions. Of a plateau of equal
width, the last node (just before the expansion) is the point. Squeeze-excite
branches (one position) are not feature maps and are skipped.

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
        wider_after = [n for n in after if n.channels >= width * ratio and n.positions == info.positions]
        if not wider_after or any(n.channels == width for n in after):
            continue  # not the end of the plateau, or no expansion follows
        before = max(_widths_before(graph, info), default=0)
        if before < width * ratio:
            continue
        node = graph.trunk_before(info.name) if options["snap"] else info.name
        reason = f"{before} -> {width} -> {wider_after[0].channels} channels at {info.name}"
        found.setdefault(node, Candidate(node, ID, f"bottleneck {reason}"))
    return tuple(found.values())


def _widths_before(graph: LayerGraph, info: LayerInfo) -> set[int]:
    """Widths of the nearest upstream features whose width differs from ``info``'s (through its plateau)."""
    width = info.channels
    return {
        n.channels
        for n in nearest(graph, info.name, upstream=True, accept=lambda n: _map(n) and n.channels != width)
        if n.positions == info.positions
    }
