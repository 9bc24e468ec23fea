"""The read-only pipeline in one call: model -> trace -> layer graph -> detect -> select.

Nothing here runs the model on data: fx and export record its Python symbolically and propagate
shapes on meta tensors, and the hooks backend runs on meta twins of the weights. The one exception
is opt-in: with ``allow_real_data=True``, a model whose forward reads tensor values
(``if x.sum() > 0``) is run once by the hooks backend on a seeded random batch under ``no_grad``
(buffers cloned, the model left as it was), and the selection's notes say so.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from .backends import ModelTrace
from .errors import UsageError
from .graph import LayerGraph
from .models import DEFAULT_INPUT_SIZE, ResolvedModel, resolve_model
from .rules import RulePack, load_rules
from .select import Fired, Scored, Selection, can_be_point, check_points, point_at, select_points
from .sizes import parse_input_size
from .trace import TraceOptions, Traced

__all__ = ["Analysis", "analyze", "inspect"]


@dataclass(frozen=True)
class Analysis:
    """Everything the read-only stages produced for one model.

    Attributes:
        model: the resolved model (built on meta for a spec).
        graph: the layer graph the selection was made on.
        pack: the rule pack.
        selection: the chosen points.
        traced: the trace ``graph`` was built from (the selection's mode and backend).
        trace: the ``ModelTrace`` that made it, which remembers every trace it made: ``instrument`` asks it
            for the selection's backend in both modes, so the selection's own trace is the one tapped.
    """

    model: ResolvedModel
    graph: LayerGraph
    pack: RulePack
    selection: Selection
    traced: Traced | None = None
    trace: ModelTrace | None = None

    def choose(self, *names: str) -> Selection:
        """This analysis's selection with exactly the points ``names``, chosen by hand.

        A point keeps the rules that fired on it (its score and reasons); a node no rule flagged is
        chosen with a ``chosen by name`` reason. Pass the result to ``instrument(model, selection)``.

        Raises:
            UsageError: a name is not a node of the graph, or names a node that cannot be a point
                (no layout the ops decide, the model's input or output, or a function the backend's
                forward hooks cannot tap); the message lists eligible nodes.

        Example:
            >>> analysis = analyze("resnet18")
            >>> analysis.choose("layer1.1.act2", "layer3.0.act1").names
            ('layer1.1.act2', 'layer3.0.act1')
        """
        if not names or not all(isinstance(n, str) for n in names):
            raise UsageError(f"choose takes node names as strings, like choose('layer1.0.act1'); got {names!r}.")
        scored = {s.node: s for s in self.selection.candidates}
        eligible = [n.name for n in self.graph if can_be_point(self.graph, n)]
        points = []
        for name in dict.fromkeys(names):
            if name not in self.graph:
                close = difflib.get_close_matches(name, eligible, n=3, cutoff=0.5)
                raise UsageError(
                    f"{name!r} is not a node of {self.model.label}'s layer graph."
                    f"{' Close names: ' + ', '.join(close) + '.' if close else ''}\n"
                    "Hint: `autoprobe inspect MODEL --all-candidates` lists the scored nodes."
                )
            info = self.graph[name]
            if not can_be_point(self.graph, info):
                raise UsageError(
                    f"{name!r} cannot be a point on the {self.graph.backend} backend ({info.kind}, layout "
                    f"{info.layout or 'unknown'}, {'a module output' if info.call else 'not a module output'}).\n"
                    f"Hint: choose a node with a layout{' that is a module output' if self.graph.backend != 'fx' else ''}, "
                    f"e.g. one of {', '.join(eligible[:5])}."
                )
            found = scored.get(name) or Scored(name, 0.0, (Fired("by-name", "chosen by name", 0.0),))
            points.append(point_at(info, found))
        points.sort(key=lambda p: self.graph[p.name].order)
        return replace(self.selection, points=tuple(points),
                       notes=(*self.selection.notes, f"points chosen by name: {', '.join(p.name for p in points)}"))


def _input_size(model: nn.Module, given: object, default: tuple[int, ...]) -> tuple[int, ...]:
    if given is None:
        cfg = getattr(model, "pretrained_cfg", None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        return tuple(size) if size else default
    return parse_input_size(given, argument="input_size=")


TRACE_KEYWORDS = {"train": "mode", "leaf_modules": "leaf_modules", "leaf_paths": "leaf_paths",
                   "allow_real_data": "allow_real_data"}
"""The tracing keywords ``inspect``, ``analyze`` and ``instrument`` took before ``options=TraceOptions(...)`` was the
one way (keyword -> its ``TraceOptions`` field)."""


def trace_options(options: TraceOptions | None, legacy: Mapping[str, Any], call: str) -> TraceOptions:
    """The one ``TraceOptions`` of a public call: ``options``, or a default one with the old keywords moved in.

    The old keywords (``train``, ``leaf_modules``, ``leaf_paths``, ``allow_real_data``) still work, with a
    ``DeprecationWarning`` that names the ``TraceOptions`` field to use instead.

    Args:
        options: the call's ``options=``; ``None`` is ``TraceOptions()``.
        legacy: the other keyword arguments the call got.
        call: the function's name, for messages.

    Returns:
        The ``TraceOptions``.

    Raises:
        UsageError: ``options`` is not a ``TraceOptions``, or it is given together with an old keyword.
        TypeError: a keyword the call does not take, as Python words it.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     trace_options(None, {"allow_real_data": True}, "inspect").allow_real_data
        True
        >>> print(seen[0].message)
        inspect(allow_real_data=...) is deprecated; pass options=TraceOptions(allow_real_data=...).
    """
    unknown = [k for k in legacy if k not in TRACE_KEYWORDS]
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")
    if options is not None and not isinstance(options, TraceOptions):
        raise UsageError(f"options must be an autoprobe TraceOptions, not {type(options).__name__}.\n"
                         "Hint: pass options=autoprobe.TraceOptions(...).")
    if not legacy:
        return options if options is not None else TraceOptions()
    if options is not None:
        raise UsageError(
            f"{call} got options=TraceOptions(...) and also {', '.join(sorted(legacy))}: pass one, not both.\n"
            "Hint: put them all in the TraceOptions."
        )
    fields: dict[str, Any] = {}
    for key, value in legacy.items():
        field = TRACE_KEYWORDS[key]
        warnings.warn(f"{call}({key}=...) is deprecated; pass options=TraceOptions({field}=...).", DeprecationWarning,
                      stacklevel=3)
        if key == "train":
            if not isinstance(value, bool):
                raise UsageError(f"train must be True or False, not {value!r}.\nHint: pass options=TraceOptions(mode='train').")
            value = "train" if value else "eval"
        fields[field] = value
    return TraceOptions(**fields)


def analyze(
    model: nn.Module | str,
    *,
    input_size: Sequence[int] | None = None,
    rules: str | RulePack = "default",
    points: int | None = None,
    num_classes: int | None = None,
    options: TraceOptions | None = None,
    model_args: Mapping[str, Any] | None = None,
    **deprecated: Any,
) -> Analysis:
    """Trace, detect and select for a model; see ``inspect`` for the arguments.

    ``model_args`` are the keyword arguments a spec's builder is called with
    (``{"encoder_weights": None}`` for ``segmentation_models_pytorch:Unet``); see ``models.resolve_model``.

    Tracing climbs the fallback ladder of ``backends.ModelTrace``: fx, then ``torch.export``, then
    forward hooks, the first that yields a layer graph wins. When the winner's graph gives no
    eligible point (a leaf module can hide every feature), the finer backends below it are tried
    too. Every fallback is written into ``Selection.notes`` and the backend used is
    ``Selection.backend`` and ``LayerGraph.backend``.

    Returns:
        The ``Analysis`` holding the resolved model, its layer graph, the pack and the selection.

    Raises:
        TraceError: no backend could trace the model; the message has each backend's reason.
        InputSizeError: the size is invalid, or the model's own code rejects it.
        UsageError: an argument has the wrong type or value (``points=0``, a leaf class given as a string).

    Example:
        >>> analysis = analyze("resnet18")
        >>> analysis.selection.backend, analysis.graph.depth
        ('fx', 18)
    """
    check_points(points)
    opts = trace_options(options, deprecated, "analyze")
    if isinstance(model, str):
        # A real run needs real weights: with allow_real_data a spec is built on the CPU (fresh weights, nothing
        # downloaded), and only the hooks backend ever computes with them.
        resolved = resolve_model(model, num_classes=num_classes, model_args=model_args,
                                 device="cpu" if opts.allow_real_data else "meta")
    elif isinstance(model, nn.Module):
        if model_args:
            raise UsageError("model_args are the arguments of a model spec's builder; this model is already built.\n"
                             "Hint: pass a spec string such as 'package.module:factory', or leave model_args out.")
        resolved = ResolvedModel(model, type(model).__name__, DEFAULT_INPUT_SIZE)
    else:
        raise UsageError(
            f"model must be an nn.Module or a model spec string, not {type(model).__name__} ({model!r:.60}).\n"
            "Hint: wrap a function in an nn.Module whose forward calls it, or name a model like 'resnet18'."
        )
    size = _input_size(resolved.module, input_size, resolved.input_size)
    pack = rules if isinstance(rules, RulePack) else load_rules(rules)
    # The fallback ladder (fx -> export -> hooks) lives in backends.ModelTrace; every rung it skips is noted.
    # A graph is usable when it gives a point; each graph is selected on once.
    selections: list[tuple[LayerGraph, Selection]] = []

    def usable(graph: LayerGraph) -> bool:
        selections.append((graph, select_points(graph, pack, points=points, model=resolved.label)))
        return bool(selections[-1][1].points)

    trace = ModelTrace(resolved.module, size, opts)
    ladder = trace.ladder(usable=usable)
    selection = next(s for g, s in selections if g is ladder.graph)
    if ladder.notes:
        selection = replace(selection, notes=(*ladder.notes, *selection.notes))
    return Analysis(resolved, ladder.graph, pack, selection, ladder.traced, trace)


def inspect(
    model: nn.Module | str,
    *,
    input_size: Sequence[int] | None = None,
    rules: str | RulePack = "default",
    points: int | None = None,
    options: TraceOptions | None = None,
    **deprecated: Any,
) -> Selection:
    """Choose the deep-supervision points of a model, without running it on data.

    The model is traced with torch.fx (or ``torch.export``) and its shapes are propagated on meta
    tensors: nothing is computed and the model is never mutated. If both fail, forward hooks run it
    on meta twins of its weights. Only with ``allow_real_data=True``, and only when the forward reads
    a tensor value (``if x.sum() > 0``), is the live model run once on a seeded random batch under
    ``no_grad`` with cloned buffers; the selection's notes then say so.

    Args:
        model: an ``nn.Module`` (not mutated) or a spec: a timm name, ``tv:NAME`` or
            ``package.module:factory`` (built on the meta device).
        input_size: the input without batch, e.g. ``(3, 224, 224)``; defaults to the model's own.
        rules: a built-in pack name, a path to a ``.toml`` pack, or a loaded ``RulePack``.
        points: force M (a positive integer) instead of round(ln D).
        options: how to trace, one ``TraceOptions``: ``mode="train"`` analyses the training-mode graph;
            ``leaf_modules``/``leaf_paths`` keep classes or submodules as single nodes when fx cannot trace
            them; ``allow_real_data=True`` lets the hooks backend run the live model on real values when the
            forward branches on them (off by default: such a model is refused with a message naming it);
            ``input_name=`` and ``forward_kwargs=`` for models called as ``model(pixel_values=x)`` or with
            extra inputs. ``None`` is ``TraceOptions()``.
        **deprecated: ``train``, ``leaf_modules``, ``leaf_paths``, ``allow_real_data``, the keywords before
            ``options``: still taken, with a ``DeprecationWarning`` naming the ``TraceOptions`` field.

    Returns:
        The ``Selection``: D, the points with their reasons, every scored candidate.

    Example:
        >>> sel = inspect("resnet18")
        >>> sel.depth, len(sel.points)
        (18, 3)
        >>> inspect("resnet18", options=TraceOptions(mode="train")).mode
        'train'
    """
    return analyze(
        model, input_size=input_size, rules=rules, points=points, options=trace_options(options, deprecated, "inspect")
    ).selection
