"""autoprobe: architecture-agnostic deep supervision for PyTorch.

``inspect`` previews the points a model would be supervised at; ``instrument``
returns a trainable model with adapters and loss taps at those points; its
``strip()`` gives back the plain model. ``tune`` searches output-only training, DSN
and iMacHSR settings on a validation split and returns the best (never worse than
output-only there). torch and timm are imported on first
use, so the CLI starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "inspect",
    "analyze",
    "instrument",
    "tune",
    "TuneResult",
    "TrainOptions",
    "Gate",
    "TraceOptions",
    "LossOptions",
    "Layout",
    "Probed",
    "ProbedOutput",
    "plain_state_dict",
    "AutoprobeCallback",
    "AutoprobeTrainer",
    "Selection",
    "Point",
    "RulePack",
    "load_rules",
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
__version__ = "0.1.0"

# Public name -> the module that defines it; resolved lazily (PEP 562).
_HOME = {
    "inspect": "api",
    "analyze": "api",
    "instrument": "rewrite",
    "tune": "tuning",
    "TuneResult": "tuning",
    "TrainOptions": "tuning",
    "Gate": "losses",
    "TraceOptions": "trace",
    "LossOptions": "losses",
    "Layout": "layout",
    "Probed": "probed",
    "ProbedOutput": "probed",
    "plain_state_dict": "checkpoint",
    "AutoprobeCallback": "hf",  # imports transformers, on first use only
    "AutoprobeTrainer": "hf",
    "Selection": "select",
    "Point": "select",
    "RulePack": "rules",
    "load_rules": "rules",
    **dict.fromkeys(
        ("AutoprobeError", "ModelSpecError", "InputSizeError", "TraceError", "RuleError", "SelectionError",
         "InstrumentError", "LockError", "UsageError", "OptionError"),
        "errors",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'autoprobe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
