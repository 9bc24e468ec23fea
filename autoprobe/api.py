"""The read-only pipeline in one call: model -> trace -> layer graph -> detect -> select."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn

from .backends import LADDER, trace_with_fallbacks
from .errors import AutoprobeError, InputSizeError
from .graph import LayerGraph
from .models import DEFAULT_INPUT_SIZE, ResolvedModel, resolve_model
from .rules import RulePack, load_rules
from .select import Selection, select_points

__all__ = ["Analysis", "analyze", "inspect"]


@dataclass(frozen=True)
class Analysis:
    """Everything the read-only stages produced for one model."""

    model: ResolvedModel
    graph: LayerGraph
    pack: RulePack
    selection: Selection


def _input_size(model: nn.Module, given: Sequence[int] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if given is None:
        cfg = getattr(model, "pretrained_cfg", None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        return tuple(size) if size else default
    size = tuple(given)
    if not size or not all(isinstance(s, int) and s > 0 for s in size):
        raise InputSizeError(f"input size {given!r} must be positive integers, like (3, 224, 224).")
    return size


def analyze(
    model: nn.Module | str,
    *,
    input_size: Sequence[int] | None = None,
    rules: str | RulePack = "default",
    points: int | None = None,
    train: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    leaf_paths: Sequence[str] = (),
    num_classes: int | None = None,
) -> Analysis:
    """Trace, detect and select for a model; see ``inspect`` for the arguments.

    Tracing climbs the fallback ladder of ``backends.py``: fx, then ``torch.export``, then
    forward hooks, the first that yields a layer graph wins. When the winner's graph gives no
    eligible point (a leaf module can hide every feature), the finer backends below it are tried
    too. Every fallback is written into ``Selection.notes`` and the backend used is
    ``Selection.backend`` and ``LayerGraph.backend``.

    Returns:
        The ``Analysis`` holding the resolved model, its layer graph, the pack and the selection.

    Raises:
        TraceError: no backend could trace the model; the message has each backend's reason.
        InputSizeError: the size is invalid, or the model's own code rejects it.

    Example:
        >>> analysis = analyze("resnet18")
        >>> analysis.selection.backend, analysis.graph.depth
        ('fx', 18)
    """
    if isinstance(model, str):
        resolved = resolve_model(model, num_classes=num_classes)
    elif isinstance(model, nn.Module):
        resolved = ResolvedModel(model, type(model).__name__, DEFAULT_INPUT_SIZE, "")
    else:
        raise TypeError(f"model must be an nn.Module or a model spec string, not {type(model).__name__}")
    size = _input_size(resolved.module, input_size, resolved.input_size)
    pack = rules if isinstance(rules, RulePack) else load_rules(rules)
    # The fallback ladder (fx -> export -> hooks) lives in backends.py; every rung it skips is noted.
    trace = functools.partial(
        trace_with_fallbacks, resolved.module, size, train=train, leaf_modules=leaf_modules, leaf_paths=leaf_paths
    )
    ladder = trace()
    graph = ladder.graph
    selection = select_points(graph, pack, points=points, model=resolved.label)
    notes = list(ladder.notes)
    remaining = LADDER[LADDER.index(ladder.backend) + 1 :]
    if not selection.points and remaining:
        # A leaf module can hide every feature inside it; a finer backend may expose them.
        try:
            finer = trace(backends=remaining)
        except AutoprobeError as exc:
            notes.append(f"backend {ladder.backend} gave no point and no finer backend worked: {exc}".splitlines()[0])
        else:
            finer_selection = select_points(finer.graph, pack, points=points, model=resolved.label)
            if finer_selection.points:
                notes.append(f"backend {ladder.backend} gave no eligible point; retried with {list(remaining)}")
                notes.extend(finer.notes)
                graph, selection = finer.graph, finer_selection
            else:
                notes.append(f"backend {finer.backend} gave no eligible point either; kept {ladder.backend}")
    if notes:
        selection = replace(selection, notes=(*notes, *selection.notes))
    return Analysis(resolved, graph, pack, selection)


def inspect(
    model: nn.Module | str,
    *,
    input_size: Sequence[int] | None = None,
    rules: str | RulePack = "default",
    points: int | None = None,
    train: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    leaf_paths: Sequence[str] = (),
) -> Selection:
    """Choose the deep-supervision points of a model, without running it.

    Args:
        model: an ``nn.Module`` (never run on data, never mutated) or a spec: a timm name,
            ``tv:NAME`` or ``package.module:factory`` (built on the meta device).
        input_size: the input without batch, e.g. ``(3, 224, 224)``; defaults to the model's own.
        rules: a built-in pack name, a path to a ``.toml`` pack, or a loaded ``RulePack``.
        points: force M instead of round(ln D).
        train: analyse the training-mode graph instead of the eval-mode one.
        leaf_modules: module classes to keep as single nodes when fx cannot trace them.
        leaf_paths: module paths to keep as single nodes.

    Returns:
        The ``Selection``: D, the points with their reasons, every scored candidate.

    Example:
        >>> sel = inspect("resnet18")
        >>> sel.depth, len(sel.points)
        (18, 3)
    """
    return analyze(
        model, input_size=input_size, rules=rules, points=points, train=train,
        leaf_modules=leaf_modules, leaf_paths=leaf_paths,
    ).selection
