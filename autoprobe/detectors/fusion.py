"""fusion: add/concat of two or more parallel branches (HRNet, Inception, FPN, ASPP).

A merge is a fusion point when none of its inputs is an ancestor of another
(they are parallel branches, not ``x + f(x)``) and either at least two of them
carry ``min_branch_depth`` weight layers since the point where they split, or
there are ``min_branches`` or more of them (an ASPP's five one-conv branches, a
pyramid's pooled levels, counted without an input the others are computed from). The depth condition keeps a ResNet's projection
shortcut (one 1x1 conv beside the block) from counting as a multi-branch fusion.
When the merge's own output is no feature (``torch.stack`` of FPN levels), the
point is the first feature after it (the ``sum`` that folds them).

Passing example (fires at the concat)::

    y = cat([conv3(conv1(x)), conv5(conv1(x)), conv1(x)])

Failing example (a residual add)::

    y = x + conv(relu(conv(x)))
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import permutations
from typing import Any

import networkx as nx

from ..graph import LayerGraph
from . import Candidate, Option
from ._walk import merge_feature, merges

ID = "fusion"
SUMMARY = "merge of two or more parallel branches (multi-branch fusion)"
OPTIONS = {
    "min_branch_depth": Option(int, 2, "weight layers a branch needs since the split to count"),
    "min_branches": Option(int, 3, "parallel branches that make a fusion whatever their depth"),
}


def detect(graph: LayerGraph, options: Mapping[str, Any]) -> tuple[Candidate, ...]:
    found: dict[str, Candidate] = {}
    for merge, inputs in merges(graph):
        # An input that feeds another input is the trunk the branches leave from (PSP's ``cat([x, *pooled(x)])``).
        trunk = {a.name for a, b in permutations(inputs, 2) if nx.has_path(graph.nx_graph, a.name, b.name)}
        branches = [n for n in inputs if n.name not in trunk]
        split = graph[graph.dominators[merge.name]]
        deep = [n for n in branches if n.depth - split.depth >= options["min_branch_depth"]]
        if not (len(deep) >= 2 and not trunk) and len(branches) < options["min_branches"]:
            continue
        node = merge_feature(graph, merge)
        if node is None:
            continue
        found.setdefault(node, Candidate(
            node, ID, f"fuses {len(branches)} branches split at {split.name} ({', '.join(n.name for n in branches)})"
        ))
    return tuple(found.values())
