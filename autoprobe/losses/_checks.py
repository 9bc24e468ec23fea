"""Validation of the loss options (weights, names, ints): ``InstrumentError``; the output-loss options: ``UsageError``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import InstrumentError, UsageError


def check_names(kind: str, given: Mapping[str, object], points: tuple[str, ...]) -> None:
    missing = [p for p in points if p not in given]
    extra = sorted(set(given) - set(points))
    if missing or extra:
        raise InstrumentError(
            f"{kind}s do not match the declared points {list(points)}: missing {missing}, unexpected {extra}"
        )


def check_points(points: Sequence[str]) -> tuple[str, ...]:
    if isinstance(points, str) or any(not isinstance(p, str) for p in points):
        raise InstrumentError(f"points must be a sequence of point names (str); got {points!r}")
    duplicates = sorted(p for p, n in Counter(points).items() if n > 1)
    if duplicates:
        raise InstrumentError(f"points must be unique; repeated: {duplicates}")
    return tuple(points)


def per_point(name: str, value: float | Mapping[str, float], points: Sequence[str]) -> dict[str, float]:
    if isinstance(value, Mapping):
        check_names(f"{name} weight", value, tuple(points))
        weights = {p: value[p] for p in points}
    else:
        weights = dict.fromkeys(points, value)
    return {point: check_weight(f"{name} for {point!r}", weight) for point, weight in weights.items()}


def check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InstrumentError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def check_positive_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InstrumentError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InstrumentError(f"{name} must be an int; got {value!r}")
    return value


def check_max_positions(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InstrumentError(f"max_positions must be a positive int or None (exact); got {value!r}")
    return value


def check_output_options(
    target_kind: str,
    label_smoothing: float,
    class_weights: Sequence[float] | Tensor | None,
    output_loss: Callable[[Tensor, Tensor], Tensor] | None,
) -> Tensor | None:
    """Validate the output-loss options of an objective; return ``class_weights`` as a float32 (K,) tensor.

    Raises:
        UsageError: naming the option, for a value out of range, an option the target kind
            has no use for, or a custom ``output_loss`` combined with the built-in CE's options.
    """
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
        0.0 <= label_smoothing < 1.0
    ):
        raise UsageError(
            f"label_smoothing must be a number in [0, 1); got {label_smoothing!r}. Hint: 0.1 is the usual value."
        )
    if output_loss is not None and not callable(output_loss):
        raise UsageError(
            f"output_loss must be a callable (logits, target) -> scalar tensor; got {type(output_loss).__name__}. "
            "Hint: pass e.g. `torch.nn.CrossEntropyLoss()` or a module-level function."
        )
    weights = None if class_weights is None else _class_weights(class_weights)
    uses_ce_options = label_smoothing != 0 or weights is not None
    if uses_ce_options and target_kind != "multiclass":
        raise UsageError(
            f"label_smoothing and class_weights configure the multiclass cross entropy; target_kind is "
            f"{target_kind!r}. Hint: leave them out, or pass output_loss= with the loss you want "
            "(e.g. `torch.nn.BCEWithLogitsLoss(pos_weight=...)`)."
        )
    if uses_ce_options and output_loss is not None:
        raise UsageError(
            "label_smoothing and class_weights configure the built-in cross entropy, which output_loss replaces. "
            "Hint: build them into your output_loss (`torch.nn.CrossEntropyLoss(weight=..., label_smoothing=...)`)."
        )
    return weights


def _class_weights(value: Sequence[float] | Tensor) -> Tensor:
    hint = "Hint: pass one finite weight >= 0 per class, e.g. `class_weights=[1.0, 2.0, 1.0]`."
    if isinstance(value, Tensor):
        if value.dim() != 1 or not value.dtype.is_floating_point:
            raise UsageError(f"class_weights must be a 1-D float tensor; got shape {tuple(value.shape)}, {value.dtype}. {hint}")
        weights = value.detach().to(dtype=torch.float32, device="cpu")
    elif isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) for w in value
    ):
        raise UsageError(f"class_weights must be a sequence of numbers or a 1-D tensor; got {value!r}. {hint}")
    else:
        weights = torch.tensor([float(w) for w in value], dtype=torch.float32)
    if weights.numel() < 2 or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not bool(
        (weights > 0).any()
    ):
        raise UsageError(
            f"class_weights must hold K >= 2 finite weights >= 0, not all 0; got {weights.tolist()}. {hint}"
        )
    return weights
