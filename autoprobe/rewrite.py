"""Stages 5-7: rewrite a model into a trainable probed model, give it a loss, strip it back.

Why a graph rewrite and not forward hooks: hooks are global side effects on
the user's modules (they survive ``strip()``, leak into ``torch.save`` and can
only see module boundaries, not an ``add`` inside a block), and torch.compile
and DDP handle them less predictably than a plain forward. So ``instrument``
traces the model with torch.fx, inserts after every chosen node a call to an
adapter submodule ``autoprobe_adapters.<point>``, and returns the point's
adapter output (q_m(z_m)) and raw feature (z_m) from the graph alongside the
model's own output.

Why two graphs: fx freezes Python control flow at trace time, including
``if self.training`` inside non-leaf modules (timm's BatchNormAct, aux heads,
train-only branches). Like torchvision's ``DualGraphModule``, ``Probed``
traces the train-mode and the eval-mode graph and runs the one matching its
own ``training`` flag; unlike it, nothing is recompiled on ``train()``/
``eval()``, and the graphs are rebuilt (re-traced) on unpickling rather than
pickled as generated code, so a loaded ``Probed`` keeps its type and methods.

Why hooks after all, on the fallback backends: a model fx cannot trace has no
fx graph to rewrite. Its selection comes from ``torch.export`` or forward hooks
(``backends.py``), whose nodes are ATen ops or module calls. There ``instrument``
taps module outputs with forward hooks that exist only while ``Probed.forward``
runs (registered on entry, removed on exit), so they never survive into
``strip()`` or ``torch.save``. A point that is a function inside a module
(``blocks.0.add`` from export) is tapped at that module's output, the nearest
thing a hook can see, and ``Tap.hooked`` says so. The forward returns the same
``ProbedOutput``.

Why the user's model is a submodule: ``Probed.model`` *is* the object the
user passed, so training the probed model trains the user's weights in place,
``strip()`` hands back that same object (its state_dict has exactly the
original keys and no trace of autoprobe), and the probed state_dict reads
``model.<original key>`` and ``autoprobe_adapters.<point>.<param>``. The two
GraphModules reach the weights through that same object and are kept out of
the module tree, so each tensor appears once in ``state_dict`` and
``parameters()``. Nothing is added to, removed from or switched on the user's
modules by ``instrument`` itself.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import inspect as pyinspect
import operator
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, get_args

import torch
from torch import Tensor, fx, nn

from .adapters import Task, adapter_parameter_count, make_adapter
from .errors import InstrumentError, SelectionError
from .graph import LayerGraph, LayerInfo, build_layer_graph
from .losses import LossResult, Objective, ObjectiveName, Schedule, make_objective
from .rules import RulePack
from .select import Selection
from .backends import trace_with_fallbacks
from .trace import Traced, trace_model

__all__ = ["instrument", "Probed", "ProbedOutput", "RewriteReport", "Tap", "ADAPTERS"]

# Name of the ModuleDict holding the adapters, in the probed module and its state_dict keys.
ADAPTERS = "autoprobe_adapters"
_MODEL = "model"

# Ops whose result may share storage with their first argument: an in-place op on
# the result (or on the argument) changes the tapped feature too.
_ALIAS_METHODS = frozenset(
    {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
     "unsqueeze", "expand", "expand_as", "narrow", "select", "contiguous", "movedim", "as_strided", "detach",
     "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "chunk", "split", "unbind",
     "tensor_split", "real", "__getitem__"}
)
_ALIAS_FUNCTIONS = frozenset(
    {operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
     torch.narrow, torch.select, torch.movedim, torch.chunk, torch.split, torch.unbind, torch.tensor_split,
     torch.detach, torch.t}
)
_INPLACE_OPERATORS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
     operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
     operator.imatmul, operator.setitem}
)


class ProbedOutput(NamedTuple):
    """What ``Probed.forward`` returns.

    A NamedTuple (not a dataclass) so DDP, torch.compile and pytree utilities
    see plain containers of tensors.

    Attributes:
        output: the model's own output, unchanged (logits (B, K) or (B, K, H, W)).
        heads: point name -> adapter output q_m(z_m), shaped like ``output``.
        features: point name -> the raw feature z_m at that point (its own layout,
            e.g. (B, C, H, W) or (B, N, C)); a copy when a later in-place op of the
            model would overwrite it (``Tap.cloned``).
    """

    output: Tensor
    heads: dict[str, Tensor]
    features: dict[str, Tensor]


@dataclass(frozen=True)
class Tap:
    """One inserted adapter and loss tap.

    Attributes:
        point: the point's name (module-qualified, as in ``inspect``); the key in
            ``ProbedOutput.heads``/``features`` and in the loss parts.
        adapter: the adapter's submodule path (``autoprobe_adapters.layer1_1_act2``),
            the prefix of its state_dict keys.
        fx_names: the tapped fx node's name in the train-mode and eval-mode graphs.
        feature_shape: z_m's shape at the traced input size, batch included.
        layout: z_m's layout (``NCHW``, ``NHWC``, ``NLC``, ...).
        head_shape: the adapter output's shape at the traced input size.
        adapter_type: the adapter's class name.
        parameters: the adapter's parameter count.
        cloned: whether z_m is copied before the model continues, because a later
            in-place op of the model (``x += shortcut``, ``ReLU(inplace=True)``)
            would overwrite it; costs one feature-sized copy.
        hooked: on the fallback backends, the module whose output a forward hook taps
            (the point itself, or the module a functional point sits in), with ``#N`` for
            its N-th call when it runs more than once; ``""`` on the fx path.
    """

    point: str
    adapter: str
    fx_names: tuple[str, str]
    feature_shape: tuple[int, ...]
    layout: str
    head_shape: tuple[int, ...]
    adapter_type: str
    parameters: int
    cloned: bool
    hooked: str = ""


@dataclass(frozen=True)
class RewriteReport:
    """What ``instrument`` inserted, for logs and reviews.

    Attributes:
        model: the model's label (spec or class name).
        task: ``classification`` or ``dense``.
        task_source: ``inferred`` (from the output's shape) or ``given``.
        num_classes: K, from the output's shape.
        input_shape: the traced input shape, batch included.
        output_shape: the model output's shape at that input.
        objective: the objective's repr (name, points, weights, schedule).
        taps: one ``Tap`` per point, in execution order.
        model_parameters: the user model's parameter count.
        backend: how the taps are placed: ``fx`` (graph rewrite) or the fallback backend
            the selection came from (``export``, ``hooks``), tapped with forward hooks.
    """

    model: str
    task: str
    task_source: str
    num_classes: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    objective: str
    taps: tuple[Tap, ...]
    model_parameters: int
    backend: str = "fx"

    @property
    def adapter_parameters(self) -> int:
        """Parameters added by all adapters together."""
        return sum(t.parameters for t in self.taps)

    def summary(self) -> str:
        """A few plain lines: the task, then one line per tap.

        Returns:
            The text, without a trailing newline.

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            ...                           torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
            ...                           torch.nn.Linear(512, 10))
            >>> print(instrument(net, input_size=(3, 16, 16)).report.summary())
            Sequential: classification (inferred), K=10, input (3, 16, 16), 1 tap, 90 adapter params (+1.52%)
              1: NCHW (8, 16, 16) -> ClassificationAdapter (10,), 90 params
        """
        share = self.adapter_parameters / max(self.model_parameters, 1)
        taps = f"{len(self.taps)} tap{'' if len(self.taps) == 1 else 's'}"
        via = "" if self.backend == "fx" else f", forward hooks ({self.backend} selection)"
        lines = [
            f"{self.model}: {self.task} ({self.task_source}), K={self.num_classes}, input {self.input_shape[1:]}, "
            f"{taps}, {self.adapter_parameters:,} adapter params (+{share:.2%}){via}"
        ]
        for tap in self.taps:
            copy = ", copied (in-place op follows)" if tap.cloned and not tap.hooked else ""
            # ``block#1`` is the point ``block_1`` itself (the second call); anything else was moved.
            if tap.hooked and tap.hooked.replace("#", "_") != tap.point:
                copy += f", tapped at module {tap.hooked}'s output"
            lines.append(
                f"  {tap.point}: {tap.layout} {tap.feature_shape[1:]} -> {tap.adapter_type} "
                f"{tap.head_shape[1:]}, {tap.parameters:,} params{copy}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Plan:
    """What is needed to (re)build the tapped graphs from the model and the adapters."""

    input_size: tuple[int, ...]
    leaf_modules: tuple[type[nn.Module], ...]
    leaf_paths: tuple[str, ...]
    points: tuple[tuple[str, str], ...]  # (point name, adapter key), execution order
    shapes: tuple[tuple[int, ...], ...]  # feature shapes without batch, to detect a changed model
    label: str
    backend: str = "fx"
    hooks: tuple[tuple[str, int], ...] = ()  # fallback backends: (module path, call index) per point


@dataclass(frozen=True)
class _ModeGraphs:
    """The train-mode and eval-mode tapped GraphModules (kept outside the module tree)."""

    train: fx.GraphModule | _HookRunner
    eval: fx.GraphModule | _HookRunner
    cloned: dict[str, bool]
    fx_names: dict[str, tuple[str, str]]


class Probed(nn.Module):
    """A model with adapters and loss taps at its supervision points.

    Build it with ``instrument``. ``forward(x)`` returns a ``ProbedOutput``;
    ``loss(out, target)`` computes the configured objective; ``strip()`` returns
    the user's model, trained in place, without anything autoprobe added.

    ``train()``/``eval()`` pick the graph traced in that mode (and set the user's
    modules' flags, as they would on the model itself). The eval graph keeps the
    taps, so validation losses are comparable; ship ``strip()`` for inference.
    The forward runs fx-generated code over the user's modules: forward hooks on
    modules fx called as a whole (convs, norms, timm leaf blocks) still fire, hooks
    on modules it traced through, including the model itself, do not. For a
    selection from a fallback backend (``report.backend`` is ``export`` or ``hooks``)
    the forward runs the model itself, with tapping hooks registered for that call only.

    Attributes:
        model: the user's model (the very object passed to ``instrument``).
        autoprobe_adapters: ``nn.ModuleDict`` of adapters, keyed by sanitized point name.
        objective: the loss (``IMacHSR``, ``DSN``, ``DKS`` or a given ``Objective``).
        selection: the ``Selection`` the taps were placed from.
        report: the ``RewriteReport`` of what was inserted.
        task: ``classification`` or ``dense``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        ...                           torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(512, 10))
        >>> probed = instrument(net, input_size=(3, 16, 16))
        >>> out = probed(torch.randn(4, 3, 16, 16))
        >>> out.output.shape, list(out.heads)
        (torch.Size([4, 10]), ['1'])
        >>> total, parts = probed.loss(out, torch.tensor([0, 1, 2, 3]))
        >>> sorted(parts)
        ['ce', 'mi/1', 'ne/1']
        >>> probed.strip() is net
        True
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: nn.ModuleDict,
        objective: Objective,
        selection: Selection,
        report: RewriteReport,
        plan: _Plan,
        graphs: _ModeGraphs,
    ) -> None:
        """Assemble a probed model; use ``instrument`` rather than calling this directly.

        Args:
            model: the user's model.
            adapters: the adapters, keyed as in ``plan.points``.
            objective: the loss.
            selection: the selection the points came from.
            report: what was inserted.
            plan: how to rebuild the graphs (on unpickling).
            graphs: the tapped train/eval GraphModules, built on ``model`` and ``adapters``.
        """
        super().__init__()
        setattr(self, _MODEL, model)
        setattr(self, ADAPTERS, adapters)
        self.objective = objective
        self.selection = selection
        self.report = report
        self.task: str = report.task
        self._plan = plan
        self._graphs = graphs
        # Start in the user's mode; nn.Module would say train, and switching would touch the user's flags.
        self.training = model.training

    def forward(self, x: Tensor) -> ProbedOutput:
        """Run the graph of the current mode.

        Args:
            x: the model's input, at the size given to ``instrument`` for dense tasks.

        Returns:
            ``ProbedOutput(output, heads, features)``.

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            ...                           torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
            ...                           torch.nn.Linear(512, 10))
            >>> out = instrument(net, input_size=(3, 16, 16))(torch.randn(2, 3, 16, 16))
            >>> out.heads["1"].shape, out.features["1"].shape
            (torch.Size([2, 10]), torch.Size([2, 8, 16, 16]))
        """
        graph_module = self._graphs.train if self.training else self._graphs.eval
        output, heads, features = graph_module(x)
        return ProbedOutput(output, heads, features)

    def loss(self, out: ProbedOutput, target: Tensor, progress: float | None = None) -> LossResult:
        """The configured objective on one batch, e.g. Eq. 3 for iMacHSR.

        Args:
            out: what ``forward`` returned for the batch.
            target: integer class labels, (B,) for classification or (B, H, W) for dense tasks.
            progress: fraction of training done in [0, 1]; needed by decaying schedules.

        Returns:
            ``LossResult(total, parts)``: the scalar to back-propagate and the unweighted,
            detached terms by name (``ce``, ``mi/<point>``, ``ne/<point>``, ...). Unpacks as
            ``total, parts = probed.loss(out, y)``.

        Raises:
            InstrumentError: ``out`` is not a ``ProbedOutput``, or the labels do not fit the task.

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
            ...                           torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            ...                           torch.nn.Linear(8, 3))
            >>> probed = instrument(net, input_size=(3, 12, 12), loss="dsn")
            >>> total, parts = probed.loss(probed(torch.randn(2, 3, 12, 12)), torch.tensor([0, 2]))
            >>> total.ndim, sorted(parts)[0]
            (0, 'ce')
        """
        if not isinstance(out, tuple) or len(out) != 3:
            raise InstrumentError(
                f"Probed.loss needs the ProbedOutput the probed model returned; got {type(out).__name__}. "
                "Hint: `out = probed(x); total, parts = probed.loss(out, y)`."
            )
        output, heads, features = out
        _check_target(self.task, output, target)
        return self.objective(output, heads, features, target, progress=progress)

    def strip(self) -> nn.Module:
        """The user's model without adapters and taps, for inference and export.

        It is the object that was passed to ``instrument`` (or built from its spec),
        trained in place: its state_dict has exactly its original keys, its forward
        is its own, so it has no autoprobe overhead. Its train/eval mode is this
        module's.

        Returns:
            The plain model.

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
            ...                           torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            ...                           torch.nn.Linear(8, 3))
            >>> probed = instrument(net, input_size=(3, 12, 12)).eval()
            >>> x = torch.randn(2, 3, 12, 12)
            >>> torch.equal(probed.strip()(x), probed(x).output)
            True
        """
        return getattr(self, _MODEL)

    @property
    def code(self) -> str:
        """The generated Python of the current mode's tapped graph, for debugging."""
        return (self._graphs.train if self.training else self._graphs.eval).code

    def __getstate__(self) -> dict[str, Any]:
        # Generated GraphModule code pickles by re-tracing into a fresh module tree, which
        # would lose the sharing with ``self.model``; keep the recipe and rebuild instead.
        state = self.__dict__.copy()
        state.pop("_graphs", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        plan: _Plan = self._plan
        model = getattr(self, _MODEL)
        adapters = getattr(self, ADAPTERS)
        if plan.backend != "fx":
            self._graphs = _hook_graphs(model, adapters, plan.points, plan.hooks)
            return
        train_traced, eval_traced = _trace_both_modes(model, plan.input_size, plan.leaf_modules, plan.leaf_paths)
        _check_unchanged(plan, build_layer_graph(train_traced))
        self._graphs = _build_graphs(model, adapters, plan.points, train_traced, eval_traced)


# --------------------------------------------------------------------------- instrument


def instrument(
    model: nn.Module | str,
    selection: Selection | None = None,
    *,
    rules: str | RulePack = "default",
    points: int | None = None,
    loss: ObjectiveName | Objective = "imachsr",
    input_size: Sequence[int] | None = None,
    task: Task | None = None,
    alpha: float | Mapping[str, float] | None = None,
    lam: float | Mapping[str, float] | None = None,
    schedule: Schedule = "constant",
    num_classes: int | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    leaf_paths: Sequence[str] = (),
) -> Probed:
    """Make a model trainable with deep supervision at its automatically chosen points.

    The model is traced in train and eval mode; after each point's node an adapter
    q_m maps z_m to the label space (pool + linear to K classes, or 1x1 conv + bilinear
    upsampling to the output's resolution); the forward returns the output, every
    q_m(z_m) and every z_m. The user's model is shared, not copied, and not mutated.
    A selection made on a fallback backend (``export``, ``hooks``: fx cannot trace the
    model) is tapped with forward hooks that live only during each forward, at the
    point's module or, for a function inside a module, at that module's output.

    Args:
        model: a live ``nn.Module`` (its weights are trained), or a spec (timm name,
            ``tv:NAME``, ``package.module:factory``) built on the CPU with fresh weights.
        selection: the points, from ``autoprobe.inspect``; ``None`` selects them now with
            ``rules`` and ``points`` (the same points ``inspect(model)`` shows).
        rules: rule pack name, ``.toml`` path or ``RulePack``, when ``selection`` is ``None``.
        points: force M, when ``selection`` is ``None``.
        loss: ``"imachsr"`` (Eq. 3), ``"dsn"``, ``"dks"``, or an ``Objective`` over the point names.
        input_size: input without batch, e.g. ``(3, 224, 224)``; defaults to the selection's,
            else the model's own. Dense adapters produce logits at the output resolution
            for this size, so train at it.
        task: ``"classification"`` or ``"dense"``; inferred from the output's shape
            ((B, K) or (B, K, H, W)) when ``None``, and checked against it when given.
        alpha: intermediate weight (MI for imachsr, CE for dsn/dks); one value or per point.
        lam: negative-entropy weight (imachsr only); one value or per point.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay of the intermediate weights.
        num_classes: classifier width when ``model`` is a spec; with a module, checked against
            the output (K is always read from the output).
        leaf_modules: module classes fx must not trace into.
        leaf_paths: module paths fx must not trace into.

    Returns:
        The ``Probed`` model.

    Raises:
        SelectionError: the selection names a node this model does not have, its depth or shapes
            differ, or it is given together with ``rules``/``points``.
        InstrumentError: the model is on meta, a fallback-backend point is not inside a module, the output
            is not logits, a point has no channel axis, the task does not fit, or a loss option
            does not fit the objective.
        ModelSpecError, TraceError, InputSizeError: from resolving and tracing the model.

    Example:
        >>> import torch, timm
        >>> net = timm.create_model("resnet18", num_classes=10, pretrained=False)
        >>> probed = instrument(net, input_size=(3, 64, 64))
        >>> out = probed(torch.randn(2, 3, 64, 64))
        >>> list(out.heads)
        ['layer1.1.act2', 'layer2.1.act2', 'layer3.1.act2']
        >>> total, parts = probed.loss(out, torch.tensor([1, 7]))
        >>> total.backward()
    """
    module, label = _live_model(model, num_classes)
    if selection is None:
        from .api import analyze

        selection = analyze(
            model, input_size=input_size, rules=rules, points=points, train=False,
            leaf_modules=leaf_modules, leaf_paths=leaf_paths, num_classes=num_classes,
        ).selection
    elif points is not None or not (isinstance(rules, str) and rules == "default"):
        raise SelectionError(
            "instrument got a selection and also rules/points to make one; pass one or the other. "
            "Hint: `autoprobe.inspect(model, rules=..., points=...)` then `instrument(model, selection)`."
        )
    if not isinstance(selection, Selection):
        raise SelectionError(
            f"selection must be an autoprobe Selection (from autoprobe.inspect); got {type(selection).__name__}"
        )
    size = _input_size(input_size, selection)
    leaves, paths = tuple(leaf_modules), tuple(leaf_paths)

    if selection.backend == "fx":
        train_traced, eval_traced = _trace_both_modes(module, size, leaves, paths)
        layer_graphs = {"train": build_layer_graph(train_traced), "eval": build_layer_graph(eval_traced)}
        infos = _check_selection(selection, layer_graphs, label)
        hooks: tuple[tuple[str, int], ...] = ()
    else:
        # The model runs its own Python, whatever its mode: one graph, in the selection's mode, to check against.
        rung = trace_with_fallbacks(
            module, size, train=selection.mode == "train", leaf_modules=leaves, leaf_paths=paths,
            backends=(selection.backend,),
        )
        train_traced, graph = rung.traced, rung.graph
        infos = _check_selection(selection, {selection.mode: graph}, label)
        hooks = tuple(_hook_target(module, graph, info) for info in infos)
        infos = [_tapped_info(graph, info, target) for info, target in zip(infos, hooks)]

    output_shape = _output_shape(train_traced, label)
    resolved_task = _resolve_task(task, output_shape)
    classes = output_shape[1]
    if num_classes is not None and num_classes != classes:
        raise InstrumentError(
            f"num_classes={num_classes} but {label}'s output has shape {output_shape}, i.e. K={classes}. "
            "Hint: build the model with the classifier width you train, or leave num_classes out."
        )
    if classes < 2:
        raise InstrumentError(
            f"{label}'s output has K={classes} channels; autoprobe's losses need K >= 2 class logits."
        )
    out_size = tuple(output_shape[2:]) if resolved_task == "dense" else None

    keys = _adapter_keys([p.name for p in selection.points])
    adapters = _make_adapters(module, infos, keys, resolved_task, classes, out_size)
    plan_points = tuple((p.name, keys[p.name]) for p in selection.points)
    if hooks:
        graphs = _hook_graphs(module, adapters, plan_points, hooks)
    else:
        graphs = _build_graphs(module, adapters, plan_points, train_traced, eval_traced)
    objective = _make_objective(loss, infos, alpha, lam, schedule)

    head_shape = output_shape
    taps = tuple(
        Tap(
            point=info.name,
            adapter=f"{ADAPTERS}.{keys[info.name]}",
            fx_names=graphs.fx_names[info.name],
            feature_shape=info.shape or (),
            layout=info.layout,
            head_shape=head_shape,
            adapter_type=type(adapters[keys[info.name]]).__name__,
            parameters=adapter_parameter_count(adapters[keys[info.name]]),
            cloned=graphs.cloned[info.name],
            hooked=_hook_label(hooks[i]) if hooks else "",
        )
        for i, info in enumerate(infos)
    )
    report = RewriteReport(
        model=label,
        task=resolved_task,
        task_source="given" if task is not None else "inferred",
        num_classes=classes,
        input_shape=train_traced.input_shape,
        output_shape=output_shape,
        objective=repr(objective),
        taps=taps,
        model_parameters=sum(p.numel() for p in module.parameters()),
        backend=selection.backend,
    )
    plan = _Plan(
        input_size=size,
        leaf_modules=leaves,
        leaf_paths=paths,
        points=plan_points,
        shapes=tuple(tuple((info.shape or ())[1:]) for info in infos),
        label=label,
        backend=selection.backend,
        hooks=hooks,
    )
    return Probed(module, adapters, objective, selection, report, plan, graphs)


def _trace_both_modes(
    model: nn.Module, size: Sequence[int], leaves: Sequence[type[nn.Module]], paths: Sequence[str]
) -> tuple[Traced, Traced]:
    """The train-mode and eval-mode fx traces; the model's own flags are left as they were."""
    return (
        trace_model(model, size, train=True, leaf_modules=leaves, leaf_paths=paths),
        trace_model(model, size, train=False, leaf_modules=leaves, leaf_paths=paths),
    )


def _live_model(model: nn.Module | str, num_classes: int | None) -> tuple[nn.Module, str]:
    """The module to train and its label; specs are built on the CPU with fresh weights."""
    if isinstance(model, nn.Module):
        device = next((t.device for t in (*model.parameters(), *model.buffers())), None)
        if device is not None and device.type == "meta":
            raise InstrumentError(
                f"{type(model).__name__} is on the meta device: it has no weights to train. "
                "Hint: build it on a real device (or pass its spec string, which instrument builds on the CPU)."
            )
        return model, type(model).__name__
    if not isinstance(model, str):
        raise InstrumentError(f"model must be an nn.Module or a model spec string; got {type(model).__name__}")
    from .models import resolve_model

    resolved = resolve_model(model, num_classes=num_classes, device="cpu")
    return resolved.module, resolved.label


def _input_size(given: Sequence[int] | None, selection: Selection) -> tuple[int, ...]:
    if given is None:
        return tuple(selection.input_shape[1:])
    size = tuple(given)
    if not size or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise InstrumentError(f"input_size {given!r} must be positive integers without the batch, like (3, 224, 224).")
    return size


def _check_selection(
    selection: Selection, graphs: Mapping[str, LayerGraph], label: str
) -> list[LayerInfo]:
    """The train-mode layer info of every point, after checking the selection fits this model.

    A selection fits when the graph of the mode it was made in has its depth D and,
    at each point, a node of that name with the same feature shape and layout, and
    the point also exists in the other mode's graph.
    """
    reference = graphs.get(selection.mode, graphs["eval"])
    origin = f"the selection (made for {selection.model!r} at input {selection.input_shape[1:]})"
    if selection.depth != reference.depth:
        raise SelectionError(
            f"{origin} is for a model of depth D={selection.depth}; {label} has D={reference.depth} "
            f"({reference.mode} mode). It was made for another model.\n"
            "Hint: re-run `autoprobe.inspect(model)` on this model, or pass selection=None."
        )
    infos: list[LayerInfo] = []
    for point in selection.points:
        for mode, graph in graphs.items():
            if point.name not in graph:
                close = difflib.get_close_matches(point.name, [n.name for n in graph], n=3)
                hint = f" Closest nodes: {', '.join(close)}." if close else ""
                raise SelectionError(
                    f"point {point.name!r} of {origin} is not a node of {label}'s {mode}-mode graph.{hint}\n"
                    "Hint: the selection comes from another model or an older version of it, or the point sits on "
                    "a branch that only runs in one mode; re-run `autoprobe.inspect(model)` on this model."
                )
        info = reference[point.name]
        have = (info.shape or ())[1:]
        want = tuple(point.shape[1:])
        if have != want or info.layout != point.layout:
            raise SelectionError(
                f"point {point.name!r}: {origin} expects a {point.layout} feature of shape {want}, but {label} "
                f"produces {info.layout} {have} there at input {reference.input_shape[1:]}.\n"
                "Hint: if the selection is from this model, pass the input size it was made at (input_size=...); "
                "if it is from another model, re-run `autoprobe.inspect(model)` on this one."
            )
        info = graphs.get("train", reference)[point.name]
        if info.channels is None or (info.spatial is None and info.layout != "NC"):
            raise InstrumentError(
                f"point {point.name!r} ({info.layout or 'no layout'} {have}) has no per-example channel axis "
                "an adapter can read (e.g. window attention folds positions into the batch).\n"
                "Hint: choose another point, e.g. the block output after it."
            )
        infos.append(info)
    return infos


def _check_unchanged(plan: _Plan, graph: LayerGraph) -> None:
    """After unpickling: every point still exists with the shape it had."""
    for (name, _), shape in zip(plan.points, plan.shapes):
        if name not in graph:
            raise SelectionError(
                f"point {name!r} of the saved probed {plan.label} no longer exists in the model's graph; "
                "the model's code changed since it was saved. Hint: load the state_dict into a freshly "
                "instrumented model instead."
            )
        have = tuple((graph[name].shape or ())[1:])
        if have != shape:
            raise SelectionError(
                f"point {name!r} of the saved probed {plan.label} had shape {shape}, now {have}; "
                "the model's code changed since it was saved. Hint: re-instrument the model."
            )


def _output_shape(traced: Traced, label: str) -> tuple[int, ...]:
    out = traced.graph_module.graph.output_node().args[0]
    meta = out.meta.get("tensor_meta") if isinstance(out, fx.Node) else None
    if not isinstance(out, fx.Node) or not hasattr(meta, "shape"):
        raise InstrumentError(
            f"{label}'s forward returns {_describe(out)}, not one logits tensor; autoprobe's losses need "
            "(B, K) or (B, K, H, W) logits.\n"
            "Hint: wrap the model in a module whose forward returns only the logits (e.g. `model(x)['out']`)."
        )
    return tuple(int(s) for s in meta.shape)


def _describe(value: object) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"a sequence of {len(value)} values"
    return "a non-tensor value"


def _resolve_task(task: Task | None, output_shape: tuple[int, ...]) -> str:
    inferred = {2: "classification", 4: "dense"}.get(len(output_shape))
    if task is not None and task not in get_args(Task):
        raise InstrumentError(f"unknown task {task!r}; expected one of {list(get_args(Task))} or None to infer it")
    if inferred is None:
        raise InstrumentError(
            f"the model output has shape {output_shape}; autoprobe supports (B, K) logits (classification) "
            "and (B, K, H, W) logits (dense prediction). Hint: wrap the model so it returns one of these."
        )
    if task is not None and task != inferred:
        raise InstrumentError(
            f"task={task!r} does not fit the model output of shape {output_shape}, which is {inferred} logits; "
            f"{task} needs {'(B, K)' if task == 'classification' else '(B, K, H, W)'} logits. "
            "Hint: leave task=None to infer it, or wrap the model to return the logits of your task."
        )
    return inferred


def _adapter_keys(names: Sequence[str]) -> dict[str, str]:
    """Point name -> ModuleDict key: non-identifier characters become ``_``, clashes get a suffix.

    Example:
        >>> _adapter_keys(["layer1.0.act", "layer1_0.act", "keys"])
        {'layer1.0.act': 'layer1_0_act', 'layer1_0.act': 'layer1_0_act_2', 'keys': 'keys_'}
    """
    keys: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = re.sub(r"\W", "_", name) or "point"
        # ModuleDict's own attributes (keys, items, update, ...) cannot be submodule names.
        while hasattr(nn.ModuleDict, base):
            base += "_"
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys[name] = key
    return keys


def _make_adapters(
    model: nn.Module,
    infos: Sequence[LayerInfo],
    keys: Mapping[str, str],
    task: str,
    num_classes: int,
    out_size: tuple[int, ...] | None,
) -> nn.ModuleDict:
    reference = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    adapters = nn.ModuleDict()
    for info in infos:
        # A private generator seeded from the user's seed and the point's name: instrument leaves the
        # global RNG where it was, and adding or removing a point does not change the other adapters.
        digest = hashlib.sha256(f"{torch.initial_seed()}:{info.name}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            adapter = make_adapter(
                channels=info.channels,
                layout=info.layout,
                spatial=info.spatial,
                task=task,  # type: ignore[arg-type]
                num_classes=num_classes,
                out_size=out_size,  # type: ignore[arg-type]
            )
        adapters[keys[info.name]] = adapter.to(device=device, dtype=dtype)
    adapters.train(model.training)
    return adapters


def _make_objective(
    loss: ObjectiveName | Objective,
    infos: Sequence[LayerInfo],
    alpha: float | Mapping[str, float] | None,
    lam: float | Mapping[str, float] | None,
    schedule: Schedule,
) -> Objective:
    names = [info.name for info in infos]
    if isinstance(loss, Objective):
        if alpha is not None or lam is not None or schedule != "constant":
            raise InstrumentError(
                "alpha, lam and schedule configure a named loss; a given Objective already has its own. "
                "Hint: set them on the Objective, or pass loss='imachsr'|'dsn'|'dks'."
            )
        if tuple(loss.points) != tuple(names):
            raise InstrumentError(
                f"the given objective is over points {list(loss.points)}, the taps are at {names}. "
                "Hint: build it with `[p.name for p in selection.points]`."
            )
        return loss
    if not isinstance(loss, str) or loss not in get_args(ObjectiveName):
        raise InstrumentError(f"unknown loss {loss!r}; expected one of {list(get_args(ObjectiveName))} or an Objective")
    layouts = {info.name: info.layout for info in infos} if loss == "imachsr" else None
    return make_objective(loss, names, layouts, alpha=alpha, lam=lam, schedule=schedule)


def _check_target(task: str, output: Tensor, target: Tensor) -> None:
    """Labels must be integer ids shaped like the output without its class axis."""
    if not isinstance(target, Tensor):
        raise InstrumentError(f"labels must be a tensor of integer class ids; got {type(target).__name__}")
    expected = (output.shape[0], *output.shape[2:])
    if tuple(target.shape) == expected:
        return
    hint = ""
    if tuple(target.shape) == tuple(output.shape):
        hint = " They look like one-hot or soft labels: pass `target.argmax(1)`."
    elif task == "dense" and tuple(target.shape) == (output.shape[0], 1, *output.shape[2:]):
        hint = " Drop the channel axis: pass `target.squeeze(1)`."
    elif task == "dense" and target.dim() == 3:
        hint = (
            f" Dense adapters predict at the output resolution {tuple(output.shape[2:])}: resize the labels "
            "(nearest) or instrument at the input size you train with."
        )
    raise InstrumentError(
        f"labels of shape {tuple(target.shape)} do not fit the {task} task: the model output has shape "
        f"{tuple(output.shape)}, so labels must have shape {expected} (integer class ids).{hint}"
    )


# --------------------------------------------------------------------------- graph surgery


def _build_graphs(
    model: nn.Module,
    adapters: nn.ModuleDict,
    points: Sequence[tuple[str, str]],
    train_traced: Traced,
    eval_traced: Traced,
) -> _ModeGraphs:
    train_gm, train_cloned, train_names = _tapped_graph_module(model, adapters, points, train_traced)
    eval_gm, eval_cloned, eval_names = _tapped_graph_module(model, adapters, points, eval_traced)
    return _ModeGraphs(
        train=train_gm,
        eval=eval_gm,
        cloned={name: train_cloned[name] or eval_cloned[name] for name, _ in points},
        fx_names={name: (train_names[name], eval_names[name]) for name, _ in points},
    )


def _tapped_graph_module(
    model: nn.Module, adapters: nn.ModuleDict, points: Sequence[tuple[str, str]], traced: Traced
) -> tuple[fx.GraphModule, dict[str, bool], dict[str, str]]:
    """Copy ``traced``'s graph onto ``model`` and ``adapters`` and tap it at ``points``.

    Returns:
        The GraphModule returning ``(output, heads, features)``, whether each point's
        feature is copied, and each point's fx node name.
    """
    source = traced.graph_module.graph
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(source, copies)
    # The holder's attribute tree is {model, autoprobe_adapters}: the user's own module tree sits one level down.
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = f"{_MODEL}.{node.target}"
    by_qualname = {traced.qualnames[old.name]: new for old, new in copies.items()}
    order = {node: i for i, node in enumerate(graph.nodes)}

    heads: dict[str, fx.Node] = {}
    features: dict[str, fx.Node] = {}
    cloned: dict[str, bool] = {}
    fx_names: dict[str, str] = {}
    for name, key in points:
        node = by_qualname.get(name)
        if node is None:
            raise SelectionError(
                f"point {name!r} is not a node of the {traced.mode}-mode graph. "
                "Hint: re-run `autoprobe.inspect(model)` and instrument with that selection."
            )
        fx_names[name] = node.name
        cloned[name] = _mutated_later(node, order, model)
        feature = node
        if cloned[name]:
            with graph.inserting_after(node):
                feature = graph.call_method("clone", (node,))
        with graph.inserting_after(feature):
            heads[name] = graph.call_module(f"{ADAPTERS}.{key}", (feature,))
        features[name] = feature
    graph.output((output, heads, features))

    holder = fx.GraphModule(nn.Module(), fx.Graph(), class_name=f"Probed{type(model).__name__}")
    setattr(holder, _MODEL, model)
    setattr(holder, ADAPTERS, adapters)
    holder.graph = graph
    graph.lint()
    holder.recompile()
    return holder, cloned, fx_names


def _mutated_later(node: fx.Node, order: Mapping[fx.Node, int], model: nn.Module) -> bool:
    """Whether an op after ``node`` writes in place into ``node``'s storage.

    The tapped value must be what ``node`` produced: the adapter (and the NE loss
    on z_m) would otherwise see the overwritten tensor, or autograd would fail on
    a saved tensor modified in place. Aliases are followed through view-like ops,
    identity/dropout modules and in-place ops (which return their input), in both
    directions; unknown ops are assumed to copy.
    """
    alias = {node}
    frontier = [node]
    while frontier:
        current = frontier.pop()
        linked = [u for u in current.users if _aliases_first_arg(u, model) and _first_arg(u) is current]
        if _aliases_first_arg(current, model) and isinstance(_first_arg(current), fx.Node):
            linked.append(_first_arg(current))
        for other in linked:
            if other not in alias:
                alias.add(other)
                frontier.append(other)
    start = order[node]
    return any(
        order[user] > start and _writes_first_arg(user, model) and _first_arg(user) in alias
        for member in alias
        for user in member.users
    )


def _first_arg(node: fx.Node) -> object:
    return node.args[0] if node.args else None


def _aliases_first_arg(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_method":
        return node.target in _ALIAS_METHODS or _writes_first_arg(node, model)
    if node.op == "call_function":
        return node.target in _ALIAS_FUNCTIONS or _writes_first_arg(node, model)
    if node.op == "call_module":
        module = _submodule(model, node)
        kind = type(module).__name__.lower()
        is_identity = isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or kind.startswith("drop")
        return is_identity or _writes_first_arg(node, model)
    return False


def _writes_first_arg(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        return (name.endswith("_") and not name.endswith("__")) or _inplace_argument(node)
    if node.op == "call_module":
        return getattr(_submodule(model, node), "inplace", False) is True
    return False


def _inplace_argument(node: fx.Node) -> bool:
    """``F.relu(x, inplace=True)``, also given positionally."""
    if node.kwargs.get("inplace") is True:
        return True
    if not any(a is True for a in node.args[1:]):
        return False
    try:
        bound = pyinspect.signature(node.target).bind_partial(*node.args, **node.kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def _submodule(model: nn.Module, node: fx.Node) -> nn.Module:
    target = str(node.target).removeprefix(f"{_MODEL}.")
    return model.get_submodule(target)


# --------------------------------------------------------------------------- fallback backends: hooks

def _hook_target(model: nn.Module, graph: LayerGraph, info: LayerInfo) -> tuple[str, int]:
    """The module (and which of its calls) whose output a forward hook taps for a point.

    A point that is a module call is tapped there (``path_N``, as the hooks backend names
    repeated calls, is the N-th call). A function inside a module (export's ``blocks.0.add``)
    is tapped at that module's output, the nearest value a hook can see.
    """
    modules = dict(model.named_modules())
    if info.name and info.name in modules:
        return info.name, 0
    repeated = re.fullmatch(r"(.+)_(\d+)", info.name)
    if repeated and repeated.group(1) in modules:
        return repeated.group(1), int(repeated.group(2))
    if not info.module_path:
        raise InstrumentError(
            f"point {info.name!r} is a {info.kind} op at the top level of {type(model).__name__}'s forward, "
            f"from a {graph.backend!r} graph: forward hooks can only tap module outputs.\n"
            "Hint: pick points inside modules (`autoprobe inspect --all-candidates` lists them) with "
            "`autoprobe.inspect(model, points=...)`, or make fx trace the model (leaf_modules=[...])."
        )
    return info.module_path, 0


def _tapped_info(graph: LayerGraph, info: LayerInfo, target: tuple[str, int]) -> LayerInfo:
    """What the hook on ``target`` sees: the point itself, or the last node of the module it sits in."""
    path, _ = target
    if path == info.name or (target[1] and info.name == f"{path}_{target[1]}"):
        return info
    inside = [n for n in graph if n.op != "output" and (n.module_path == path or n.module_path.startswith(path + "."))]
    last = max(inside, key=lambda n: n.order)
    if last.channels is None or (last.spatial is None and last.layout != "NC"):
        raise InstrumentError(
            f"point {info.name!r} is tapped at module {path}'s output, which has no channel axis an adapter can "
            f"read ({last.layout or 'no layout'} {last.shape}). Hint: choose another point."
        )
    return replace(last, name=info.name)


def _hook_label(target: tuple[str, int]) -> str:
    path, call = target
    return path if call == 0 else f"{path}#{call}"


@dataclass(frozen=True)
class _HookTap:
    point: str
    key: str
    module: str
    call: int


class _HookRunner:
    """Runs the user's model with forward hooks that tap the points, for one forward only.

    The hooks are registered on entry and removed on exit (also on error), so the user's
    modules carry no hook between calls, ``strip()`` gives back a hook-free model and
    ``torch.save`` pickles none. Each tapped output is copied: with no graph to inspect,
    a later in-place op of the model cannot be ruled out.
    """

    def __init__(self, model: nn.Module, adapters: nn.ModuleDict, taps: Sequence[_HookTap]) -> None:
        self.model = model
        self.adapters = adapters
        self.taps = tuple(taps)
        self.code = "# forward hooks, registered for each forward:\n" + "\n".join(
            f"#   {t.module} (call {t.call}) -> {ADAPTERS}.{t.key}" for t in self.taps
        )

    def __call__(self, x: Tensor) -> tuple[Any, dict[str, Tensor], dict[str, Tensor]]:
        heads: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {}
        calls: Counter[str] = Counter()
        by_module: dict[str, list[_HookTap]] = {}
        for tap in self.taps:
            by_module.setdefault(tap.module, []).append(tap)

        def hook(path: str, _module: nn.Module, _args: Any, output: Any) -> None:
            call = calls[path]
            calls[path] += 1
            for tap in by_module[path]:
                if tap.call != call:
                    continue
                if not isinstance(output, Tensor):
                    raise InstrumentError(
                        f"point {tap.point!r}: module {path} returned {_describe(output)}, not a tensor, so its "
                        "output cannot be tapped. Hint: choose another point."
                    )
                features[tap.point] = output.clone()
                heads[tap.point] = self.adapters[tap.key](features[tap.point])

        handles = [
            self.model.get_submodule(path).register_forward_hook(functools.partial(hook, path)) for path in by_module
        ]
        try:
            output = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        missing = [t for t in self.taps if t.point not in heads]
        if missing:
            seen = ", ".join(f"{t.module} ran {calls[t.module]}x" for t in missing)
            raise InstrumentError(
                f"points {[t.point for t in missing]} were not reached in this forward ({seen}); the model took "
                "another branch than when it was instrumented. Hint: instrument it on inputs like the ones you train on."
            )
        order = [t.point for t in self.taps]
        return output, {p: heads[p] for p in order}, {p: features[p] for p in order}


def _hook_graphs(
    model: nn.Module,
    adapters: nn.ModuleDict,
    points: Sequence[tuple[str, str]],
    hooks: Sequence[tuple[str, int]],
) -> _ModeGraphs:
    """The hook runner, for both modes: the model's own Python follows its ``training`` flag."""
    taps = [_HookTap(name, key, path, call) for (name, key), (path, call) in zip(points, hooks)]
    runner = _HookRunner(model, adapters, taps)
    return _ModeGraphs(
        train=runner,
        eval=runner,
        cloned={name: True for name, _ in points},
        fx_names={name: ("", "") for name, _ in points},
    )
