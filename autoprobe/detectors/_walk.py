"""Graph walks shared by several detectors."""

from __future__ import annotations

from collections.abc import Iterator

from ..graph import LayerGraph, LayerInfo

# Kinds whose output is a feature map or token sequence a person would tap;
# reshapes and attention internals carry tensors whose inferred layout is unreliable.
FEATURE_KINDS = frozenset(
    {"input", "conv", "linear", "weight", "norm", "act", "pool", "add", "cat", "mul", "resize", "other"}
)


def is_feature(info: LayerInfo) -> bool:
    """A node with a channels value and an op kind that produces features."""
    return info.channels is not None and info.kind in FEATURE_KINDS


def has_spatial(info: LayerInfo) -> bool:
    """A feature node with a spatial extent (a map or a token sequence)."""
    return is_feature(info) and info.spatial is not None


def nearest(graph: LayerGraph, name: str, upstream: bool, accept: callable) -> Iterator[LayerInfo]:
    """The first nodes on each path from ``name`` (exclusive) that ``accept`` takes.

    Walks predecessors (``upstream``) or successors through every node ``accept`` rejects.
    """
    step = graph.nx_graph.predecessors if upstream else graph.nx_graph.successors
    seen: set[str] = {name}
    stack = sorted(step(name), key=lambda n: graph[n].order)
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        info = graph[current]
        if accept(info):
            yield info
        else:
            stack.extend(sorted(step(current), key=lambda n: graph[n].order))


def merges(graph: LayerGraph) -> Iterator[tuple[LayerInfo, list[LayerInfo]]]:
    """Add and concat nodes joining two or more data inputs, with those inputs."""
    for info in graph:
        if info.kind in ("add", "cat"):
            inputs = graph.predecessors(info.name)
            if len(inputs) >= 2:
                yield info, inputs


def merge_feature(graph: LayerGraph, merge: LayerInfo) -> str | None:
    """The feature a merge makes: the merge itself, or, when its output has no layout (``torch.stack`` puts the
    branches on a new leading axis), the first node with one that every path from it passes through (the
    ``sum`` that folds the stacked branches); ``None`` when none comes before the output."""
    name, ipdom = merge.name, graph.post_dominators
    while name != graph.output and graph[name].channels is None:
        name = ipdom[name]
    return name if name != graph.output else None
