"""Stage 2: the layer graph, a networkx DiGraph of frozen ``LayerInfo`` records.

One graph node per fx node that carries data from the model's input to its
output: parameters, constants and dead branches (``torch._assert``) are left
out, so every edge is a tensor flowing through the network. Node keys are the
module-qualified names from ``trace`` (``layer1.0.act3``).

Depth counts weight layers (conv, linear, attention projections, any module
owning a matrix-shaped parameter) on the longest path from the input to a
node, the node itself included; ``D`` is the depth of the output. A leaf block
fx keeps whole counts every weight layer inside it.

Layouts are derived from the operations, never guessed from sizes: each rung records a label per
axis (batch, channels, spatial, unknown) on every node as it records its shape, in the same walk
(``labelling.py``, with the rules of ``axes.py``), from the input's channels-first layout (conv, pooling and batch/group norm
make channels-first maps, linear and a LayerNorm over the last dim put the channels last,
permute/transpose/flatten/reshape move them, cat and elementwise ops keep them). A node whose
labels spell no ``Layout`` (attention scores ``q @ k^T``, a reshape that merges the channels
with a spatial axis) has ``layout=None`` and no channels: it is not a feature an adapter can read,
and selection never chooses it. A layout never depends on the input size.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import networkx as nx
from torch import fx, nn

from .axes import Labels, layout_of
from .errors import TraceError
from .labelling import AXES_META
from .layout import Layout
from .ops import lookup, module_kind, owns_matrix
from .trace import Backend, Mode, Traced, first_tensor_meta

__all__ = ["LayerInfo", "LayerGraph", "build_layer_graph"]

_WEIGHT_FUNCTIONS = frozenset({"conv", "linear"})


@dataclass(frozen=True)
class LayerInfo:
    """What autoprobe knows about one node of the layer graph.

    Attributes:
        name: module-qualified node name, unique in the graph (``layer1.0.act3``).
        fx_name: the fx node's own name (``layer1_0_act3``), for rewriting.
        op: fx op (``placeholder``, ``call_module``, ``call_function``, ``call_method``, ``output``).
        target: the called module path, function or method name.
        module_path: the module this node belongs to (``layer1.0``); ``""`` for the top level.
        module_type: class name of the called module (call_module) or of the owning module.
        kind: coarse op kind: input, output, conv, linear, weight, norm, act, gate, pool, attention,
            softmax, add, mul, cat, matmul, resize, reshape, identity (dropout, drop-path), other.
        norm: normalization family applied here (batch, layer, group, instance, rms) or ``""``.
        act: activation family applied here (relu, gelu, silu, ...) or ``""``.
        weight: whether this node is a weight layer (counts towards depth).
        shape: output shape, batch included, or ``None`` for non-tensor outputs.
        layout: the ``Layout`` derived from the ops (``NCHW``, ``NLC``, ...), or ``None`` when the ops do
            not decide it (then the node has no channels and is never a point).
        channels: feature width, or ``None``.
        spatial: spatial extent (``(H, W)``), ``(N,)`` for tokens, or ``None``.
        depth: weight layers on the longest path from the input to here, this node included
            (all of them for a leaf block).
        order: position in topological (execution) order.
        call: ``(module path, call index)`` when the node is the output of a module call (the
            index counts that module's calls from 0 in execution order), else ``None``; a forward
            hook on that module taps exactly this node.
    """

    name: str
    fx_name: str
    op: str
    target: str
    module_path: str
    module_type: str
    kind: str
    norm: str
    act: str
    weight: bool
    shape: tuple[int, ...] | None
    layout: Layout | None
    channels: int | None
    spatial: tuple[int, ...] | None
    depth: int
    order: int
    call: tuple[str, int] | None = None

    @property
    def positions(self) -> int | None:
        """Spatial positions or tokens: ``H * W`` for a map, ``N`` for tokens."""
        return None if self.spatial is None else math.prod(self.spatial)



@dataclass(frozen=True)
class LayerGraph:
    """A model's data-flow graph with typed per-node info.

    Attributes:
        nx_graph: ``networkx.DiGraph`` keyed by node name; attribute ``info`` holds the ``LayerInfo``.
        input: name of the input node.
        output: name of the output node.
        input_shape: the traced input shape, batch included.
        mode: ``train`` or ``eval``.
        backend: the tracing backend: ``fx``, ``export`` or ``hooks`` (see ``backends.py``).
    """

    nx_graph: nx.DiGraph
    input: str
    output: str
    input_shape: tuple[int, ...]
    mode: Mode
    backend: Backend

    def __getitem__(self, name: str) -> LayerInfo:
        return self.nx_graph.nodes[name]["info"]

    def __contains__(self, name: object) -> bool:
        return name in self.nx_graph

    def __len__(self) -> int:
        return self.nx_graph.number_of_nodes()

    def __iter__(self) -> Iterator[LayerInfo]:
        """Nodes in topological (execution) order."""
        return iter(self.ordered)

    @cached_property
    def ordered(self) -> tuple[LayerInfo, ...]:
        return tuple(sorted((d["info"] for _, d in self.nx_graph.nodes(data=True)), key=operator.attrgetter("order")))

    @property
    def depth(self) -> int:
        """D: weight layers on the longest input-to-output path."""
        return self[self.output].depth

    def predecessors(self, name: str) -> list[LayerInfo]:
        return sorted((self[p] for p in self.nx_graph.predecessors(name)), key=operator.attrgetter("order"))

    def successors(self, name: str) -> list[LayerInfo]:
        return sorted((self[s] for s in self.nx_graph.successors(name)), key=operator.attrgetter("order"))

    @cached_property
    def dominators(self) -> dict[str, str]:
        """Immediate dominator of every node, from the input."""
        return nx.immediate_dominators(self.nx_graph, self.input)

    @cached_property
    def post_dominators(self) -> dict[str, str]:
        """Immediate post-dominator of every node, towards the output."""
        return nx.immediate_dominators(self.nx_graph.reverse(copy=False), self.output)

    @cached_property
    def spine(self) -> tuple[str, ...]:
        """Nodes every input-to-output path passes through, in order.

        In a residual network these are the block outputs; in a plain chain, every node.
        """
        chain = [self.output]
        idom = self.dominators
        while chain[-1] != self.input:
            chain.append(idom[chain[-1]])
        return tuple(reversed(chain))

    @cached_property
    def pivot(self) -> str:
        """The lowest-resolution feature: fewest positions above one, the latest such node in execution order.

        In a classifier it ends the last stage (on the spine); in an encoder-decoder it is the encoder's
        bottom, which the decoder reads and the spine bypasses through the skips.
        """
        maps = [i for i in self.ordered if i.channels is not None and i.positions is not None and i.positions > 1]
        if not maps:
            return self.output
        return min(maps, key=lambda i: (i.positions, -i.order)).name

    @cached_property
    def trunk(self) -> tuple[str, ...]:
        """The spine through the pivot: the nodes every path from the input to the pivot, or from it to the output,
        passes through, in order.

        Every spine node lies on it (in a DAG a node every path crosses is before the pivot on all of them or after
        it on all). In an encoder-decoder whose stages each feed the decoder (U-Net skips, FPN laterals, a low-level
        branch beside the ASPP) the spine holds only the first stage; the trunk adds every encoder stage (the
        dominators of the encoder's bottom) and the decoder's chain (its post-dominators). It is the spine itself
        unless the first spine node after the pivot is at a higher resolution than the pivot (the decoder came back
        up): so a classifier, whose lowest resolution rejoins the spine as low, keeps its spine.
        """
        down, up = [self.pivot], [self.pivot]
        idom, ipdom = self.dominators, self.post_dominators
        spine = set(self.spine)
        rejoin = self.pivot
        while rejoin != self.output and (rejoin not in spine or rejoin != self.pivot and self[rejoin].positions is None):
            rejoin = ipdom[rejoin]  # the first spine node after the pivot that is a map (FPN's stack is none)
        if rejoin == self.pivot or (self[rejoin].positions or 0) <= self[self.pivot].positions:
            return self.spine  # no round trip: the pivot is on the spine or inside a block that rejoins it as low
        while down[-1] != self.input:
            down.append(idom[down[-1]])
        while up[-1] != self.output:
            up.append(ipdom[up[-1]])
        return tuple(reversed(down)) + tuple(up[1:])

    @cached_property
    def native_positions(self) -> dict[str, int | None]:
        """The positions each node's content was computed at, propagated along the graph in execution order.

        A node's own positions, except after an op that enlarged its input (an interpolation, a padding, an adaptive
        pool to a larger grid, a transposed conv): there it keeps the positions the content had before, until an op
        reduces it below them. So taking a pooled pyramid level (UperNet's 4x4 pooled to 6x6) or a window-padded map
        (sam2's 8x8 padded to 14x14) back to its size is no reduction. A merge keeps its finest input's value (the
        lateral of an FPN level, the high-resolution branch of an HRNet fuse); a node without positions carries its
        inputs' value; ``None`` before the first spatial feature.

        Example:
            >>> import torch
            >>> from autoprobe.trace import trace_fx
            >>> class PoolUp(torch.nn.Module):
            ...     def forward(self, x):
            ...         y = torch.nn.functional.adaptive_avg_pool2d(x, 6)
            ...         return torch.nn.functional.interpolate(y, size=(4, 4))
            >>> g = build_layer_graph(trace_fx(PoolUp(), (3, 4, 4)))
            >>> [(i.positions, g.native_positions[i.name]) for i in g]
            [(16, 16), (36, 16), (16, 16), (16, 16)]
        """
        native: dict[str, int | None] = {}
        for info in self.ordered:
            carried = [native[p] for p in self.nx_graph.predecessors(info.name) if native[p] is not None]
            inherited = max(carried) if carried else None
            own = info.positions if info.channels is not None else None
            native[info.name] = own if inherited is None else inherited if own is None else min(own, inherited)
        return native

    def trunk_before(self, name: str) -> str:
        """The nearest trunk node that dominates ``name`` (``name`` itself if it is on the trunk)."""
        trunk, idom = set(self.trunk), self.dominators
        while name not in trunk:
            name = idom[name]
        return name

    def trunk_after(self, name: str) -> str:
        """The nearest trunk node that post-dominates ``name`` (``name`` itself if it is on the trunk)."""
        trunk, ipdom = set(self.trunk), self.post_dominators
        while name not in trunk:
            name = ipdom[name]
        return name


    def token_grid(self, name: str, rank: int) -> tuple[tuple[int, ...], int] | None:
        """The grid of ``rank`` spatial axes the tokens of feature ``name`` form, and its prefix-token count, or ``None``.

        The grid is the earliest map (a tensor with ``rank`` spatial axes) among ``name``'s ancestors whose positions,
        plus prefix tokens (cls, registers) concatenated between it and ``name``, make the token count: the patch
        embedding the tokens were flattened from. Maps an op other than a reshape computed come first, so a view of
        the tokens themselves (``t.transpose(1, 2).unsqueeze(2)``, a 1x16 "map" of a 2x8 patch grid) is no grid. A
        map of fewer positions (SegFormer's spatial-reduction conv beside its attention) is not one either.

        Example:
            >>> import torch
            >>> from autoprobe.trace import trace_fx
            >>> class Tokens(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.embed, self.proj = torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Linear(8, 8)
            ...     def forward(self, x):
            ...         return self.proj(self.embed(x).flatten(2).transpose(1, 2))
            >>> build_layer_graph(trace_fx(Tokens(), (3, 8, 32))).token_grid("proj", 2)
            ((2, 8), 0)
        """
        info = self[name]
        if info.spatial is None or len(info.spatial) != 1:
            return None
        tokens = info.spatial[0]
        ancestors = nx.ancestors(self.nx_graph, name)
        maps = sorted(
            (self[a] for a in ancestors
             if self[a].layout is not None and self[a].spatial is not None and len(self[a].spatial) == rank
             and self[a].positions is not None and 0 < self[a].positions <= tokens),
            key=lambda m: (m.kind == "reshape", m.order),
        )
        for grid in maps:
            prefix = tokens - grid.positions
            if prefix == 0:
                return tuple(grid.spatial), 0
            between = nx.descendants(self.nx_graph, grid.name) & ancestors
            if any(self[b].kind == "cat" for b in between):
                return tuple(grid.spatial), prefix
        return None


def _callable_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.rsplit(".", 1)[-1]


def _module_kind(module: nn.Module) -> tuple[str, str, str]:
    """(kind, norm family, act family) of a called module (``ops.module_kind``)."""
    known = module_kind(module)
    if known.kind == "norm":
        return "norm", known.family, known.act
    return known.kind, "", known.family if known.kind == "act" else ""


def _weight_layers(module: nn.Module) -> int:
    """Weight layers a module call adds to the depth: 1 for a conv or linear, all inside a leaf block.

    fx keeps a leaf block (a timm notrace module such as ``NormFreeBlock``, or
    ``nn.MultiheadAttention``) as one node, but its convs and projections are layers of the
    network all the same; counting the block as 1 made such models look several times
    shallower than their traced siblings. Counting every matrix-owning module inside is an
    upper bound when the block has parallel branches (a shortcut conv).
    """
    return max(1, sum(1 for m in module.modules() if owns_matrix(m)))


def _features(layout: Layout | None, shape: tuple[int, ...]) -> tuple[int | None, tuple[int, ...] | None]:
    if layout is None:
        return None, None
    if layout is Layout.NC:
        return layout.channels(shape), None
    return layout.channels(shape), layout.spatial(shape)


def build_layer_graph(traced: Traced) -> LayerGraph:
    """Turn a traced model into a ``LayerGraph``.

    Args:
        traced: the result of ``trace.trace_fx`` (or of any backend).

    Returns:
        The layer graph; every node reachable from the input that reaches the output.

    Example:
        >>> import torch
        >>> from autoprobe.trace import trace_fx
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> g = build_layer_graph(trace_fx(net, (3, 16, 16)))
        >>> g.depth, [n.name for n in g if n.weight]
        (2, ['0', '2'])
    """
    gm = traced.graph_module
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if not placeholders or not outputs:
        raise TraceError("the traced graph has no input or no output. Hint: the model's forward must take a tensor.")
    source = next((n for n in placeholders if n.name == traced.input_node), placeholders[0])
    sink = outputs[0]

    # Only tensors are data: `x.shape[-2:]` feeding a final resize would otherwise be a path around
    # the whole network and leave the output with no dominators but the input.
    carries = {n.name for n in nodes if n.op == "output" or first_tensor_meta(n.meta.get("tensor_meta")) is not None}
    full = nx.DiGraph()
    full.add_nodes_from(carries)
    full.add_edges_from(
        (arg.name, n.name) for n in nodes if n.name in carries for arg in n.all_input_nodes if arg.name in carries
    )
    keep = (nx.descendants(full, source.name) | {source.name}) & (nx.ancestors(full, sink.name) | {sink.name})
    if sink.name not in keep:
        raise TraceError("the model's output does not depend on its input. Hint: check the model's forward.")
    if AXES_META not in source.meta:
        raise RuntimeError(f"the {traced.backend} rung left the input node {source.name!r} without axis labels "
                           "(an internal error: every rung labels its nodes as it records their shapes).")
    modules = dict(gm.named_modules())

    graph = nx.DiGraph()
    infos: dict[str, LayerInfo] = {}
    for order, node in enumerate(n for n in nodes if n.name in keep):
        data_inputs = [infos[a.name] for a in node.all_input_nodes if a.name in infos]
        info = _layer_info(
            node, order, traced.qualnames, modules, traced.module_types, data_inputs, len(node.all_input_nodes),
            traced.input_shape[0], node.meta.get(AXES_META), traced.module_calls.get(node.name),
        )
        infos[node.name] = info
        graph.add_node(info.name, info=info)
        graph.add_edges_from((p.name, info.name) for p in data_inputs)
    return LayerGraph(
        nx_graph=graph,
        input=infos[source.name].name,
        output=infos[sink.name].name,
        input_shape=traced.input_shape,
        mode=traced.mode,
        backend=traced.backend,
    )


def _layer_info(
    node: fx.Node,
    order: int,
    qualnames: dict[str, str],
    modules: dict[str, nn.Module],
    module_types: dict[str, str],
    data_inputs: list[LayerInfo],
    n_inputs: int,
    batch: int,
    labels: Labels,
    call: tuple[str, int] | None,
) -> LayerInfo:
    qualname = qualnames.get(node.name, node.name)
    norm = act = ""
    if node.op == "placeholder":
        kind, target, module_type, module_path = "input", node.name, "", ""
    elif node.op == "output":
        kind, target, module_type, module_path = "output", "output", "", ""
    elif node.op == "call_module":
        module = modules[str(node.target)]
        kind, norm, act = _module_kind(module)
        target, module_type, module_path = str(node.target), type(module).__name__, str(node.target)
    else:
        target = _callable_name(node.target)
        entry = lookup(node.target)
        kind = entry.kind if entry is not None and entry.kind else "reshape" if node.op == "call_method" else "other"
        if kind == "norm":
            norm = entry.family
        elif kind == "act":
            act = entry.family
        module_path = qualname.rsplit(".", 1)[0] if "." in qualname else ""
        # The graph module holds only called submodules (the rest are bare containers): ask the model's own tree.
        owner = modules.get(module_path)
        module_type = module_types.get(module_path) or (type(owner).__name__ if owner is not None else "")
    if kind == "matmul" and len(data_inputs) == 1 and n_inputs > 1:
        kind = "linear"  # x @ W with W a parameter: a weight layer written as a function
    weight = (node.op == "call_module" and kind in ("conv", "linear", "weight")) or (
        node.op != "call_module" and kind in _WEIGHT_FUNCTIONS and n_inputs > len(data_inputs)
    )
    if node.op == "call_module" and kind == "attention":
        weight = owns_matrix(modules[str(node.target)], recurse=True)
    layers = _weight_layers(modules[str(node.target)]) if weight and node.op == "call_module" else int(weight)

    meta = first_tensor_meta(node.meta.get("tensor_meta"))
    shape = tuple(int(s) for s in meta.shape) if meta is not None else None
    main_labels = labels[0] if isinstance(labels, tuple) else labels
    layout = layout_of(main_labels, shape)
    # Window attention folds positions into the batch (Swin): such tensors are not per-example features.
    per_example = shape is not None and len(shape) >= 2 and shape[0] == batch
    channels, spatial = _features(layout, shape) if per_example else (None, None)
    depth = max((p.depth for p in data_inputs), default=0) + layers
    return LayerInfo(
        name=qualname,
        fx_name=node.name,
        op=node.op,
        target=target,
        module_path=module_path,
        module_type=module_type,
        kind=kind,
        norm=norm,
        act=act,
        weight=weight,
        shape=shape,
        layout=layout,
        channels=channels,
        spatial=spatial,
        depth=depth,
        order=order,
        call=call,
    )
