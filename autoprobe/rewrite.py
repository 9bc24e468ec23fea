"""Stage 5: ``instrument`` a model: resolve it, check the selection, build adapters, choose the engine.

What runs where:

- ``instrument`` (here) resolves the model, selects or checks the points, reads the
  prediction from the model's output (``outputs.OutputSpec``), decides the task and the
  head shapes, builds one adapter per point and the objective, and picks the engine;
- ``fx_engine.FxEngine`` taps fx selections by rewriting the train- and eval-mode graphs;
- ``hook_engine.HookEngine`` taps ``export``/``hooks`` selections with per-forward hooks;
- ``probed.Probed`` is what the user gets; it calls the engine through ``taps.TapEngine``.

Tasks (``task=``): ``classification``/``dense`` (class ids, cross entropy; dense-ness from
the output's rank, (B, K) or (B, K, *S) with 1, 2 or 3 spatial axes), ``binary`` (one
logit channel, 0/1 targets), ``multilabel`` (K independent 0/1 targets), ``regression``
(float targets with the output's channels; never inferred from float labels).

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv1d(2, 8, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.Conv1d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv1d(8, 4, 1))
    >>> probed = instrument(net, input_size=(2, 32), points=1)
    >>> probed.report.task, [h.shape for h in probed(torch.randn(2, 2, 32)).heads.values()]
    ('dense', [torch.Size([2, 4, 32])])
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import nn

from .adapters import (
    AdapterHead,
    HeadShape,
    Task,
    adapter_parameter_count,
    check_adapter_head,
    make_adapter,
)
from .api import TRACE_KEYWORDS, Analysis, analyze, trace_options
from .backends import ModelTrace, part_refusal
from .errors import AutoprobeError, InstrumentError, SelectionError, TraceError, UsageError
from .fx_engine import FxEngine, FxRecipe
from .graph import LayerGraph, LayerInfo
from .hook_engine import HookEngine, HookRecipe, HookTarget, hook_targets
from .layout import Layout
from .losses import DEFAULT_OBJECTIVE, LossOptions, Objective, ObjectiveName, make_objective
from .losses.objectives import loss_options as _loss_options
from .losses import IMacHSR
from .meta import device_of
from .models import resolve_model
from .outputs import OutputSelector, OutputSpec, check_channel_axis
from .probed import Probed, ProbedOutput, RewriteReport, Tap
from .rules import RulePack
from .select import Selection, why_not_point
from .sizes import parse_input_size
from .taps import ADAPTERS, TapEngine, TapSite
from .trace import Traced, TraceOptions

__all__ = ["instrument", "Probed", "ProbedOutput", "RewriteReport", "Tap", "ADAPTERS", "LabelResolution"]

LabelResolution = Literal["upsample", "downsample"]
"""Dense heads: adapter logits at the output's resolution, or at each point's own (the target is resized)."""

# task -> the objective's target kind (losses.TargetKind).
_TARGET_KINDS = {
    "classification": "multiclass", "dense": "multiclass", "binary": "binary", "multilabel": "multilabel",
    "regression": "regression",
}


def instrument(
    model: nn.Module | str,
    selection: Selection | None = None,
    *,
    rules: str | RulePack = "default",
    points: int | None = None,
    loss: ObjectiveName | Objective = DEFAULT_OBJECTIVE,
    input_size: Sequence[int] | None = None,
    task: Task | None = None,
    output: OutputSelector = None,
    ignore_index: int = -100,
    num_classes: int | None = None,
    loss_options: LossOptions | None = None,
    options: TraceOptions | None = None,
    **deprecated: Any,
) -> Probed:
    """Make a model trainable with deep supervision at its automatically chosen points.

    The model is traced in train and eval mode; after each point's node an adapter
    q_m maps z_m to the prediction space (by default mmseg's FCN auxiliary head: 3x3 conv,
    BatchNorm, ReLU, dropout, 1x1 conv to K channels, resized to the output's resolution; for
    a vector output pool, Linear, LayerNorm, ReLU, dropout, Linear); the forward returns the model's own
    output, every q_m(z_m) and every z_m. The user's model is shared, not copied, and not
    mutated. A selection made on a fallback backend (``export``, ``hooks``: fx cannot trace
    the model) is tapped with forward hooks that live only during each forward.

    Args:
        model: a live ``nn.Module`` (its weights are trained), or a spec (timm name,
            ``tv:NAME``, ``package.module:factory``) built on the CPU with fresh weights.
        selection: the points, from ``autoprobe.inspect`` (or ``autoprobe.placement``); ``None``
            selects them now with ``rules`` and ``points``.
        rules: rule pack name, ``.toml`` path or ``RulePack``, when ``selection`` is ``None``.
        points: force M, when ``selection`` is ``None``.
        loss: ``"dsn"`` (the default: the output's loss at every head, alpha 0.3), ``"imachsr"``
            (Eq. 3), ``"dks"``, or an ``Objective`` over the point names. The default was chosen on
            validation by a rule registered before its runs (EVIDENCE.md section 7).
        input_size: input without batch, e.g. ``(3, 224, 224)``; defaults to the selection's,
            else the model's own. Dense adapters and token grids are built for this size.
        task: ``"classification"``/``"dense"`` (class ids; which one follows from the output's
            rank, and is checked when given), ``"binary"`` (K=1 logits, 0/1 targets),
            ``"multilabel"`` (K independent 0/1 targets), ``"regression"`` (float targets with
            the output's channels). ``None`` infers classification/dense; float targets are
            never taken for regression silently.
        output: which part of the model's output is the prediction: a key (``"out"``), an
            attribute (``"logits"``), an index, or a callable; ``None`` takes the output itself
            if it is a tensor, else ``out``, then ``logits``, then its only tensor of 2 or more dims.
            The model's own output object is returned unchanged in ``ProbedOutput.output``. A
            callable must be a module-level function for ``torch.save(probed)`` to pickle it.
        ignore_index: target value excluded from every loss term and check (255 for
            torchvision/Cityscapes masks); class ids only.
        num_classes: classifier width when ``model`` is a spec; with a module, checked against
            the output (K is always read from the output).
        loss_options: how the points are trained, one ``LossOptions``: the weights (``alpha``, ``lam``,
            ``beta``, ``temperature``), their ``schedule``, the output loss's ``label_smoothing``,
            ``class_weights``, ``output_loss`` and ``regression_loss``, the MI estimator's options, the
            ``gate``, and the heads' form: ``head`` (``"conv"``, the default, mmsegmentation's FCN auxiliary
            head; or ``"linear"``) and ``label_resolution`` (dense outputs: ``"upsample"``, adapter logits at
            the output's resolution, or ``"downsample"``, at each point's own with the target resized to it:
            nnU-Net/MONAI deep supervision). ``None`` is ``LossOptions()``; see ``autoprobe.LossOptions``.
        options: how to trace, one ``TraceOptions``: ``leaf_modules``/``leaf_paths`` fx must not trace into,
            ``allow_real_data`` (the hooks backend may run the model on one seeded random batch when its
            forward reads tensor values, see ``inspect``), and for a model called with keywords
            (``model(pixel_values=x)``) ``input_name="pixel_values"``, with extra inputs in
            ``forward_kwargs=`` (example tensors of the right shape). The probed model is then called like the
            model (``probed(pixel_values=x, attention_mask=m)``). Its ``mode`` is ignored: both modes are traced.
        **deprecated: the keywords before the records (``alpha=``, ``head=``, ``gate=``, ... and
            ``leaf_paths=``, ``allow_real_data=``, ...): still taken, with a ``DeprecationWarning`` naming
            the record's field.

    Returns:
        The ``Probed`` model. Wrap it (not the user's model) for DDP/FSDP2, after this call;
        see ``Probed``.

    Raises:
        SelectionError: the selection names a node this model does not have, its depth or shapes
            differ, or it is given together with ``rules``/``points``.
        InstrumentError: the model is on meta, there is no point to supervise, a point cannot be
            tapped, the output has no prediction tensor (the message lists what it holds), the
            task does not fit the output, or a loss option does not fit the objective.
        InputSizeError: ``input_size`` is not a size, or the model rejects it.
        ModelSpecError, TraceError: from resolving and tracing the model.

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
    opts = trace_options(options, {k: v for k, v in deprecated.items() if k in TRACE_KEYWORDS}, "instrument")
    losses = _loss_options(loss_options, {k: v for k, v in deprecated.items() if k not in TRACE_KEYWORDS}, "instrument")
    module, label, spec_size = _live_model(model, num_classes)
    label_resolution = losses.label_resolution
    analysis: Analysis | None = None
    if selection is None:
        # The live module itself, a spec's too (built once, on the CPU): its trace is then reused below.
        analysis = analyze(
            module, input_size=input_size if input_size is not None else spec_size, rules=rules, points=points,
            options=dataclasses.replace(opts, mode="eval"),
        )
        selection = dataclasses.replace(analysis.selection, model=label)
        if analysis.traced is not None and analysis.traced.part:
            raise InstrumentError(part_refusal(label, analysis.traced.part))
    elif points is not None or not (isinstance(rules, str) and rules == "default"):
        raise SelectionError(
            "instrument got a selection and also rules/points to make one; pass one or the other. "
            "Hint: `autoprobe.inspect(model, rules=..., points=...)` then `instrument(model, selection)`."
        )
    if not isinstance(selection, Selection):
        raise SelectionError(
            f"selection must be an autoprobe Selection (from autoprobe.inspect); got {type(selection).__name__}"
        )
    if label_resolution not in get_args(LabelResolution):
        raise InstrumentError(
            f"label_resolution={label_resolution!r}; expected one of {list(get_args(LabelResolution))}"
        )
    form = check_adapter_head(losses.head)
    size = _input_size(input_size, selection)

    # One tracing object per call: the analysis's own when this call made the selection (its trace is tapped).
    tracing = analysis.trace if analysis is not None and analysis.trace is not None else ModelTrace(module, size, opts)
    try:
        placed = _place(tracing, selection, label)
    except TraceError as exc:
        # A given selection of a model only its backbone traces (a detector, from `inspect`): the same
        # refusal, with what to pass, as when instrument makes the selection itself.
        part = _traced_part(tracing, selection)
        if part is None:
            raise
        raise InstrumentError(part_refusal(label, part)) from exc
    infos, targets = placed.infos, placed.targets
    example = tracing.example(placed.train.mode, selection.backend)
    spec = OutputSpec.resolve(output, example.output, model=label)
    output_shape = tuple(int(s) for s in spec.select(example.output).shape)
    axes = tracing.output_axes(placed.train.mode, selection.backend, spec.select) if len(output_shape) >= 3 else None
    check_channel_axis(axes, output_shape, spec, label)
    resolved_task, shape = _resolve_task(task, output_shape, label)
    classes = output_shape[1]
    if num_classes is not None and num_classes != classes:
        raise InstrumentError(
            f"num_classes={num_classes} but {label}'s output has shape {output_shape}, i.e. K={classes}. "
            "Hint: build the model with the classifier width you train, or leave num_classes out."
        )
    if label_resolution == "downsample" and shape != "dense":
        raise InstrumentError(
            f"label_resolution='downsample' applies to dense outputs; {label}'s output {output_shape} is a vector. "
            "Hint: leave label_resolution at its default."
        )

    if not selection.points:
        notes = "; ".join(selection.notes[:3])
        raise InstrumentError(
            f"{label} has no point to supervise (D={selection.depth}): no node of its graph is eligible"
            f"{' (' + notes + ')' if notes else ''}, so the probed loss would be the output's alone and a "
            "model without weight layers has nothing to train.\nHint: check `autoprobe.inspect(model)` shows "
            "candidates; a model needs weight layers (conv, linear) before its output to be supervised."
        )
    keys = _adapter_keys([p.name for p in selection.points])
    adapters = _make_adapters(module, placed.graph, infos, keys, shape, classes, output_shape, label_resolution, form)
    sites = tuple(
        TapSite(info.name, keys[info.name], tuple((info.shape or ())[1:]), str(info.layout)) for info in infos
    )
    objective = _make_objective(loss, infos, losses, ignore_index, resolved_task)
    if isinstance(objective, IMacHSR):  # RMI refuses heads too small for its regions, known once adapters exist
        objective.check_heads(
            {info.name: _head_shape(adapters[keys[info.name]], info, output_shape, 1) for info in infos}, output_shape
        )
    recipe: FxRecipe | HookRecipe
    engine: FxEngine | HookEngine
    if targets is None:
        recipe = FxRecipe.of(size, opts, sites, label)
        engine = FxEngine(module, adapters, sites, placed.train, placed.eval)  # type: ignore[arg-type]
    else:
        recipe = HookRecipe(sites, targets, selection.backend)
        engine = recipe.build(module, adapters)
    taps = _taps(infos, keys, adapters, engine, targets, output_shape, placed.train.input_shape[0])
    report = RewriteReport(
        model=label,
        task=resolved_task,
        task_source="given" if task is not None else "inferred from K=1" if resolved_task == "binary" else "inferred",
        num_classes=classes,
        input_shape=placed.train.input_shape,
        output_shape=output_shape,
        objective=repr(objective),
        taps=taps,
        model_parameters=sum(p.numel() for p in module.parameters()),
        backend=selection.backend,
        output=spec.description,
        label_resolution=label_resolution,
    )
    return Probed(module, adapters, objective, selection, report, recipe, engine, spec)


class _Placement(NamedTuple):
    """Where the points sit: the traces, the checked layer info and, on the hook engine, the calls."""

    train: Traced  # fx: the train-mode trace; export/hooks: the selection's mode
    eval: Traced | None  # fx only
    graph: LayerGraph
    infos: tuple[LayerInfo, ...]
    targets: tuple[HookTarget, ...] | None  # hook engine only


def _traced_part(tracing: ModelTrace, selection: Selection) -> str | None:
    """The submodule the ladder falls back to when no backend traces the whole model, else ``None``."""
    try:
        traced = tracing.ladder(selection.mode).traced
    except AutoprobeError:
        return None
    return traced.part or None


def _place(tracing: ModelTrace, selection: Selection, label: str) -> _Placement:
    """The traces the selection is tapped on, asked of ``tracing``, and the selection checked against them.

    fx taps both modes' graphs; export and hooks run the model's own Python, whatever its mode, so one graph in
    the selection's mode is checked, and its module calls are hooked.
    """
    if selection.backend == "fx":
        eval_traced, eval_graph = tracing.traced("eval", "fx"), tracing.graph("eval", "fx")
        train_traced, graph = tracing.traced("train", "fx"), tracing.graph("train", "fx")
        infos = _check_selection(selection, {"train": graph, "eval": eval_graph}, label)
        return _Placement(train_traced, eval_traced, graph, tuple(infos), None)
    traced, rung_graph = tracing.traced(selection.mode, selection.backend), tracing.graph(selection.mode, selection.backend)
    infos = _check_selection(selection, {selection.mode: rung_graph}, label)
    placed = hook_targets(tracing.model, traced, rung_graph, infos)
    return _Placement(traced, None, rung_graph, tuple(info for _, info in placed), tuple(target for target, _ in placed))


def _taps(
    infos: Sequence[LayerInfo],
    keys: Mapping[str, str],
    adapters: nn.ModuleDict,
    engine: TapEngine,
    targets: Sequence[HookTarget] | None,
    output_shape: tuple[int, ...],
    batch: int,
) -> tuple[Tap, ...]:
    """One ``Tap`` record per point, for the report."""
    taps = []
    for i, info in enumerate(infos):
        adapter = adapters[keys[info.name]]
        taps.append(Tap(
            point=info.name,
            adapter=f"{ADAPTERS}.{keys[info.name]}",
            feature_shape=info.shape or (),
            layout=str(info.layout),
            head_shape=_head_shape(adapter, info, output_shape, batch),
            adapter_type=type(adapter).__name__,
            parameters=adapter_parameter_count(adapter),
            cloned=engine.cloned(info.name),
            fx_names=engine.fx_names(info.name),
            hooked=targets[i].label if targets is not None else None,
        ))
    return tuple(taps)


# --------------------------------------------------------------------------- resolving


def _live_model(model: nn.Module | str, num_classes: int | None) -> tuple[nn.Module, str, tuple[int, ...] | None]:
    """The module to train, its label and a spec's input size; specs are built on the CPU with fresh weights."""
    if isinstance(model, nn.Module):
        if device_of(model).type == "meta":
            raise InstrumentError(
                f"{type(model).__name__} is on the meta device: it has no weights to train. "
                "Hint: build it on a real device (or pass its spec string, which instrument builds on the CPU)."
            )
        # fully_shard imports this module; if it was never imported, nothing can be sharded.
        fsdp = sys.modules.get("torch.distributed.fsdp")
        if fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules()):
            raise InstrumentError(
                f"{type(model).__name__} is already sharded with fully_shard: its parameters are DTensor shards, "
                "which tracing cannot read. Hint: instrument the plain model first, then shard the probed one: "
                "`probed = instrument(model); [fully_shard(b) for b in probed.model.blocks]; fully_shard(probed)`."
            )
        return model, type(model).__name__, None
    if not isinstance(model, str):
        raise InstrumentError(f"model must be an nn.Module or a model spec string; got {type(model).__name__}")
    resolved = resolve_model(model, num_classes=num_classes, device="cpu")
    return resolved.module, resolved.label, tuple(resolved.input_size)


def _input_size(given: Sequence[int] | None, selection: Selection) -> tuple[int, ...]:
    if given is None:
        return tuple(selection.input_shape[1:])
    return parse_input_size(given, argument="input_size=")


def _check_selection(
    selection: Selection, graphs: Mapping[str, LayerGraph], label: str
) -> list[LayerInfo]:
    """The train-mode layer info of every point, after checking the selection fits this model.

    A selection fits when the graph of the mode it was made in has its depth D and,
    at each point, a node of that name with the same feature shape and layout, and
    the point also exists in the other mode's graph. Every point must be one ``inspect``
    could choose (``select.can_be_point``): tapped exactly where it is named.
    """
    reference = graphs.get(selection.mode, graphs["eval"] if "eval" in graphs else next(iter(graphs.values())))
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
        if have != want or (info.layout or "") != (point.layout or ""):
            raise SelectionError(
                f"point {point.name!r}: {origin} expects a {point.layout} feature of shape {want}, but {label} "
                f"produces {info.layout} {have} there at input {reference.input_shape[1:]}.\n"
                "Hint: if the selection is from this model, pass the input size it was made at (input_size=...); "
                "if it is from another model, re-run `autoprobe.inspect(model)` on this one."
            )
        info = graphs.get("train", reference)[point.name]
        if info.channels is None or not info.layout or (info.spatial is None and info.layout != "NC"):
            raise InstrumentError(
                f"point {point.name!r} ({info.layout or 'no layout'} {have}) has no per-example channel axis "
                "an adapter can read (e.g. window attention folds positions into the batch).\n"
                "Hint: choose another point, e.g. the block output after it."
            )
        why = why_not_point(reference, reference[point.name])
        if why == "grid":
            raise InstrumentError(
                f"point {point.name!r} is a {info.layout} token feature ({have}) feeding a dense output, but the graph "
                "does not say which grid its tokens form (no map before it whose grid, plus concatenated prefix "
                "tokens, makes its token count).\nHint: choose a point with a spatial map, or one after the tokens "
                "are reshaped back to a grid; `autoprobe.inspect(model)` chooses only such points."
            )
        # "untappable" (a function inside a module on export/hooks) is refused by hook_targets, which names where
        # the value is computed: the one contract is that a point is tapped exactly where it is named.
        infos.append(info)
    return infos


# --------------------------------------------------------------------------- the output and the task


def _resolve_task(task: Task | None, output_shape: tuple[int, ...], label: str) -> tuple[str, HeadShape]:
    """The task name for the report and the adapters' head shape, checked against the output.

    With ``task=None`` a (B, K) output is ``classification`` and a (B, K, *S) one ``dense``, except K=1: one logit
    has no class-id meaning, so it is ``binary`` (0/1 targets, plus ``ignore_index``), and the report says it was
    inferred from K=1.
    """
    if task is not None and task not in get_args(Task):
        raise InstrumentError(f"unknown task {task!r}; expected one of {list(get_args(Task))} or None to infer it")
    rank = len(output_shape)
    if rank not in (2, 3, 4, 5):
        raise InstrumentError(
            f"{label}'s output has shape {output_shape}; autoprobe supports (B, K) outputs and dense (B, K, *S) "
            "outputs with 1, 2 or 3 spatial axes. Hint: select another output with output=..., or wrap the model."
        )
    head: HeadShape = "classification" if rank == 2 else "dense"
    classes = output_shape[1]
    if task in (None, "classification", "dense"):
        if task is not None and task != head:
            shapes = "(B, K)" if task == "classification" else "(B, K, *S)"
            raise InstrumentError(
                f"task={task!r} does not fit {label}'s output of shape {output_shape}, which is {head} logits; "
                f"{task} needs {shapes} logits. Hint: leave task=None to infer it, or select other logits with output=."
            )
        if classes < 2:
            if task is None:
                return "binary", head  # one logit has no other class-id meaning: 0/1 targets (plus ignore_index)
            raise InstrumentError(
                f"task={task!r} needs K >= 2 logits for class ids; {label}'s output has K={classes} channel.\n"
                "Hint: for one sigmoid logit with 0/1 targets pass task='binary' (or leave task=None); for a "
                "continuous target pass task='regression'."
            )
        return head, head
    if task == "binary" and classes != 1:
        raise InstrumentError(
            f"task='binary' needs one logit channel; {label}'s output {output_shape} has K={classes}. "
            "Hint: for K independent 0/1 targets pass task='multilabel'; for class ids leave task=None."
        )
    return task, head


# --------------------------------------------------------------------------- adapters and objective


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
    graph: LayerGraph,
    infos: Sequence[LayerInfo],
    keys: Mapping[str, str],
    head: HeadShape,
    classes: int,
    output_shape: tuple[int, ...],
    label_resolution: LabelResolution,
    form: AdapterHead = "linear",
) -> nn.ModuleDict:
    reference = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.get_default_dtype()
    out_size = tuple(output_shape[2:]) if head == "dense" else None
    adapters = nn.ModuleDict()
    for info in infos:
        layout = Layout.parse(info.layout)
        grid, prefix = None, 0
        if head == "dense" and len(layout.spatial_dims) != len(out_size):  # type: ignore[arg-type]
            grid, prefix = _token_grid(graph, info, len(out_size))  # type: ignore[arg-type]
        # A private generator seeded from the user's seed and the point's name: instrument leaves the
        # global RNG where it was, and adding or removing a point does not change the other adapters.
        digest = hashlib.sha256(f"{torch.initial_seed()}:{info.name}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            adapter = make_adapter(
                channels=info.channels,  # type: ignore[arg-type]
                layout=layout,
                spatial=info.spatial,
                task=head,
                num_classes=classes,
                out_size=out_size if label_resolution == "upsample" else None,
                grid=grid,
                prefix_tokens=prefix,
                own_resolution=head == "dense" and label_resolution == "downsample",
                head=form,
            )
        adapters[keys[info.name]] = adapter.to(device=device, dtype=dtype)
    adapters.train(model.training)
    return adapters


def _token_grid(graph: LayerGraph, info: LayerInfo, rank: int) -> tuple[tuple[int, ...], int]:
    """The grid a token feature forms and its prefix-token count, read from the graph (``LayerGraph.token_grid``).

    Selection never chooses a token feature without one for a dense output (``select.can_be_point``); this refuses
    one chosen otherwise (a hand-made or stale selection).
    """
    found = graph.token_grid(info.name, rank)
    if found is None:
        raise InstrumentError(
            f"point {info.name!r} is a {info.layout} token feature ({info.spatial[0] if info.spatial else '?'} tokens) "
            f"feeding a {rank}-D dense output, but the graph does not say which grid its tokens form (no map before it "
            "whose grid, plus concatenated prefix tokens, makes its token count).\nHint: choose a point with a spatial "
            "map, or one after the tokens are reshaped back to a grid."
        )
    return found


def _head_shape(adapter: nn.Module, info: LayerInfo, output_shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    """The adapter's output shape at the traced input."""
    out_size = getattr(adapter, "out_size", ())
    if len(output_shape) == 2 or out_size:
        return (batch, *output_shape[1:])
    grid = adapter.grid if adapter.grid is not None else Layout.parse(info.layout).spatial(info.shape)  # type: ignore[union-attr, arg-type]
    return (batch, output_shape[1], *grid)


# Options only a named loss reads; with a given Objective each is a mistake (its own are set on it).
_NAMED_LOSS_WEIGHTS = ("alpha", "lam", "schedule")


def _make_objective(
    loss: ObjectiveName | Objective, infos: Sequence[LayerInfo], options: LossOptions, ignore_index: int, task: str
) -> Objective:
    """The objective over the points: the given one, checked against the taps and the task, or ``make_objective``'s."""
    names = [info.name for info in infos]
    if isinstance(loss, Objective):
        given = sorted(options.given())
        if any(k in _NAMED_LOSS_WEIGHTS for k in given) or ignore_index != -100:
            raise InstrumentError(
                f"{', '.join(given) or 'ignore_index'} configure a named loss; a given Objective already has its own. "
                "Hint: set them on the Objective, or pass loss='imachsr'|'dsn'|'dks' with loss_options=LossOptions(...)."
            )
        if given:
            raise UsageError(
                f"{', '.join(given)} configure a named loss; a given Objective already has its own. "
                "Hint: pass them to the Objective (`IMacHSR(..., label_smoothing=0.1)`)."
            )
        kind = _TARGET_KINDS[task]
        if getattr(loss, "target_kind", "multiclass") != kind:
            raise InstrumentError(
                f"the given objective is for {loss.target_kind} targets, but task={task!r} has {kind} targets. "
                f"Hint: build it with target_kind={kind!r}, or pass the task it was built for."
            )
        if tuple(loss.points) != tuple(names):
            raise InstrumentError(
                f"the given objective is over points {list(loss.points)}, the taps are at {names}. "
                "Hint: build it with `[p.name for p in selection.points]`."
            )
        return loss
    if not isinstance(loss, str):
        raise InstrumentError(f"unknown loss {loss!r}; expected an objective's name or an Objective")
    if options.gather_mi is not False and loss != "imachsr":
        raise UsageError(
            f"gather_mi applies to loss='imachsr' (it gathers the MI joint); loss is {loss!r}. Hint: leave it out."
        )
    layouts = {info.name: str(info.layout) for info in infos}
    return make_objective(loss, names, layouts, target_kind=_TARGET_KINDS[task], ignore_index=ignore_index,  # type: ignore[arg-type]
                          options=options)
