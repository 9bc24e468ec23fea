"""skip: long-range encoder-decoder skip connections (U-Net, FPN laterals), not short residuals.

A merge (add or concat of two or more inputs) is an encoder-decoder skip when
its inputs lie at least ``min_span`` weight layers apart in depth and, with
``require_round_trip``, the long branch went down to a lower resolution than the
merge's and came back up: the join of high- and low-resolution context. The round
trip is looked for between the merge and the node its branches split at (its
dominator), so a lateral 1x1 conv on the encoder side (FPN's top-down adds) does not
hide it. A residual add (``x + f(x)``, a few layers, one resolution) is not one, nor is
a strided block's shortcut (the resolution goes down and stays down).

Passing example (fires at the concat; ``up`` a stride-2 transposed conv, so the
decoder side is 3 weight layers deeper than ``e``)::

    e = conv(x); d = up(conv(pool(conv(e)))); y = cat([e, d])

Failing example (a residual block)::

    y = x + conv(relu(conv(x)))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx

from ..graph import LayerGraph
from . import Candidate, Option
from ._walk import has_spatial, merge_feature, merges

ID = "skip"
SUMMARY = "long-range add/concat joining encoder and decoder (U-Net skips, FPN laterals)"
OPTIONS = {
    "min_span": Option(int, 3, "minimum depth difference (weight layers) between the joined inputs"),
    "require_round_trip": Option(bool, True, "the long branch must pass through a lower resolution"),
}


def detect(graph: LayerGraph, options: Mapping[str, Any]) -> tuple[Candidate, ...]:
    found: dict[str, Candidate] = {}
    for merge, inputs in merges(graph):
        shallow = min(inputs, key=lambda n: (n.depth, n.order))
        deep = max(inputs, key=lambda n: (n.depth, n.order))
        span = deep.depth - shallow.depth
        if span < options["min_span"]:
            continue
        low = None
        at = merge if merge.positions is not None else shallow
        if at.positions is not None:
            split = graph.dominators[merge.name]
            between = nx.descendants(graph.nx_graph, split) & nx.ancestors(graph.nx_graph, merge.name)
            low = min(
                (graph[n] for n in between if has_spatial(graph[n]) and graph[n].positions > 1),
                key=lambda n: (n.positions, n.order),
                default=None,
            )
        round_trip = low is not None and low.positions < at.positions
        if options["require_round_trip"] and not round_trip:
            continue
        node = merge_feature(graph, merge)
        if node is None:
            continue
        via = f" via {'x'.join(map(str, low.spatial))} at {low.name}" if round_trip else ""
        found.setdefault(node, Candidate(
            node, ID, f"skip joins {shallow.name} (depth {shallow.depth}) with {deep.name} (depth {deep.depth}){via}",
        ))
    return tuple(found.values())
