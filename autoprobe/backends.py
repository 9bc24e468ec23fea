"""The tracing fallback ladder: fx first, then ``torch.export``, then forward hooks.

torch.fx records Python symbolically, so any forward that branches on a
tensor (``if x.ndim == 4``, ``if x.sum() > 0``) or hands a Proxy to code that
needs a real value stops it. Users bring such models, and a tool that only
works where fx works would quietly exclude them. So ``analyze`` climbs a ladder,
in this order, and the first rung that yields a layer graph wins:

1. ``fx``: ``trace.trace_fx`` with timm's leaf modules and autowrap
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
   computed from and propagates each tensor's axis labels (``axes.py``). It yields a
   coarse graph of module calls in execution order with their shapes and layouts.
   It runs on meta: the input and meta twins of every weight, so nothing is computed.
   Only a forward that reads tensor *values* (``if x.sum() > 0``) needs more, and then
   only with ``TraceOptions.allow_real_data=True``: one real forward pass of the live
   model (seeded random batch, ``no_grad``, buffers cloned), noted in the selection.
   Without that option such a model is refused with a message that names it.

A fallback is never silent: ``LadderResult.failed`` keeps every rung that
failed with its reason, ``LadderResult.notes`` says it in words, and the
backend used is recorded on the ``Traced``, the ``LayerGraph`` and the
``Selection``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .errors import AutoprobeError, InputSizeError, RealDataNeeded, TraceError, UsageError
from .axes import AxisEnv, Labels, input_axes, propagate
from .graph import LayerGraph, build_layer_graph
from .labelling import Labeller
from .ops import is_leaf_module, op_name, shown_name
from .meta import ValueReadCheck, ValuesNeeded, device_of, meta_twins, needs_values, seeded_run
from .trace import (
    Backend,
    Example,
    Mode,
    NodeNamer,
    TraceOptions,
    Traced,
    finish_trace,
    forward_call,
    has_tensor,
    module_types,
    tensor_meta,
    trace_fx,
    training_mode,
)

__all__ = [
    "LADDER",
    "Attempt",
    "LadderResult",
    "ModelTrace",
    "trace_with_fallbacks",
    "trace_export",
    "trace_hooks",
]

LADDER: tuple[Backend, ...] = ("fx", "export", "hooks")
"""Backends in the order they are tried."""


@dataclass(frozen=True)
class Attempt:
    """A rung of the ladder that failed.

    Attributes:
        backend: ``fx``, ``export`` or ``hooks``.
        error: the exception's class name.
        reason: its message, first line only (the full one is chained on the final error).
    """

    backend: Backend
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
        before: notes of an earlier climb whose graph was not usable (``trace_with_fallbacks(usable=)``).
        after: the note that a finer climb was tried and this graph kept.
    """

    traced: Traced
    graph: LayerGraph
    failed: tuple[Attempt, ...]
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    @property
    def backend(self) -> Backend:
        return self.traced.backend

    @property
    def notes(self) -> tuple[str, ...]:
        """One plain sentence per fallback taken, for ``Selection.notes``."""
        notes = [*self.before, *(f"backend {a.backend} failed ({a.error}: {_clip(a.reason, 240)})" for a in self.failed)]
        if self.failed:
            notes.append(f"fell back to backend {self.backend}")
        if self.backend == "hooks":
            notes.append(
                "hooks backend: a coarse graph of leaf-module calls; functional ops between modules "
                "(residual adds, reshapes) are not nodes"
            )
        notes.extend(self.traced.notes)
        return (*notes, *self.after)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class _Rung(NamedTuple):
    """One backend's trace of one mode and its layer graph."""

    traced: Traced
    graph: LayerGraph


_OTHER_MODE: dict[str, Mode] = {"train": "eval", "eval": "train"}


class ModelTrace:
    """One model's tracing for one call: the model, the input size and the options, and per mode each
    backend's trace, layer graph and example output, each made once and then remembered.

    It is the one place that traces. ``analyze`` climbs the fallback ladder through it (``ladder``),
    ``Analysis.trace`` carries it, ``instrument`` asks it for the selection's backend in both modes,
    the fx engine is built from its traces, and unpickling a probed model asks a fresh one. So a call
    that selects and instruments traces each mode once: on fx the eval trace the selection was made on
    is the one tapped, and the train trace beside it is compared with it and shared when the model's
    Python records the same program in both modes (``trace_fx``'s ``other_mode``: one propagation,
    one layer graph); on export and hooks the model's Python runs once per mode, and the example output
    is read from that run's graph (or its output), not from another run. What it remembers is bounded:
    one trace per mode and backend (six at most) and what was built from them.

    Args:
        model: any ``nn.Module``, on meta or live; not mutated (its modes and attributes are restored
            after every trace, see ``trace.training_mode``).
        input_size: the input without batch, e.g. ``(3, 224, 224)``.
        options: the ``TraceOptions``; its ``mode`` is the ladder's when ``ladder`` is given none, and every
            other query names its mode.

    Raises:
        UsageError: ``options`` is not a ``TraceOptions``, or a leaf path names no submodule of ``model``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Dropout())
        >>> trace = ModelTrace(net, (3, 16, 16))
        >>> trace.ladder().backend, trace.graph("train", "fx") is trace.graph("eval", "fx")
        ('fx', True)
        >>> trace.example("train", "fx").output.shape
        torch.Size([2, 8, 14, 14])
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int], options: TraceOptions = TraceOptions()) -> None:
        if not isinstance(options, TraceOptions):
            raise UsageError(f"options must be an autoprobe TraceOptions, not {type(options).__name__}.\n"
                             "Hint: pass options=autoprobe.TraceOptions(...).")
        options.check_model(model)
        self.model = model
        self.input_size = tuple(int(s) for s in input_size)
        self.options = options
        self._rungs: dict[tuple[str, str], _Rung] = {}
        self._examples: dict[tuple[str, str], Example] = {}

    def __repr__(self) -> str:
        made = ", ".join(f"{m}/{b}" for m, b in self._rungs) or "nothing yet"
        return f"ModelTrace({type(self.model).__name__}, input_size={self.input_size}, traced: {made})"

    def traced(self, mode: Mode, backend: Backend) -> Traced:
        """The ``backend``'s trace of the model in ``mode``, traced on the first ask.

        Raises:
            TraceError, InputSizeError: that backend cannot trace the model at this size.
        """
        return self._rung(mode, backend).traced

    def graph(self, mode: Mode, backend: Backend) -> LayerGraph:
        """The layer graph of ``traced(mode, backend)``; one graph for both modes where fx shares their trace."""
        return self._rung(mode, backend).graph

    def example(self, mode: Mode, backend: Backend) -> Example:
        """One output of the model in ``mode``, as the model builds it, with a meta tensor per tensor.

        Read from the trace: fx's and export's graph output (export's flattened values put back in the
        model's structure), or the output the hooks backend's own run returned. Nothing runs again.
        """
        key = (mode, backend)
        if key not in self._examples:
            rung = self._rung(mode, backend)
            self._examples[key] = rung.traced.example or _graph_example(rung.traced, rung.graph)
        return self._examples[key]

    def output_axes(self, mode: Mode, backend: Backend, select: Callable[[Any], Any]) -> str | None:
        """The axis letters (``"NCSS"``) of the prediction ``select`` reads from the model's output; ``None`` if unknown.

        From the trace where the prediction is an output tensor whose axes it knows; else by running ``select`` on
        the example output with its tensors' axes propagated (a callable that computes the prediction); else, where
        the graph knows no layout for it (a depth map without a channel axis), by one meta run of the model that
        propagates axes (``axes.run_labels``). A model that reads tensor values on meta (``meta.needs_values``)
        has unknown axes.

        Raises:
            TraceError: that meta run failed for another reason than reading values.
        """
        example = self.example(mode, backend)
        tensors = _tensors(example.output)
        prediction = select(example.output)
        if isinstance(prediction, torch.Tensor) and id(prediction) in example.axes:
            return example.axes[id(prediction)]
        from .axes import input_axes, run_labels

        batch = self.traced(mode, backend).input_shape[0]
        found = run_labels(lambda *_: select(example.output), tuple(tensors), {}, example.axes, batch)
        if isinstance(found, str) and "?" not in found:
            return found
        if example is self.traced(mode, backend).example:
            return found if isinstance(found, str) else None  # the hooks run propagated every axis it could
        options = dataclasses.replace(self.options, mode=mode)
        call = forward_call(self.model, options)
        twins = meta_twins(self.model)
        shape = (options.batch_size, *self.input_size)

        def run() -> Any:
            x = torch.empty(shape, device="meta")
            inputs = {call.input_name: x, **call.example_kwargs("meta")}

            def prediction_of(t: torch.Tensor) -> Any:
                return select(torch.func.functional_call(self.model, twins, (), {**inputs, call.input_name: t},
                                                         strict=False))

            with training_mode(self.model, options.train), torch.no_grad():
                return run_labels(prediction_of, (x,), {}, {id(x): input_axes(x.dim())}, shape[0])

        try:
            found = run()
        except Exception as exc:  # the model's own forward on meta: values or another failure, decided below
            if needs_values(run):
                return None  # the model reads values on meta (hooks with real data): axes unknown, not judged
            raise TraceError(
                f"a meta run of {type(self.model).__name__} for its output's axes failed: {type(exc).__name__}: "
                f"{_first_line(exc)}\nHint: select the prediction with output=... (a key or an attribute of the "
                "model's output), or report this with the model's code."
            ) from exc
        return found if isinstance(found, str) else None

    def _rung(self, mode: Mode, backend: Backend) -> _Rung:
        key = (mode, backend)
        if key in self._rungs:
            return self._rungs[key]
        if mode not in _OTHER_MODE:
            raise UsageError(f"mode must be 'train' or 'eval', not {mode!r}.\nHint: pass mode='eval' or mode='train'.")
        if backend not in LADDER:
            raise TraceError(f"unknown tracing backend {backend!r}.\nHint: choose from {list(LADDER)}.")
        other = self._rungs.get((_OTHER_MODE[mode], backend)) if backend == "fx" else None
        more = {"other_mode": other.traced} if other is not None else {}
        traced = _TRACERS[backend](self.model, self.input_size, dataclasses.replace(self.options, mode=mode), **more)
        shared = other is not None and traced.graph_module is other.traced.graph_module
        rung = _Rung(traced, other.graph if shared else build_layer_graph(traced))  # type: ignore[union-attr]
        self._rungs[key] = rung
        return rung

    def ladder(
        self,
        mode: Mode | None = None,
        *,
        backends: Sequence[str] = LADDER,
        usable: Callable[[LayerGraph], bool] | None = None,
    ) -> LadderResult:
        """The first backend of ``backends`` that traces the model in ``mode`` and builds its layer graph.

        With ``usable``, a graph it refuses (a leaf module can hide every feature inside it) sends the
        climb on to the finer rungs after the winner; their graph is taken if ``usable`` accepts it,
        else the first is kept. Either way the notes say so.

        A rung fails when tracing raises or when its graph cannot be built (no path from input to
        output). Only ``AutoprobeError``s from fx fall through to the next rung: any other exception
        from fx is a bug in autoprobe and propagates. export and hooks run the model's own Python,
        so anything they raise is a reason to try the next rung. A rung traced before (by an earlier
        climb, or asked for directly) is not traced again.

        Args:
            mode: the mode to trace in; ``None`` is ``options.mode``.
            backends: the rungs to try, in order; a subsequence of ``LADDER``.
            usable: whether a graph is good enough to stop climbing (``analyze``: it gives a point).

        Returns:
            A ``LadderResult`` with the traced model, its graph and the failed rungs.

        Raises:
            InputSizeError: the model's own code rejected the input size; no other rung is tried.
            TraceError: every rung failed; the message lists each rung's reason.
            RealDataNeeded: only a real run could trace it, and ``allow_real_data`` is off.
        """
        mode = self.options.mode if mode is None else mode
        result = self._climb(mode, backends)
        remaining = tuple(backends)[tuple(backends).index(result.backend) + 1 :]
        if usable is None or usable(result.graph) or not remaining:
            return result
        try:
            finer = self._climb(mode, remaining)
        except AutoprobeError as exc:
            note = f"backend {result.backend} gave no point and no finer backend worked: {exc}".splitlines()[0]
            return dataclasses.replace(result, after=(note,))
        if not usable(finer.graph):
            return dataclasses.replace(result, after=(f"backend {finer.backend} gave no eligible point either; kept {result.backend}",))
        retried = f"backend {result.backend} gave no eligible point; retried with {list(remaining)}"
        return dataclasses.replace(finer, before=(*result.notes, retried))

    def _climb(self, mode: Mode, backends: Sequence[str]) -> LadderResult:
        """The first rung of ``backends`` that traces the model and builds a graph (see ``ladder``)."""
        unknown = [b for b in backends if b not in LADDER]
        if unknown or not backends:
            raise TraceError(f"unknown tracing backends {unknown or list(backends)!r}. Hint: choose from {list(LADDER)}.")
        model, input_size = self.model, self.input_size
        options = dataclasses.replace(self.options, mode=mode)
        failed: list[Attempt] = []
        errors: list[BaseException] = []
        for backend in backends:
            try:
                rung = self._rung(mode, backend)  # type: ignore[arg-type]
            except InputSizeError as exc:
                # fx traced the model and its own code rejected the size while shapes were propagated;
                # export and hooks would run that same code and fail the same way. Unless the model itself
                # runs at this size: then fx recorded another program (a branch a Proxy answered otherwise),
                # and the next rung runs the model's own Python.
                if backend != "fx" or exc.parts is None or exc.parts.verdict != "failed" or _plain_run(
                        model, input_size, options) is not None:
                    raise
                failed.append(Attempt(backend, "TraceError", (
                    f"fx's graph failed at a size the model itself runs at ({_first_line(exc)}): the traced "
                    "program is not the model's")))
                errors.append(exc)
                continue
            except _HooksNeedValues as exc:
                # The last rung needs values and the user has not allowed a real run: say how to allow it.
                failed.append(Attempt(backend, "TraceError", _first_line(exc)))
                part = _backbone_alone(model, input_size, options, backends, failed)
                if part is not None:
                    return part
                listing = "\n".join(f"  - {a}" for a in failed)
                raise RealDataNeeded(
                    f"no tracing backend could trace {type(model).__name__} without running it on real values:\n{listing}",
                    "the model branches on tensor values. Pass options=TraceOptions(allow_real_data=True) (inspect, "
                    "analyze, instrument) to let the hooks backend run it once on a seeded random batch (no_grad, buffers "
                    "cloned, the model left unchanged), or make its control flow depend on shapes only.",
                ) from exc
            except AutoprobeError as exc:
                failed.append(Attempt(backend, type(exc).__name__, _first_line(exc)))
                errors.append(exc)
                continue
            return LadderResult(rung.traced, rung.graph, tuple(failed))
        listing = "\n".join(f"  - {a}" for a in failed)
        first = errors[0]
        part = _backbone_alone(model, input_size, options, backends, failed)
        if part is not None:
            return part
        plain = _plain_run(model, input_size, options)
        if isinstance(plain, Exception):
            # Every rung failed because the model itself fails at this size: that is the input size's fault.
            too_small = _size_it_runs_at(model, input_size, options, plain)
            if too_small is not None:
                raise too_small from plain
            listing += f"\n  - the model's own forward fails at this size too, on meta: {type(plain).__name__}: {_first_line(plain)}"
        raise TraceError(
            f"no tracing backend could trace {type(model).__name__}:\n{listing}\n"
            "Hint: mark the failing submodule as a leaf (`--leaf PATH`), or give the model a forward that takes one tensor."
        ) from first


def _graph_example(traced: Traced, graph: LayerGraph) -> Example:
    """The model's output rebuilt from an fx or export graph: a meta tensor per tensor node, in the model's structure,
    with the axes of each node whose layout the layer graph knows."""
    axes: dict[int, str] = {}

    def rebuild(value: Any) -> Any:
        # fx stores containers as its immutable_dict/immutable_list; give back the plain ones.
        if isinstance(value, fx.Node):
            meta = value.meta.get("tensor_meta")
            if not hasattr(meta, "shape"):
                return None
            tensor = torch.empty(tuple(meta.shape), dtype=meta.dtype, device="meta")
            name = traced.qualnames.get(value.name)
            layout = graph[name].layout if name is not None and name in graph else None
            if layout is not None:
                axes[id(tensor)] = "".join(a if a in "NC" else "S" for a in layout.value)
            return tensor
        if isinstance(value, dict):
            return {k: rebuild(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [rebuild(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else (list(items) if isinstance(value, list) else tuple(items))
        return value

    value = traced.graph_module.graph.output_node().args[0]
    if traced.output_spec is not None:
        # export flattened the output: its leaves, in order, go back into the model's own structure.
        leaves = list(value) if traced.output_spec.num_leaves != 1 else [value]
        return Example(traced.output_spec.unflatten([rebuild(v) for v in leaves]), axes)
    output = rebuild(value)
    # fx lowered the model's ModelOutput to a dict; an output= callable gets the model's own type.
    if traced.output_type is not None and isinstance(output, dict):
        output = traced.output_type(**output)
    return Example(output, axes)


def trace_with_fallbacks(
    model: nn.Module,
    input_size: Sequence[int],
    options: TraceOptions = TraceOptions(),
    *,
    backends: Sequence[str] = LADDER,
    usable: Callable[[LayerGraph], bool] | None = None,
) -> LadderResult:
    """One climb of the fallback ladder: ``ModelTrace(model, input_size, options).ladder(...)``.

    For a single question; a caller that asks more (another mode, the example output) keeps the
    ``ModelTrace``, so nothing is traced twice.

    Args:
        model: any ``nn.Module``, on meta or live; not mutated.
        input_size: the input without batch, e.g. ``(3, 224, 224)``.
        options: the ``TraceOptions`` (mode, leaves, forward arguments, batch, real-data runs).
        backends: the rungs to try, in order; a subsequence of ``LADDER``.
        usable: whether a graph is good enough to stop climbing (see ``ModelTrace.ladder``).

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
        ...         if x.device.type == "cpu":  # a device read: tracing on meta cannot know it
        ...             x = x * 2
        ...         return self.conv(x)
        >>> result = trace_with_fallbacks(Branchy(), (3, 16, 16))
        >>> result.backend, [a.backend for a in result.failed], result.graph.depth
        ('export', ['fx'], 1)
    """
    return ModelTrace(model, input_size, options).ladder(backends=backends, usable=usable)


class _Part(nn.Module):
    """The model's ``backbone`` alone, under the same path, so node names are the whole model's module paths."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> Any:
        return self.backbone(x)


BACKBONE = "backbone"
"""The submodule traced alone when the whole model cannot be (torchvision's and most detectors' feature extractor)."""


def _backbone_alone(
    model: nn.Module, input_size: Sequence[int], options: TraceOptions, backends: Sequence[str], failed: list[Attempt]
) -> LadderResult | None:
    """The ladder on the model's ``backbone`` submodule, when every rung failed on the whole model (a detection
    model: its region proposals and box heads read values and return per-image lists); ``None`` without one.

    The trace's ``part`` says so, and its notes: ``instrument`` refuses it with what to pass.
    """
    backbone = getattr(model, BACKBONE, None)
    if not isinstance(backbone, nn.Module) or not _takes_one_tensor(backbone):
        return None
    part_options = dataclasses.replace(
        options, input_name=None, forward_kwargs={},
        leaf_paths=tuple(p for p in options.leaf_paths if p.startswith(BACKBONE + ".")),
    )
    try:
        result = ModelTrace(_Part(backbone), input_size, part_options)._climb(options.mode, backends)
    except AutoprobeError:
        return None
    reasons = "; ".join(f"{a.backend}: {_clip(a.reason, 160)}" for a in failed)
    note = (
        f"no backend could trace the whole {type(model).__name__} ({reasons}); traced its `{BACKBONE}` submodule "
        f"alone: every point is inside it, and the rest of the model (heads, transforms) is not analysed"
    )
    traced = dataclasses.replace(result.traced, part=BACKBONE, module_types=module_types(model))
    return dataclasses.replace(result, traced=traced, before=(note, *result.before))


def part_refusal(label: str, part: str) -> str:
    """``instrument``'s refusal of a model analysed through one submodule (``_backbone_alone``), with what to do."""
    return (
        f"{label} was analysed through its `{part}` submodule alone: no backend traces the whole model (a detection "
        f"model's proposal and box heads read tensor values and return per-image lists), so points inside `{part}` "
        "cannot be tapped in the whole model's forward, and its output has no (B, K) or (B, K, *S) prediction.\n"
        f"Hint: supervise the {part} as a model of its own, beside the detector's own losses: "
        f"`autoprobe.instrument(model.{part}, input_size=..., output=lambda feats: <a (B, K, H, W) prediction from "
        "the feature maps>, loss_options=LossOptions(output_loss=<your loss of it and the target>))`; "
        "`autoprobe.inspect(model)` shows the "
        f"points of the {part}."
    )


def _takes_one_tensor(module: nn.Module) -> bool:
    """Whether ``module.forward`` can be called with one positional tensor (every other parameter has a default)."""
    import inspect

    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return bool(positional) and all(p.default is not p.empty for p in positional[1:]) and all(
        p.default is not p.empty for p in params if p.kind == p.KEYWORD_ONLY)


_VALUES = object()
"""``_plain_run``'s answer when the model reads tensor values, which a meta run cannot tell."""


def _plain_run(model: nn.Module, input_size: Sequence[int], options: TraceOptions) -> Any:
    """Run the model's own forward once on meta (the input and meta twins of every weight; nothing computed).

    Returns:
        ``None`` when it runs, the exception it raised when it fails, or ``_VALUES`` when it reads values.
    """
    shape = (options.batch_size, *(int(s) for s in input_size))
    call = forward_call(model, options)
    args, kwargs = _call_arguments(call, torch.empty(shape, device="meta"), torch.device("meta"))
    twins = meta_twins(model, remove_duplicate=True)
    try:
        with training_mode(model, options.train), torch.no_grad(), ValueReadCheck():
            torch.func.functional_call(model, twins, args, kwargs, strict=False)
    except ValuesNeeded:
        return _VALUES
    except Exception as exc:  # the model's own forward: whatever it raises is its answer to this size
        return exc
    return None


_LARGER = (2, 4, 8)
"""Spatial scales tried for the size a model runs at, when it fails at the given one."""


def _size_it_runs_at(
    model: nn.Module, input_size: Sequence[int], options: TraceOptions, failure: Exception
) -> InputSizeError | None:
    """The ``InputSizeError`` for a model that fails at ``input_size`` on its own and runs at a larger size
    (the spatial axes scaled by 2, 4 or 8, channels kept); ``None`` when none of those runs either."""
    from .errors import SizeErrorParts
    from .sizes import format_input_size, size_error

    size = tuple(int(s) for s in input_size)
    for scale in _LARGER:
        bigger = (size[0], *(s * scale for s in size[1:]))
        if _plain_run(model, bigger, options) is None:
            return size_error(SizeErrorParts(
                f"input size {size} does not fit {type(model).__name__}: the model's own forward fails at it, "
                f"without autoprobe ({type(failure).__name__}: {_first_line(failure)}), and runs at {bigger}",
                f"pass a size the model was built for, e.g. {format_input_size(bigger)}", size, "fails",
            ))
    return None


def _is_leaf(module: nn.Module, path: str, leaf_types: tuple[type[nn.Module], ...], leaf_paths: frozenset[str]) -> bool:
    """The registry's leaf rule (``ops.is_leaf_module``: fx's own, torch.nn built-ins, and other libraries' one-op
    modules) plus timm's and the user's leaves, so names match fx's."""
    return path in leaf_paths or isinstance(module, leaf_types) or is_leaf_module(module)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

# Bounded: one entry per ATen overload a model's export uses; a few hundred cover the zoo, and a
# long-lived process that exports many models must not grow without limit.
@functools.lru_cache(maxsize=1024)
def _named_op(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """A callable that runs ``op`` under the functional name the registry shows it as (``ops.shown_name``).

    An OpOverload's own name is ``convolution.default``; reports and the lock read ``conv2d``, as on fx.
    The kind and axis rule come from the registry through ``aten_op`` (``ops.op_name``), not from this name.
    """
    name = shown_name(op)

    def call(*args: Any, **kwargs: Any) -> Any:
        return op(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__module__ = __name__
    call.__doc__ = f"torch.ops.{op.name()} shown as {name}."
    call.aten_op = op  # type: ignore[attr-defined]
    return call


_INLINED_HOPS = frozenset({"wrap_with_set_grad_enabled", "wrap_with_autocast"})


class _ExportConverter(fx.Interpreter):
    """Copy an ExportedProgram's graph into a plain fx graph that graph.py reads like an fx trace.

    An ``fx.Interpreter`` over export's graph whose values are the new graph's nodes (the way
    ``fx.Transformer``'s are proxies). Each node is copied with export's ``tensor_meta`` and labelled
    (``labelling.Labeller``) as it is made, so one walk records both facts. The override map:

    - ``placeholder``: made first, in ``convert``: the user input (then other user inputs) as
      placeholders, a lifted parameter, buffer or constant as a ``get_attr`` of the model's own tensor;
    - ``get_attr``: a constant tensor is kept as an attribute; a higher-order op's body stays a
      ``GraphModule``, inlined where it is called;
    - ``call_function``: an ATen overload is shown under its functional name (``_named_op``); grad and
      autocast regions are inlined (another ``_ExportConverter`` over the body, into the same graph);
      ``getitem`` of a tuple of copied values picks the value;
    - ``output``: the copied values the program returns.
    """

    def __init__(self, ep: torch.export.ExportedProgram, model: nn.Module, input_name: str, batch: int,
                 body: fx.GraphModule | None = None, parent: _ExportConverter | None = None) -> None:
        from torch.export.graph_signature import InputKind

        super().__init__(body if body is not None else ep.graph_module, garbage_collect_values=False)
        self.extra_traceback = False
        self.ep = ep
        self.model = model
        self.input_name = input_name
        self.batch = batch
        # A body's copy writes into its parent's graph, attributes and labels.
        self.new_graph: fx.Graph = parent.new_graph if parent else fx.Graph()
        self.attrs: dict[str, Any] = parent.attrs if parent else {}
        self.labeller: Labeller | None = parent.labeller if parent else None
        self.roles: dict[str, Any] = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
        self.InputKind = InputKind
        self._source: fx.Node | None = None

    def convert(self) -> fx.Graph:
        """The copied graph: the user input is its first placeholder, and every node has its shape and labels."""
        from torch.export.graph_signature import OutputKind

        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        # The user input first: build_layer_graph takes the first placeholder as the input.
        ordered = sorted(
            placeholders,
            key=lambda n: (self.roles[n.name].kind != self.InputKind.USER_INPUT, n.name != self.input_name),
        )
        env = {}
        for node in ordered:
            env[node] = self._input(node)
        outputs = self.run(initial_env=env, enable_io_processing=False)
        outputs = tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)
        specs = self.ep.graph_signature.output_specs
        user = [value for value, spec in zip(outputs, specs) if spec.kind == OutputKind.USER_OUTPUT]
        if not user:
            raise TraceError("torch.export produced no user output. Hint: the model's forward must return a tensor.")
        self.labeller.label(self.new_graph.output(user[0] if len(user) == 1 else tuple(user)))
        return self.new_graph

    def run_node(self, n: fx.Node) -> Any:
        self._source = n
        return super().run_node(n)

    def placeholder(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # convert() and _inline() give every placeholder its value before the run.
        raise TraceError(f"torch.export produced an input {target!r} autoprobe did not place (an internal error).")

    def get_attr(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = self.fetch_attr(str(target))
        if isinstance(value, fx.GraphModule):
            return value  # a higher-order op's body; inlined where it is called
        name = f"_export_{target}".replace(".", "_")
        self.attrs[name] = value
        return self._made(self.new_graph.get_attr(name))

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        node = self._source
        hop_name = target.name() if isinstance(target, torch._ops.HigherOrderOperator) else ""
        if hop_name in _INLINED_HOPS:
            # Grad/autocast regions change nothing about the data flow: inline their bodies.
            index = next(i for i, a in enumerate(args) if isinstance(a, fx.GraphModule))
            return self._inline(args[index], args[index + 1 :])
        if target is operator.getitem and isinstance(args[0], tuple):
            return args[0][args[1]]
        if isinstance(target, torch._ops.OpOverload):
            target = _named_op(target)
        elif getattr(target, "__name__", "") == "" and not callable(target):
            raise TraceError(f"torch.export produced an unreadable call {node.name!r} ({target!r}).")
        return self._made(self.new_graph.create_node("call_function", target, args, kwargs, name=node.name))

    def call_method(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise TraceError(f"torch.export produced a call_method node {self._source.name!r}, which autoprobe cannot read.")

    call_module = call_method

    def _input(self, node: fx.Node) -> fx.Node:
        spec = self.roles[node.name]
        if spec.kind == self.InputKind.USER_INPUT:
            new = self.new_graph.placeholder(node.name)
        elif spec.kind in (self.InputKind.PARAMETER, self.InputKind.BUFFER, self.InputKind.CONSTANT_TENSOR):
            target = str(spec.target)
            self.attrs[target] = self._resolve(target)
            new = self.new_graph.get_attr(target)
        else:
            raise TraceError(f"torch.export input {node.name!r} is a {spec.kind.name}, which autoprobe cannot read.")
        self._source = node
        if self.labeller is None:  # the first placeholder made is the model's input
            self.labeller = Labeller({}, new.name, self.batch)
        return self._made(new)

    def _resolve(self, target: str) -> Any:
        """The model's own tensor for a lifted parameter/buffer, else export's lifted constant."""
        owner: Any = self.model
        with contextlib.suppress(AttributeError):
            for part in target.split("."):
                owner = getattr(owner, part)
            return owner
        return self.ep.constants[target]

    def _made(self, new: fx.Node) -> fx.Node:
        """``new``, a copy of the node being run, with its shape, module stack and labels."""
        old = self._source
        meta = tensor_meta(old.meta.get("val"))
        if has_tensor(meta):
            new.meta["tensor_meta"] = meta
        if "nn_module_stack" in old.meta:
            new.meta["nn_module_stack"] = old.meta["nn_module_stack"]
        self.labeller.label(new)
        return new

    def _inline(self, body: fx.GraphModule, operands: Sequence[Any]) -> tuple[Any, ...]:
        copy = _ExportConverter(self.ep, self.model, self.input_name, self.batch, body=body, parent=self)
        inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
        result = copy.run(initial_env=dict(zip(inputs, operands)), enable_io_processing=False)
        return tuple(result) if isinstance(result, (list, tuple)) else (result,)


def _module_stack_paths(node: fx.Node) -> list[tuple[str, str]]:
    """(call key, module path) from outermost to innermost; the root module is dropped."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, str(value[0])) for key, value in stack.items() if value and str(value[0])]


def _export_qualnames(
    graph: fx.Graph,
    model: nn.Module,
    leaf_types: tuple[type[nn.Module], ...],
    leaf_paths: frozenset[str],
) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    """Module-qualified names (``NodeNamer``'s rule) and module calls, from each node's ``nn_module_stack``.

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

    # The index of each call among its module's calls, in execution order (stack keys are unique per call).
    call_index: dict[str, int] = {}
    seen: dict[str, int] = {}
    for key in calls:
        path = call_path[key][1]
        call_index[key] = seen.get(path, 0)
        seen[path] = seen.get(path, 0) + 1
    exit_key = {}
    for key, members in calls.items():
        for node in members:
            if node in exits and exits[node][1] == call_path[key][1] and node not in exit_key:
                exit_key[node] = key
    namer = NodeNamer(first_path.values())
    qualnames: dict[str, str] = {}
    module_calls: dict[str, tuple[str, int]] = {}
    for node in nodes:
        if node.op in ("placeholder", "output"):
            qualnames[node.name] = namer.name(node.name, module=False)
        elif node.op == "get_attr":
            qualnames[node.name] = namer.name(str(node.target), module=False)
        elif node in exits:
            path = exits[node][1]
            qualnames[node.name] = namer.name(path, module=True)
            key = exit_key.get(node)
            module_calls[node.name] = (path, call_index[key] if key is not None else 0)
        else:
            paths = _module_stack_paths(node)
            scope = canonical(paths[-1][1]) if paths else ""
            local = getattr(node.target, "__name__", str(node.target)).rstrip("_") or "op"
            qualnames[node.name] = namer.name(f"{scope}.{local}" if scope else local, module=False)
    return qualnames, module_calls


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


def trace_export(model: nn.Module, input_size: Sequence[int], options: TraceOptions = TraceOptions()) -> Traced:
    """Trace ``model`` with ``torch.export`` (non-strict) and convert the graph for graph.py.

    The example input lives on the model's device (meta for spec-built models); export turns it
    and the weights into fake tensors, so nothing is computed and the model is not mutated.

    Args:
        model: any ``nn.Module``.
        input_size: the input without batch.
        options: the ``TraceOptions``; leaf modules and paths are named by their path, as fx leaves are.

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
    input_shape = (options.batch_size, *(int(s) for s in input_size))
    call = forward_call(model, options)
    device = device_of(model)
    example = torch.zeros(input_shape, device=device)
    args, kwargs = _call_arguments(call, example, device)
    captured = io.StringIO()
    with training_mode(model, options.train):
        try:
            # On failure export prints its partial graph to stderr, pages of it; the graph stays
            # on the chained exception, and the reason goes into the ladder's notes.
            with contextlib.redirect_stderr(captured):
                ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
        except Exception as exc:  # export runs the model's Python; report whatever it raised
            raise TraceError(f"torch.export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    sys.stderr.write(captured.getvalue())  # a successful export's own messages are the user's to see
    converter = _ExportConverter(ep, model, call.input_name, input_shape[0])
    graph = converter.convert()
    qualnames, calls = _export_qualnames(graph, model, options.leaf_types(), frozenset(options.leaf_paths))
    gm = _graph_module(model, graph, converter.attrs, type(model).__name__)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    traced = finish_trace(
        model, gm, qualnames, calls, input_shape, options, "export", placeholders[0].name if placeholders else ""
    )
    return dataclasses.replace(traced, output_spec=ep.call_spec.out_spec)


def _call_arguments(call: Any, example: torch.Tensor, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for one call of the forward with ``example`` as the input."""
    fixed = call.example_kwargs(device)
    if call.input_index == 0:
        return (example,), fixed
    return (), {call.input_name: example, **fixed}


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------

_INPUT = -1


class _Provenance(TorchFunctionMode):
    """Tags every tensor with the module calls it was computed from, and with its axis labels.

    Forward hooks see module calls only; the functions between them (``x + identity``,
    ``x.flatten(1)``) would leave the graph disconnected. Propagating the union of
    the inputs' tags through every torch function keeps the edges without making
    those functions nodes. The same pass propagates each tensor's axis labels with
    ``axes.propagate``, one torch function at a time, so a hooked module's output has the
    layout its ops made, as on the fx and export backends.
    """

    def __init__(self, batch: int) -> None:
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.batch = batch
        self.tags: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.labels: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def sources(self, value: Any) -> frozenset[int]:
        found: set[int] = set()
        for tensor in _tensors(value):
            found |= self.tags.get(tensor, frozenset())
        return frozenset(found)

    def tag(self, value: Any, sources: frozenset[int]) -> None:
        for tensor in _tensors(value):
            self.tags[tensor] = sources

    def labels_of(self, value: Any) -> Labels:
        if isinstance(value, torch.Tensor):
            return self.labels.get(value)
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return tuple(self.labels.get(v) for v in value)
        return None

    def set_labels(self, value: Any, labels: Labels) -> None:
        if isinstance(value, torch.Tensor):
            # A tensor no rule labelled is still data: all of its axes are unknown.
            self.labels[value] = labels if isinstance(labels, str) and len(labels) == value.dim() else "?" * value.dim()
        elif isinstance(value, (tuple, list)):
            parts = labels if isinstance(labels, tuple) and len(labels) == len(value) else (None,) * len(value)
            for v, lab in zip(value, parts):
                self.set_labels(v, lab)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        sources = self.sources((args, kwargs))
        if sources:
            self.tag(result, sources)
        if sources and isinstance(result, torch.Tensor) or (sources and isinstance(result, (tuple, list)) and any(
                isinstance(r, torch.Tensor) for r in result)):
            env = AxisEnv(self.labels_of, _shape_of, _out_shapes(result), self.batch)
            name = op_name(func)
            if name == "getitem" and args and isinstance(args[0], (tuple, list)):
                return result  # a tuple's element keeps its own labels
            self.set_labels(result, propagate(name, args, kwargs, env))
        return result


def _shape_of(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _out_shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_out_shapes(v) for v in value)
    return None


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


@dataclass(frozen=True)
class _Call:
    """One hooked module call: its path, the calls (or the input) it read, its output's metadata and axes."""

    path: str
    sources: frozenset[int]
    meta: Any
    labels: Labels


class _HookedRun(NamedTuple):
    """What one hooked forward saw."""

    calls: list[_Call]
    """The leaf-module calls, in execution order."""
    provenance: _Provenance
    """Which call made each tensor, and its axes."""
    output: Any
    """The model's output."""
    example: torch.Tensor
    """The input it ran on (meta, or the seeded batch)."""


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


class _HooksNeedValues(TraceError):
    """The hooks backend needs a real run (the forward reads tensor values) and the options do not allow one."""


def trace_hooks(model: nn.Module, input_size: Sequence[int], options: TraceOptions = TraceOptions()) -> Traced:
    """Build a coarse module-level graph by running ``model`` once with forward hooks.

    When and on what the model runs:

    1. Always first on meta: the input is a meta tensor and every parameter and buffer is swapped for
       a meta twin (``torch.func.functional_call``), so nothing is computed, on a live model too.
    2. Only if that fails because the forward reads a tensor *value* (``if x.sum() > 0``), and only
       with ``options.allow_real_data=True``: one real forward pass of the live model under
       ``no_grad`` on a fixed standard-normal batch (seed 0), with buffers swapped for clones so
       running statistics stay untouched; branches on values then follow that batch, and
       ``Traced.notes`` says so. Without the option this raises a ``TraceError`` that names it.

    Args:
        model: any ``nn.Module``; not mutated.
        input_size: the input without batch.
        options: the ``TraceOptions``; leaf modules and paths are hooked as one node.

    Returns:
        A ``Traced`` with ``backend="hooks"``: one ``call_module`` node per leaf-module call.
        Its graph is for analysis only; it is not the model's computation.

    Raises:
        TraceError: the forward pass failed, needs values without ``allow_real_data``, or no hooked module
            saw the input.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> t = trace_hooks(net, (3, 16, 16))
        >>> t.backend, [t.qualnames[n.name] for n in t.graph_module.graph.nodes]
        ('hooks', ['x', '0', '1', 'output'])
    """
    input_shape = (options.batch_size, *(int(s) for s in input_size))
    call = forward_call(model, options)
    points = _hook_points(model, options.leaf_types(), frozenset(options.leaf_paths))
    modules = dict(points)
    device = device_of(model)
    notes: tuple[str, ...] = ()
    try:
        calls, provenance, output, example = _hooked_run(model, options, call, points, input_shape, live=False)
    except TraceError as exc:
        if not isinstance(exc.__cause__, ValuesNeeded):
            raise
        if device.type == "meta" and options.allow_real_data:
            raise TraceError(
                f"forward hooks: the forward reads tensor values ({_first_line(exc)}), and the model's weights are on "
                "the meta device, so it cannot be run for real.\nHint: build the model on the CPU to use "
                "allow_real_data=True, or make its control flow depend on shapes only."
            ) from exc
        if not options.allow_real_data:
            raise _HooksNeedValues(
                f"forward hooks: the forward reads tensor values, which a meta run does not have ({_first_line(exc)}); "
                "running the model on real values is off (allow_real_data=False)."
            ) from exc
        calls, provenance, output, example = _hooked_run(model, options, call, points, input_shape, live=True)
        notes = (
            "hooks backend ran the model once on real values (allow_real_data=True): one no_grad forward on a "
            "seeded standard-normal batch, buffers cloned; branches on values follow that batch",
        )

    graph = fx.Graph()
    nodes: dict[int, fx.Node] = {_INPUT: graph.placeholder("x")}
    nodes[_INPUT].meta["tensor_meta"] = tensor_meta(example)
    nodes[_INPUT].meta["axes"] = provenance.labels_of(example)
    namer = NodeNamer(p for p, _ in model.named_modules())
    qualnames = {"x": namer.name("x", module=False)}
    module_calls: dict[str, tuple[str, int]] = {}
    counts: dict[str, int] = {}
    for index, record in enumerate(calls):
        args = tuple(nodes[s] for s in sorted(record.sources) if s in nodes)
        node = graph.call_module(record.path, args)
        if has_tensor(record.meta):
            node.meta["tensor_meta"] = record.meta
        node.meta["axes"] = record.labels
        nodes[index] = node
        qualnames[node.name] = namer.name(record.path, module=True)
        module_calls[node.name] = (record.path, counts.get(record.path, 0))
        counts[record.path] = counts.get(record.path, 0) + 1
    sinks = provenance.sources(output)
    if not sinks - {_INPUT}:
        raise TraceError(
            "forward hooks: the output was not computed from any hooked module call. "
            "Hint: the model may do all its work in functions; fx or export must trace it."
        )
    result = [nodes[s] for s in sorted(sinks) if s in nodes]
    out = graph.output(result[0] if len(result) == 1 else tuple(result))
    qualnames[out.name] = namer.name("output", module=False)
    called = {record.path: modules[record.path] for record in calls}
    gm = _graph_module(model, graph, called, type(model).__name__)
    traced = finish_trace(model, gm, qualnames, module_calls, input_shape, options, "hooks", "x", notes)
    # The run's own output is the example: nothing runs again for it (``ModelTrace.example``).
    axes = {id(t): lab for t in _tensors(output) if isinstance(lab := provenance.labels.get(t), str)}
    return dataclasses.replace(traced, example=Example(output, axes))


def _hooked_run(
    model: nn.Module,
    options: TraceOptions,
    call: Any,
    points: list[tuple[str, nn.Module]],
    input_shape: tuple[int, ...],
    *,
    live: bool,
) -> _HookedRun:
    """One hooked forward: on meta twins of every weight (``live=False``) or for real on a seeded batch."""
    if live:
        run = seeded_run(model, input_shape)
        example, twins = run.example, run.buffers
        args, kwargs = _call_arguments(call, example, run.device)
    else:
        example = torch.empty(input_shape, device="meta")
        twins = meta_twins(model, remove_duplicate=True)
        args, kwargs = _call_arguments(call, example, torch.device("meta"))
    provenance = _Provenance(input_shape[0])
    calls: list[_Call] = []

    def record(path: str, _module: nn.Module, _args: Any, output: Any) -> None:
        calls.append(_Call(path, provenance.sources(_args), tensor_meta(output), provenance.labels_of(output)))
        provenance.tag(output, frozenset({len(calls) - 1}))

    handles = [module.register_forward_hook(functools.partial(record, path)) for path, module in points]
    provenance.tag(example, frozenset({_INPUT}))
    provenance.set_labels(example, input_axes(example.dim()))
    try:
        # On meta, an op that needs values raises ValuesNeeded: the caller decides on that type.
        with training_mode(model, options.train), torch.no_grad(), provenance, contextlib.nullcontext() if live else ValueReadCheck():
            output = torch.func.functional_call(model, twins, args, kwargs, strict=False)
    except Exception as exc:  # the model's own forward; report whatever it raised
        where = "one real forward pass" if live else "a meta-device run"
        raise TraceError(f"forward hooks: {where} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        for handle in handles:
            handle.remove()
    return _HookedRun(calls, provenance, output, example)


_TRACERS: dict[str, Callable[[nn.Module, Sequence[int], TraceOptions], Traced]] = {
    "fx": trace_fx,
    "export": trace_export,
    "hooks": trace_hooks,
}
