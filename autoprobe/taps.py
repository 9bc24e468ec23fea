"""The interface between ``Probed`` and the two tapping engines.

A tapping engine runs the user's model so that, besides its own output, it returns
every point's adapter output q_m(z_m) and raw feature z_m. There are two:

- ``fx_engine.FxEngine``: a graph rewrite of the fx trace (train-mode and eval-mode
  graphs, the one of the current mode runs), for models fx traces;
- ``hook_engine.HookEngine``: the model's own forward with forward hooks registered for
  one call, for selections from the ``export`` and ``hooks`` backends.

Each engine is built from a ``Recipe``, a frozen, picklable record of what to tap. The
recipe is what ``Probed`` pickles; on unpickling it rebuilds the engine from it
(``recipe.build(model, adapters)``), so generated code is never pickled.

Example:
    >>> site = TapSite(point="layer1", key="layer1", feature_shape=(8, 4, 4), layout="NCHW")
    >>> site.key, site.feature_shape
    ('layer1', (8, 4, 4))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from torch import Tensor, nn

__all__ = ["ADAPTERS", "MODEL", "TapSite", "Recipe", "TapEngine", "EngineResult"]

ADAPTERS = "autoprobe_adapters"
"""Name of the ModuleDict holding the adapters, in the probed module and its state_dict keys."""
MODEL = "model"
"""Name of the user's model inside the probed module."""

class EngineResult(NamedTuple):
    """What one tapped forward returns; the dicts' points are in execution order."""

    output: Any
    """The model's own output, as its forward returns it."""
    heads: dict[str, Tensor]
    """Point name -> the adapter's output q_m(z_m)."""
    features: dict[str, Tensor]
    """Point name -> the raw feature z_m."""


@dataclass(frozen=True)
class TapSite:
    """One point to tap, as both engines need it.

    Attributes:
        point: the point's name (the key of heads, features and loss parts).
        key: the adapter's key in ``autoprobe_adapters``.
        feature_shape: the feature's shape without the batch, as the selection recorded it.
        layout: the feature's layout name (``NCHW``, ``NLC``, ...).
    """

    point: str
    key: str
    feature_shape: tuple[int, ...]
    layout: str


class TapEngine(Protocol):
    """What ``Probed`` calls; nothing else of an engine is visible to it."""

    def run(self, training: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> EngineResult:
        """Run the model on ``args``/``kwargs`` in the given mode and tap every point."""

    def cloned(self, point: str) -> bool:
        """Whether the point's feature is copied before the model continues."""

    def fx_names(self, point: str) -> tuple[str, str] | None:
        """The point's node names in the train-mode and eval-mode graphs; None for an engine without graphs."""

    def code(self, training: bool) -> str:
        """What runs in that mode, as text, for debugging."""


class Recipe(Protocol):
    """A picklable description of an engine, from which it is (re)built."""

    backend: str

    def build(self, model: nn.Module, adapters: nn.ModuleDict) -> TapEngine:
        """The engine over ``model`` and ``adapters``."""
