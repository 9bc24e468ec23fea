"""stage-boundary: the last node of a run of blocks before the representation changes.

Walks the trunk (``LayerGraph.trunk``: the nodes every path from the input to the
lowest-resolution feature, or from it to the output, passes through; the block
outputs of a residual network, every layer of a plain one) and groups it into
runs of equal representation (channels, positions). The last trunk node of
each run holding at least ``min_depth`` weight layers is a stage boundary: the
end of a ResNet stage, a Swin stage, a ViT's patch embedding. In an
encoder-decoder every encoder stage ends on the trunk even when it also feeds
the decoder (a U-Net skip, an FPN lateral, the ASPP input) and so does not
dominate the output; the decoder's chain after the encoder's bottom is on the
trunk too.

Block ends (the last trunk node of a module that contains a residual merge,
e.g. each transformer layer) are emitted too, with strength ``block_weight``,
so that architectures with one long stage (ViT) still have candidates spread
over their depth.

Passing example (fires at the second ReLU, the end of the 16x16 stage)::

    Conv2d(3,8,3,p=1) -> ReLU -> Conv2d(8,8,3,p=1) -> ReLU -> Conv2d(8,16,3,s=2,p=1) -> ReLU

Failing example (no representation change, no block structure)::

    Conv2d(3,8,3,p=1) -> ReLU     # one run that ends at the output
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx

from ..graph import LayerGraph, LayerInfo
from . import Candidate, Option
from ._walk import is_feature

ID = "stage-boundary"
SUMMARY = "end of a stage (the representation changes next) or, weaker, end of a residual block"
OPTIONS = {
    "min_depth": Option(int, 2, "weight layers a run must contain to count as a stage"),
    "block_weight": Option(float, 0.4, "strength of a block end relative to a stage end; 0 turns block ends off"),
}


def _rep(info: LayerInfo) -> tuple[int | None, int | None]:
    return info.channels, info.positions


def detect(graph: LayerGraph, options: Mapping[str, Any]) -> tuple[Candidate, ...]:
    trunk = [graph[n] for n in graph.trunk if is_feature(graph[n]) and graph[n].spatial is not None]
    found: list[Candidate] = []
    run_start = 0
    for i, info in enumerate(trunk):
        last = i + 1 == len(trunk)
        if not last and _rep(trunk[i + 1]) == _rep(info):
            continue
        run = trunk[run_start : i + 1]
        entry_depth = trunk[run_start - 1].depth if run_start else 0
        if info.kind != "input" and info.depth - entry_depth >= options["min_depth"]:
            nxt = f"{_describe(trunk[i + 1])} next" if not last else "the head next"
            found.append(
                Candidate(
                    info.name, ID,
                    f"end of stage {run[0].name}..{info.name} ({_describe(info)}, {len(run)} {_where(graph, run)} nodes); {nxt}",
                )
            )
        run_start = i + 1
    found.extend(_encoder_taps(graph, trunk, {c.node for c in found}))
    if options["block_weight"] > 0:
        stage_ends = {c.node for c in found}
        found.extend(_block_ends(graph, trunk, stage_ends, options["block_weight"]))
    return tuple(found)


def _encoder_taps(graph: LayerGraph, trunk: list[LayerInfo], skip: set[str]) -> list[Candidate]:
    """Trunk nodes before the pivot that also feed the decoder: a successor off the trunk that never leads back into
    the encoder (a U-Net skip, an FPN lateral, DPT's reassembly of ViT blocks 3, 6, 9), where a representation
    change alone finds no stage end (a ViT has one long stage)."""
    pivot = graph.pivot
    if graph.trunk == graph.spine:
        return []  # no decoder: every branch of a spine node rejoins the spine
    encoder = nx.ancestors(graph.nx_graph, pivot)
    found = []
    for info in trunk:
        if info.name not in encoder or info.name in skip or info.kind == "input":
            continue
        out = [s for s in graph.successors(info.name) if s.name not in encoder and s.name != pivot]
        if out:
            found.append(Candidate(info.name, ID, f"end of stage at {info.name} ({_describe(info)}): an encoder "
                                                  f"feature the decoder reads at {out[0].name}"))
    return found


def _block_ends(graph: LayerGraph, trunk: list[LayerInfo], skip: set[str], strength: float) -> list[Candidate]:
    """Last trunk node of each module whose trunk run contains a residual merge."""
    found = []
    for i, info in enumerate(trunk):
        block = _block(info)
        if not block or (i + 1 < len(trunk) and _block(trunk[i + 1]) == block):
            continue
        run = [s for s in trunk[: i + 1] if _block(s) == block]
        merged = any(s.kind in ("add", "cat") and len(graph.predecessors(s.name)) >= 2 for s in run)
        if merged and info.name not in skip:
            found.append(Candidate(info.name, ID, f"end of residual block {block} ({_describe(info)})", strength))
    return found


def _where(graph: LayerGraph, run: list[LayerInfo]) -> str:
    """``spine`` when every path to the output crosses the run (a classifier's stage), else ``trunk``."""
    spine = set(graph.spine)
    return "spine" if all(i.name in spine for i in run) else "trunk"


def _block(info: LayerInfo) -> str:
    return info.name.rsplit(".", 1)[0] if "." in info.name else ""


def _describe(info: LayerInfo) -> str:
    where = "x".join(map(str, info.spatial)) if info.spatial else "vector"
    return f"{info.channels} ch @ {where}"
