"""fusion: add/concat of two or more parallel branches (HRNet, Inception, FPN).

A merge is a fusion point when none of its inputs is an ancestor of another
(they are parallel branches, not ``x + f(x)``) and at least two of them carry
``min_branch_depth`` weight layers since the point where they split. The
second condition keeps a ResNet's projection shortcut (one 1x1 conv beside
the block) from counting as a multi-branch fusion.

Passing example (fires at the concat)::

    y = cat([conv3(conv1(x)), conv5(conv1(x)), conv1(x)])

Failing example (a residual add)::

    y = x + conv(relu(conv(x)))
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import combinations
from typing import Any

import networkx as nx

from ..graph import LayerGraph
from . import Candidate, Option
from ._walk import merges

ID = "fusion"
SUMMARY = "merge of two or more parallel branches (multi-branch fusion)"
OPTIONS = {
    "min_branch_depth": Option(int, 2, "weight layers a branch needs since the split to count"),
}


def detect(graph: LayerGraph, options: Mapping[str, Any]) -> tuple[Candidate, ...]:
    found = []
    for merge, inputs in merges(graph):
        if any(nx.has_path(graph.nx_graph, a.name, b.name) for a, b in combinations(inputs, 2)):
            continue
        split = graph[graph.dominators[merge.name]]
        deep = [n for n in inputs if n.depth - split.depth >= options["min_branch_depth"]]
        if len(deep) < 2:
            continue
        found.append(
            Candidate(merge.name, ID, f"fuses {len(inputs)} branches split at {split.name} ({', '.join(n.name for n in inputs)})")
        )
    return tuple(found)
