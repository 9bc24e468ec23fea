"""The tracing fallback ladder: fx first, then ``torch.export``, then forward hooks.

torch.fx records Python symbolically, so any forward that branches on a
tensor (``if x.ndim == 4``, ``if x.sum() > 0``) or hands a Proxy to code that
needs a real value stops it. Users bring such models, and a tool that only
works where fx works would quietly exclude them. So ``analyze`` climbs a ladder,
in this order, and the first rung that yields a layer graph wins:

1. ``fx``: ``trace.trace_model`` with timm's leaf modules and autowrap
   functions (the richest, cheapest graph, with module calls as nodes).
2. ``export``: ``torch.export.export(model, (input,), strict=False)`` on the
   model's own device (meta for models built from a spec). Export runs the
   Python for real on fake tensors, so shape-dependent branches are fine. The
   exported ATen graph is converted to an fx graph ``build_layer_graph`` reads
   unchanged: parameters become ``get_attr`` nodes, node names are qualified
   by the module path read from ``node.meta["nn_module_stack"]`` (``layer1.0.conv1``
   for a torch.nn leaf's output, ``layer1.0.add`` for a function), and each
   ATen op is called through a thin wrapper named like the functional graph.py
   already knows (``aten.convolution`` -> ``conv2d``, ``aten.addmm`` -> ``linear``).
3. ``hooks``: forward hooks on every leaf module, run once, with a
   ``TorchFunctionMode`` that tracks which module outputs each tensor was
   computed from. It yields a coarse graph of module calls in execution order
   with their shapes. On a meta model it computes nothing; on a live model
   it is the only rung that computes for real (one batch, ``no_grad``, buffers
   cloned so BatchNorm statistics are untouched), which is what lets it get
   past a branch on tensor *values*, where fx and export both stop.

A fallback is never silent: ``LadderResult.failed`` keeps every rung that
failed with its reason, ``LadderResult.notes`` says it in words, and the
backend used is recorded on the ``Traced``, the ``LayerGraph`` and the
``Selection``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.overrides import TorchFunctionMode

from .errors import AutoprobeError, InputSizeError, TraceError
from .graph import _FUNCTION_KINDS, LayerGraph, build_layer_graph
from .trace import Traced, _concrete_args, _training_mode, default_leaf_modules, trace_model

__all__ = [
    "LADDER",
    "Attempt",
    "LadderResult",
    "trace_with_fallbacks",
    "trace_export",
    "trace_hooks",
    "ATEN_KIND_NAMES",
]

LADDER: tuple[str, ...] = ("fx", "export", "hooks")
"""Backends in the order they are tried."""


@dataclass(frozen=True)
class Attempt:
    """A rung of the ladder that failed.

    Attributes:
        backend: ``fx``, ``export`` or ``hooks``.
        error: the exception's class name.
        reason: its message, first line only (the full one is chained on the final error).
    """

    backend: str
    error: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.error}: {self.reason}"


@dataclass(frozen=True)
class LadderResult:
    """The first rung that produced a layer graph, and every rung that failed before it.

    Attributes:
        traced: the traced model; ``traced.backend`` names the rung.
        graph: its layer graph.
        failed: the rungs tried before, in order, with their reasons.
    """

    traced: Traced
    graph: LayerGraph
    failed: tuple[Attempt, ...]

    @property
    def backend(self) -> str:
        return self.traced.backend

    @property
    def notes(self) -> tuple[str, ...]:
        """One plain sentence per fallback taken, for ``Selection.notes``."""
        notes = [f"backend {a.backend} failed ({a.error}: {_clip(a.reason, 240)})" for a in self.failed]
        if self.failed:
            notes.append(f"fell back to backend {self.backend}")
        if self.backend == "hooks":
            notes.append(
                "hooks backend: a coarse graph of leaf-module calls; functional ops between modules "
                "(residual adds, reshapes) are not nodes"
            )
        return tuple(notes)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def trace_with_fallbacks(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    train: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    leaf_paths: Sequence[str] = (),
    batch_size: int = 2,
    backends: Sequence[str] = LADDER,
) -> LadderResult:
    """Trace ``model`` with the first backend of ``backends`` that works, and build its layer graph.

    A rung fails when tracing raises or when its graph cannot be built (no path from input to
    output). Only ``AutoprobeError``s from fx fall through to the next rung: any other exception
    from fx is a bug in autoprobe and propagates. export and hooks run the model's own Python,
    so anything they raise is a reason to try the next rung.

    Args:
        model: any ``nn.Module``, on meta or live; not mutated.
        input_size: the input without batch, e.g. ``(3, 224, 224)``.
        train: trace the training-mode graph.
        leaf_modules: extra module classes to keep as single nodes (fx and hooks; export names by them).
        leaf_paths: extra module paths to keep as single nodes.
        batch_size: batch used for shapes.
        backends: the rungs to try, in order; a subsequence of ``LADDER``.

    Returns:
        A ``LadderResult`` with the traced model, its graph and the failed rungs.

    Raises:
        InputSizeError: the model's own code rejected the input size; no other rung is tried.
        TraceError: every rung failed; the message lists each rung's reason.

    Example:
        >>> import torch
        >>> class Branchy(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv = torch.nn.Conv2d(3, 8, 3)
        ...     def forward(self, x):
        ...         if x.ndim == 3:  # fx cannot decide this on a Proxy
        ...             x = x[None]
        ...         return self.conv(x)
        >>> result = trace_with_fallbacks(Branchy(), (3, 16, 16))
        >>> result.backend, [a.backend for a in result.failed], result.graph.depth
        ('export', ['fx'], 1)
    """
    unknown = [b for b in backends if b not in LADDER]
    if unknown or not backends:
        raise TraceError(f"unknown tracing backends {unknown or list(backends)!r}. Hint: choose from {list(LADDER)}.")
    failed: list[Attempt] = []
    errors: list[BaseException] = []
    for backend in backends:
        try:
            traced = _TRACERS[backend](
                model, input_size, train=train, leaf_modules=leaf_modules, leaf_paths=leaf_paths, batch_size=batch_size
            )
            graph = build_layer_graph(traced)
        except InputSizeError:
            # fx traced the model and its own code rejected the size while shapes were
            # propagated; export and hooks would run that same code and fail the same way.
            raise
        except AutoprobeError as exc:
            failed.append(Attempt(backend, type(exc).__name__, _first_line(exc)))
            errors.append(exc)
            continue
        return LadderResult(traced, graph, tuple(failed))
    listing = "\n".join(f"  - {a}" for a in failed)
    first = errors[0]
    raise TraceError(
        f"no tracing backend could trace {type(model).__name__}:\n{listing}\n"
        "Hint: mark the failing submodule as a leaf (`--leaf PATH`), or give the model a forward that takes one tensor."
    ) from first


def _device_of(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _is_leaf(module: nn.Module, path: str, leaf_types: tuple[type[nn.Module], ...], leaf_paths: frozenset[str]) -> bool:
    """fx's own leaf rule (torch.nn built-ins) plus timm's and the user's leaves, so names match fx's."""
    if path in leaf_paths or isinstance(module, leaf_types):
        return True
    home = type(module).__module__
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return (home.startswith("torch.nn") or home.startswith("torch.ao.nn")) and not isinstance(module, containers)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

ATEN_KIND_NAMES: dict[str, str] = {
    # ATen overload-packet name -> the functional name graph.py's kind table already maps.
    "convolution": "conv2d",
    "_convolution": "conv2d",
    "conv_transpose2d": "conv_transpose2d",
    "addmm": "linear",
    "native_layer_norm": "layer_norm",
    "native_group_norm": "group_norm",
    "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit_functional": "batch_norm",
    "hardtanh": "relu6",
    "_prelu_kernel": "prelu",
    "rsub": "sub",
    "_softmax": "softmax",
    "_log_softmax": "log_softmax",
    "_safe_softmax": "softmax",
    "_scaled_dot_product_flash_attention": "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu": "scaled_dot_product_attention",
    "_scaled_dot_product_efficient_attention": "scaled_dot_product_attention",
    "_native_multi_head_attention": "multi_head_attention_forward",
    **dict.fromkeys(
        ("upsample_bilinear2d", "upsample_nearest2d", "upsample_bicubic2d", "upsample_linear1d", "upsample_nearest1d",
         "upsample_trilinear3d", "upsample_nearest3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
         "_upsample_nearest_exact2d"),
        "interpolate",
    ),
    "pixel_unshuffle": "pixel_shuffle",
    **dict.fromkeys(("split_with_sizes", "unsafe_split", "unsafe_split_with_sizes"), "split"),
    **dict.fromkeys(("slice", "index", "as_strided", "diagonal"), "getitem"),
    **dict.fromkeys(("_unsafe_view", "view_as", "reshape_as", "channel_shuffle", "native_channel_shuffle"), "view"),
    **dict.fromkeys(("expand_as",), "expand"),
    **dict.fromkeys(("constant_pad_nd", "reflection_pad2d", "replication_pad2d", "reflection_pad1d"), "pad"),
    **dict.fromkeys(
        ("alias", "detach", "lift_fresh_copy", "_to_copy", "to", "type_as", "feature_dropout", "alpha_dropout",
         "feature_alpha_dropout", "native_dropout"),
        "identity",
    ),
}


def _kind_name(op: torch._ops.OpOverload) -> str:
    """The functional name graph.py maps for an ATen op (``relu_`` stays, ``silu_`` -> ``silu``)."""
    name = op._opname
    if name in ATEN_KIND_NAMES:
        return ATEN_KIND_NAMES[name]
    if name in _FUNCTION_KINDS:
        return name
    bare = name.rstrip("_")
    if bare in _FUNCTION_KINDS:
        return bare
    return bare.lstrip("_") or name


@functools.lru_cache(maxsize=None)
def _named_op(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """A callable that runs ``op`` but is named like the functional graph.py knows.

    graph.py reads a call's kind from ``target.__name__``; an OpOverload's is
    ``conv2d.default``. Wrapping keeps the graph runnable and readable.
    """
    name = _kind_name(op)

    def call(*args: Any, **kwargs: Any) -> Any:
        return op(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__module__ = __name__
    call.__doc__ = f"torch.ops.{op.name()} under the name graph.py maps ({name})."
    call.aten_op = op  # type: ignore[attr-defined]
    return call


_INLINED_HOPS = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast"})


def _tensor_meta(value: Any) -> Any:
    """``TensorMetadata`` for every tensor in ``value`` (FakeTensors included), structure kept."""
    if isinstance(value, torch.Tensor):
        return _extract_tensor_metadata(value)
    if isinstance(value, tuple):
        return tuple(_tensor_meta(v) for v in value)
    if isinstance(value, list):
        return [_tensor_meta(v) for v in value]
    if isinstance(value, dict):
        return {k: _tensor_meta(v) for k, v in value.items()}
    return value


def _has_tensor(meta: Any) -> bool:
    if isinstance(meta, TensorMetadata):
        return True
    if isinstance(meta, (list, tuple)):
        return any(_has_tensor(v) for v in meta)
    if isinstance(meta, dict):
        return any(_has_tensor(v) for v in meta.values())
    return False


class _ExportConverter:
    """Copy an ExportedProgram's graph into a plain fx graph that graph.py reads like an fx trace."""

    def __init__(self, ep: torch.export.ExportedProgram, model: nn.Module) -> None:
        from torch.export.graph_signature import InputKind

        self.ep = ep
        self.model = model
        self.graph = fx.Graph()
        self.attrs: dict[str, Any] = {}
        self.roles: dict[str, Any] = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
        self.InputKind = InputKind

    def convert(self) -> fx.Graph:
        from torch.export.graph_signature import OutputKind

        src = self.ep.graph_module
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in src.graph.nodes if n.op == "placeholder"]
        # The user input first: build_layer_graph takes the first placeholder as the input.
        ordered = sorted(placeholders, key=lambda n: self.roles[n.name].kind != self.InputKind.USER_INPUT)
        for node in ordered:
            env[node] = self._input(node)
        outputs = self._copy_body(src, env)
        specs = self.ep.graph_signature.output_specs
        user = [value for value, spec in zip(outputs, specs) if spec.kind == OutputKind.USER_OUTPUT]
        if not user:
            raise TraceError("torch.export produced no user output. Hint: the model's forward must return a tensor.")
        self.graph.output(user[0] if len(user) == 1 else tuple(user))
        return self.graph

    def _input(self, node: fx.Node) -> fx.Node:
        spec = self.roles[node.name]
        if spec.kind == self.InputKind.USER_INPUT:
            new = self.graph.placeholder(node.name)
        elif spec.kind in (self.InputKind.PARAMETER, self.InputKind.BUFFER, self.InputKind.CONSTANT_TENSOR):
            target = str(spec.target)
            self.attrs[target] = self._resolve(target)
            new = self.graph.get_attr(target)
        else:
            raise TraceError(f"torch.export input {node.name!r} is a {spec.kind.name}, which autoprobe cannot read.")
        self._set_meta(new, node)
        return new

    def _resolve(self, target: str) -> Any:
        """The model's own tensor for a lifted parameter/buffer, else export's lifted constant."""
        owner: Any = self.model
        with contextlib.suppress(AttributeError):
            for part in target.split("."):
                owner = getattr(owner, part)
            return owner
        return self.ep.constants[target]

    def _set_meta(self, new: fx.Node, old: fx.Node) -> None:
        meta = _tensor_meta(old.meta.get("val"))
        if _has_tensor(meta):
            new.meta["tensor_meta"] = meta
        if "nn_module_stack" in old.meta:
            new.meta["nn_module_stack"] = old.meta["nn_module_stack"]

    def _copy_body(self, src: fx.GraphModule, env: dict[fx.Node, Any]) -> tuple[Any, ...]:
        """Copy every non-placeholder node of ``src``; returns what its output node returns."""
        for node in src.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = fx.node.map_arg(node.args[0], lambda n: env[n])
                return tuple(result) if isinstance(result, (list, tuple)) else (result,)
            if node.op == "get_attr":
                value = functools.reduce(getattr, str(node.target).split("."), src)
                if isinstance(value, fx.GraphModule):
                    env[node] = value  # a higher-order op's body; inlined where it is called
                    continue
                target = f"_export_{node.target}".replace(".", "_")
                self.attrs[target] = value
                env[node] = new = self.graph.get_attr(target)
                self._set_meta(new, node)
                continue
            if node.op != "call_function":
                raise TraceError(f"torch.export produced a {node.op} node {node.name!r}, which autoprobe cannot read.")
            target = node.target
            name = getattr(target, "__name__", "")
            hop_name = target.name() if isinstance(target, torch._ops.HigherOrderOperator) else ""
            if hop_name in _INLINED_HOPS:
                # Grad/autocast regions change nothing about the data flow: inline their bodies.
                args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
                index = next(i for i, a in enumerate(args) if isinstance(a, fx.GraphModule))
                env[node] = self._inline(args[index], args[index + 1 :])
                continue
            if target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
                env[node] = env[node.args[0]][node.args[1]]
                continue
            if isinstance(target, torch._ops.OpOverload):
                target = _named_op(target)
            elif name == "" and not callable(target):
                raise TraceError(f"torch.export produced an unreadable call {node.name!r} ({target!r}).")
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = new = self.graph.create_node("call_function", target, args, kwargs, name=node.name)
            self._set_meta(new, node)
        raise TraceError("torch.export produced a graph without an output node.")

    def _inline(self, body: fx.GraphModule, operands: Sequence[Any]) -> tuple[Any, ...]:
        env: dict[fx.Node, Any] = {}
        inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
        env.update(zip(inputs, operands))
        return self._copy_body(body, env)


def _module_stack_paths(node: fx.Node) -> list[tuple[str, str]]:
    """(call key, module path) from outermost to innermost; the root module is dropped."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, str(value[0])) for key, value in stack.items() if value and str(value[0])]


def _export_qualnames(
    graph: fx.Graph,
    model: nn.Module,
    leaf_types: tuple[type[nn.Module], ...],
    leaf_paths: frozenset[str],
) -> dict[str, str]:
    """Module-qualified names like the fx tracer's, from each node's ``nn_module_stack``.

    A torch.nn leaf (Conv2d, BatchNorm2d, ReLU) is one ``call_module`` node named
    by its path under fx; under export it is one or more ATen calls. The call
    that leaves the module gets the module's path, the rest ``path.op``, so a
    point's name reads the same whichever backend found it.
    """
    # A shared module is reached under several paths; fx names it by its first one, and so do we.
    by_path = dict(model.named_modules(remove_duplicate=False))
    first_path = {id(m): path for path, m in model.named_modules()}
    modules = {first_path[id(m)]: m for m in by_path.values()}

    def canonical(path: str) -> str:
        module = by_path.get(path)
        return first_path[id(module)] if module is not None else path

    nodes = list(graph.nodes)
    # Every call of a leaf module, at any nesting level: stack keys are unique per call ("@1" on repeats).
    calls: dict[str, list[fx.Node]] = {}
    call_path: dict[str, tuple[int, str]] = {}
    for node in nodes:
        if node.op != "call_function":
            continue
        for level, (key, path) in enumerate(_module_stack_paths(node)):
            path = canonical(path)
            module = modules.get(path)
            if module is not None and _is_leaf(module, path, leaf_types, leaf_paths):
                calls.setdefault(key, []).append(node)
                call_path[key] = (level, path)
    # The node that leaves a call is named by the call's path; when it leaves nested calls at once
    # (a conv leaving Conv2d and the leaf block around it), the outermost wins, as under fx.
    exits: dict[fx.Node, tuple[int, str]] = {}
    for key, members in calls.items():
        inside = set(members)
        leaving = [n for n in members if "tensor_meta" in n.meta and any(u not in inside for u in n.users)]
        exit_node = leaving[-1] if leaving else members[-1]
        if exit_node.target is operator.getitem and exit_node.args[0] in inside:
            exit_node = exit_node.args[0]  # name the op, not the tuple element
        level, path = call_path[key]
        if exit_node not in exits or level < exits[exit_node][0]:
            exits[exit_node] = (level, path)

    counts: dict[str, int] = {}
    qualnames: dict[str, str] = {}
    for node in nodes:
        if node.op in ("placeholder", "output"):
            base = node.name
        elif node.op == "get_attr":
            base = str(node.target)
        elif node in exits:
            base = exits[node][1]
        else:
            paths = _module_stack_paths(node)
            scope = canonical(paths[-1][1]) if paths else ""
            local = getattr(node.target, "__name__", str(node.target)).rstrip("_") or "op"
            base = f"{scope}.{local}" if scope else local
        count = counts.get(base, 0)
        counts[base] = count + 1
        qualnames[node.name] = base if count == 0 else f"{base}_{count}"
    return qualnames


def _graph_module(model: nn.Module, graph: fx.Graph, attrs: dict[str, Any], name: str) -> fx.GraphModule:
    """A GraphModule over ``graph`` that shares the user's submodules (not copies or stubs).

    Built from a dict root so lifted constants need not exist on the model, then
    every top-level child is swapped for the real one: graph.py reads the owning
    module's class through it, and a later rewrite runs the user's own modules.
    """
    gm = fx.GraphModule(attrs, graph, name)
    # In the model's own order: a module shared by two parents (CoaT's ``crpe1``) is named by its
    # first path in ``named_modules()``, and the graph's targets use the model's first path.
    gm._modules.clear()
    for child_name, child in model.named_children():
        setattr(gm, child_name, child)
    return gm


def trace_export(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    train: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    leaf_paths: Sequence[str] = (),
    batch_size: int = 2,
) -> Traced:
    """Trace ``model`` with ``torch.export`` (non-strict) and convert the graph for graph.py.

    The example input lives on the model's device (meta for spec-built models); export turns it
    and the weights into fake tensors, so nothing is computed and the model is not mutated.

    Args:
        model: any ``nn.Module``.
        input_size: the input without batch.
        train: export the training-mode graph.
        leaf_modules: module classes whose calls are named by their path, as fx leaves are.
        leaf_paths: module paths named likewise.
        batch_size: batch used for shapes.

    Returns:
        A ``Traced`` with ``backend="export"`` whose call nodes carry ``tensor_meta``.

    Raises:
        TraceError: export failed; the message carries export's own reason.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> t = trace_export(net, (3, 16, 16))
        >>> t.backend, sorted(t.qualnames.values())[:3]
        ('export', ['0', '0.bias', '0.weight'])
    """
    input_shape = (batch_size, *(int(s) for s in input_size))
    concrete = _concrete_args(model)
    example = torch.zeros(input_shape, device=_device_of(model))
    leaf_types = (*default_leaf_modules(), *leaf_modules)
    captured = io.StringIO()
    with _training_mode(model, train):
        try:
            # On failure export prints its partial graph to stderr, pages of it; the graph stays
            # on the chained exception, and the reason goes into the ladder's notes.
            with contextlib.redirect_stderr(captured):
                ep = torch.export.export(model, (example,), strict=False)
        except Exception as exc:  # export runs the model's Python; report whatever it raised
            raise TraceError(f"torch.export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    sys.stderr.write(captured.getvalue())  # a successful export's own messages are the user's to see
    converter = _ExportConverter(ep, model)
    graph = converter.convert()
    qualnames = _export_qualnames(graph, model, tuple(leaf_types), frozenset(leaf_paths))
    gm = _graph_module(model, graph, converter.attrs, type(model).__name__)
    return Traced(
        graph_module=gm,
        qualnames=qualnames,
        input_shape=input_shape,
        mode="train" if train else "eval",
        backend="export",
        concrete_args=tuple(sorted(concrete)),
        module_types={name: type(module).__name__ for name, module in model.named_modules()},
    )


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------

_INPUT = -1


class _Provenance(TorchFunctionMode):
    """Tags every tensor with the module calls it was computed from.

    Forward hooks see module calls only; the functions between them (``x + identity``,
    ``x.flatten(1)``) would leave the graph disconnected. Propagating the union of
    the inputs' tags through every torch function keeps the edges without making
    those functions nodes.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def sources(self, value: Any) -> frozenset[int]:
        found: set[int] = set()
        for tensor in _tensors(value):
            found |= self.tags.get(tensor, frozenset())
        return frozenset(found)

    def tag(self, value: Any, sources: frozenset[int]) -> None:
        for tensor in _tensors(value):
            self.tags[tensor] = sources

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        sources = self.sources((args, kwargs))
        if sources:
            self.tag(result, sources)
        return result


def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


@dataclass
class _Call:
    path: str
    sources: frozenset[int]
    meta: Any


def _hook_points(
    model: nn.Module, leaf_types: tuple[type[nn.Module], ...], leaf_paths: frozenset[str]
) -> list[tuple[str, nn.Module]]:
    """The outermost leaf modules: fx's leaves, plus any module without children."""
    points: list[tuple[str, nn.Module]] = []
    covered: tuple[str, ...] = ()
    for path, module in model.named_modules():
        if not path or (covered and any(path.startswith(c + ".") for c in covered)):
            continue
        if _is_leaf(module, path, leaf_types, leaf_paths) or next(module.children(), None) is None:
            points.append((path, module))
            covered = (*covered[-8:], path)  # named_modules is depth-first: only recent leaves can be ancestors
    return points


def trace_hooks(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    train: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    leaf_paths: Sequence[str] = (),
    batch_size: int = 2,
) -> Traced:
    """Build a coarse module-level graph by running ``model`` once with forward hooks.

    On a meta model the run is on meta tensors (no compute). On a live model it is one real
    forward pass under ``no_grad`` on a fixed standard-normal batch (seed 0), with buffers
    swapped for clones so running statistics stay untouched; branches on tensor values then
    follow that batch.

    Args:
        model: any ``nn.Module``; not mutated.
        input_size: the input without batch.
        train: run in training mode.
        leaf_modules: module classes hooked as one node.
        leaf_paths: module paths hooked as one node.
        batch_size: batch used for shapes.

    Returns:
        A ``Traced`` with ``backend="hooks"``: one ``call_module`` node per leaf-module call.
        Its graph is for analysis only; it is not the model's computation.

    Raises:
        TraceError: the forward pass failed, or no hooked module saw the input.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> t = trace_hooks(net, (3, 16, 16))
        >>> t.backend, [t.qualnames[n.name] for n in t.graph_module.graph.nodes]
        ('hooks', ['x', '0', '1', 'output'])
    """
    input_shape = (batch_size, *(int(s) for s in input_size))
    concrete = _concrete_args(model)
    leaf_types = (*default_leaf_modules(), *leaf_modules)
    points = _hook_points(model, tuple(leaf_types), frozenset(leaf_paths))
    modules = dict(points)
    device = _device_of(model)
    live = device.type != "meta"
    if live:
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(input_shape, generator=generator).to(device)
    else:
        example = torch.empty(input_shape, device="meta")

    provenance = _Provenance()
    calls: list[_Call] = []

    def record(path: str, _module: nn.Module, args: Any, output: Any) -> None:
        calls.append(_Call(path, provenance.sources(args), _tensor_meta(output)))
        provenance.tag(output, frozenset({len(calls) - 1}))

    handles = [module.register_forward_hook(functools.partial(record, path)) for path, module in points]
    provenance.tag(example, frozenset({_INPUT}))
    try:
        with _training_mode(model, train), torch.no_grad(), provenance:
            if live:
                clones = {name: b.clone() for name, b in model.named_buffers(remove_duplicate=False)}
                output = torch.func.functional_call(model, clones, (example,), strict=False)
            else:
                output = model(example)
    except Exception as exc:  # the model's own forward; report whatever it raised
        where = "a meta-device run" if not live else "one real forward pass"
        raise TraceError(f"forward hooks: {where} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        for handle in handles:
            handle.remove()

    graph = fx.Graph()
    nodes: dict[int, fx.Node] = {_INPUT: graph.placeholder("x")}
    nodes[_INPUT].meta["tensor_meta"] = _extract_tensor_metadata(example)
    counts: dict[str, int] = {}
    qualnames = {"x": "x"}
    for index, call in enumerate(calls):
        args = tuple(nodes[s] for s in sorted(call.sources) if s in nodes)
        node = graph.call_module(call.path, args)
        if _has_tensor(call.meta):
            node.meta["tensor_meta"] = call.meta
        nodes[index] = node
        count = counts.get(call.path, 0)
        counts[call.path] = count + 1
        qualnames[node.name] = call.path if count == 0 else f"{call.path}_{count}"
    sinks = provenance.sources(output)
    if not sinks - {_INPUT}:
        raise TraceError(
            "forward hooks: the output was not computed from any hooked module call. "
            "Hint: the model may do all its work in functions; fx or export must trace it."
        )
    result = [nodes[s] for s in sorted(sinks) if s in nodes]
    out = graph.output(result[0] if len(result) == 1 else tuple(result))
    qualnames[out.name] = "output"
    called = {call.path: modules[call.path] for call in calls}
    gm = _graph_module(model, graph, called, type(model).__name__)
    return Traced(
        graph_module=gm,
        qualnames=qualnames,
        input_shape=input_shape,
        mode="train" if train else "eval",
        backend="hooks",
        concrete_args=tuple(sorted(concrete)),
        module_types={name: type(module).__name__ for name, module in model.named_modules()},
    )


_TRACERS: dict[str, Callable[..., Traced]] = {"fx": trace_model, "export": trace_export, "hooks": trace_hooks}
