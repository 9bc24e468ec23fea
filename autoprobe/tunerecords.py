"""The records ``tune`` hands back: one candidate's scores, the measured cost, the search's outcome.

Example:
    >>> from autoprobe.tunerecords import CandidateResult
    >>> from autoprobe.tunespace import OUTPUT
    >>> CandidateResult(OUTPUT, 18, (0.5, 0.75), 18).score
    0.75
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from .tunespace import Candidate

__all__ = ["CandidateResult", "TrainedCandidate", "TuneCost", "TuneResult"]


@dataclass(frozen=True)
class CandidateResult:
    """What one candidate reached.

    Attributes:
        candidate: the setting.
        steps: training steps at its last rung.
        scores: validation score at the end of each rung it trained (higher is better).
        cost_steps: training steps it used in all (its share of the cost).
        error: why it was not trained further: a point placement that does not fit this model, or
            ``"over budget: ..."`` (``max_cost`` had no room for its next rung); else None.
    """

    candidate: Candidate
    steps: int
    scores: tuple[float, ...]
    cost_steps: int
    error: str | None = None

    @property
    def score(self) -> float:
        """The score at its last rung (-inf when it could not be built)."""
        return self.scores[-1] if self.scores else -math.inf


@dataclass(frozen=True)
class TuneCost:
    """What the search cost, measured in CPU seconds and in units of one output-only run.

    One output-only run (``unit_s``) is what a user pays without ``tune``: output-only training's
    build (the factory), its ``steps`` training steps and one validation pass, each as measured in
    this search. A validation pass and an ``instrument`` call are converted by their own measured
    CPU seconds over ``unit_s`` (``validation_s / validation_passes / unit_s`` is one pass's share).

    Attributes:
        steps: training steps of all candidates.
        validation_passes: scorings of a candidate on the validation set (one per rung it finished).
        builds: models built (the factory, ``instrument`` for deep supervision), the returned model's included.
        train_s: CPU seconds of the training steps, every process.
        validation_s: CPU seconds of the validation passes, every process.
        build_s: CPU seconds of the builds, every process.
        cpu_s: CPU seconds of the whole search, every process (the above, plus Optuna's bookkeeping
            and the worker processes' start: importing torch in each).
        wall_s: wall seconds of the whole search.
        unit_s: CPU seconds of one output-only run, measured (see above).
        runs: ``(train_s + validation_s + build_s) / unit_s``, what ``max_cost`` bounds.
    """

    steps: int
    validation_passes: int
    builds: int
    train_s: float
    validation_s: float
    build_s: float
    cpu_s: float
    wall_s: float
    unit_s: float
    runs: float

    @property
    def total_runs(self) -> float:
        """``cpu_s / unit_s``: everything, the engine and worker start included."""
        return self.cpu_s / self.unit_s if self.unit_s > 0 else math.nan


@dataclass(frozen=True)
class TuneResult:
    """The search's outcome.

    Attributes:
        chosen: the winning ``Candidate`` (output-only unless another beat it at the full budget).
        score: its validation score at the full budget.
        output_only_score: output-only training's validation score at the full budget.
        table: every candidate searched, in search order, with its scores and cost.
        instrument_kwargs: the ``autoprobe.instrument`` keyword arguments that reproduce the
            choice (``loss``, ``alpha``, ``lam``, ``points`` or ``selection``, ``schedule``, ``gate``,
            ``head``, ``rules``, ``input_size``); None when output-only training won (do not instrument).
        budget_steps: steps of one full training run (the ``steps`` argument).
        cost_steps: training steps the search used in all.
        dropped: candidates of the search space left out before the search (their training steps
            alone would not fit ``max_cost``); those the measured budget stopped are in ``table``
            with an ``"over budget"`` error.
        seed: the seed it ran with.
        cost: the measured ``TuneCost`` of the whole search (the returned model included).
        model: the chosen candidate trained the full budget, as the search trained it: the
            ``Probed`` model (ship ``model.strip()``), or the plain model when output-only training
            won. No retraining is needed; a resumed search loads it from its state.
    """

    chosen: Candidate
    score: float
    output_only_score: float
    table: tuple[CandidateResult, ...]
    instrument_kwargs: Mapping[str, Any] | None
    budget_steps: int
    cost_steps: int
    dropped: int
    seed: int
    # Two results are equal when the search was the same; the model and the times are not compared.
    model: nn.Module | None = field(default=None, compare=False, repr=False)
    cost: TuneCost | None = field(default=None, compare=False)


class TrainedCandidate(NamedTuple):
    """One setting trained the full budget outside ``tune``'s halving (``autoprobe.tuning.train_candidate``).

    Attributes:
        model: the trained model: the ``Probed`` (ship ``model.strip()``) or, for output-only, the plain model.
        row: its scores at each rung and its steps.
    """

    model: nn.Module
    row: CandidateResult
