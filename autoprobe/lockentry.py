"""Computing lock records: one model analysed into a ``LockEntry``.

Example:
    >>> [p.name for p in lock_entry("resnet18").points]
    ['layer1.1.act2', 'layer2.1.act2', 'layer3.1.act2']
"""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from .lockfile import FiredRule, LockedPoint, LockEntry, LockSettings, RulePackRef, resolve_rules

if TYPE_CHECKING:
    from torch import nn

    from .api import Analysis

__all__ = ["entry_from_analysis", "lock_entry", "versions"]

# The distributions whose versions shape a selection; recorded as context in every lock.
_VERSIONED = ("autoprobe", "timm", "torch", "torchvision")


def _plain(value: str | Enum | None) -> str | None:
    """A str enum (``Layout.NCHW``, a backend) as the plain string the lock stores."""
    return value.value if isinstance(value, Enum) else value


def entry_from_analysis(analysis: Analysis, settings: LockSettings) -> LockEntry:
    """The lock entry of an analysed model.

    Args:
        analysis: the result of ``api.analyze``.
        settings: the settings it was computed with; ``input_size`` is replaced by the size
            actually traced, so replaying the entry never depends on a model's default.

    Returns:
        The ``LockEntry``.

    Example:
        >>> from autoprobe.api import analyze
        >>> entry_from_analysis(analyze("resnet18"), LockSettings()).settings.input_size
        (3, 224, 224)
    """
    sel = analysis.selection
    resolved = replace(settings, input_size=tuple(sel.input_shape[1:]))
    return LockEntry(
        settings=resolved,
        rule_pack=RulePackRef(sel.rules, sel.rules_sha256),
        backend=_plain(sel.backend),
        depth=sel.depth,
        num_points=len(sel.points),
        min_distance=sel.min_distance,
        input_shape=tuple(sel.input_shape),
        notes=tuple(sel.notes),
        points=tuple(
            LockedPoint(
                name=p.name,
                module_path=p.module_path,
                depth=p.depth,
                shape=tuple(p.shape),
                layout=_plain(p.layout),
                rules=tuple(sorted((FiredRule(f.detector, f.reason) for f in p.fired), key=lambda r: (r.detector, r.reason))),
            )
            for p in sel.points
        ),
    )


def lock_entry(
    model: str | nn.Module,
    settings: LockSettings | None = None,
    *,
    base_dir: Path | None = None,
) -> LockEntry:
    """Analyse a model and return its lock entry.

    Args:
        model: a model spec (timm name, ``tv:NAME``, ``package.module:factory``) or an ``nn.Module``
            (on meta or live; it is never mutated).
        settings: how to analyse it; defaults to ``LockSettings()``.
        base_dir: the folder a relative rules path in ``settings`` is relative to (the lockfile's);
            ``None`` takes it as given (relative to the current directory).

    Returns:
        The ``LockEntry``.

    Raises:
        AutoprobeError: whatever the analysis reports (unknown model, bad input size, trace failure).

    Example:
        >>> lock_entry("resnet18", LockSettings(mode="train")).settings.mode
        'train'
    """
    from .api import analyze
    from .trace import TraceOptions

    settings = settings if settings is not None else LockSettings()
    analysis = analyze(
        model,
        input_size=settings.input_size,
        rules=resolve_rules(settings.rules, base_dir),
        points=settings.points,
        options=TraceOptions(mode=settings.mode, leaf_paths=settings.leaf, input_name=settings.input_name,
                             forward_kwargs=settings.forward_kwargs.to_dict()),
        model_args=settings.model_args.to_dict(),
    )
    return entry_from_analysis(analysis, settings)


def versions() -> dict[str, str]:
    """Installed versions of autoprobe and the libraries that shape a selection (context only).

    Example:
        >>> sorted(versions())
        ['autoprobe', 'timm', 'torch', 'torchvision']
    """
    found = {}
    for dist in _VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found
