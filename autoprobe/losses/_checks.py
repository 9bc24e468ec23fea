"""Validation of the loss options (weights, names, ints); every failure an ``InstrumentError``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from ..errors import InstrumentError


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
