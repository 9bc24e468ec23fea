"""norm-act-change: where the kind of normalization or activation changes along the path.

Carries the last normalization family (batch, layer, group, ...) and the last
activation family (relu, gelu, silu, ...) forward in execution order, along
the deepest input of every node. A norm or activation of another family than
the one carried marks a change: BatchNorm to LayerNorm at a CoAtNet's first
transformer stage, ReLU to hard-swish in a MobileNetV3. Gates (sigmoid in
squeeze-excite) are not activations here. With ``snap`` the point is the
trunk node (``LayerGraph.trunk``) the change happens after (the feature entering the new regime).

Passing example (fires at the GELU)::

    Conv2d -> BatchNorm2d -> ReLU -> Conv2d -> BatchNorm2d -> GELU

Failing example (one family throughout)::

    Conv2d -> BatchNorm2d -> ReLU -> Conv2d -> BatchNorm2d -> ReLU
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..graph import LayerGraph
from . import Candidate, Option

ID = "norm-act-change"
SUMMARY = "the normalization or activation family changes (BatchNorm -> LayerNorm, ReLU -> GELU)"
OPTIONS = {
    "norms": Option(bool, True, "report normalization changes"),
    "acts": Option(bool, True, "report activation changes"),
    "snap": Option(bool, True, "move the point to the trunk node before the change"),
}


def detect(graph: LayerGraph, options: Mapping[str, Any]) -> tuple[Candidate, ...]:
    carried: dict[str, tuple[str, str]] = {}
    found: dict[str, Candidate] = {}
    for info in graph:
        preds = graph.predecessors(info.name)
        main = max(preds, key=lambda p: (p.depth, p.order), default=None)
        norm, act = carried[main.name] if main is not None else ("", "")
        changes = []
        if info.norm:
            if options["norms"] and norm and info.norm != norm:
                changes.append(f"normalization changes from {norm} to {info.norm}")
            norm = info.norm
        if info.act:
            if options["acts"] and act and info.act != act:
                changes.append(f"activation changes from {act} to {info.act}")
            act = info.act
        carried[info.name] = (norm, act)
        if changes:
            node = graph.trunk_before(info.name) if options["snap"] else info.name
            if node != graph.input:
                found.setdefault(node, Candidate(node, ID, f"{'; '.join(changes)} at {info.name}"))
    return tuple(found.values())
