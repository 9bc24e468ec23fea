"""Stage 1: trace a model with torch.fx and propagate shapes without real compute.

The tracer follows torchvision's ``NodePathTracer`` naming (``layer1.0.conv1``,
``blocks.3.attn.softmax``) so the names users read in autoprobe's output are the
ones they would pass to ``torchvision.models.feature_extraction``. It respects
timm's leaf-module and autowrap-function registries, plus leaves the user names.

Shapes come from running the traced graph either on the meta device (a model
built on meta) or under ``FakeTensorMode`` (a live model): no weights are
allocated, nothing real is computed, and the user's module is never mutated:
its ``training`` flags are restored after tracing.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from .errors import AutoprobeError, InputSizeError, TraceError

__all__ = ["Traced", "trace_model", "default_leaf_modules", "default_autowrap_functions"]

_FX_SUFFIX = re.compile(r"_[0-9]+$")
_PROXY = re.compile(r"Proxy\(\w+\)")


@dataclass(frozen=True)
class Traced:
    """A traced model with shapes on every tensor-producing node.

    Attributes:
        graph_module: the fx GraphModule; its submodules are the user's modules (shared, not copied).
        qualnames: fx node name -> module-qualified name (``layer1.0.add``), unique per graph.
        input_shape: the full input shape used for propagation, batch included.
        mode: ``"train"`` or ``"eval"``, the mode the graph was traced in.
        backend: how the graph was obtained: ``"fx"`` (``trace_model``), ``"export"`` or
            ``"hooks"`` (the fallbacks in ``backends.py``).
        concrete_args: forward arguments fixed to their defaults while tracing.
        module_types: module path -> class name of every submodule of the traced model
            (``""`` is the model itself); the graph module keeps only the called ones.
    """

    graph_module: fx.GraphModule
    qualnames: dict[str, str]
    input_shape: tuple[int, ...]
    mode: str
    backend: str
    concrete_args: tuple[str, ...]
    module_types: dict[str, str] = field(default_factory=dict)


def default_leaf_modules() -> tuple[type[nn.Module], ...]:
    """Module classes fx must not trace through: timm's registry.

    torchvision's feature extractor also keeps every ``torchvision.ops`` module whole; autoprobe
    does not, because ``Conv2dNormActivation`` and ``SqueezeExcitation`` are plain, traceable
    blocks whose insides (the conv, the norm, the activation) are exactly what detectors read.
    """
    leaves: list[type[nn.Module]] = []
    with contextlib.suppress(ImportError):
        from timm.layers import get_notrace_modules

        leaves.extend(get_notrace_modules())
    return tuple(dict.fromkeys(leaves))


def default_autowrap_functions() -> tuple[Callable[..., Any], ...]:
    """Functions fx records as single calls: timm's registry (shape-dependent helpers)."""
    with contextlib.suppress(ImportError):
        from timm.layers import get_notrace_functions

        return tuple(dict.fromkeys(get_notrace_functions()))
    return ()


class _QualnameTracer(fx.Tracer):
    """fx.Tracer that records a module-qualified name for every node it creates.

    Same names as torchvision's ``NodePathTracer`` but O(1) per node (it keeps a
    counter per name instead of rescanning every earlier name), which matters
    for models with tens of thousands of nodes.
    """

    def __init__(
        self,
        leaf_modules: Sequence[type[nn.Module]],
        leaf_paths: Sequence[str],
        autowrap_functions: Sequence[Callable[..., Any]],
    ) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions), autowrap_modules=(__import__("math"),))
        self._leaf_types = tuple(leaf_modules)
        self._leaf_paths = frozenset(leaf_paths)
        self.current_qualname = ""
        self.failed_at: str | None = None
        self.node_to_qualname: dict[fx.Node, str] = {}
        self._name_counts: dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_paths or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        previous = self.current_qualname
        try:
            self.current_qualname = self.path_of_module(m)
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # Remember the innermost module that failed; `finally` unwinds the name below.
            if self.failed_at is None:
                self.failed_at = self.current_qualname
            raise
        finally:
            self.current_qualname = previous

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):  # noqa: ANN001
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
        self.node_to_qualname[proxy.node] = self._qualname(proxy.node)
        return proxy

    def _qualname(self, node: fx.Node) -> str:
        if node.op == "call_module":
            base = str(node.target)
        else:
            # fx suffixes names globally (add_17); torchvision scopes them to the parent module.
            local = _FX_SUFFIX.sub("", node.name)
            base = f"{self.current_qualname}.{local}" if self.current_qualname else local
        count = self._name_counts.get(base, 0)
        self._name_counts[base] = count + 1
        return base if count == 0 else f"{base}_{count}"


@contextlib.contextmanager
def _training_mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put ``model`` in train/eval mode and restore every submodule's own flag afterwards."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def _concrete_args(model: nn.Module) -> dict[str, Any]:
    """Fix every optional forward argument after the first to its default.

    ``forward(x, mask=None)`` would otherwise be traced with a Proxy for ``mask``,
    recording the ``mask is not None`` branch (timm's hiera does this).
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    concrete: dict[str, Any] = {}
    for param in params[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is param.empty:
            raise TraceError(
                f"{type(model).__name__}.forward needs argument {param.name!r} besides the input; "
                "autoprobe feeds one tensor. Wrap the model in a module whose forward takes only the input."
            )
        if param.default is None or isinstance(param.default, (bool, int, float, str)):
            concrete[param.name] = param.default
    return concrete


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
    model: nn.Module,
    leaf_modules: Sequence[type[nn.Module]],
    leaf_paths: Sequence[str],
    autowrap_functions: Sequence[Callable[..., Any]],
    concrete: dict[str, Any],
) -> tuple[fx.GraphModule, dict[str, str]]:
    tracer = _QualnameTracer(leaf_modules, leaf_paths, autowrap_functions)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as exc:  # fx raises anything the model's Python raises on a Proxy
        path = tracer.failed_at or ""
        module = model.get_submodule(path) if path else model
        cls = f"{type(module).__module__}.{type(module).__qualname__}"
        hint = (
            f"register it as a leaf so fx records it as one call: `--leaf {path}` on the CLI "
            f"or `leaf_paths=[{path!r}]` in Python."
            if path
            else "the model's own forward cannot be traced; wrap the untraceable part in a submodule "
            "and pass that submodule with `--leaf`."
        )
        raise TraceError(
            f"torch.fx could not trace module {path or '<top level>'!r} ({cls}) at {_user_frame(exc)}: "
            f"{type(exc).__name__}: {exc}\nHint: {hint}"
        ) from exc
    graph_module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    qualnames = {node.name: tracer.node_to_qualname.get(node, node.name) for node in graph.nodes}
    return graph_module, qualnames


class _ShapeProp(fx.Interpreter):
    """Record ``TensorMetadata`` on ``node.meta['tensor_meta']`` for every node.

    Unlike ``torch.fx.passes.shape_prop.ShapeProp`` it prints nothing and turns a
    failing node into an ``InputSizeError`` that shows the node.
    """

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
        super().__init__(gm)
        self.input_shape = input_shape

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            if _needs_values(exc):
                error: AutoprobeError = TraceError(
                    f"node {n.name} ({n.op} {_target_name(n)}) needs real tensor values "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0]}): autoprobe propagates shapes "
                    "without computing anything.\nHint: make its control flow depend on shapes, not values, "
                    "or give autoprobe a model without data-dependent branches."
                )
                error.message = error.args[0]
                raise error from exc
            # An assert's message was formatted while tracing, so its numbers read ``Proxy(getitem_2)``.
            reason = _PROXY.sub("<traced value>", str(exc).splitlines()[0]) if str(exc) else ""
            error = InputSizeError(
                f"input size {self.input_shape[1:]} does not fit the model: node {n.name} "
                f"({n.op} {_target_name(n)}) failed with {type(exc).__name__}: {reason}\n"
                "Hint: pass the size the model was built for, e.g. `--input-size 3,224,224`."
            )
            error.message = error.args[0]  # fx's Interpreter rewrites args with its own notes
            raise error from exc
        meta = fx.node.map_aggregate(
            result, lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v
        )
        if _has_tensor(meta):
            n.meta["tensor_meta"] = meta
        return result


def _needs_values(exc: BaseException) -> bool:
    """An error from reading a value (``.item()``, ``bool(t)``) that a meta tensor does not have."""
    text = str(exc)
    return "meta tensors" in text or "data-dependent" in text.lower() or "Cannot access data pointer" in text


def _target_name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _has_tensor(meta: Any) -> bool:
    if isinstance(meta, TensorMetadata):
        return True
    if isinstance(meta, (list, tuple)):
        return any(_has_tensor(v) for v in meta)
    if isinstance(meta, dict):
        return any(_has_tensor(v) for v in meta.values())
    return False


class _Runner(nn.Module):
    """Lets ``torch.func.functional_call`` swap tensors in while the interpreter runs."""

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.gm = gm
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> Any:
        return _ShapeProp(self.gm, self.input_shape).run(x)


def propagate_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    """Run ``gm`` on meta tensors of ``input_shape``, filling ``node.meta['tensor_meta']``.

    Every parameter and buffer is swapped for a meta twin for the run, so a live
    model's weights are neither read nor written (train-mode BatchNorm would
    otherwise update its running statistics) and nothing real is computed.

    Args:
        gm: the traced module; its tensors stay untouched.
        input_shape: full shape including the batch dimension.
    """
    runner = _Runner(gm, input_shape)
    twins = {
        name: torch.empty_like(t, device="meta")
        for name, t in (*runner.named_parameters(remove_duplicate=False), *runner.named_buffers(remove_duplicate=False))
    }
    try:
        torch.func.functional_call(runner, twins, (torch.empty(input_shape, device="meta"),), strict=False)
    except (InputSizeError, TraceError) as exc:
        # fx's Interpreter appends its own notes to the exception; re-raise with only our message.
        raise type(exc)(getattr(exc, "message", str(exc))) from exc.__cause__


def trace_model(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    train: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    leaf_paths: Sequence[str] = (),
    batch_size: int = 2,
) -> Traced:
    """Trace ``model`` with fx and propagate shapes for an input of ``input_size``.

    Args:
        model: any ``nn.Module``; on the meta device or live. It is not mutated.
        input_size: the input without the batch dimension, e.g. ``(3, 224, 224)``.
        train: trace the training-mode graph (dropout, drop-path, BN in train mode).
        leaf_modules: extra module classes to keep as single nodes.
        leaf_paths: extra module paths (``"blocks.3.attn"``) to keep as single nodes.
        batch_size: batch used for shapes; 2 keeps BatchNorm's train-mode check happy.

    Returns:
        A ``Traced`` whose graph nodes carry ``tensor_meta``.

    Example:
        >>> import torch
        >>> t = trace_model(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), (3, 16, 16))
        >>> t.qualnames["_0"], tuple(t.graph_module.graph.find_nodes(op="call_module")[0].meta["tensor_meta"].shape)
        ('0', (2, 8, 14, 14))
    """
    input_shape = (batch_size, *(int(s) for s in input_size))
    concrete = _concrete_args(model)
    leaves = (*default_leaf_modules(), *leaf_modules)
    with _training_mode(model, train):
        gm, qualnames = _fx_trace(model, leaves, leaf_paths, default_autowrap_functions(), concrete)
        propagate_shapes(gm, input_shape)
    return Traced(
        graph_module=gm,
        qualnames=qualnames,
        input_shape=input_shape,
        mode="train" if train else "eval",
        backend="fx",
        concrete_args=tuple(sorted(concrete)),
        module_types={name: type(module).__name__ for name, module in model.named_modules()},
    )
