"""Keywords a public call took loose before their option record existed: still accepted, moved into the record.

One rule for every call that grew a record (``LossOptions`` for ``make_objective`` and ``instrument``,
``TrainOptions`` for ``tune`` and ``train_candidate``): each old keyword is a field of the record of
the same name, works with a ``DeprecationWarning`` that names the field, and cannot be mixed with the
record itself. (``TraceOptions``' old keywords are renamed on the way, so ``api.trace_options`` has
its own table.)

Example:
    >>> import warnings
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Knobs:
    ...     lr: float = 1e-3
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     moved_into(Knobs, None, {"lr": 0.1}, "fit", "options")
    Knobs(lr=0.1)
    >>> print(seen[0].message)
    fit(lr=...) is deprecated; pass options=Knobs(lr=...).
    >>> moved_into(Knobs, None, {"momentum": 0.9}, "fit", "options")
    Traceback (most recent call last):
    ...
    TypeError: fit() got an unexpected keyword argument 'momentum'
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import AutoprobeError, UsageError

__all__ = ["moved_into"]

R = TypeVar("R")


def moved_into(record_type: type[R], record: R | None, legacy: Mapping[str, Any], call: str, keyword: str,
               error: type[AutoprobeError] = UsageError, stacklevel: int = 3) -> R:
    """The one option record of a call: ``record``, or a default one with the old keywords moved in.

    Args:
        record_type: the record's dataclass; its field names are the old keywords.
        record: the record the call was given, or ``None`` (its defaults).
        legacy: the call's other keyword arguments (its ``**deprecated``).
        call: the function's name, for messages.
        keyword: the parameter that takes the record, for messages (``"options"``, ``"loss_options"``).
        error: what a wrong record, or a record given with old keywords, raises.
        stacklevel: the warning's frame, as ``warnings.warn`` counts it from here: 3 is the line that called
            the public function which called this.

    Returns:
        The record.

    Raises:
        TypeError: a keyword that is no field of the record, as Python words it.
        AutoprobeError: (``error``) ``record`` is not a ``record_type``, or it is given with old keywords.
    """
    name = record_type.__name__
    known = {f.name for f in dataclasses.fields(record_type)}
    unknown = [k for k in legacy if k not in known]
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")
    if record is not None and not isinstance(record, record_type):
        raise error(f"{keyword} must be an autoprobe {name}, not {type(record).__name__}.\n"
                    f"Hint: pass {keyword}=autoprobe.{name}(...).")
    if record is not None and legacy:
        raise error(f"{call} got {keyword}={name}(...) and also {', '.join(sorted(legacy))}: pass one, not both.\n"
                    f"Hint: put them all in the {name}.")
    for key in legacy:
        warnings.warn(f"{call}({key}=...) is deprecated; pass {keyword}={name}({key}=...).", DeprecationWarning,
                      stacklevel=stacklevel)
    return record if record is not None else record_type(**legacy)
