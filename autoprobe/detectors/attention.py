"""attention: before or after an attention operation.

Attention ops are recognised by what they compute, not by model: a
``scaled_dot_product_attention`` call, an ``nn.MultiheadAttention`` or a leaf
module whose class says Attention, or a softmax whose result is multiplied
with another tensor (softmax over tokens, then ``attn @ v``). The point snaps
to the trunk (``LayerGraph.trunk``): after the attention = the residual merge that adds its output
back, before = the feature entering the attention block.

Passing example (fires)::

    q, k, v = qkv(x).chunk(3, -1); x = x + proj(softmax(q @ k.T) @ v)

Failing example (a softmax read-out is not attention)::

    logits = fc(x); probs = softmax(logits)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..graph import LayerGraph, LayerInfo
from . import Candidate, Option

ID = "attention"
SUMMARY = "before or after attention (sdpa, MultiheadAttention, softmax(q k) v)"
OPTIONS = {
    "position": Option(str, "after", "where the point goes relative to the attention", ("before", "after", "both")),
}


def _is_attention(graph: LayerGraph, info: LayerInfo) -> bool:
    if info.kind == "attention":
        return True
    return info.kind == "softmax" and any(s.kind == "matmul" for s in graph.successors(info.name))


def detect(graph: LayerGraph, options: Mapping[str, Any]) -> tuple[Candidate, ...]:
    found: dict[str, Candidate] = {}
    for info in graph:
        if not _is_attention(graph, info):
            continue
        what = f"{info.name} ({info.module_type if info.op == 'call_module' else info.target})"
        if options["position"] in ("before", "both"):
            node = graph.trunk_before(info.name)
            if node != graph.input:
                found.setdefault(node, Candidate(node, ID, f"before attention {what}"))
        if options["position"] in ("after", "both"):
            node = graph.trunk_after(info.name)
            if node != graph.output:
                found.setdefault(node, Candidate(node, ID, f"after attention {what}"))
    return tuple(found.values())
