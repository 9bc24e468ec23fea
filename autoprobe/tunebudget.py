"""``tune``'s cost accounting: what each candidate spent, measured, and whether the next rung fits ``max_cost``.

The unit is one output-only run, what a user pays without ``tune``: output-only training's build,
its ``steps`` training steps and one validation pass, as measured in the same search (its first
rung gives the step time and the validation pass; later rungs refine them). Everything else is
converted by its own measured CPU seconds over that unit: a validation pass of a candidate, an
``instrument`` call (a candidate's build), a deep-supervision step (which costs more than an
output-only step: the adapters' forward and backward). Before a candidate trains a rung, ``tune``
asks ``room``: the CPU seconds already spent by every candidate, the rung's estimate, what
output-only still has to train, and, at the first rung, the later rungs the survivors will train,
must fit ``max_cost`` units, what is still to come planned ``ESTIMATE_MARGIN`` above its estimate.
A candidate the budget has no room for is stopped and said so.

Example:
    >>> from autoprobe.tunebudget import Spend, room, unit_s
    >>> out = Spend(steps=2, passes=1, builds=1, train_s=0.2, validation_s=0.05, build_s=0.01)
    >>> round(unit_s(out, 18), 3)  # build + 18 steps at 0.1 s + one pass
    1.86
    >>> dsn = Spend(builds=1, build_s=0.3)  # built, about to train its first rung
    >>> ask = dict(rung=0, rung_steps=[2, 6, 18], eta=3, steps=18, admitted=1, rebuild=False)
    >>> room({"output": out, "dsn": dsn}, {}, "dsn", {"dsn": "dsn"}, max_cost=4, **ask) is None
    True
    >>> room({"output": out, "dsn": dsn}, {}, "dsn", {"dsn": "dsn"}, max_cost=2.5, **ask)[:50]
    'over budget: rung 1 would bring the search to 2.84'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .tunespace import OUTPUT, survivors

__all__ = ["Spend", "unit_s", "room", "PRIOR_STEP_RATIO", "ADMIT_MARGIN", "ESTIMATE_MARGIN"]

# A deep-supervision step's CPU time, in output-only steps, before any has been measured (the first
# candidate's first rung): its adapters' forward and backward on top of the model's (BENCHMARKS.md,
# "tune: the cost bound", has measured ratios). Only that first rung's estimate and the first
# admissions' plan use it; every later check uses measured rates.
PRIOR_STEP_RATIO = 1.25
# The share of the budget a first rung may plan to: the later rungs are estimates from short rungs.
ADMIT_MARGIN = 0.95
# What is still to come is planned this much above its estimate, at every rung: a rung's steps and
# validation pass are timed on shorter stretches before it, and CPU seconds vary between stretches
# (one full test run's last rung cost a fifth more than its estimate, and took the search 6% over).
ESTIMATE_MARGIN = 0.15


@dataclass(frozen=True)
class Spend:
    """What one candidate's work cost, measured (CPU seconds of the process that did it).

    Attributes:
        steps: training steps.
        passes: validation passes.
        builds: models built (the factory, then ``instrument`` for deep supervision, or weights loaded).
        train_s: CPU seconds of the training steps.
        validation_s: CPU seconds of the validation passes.
        build_s: CPU seconds of the builds.
    """

    steps: int = 0
    passes: int = 0
    builds: int = 0
    train_s: float = 0.0
    validation_s: float = 0.0
    build_s: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def __sub__(self, other: Spend) -> Spend:
        return Spend(*(a - b for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[float, ...]:
        """The fields, in order."""
        return (self.steps, self.passes, self.builds, self.train_s, self.validation_s, self.build_s)

    @property
    def total_s(self) -> float:
        """CPU seconds of all its work."""
        return self.train_s + self.validation_s + self.build_s

    def to_attr(self) -> dict[str, Any]:
        """A JSON-able dict (an Optuna user attribute)."""
        return asdict(self)

    @classmethod
    def from_attr(cls, attr: Mapping[str, Any] | None) -> Spend:
        """The ``Spend`` of ``to_attr``'s dict (an empty one for None)."""
        return cls(**attr) if attr else cls()


def unit_s(output: Spend, steps: int) -> float | None:
    """CPU seconds of one output-only run of ``steps`` steps (None until output-only has trained and scored)."""
    if output.steps <= 0 or output.passes <= 0:
        return None
    build = output.build_s / output.builds if output.builds else 0.0
    return build + output.train_s / output.steps * steps + output.validation_s / output.passes


def _step_s(spends: Mapping[str, Spend], label: str, objectives: Mapping[str, str], t_out: float) -> float:
    """The estimated CPU seconds of one of ``label``'s steps: its own, else its objective's slowest
    measured, else any candidate's slowest, else ``PRIOR_STEP_RATIO`` output-only steps."""
    own = spends.get(label, Spend())
    if own.steps:
        return own.train_s / own.steps
    rates = {k: s.train_s / s.steps for k, s in spends.items() if k != OUTPUT.label and s.steps}
    same = [v for k, v in rates.items() if objectives.get(k) == objectives.get(label)]
    if same:
        return max(same)
    return max(rates.values()) if rates else PRIOR_STEP_RATIO * t_out


def room(spends: Mapping[str, Spend], reserved: Mapping[str, float], label: str, objectives: Mapping[str, str], *,
         rung: int, rung_steps: Sequence[int], eta: int, steps: int, max_cost: float, admitted: int,
         rebuild: bool) -> str | None:
    """Whether ``label`` may train rung ``rung`` within ``max_cost`` output-only runs.

    Args:
        spends: label -> what the candidate has spent so far (every process, this search).
        reserved: label -> CPU seconds another process is spending now (a rung in flight).
        label: the candidate about to train (already built: its build is in ``spends``).
        objectives: label -> objective, for the step-time estimates.
        rung: the rung's index into ``rung_steps``.
        rung_steps: steps at the end of each rung.
        eta: the halving factor (at rung 0, the survivors' later rungs are planned for).
        steps: one full run's steps.
        max_cost: the bound, in output-only runs.
        admitted: candidates other than output-only in the first rung, this one included.
        rebuild: whether the returned model will be built again at the end (another process trained it).

    Returns:
        None when it fits, else why not (a sentence with the numbers).
    """
    if math.isinf(max_cost):
        return None
    out = spends.get(OUTPUT.label, Spend())
    unit = unit_s(out, steps)
    if unit is None:
        raise RuntimeError("tune: a candidate asked for budget before output-only's first rung was measured "
                           "(an internal error).")
    t_out = out.train_s / out.steps
    val = max(s.validation_s / s.passes for s in spends.values() if s.passes)
    own = spends.get(label, Spend())
    t = _step_s(spends, label, objectives, t_out)
    need = (rung_steps[rung] - own.steps) * t + val
    need += (steps - out.steps) * t_out + sum(1 for s in rung_steps if s > out.steps) * val  # output-only's rest
    if rung == 0:  # the later rungs of the survivors, ``admitted`` candidates entering the first
        t_max = max([t] + [s.train_s / s.steps for k, s in spends.items() if k != OUTPUT.label and s.steps])
        alive = admitted
        for r in range(1, len(rung_steps)):
            alive = survivors(alive, eta)
            need += alive * ((rung_steps[r] - rung_steps[r - 1]) * t_max + val)
    if rebuild:
        builds = [s.build_s / s.builds for k, s in spends.items() if k != OUTPUT.label and s.builds]
        need += max(builds, default=0.0)
    need *= 1 + ESTIMATE_MARGIN
    spent = sum(s.total_s for s in spends.values()) + sum(v for k, v in reserved.items() if k != label)
    limit = max_cost * unit * (ADMIT_MARGIN if rung == 0 else 1.0)
    if spent + need <= limit:
        return None
    return (f"over budget: rung {rung + 1} would bring the search to {(spent + need) / unit:.2f} output-only runs "
            f"(spent {spent / unit:.2f}, this rung and what must follow {need / unit:.2f}; "
            f"one run = {unit:.3g} CPU s), "
            f"over max_cost={max_cost:g}" + (f" x {ADMIT_MARGIN} at a first rung" if rung == 0 else ""))
