"""Stage 1: trace a model with torch.fx and propagate shapes on meta tensors.

The tracer names nodes by module path (``layer1.0.conv1``, ``blocks.3.attn.softmax``), the rule
``node_names`` documents, and respects timm's leaf-module and autowrap-function registries plus the
leaves the user names in ``TraceOptions``.

Shapes and axis labels (``labelling.py``) come from one run of the traced graph on meta tensors,
each node labelled right after it runs: every parameter and buffer of the model is swapped for a
meta twin of the same shape for the run (``torch.func.functional_call``) and the input is a meta
tensor, so nothing is computed, no weight is read or written, and the user's module is never
mutated: its ``training`` flags are restored after tracing.

``TraceOptions`` is the one record every tracing backend (fx here, export and hooks in
``backends.py``), ``analyze`` and ``instrument`` take: the mode, the leaves, how the model is called,
the batch size, and whether a backend may run the model on real values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal, NamedTuple

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .errors import AutoprobeError, SizeErrorParts, TraceError, UsageError
from .fx_tracer import INPLACE_META, QualnameTracer, specialization_note
from .labelling import Labeller
from .meta import meta_twins, needs_values
from .ops import is_mode_free, is_windowed, lookup, op_name
from .sizes import TRACE_BATCH, size_error

__all__ = [
    "Mode",
    "Backend",
    "TraceOptions",
    "Traced",
    "Example",
    "NodeNamer",
    "trace_fx",
    "default_leaf_modules",
    "default_autowrap_functions",
]

Mode = Literal["train", "eval"]
"""The mode a graph is traced in."""

Backend = Literal["fx", "export", "hooks"]
"""How a graph was obtained: torch.fx, ``torch.export``, or forward hooks (see ``backends.py``)."""

_MODES: tuple[str, ...] = ("train", "eval")
_FX_SUFFIX = re.compile(r"_[0-9]+$")
_PROXY = re.compile(r"Proxy\(\w+\)")


@dataclass(frozen=True)
class TraceOptions:
    """How to trace a model: one record for the fx, export and hooks backends, ``analyze`` and ``instrument``.

    Attributes:
        mode: ``"eval"`` or ``"train"``: the mode the model is put in while tracing (restored after).
        leaf_modules: module classes to keep as single nodes (besides timm's registry).
        leaf_paths: module paths (``"blocks.3.attn"``) to keep as single nodes; each must name a
            submodule of the model (checked when tracing).
        input_name: the forward parameter that receives the input (``"pixel_values"`` for a model
            called as ``model(pixel_values=x)``); ``None`` is the first parameter.
        forward_kwargs: further forward arguments, by name. A tensor is an example of an extra input:
            only its shape and dtype are used (a meta twin is fed), so pass a tensor of the right size.
            Any other value is fixed while tracing. Parameters not given keep their defaults.
        batch_size: the batch of the example input (``sizes.TRACE_BATCH``, 2: train-mode BatchNorm needs two values).
        allow_real_data: whether the hooks backend may run the model for real, on one seeded
            standard-normal batch under ``no_grad`` with cloned buffers, when a meta run is not enough
            (a branch on tensor values, ``if x.sum() > 0``). Off by default: fx and export never compute,
            and the hooks backend first runs on meta; with this off, a model that needs values is refused
            with a message that names this option.

    Raises:
        UsageError: an option has the wrong type (a leaf class given as a string, a mode that is not
            ``train``/``eval``, a batch size below 1).

    Example:
        >>> TraceOptions(mode="train", leaf_paths=("blocks.0",)).train
        True
        >>> TraceOptions(leaf_modules=("Conv2d",))
        Traceback (most recent call last):
            ...
        autoprobe.errors.UsageError: leaf_modules takes nn.Module classes, but got 'Conv2d' (a str).
        Hint: pass the class itself, e.g. leaf_modules=[torch.nn.MultiheadAttention]; module paths go in leaf_paths=[...].
    """

    mode: Mode = "eval"
    leaf_modules: tuple[type[nn.Module], ...] = ()
    leaf_paths: tuple[str, ...] = ()
    input_name: str | None = None
    forward_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    batch_size: int = TRACE_BATCH
    allow_real_data: bool = False

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise UsageError(f"mode must be 'train' or 'eval', not {self.mode!r}.\nHint: pass mode='eval' or mode='train'.")
        if isinstance(self.leaf_modules, (str, type)) or not isinstance(self.leaf_modules, Iterable):
            raise UsageError(
                f"leaf_modules must be a sequence of nn.Module classes, not {self.leaf_modules!r}.\n"
                "Hint: write leaf_modules=[torch.nn.MultiheadAttention]."
            )
        leaves = tuple(self.leaf_modules)
        for leaf in leaves:
            if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
                raise UsageError(
                    f"leaf_modules takes nn.Module classes, but got {leaf!r} (a {type(leaf).__name__}).\n"
                    "Hint: pass the class itself, e.g. leaf_modules=[torch.nn.MultiheadAttention]; "
                    "module paths go in leaf_paths=[...]."
                )
        if isinstance(self.leaf_paths, str) or not isinstance(self.leaf_paths, Iterable):
            raise UsageError(
                f"leaf_paths must be a sequence of module paths, not {self.leaf_paths!r}.\n"
                "Hint: write leaf_paths=['blocks.3.attn']."
            )
        paths = tuple(self.leaf_paths)
        for path in paths:
            if not isinstance(path, str):
                raise UsageError(
                    f"leaf_paths takes module paths as strings, but got {path!r} (a {type(path).__name__}).\n"
                    "Hint: module classes go in leaf_modules=[...]."
                )
        if self.input_name is not None and not isinstance(self.input_name, str):
            raise UsageError(f"input_name must be a parameter name or None, not {self.input_name!r}.")
        if not isinstance(self.forward_kwargs, Mapping) or not all(isinstance(k, str) for k in self.forward_kwargs):
            raise UsageError(
                f"forward_kwargs must map parameter names to values, not {self.forward_kwargs!r}.\n"
                "Hint: write forward_kwargs={'attention_mask': torch.ones(2, 16)}."
            )
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, not {self.batch_size!r}.")
        if not isinstance(self.allow_real_data, bool):
            raise UsageError(f"allow_real_data must be True or False, not {self.allow_real_data!r}.")
        object.__setattr__(self, "leaf_modules", leaves)
        object.__setattr__(self, "leaf_paths", paths)
        object.__setattr__(self, "forward_kwargs", MappingProxyType(dict(self.forward_kwargs)))

    @property
    def train(self) -> bool:
        """Whether the training-mode graph is traced."""
        return self.mode == "train"

    def check_model(self, model: nn.Module) -> None:
        """Refuse leaf paths that name no submodule of ``model``.

        Raises:
            UsageError: a path in ``leaf_paths`` is not in ``model.named_modules()``; close names are listed.
        """
        names = dict(model.named_modules())
        for path in self.leaf_paths:
            if path not in names:
                import difflib

                close = difflib.get_close_matches(path, [n for n in names if n], n=3, cutoff=0.5)
                near = f" Close names: {', '.join(close)}." if close else ""
                raise UsageError(
                    f"leaf_paths names {path!r}, which is not a submodule of {type(model).__name__}.{near}\n"
                    "Hint: use a path from `dict(model.named_modules())`, like 'blocks.3.attn'."
                )

    def leaf_types(self) -> tuple[type[nn.Module], ...]:
        """timm's leaf modules, then the user's."""
        return tuple(dict.fromkeys((*default_leaf_modules(), *self.leaf_modules)))


class Example(NamedTuple):
    """One output of the model at the traced input, as the model builds it, for its structure and shapes.

    Example:
        >>> x = torch.empty(2, 4, 8, 8, device="meta")
        >>> example = Example({"out": x}, {id(x): "NCSS"})
        >>> example.axes[id(example.output["out"])]
        'NCSS'
    """

    output: Any
    """The model's output object (a tensor, a dict, a ``ModelOutput``, a tuple) with a meta tensor per tensor
    (the hooks backend's real-data run: that run's tensors)."""
    axes: Mapping[int, str]
    """``id(tensor)`` -> its axis letters (``axes.Axis``: ``"NCSS"``) for each tensor of ``output`` whose axes the
    trace knows; the tensors are held by ``output``, so the ids stay theirs."""


@dataclass(frozen=True)
class Traced:
    """A traced model with shapes on every tensor-producing node.

    Attributes:
        graph_module: the fx GraphModule; its submodules are the user's modules (shared, not copied).
        qualnames: fx node name -> module-qualified name (``layer1.0.add``), unique by construction
            (``NodeNamer``).
        input_shape: the full input shape used for propagation, batch included.
        mode: the mode the graph was traced in.
        backend: how the graph was obtained.
        module_types: module path -> class name of every submodule of the traced model
            (``""`` is the model itself); the graph module keeps only the called ones.
        module_calls: fx node name -> (module path, call index) for every node that is the output
            of a module call: the 0-based index counts the calls of that module in execution order.
            A forward hook on that module taps exactly that node at that call.
        input_node: the fx name of the placeholder that receives the input.
        notes: what the backend did that a user should know (a real-data run), in plain words.
        output_type: the dict subclass the model returns (a Hugging Face ``ModelOutput``) where the
            graph returns it lowered to a plain dict (fx does); ``None`` when the graph returns the
            model's own object.
        part: ``""`` when the graph is the whole model's; else the path of the submodule traced alone
            because no backend could trace the whole (a detection model's ``backbone``): node names are
            still the whole model's paths, but the graph's input and output are that submodule's.
        output_spec: export only: the pytree spec of the model's output, whose leaves are the graph's
            output values in order (export flattens a dict or a ``ModelOutput``); ``None`` elsewhere.
        example: hooks only: the output the hooked run returned, with the axes it propagated (fx and
            export rebuild it from the graph, see ``backends.ModelTrace.example``); ``None`` elsewhere.
    """

    graph_module: fx.GraphModule
    qualnames: dict[str, str]
    input_shape: tuple[int, ...]
    mode: Mode
    backend: Backend
    module_types: dict[str, str] = field(default_factory=dict)
    module_calls: dict[str, tuple[str, int]] = field(default_factory=dict)
    input_node: str = ""
    notes: tuple[str, ...] = ()
    output_type: type | None = None
    part: str = ""
    output_spec: Any = None
    example: Example | None = None


class NodeNamer:
    """Give every node of a graph a unique, module-qualified name.

    The rule, the same on every backend (fx, export, hooks):

    1. A node's *base* name is the path of the module it is the output of (``layer1.0.conv1``; a shared
       module is named by its first path in ``named_modules()``), and for any other op the path of the
       module whose forward made it, a dot, and the op's name without fx's global counter
       (``layer1.0.add``; ``add`` at the top level). Placeholders keep their parameter name.
    2. The first node with a base gets the base itself, except that a base which is the path of a
       module of the model is reserved for that module's own output: a function whose base equals a
       module path (a top-level ``F.relu`` next to a module ``relu``) is treated as a repeat.
    3. Every later node with the same base gets ``base_1``, ``base_2``, ... in execution order,
       skipping every name that is a module path of the model or was already given.

    So names are unique by construction, a module's first call is always named by its path (what a user
    reads in ``named_modules()`` and the state_dict), and repeated calls and functions are numbered per
    scope. This agrees with torchvision's ``get_graph_node_names`` except where a model has submodules
    whose names end in ``_N``: torchvision strips that suffix and renumbers (modules ``conv_1``,
    ``conv_2`` become nodes ``conv``, ``conv_1``), autoprobe keeps the paths (``conv_1``, ``conv_2``)
    and numbers repeats around them (the second call of ``conv`` next to a module ``conv_1`` is
    ``conv_2``).

    Example:
        >>> namer = NodeNamer(["conv", "conv_1"])
        >>> [namer.name(b, module=m) for b, m in [("conv", True), ("conv", True), ("conv_1", True), ("add", False)]]
        ['conv', 'conv_2', 'conv_1', 'add']
    """

    def __init__(self, module_paths: Iterable[str]) -> None:
        self._reserved = frozenset(p for p in module_paths if p)
        self._used: set[str] = set()
        self._next: dict[str, int] = {}

    def name(self, base: str, *, module: bool) -> str:
        """The unique name for a node with ``base``; ``module`` says it is the output of the module at ``base``."""
        if base not in self._used and (module or base not in self._reserved):
            self._used.add(base)
            return base
        k = self._next.get(base, 1)
        while f"{base}_{k}" in self._used or f"{base}_{k}" in self._reserved:
            k += 1
        self._next[base] = k + 1
        self._used.add(f"{base}_{k}")
        return f"{base}_{k}"


def default_leaf_modules() -> tuple[type[nn.Module], ...]:
    """Module classes fx must not trace through: timm's registry.

    torchvision's feature extractor also keeps every ``torchvision.ops`` module whole; autoprobe
    does not, because ``Conv2dNormActivation`` and ``SqueezeExcitation`` are plain, traceable
    blocks whose insides (the conv, the norm, the activation) are exactly what detectors read.
    """
    leaves: list[type[nn.Module]] = []
    # A model holding a timm layer has imported timm; without timm loaded there is nothing of its to
    # keep whole, and importing it only to learn that costs the CLI seconds (issue 28).
    if "timm" not in sys.modules:
        return ()
    with contextlib.suppress(ImportError):
        from timm.layers import get_notrace_modules

        leaves.extend(get_notrace_modules())
    return tuple(dict.fromkeys(leaves))


def default_autowrap_functions() -> tuple[Callable[..., Any], ...]:
    """Functions fx records as single calls: timm's registry (shape-dependent helpers); none unless timm is loaded."""
    if "timm" not in sys.modules:
        return ()
    with contextlib.suppress(ImportError):
        from timm.layers import get_notrace_functions

        return tuple(dict.fromkeys(get_notrace_functions()))
    return ()


def has_tensor(meta: Any) -> bool:
    """Whether a ``tensor_meta`` value (a ``TensorMetadata`` or a nest of them) holds a tensor."""
    if isinstance(meta, TensorMetadata):
        return True
    if isinstance(meta, (list, tuple)):
        return any(has_tensor(v) for v in meta)
    if isinstance(meta, dict):
        return any(has_tensor(v) for v in meta.values())
    return False


_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _metadata(tensor: torch.Tensor) -> TensorMetadata:
    """The ``TensorMetadata`` fx's ``ShapeProp`` records for ``tensor``: shape, dtype, grad flag, stride and the
    first memory format it is contiguous in (a quantized tensor's scales are not read: no stage uses them)."""
    strided = tensor.layout == torch.strided
    memory_format = next((f for f in _MEMORY_FORMATS if strided and tensor.is_contiguous(memory_format=f)), None)
    return TensorMetadata(tensor.shape, tensor.dtype, tensor.requires_grad, tensor.stride() if strided else (),
                          memory_format, tensor.is_quantized, {})


def tensor_meta(value: Any) -> Any:
    """``TensorMetadata`` for every tensor in ``value`` (meta and fake tensors included), structure kept.

    Example:
        >>> meta = tensor_meta({"out": torch.empty(2, 3, device="meta")})
        >>> tuple(meta["out"].shape), meta["out"].memory_format
        ((2, 3), torch.contiguous_format)
    """
    if isinstance(value, torch.Tensor):
        return _metadata(value)
    if isinstance(value, tuple):
        return tuple(tensor_meta(v) for v in value)
    if isinstance(value, list):
        return [tensor_meta(v) for v in value]
    if isinstance(value, dict):
        return {k: tensor_meta(v) for k, v in value.items()}
    return value


def module_types(model: nn.Module) -> dict[str, str]:
    """Module path -> class name of every submodule (``""`` is the model)."""
    return {name: type(module).__name__ for name, module in model.named_modules()}


def _fx_names(graph: fx.Graph, scopes: Mapping[fx.Node, str], model: nn.Module) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    """Qualified names (``NodeNamer``'s rule) and module calls of an fx-traced graph."""
    calls: dict[str, tuple[str, int]] = {}
    call_counts: dict[str, int] = {}
    for node in graph.find_nodes(op="call_module", sort=True):  # a hook counts calls in execution order
        path = str(node.target)
        calls[node.name] = (path, call_counts.get(path, 0))
        call_counts[path] = call_counts.get(path, 0) + 1
    namer = NodeNamer(p for p, _ in model.named_modules())
    qualnames: dict[str, str] = {}
    # A tensor made without the input's data (a train-only random mask: smp's drop_connect draws
    # `keep_prob + torch.rand(...)`) is named after every other node, so it cannot renumber the data
    # ops: else a point named in the eval graph would name another node in the train graph. Shape
    # reads keep their place, as in torchvision's names.
    data = _carries_data(graph)
    dataless = {n for n in graph.nodes if n not in data and has_tensor(n.meta.get("tensor_meta"))}
    for node in sorted(graph.nodes, key=lambda n: n in dataless):
        if node.op == "call_module":
            qualnames[node.name] = namer.name(str(node.target), module=True)
            continue
        if node.op in ("placeholder", "output"):
            base = node.name
        else:
            # fx suffixes names globally (add_17); the namer numbers them per scope.
            local = _FX_SUFFIX.sub("", node.name)
            scope = scopes.get(node, "")
            base = f"{scope}.{local}" if scope else local
        qualnames[node.name] = namer.name(base, module=False)
    return {node.name: qualnames[node.name] for node in graph.nodes}, calls


def _carries_data(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose value is a tensor computed from a placeholder's tensor (placeholders included).

    A tensor made from a shape, a constant or a device read (``torch.rand(b, 1, device=x.device)``)
    does not carry the input's data: the edge it hangs on is not a tensor.
    """
    carrying: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or (
            has_tensor(node.meta.get("tensor_meta")) and any(i in carrying for i in node.all_input_nodes)
        ):
            carrying.add(node)
    return carrying


# A module's own registries: what they hold is the model (parameters, buffers, submodules), never a
# forward's scratch state, and a trace does not write them.
_REGISTRIES = frozenset({"_parameters", "_buffers", "_modules"})
_CONTAINERS = (list, dict, set)


class _Attributes:
    """One module's instance attributes at a moment, to put back after a trace.

    The plain containers among them (a list, dict or set, hook tables included) are copied one level
    deep too, so ``self.cache.append(x)`` or ``self.sizes[k] = x`` in a forward is undone in place.
    """

    __slots__ = ("module", "values", "contents")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.values = {k: v for k, v in vars(module).items() if k not in _REGISTRIES}
        self.contents = {k: _contents(v) for k, v in self.values.items() if isinstance(v, _CONTAINERS)}

    def restore(self) -> None:
        state = vars(self.module)
        for key in [k for k in state if k not in _REGISTRIES and k not in self.values]:
            del state[key]
        for key, value in self.values.items():
            if state.get(key, _MISSING) is not value:
                state[key] = value
            elif key in self.contents and _contents(value) != self.contents[key]:
                value.clear()  # the same object, which other code may hold, with its items back
                (value.extend if isinstance(value, list) else value.update)(self.contents[key][1])


_MISSING = object()


def _contents(value: list | dict | set) -> tuple[tuple[int, ...], Any]:
    """A container's items by identity (a tensor's ``==`` is elementwise), and a shallow copy to restore."""
    if isinstance(value, dict):
        return tuple(id(x) for kv in value.items() for x in kv), dict(value)
    return tuple(id(x) for x in value), (list(value) if isinstance(value, list) else set(value))


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Leave every module of ``model`` with exactly the instance attributes it had, whatever a trace sets.

    A forward may write its own state (Hugging Face's Swin sets ``self.window_size`` from the input's
    size); traced, that value is an fx Proxy or a meta tensor, which would stay on the user's live
    module and break the next trace, a ``deepcopy`` or a real forward. fx itself sets
    ``_tensor_constant0`` on the root for a tensor made in forward. Each module's ``__dict__`` entries
    other than its parameter, buffer and submodule registries are put back (added ones deleted).

    Snapshot and restore, rather than tracing a shallow twin with shared parameters: every trace's
    graph module, ``module_calls`` and the hook engine hold the user's own submodules (``Traced``
    shares them, and the taps are registered on them), so a twin would need a second module tree
    kept in step with the first.

    Args:
        model: the module whose submodules (itself included) are kept.

    Returns:
        A context manager; on exit, normal or not, every module's attributes are as they were.

    Example:
        >>> class Sets(nn.Module):
        ...     def forward(self, x):
        ...         self.seen = x.shape[-1]
        ...         return x
        >>> m = Sets()
        >>> with attributes_kept(m):
        ...     _ = m(torch.zeros(1, 4))
        >>> hasattr(m, "seen")
        False
    """
    saved = [_Attributes(m) for m in model.modules()]
    try:
        yield
    finally:
        for attributes in saved:
            attributes.restore()


@contextlib.contextmanager
def training_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in train/eval mode for a trace or a meta run; afterwards every submodule has its own
    flag again and exactly the attributes it had (``attributes_kept``).

    Args:
        model: the model traced or run.
        train: the mode to put it in.

    Returns:
        A context manager.
    """
    with attributes_kept(model):
        model.train(train)
        yield


@dataclass(frozen=True)
class ForwardCall:
    """How the model's forward is called while tracing.

    Attributes:
        input_name: the parameter that receives the input.
        input_index: its position among the forward's parameters.
        fixed: parameters fixed to a value while tracing (fx's ``concrete_args``).
        tensors: parameters fed an example tensor (the user's ``forward_kwargs`` tensors).
        parameters: the forward's named parameters in order (fx makes one placeholder each).
    """

    input_name: str
    input_index: int
    fixed: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]
    parameters: tuple[str, ...] = ()

    def example_kwargs(self, device: torch.device | str) -> dict[str, Any]:
        """The extra arguments for a real call: fixed values as they are, tensors as twins on ``device``."""
        twins = {name: torch.empty_like(t, device=device) if str(device) == "meta" else t.to(device)
                 for name, t in self.tensors.items()}
        return {**self.fixed, **twins}


def forward_call(model: nn.Module, options: TraceOptions) -> ForwardCall:
    """Read ``model.forward``'s signature and decide what each parameter gets while tracing.

    The input goes to ``options.input_name`` (default: the first parameter). Every other parameter
    without a default must be in ``options.forward_kwargs``. Optional parameters keep their simple
    defaults (``None``, numbers, strings), fixed so that ``forward(x, mask=None)`` is traced
    down the ``mask is None`` branch (timm's hiera).

    Raises:
        UsageError: ``input_name`` or a ``forward_kwargs`` key is no parameter of the forward.
        TraceError: a required parameter got no value.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
    names = [p.name for p in named]
    cls = type(model).__name__
    if options.input_name is not None and options.input_name not in names:
        raise UsageError(
            f"input_name={options.input_name!r} is not a parameter of {cls}.forward {tuple(names)}.\n"
            "Hint: name the parameter that takes the input tensor."
        )
    input_name = options.input_name or (names[0] if names else "x")
    unknown = [k for k in options.forward_kwargs if k not in names or k == input_name]
    if unknown and not takes_kwargs:
        raise UsageError(
            f"forward_kwargs names {unknown[0]!r}, which is not a parameter of {cls}.forward {tuple(names)} "
            "besides the input.\nHint: pass only the forward's own extra parameters."
        )
    fixed: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, value in options.forward_kwargs.items():
        (tensors if isinstance(value, torch.Tensor) else fixed)[name] = value
    for param in named:
        if param.name == input_name or param.name in options.forward_kwargs:
            continue
        if param.default is param.empty:
            raise TraceError(
                f"{cls}.forward needs argument {param.name!r} besides the input {input_name!r}; autoprobe feeds "
                "one tensor.\nHint: pass it with forward_kwargs={" + repr(param.name) + ": ...} (a tensor of the "
                "right shape for an extra input), or input_name= if it is the input."
            )
        if param.default is None or isinstance(param.default, (bool, int, float, str)):
            fixed[param.name] = param.default
    return ForwardCall(input_name, names.index(input_name) if input_name in names else 0,
                       MappingProxyType(fixed), MappingProxyType(tensors), tuple(names))


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and autoprobe: the model code that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and "/autoprobe/" not in path:
            line = (frame.line or "").strip()
            return f"{frame.filename}:{frame.lineno} `{line}`"
    return "unknown location"


def _fx_trace(
    model: nn.Module, options: TraceOptions, call: ForwardCall, input_shape: tuple[int, ...]
) -> tuple[fx.Graph, QualnameTracer]:
    values = {call.input_name: torch.empty(input_shape, device="meta"), **call.example_kwargs("meta")}
    tracer = QualnameTracer(options.leaf_types(), options.leaf_paths, default_autowrap_functions(), values)
    try:
        graph = tracer.trace(model, concrete_args=dict(call.fixed) or None)
    except Exception as exc:  # fx raises anything the model's Python raises on a Proxy
        path = tracer.failed_at or ""
        module = model.get_submodule(path) if path else model
        cls = f"{type(module).__module__}.{type(module).__qualname__}"
        hint = (
            f"register it as a leaf so fx records it as one call: `options=TraceOptions(leaf_paths=[{path!r}])` in Python "
            f"or `--leaf {path}` on the CLI."
            if path
            else "the model's own forward cannot be traced; wrap the untraceable part in a submodule "
            "and pass that submodule in TraceOptions(leaf_paths=[...]) (`--leaf` on the CLI)."
        )
        raise TraceError(
            f"torch.fx could not trace module {path or '<top level>'!r} ({cls}) at {_user_frame(exc)}: "
            f"{type(exc).__name__}: {exc}\nHint: {hint}"
        ) from exc
    tracer.drop_reads(graph)
    return graph, tracer


def _target_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


class _ShapeProp(fx.Interpreter):
    """Record ``TensorMetadata`` on ``node.meta['tensor_meta']`` and the axis labels on ``node.meta['axes']``
    for every node, in one run: each node is labelled (``labelling.Labeller``) right after it has run.

    Unlike ``torch.fx.passes.shape_prop.ShapeProp`` it prints nothing and turns a failing node into
    an ``InputSizeError`` (or a ``TraceError`` for a read of a value) that names the node; fx's own
    ``extra_traceback`` note is switched off because the message already says where.
    """

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...], size_argument: str, input_node: str) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.input_shape = input_shape
        self.size_argument = size_argument
        self.labeller = Labeller(self.submodules, input_node, input_shape[0])

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        if (
            module.training
            and isinstance(module, nn.modules.batchnorm._BatchNorm)
            and len(args) == 1
            and isinstance(args[0], torch.Tensor)
            and args[0].dim() in (2, 3, 4, 5)
            and args[0].shape[1] == module.num_features
        ):
            # Train-mode batch norm on meta runs ATen's decomposition, op by op (5x a ResNet's eval
            # propagation); its output is its input's shape, dtype and layout, and its running
            # statistics are the twins', so nothing else would be learned.
            return torch.empty_like(args[0])
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except AutoprobeError:
            raise
        except Exception as exc:
            where = f"node {n.name} ({n.op} {_target_name(n)})"
            if needs_values(lambda: super(_ShapeProp, self).run_node(n)):
                raise TraceError(
                    f"{where} needs real tensor values ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
                    "autoprobe propagates shapes without computing anything.\nHint: make its control flow "
                    "depend on shapes, not values, or give autoprobe a model without data-dependent branches."
                ) from exc
            # An assert's message was formatted while tracing, so its numbers read ``Proxy(getitem_2)``.
            reason = _PROXY.sub("<traced value>", str(exc).splitlines()[0]) if str(exc) else ""
            size = self.input_shape[1:]
            hint = "pass the size the model was built for, one example's shape without the batch axis"
            if len(size) >= 3 and size[0] == 1:
                # The commonest first-hour slip: the batch axis given too (autoprobe adds its own).
                hint += " (if its leading 1 is a batch axis, drop it)"
            raise size_error(SizeErrorParts(
                f"input size {size} does not fit the model: {where} failed with "
                f"{type(exc).__name__}: {reason}", hint, size, "failed",
            ), argument=self.size_argument) from exc
        meta = fx.node.map_aggregate(
            _fields(result), lambda v: _metadata(v) if isinstance(v, torch.Tensor) else v
        )
        if has_tensor(meta):
            n.meta["tensor_meta"] = meta
        self.labeller.label(n)  # outside the try: a labelling rule's error is autoprobe's, not the input size's
        return result


def _fields(value: Any) -> Any:
    """A dataclass instance (a model's output record) as a dict of its fields, so its tensors get metadata."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and not isinstance(value, Mapping):
        return {f.name: _fields(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


class _Runner(nn.Module):
    """Lets ``torch.func.functional_call`` swap tensors in while the interpreter runs."""

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...], size_argument: str, input_node: str) -> None:
        super().__init__()
        self.gm = gm
        self.input_shape = input_shape
        self.size_argument = size_argument
        self.input_node = input_node

    def forward(self, *args: Any) -> Any:
        return _ShapeProp(self.gm, self.input_shape, self.size_argument, self.input_node).run(*args)


def propagate_shapes(
    gm: fx.GraphModule,
    input_shape: tuple[int, ...],
    inputs: Sequence[Any] | None = None,
    *,
    size_argument: str = "input_size=",
    input_node: str | None = None,
) -> None:
    """Run ``gm`` on meta tensors, filling ``node.meta['tensor_meta']`` and ``node.meta['axes']`` (the axis
    labels, ``labelling.py``) in the same walk.

    Every parameter and buffer is swapped for a meta twin for the run, so a live model's weights
    are neither read nor written (train-mode BatchNorm would otherwise update its running
    statistics) and nothing real is computed.

    Args:
        gm: the traced module; its tensors stay untouched.
        input_shape: full shape including the batch dimension.
        inputs: the placeholders' values in order (meta tensors); default one meta input of ``input_shape``.
        size_argument: how the caller names the input size in messages (``input_size=`` or ``--input-size``).
        input_node: the placeholder that is the model's input (channels-first labels); default the first.

    Raises:
        InputSizeError: a node failed on this size; the message names the node.
        TraceError: a node needs tensor values.
    """
    if input_node is None:
        input_node = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    runner = _Runner(gm, input_shape, size_argument, input_node)
    twins = meta_twins(runner)
    args = tuple(inputs) if inputs is not None else (torch.empty(input_shape, device="meta"),)
    torch.func.functional_call(runner, twins, args, strict=False)


_LONG_AXIS = 1 << 30
"""An axis length no input reaches: a slice empty even there is empty by construction, not by the input."""


def _is_empty(meta: Any) -> bool:
    """Whether a node's first tensor has an axis of size 0 besides the batch."""
    first = first_tensor_meta(meta)
    return first is not None and len(first.shape) >= 2 and 0 in tuple(first.shape)[1:]


def _slices(node: fx.Node) -> list[slice] | None:
    """The constant slices a ``getitem``/ATen ``slice`` node applies, or ``None`` for another op or a bound
    only known at run time."""
    name = op_name(node.target)
    if node.op == "call_function" and name == "getitem" and len(node.args) == 2:
        index = node.args[1]
        parts = index if isinstance(index, tuple) else (index,)
        found = [p for p in parts if isinstance(p, slice)]
    elif node.op == "call_function" and name == "slice":
        # ATen's slice(tensor, dim, start, end, step), export's spelling of a Python slice.
        start, end, step = (tuple(node.args[2:5]) + (None, None, None))[:3]
        found = [slice(start, end, step)]
    else:
        return None
    bounds = [b for p in found for b in (p.start, p.stop, p.step)]
    return found if all(b is None or isinstance(b, int) for b in bounds) else None


def _shrinks_by_input(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node``'s zero-size axis is the traced input's doing: a windowed op (conv, pooling,
    unfold) or a slice that is not empty at any length, applied to a tensor that was not empty."""
    if node.op == "call_module":
        return is_windowed(modules.get(str(node.target)))
    if node.op in ("call_function", "call_method") and (op := lookup(node.target)) is not None and op.windowed:
        return True
    slices = _slices(node)
    # ``q[:, :, :0]`` (timm's prefix tokens when there are none) is empty at every size: the model's choice.
    return bool(slices) and not any(len(range(*s.indices(_LONG_AXIS))) == 0 for s in slices)


def check_spatial(traced: Traced, size_argument: str = "input_size=") -> None:
    """Refuse an input the model shrinks to nothing: an axis computed from the input reaches size 0.

    Only the node that *makes* an empty axis from non-empty tensors is judged, and only a windowed op
    (conv, pooling, unfold) or a slice that is empty because the axis is short, on a tensor computed
    from the input, blames the input. A zero-size tensor the model makes on purpose (smp's
    ``torch.empty(B, 0, H, W)`` placeholder, timm's ``q[:, :, :0]`` when a model has no prefix tokens)
    is left alone, and so is everything computed from it.

    Raises:
        InputSizeError: a windowed op or a slice shrank an axis of the input's data to 0; the message
            names the node.

    Example:
        >>> import torch
        >>> class Placeholder(torch.nn.Module):
        ...     def forward(self, x):
        ...         return torch.empty([x.shape[0], 0, 4, 4]), x
        >>> check_spatial(trace_fx(Placeholder(), (3, 8, 8)))  # made on purpose: no error
    """
    modules = dict(traced.graph_module.named_modules())
    from_input: set[fx.Node] = set()
    for node in traced.graph_module.graph.nodes:
        inputs = node.all_input_nodes
        if node.name == traced.input_node or any(i in from_input for i in inputs):
            from_input.add(node)
        meta = node.meta.get("tensor_meta")
        if not _is_empty(meta) or node not in from_input or node.op == "placeholder":
            continue
        fed = [i for i in inputs if first_tensor_meta(i.meta.get("tensor_meta")) is not None]
        if any(_is_empty(i.meta.get("tensor_meta")) for i in fed) or not _shrinks_by_input(node, modules):
            continue
        first = first_tensor_meta(meta)
        name = traced.qualnames.get(node.name, node.name)
        raise size_error(SizeErrorParts(
            f"input size {traced.input_shape[1:]} is smaller than the model's total stride: node {name!r} "
            f"has shape {tuple(first.shape)}, an axis of size 0.", "pass a larger size", traced.input_shape[1:],
            "is too small",
        ), argument=size_argument)


def first_tensor_meta(meta: Any) -> TensorMetadata | None:
    """The first ``TensorMetadata`` in a ``tensor_meta`` value (dict values in key order), or ``None``."""
    if isinstance(meta, TensorMetadata):
        return meta
    if isinstance(meta, (list, tuple)):
        for value in meta:
            found = first_tensor_meta(value)
            if found is not None:
                return found
    if isinstance(meta, dict):
        for key in sorted(meta, key=str):
            found = first_tensor_meta(meta[key])
            if found is not None:
                return found
    return None


def trace_fx(
    model: nn.Module,
    input_size: Sequence[int],
    options: TraceOptions = TraceOptions(),
    *,
    other_mode: Traced | None = None,
) -> Traced:
    """Trace ``model`` with fx and propagate shapes on meta tensors for an input of ``input_size``.

    The model is never run: fx records its Python on proxies, and the recorded graph runs on meta
    tensors only (weights swapped for meta twins).

    Args:
        model: any ``nn.Module``; on the meta device or live. It is not mutated.
        input_size: the input without the batch dimension, e.g. ``(3, 224, 224)``.
        options: the ``TraceOptions``.
        other_mode: the fx trace of the same model, input and options in the other mode. When the
            model's Python records the same program in both modes (no ``if self.training``, no
            ``F.dropout(x, training=self.training)``: modules such as ``nn.Dropout`` are calls that
            read their own flag when they run), that trace is returned in ``options.mode`` as it is,
            graph module and shapes shared, instead of propagating shapes again.

    Returns:
        A ``Traced`` whose graph nodes carry ``tensor_meta``.

    Raises:
        TraceError: fx cannot trace the model (the module and code line are named), or a node needs values.
        InputSizeError: the model rejects the size, or shrinks it to nothing.
        UsageError: a leaf path names no submodule.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Dropout())
        >>> t = trace_fx(net, (3, 16, 16))
        >>> t.qualnames["_0"], tuple(t.graph_module.graph.find_nodes(op="call_module")[0].meta["tensor_meta"].shape)
        ('0', (2, 8, 14, 14))
        >>> train = trace_fx(net, (3, 16, 16), TraceOptions(mode="train"), other_mode=t)
        >>> train.mode, train.graph_module is t.graph_module  # nn.Dropout reads its flag when it runs
        ('train', True)
    """
    options.check_model(model)
    input_shape = (options.batch_size, *(int(s) for s in input_size))
    call = forward_call(model, options)
    with training_mode(model, options.train):
        graph, tracer = _fx_trace(model, options, call, input_shape)
        if (
            other_mode is not None
            and (other_mode.backend, other_mode.input_shape) == ("fx", input_shape)
            and same_program(graph, other_mode.graph_module.graph)
            and _mode_free_leaves(graph, tracer.root)
        ):
            return dataclasses.replace(other_mode, mode=options.mode)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        inputs = []
        extra = call.example_kwargs("meta")  # fresh twins: an in-place op while tracing cannot reach them
        input_node = next((n.name for n in placeholders if n.target == call.input_name), placeholders[0].name)
        # fx makes one placeholder per forward parameter, in order (a fixed one is renamed ``deep_1``).
        params = call.parameters if len(call.parameters) == len(placeholders) else tuple(str(n.target) for n in placeholders)
        for node, param in zip(placeholders, params):
            if node.name == input_node:
                inputs.append(torch.empty(input_shape, device="meta"))
            elif param in extra:
                inputs.append(extra[param])
            elif param.startswith("*"):
                inputs.append({} if param.startswith("**") else ())
            else:
                inputs.append(node.args[0] if node.args else None)
        propagate_shapes(gm, input_shape, inputs, input_node=input_node)
    qualnames, calls = _fx_names(graph, tracer.node_scope, model)
    notes = specialization_note(tracer.specializations, input_shape)
    traced = finish_trace(model, gm, qualnames, calls, input_shape, options, "fx", input_node, notes)
    return dataclasses.replace(traced, output_type=tracer.output_type(graph))


def same_program(a: fx.Graph, b: fx.Graph) -> bool:
    """Whether two fx graphs hold the same program: node for node the same op, name, target and
    arguments (constants by value, tensors by identity) and the same in-place marks.

    Example:
        >>> import torch
        >>> g = lambda f: fx.symbolic_trace(f).graph
        >>> same_program(g(lambda x: x.relu() + 1), g(lambda x: x.relu() + 1)), same_program(g(lambda x: x + 1), g(lambda x: x + 2))
        (True, False)
    """
    nodes_a, nodes_b = list(a.nodes), list(b.nodes)
    if len(nodes_a) != len(nodes_b):
        return False
    for x, y in zip(nodes_a, nodes_b):
        if (x.op, x.name, x.meta.get(INPLACE_META)) != (y.op, y.name, y.meta.get(INPLACE_META)):
            return False
        if x.target is not y.target and x.target != y.target:
            return False
        if _program_args((x.args, x.kwargs)) != _program_args((y.args, y.kwargs)):
            return False
    return True



def _mode_free_leaves(graph: fx.Graph, root: nn.Module) -> bool:
    """Whether every module the graph calls comes from a package whose modules keep their shapes in both modes."""
    return all(
        is_mode_free(root.get_submodule(str(n.target)))
        for n in graph.find_nodes(op="call_module")
    )


def _program_args(value: Any) -> Any:
    """Arguments as a comparable value: nodes by name, tensors by identity (their ``==`` is elementwise)."""
    if isinstance(value, fx.Node):
        return ("node", value.name)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_program_args(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _program_args(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _program_args((value.start, value.stop, value.step)))
    return (type(value), value)


def finish_trace(
    model: nn.Module,
    gm: fx.GraphModule,
    qualnames: dict[str, str],
    calls: dict[str, tuple[str, int]],
    input_shape: tuple[int, ...],
    options: TraceOptions,
    backend: Backend,
    input_node: str,
    notes: tuple[str, ...] = (),
) -> Traced:
    """The closing step every backend shares: the ``Traced`` record, after refusing an input shrunk to nothing."""
    traced = Traced(
        graph_module=gm,
        qualnames=qualnames,
        input_shape=input_shape,
        mode=options.mode,
        backend=backend,
        module_types=module_types(model),
        module_calls=calls,
        input_node=input_node,
        notes=notes,
    )
    check_spatial(traced)
    return traced
