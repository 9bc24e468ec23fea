"""``tune``'s search space: the settings it may choose, the rungs of its halving and the draw that fits the budget.

A ``Candidate`` spells every ``instrument`` option it depends on (objective, weights, points, their
position, schedule, gate and head), so a candidate is the same setting whatever ``instrument``'s
defaults become.

Example:
    >>> from autoprobe.tunespace import Candidate, rungs, search_space
    >>> [c.label for c in search_space({"objective": ["dsn"], "alpha": [0.3], "points": [1], "schedule": ["constant"]})]
    ['output', 'dsn/alpha=0.3/M=1/auto']
    >>> Candidate("dsn", 0.3, head="conv").instrument_kwargs(input_size=(3, 32, 32))["loss_options"].head
    'conv'
    >>> rungs(1500, 3)
    [166, 500, 1500]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from .defaults import DEFAULT_HEAD
from .errors import UsageError
from .losses import LossOptions

__all__ = ["TuneObjective", "TuneTask", "TunePosition", "TuneHead", "SEARCH_KEYS", "DEFAULT_SEARCH", "Candidate",
           "OUTPUT", "search_space", "search_values", "check_values", "check_options", "rungs", "survivors",
           "plan_steps", "draw"]

TuneObjective = Literal["output", "dsn", "imachsr"]
TuneTask = Literal["classification", "dense"]
TunePosition = Literal["auto", "input", "centre", "output"]
TuneHead = Literal["linear", "conv"]

# The search keys and the values searched when the caller names none. alpha is the MI weight for
# iMacHSR and the auxiliary CE weight for DSN; lam applies to iMacHSR only; points=None is the
# automatic M; position "auto" is autoprobe's selection, the others ``placement.spaced``; gate None is
# no gate, "cosine" / "binary" the gradient-similarity gate (``autoprobe.losses.gate``); head the
# adapter's form. gate and head are not searched by default: every candidate has instrument's own
# head (``defaults.DEFAULT_HEAD``, conv since issue 24's rule chose it on validation) and no gate.
# EVIDENCE.md's first tuned rows ran linear heads; its `tuned-returned` rows run this space.
SEARCH_KEYS: tuple[str, ...] = ("objective", "alpha", "lam", "points", "position", "schedule", "gate", "head")
DEFAULT_SEARCH: Mapping[str, tuple[Any, ...]] = {
    "objective": ("output", "dsn", "imachsr"),
    "alpha": (0.05, 0.2, 0.5),
    "lam": (0.0, 0.01),
    "points": (None, 1),
    "position": ("auto",),
    "schedule": ("constant", "cosine"),
    "gate": (None,),
    "head": (DEFAULT_HEAD,),
}


@dataclass(frozen=True)
class Candidate:
    """One setting ``tune`` may choose.

    Attributes:
        objective: ``"output"`` (output-only training), ``"dsn"`` or ``"imachsr"``.
        alpha: intermediate weight (None for output-only, or the objective's default).
        lam: iMacHSR's negative-entropy weight (None: default; always None for dsn).
        points: M, or None for the automatic M.
        position: ``"auto"`` (autoprobe's choice) or ``"input"``/``"centre"``/``"output"``.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay of the intermediate weights.
        gate: ``None``, ``"cosine"`` or ``"binary"``: the gradient-similarity gate (``LossOptions(gate=)``).
        head: the adapters' form, ``"linear"`` or ``"conv"`` (``LossOptions(head=)``).
    """

    objective: TuneObjective = "output"
    alpha: float | None = None
    lam: float | None = None
    points: int | None = None
    position: TunePosition = "auto"
    schedule: str = "constant"
    gate: str | None = None
    head: TuneHead = DEFAULT_HEAD

    @property
    def label(self) -> str:
        """A short unique name, e.g. ``imachsr/alpha=0.2/lam=0.01/M=auto/auto/cosine``."""
        if self.objective == "output":
            return "output"
        parts = [self.objective, f"alpha={self.alpha}"]
        if self.objective == "imachsr":
            parts.append(f"lam={self.lam}")
        parts += [f"M={'auto' if self.points is None else self.points}", self.position]
        if self.schedule != "constant":
            parts.append(self.schedule)
        if self.gate is not None:
            parts.append(f"gate={self.gate}")
        if self.head != DEFAULT_HEAD:  # a label names what departs from instrument's defaults
            parts.append(f"head={self.head}")
        return "/".join(parts)

    def instrument_kwargs(self, input_size: Sequence[int], *, rules: str = "default", ignore_index: int = -100,
                          selection: Any = None) -> dict[str, Any]:
        """The ``autoprobe.instrument`` keyword arguments of this setting, every option spelled out.

        Args:
            input_size: one input's size, batch excluded, e.g. ``(3, 32, 32)``.
            rules: the rule pack of the automatic points (``position="auto"``).
            ignore_index: the target value the losses leave out.
            selection: the placed points, for a position other than ``"auto"`` (``tune`` places them
                with ``autoprobe.placement.spaced``).

        Returns:
            ``instrument``'s keyword arguments: ``loss``, ``loss_options`` (a ``LossOptions`` with
            ``alpha``, ``lam`` (iMacHSR), ``schedule``, ``gate`` and ``head``), ``input_size``,
            ``ignore_index`` and ``rules`` (with ``points``) or ``selection``.

        Raises:
            UsageError: output-only training (nothing to instrument), or a spaced position without
                ``selection``.

        Example:
            >>> Candidate("imachsr", 0.2, 0.0, points=1).instrument_kwargs(input_size=(1, 8, 8))["points"]
            1
        """
        if self.objective == "output":
            raise UsageError("tune: output-only training has no instrument arguments: train the plain model. "
                             "Hint: check candidate.objective == 'output' first.")
        # Gate and head always given, None and either head included: a candidate is its own setting,
        # whatever instrument's defaults are.
        options = LossOptions(alpha=self.alpha, lam=self.lam if self.objective == "imachsr" else None,
                              schedule=self.schedule, gate=self.gate, head=self.head)
        kwargs: dict[str, Any] = {"loss": self.objective, "loss_options": options,
                                  "input_size": tuple(input_size), "ignore_index": ignore_index}
        if self.position == "auto":
            kwargs["rules"] = rules
            if self.points is not None:
                kwargs["points"] = self.points
        elif selection is None:
            raise UsageError(f"tune: {self.label} sits at spaced points ({self.position}), which need a selection. "
                             "Hint: pass selection=autoprobe.placement.spaced(autoprobe.analyze(model, ...), "
                             f"{self.points or 3}, 4, {self.position!r}).")
        else:
            kwargs["selection"] = selection
        return kwargs


OUTPUT = Candidate()


def search_space(search: Mapping[str, Sequence[Any]] | None) -> list[Candidate]:
    """Output-only first, then every other setting of ``search`` (missing keys: ``DEFAULT_SEARCH``), each once."""
    values = search_values(search)
    out = [OUTPUT]
    for objective in values["objective"]:
        if objective == "output":
            continue
        lams = values["lam"] if objective == "imachsr" else (None,)
        for alpha, lam, m, pos, sched, gate, head in itertools.product(
                values["alpha"], lams, values["points"], values["position"], values["schedule"], values["gate"],
                values["head"]):
            c = Candidate(objective, float(alpha), None if lam is None else float(lam), m, pos, sched, gate, head)
            if c not in out:
                out.append(c)
    return out


def search_values(search: Mapping[str, Sequence[Any]] | None) -> dict[str, tuple[Any, ...]]:
    """key -> the values searched, checked."""
    given = dict(search or {})
    unknown = sorted(set(given) - set(SEARCH_KEYS))
    if unknown:
        raise UsageError(f"tune: unknown search key(s) {unknown}; the keys are {list(SEARCH_KEYS)}. "
                         "Hint: search={'alpha': [0.1, 0.5]} searches iMacHSR's and DSN's weight.")
    values = {k: tuple(given.get(k, DEFAULT_SEARCH[k])) for k in SEARCH_KEYS}
    for key, vals in values.items():
        if not vals:
            raise UsageError(f"tune: search[{key!r}] is empty. Hint: leave the key out for its defaults "
                             f"{list(DEFAULT_SEARCH[key])}.")
    check_values("objective", values["objective"], get_args(TuneObjective))
    check_values("position", values["position"], get_args(TunePosition))
    check_values("schedule", values["schedule"], ("constant", "linear", "cosine"))
    check_values("gate", values["gate"], (None, "cosine", "binary"))
    check_values("head", values["head"], get_args(TuneHead))
    for v in values["points"]:
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise UsageError(f"tune: search['points'] holds {v!r}; M is a positive integer or None (automatic).")
    for key in ("alpha", "lam"):
        for v in values[key]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UsageError(f"tune: search[{key!r}] holds {v!r}; weights are finite numbers >= 0.")
    return values


def check_values(key: str, vals: Sequence[Any], allowed: Sequence[Any]) -> None:
    """A ``UsageError`` naming the values of ``key`` not in ``allowed``."""
    bad = [v for v in vals if v not in allowed]
    if bad:
        raise UsageError(f"tune: search[{key!r}] holds {bad}; allowed: {list(allowed)}.")


def check_options(task: str, steps: int, max_cost: float, eta: int) -> None:
    """``tune``'s scalar options, checked."""
    if task not in get_args(TuneTask):
        raise UsageError(f"tune: task={task!r}; expected one of {list(get_args(TuneTask))}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"tune: steps={steps!r} must be a positive integer, the steps of one full training run.")
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise UsageError(f"tune: eta={eta!r} must be an integer >= 2. Hint: eta=3.")
    if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or not max_cost >= 2:
        raise UsageError(
            f"tune: max_cost={max_cost!r} is too small for one candidate: output-only training and one other "
            "candidate must each train the full budget, 2 output-only runs at least. Hint: max_cost=3.5 (the "
            "default), or math.inf for no bound."
        )


def rungs(steps: int, eta: int) -> list[int]:
    """Steps at the end of each rung: ..., steps / eta^2, steps / eta, steps (at most 3 rungs)."""
    out = [steps]
    while len(out) < 3 and out[0] // eta >= 1:
        out.insert(0, out[0] // eta)
    return out


def survivors(n: int, eta: int) -> int:
    """How many of ``n`` candidates (output-only not counted) go on to the next rung."""
    return max(1, math.ceil(n / eta))


def plan_steps(n: int, rung_steps: Sequence[int], eta: int) -> int:
    """Training steps of ``n`` candidates plus output-only, promoted as ``tune`` promotes them."""
    cost, prev, alive = rung_steps[-1], 0, n  # output-only always trains the full budget
    for r, s in enumerate(rung_steps):
        cost += alive * (s - prev)
        prev = s
        if r < len(rung_steps) - 1:
            alive = survivors(alive, eta)
    return cost


def draw(space: list[Candidate], rung_steps: Sequence[int], eta: int, steps: int, max_cost: float,
         seed: int) -> tuple[list[Candidate], int]:
    """Output-only and the candidates whose training steps fit ``max_cost`` full runs, in search order.

    Returns:
        The candidates (output-only first) and how many of ``space`` were left out. When all fit, the
        order is ``space``'s; otherwise a seeded draw per objective, dealt round-robin over the
        objectives (the order ``tune`` admits them in when it measures the budget).
    """
    others = space[1:]
    n = len(others)
    while n > 1 and plan_steps(n, rung_steps, eta) > max_cost * steps:
        n -= 1
    if n == len(others):
        return space, 0
    # Drawn per objective and dealt round-robin, so every objective of the space is searched whenever
    # the budget admits one candidate each: a plain draw of 9 of the 36 left out every DSN setting
    # for one seed of EVIDENCE.md's U-Net (the default space has 12 DSN settings and 24 iMacHSR ones).
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(others):
        groups.setdefault(c.objective, []).append(i)
    shuffled = [[g[j] for j in torch.randperm(len(g), generator=gen).tolist()] for g in groups.values()]
    dealt = [g[k] for k in range(max(map(len, shuffled))) for g in shuffled if k < len(g)]
    return [space[0]] + [others[i] for i in dealt[:n]], len(others) - n
