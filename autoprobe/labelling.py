"""Each traced node's axis labels, from its inputs' labels and the shapes on ``node.meta``.

Stage 1 records two facts on every node of a traced graph: its ``tensor_meta`` (shape, dtype) and its
axis labels (``axes.py``: ``NCHW``, ``NLC``, ...) under ``node.meta["axes"]``. Both are recorded in
one walk in execution order: the fx rung's ``trace.propagate_shapes`` labels each node right after
it has run it on meta tensors, and the export rung's converter labels each node as it copies it with
export's shapes; the hooks rung labels its records while the model runs. ``graph.build_layer_graph``
only reads the labels.

The override map, after ``torch.fx.Interpreter`` (one method per op kind; each takes the node):

- ``placeholder``: the model's input is channels-first (``axes.input_axes``); other inputs are unknown;
- ``get_attr``: a parameter or constant carries no labels (it is not data);
- ``call_module``: the module's registry entry (``axes.module_axes``); a leaf block with no rule that
  does not decide its labels is run on meta twins of its weights (``axes.run_labels``);
- ``call_function`` / ``call_method``: the op's rule (``axes.propagate``); a plain Python function fx
  kept whole (timm's ``deblockify``) that no rule decides is run on meta tensors the same way;
- ``output``: the returned node's labels.

Only tensors computed from the input are data: an op none of whose inputs has labels (a parameter's
transpose) keeps what its rule said, and a data tensor whose labels no rule decided is all ``?``.

Example:
    >>> import torch
    >>> from torch import fx
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> class Scores(torch.nn.Module):
    ...     def forward(self, x):
    ...         t = x.flatten(2).transpose(1, 2)  # a map's tokens, channels last
    ...         return t @ t.transpose(1, 2)      # a product of two activations
    >>> gm = fx.symbolic_trace(Scores())
    >>> _ = ShapeProp(gm).propagate(torch.empty(2, 3, 4, 4))
    >>> labeller = Labeller(dict(gm.named_modules()), input_node="x")
    >>> {n.name: labeller.label(n) for n in gm.graph.nodes}  # the scores have no channel axis: no layout
    {'x': 'NCSS', 'flatten': 'NCS', 'transpose': 'NSC', 'transpose_1': 'NCS', 'matmul': 'N??', 'output': 'N??'}
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .axes import Axis, AxisEnv, Labels, input_axes, module_axes, propagate, run_labels
from .meta import meta_twins
from .ops import op_name
from .sizes import TRACE_BATCH

__all__ = ["AXES_META", "Labeller"]

AXES_META = "axes"
"""The ``node.meta`` key of a node's axis labels (beside fx's ``tensor_meta``)."""


class Labeller:
    """Labels the nodes of one traced graph, each once its inputs are labelled (execution order).

    Args:
        modules: the graph module's submodules by path (``dict(gm.named_modules())``), for ``call_module`` nodes.
        input_node: the name of the placeholder that is the model's input.
        batch: the traced batch size (an ``M`` axis split with it in front is the batch and spatial axes again).
    """

    def __init__(self, modules: Mapping[str, nn.Module], input_node: str, batch: int = TRACE_BATCH) -> None:
        self.modules = modules
        self.input_node = input_node
        self.batch = batch

    def label(self, node: fx.Node) -> Labels:
        """``node``'s labels, also recorded on ``node.meta["axes"]``.

        Args:
            node: a node whose inputs are labelled and which carries its ``tensor_meta`` (if it has a tensor).

        Returns:
            Its labels: a string of ``Axis`` letters, a tuple of those for a tuple output, or ``None``.
        """
        found = getattr(self, node.op)(node)
        node.meta[AXES_META] = found
        return found

    # -- one method per op kind ----------------------------------------------------------------------------------

    def placeholder(self, node: fx.Node) -> Labels:
        out = _out_shapes(node.meta.get("tensor_meta"))
        if node.name == self.input_node and isinstance(out, tuple) and all(isinstance(s, int) for s in out):
            return input_axes(len(out))
        return None

    def get_attr(self, node: fx.Node) -> Labels:
        return None

    def output(self, node: fx.Node) -> Labels:
        return _labels_of(node.args[0])

    def call_module(self, node: fx.Node) -> Labels:
        module = self.modules[str(node.target)]
        out = _out_shapes(node.meta.get("tensor_meta"))
        found = module_axes(module, node.args, node.kwargs, AxisEnv(_labels_of, _shape_of, out, self.batch))
        if not type(module).__module__.startswith("torch.") and not _decided(found):
            found = _run_opaque(node, self.batch, module) or found  # a leaf block fx kept whole
        return _data(node, found, out)

    def call_function(self, node: fx.Node) -> Labels:
        out = _out_shapes(node.meta.get("tensor_meta"))
        env = AxisEnv(_labels_of, _shape_of, out, self.batch)
        found = propagate(op_name(node.target), node.args, node.kwargs, env, node=node.name)
        if _opaque(node) and not _decided(found):
            found = _run_opaque(node, self.batch) or found
        return _data(node, found, out)

    call_method = call_function


def _data(node: fx.Node, found: Labels, out: Any) -> Labels:
    """``found``, as labels that fit the output ``out`` when the node computes from the input: only tensors computed
    from the input are data (a parameter's transpose or expand keeps what its rule said)."""
    fed = any(_labels_of(a) is not None for a in node.all_input_nodes)
    return _known_rank(found, out) if fed else found


def _labels_of(value: Any) -> Labels:
    return value.meta.get(AXES_META) if isinstance(value, fx.Node) else None


def _shape_of(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, fx.Node):
        meta = value.meta.get("tensor_meta")
        return tuple(int(s) for s in meta.shape) if isinstance(meta, TensorMetadata) else None
    return None


def _out_shapes(meta: Any) -> Any:
    """The shape of a node's output (a tuple of ints), a tuple of those for a tuple output, or ``None``."""
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (list, tuple)):
        return tuple(_out_shapes(m) for m in meta)
    return None


def _opaque(node: fx.Node) -> bool:
    """A call of a plain Python function fx kept whole (timm's autowrapped ``deblockify``), not a torch op."""
    target = node.target
    return node.op == "call_function" and inspect.isfunction(target) and not (
        getattr(target, "__module__", "") or "").startswith("torch")


def _decided(labels: Labels) -> bool:
    if isinstance(labels, tuple):
        return all(_decided(part) for part in labels)
    return isinstance(labels, str) and Axis.UNKNOWN not in labels


def _run_opaque(node: fx.Node, batch: int, module: nn.Module | None = None) -> Labels:
    """The labels of an opaque function's or leaf block's output, from the torch ops inside it, run on meta tensors
    of its inputs' shapes (``axes.run_labels``; a block's weights are meta twins, through ``functional_call``, so
    the model's own are never touched); ``None`` when an argument is a value only known at run time."""
    known: dict[int, str] = {}
    unknown = False

    def materialize(arg: fx.Node) -> Any:
        nonlocal unknown
        meta = arg.meta.get("tensor_meta")
        if not isinstance(meta, TensorMetadata):
            unknown = True
            return None
        tensor = torch.empty(tuple(meta.shape), dtype=meta.dtype, device="meta")
        lab = _labels_of(arg)
        if isinstance(lab, str):
            known[id(tensor)] = lab
        return tensor

    args = fx.node.map_arg(node.args, materialize)
    kwargs = fx.node.map_arg(node.kwargs, materialize)
    if unknown:
        return None
    if module is None:
        fn: Any = node.target
    else:
        twins = meta_twins(module, remove_duplicate=True)

        def fn(*args: Any, **kwargs: Any) -> Any:  # the leaf's own ops, on meta twins of its weights
            return torch.func.functional_call(module, twins, args, kwargs)
    try:
        return run_labels(fn, tuple(args), dict(kwargs), known, batch)
    except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError):
        return None  # it does not run on meta tensors (reads values): its axes stay unknown, and notes say so


def _known_rank(labels: Labels, out: Any) -> Labels:
    """Labels that fit the output: a tensor whose labels no rule decided is all ``?`` (data, but no known axes)."""
    if isinstance(out, tuple) and all(isinstance(s, int) for s in out):
        return labels if isinstance(labels, str) and len(labels) == len(out) else Axis.UNKNOWN * len(out)
    if isinstance(out, tuple):
        parts = labels if isinstance(labels, tuple) and len(labels) == len(out) else (None,) * len(out)
        return tuple(_known_rank(p, o) for p, o in zip(parts, out))
    return None
