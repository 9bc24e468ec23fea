"""Stage 3: detectors, one per selection criterion of the iMacHSR paper.

A detector is a module with a stable ``ID``, a one-line ``SUMMARY``, an option
schema ``OPTIONS`` (name -> ``Option`` with type, default and help) and a pure
function ``detect(graph, options) -> tuple[Candidate, ...]``. Detectors read
only the layer graph's structure and shapes, never per-model annotations
(timm's ``feature_info`` or ``default_cfg``): architecture-agnostic means it
works on a model nobody annotated.

The registry below is a constant tuple, in the paper's order; nothing
registers itself at import.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..graph import LayerGraph

__all__ = ["Candidate", "Option", "DETECTORS", "detector", "run_detectors"]


@dataclass(frozen=True, order=True)
class Candidate:
    """One detector's verdict that a node is a good supervision point.

    Attributes:
        node: the layer graph node name.
        detector: the detector's ID.
        reason: one human-readable line explaining why.
        strength: in (0, 1]; scales the rule weight (e.g. block ends count less than stage ends).
    """

    node: str
    detector: str
    reason: str
    strength: float = 1.0


@dataclass(frozen=True)
class Option:
    """Schema of one detector option: its type, default and what it does."""

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()


from . import (  # noqa: E402  (Candidate and Option must exist before the detectors import them)
    attention,
    bottleneck,
    downsampling,
    fusion,
    norm_act_change,
    skip,
    stage_boundary,
)

DETECTORS: tuple[ModuleType, ...] = (
    downsampling,
    stage_boundary,
    bottleneck,
    attention,
    skip,
    norm_act_change,
    fusion,
)


def detector(detector_id: str) -> ModuleType:
    """The detector module with this ID; ``KeyError`` if there is none."""
    for module in DETECTORS:
        if module.ID == detector_id:
            return module
    raise KeyError(detector_id)


def run_detectors(
    graph: LayerGraph, options: Mapping[str, Mapping[str, Any]]
) -> tuple[Candidate, ...]:
    """Run every detector named in ``options`` (ID -> its validated options).

    Returns:
        All candidates, sorted by graph order, then detector ID.
    """
    found: list[Candidate] = []
    for module in DETECTORS:
        if module.ID in options:
            detect: Callable[[LayerGraph, Mapping[str, Any]], tuple[Candidate, ...]] = module.detect
            found.extend(detect(graph, options[module.ID]))
    return tuple(sorted(found, key=lambda c: (graph[c.node].order, c.detector, c.reason)))
