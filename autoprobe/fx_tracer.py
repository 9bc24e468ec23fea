"""The fx tracer of stage 1: module-qualified scopes, and Python control flow on shapes specialized.

``QualnameTracer`` is a ``torch.fx.Tracer`` that records which module's forward made every node (the
scope ``NodeNamer`` names nodes by) and whose proxies can be read as values when the value follows
from shapes alone: ``if h % 16``, ``assert x.shape[1] == C``, ``range(x.size(0))``, ``x.ndim != 4``.
Such a read evaluates the node's ancestors on meta tensors at the traced size, fixes the graph to
that size, and is recorded as a ``Specialization`` (``specialization_note`` words it for the
selection's notes and the lock). Control flow on tensor *values* still fails, so those models go
down the fallback ladder (``backends.py``).

The override map, after fx's ``Tracer``:

- ``proxy``: makes ``_ShapeProxy`` objects (``bool``/``int``/``len``/``iter``/``format`` ask the tracer);
- ``to_bool`` / ``iter``: evaluate the proxy at the traced size (``concrete``);
- ``call_module`` / ``getattr``: scope bookkeeping; plain values while evaluating;
- ``create_arg``: remembers a returned dict subclass (a Hugging Face ``ModelOutput``, ``output_type``);
- ``create_args_for_root``: calls a ``functools.wraps`` forward with ``*args``/``**kwargs`` as such.

Example:
    >>> import torch
    >>> class Checked(torch.nn.Module):
    ...     def forward(self, x):
    ...         if x.shape[-1] % 8:  # a shape check, like smp's check_input_shape
    ...             raise ValueError("size")
    ...         return x.relu()
    >>> tracer = QualnameTracer((), (), (), {"x": torch.empty(2, 3, 16, 16, device="meta")})
    >>> graph = tracer.trace(Checked())
    >>> tracer.drop_reads(graph)  # the shape reads were used as constants: the graph no longer needs them
    >>> [n.op for n in graph.nodes], [s.how for s in tracer.specializations]
    (['placeholder', 'call_method', 'output'], ['bool'])
"""

from __future__ import annotations

import dis
import functools
import inspect
import operator
import sys
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable

import torch
from torch import fx, nn

from .meta import meta_twins
from .ops import is_library_leaf

__all__ = ["QualnameTracer", "Specialization", "INPLACE_META", "specialization_note"]


class _NoValue(Exception):
    """A traced value cannot be read at the traced size; the message says why (fx then fails as it always did)."""


_DEVICE_READS = frozenset({"device", "is_cuda", "is_cpu", "is_mps", "is_xpu", "is_meta", "get_device"})
"""Attributes and methods whose value on meta (device ``meta``) is not the value of a real run."""

_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.Size)


def _is_plain(value: Any) -> bool:
    """A Python value read from shapes, sizes and dtypes: no tensor anywhere in it."""
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


@dataclass(frozen=True)
class Specialization:
    """One place where the model's Python read a traced value, fixing the graph to the traced size.

    Attributes:
        site: ``module:line`` of the model code that read it (module names, not file paths, so
            notes are the same on every machine).
        how: how Python read it: ``bool`` (a branch or an assert), ``int``, ``float``, ``index``
            (``range(n)``, a size argument), ``len`` or ``iter`` (a loop over a shape or a batch).
    """

    site: str
    how: str

    def __str__(self) -> str:
        return f"{self.site} ({self.how})"


_ISINSTANCE_HELPERS = frozenset({"torch.jit", "torch._jit_internal"})
"""Modules whose frames stand between a model's ``torch.jit.isinstance(x, T)`` and Python's ``isinstance``."""


def _is_model_code(frame: Any) -> bool:
    """Whether ``frame`` runs the model's code, not torch's or autoprobe's (``_model_site``'s rule)."""
    module = str(frame.f_globals.get("__name__", ""))
    return not (module == "torch" or module.startswith(("torch.", "autoprobe.", "builtins")))


class _ShapeProxy(fx.Proxy):
    """An fx Proxy that Python may read as a value when the value follows from shapes alone.

    fx's own Proxy refuses ``bool``, ``int``, ``len`` and ``iter``; this one asks the tracer, which
    evaluates the node on meta tensors at the traced size (``QualnameTracer.concrete``).
    """

    def __getattr__(self, k: str) -> "_ShapeAttribute":
        return _ShapeAttribute(self, k)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        # ``isinstance(x, torch.Tensor)`` (``torch.jit.isinstance`` too) in the model's code must take the
        # branch the model takes: a plain Proxy answers False, and fx records another program (MONAI's
        # BasicUNetPlusPlus). isinstance reads ``__class__`` when the type itself does not match; fx and
        # torch keep seeing a Proxy (their frames are skipped), so create_arg never takes it for a constant.
        caller = sys._getframe(1)
        while caller is not None and caller.f_globals.get("__name__") in _ISINSTANCE_HELPERS:
            caller = caller.f_back
        if caller is not None and _is_model_code(caller) and self.tracer.is_tensor(self):  # type: ignore[attr-defined]
            return torch.Tensor
        return type(self)

    def __len__(self) -> int:
        return len(self.tracer.concrete(self, "len"))  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Any]:
        # fx's Proxy.__iter__, with the caller's bytecode disassembled once per code object: fx
        # disassembles the whole calling function on every `q, k, v = t.unbind(0)` or `B, N, C = x.shape`,
        # which was half of a ViT's trace (12 blocks x 2 unpackings x ~300 instructions).
        caller = inspect.currentframe().f_back  # type: ignore[union-attr]
        offsets, instructions = _instructions(caller.f_code)  # type: ignore[union-attr]
        here = instructions[bisect_left(offsets, caller.f_lasti)]  # type: ignore[union-attr]
        if here.opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(here.argval))
        return self.tracer.iter(self)

    def __index__(self) -> int:
        return operator.index(self.tracer.concrete(self, "index"))  # type: ignore[attr-defined]

    def __int__(self) -> int:
        return int(self.tracer.concrete(self, "int"))  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return float(self.tracer.concrete(self, "float"))  # type: ignore[attr-defined]

    def __format__(self, spec: str) -> str:
        # An f-string of a size (smp's "Wrong input shape height={h}") reads its value; fx's own
        # Proxy would print ``Proxy(getitem_1)``. A value that cannot be read keeps that form. Not a
        # specialization: timm formats sizes into the messages of asserts fx records symbolically.
        try:
            return format(self.tracer.concrete(self, "format", record=False), spec)  # type: ignore[attr-defined]
        except fx.proxy.TraceError:
            return format(repr(self), spec)


@functools.lru_cache(maxsize=1024)
def _instructions(code: Any) -> tuple[tuple[int, ...], tuple[dis.Instruction, ...]]:
    """A code object's instructions and their offsets (bounded cache: code objects of traced forwards)."""
    instructions = tuple(dis.get_instructions(code))
    return tuple(i.offset for i in instructions), instructions


INPLACE_META = "autoprobe_inplace"
"""``node.meta`` key of a node traced from the model's ``x += y`` (``-=``, ``*=``, ...): the in-place operator.

fx's Proxy has no in-place operators, so Python runs ``x += y`` as ``x = x + y`` and the trace holds an
out-of-place ``add``. The node stays that ``add`` (its name and op are what analysis, the lock and the
detectors read); the meta key lets the fx engine run it in place again, as the model does. Out of place,
every residual block of a ResNet allocates and page-faults a fresh block-output-sized tensor.
"""

# (out-of-place operator, in-place operator, the Proxy method Python calls for the in-place form)
_INPLACE_OPERATORS = tuple(
    (getattr(operator, name), getattr(operator, "i" + name.rstrip("_")), f"__i{name.rstrip('_')}__")
    for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "lshift", "rshift", "and_", "or_", "xor")
)


def _traced_inplace(out_of_place: Callable[[Any, Any], Any], in_place: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        proxy = self.tracer.create_proxy("call_function", out_of_place, (self, other), {})
        proxy.node.meta[INPLACE_META] = in_place
        return proxy

    return method


for _out_of_place, _in_place, _method in _INPLACE_OPERATORS:
    setattr(_ShapeProxy, _method, _traced_inplace(_out_of_place, _in_place))


class _ShapeAttribute(fx.proxy.Attribute, _ShapeProxy):
    """fx's lazy attribute proxy (``x.ndim``, ``x.size``) with ``_ShapeProxy``'s value reads."""


class QualnameTracer(fx.Tracer):
    """fx.Tracer that records the scope (owning module path) of every node it creates, and
    specializes Python control flow on shapes to the traced input.

    Shape specialization, the technique of ``torch.fx.experimental.meta_tracer``, Hugging Face's
    ``HFTracer`` and ColossalAI's ``ColoTracer``, done lazily: nodes stay symbolic (``x.shape[1]``
    is a ``getitem`` node, as in plain fx), and only when the model's Python needs a value
    (``if h % 16``, ``assert x.shape[1] == C``, ``range(x.size(0))``, ``int(n ** 0.5)``) does the
    tracer evaluate that node's ancestors on meta tensors at the traced size. The value is used if
    it is a plain Python value (a bool, an int, a ``torch.Size``, a dtype); a tensor (``x.sum() > 0``)
    or anything read from a device is refused with fx's own error, so such models go down the
    ladder as before. Each read is recorded in ``specializations``. A model whose Python never
    reads a traced value traces exactly as with plain fx, and nothing is evaluated.
    """

    def __init__(
        self,
        leaf_modules: Sequence[type[nn.Module]],
        leaf_paths: Sequence[str],
        autowrap_functions: Sequence[Callable[..., Any]],
        inputs: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions), autowrap_modules=(__import__("math"),))
        self._leaf_types = tuple(leaf_modules)
        self._leaf_paths = frozenset(leaf_paths)
        self.current_qualname = ""
        self.failed_at: str | None = None
        self.node_scope: dict[fx.Node, str] = {}
        self.specializations: list[Specialization] = []
        self._inputs = inputs
        self._values: dict[fx.Node, Any] = {}
        self._order: dict[fx.Node, int] = {}
        self._evaluator: _MetaEvaluator | None = None
        self._device_dependent: set[fx.Node] = set()
        self._tensor_paths: tuple[dict[int, str], dict[int, str]] | None = None
        self._evaluating = False
        self._dict_types: list[tuple[tuple[Any, ...], type]] = []
        self._shape_leaf: nn.Module | None = None
        self._shape_nodes: dict[fx.Node, bool] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_paths or isinstance(m, self._leaf_types) or m is self._shape_leaf:
            return True
        if is_library_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        if self._evaluating:
            # A leaf module run on meta tensors to read a value: run it, record nothing.
            return forward(*args, **kwargs)
        previous, outer_leaf = self.current_qualname, self._shape_leaf
        try:
            self.current_qualname = self.path_of_module(m)
            if self._of_shapes_only(args, kwargs):
                self._shape_leaf = m  # called with sizes only (BEiT's relative position bias): one call, as a leaf
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # Remember the innermost module that failed; `finally` unwinds the name below.
            if self.failed_at is None:
                self.failed_at = self.current_qualname
            raise
        finally:
            self.current_qualname, self._shape_leaf = previous, outer_leaf

    def _of_shapes_only(self, args: Any, kwargs: Any) -> bool:
        """Whether a module call's traced arguments are all sizes read from shapes (``x.shape[2] // 16``), with at
        least one: such a module computes from its parameters and those sizes, often in Python fx cannot trace (item
        assignment into an index table), so it is recorded as one call; the graph module calls it with the sizes."""
        found: list[fx.Node] = []
        fx.node.map_aggregate((args, kwargs), lambda a: found.append(a.node) if isinstance(a, fx.Proxy) else None)
        return bool(found) and all(self._shape_valued(n) for n in found)

    def _shape_valued(self, node: fx.Node) -> bool:
        """A node computed from tensors' sizes only: ``x.shape``/``x.size()``/``x.dim()`` and Python arithmetic or
        indexing on such values (memoized)."""
        known = self._shape_nodes.get(node)
        if known is None:
            if node.op == "call_function" and node.target is getattr:
                known = len(node.args) > 1 and node.args[1] in ("shape", "ndim")
            elif node.op == "call_method" and node.target in ("size", "dim"):
                known = True
            elif node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
                known = bool(node.all_input_nodes) and all(self._shape_valued(i) for i in node.all_input_nodes)
            else:
                known = False
            self._shape_nodes[node] = known
        return known

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's rule (a parameter, then a buffer, of the root becomes a ``get_attr`` node named by its first
        path), found by identity in a table built once: fx scans every parameter per access, which is
        quadratic in models that read parameters directly (ConvNeXt's layer scales, ViT's embeddings)."""
        if self._evaluating or not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._tensor_paths is None:
            params: dict[int, str] = {}
            buffers: dict[int, str] = {}
            for name, param in self.root.named_parameters():
                params.setdefault(id(param), name)
            for name, buffer in self.root.named_buffers():
                buffers.setdefault(id(buffer), name)
            self._tensor_paths = (params, buffers)
        params, buffers = self._tensor_paths
        name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        lowered = super().create_arg(a)
        # fx lowers a dict subclass (a Hugging Face ModelOutput) to a plain dict; remember its class so
        # the instrumented graph can hand back the model's own object (``output_type``).
        if isinstance(a, dict) and type(a) is not dict:
            self._dict_types.append((tuple(a), type(a)))
        return lowered

    def output_type(self, graph: fx.Graph) -> type | None:
        """The dict subclass the traced forward returned, which fx lowered to a plain dict; else ``None``."""
        returned = graph.output_node().args[0]
        if not isinstance(returned, dict):
            return None
        keys = tuple(returned)
        return next((cls for fields, cls in reversed(self._dict_types) if fields == keys), None)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):  # noqa: ANN001
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
        self.node_scope[proxy.node] = self.current_qualname
        self._order.setdefault(proxy.node, len(self._order))
        return proxy

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None) -> tuple[Any, list[Any]]:
        """fx's placeholders, read from the innermost function; a ``functools.wraps`` decorator around a
        forward with ``*args``/``**kwargs`` (Hugging Face's ``can_return_tuple``) is still called as such.

        fx rewrites the *wrapper*'s code to take the inner function's arguments positionally, which
        hands the wrapper's ``**kwargs`` a positional value; here the wrapper gets them by kind.
        """
        inner = inspect.unwrap(root_fn)
        code = getattr(inner, "__code__", None)
        if inner is root_fn or code is None or not code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS):
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        _, args = super().create_args_for_root(inner, is_module, concrete_args)
        positional = code.co_argcount
        keyword_only = code.co_varnames[positional:positional + code.co_kwonlyargcount]

        def call_wrapper(*flat: Any) -> Any:
            # The ``*args``/``**kwargs`` placeholders stay unused: autoprobe passes nothing there.
            named = dict(zip(keyword_only, flat[positional:positional + len(keyword_only)]))
            return root_fn(*flat[:positional], **named)

        return call_wrapper, args

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj, "bool"))

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        node = obj.node
        value = self._value(node, "iter")
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            count = value.shape[0]  # a loop over a tensor's rows depends on its size only
        elif isinstance(value, (tuple, list)) and _is_plain(value):
            count = len(value)
        else:
            raise fx.proxy.TraceError(
                f"Proxy object cannot be iterated: {node.name} is not a sequence read from shapes ({type(value).__name__})"
            )
        self._record("iter")
        return iter([obj[i] for i in range(count)])

    def is_tensor(self, obj: fx.Proxy) -> bool:
        """Whether ``obj`` stands for a tensor, for the model's ``isinstance(x, torch.Tensor)``: its value on meta.

        Not a specialization: a value's type does not depend on the traced size.

        Raises:
            torch.fx.proxy.TraceError: the value cannot be evaluated on meta, so the branch the model takes
                is unknown; fx fails, and the ladder goes on to export (the notes say why).
        """
        if self._evaluating:
            return False
        node = obj.node
        try:
            self._value(node, "isinstance")
        except fx.proxy.TraceError:
            if node not in self._values:  # a device read only taints a value; a tensor is still a tensor
                raise fx.proxy.TraceError(
                    f"isinstance of a traced value cannot be answered: {node.name} cannot be evaluated on meta, "
                    "so the branch the model takes is unknown"
                ) from None
        return isinstance(self._values[node], torch.Tensor)

    def concrete(self, obj: fx.Proxy, how: str, *, record: bool = True) -> Any:
        """The value of ``obj`` at the traced size, for Python that needs it (``bool``, ``int``, ``len``).

        Raises:
            torch.fx.proxy.TraceError: the value is a tensor's data, depends on a device, or cannot be
                evaluated on meta; fx fails as it does without shape specialization.
        """
        node = obj.node
        value = self._value(node, how)
        if not _is_plain(value):
            raise fx.proxy.TraceError(
                "symbolically traced variables cannot be used as inputs to control flow: "
                f"{node.name} is {type(value).__name__}-valued, not read from shapes"
            )
        if record:
            self._record(how)
        return value

    def drop_reads(self, graph: fx.Graph) -> None:
        """Remove the nodes evaluated only to read a value (``x.shape``, ``h % 16``): the graph used
        their values as constants, so nothing uses them and they would read as ops of the model."""
        for node in sorted(self._values, key=lambda n: -self._order.get(n, -1)):
            if node.op != "placeholder" and not node.users and node.graph is graph:
                graph.erase_node(node)

    def _record(self, how: str) -> None:
        self.specializations.append(Specialization(_model_site(), how))

    def _value(self, node: fx.Node, how: str) -> Any:
        if node not in self._values:
            needed: dict[fx.Node, None] = {}
            stack = [node]
            while stack:
                current = stack.pop()
                if current not in self._values and current not in needed:
                    needed[current] = None
                    stack.extend(current.all_input_nodes)
            for current in sorted(needed, key=lambda n: self._order.get(n, -1)):
                try:
                    value = self._values[current] = self._evaluate(current)
                except _NoValue as exc:
                    raise fx.proxy.TraceError(
                        f"symbolically traced variables cannot be used as inputs to control flow: {node.name} "
                        f"({how}) {exc}"
                    ) from None
                # A device read on meta is ``meta``, not the real device; a tensor made on that device
                # still has the right shape, so the taint stops at tensors.
                if _reads_device(current) or (
                    not isinstance(value, torch.Tensor) and any(i in self._device_dependent for i in current.all_input_nodes)
                ):
                    self._device_dependent.add(current)
        if node in self._device_dependent:
            raise fx.proxy.TraceError(
                f"symbolically traced variables cannot be used as inputs to control flow: {node.name} ({how}) "
                "depends on a tensor's device, which tracing on meta cannot know"
            )
        return self._values[node]

    def _evaluate(self, node: fx.Node) -> Any:
        """``node``'s value on meta tensors at the traced size (its inputs are evaluated already)."""
        if self._evaluator is None:
            self._evaluator = _MetaEvaluator(self.root, node.graph, self._inputs, self._values)
        self._evaluating = True
        try:
            return self._evaluator.run_node(node)
        except _NoValue:
            raise
        except Exception as exc:  # any op that meta tensors cannot run, or that needs data (.item())
            raise _NoValue(f"cannot be evaluated on meta ({type(exc).__name__} at {node.name}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        finally:
            self._evaluating = False


class _MetaEvaluator(fx.Interpreter):
    """The values of the nodes fx is recording, on meta tensors at the traced size, for ``QualnameTracer.concrete``.

    An ``fx.Interpreter`` over the graph being traced whose ``env`` is the tracer's table of values, so a
    node is run once its inputs are there (``QualnameTracer._value`` runs them in order). The override map:

    - ``placeholder``: the traced input by parameter name (``*args``/``**kwargs`` are empty: autoprobe
      passes nothing there); another argument's value is unknown;
    - ``get_attr``: a meta twin of a tensor attribute (the model's own is never read);
    - ``call_module``: the module on meta twins of its weights (``torch.func.functional_call``);
    - ``call_function`` / ``call_method``: the Interpreter's own.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, inputs: Mapping[str, Any], values: dict[fx.Node, Any]) -> None:
        super().__init__(root, garbage_collect_values=False, graph=graph)
        self.extra_traceback = False
        self.env = values
        self._inputs = inputs
        self._twins: dict[str, dict[str, torch.Tensor]] = {}

    def placeholder(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        name = str(target)
        if name.startswith("*"):
            return {} if name.startswith("**") else ()
        if name not in self._inputs:
            raise _NoValue(f"depends on argument {name!r}, whose value tracing does not know")
        return self._inputs[name]

    def get_attr(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = self.fetch_attr(str(target))
        return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        path = str(target)
        module = self.module.get_submodule(path)
        if path not in self._twins:
            self._twins[path] = meta_twins(module)
        return torch.func.functional_call(module, self._twins[path], tuple(args), dict(kwargs), strict=False)

    def output(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise _NoValue("is the graph's output")


def _reads_device(node: fx.Node) -> bool:
    """Whether ``node`` reads a tensor's device (``x.device``, ``x.is_cuda``, ``x.get_device()``)."""
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] in _DEVICE_READS
    return node.op == "call_method" and node.target in _DEVICE_READS


def _model_site() -> str:
    """``module:line`` of the innermost frame outside torch and autoprobe: the model code reading a value."""
    frame = inspect.currentframe()
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if not (module == "torch" or module.startswith(("torch.", "autoprobe.", "builtins"))):
            return f"{module}:{frame.f_lineno}"
        frame = frame.f_back
    return "unknown"


def specialization_note(specializations: Sequence[Specialization], input_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The selection's note for a graph fixed to the traced input, or nothing when Python read no traced value."""
    if not specializations:
        return ()
    sites = list(dict.fromkeys(str(s) for s in specializations))
    shown = ", ".join(sites[:4]) + (f" and {len(sites) - 4} more" if len(sites) > 4 else "")
    return (
        f"fx specialized the graph to input shape {input_shape}: the model's Python read shapes or dtypes of traced "
        f"tensors at {shown}; the branches taken and sizes read hold for this size only",
    )
