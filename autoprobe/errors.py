"""One exception hierarchy for everything autoprobe reports to a user.

Every message names the thing that was wrong (a model spec, a node, a rule,
a file) and ends with what to do next. The CLI turns any ``AutoprobeError``
into a short message and exit code 2; anything else is a bug in autoprobe.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "AutoprobeError",
    "ModelSpecError",
    "InputSizeError",
    "TraceError",
    "RealDataNeeded",
    "SizeErrorParts",
    "RuleError",
    "SelectionError",
    "InstrumentError",
    "LockError",
    "UsageError",
    "OptionError",
]


class AutoprobeError(Exception):
    """Base class: a problem with the user's input, explained, with a hint."""


class ModelSpecError(AutoprobeError):
    """A model spec could not be resolved to an ``nn.Module``."""


class SizeErrorParts(NamedTuple):
    """The parts of an ``InputSizeError`` about one input size, so a caller can word it again.

    The message is ``{reason}\nHint: {hint} ({size as the caller writes it} {verdict}).``;
    ``sizes.size_error`` builds it and ``sizes.reword_size_error`` rebuilds it for another caller
    (the CLI writes ``--input-size 3,8,8`` where Python writes ``input_size=(3, 8, 8)``).
    """

    reason: str
    hint: str
    size: tuple[int, ...]
    verdict: str


class InputSizeError(AutoprobeError):
    """The input size does not fit the model (shape propagation failed).

    Attributes:
        parts: the message's parts where it is about one input size (see ``SizeErrorParts``), else None.
    """

    def __init__(self, message: str, *, parts: SizeErrorParts | None = None) -> None:
        super().__init__(message)
        self.parts = parts


class TraceError(AutoprobeError):
    """torch.fx could not trace the model."""


class RealDataNeeded(TraceError):
    """No backend could trace the model without running it on real values, and that run is not allowed.

    Attributes:
        reasons: the message without its hint (what each backend said), so a caller whose option has
            other words (the CLI's ``--allow-real-data``) gives its own hint.
    """

    def __init__(self, reasons: str, hint: str) -> None:
        super().__init__(f"{reasons}\nHint: {hint}")
        self.reasons = reasons
        self.hint = hint

    def __reduce__(self) -> tuple[type[RealDataNeeded], tuple[str, str]]:
        return type(self), (self.reasons, self.hint)


class RuleError(AutoprobeError):
    """A rule pack is missing, malformed, or names an unknown detector or option."""


class SelectionError(AutoprobeError):
    """A selection does not fit the model it is applied to."""


class InstrumentError(AutoprobeError):
    """The model could not be instrumented, or a loss got inputs it cannot use."""


class LockError(AutoprobeError):
    """A lockfile is missing, malformed, or lists no models."""


class UsageError(AutoprobeError, TypeError):
    """An argument of a Python API call has the wrong type or value (``points=0``, ``leaf_modules=["Conv2d"]``).

    It is also a ``TypeError``, so code that caught the plain ``TypeError`` these misuses raised before still works.
    """


class OptionError(AutoprobeError):
    """A command-line option has a value the command cannot use (``--jobs -1``, ``--points 0``),
    or names an output file that cannot be written (``--graph``); the message names the option."""
