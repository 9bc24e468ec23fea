"""One exception hierarchy for everything autoprobe reports to a user.

Every message names the thing that was wrong (a model spec, a node, a rule,
a file) and ends with what to do next. The CLI turns any ``AutoprobeError``
into a short message and exit code 2; anything else is a bug in autoprobe.
"""

from __future__ import annotations

__all__ = [
    "AutoprobeError",
    "ModelSpecError",
    "InputSizeError",
    "TraceError",
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


class InputSizeError(AutoprobeError):
    """The input size does not fit the model (shape propagation failed)."""


class TraceError(AutoprobeError):
    """torch.fx could not trace the model."""


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
