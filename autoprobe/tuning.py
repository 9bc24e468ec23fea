"""Does deep supervision pay off on *your* data? Search it on validation, never worse than output-only.

Public as ``autoprobe.tune`` (the function). The module is ``tuning``, not ``tune``: importing a
submodule binds its name on the package, so a module ``autoprobe/tune.py`` would replace the
function ``autoprobe.tune`` by the module as soon as anything imported it.

``tune`` trains a set of candidate settings (output-only training, DSN, iMacHSR; their weights,
the number of points M and where they sit) with successive halving: every candidate trains a
short first rung, the best third continue, and so on until the survivors have trained the full
budget. Output-only training is a candidate that is never eliminated and always trains the full
budget, and the winner must beat it on the validation split, so the returned setting is never
worse than output-only training on that split (ties go to output-only, the simpler one).

Rules defined once here:

* cost: every candidate's steps add up to at most ``max_cost`` times the budget of one full run
  (default 4); when the search space has more candidates than that allows, output-only and a
  seeded draw of as many others as fit are searched, dealt round-robin over the objectives so each
  objective is searched (the result says how many were dropped);
* continuation: a promoted candidate continues from its checkpoint; its learning-rate schedule
  and its objective's weight schedule are those of the full run, so a rung is the prefix of the
  full run, scored early;
* pairing: every candidate starts from the same initial weights (the seed) and its dropout
  draws are reseeded after ``instrument`` so no candidate's masks depend on its adapters; the
  caller's global RNG state is restored afterwards;
* resume: with ``state=PATH`` each finished rung of each candidate is appended to a JSON-lines
  file and its weights saved beside it; a rerun with the same arguments skips what is done.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from autoprobe import tune
    >>> gen = torch.Generator().manual_seed(0)
    >>> x = torch.randn(256, 1, 8, 8, generator=gen); y = (x[:, 0, :4].mean((1, 2)) > 0).long()
    >>> train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 192, 32)]
    >>> val = [(x[192:], y[192:])]
    >>> def factory():
    ...     conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
    ...     return nn.Sequential(conv(1, 8), conv(8, 8), conv(8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                          nn.Linear(8, 2))
    >>> result = tune(factory, train, val, task="classification", steps=9, progress=False,
    ...               search={"objective": ["output", "dsn"], "alpha": [0.3], "points": [None],
    ...                       "schedule": ["constant"]})
    >>> [c.candidate.label for c in result.table]
    ['output', 'dsn/alpha=0.3/M=auto/auto']
    >>> result.chosen.objective in ("output", "dsn")
    True
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SelectionError, UsageError

__all__ = ["Candidate", "CandidateResult", "TuneCost", "TuneResult", "SEARCH_KEYS", "DEFAULT_SEARCH", "tune"]

TuneObjective = Literal["output", "dsn", "imachsr"]
TuneTask = Literal["classification", "dense"]
TunePosition = Literal["auto", "input", "centre", "output"]

# The search keys and the values searched when the caller names none. alpha is the MI weight for
# iMacHSR and the auxiliary CE weight for DSN; lam applies to iMacHSR only; points=None is the
# automatic M; position "auto" is autoprobe's selection, the others ``placement.spaced``; gate None is
# no gate, "cosine" / "binary" the gradient-similarity gate (``autoprobe.losses.gate``), not searched
# by default so the default space is the one EVIDENCE.md's tuned rows ran.
SEARCH_KEYS: tuple[str, ...] = ("objective", "alpha", "lam", "points", "position", "schedule", "gate")
DEFAULT_SEARCH: Mapping[str, tuple[Any, ...]] = {
    "objective": ("output", "dsn", "imachsr"),
    "alpha": (0.05, 0.2, 0.5),
    "lam": (0.0, 0.01),
    "points": (None, 1),
    "position": ("auto",),
    "schedule": ("constant", "cosine"),
    "gate": (None,),
}
# Weight layers between spaced points (two ResNet basic blocks; the paper's best distance).
_SPACING = 4
# Offset of the seed the dropout generator is reset to after instrument (see module docstring).
_TRAIN_RNG_OFFSET = 7919


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
        gate: ``None``, ``"cosine"`` or ``"binary"``: the gradient-similarity gate (``instrument(gate=)``).
    """

    objective: TuneObjective = "output"
    alpha: float | None = None
    lam: float | None = None
    points: int | None = None
    position: TunePosition = "auto"
    schedule: str = "constant"
    gate: str | None = None

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
        return "/".join(parts)


@dataclass(frozen=True)
class CandidateResult:
    """What one candidate reached.

    Attributes:
        candidate: the setting.
        steps: training steps at its last rung.
        scores: validation score at the end of each rung it trained (higher is better).
        cost_steps: training steps it used in all (its share of the cost).
        error: why it could not be built (a point placement that does not fit), else None.
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
    """What the search cost, measured: everything it did, building and scoring included.

    Attributes:
        steps: training steps of all candidates (``max_cost`` bounds these).
        validation_passes: scorings of a candidate on the validation set (one per rung it finished).
        cpu_s: CPU seconds of this process (``time.process_time``) for the whole search.
        wall_s: wall seconds for the whole search.
        runs: ``cpu_s`` in units of output-only training's own full run (its build, steps and
            scorings), measured in the same search: what a user pays, next to one plain run.
    """

    steps: int
    validation_passes: int
    cpu_s: float
    wall_s: float
    runs: float


@dataclass(frozen=True)
class TuneResult:
    """The search's outcome.

    Attributes:
        chosen: the winning ``Candidate`` (output-only unless another beat it at the full budget).
        score: its validation score at the full budget.
        output_only_score: output-only training's validation score at the full budget.
        table: every candidate searched, in search order, with its scores and cost.
        instrument_kwargs: the ``autoprobe.instrument`` keyword arguments that reproduce the
            choice (``loss``, ``alpha``, ``lam``, ``points`` or ``selection``, ``schedule``,
            ``rules``, ``input_size``); None when output-only training won (do not instrument).
        budget_steps: steps of one full training run (the ``steps`` argument).
        cost_steps: training steps the search used in all (at most ``max_cost * budget_steps``).
        dropped: candidates of the search space left out to respect ``max_cost``.
        seed: the seed it ran with.
        cost: the measured ``TuneCost`` of the whole search (rebuilding the returned model included).
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


Batch = tuple[Tensor, Tensor]
Scorer = Callable[[nn.Module, Iterable[Batch]], float]


def tune(
    model: nn.Module | Callable[[], nn.Module],
    train: Iterable[Batch],
    val: Iterable[Batch],
    *,
    task: TuneTask,
    steps: int,
    search: Mapping[str, Sequence[Any]] | None = None,
    max_cost: float = 4.0,
    eta: int = 3,
    lr: float = 1e-3,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    lr_factor: Callable[[int], float] | None = None,
    score: Scorer | None = None,
    rules: str | None = None,
    seed: int = 0,
    state: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool | Callable[[str], None] = True,
    ignore_index: int = -100,
) -> TuneResult:
    """Search output-only training, DSN and iMacHSR settings on validation with successive halving.

    Args:
        model: a factory returning a fresh model (called once per candidate under
            ``torch.manual_seed(seed)``), or a model, deep-copied per candidate (never trained itself).
        train: re-iterable (a list, a ``DataLoader``) of ``(inputs, targets)`` batches; each
            candidate starts at its first batch and cycles through it. A one-shot iterator is refused.
        val: re-iterable of ``(inputs, targets)`` batches, scored by ``score``.
        task: ``"classification"`` (targets (B,)) or ``"dense"`` (targets (B, *S)).
        steps: training steps of one full run, the budget the survivors train.
        search: key -> values to search, keys from ``SEARCH_KEYS``; missing keys take
            ``DEFAULT_SEARCH``'s values. ``"output"`` is always added to ``objective``.
        max_cost: bound on all candidates' steps together, in units of ``steps`` (>= 2: output-only
            and one other candidate train the full budget).
        eta: successive halving's factor: each rung keeps 1/eta of the candidates and trains eta
            times longer.
        lr: AdamW's learning rate, constant (when ``optimizer`` is None).
        optimizer: a factory ``params -> Optimizer``, instead of AdamW(lr).
        lr_factor: ``step -> factor`` on each parameter group's initial learning rate at that step
            of the full run (warm-up, cosine decay); a function of the step, so a candidate that
            continues from a checkpoint follows the full run's schedule. None: constant.
        score: ``(model, val) -> float``, higher is better; default accuracy (classification)
            or mean IoU over the classes present in truth or prediction (dense).
        rules: the rule pack for automatic points; default ``"dense"`` for dense tasks.
        seed: initial weights, the draw of candidates when the space exceeds the cost bound.
        state: a JSON-lines file recording finished rungs (weights in ``<state>.d/``); a rerun
            with the same arguments resumes.
        device: where to train, ``"cpu"`` or ``"cuda"``.
        progress: print one line per finished rung to stderr (True), nothing (False), or call this.
        ignore_index: target value the losses and the default score leave out.

    Returns:
        A ``TuneResult``.

    Raises:
        UsageError: an empty validation set, a one-shot iterator, a budget too small for one
            candidate, an unknown search key or value, or a bad option.

    Example:
        See the module docstring.
    """
    space = _search_space(search)
    _check_options(task, steps, max_cost, eta)
    train_batches = _reiterable("train", train)
    val_batches = _reiterable("val", val)
    first = next(iter(val_batches), None)
    if first is None:
        raise UsageError("tune: the validation set is empty, so no candidate can be scored. "
                         "Hint: pass a list or DataLoader of (inputs, targets) batches held out from training.")
    if next(iter(train_batches), None) is None:
        raise UsageError("tune: the training set is empty. Hint: pass a list or DataLoader of (inputs, targets) batches.")
    rungs = _rungs(steps, eta)
    candidates, dropped = _fit_budget(space, rungs, eta, steps, max_cost, seed)
    scorer = score if score is not None else (_accuracy if task == "classification" else _miou_scorer(ignore_index))
    say = _progress(progress)
    run = _Runner(model, train_batches, val_batches, task, lr, optimizer, lr_factor, scorer, rules, seed, device,
                  ignore_index,
                  _State(Path(state), _fingerprint(candidates, rungs, seed, lr, task)) if state is not None else None,
                  steps)
    dev = torch.device(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        result = _search(run, candidates, rungs, eta, steps, dropped, seed, say)
    cpu = time.process_time() - cpu0
    unit = run.cpu.get(_OUTPUT, 0.0)
    cost = TuneCost(run.cost, run.validation_passes, round(cpu, 3), round(time.perf_counter() - wall0, 3),
                    round(cpu / unit, 3) if unit > 0 else math.nan)
    return replace(result, cost=cost)


def _search(run: _Runner, candidates: list[Candidate], rungs: list[int], eta: int, steps: int, dropped: int,
            seed: int, say: Callable[[str], None]) -> TuneResult:
    alive = list(candidates)
    for r, rung_steps in enumerate(rungs):
        final = r == len(rungs) - 1
        for c in alive:
            run.advance(c, rung_steps)
            outcome = f"{run.scores[c][-1]:.4f}" if c not in run.errors else f"skipped ({run.errors[c]})"
            say(f"tune: rung {r + 1}/{len(rungs)} ({rung_steps} steps) {c.label}: {outcome}")
        if final:
            break
        keep = _survivors(sum(c.objective != "output" for c in alive), eta)
        others = sorted((c for c in alive if c.objective != "output" and c not in run.errors),
                        key=lambda c: (-run.scores[c][-1], candidates.index(c)))
        alive = [_OUTPUT] + others[:keep]
    table = tuple(run.result(c) for c in candidates)
    output_score = run.scores[_OUTPUT][-1]
    finalists = [c for c in alive if c.objective != "output" and c not in run.errors]
    best = max(finalists, key=lambda c: (run.scores[c][-1], -candidates.index(c)), default=_OUTPUT)
    chosen = best if best is not _OUTPUT and run.scores[best][-1] > output_score else _OUTPUT
    say(f"tune: chose {chosen.label} (val {run.scores[chosen][-1]:.4f}; output-only {output_score:.4f}); "
        f"cost {run.cost} steps = {run.cost / steps:.2f} x the budget")
    # Built first: rebuilding the choice also places its points, which a resumed search has not done yet.
    model = run.trained(chosen)
    return TuneResult(
        chosen=chosen,
        score=run.scores[chosen][-1],
        output_only_score=output_score,
        table=table,
        instrument_kwargs=None if chosen.objective == "output" else run.instrument_kwargs(chosen),
        budget_steps=steps,
        cost_steps=run.cost,
        dropped=dropped,
        model=model,
        seed=seed,
    )


_OUTPUT = Candidate()


# ----------------------------------------------------------------------------- the search space


def _search_space(search: Mapping[str, Sequence[Any]] | None) -> list[Candidate]:
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
    _check_values("objective", values["objective"], get_args(TuneObjective))
    _check_values("position", values["position"], get_args(TunePosition))
    _check_values("schedule", values["schedule"], ("constant", "linear", "cosine"))
    _check_values("gate", values["gate"], (None, "cosine", "binary"))
    for v in values["points"]:
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise UsageError(f"tune: search['points'] holds {v!r}; M is a positive integer or None (automatic).")
    for key in ("alpha", "lam"):
        for v in values[key]:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UsageError(f"tune: search[{key!r}] holds {v!r}; weights are finite numbers >= 0.")
    out = [_OUTPUT]
    for objective in values["objective"]:
        if objective == "output":
            continue
        lams = values["lam"] if objective == "imachsr" else (None,)
        for alpha, lam, m, pos, sched, gate in itertools.product(values["alpha"], lams, values["points"],
                                                                 values["position"], values["schedule"], values["gate"]):
            c = Candidate(objective, float(alpha), None if lam is None else float(lam), m, pos, sched, gate)
            if c not in out:
                out.append(c)
    return out


def _check_values(key: str, vals: Sequence[Any], allowed: Sequence[str]) -> None:
    bad = [v for v in vals if v not in allowed]
    if bad:
        raise UsageError(f"tune: search[{key!r}] holds {bad}; allowed: {list(allowed)}.")


def _check_options(task: str, steps: int, max_cost: float, eta: int) -> None:
    if task not in get_args(TuneTask):
        raise UsageError(f"tune: task={task!r}; expected one of {list(get_args(TuneTask))}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"tune: steps={steps!r} must be a positive integer, the steps of one full training run.")
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise UsageError(f"tune: eta={eta!r} must be an integer >= 2. Hint: eta=3.")
    if not isinstance(max_cost, (int, float)) or not max_cost >= 2:
        raise UsageError(
            f"tune: max_cost={max_cost!r} is too small for one candidate: output-only training and one other "
            "candidate must each train the full budget, 2x steps. Hint: max_cost=4 (the default)."
        )


def _rungs(steps: int, eta: int) -> list[int]:
    """Steps at the end of each rung: ..., steps / eta^2, steps / eta, steps (at most 3 rungs)."""
    rungs = [steps]
    while len(rungs) < 3 and rungs[0] // eta >= 1:
        rungs.insert(0, rungs[0] // eta)
    return rungs


def _survivors(n: int, eta: int) -> int:
    """How many of ``n`` candidates (output-only not counted) go on to the next rung."""
    return max(1, math.ceil(n / eta))


def _plan_cost(n: int, rungs: Sequence[int], eta: int) -> int:
    """Steps used by ``n`` candidates plus output-only, promoted as ``tune`` promotes them."""
    cost, prev, alive = rungs[-1], 0, n  # output-only always trains the full budget
    for r, s in enumerate(rungs):
        cost += alive * (s - prev)
        prev = s
        if r < len(rungs) - 1:
            alive = _survivors(alive, eta)
    return cost


def _fit_budget(space: list[Candidate], rungs: Sequence[int], eta: int, steps: int, max_cost: float,
                seed: int) -> tuple[list[Candidate], int]:
    others = space[1:]
    n = len(others)
    while n > 1 and _plan_cost(n, rungs, eta) > max_cost * steps:
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
    kept = sorted(dealt[:n])
    return [space[0]] + [others[i] for i in kept], len(others) - n


# ----------------------------------------------------------------------------- training


def _reiterable(name: str, data: Iterable[Batch]) -> Iterable[Batch]:
    if iter(data) is data:
        raise UsageError(f"tune: {name} is a one-shot iterator; every candidate needs to read it from the start. "
                         "Hint: pass a list of batches or a DataLoader.")
    return data


def _cycle(data: Iterable[Batch], skip: int) -> Iterator[Batch]:
    done = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            if done >= skip:
                yield batch
            done += 1
        if empty:
            return


class _State:
    """The JSON-lines record of finished rungs, and the weights beside it."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.dir = path.with_name(path.name + ".d")
        self.records: dict[tuple[str, int], list[float]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                if rec["fingerprint"] != fingerprint:
                    raise UsageError(f"tune: state file {path} was written by a search with other arguments. "
                                     "Hint: pass a new state path, or delete this one to start over.")
                self.records[(rec["candidate"], rec["steps"])] = rec["scores"]
        self.fingerprint = fingerprint

    def weights(self, c: Candidate, steps: int) -> Path:
        # One file per rung: a crash between saving the weights and recording the rung cannot leave
        # a later rung's weights under an earlier rung's record.
        return self.dir / f"{_slug(c.label)}@{steps}.pt"

    def save(self, c: Candidate, steps: int, scores: list[float], blob: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        torch.save(blob, self.weights(c, steps))
        with self.path.open("a") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint, "candidate": c.label, "steps": steps,
                                "scores": scores}) + "\n")
        self.records[(c.label, steps)] = scores


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in label)


def _fingerprint(candidates: Sequence[Candidate], rungs: Sequence[int], seed: int, lr: float, task: str) -> str:
    return json.dumps([[c.label for c in candidates], list(rungs), seed, lr, task])


class _Runner:
    """Trains candidates rung by rung, keeping each one's weights between rungs."""

    def __init__(self, model, train, val, task, lr, optimizer, lr_factor, scorer, rules, seed, device, ignore_index,
                 state, full_steps):
        self.model, self.train, self.val, self.task = model, train, val, task
        self.lr, self.optimizer, self.lr_factor, self.scorer = lr, optimizer, lr_factor, scorer
        self.rules = rules if rules is not None else ("dense" if task == "dense" else "default")
        self.seed, self.device, self.ignore_index, self.state = seed, torch.device(device), ignore_index, state
        self.scores: dict[Candidate, list[float]] = {}
        self.steps: dict[Candidate, int] = {}
        self.errors: dict[Candidate, str] = {}
        self.blobs: dict[Candidate, dict[str, Any]] = {}
        self.selections: dict[Candidate, Any] = {}
        self.cost = 0
        self.validation_passes = 0
        self.cpu: dict[Candidate, float] = {}  # CPU seconds spent on each candidate (build, steps, scoring)
        self.full_steps = full_steps
        self._input_size = tuple(next(iter(train))[0].shape[1:])

    def _fresh(self) -> nn.Module:
        torch.manual_seed(self.seed)
        if isinstance(self.model, nn.Module):
            return copy.deepcopy(self.model)
        built = self.model()
        if not isinstance(built, nn.Module):
            raise UsageError(f"tune: the model factory returned {type(built).__name__}, not an nn.Module. "
                             "Hint: pass a callable that builds the model, e.g. lambda: MyNet().")
        return built

    def instrument_kwargs(self, c: Candidate) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"loss": c.objective, "alpha": c.alpha, "schedule": c.schedule,
                                  "input_size": self._input_size, "ignore_index": self.ignore_index}
        if c.objective == "imachsr":
            kwargs["lam"] = c.lam
        if c.gate is not None:
            kwargs["gate"] = c.gate
        if c.position == "auto":
            kwargs["rules"] = self.rules
            if c.points is not None:
                kwargs["points"] = c.points
        else:
            kwargs["selection"] = self.selections[c]
        return kwargs

    def _build(self, c: Candidate) -> tuple[nn.Module, nn.Module | None]:
        import autoprobe
        from . import placement
        from .api import analyze

        model = self._fresh()
        if c.objective == "output":
            return model, None
        if c.position != "auto" and c not in self.selections:
            analysis = analyze(model, input_size=self._input_size, rules=self.rules)
            self.selections[c] = placement.spaced(analysis, c.points or 3, _SPACING, c.position)
        probed = autoprobe.instrument(model, **self.instrument_kwargs(c))
        return model, probed

    def advance(self, c: Candidate, to_steps: int) -> None:
        if c in self.errors:
            return
        done = self.steps.get(c, 0)
        if self.state is not None and (c.label, to_steps) in self.state.records:
            self.scores[c] = list(self.state.records[(c.label, to_steps)])
            self.cost += to_steps - done
            self.steps[c] = to_steps
            return
        cpu0 = time.process_time()
        try:
            model, probed = self._build(c)
        except SelectionError as exc:  # a placement that does not fit this model: reported in the table
            self.errors[c] = str(exc).splitlines()[0]
            return
        trainable = probed if probed is not None else model
        trainable.to(self.device)
        opt = (self.optimizer or (lambda p: torch.optim.AdamW(p, lr=self.lr)))(trainable.parameters())
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        blob = self.blobs.get(c)
        if blob is None and done and self.state is not None and self.state.weights(c, done).exists():
            blob = torch.load(self.state.weights(c, done), map_location=self.device, weights_only=False)
        if blob is not None:
            trainable.load_state_dict(blob["model"])
            opt.load_state_dict(blob["optimizer"])
            torch.set_rng_state(blob["rng"])
        else:
            torch.manual_seed(self.seed + _TRAIN_RNG_OFFSET)
        trainable.train()
        batches = _cycle(self.train, done)
        total = self.full_steps
        for step in range(done, to_steps):
            x, y = next(batches)
            x, y = x.to(self.device), y.to(self.device)
            if self.lr_factor is not None:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * self.lr_factor(step)
            if probed is None:
                loss = _output_loss(model(x), y, self.ignore_index)
            else:
                loss = probed.loss(probed(x), y, progress=min(1.0, step / total)).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            value = float(self.scorer(model, _on(self.val, self.device)))
        self.cost += to_steps - done
        self.validation_passes += 1
        self.cpu[c] = self.cpu.get(c, 0.0) + time.process_time() - cpu0
        self.steps[c] = to_steps
        self.scores.setdefault(c, []).append(value)
        blob = {"model": trainable.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
        self.blobs[c] = blob
        if self.state is not None:
            self.state.save(c, to_steps, self.scores[c], blob)

    def trained(self, c: Candidate) -> nn.Module:
        """``c`` rebuilt with the weights of its last rung (in memory, or from the state on a resume)."""
        model, probed = self._build(c)
        trainable = probed if probed is not None else model
        blob = self.blobs.get(c)
        if blob is None and self.state is not None:
            blob = torch.load(self.state.weights(c, self.steps[c]), map_location=self.device, weights_only=False)
        if blob is None:
            raise UsageError(f"tune: the weights of {c.label} at {self.steps.get(c, 0)} steps are gone. "
                             "Hint: rerun with a new state path.")
        trainable.to(self.device).load_state_dict(blob["model"])
        return trainable.eval()

    def result(self, c: Candidate) -> CandidateResult:
        return CandidateResult(c, self.steps.get(c, 0), tuple(self.scores.get(c, ())), self.steps.get(c, 0),
                               self.errors.get(c))


def _on(val: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    for x, y in val:
        yield x.to(device), y.to(device)


def _output_loss(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    if logits.dim() > 2 and logits.shape[2:] != target.shape[1:]:
        logits = F.interpolate(logits, size=target.shape[1:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


# ----------------------------------------------------------------------------- scores


def _accuracy(model: nn.Module, val: Iterable[Batch]) -> float:
    correct = total = 0
    for x, y in val:
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    return correct / max(total, 1)


def _miou_scorer(ignore_index: int) -> Scorer:
    def miou(model: nn.Module, val: Iterable[Batch]) -> float:
        cm: Tensor | None = None
        for x, y in val:
            logits = model(x)
            if logits.shape[2:] != y.shape[1:]:
                logits = F.interpolate(logits, size=y.shape[1:], mode="bilinear", align_corners=False)
            k = logits.shape[1]
            valid = y != ignore_index
            pred, truth = logits.argmax(1)[valid], y[valid]
            counts = torch.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
            cm = counts if cm is None else cm + counts
        assert cm is not None  # tune checked that val is not empty
        tp = cm.diag().double()
        union = cm.sum(0) + cm.sum(1) - cm.diag()
        present = union > 0
        return float((tp[present] / union[present].double()).mean()) if bool(present.any()) else 0.0
    return miou


def _progress(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: None
