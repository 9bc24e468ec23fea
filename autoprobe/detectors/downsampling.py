"""downsampling: the feature just before (or after) spatial or token-count reduction.

Fires where a node's feature has at least ``min_factor`` times fewer positions
(H*W, or tokens) than the feature entering it: strided convs, pooling, patch
merging. Global pooling (down to one position) is a read-out, not a
downsampling, and is skipped. Sizes are compared with what the source's content was computed at
(``LayerGraph.native_positions``), so an op that takes an enlarged map back to its size (the
interpolation after a pyramid pool to a larger grid, the slice that removes window padding) is
no reduction. With ``snap`` the point moves to the network's
trunk (``LayerGraph.trunk``: the nodes every path to or from the lowest-resolution feature passes
through), so a stride inside a residual branch marks the block input, not a branch-internal tensor,
and a stride in an encoder stage that feeds a decoder (FPN, U-Net) marks that stage's input rather
than the first stage's end.

Passing example (fires)::

    Conv2d(3, 8, 3, padding=1) -> ReLU -> MaxPool2d(2)   # before: the ReLU, 16x16 -> 8x8

Failing example (does not fire)::

    Conv2d(3, 8, 3, padding=1) -> ReLU -> Conv2d(8, 8, 3, padding=1)   # resolution never drops
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..graph import LayerGraph
from . import Candidate, Option
from ._walk import has_spatial, nearest

ID = "downsampling"
SUMMARY = "before or after a drop in spatial size or token count (strided conv, pooling, patch merging)"
OPTIONS = {
    "position": Option(str, "before", "where the point goes relative to the reduction", ("before", "after", "both")),
    "min_factor": Option(float, 2.0, "minimum ratio of positions in to positions out"),
    "snap": Option(bool, True, "move the point to the nearest trunk node (block input or output)"),
}


def detect(graph: LayerGraph, options: Mapping[str, Any]) -> tuple[Candidate, ...]:
    found: dict[tuple[str, str], Candidate] = {}
    for info in graph:
        reshape = info.kind == "reshape" and info.spatial is not None
        if not (has_spatial(info) or reshape) or info.positions <= 1 or info.kind in ("input", "output"):
            continue
        for source in nearest(graph, info.name, upstream=True, accept=has_spatial):
            factor = source.positions / info.positions
            if factor < options["min_factor"]:
                continue
            if (graph.native_positions[source.name] or source.positions) / info.positions < options["min_factor"]:
                continue  # back to (near) the size an enlarging op grew the source from: an unpad, no reduction
            if reshape and (source.positions, source.channels) == (info.channels, info.positions):
                # Tokens and channels swapped places in an axis move: a transpose, not a reduction. Only a
                # reshape can do that; a strided conv from 4 ch @ 16 to 16 ch @ 4 is a real downsampling.
                continue
            if reshape and info.channels != source.channels * factor:
                continue  # only a space-to-depth reshape (patch merging) trades positions for channels
            change = f"{_size(source)} -> {_size(info)} at {info.name} ({info.module_type or info.target})"
            if options["position"] in ("before", "both"):
                node = graph.trunk_before(source.name) if options["snap"] else source.name
                found.setdefault((node, "before"), Candidate(node, ID, f"before downsampling {change}"))
            if options["position"] in ("after", "both"):
                node = _settled(graph, graph.trunk_after(info.name) if options["snap"] else info.name)
                found.setdefault((node, "after"), Candidate(node, ID, f"after downsampling {change}"))
    return tuple(found.values())


def _settled(graph: LayerGraph, name: str) -> str:
    """``name``, or the end of the norm and activation chain that is its only reader (a strided conv's BN and ReLU):
    the feature after a reduction is the one its block hands on, not the raw conv output before its norm."""
    info = graph[name]
    while True:
        nxt = graph.successors(name)
        if len(nxt) != 1 or nxt[0].kind not in ("norm", "act", "identity") or nxt[0].shape != info.shape:
            return name
        name = nxt[0].name


def _size(info) -> str:  # noqa: ANN001
    return "x".join(str(s) for s in info.spatial)
