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
* engine: Optuna (the ``tune`` extra). Each candidate is a fixed trial of one study (enqueued, its
  one parameter the candidate's label), each rung's score is ``trial.report``-ed, and the halving is
  the study's pruner (``_pruner``: the whole rung's best 1/eta go on, output-only never pruned);
* storage and resume: in memory by default; with ``state=PATH`` the study is an Optuna journal file
  and each rung's weights are saved beside it, so a rerun with the same arguments skips what is
  done; with ``storage=URL`` (an RDB) several calls, on one machine or many, share one study;
* workers: ``workers=N`` spawns N processes on this machine sharing the study; each candidate's
  training does not depend on which process runs it, so the choice is the one of a single worker.

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
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SelectionError, UsageError

__all__ = ["Candidate", "CandidateResult", "TuneCost", "TuneResult", "SEARCH_KEYS", "DEFAULT_SEARCH", "tune",
           "hp_space", "candidate"]

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
    storage: str | None = None,
    workers: int = 1,
) -> TuneResult:
    """Search output-only training, DSN and iMacHSR settings on validation with successive halving.

    The search runs on Optuna (``pip install "autoprobe[tune]"``): every candidate is a fixed trial
    of one study, each rung's validation score is reported with ``trial.report``, and the halving is
    the study's pruner.

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
        state: a file holding the study (an Optuna journal; each rung's weights in ``<state>.d/``);
            a rerun with the same arguments resumes, skipping finished rungs. One search per file.
        device: where to train, ``"cpu"`` or ``"cuda"``.
        progress: print one line per finished rung to stderr (True), nothing (False), or call this
            (in this process, also with ``workers > 1``).
        ignore_index: target value the losses and the default score leave out.
        storage: an Optuna RDB URL (``"sqlite:///tune.db"``, ``"postgresql://..."``) holding the
            study, so that several calls, on one machine or many, share one search: each call
            trains the candidates nobody else has taken. Not with ``state``.
        workers: worker processes on this machine sharing the study (spawned; they share a journal
            in a temporary folder unless ``state`` or ``storage`` is given). With ``workers > 1``
            ``model`` (a factory), ``train``, ``val``, ``score``, ``optimizer`` and ``lr_factor``
            must be picklable (defined at module level, no lambdas), and a calling script needs the
            ``if __name__ == "__main__":`` guard (spawned workers import it); the choice is the same
            as with one worker.

    Returns:
        A ``TuneResult``.

    Raises:
        UsageError: optuna missing, an empty validation set, a one-shot iterator, a budget too small
            for one candidate, an unknown search key or value, a state file of another search, an
            unpicklable argument with ``workers > 1``, or a bad option.

    Example:
        See the module docstring.
    """
    optuna = _optuna()
    space = _search_space(search)
    _check_options(task, steps, max_cost, eta)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"tune: workers={workers!r} must be a positive integer, the processes that train "
                         "candidates. Hint: workers=1 (this process) or workers=2.")
    if state is not None and storage is not None:
        raise UsageError("tune: pass state (a file for one search that resumes) or storage (an RDB URL shared by "
                         "several calls), not both. Hint: storage='sqlite:///tune.db' also resumes.")
    if storage is not None and not isinstance(storage, str):
        raise UsageError(f"tune: storage={storage!r} must be an Optuna RDB URL string. "
                         "Hint: storage='sqlite:///tune.db'.")
    train_batches = _reiterable("train", train)
    val_batches = _reiterable("val", val)
    first = next(iter(val_batches), None)
    if first is None:
        raise UsageError("tune: the validation set is empty, so no candidate can be scored. "
                         "Hint: pass a list or DataLoader of (inputs, targets) batches held out from training.")
    if next(iter(train_batches), None) is None:
        raise UsageError("tune: the training set is empty. Hint: pass a list or DataLoader of (inputs, targets) batches.")
    if workers > 1:
        _check_picklable(workers, model=model, train=train_batches, val=val_batches, score=score,
                         optimizer=optimizer, lr_factor=lr_factor)
    rungs = _rungs(steps, eta)
    candidates, dropped = _fit_budget(space, rungs, eta, steps, max_cost, seed)
    say = _progress(progress)
    fingerprint = _fingerprint(candidates, rungs, seed, lr, task)
    options = dict(task=task, lr=lr, optimizer=optimizer, lr_factor=lr_factor, score=score, rules=rules, seed=seed,
                   device=str(device), ignore_index=ignore_index, full_steps=steps)
    dev = torch.device(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    verbosity = optuna.logging.get_verbosity()
    # Optuna logs every trial at INFO; tune reports its own progress. Restored below.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scratch = None
    try:
        if state is not None:
            path = Path(state)
            spec: tuple[str, str] | None = ("journal", str(path))
            weights: Path | None = path.with_name(path.name + ".d")
        elif storage is not None:
            spec = ("url", storage)
            scratch = tempfile.TemporaryDirectory(prefix="autoprobe-tune-")
            weights = Path(scratch.name)
        elif workers > 1:
            scratch = tempfile.TemporaryDirectory(prefix="autoprobe-tune-")
            spec, weights = ("journal", str(Path(scratch.name) / "study.journal")), Path(scratch.name)
        else:
            spec, weights = None, None
        store = _open_storage(optuna, spec)
        name = _STUDY_PREFIX + hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        if state is not None:
            others = [n for n in optuna.get_all_study_names(store) if n != name]
            if others:
                raise UsageError(f"tune: state file {state} was written by a search with other arguments. "
                                 "Hint: pass a new state path, or delete this one to start over.")
        study = optuna.create_study(study_name=name, storage=store, direction="maximize", load_if_exists=True,
                                    sampler=optuna.samplers.RandomSampler(seed=seed), pruner=_pruner(optuna, rungs, eta))
        study.set_user_attr("fingerprint", fingerprint)
        if state is not None:
            _reclaim(optuna, study)  # one search per state file: a rerun takes over the rungs an interrupt left
        _enqueue(optuna, study, candidates)
        run = _Runner(model, train_batches, val_batches, weights=weights, **options)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            if workers == 1:
                stats = [_work(optuna, study, store, run, candidates, rungs, say, alone=storage is None)]
            else:
                payload = dict(model=model, train=train_batches, val=val_batches, weights=weights, options=options,
                               candidates=candidates, rungs=rungs, eta=eta, threads=torch.get_num_threads())
                stats = _spawn(workers, payload, spec, name, say)
            _wait(study, lambda t: t.state.is_finished(), alone=storage is None)  # other machines' (storage=)
            result = _result(study, run, candidates, rungs, steps, dropped, seed, say)
    finally:
        optuna.logging.set_verbosity(verbosity)
        if scratch is not None:
            scratch.cleanup()
    cpu = time.process_time() - cpu0 + sum(s["cpu_s"] for s in stats if s["pid"] != os.getpid())
    unit = sum(s["cpu"].get(_OUTPUT.label, 0.0) for s in stats)
    cost = TuneCost(result.cost_steps, sum(s["passes"] for s in stats), round(cpu, 3),
                    round(time.perf_counter() - wall0, 3), round(cpu / unit, 3) if unit > 0 else math.nan)
    return replace(result, cost=cost)


_OUTPUT = Candidate()
_STUDY_PREFIX = "autoprobe-tune-"
# How long a spawned worker waits for the others to start (import torch, load the study) before failing.
_START_TIMEOUT_S = 600.0


# ----------------------------------------------------------------------------- the engine: Optuna


def _optuna() -> Any:
    """Optuna, imported on first use: only ``tune`` needs it, so it is an extra."""
    try:
        import optuna
    except ImportError as exc:
        raise UsageError('tune: runs its search on Optuna, which is not installed. '
                         'Hint: pip install "autoprobe[tune]"') from exc
    return optuna


def _open_storage(optuna: Any, spec: tuple[str, str] | None) -> Any:
    if spec is None:
        return optuna.storages.InMemoryStorage()
    kind, where = spec
    if kind == "url":
        return optuna.storages.RDBStorage(where)
    path = Path(where)
    if path.exists() and path.stat().st_size:
        with path.open() as f:
            head = f.readline()
        try:
            record = json.loads(head)
        except ValueError:
            record = None
        if isinstance(record, dict) and "fingerprint" in record:
            raise UsageError(f"tune: state file {path} is in the format of an older autoprobe (JSON lines of "
                             "rungs), which this one cannot resume. Hint: pass a new state path, or delete it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def _pruner(optuna: Any, rungs: Sequence[int], eta: int) -> Any:
    """Synchronous successive halving as an Optuna pruner.

    Optuna's ``SuccessiveHalvingPruner`` is asynchronous: it promotes a trial when it is in the top
    1/eta of those that have reached the rung *so far*, so the first trial of a rung always goes on,
    and its rungs are ``min_resource * eta**k`` steps, not ``steps / eta**k``. tune's rule is that of
    the whole rung: asked only once every candidate has reported the rung (``_wait``), it keeps the
    best ``ceil(n / eta)`` of the ``n`` candidates that entered it (ties: the earlier candidate), and
    never prunes output-only.
    """

    class HalvingPruner(optuna.pruners.BasePruner):
        def prune(self, study: Any, trial: Any) -> bool:
            step = trial.last_step
            if step is None or trial.user_attrs.get("label") == _OUTPUT.label or step >= rungs[-1]:
                return False
            # A candidate that could not be built entered the first rung: it counts in n, unranked.
            entered = [t for t in _canonical(study.get_trials(deepcopy=False)) if t.user_attrs["label"] != _OUTPUT.label
                       and (step in t.intermediate_values or (step == rungs[0] and "error" in t.user_attrs))]
            ranked = sorted((t for t in entered if step in t.intermediate_values),
                            key=lambda t: (-t.intermediate_values[step], t.user_attrs["index"]))
            return trial.number not in {t.number for t in ranked[:_survivors(len(entered), eta)]}

    return HalvingPruner()


def _canonical(trials: Iterable[Any]) -> list[Any]:
    """The trial of each candidate: its lowest-numbered one not failed. A failed trial is one an
    interrupt left (``_reclaim`` enqueued its candidate again) or a duplicate of a race to enqueue."""
    by: dict[str, Any] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state.name != "FAIL" and "label" in t.user_attrs:
            by.setdefault(t.user_attrs["label"], t)
    return sorted(by.values(), key=lambda t: t.user_attrs["index"])


def _enqueue(optuna: Any, study: Any, candidates: Sequence[Candidate]) -> None:
    """Each candidate not in the study yet becomes a fixed trial: the set searched is exactly the draw."""
    have = {t.user_attrs["label"] for t in _canonical(study.get_trials(deepcopy=False))}
    for i, c in enumerate(candidates):
        if c.label not in have:
            study.enqueue_trial({"candidate": c.label}, user_attrs={"label": c.label, "index": i})


def _reclaim(optuna: Any, study: Any) -> None:
    """Trials left running by an interrupted call: failed, their candidates enqueued again carrying the
    rungs they finished (their weights are in the state folder), so the rerun continues them."""
    for t in _canonical(study.get_trials(deepcopy=False)):
        if t.state == optuna.trial.TrialState.RUNNING:
            done = sorted(t.intermediate_values.items())
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial({"candidate": t.user_attrs["label"]},
                                user_attrs={"label": t.user_attrs["label"], "index": t.user_attrs["index"],
                                            "resumed": [[s, v] for s, v in done]})


def _claim(optuna: Any, study: Any, store: Any, rank: int, size: int) -> Any:
    """The next waiting trial, taken atomically (as ``Study.ask`` takes one, without ever sampling a
    new trial when none waits): first those dealt to this worker (index % size == rank), then any."""
    study_id = store.get_study_id_from_name(study.study_name)
    waiting = store.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    for t in sorted(waiting, key=lambda t: (t.user_attrs.get("index", 0) % size != rank, t.number)):
        try:
            # FrozenTrial._trial_id is the storage's key, which Optuna's own ask uses the same way.
            if store.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.RUNNING):
                return optuna.trial.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _wait(study: Any, ready: Callable[[Any], bool], alone: bool, poll: float = 0.05) -> None:
    """Until ``ready`` holds for every candidate's trial (others' workers report into the same study).

    ``alone``: no other process works on the study, so a trial not ready would never be.
    """
    while not all(ready(t) for t in _canonical(study.get_trials(deepcopy=False))):
        if alone:
            late = [t.user_attrs["label"] for t in _canonical(study.get_trials(deepcopy=False)) if not ready(t)]
            raise RuntimeError(f"tune: the trials of {late} are held by no worker (an internal error: "
                               "an interrupted search's trials are reclaimed when it resumes).")
        time.sleep(poll)


def _work(optuna: Any, study: Any, store: Any, run: _Runner, candidates: Sequence[Candidate],
          rungs: Sequence[int], say: Callable[[str], None], rank: int = 0, size: int = 1,
          alone: bool = False) -> dict[str, Any]:
    """One worker: takes candidates from the study, trains them rung by rung, reports, prunes.

    The first rung hands out the candidates: dealt round-robin over the ``size`` workers (this is
    number ``rank``), and a worker done with its own takes any still waiting (another machine's
    call, a slow start). The worker that took a candidate keeps it, continuing from its weights in
    memory. Before a later rung every worker
    waits until every candidate has reported the rung before (or finished), so the pruner compares
    the whole rung.
    """
    pruned, complete = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    by_label = {c.label: c for c in candidates}
    labels = list(by_label)
    mine: list[tuple[Any, Candidate]] = []

    def train(trial: Any, c: Candidate, r: int) -> bool:
        run.advance(c, rungs[r])
        head = f"tune: rung {r + 1}/{len(rungs)} ({rungs[r]} steps) {c.label}"
        if c in run.errors:
            trial.set_user_attr("error", run.errors[c])
            study.tell(trial, state=pruned)
            say(f"{head}: skipped ({run.errors[c]})")
            return False
        trial.set_user_attr("cpu_s", run.cpu.get(c, 0.0))
        trial.report(run.scores[c][-1], rungs[r])
        say(f"{head}: {run.scores[c][-1]:.4f}")
        return True

    while (trial := _claim(optuna, study, store, rank, size)) is not None:
        attrs = trial.user_attrs
        c = by_label[attrs["label"]]
        canon = {t.user_attrs["label"]: t for t in _canonical(study.get_trials(deepcopy=False))}
        if canon[c.label].number != trial.number:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # a duplicate of a race to enqueue
            continue
        trial.suggest_categorical("candidate", labels)  # the enqueued label: records the parameter
        resumed = [(int(s), float(v)) for s, v in attrs.get("resumed", [])]
        for s, v in resumed:
            trial.report(v, s)
        if resumed:
            run.resume(c, resumed)
            mine.append((trial, c))
        elif train(trial, c, 0):
            mine.append((trial, c))
    for r in range(1, len(rungs)):
        _wait(study, lambda t: t.state.is_finished() or rungs[r - 1] in t.intermediate_values, alone)
        alive = []
        for trial, c in mine:
            if run.steps[c] < rungs[r]:
                if trial.should_prune():
                    study.tell(trial, state=pruned)
                    continue
                if not train(trial, c, r):
                    continue
            alive.append((trial, c))
        mine = alive
    for trial, c in mine:
        study.tell(trial, run.scores[c][-1])
    return {"pid": os.getpid(), "passes": run.validation_passes, "cpu": {c.label: s for c, s in run.cpu.items()},
            "cpu_s": time.process_time()}


def _result(study: Any, run: _Runner, candidates: Sequence[Candidate], rungs: Sequence[int], steps: int,
            dropped: int, seed: int, say: Callable[[str], None]) -> TuneResult:
    trials = {t.user_attrs["label"]: t for t in _canonical(study.get_trials(deepcopy=False))}
    table = []
    for c in candidates:
        t = trials[c.label]
        done = sorted(t.intermediate_values.items())
        table.append(CandidateResult(c, done[-1][0] if done else 0, tuple(v for _, v in done),
                                     done[-1][0] if done else 0, t.user_attrs.get("error")))
    output = table[0]
    finalists = [row for row in table[1:] if row.steps == rungs[-1] and row.error is None]
    best = max(finalists, key=lambda row: (row.score, -candidates.index(row.candidate)), default=output)
    # Ties go to output-only, the simpler setting: another is chosen only if strictly higher.
    chosen = best if best.score > output.score else output
    cost_steps = sum(row.cost_steps for row in table)
    say(f"tune: chose {chosen.candidate.label} (val {chosen.score:.4f}; output-only {output.score:.4f}); "
        f"cost {cost_steps} steps = {cost_steps / steps:.2f} x the budget")
    # Built first: rebuilding the choice also places its points, which instrument_kwargs reads.
    model = run.trained(chosen.candidate, chosen.steps, say)
    return TuneResult(
        chosen=chosen.candidate,
        score=chosen.score,
        output_only_score=output.score,
        table=tuple(table),
        instrument_kwargs=None if chosen.candidate.objective == "output" else run.instrument_kwargs(chosen.candidate),
        budget_steps=steps,
        cost_steps=cost_steps,
        dropped=dropped,
        model=model,
        seed=seed,
    )


# ----------------------------------------------------------------------------- worker processes


def _check_picklable(workers: int, **things: Any) -> None:
    for name, thing in things.items():
        if thing is None:
            continue
        try:
            pickle.dumps(thing)
        except Exception as exc:  # pickling raises PicklingError, AttributeError or TypeError
            raise UsageError(
                f"tune: workers={workers} trains candidates in other processes, so {name} must be picklable, "
                f"and it is not ({type(exc).__name__}: {exc}). Hint: define it at module level (no lambda or local "
                "function, no open file), or pass workers=1."
            ) from exc


def _spawn(workers: int, payload: dict[str, Any], spec: tuple[str, str], name: str,
           say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Runs ``workers`` processes of ``_work`` on the shared study; their progress lines come back here."""
    # spawn: a fresh interpreter per worker, so no forked copy of this process's threads or CUDA state.
    ctx = multiprocessing.get_context("spawn")
    lines, results = ctx.Queue(), ctx.Queue()
    # Workers start claiming together: the first to import torch would otherwise take every candidate
    # of a short first rung, and keep them all for the later rungs.
    start = ctx.Barrier(workers)
    procs = [ctx.Process(target=_worker_main, args=(payload, spec, name, lines, results, start, rank, workers))
             for rank in range(workers)]
    stats: list[dict[str, Any]] = []
    failures: list[tuple[BaseException | None, str]] = []
    try:
        for p in procs:
            p.start()
        # Stops at the first failure: the other workers would wait for its candidates forever.
        while len(stats) < workers and not failures:
            _drain(lines, say)
            try:
                kind, *rest = results.get(timeout=0.1)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    failures.append((None, f"a worker exited with code {dead[0]} (killed, or out of memory)"))
                continue
            (stats.append(rest[0]) if kind == "ok" else failures.append((rest[0], rest[1])))
        if not failures:
            for p in procs:
                p.join()
        _drain(lines, say)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    if failures:
        exc, text = failures[0]
        if isinstance(exc, UsageError):
            raise exc
        raise RuntimeError(f"tune: a worker process failed:\n{text}")
    return stats


def _drain(lines: Any, say: Callable[[str], None]) -> None:
    while True:
        try:
            say(lines.get_nowait())
        except queue.Empty:
            return


def _worker_main(payload: dict[str, Any], spec: tuple[str, str], name: str, lines: Any, results: Any, start: Any,
                 rank: int, size: int) -> None:
    """A worker process's entry point (module level, so spawn can import it)."""
    try:
        # The parent's intra-op thread count: kernels then split their sums the same way, so a
        # candidate's scores are the same whichever process trains it.
        torch.set_num_threads(payload["threads"])
        optuna = _optuna()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        store = _open_storage(optuna, spec)
        study = optuna.load_study(study_name=name, storage=store,
                                  sampler=optuna.samplers.RandomSampler(seed=payload["options"]["seed"]),
                                  pruner=_pruner(optuna, payload["rungs"], payload["eta"]))
        run = _Runner(payload["model"], payload["train"], payload["val"], weights=payload["weights"],
                      **payload["options"])
        start.wait(timeout=_START_TIMEOUT_S)
        stats = _work(optuna, study, store, run, payload["candidates"], payload["rungs"], lines.put, rank, size)
        results.put(("ok", stats))
    except BaseException as exc:  # reported to the parent, which raises it
        try:
            pickle.dumps(exc)
        except Exception:
            exc = None
        results.put(("error", exc, traceback.format_exc()))


# ----------------------------------------------------------------------------- the search space


def hp_space(trial: Any, search: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """tune's search keys as an Optuna ``hp_space``, e.g. for Hugging Face's hyperparameter search.

    ``Trainer.hyperparameter_search(backend="optuna", hp_space=autoprobe.tuning.hp_space, ...)``
    samples one value per key (``SEARCH_KEYS``, each a ``CategoricalDistribution``); the Trainer's
    ``model_init(trial)`` then builds the setting with ``candidate(trial.params)`` (README, "Hugging
    Face": ``AutoprobeTrainer`` takes a built ``Probed``, so the search uses the plain ``Trainer``).

    Args:
        trial: an ``optuna.trial.Trial``.
        search: key -> values, as ``tune``'s ``search`` (missing keys: ``DEFAULT_SEARCH``); pass it
            with ``functools.partial`` to search other values.

    Returns:
        key -> the sampled value, for every key of ``SEARCH_KEYS``.

    Raises:
        UsageError: an unknown search key or value.
    """
    values = _search_values(search)
    values["objective"] = ("output", *(v for v in values["objective"] if v != "output"))
    return {key: trial.suggest_categorical(key, list(vals)) for key, vals in values.items()}


def candidate(params: Mapping[str, Any]) -> Candidate:
    """The ``Candidate`` of sampled ``hp_space`` values (keys the key does not apply to are ignored:
    an output-only setting has no weights, DSN no ``lam``).

    Args:
        params: key -> value for the keys of ``SEARCH_KEYS`` (``trial.params``); missing keys take
            the defaults of ``Candidate``.

    Returns:
        The setting, equal to the candidate ``tune`` would search for the same values.

    Raises:
        UsageError: an unknown key or objective.
    """
    unknown = sorted(set(params) - set(SEARCH_KEYS))
    if unknown:
        raise UsageError(f"tune: unknown search key(s) {unknown}; the keys are {list(SEARCH_KEYS)}. "
                         "Hint: pass trial.params of a trial that sampled autoprobe.tuning.hp_space.")
    objective = params.get("objective", "output")
    _check_values("objective", [objective], get_args(TuneObjective))
    if objective == "output":
        return _OUTPUT
    lam = params.get("lam") if objective == "imachsr" else None
    alpha = params.get("alpha")
    return Candidate(objective, None if alpha is None else float(alpha), None if lam is None else float(lam),
                     params.get("points"), params.get("position", "auto"), params.get("schedule", "constant"),
                     params.get("gate"))


def _search_space(search: Mapping[str, Sequence[Any]] | None) -> list[Candidate]:
    values = _search_values(search)
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


def _search_values(search: Mapping[str, Sequence[Any]] | None) -> dict[str, tuple[Any, ...]]:
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
    return values


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


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in label)


def _fingerprint(candidates: Sequence[Candidate], rungs: Sequence[int], seed: int, lr: float, task: str) -> str:
    return json.dumps([[c.label for c in candidates], list(rungs), seed, lr, task])


class _Runner:
    """Trains candidates rung by rung, keeping each one's weights between rungs."""

    def __init__(self, model: Any, train: Iterable[Batch], val: Iterable[Batch], *, task: str, lr: float,
                 optimizer: Any, lr_factor: Any, score: Scorer | None, rules: str | None, seed: int, device: str,
                 ignore_index: int, full_steps: int, weights: Path | None) -> None:
        self.model, self.train, self.val, self.task = model, train, val, task
        self.lr, self.optimizer, self.lr_factor = lr, optimizer, lr_factor
        self.scorer = score if score is not None else (_accuracy if task == "classification" else _miou_scorer(ignore_index))
        self.rules = rules if rules is not None else ("dense" if task == "dense" else "default")
        self.seed, self.device, self.ignore_index = seed, torch.device(device), ignore_index
        self.weights = weights  # a folder for each rung's weights (a state, or shared by workers), or None
        self.scores: dict[Candidate, list[float]] = {}
        self.steps: dict[Candidate, int] = {}
        self.errors: dict[Candidate, str] = {}
        self.blobs: dict[Candidate, dict[str, Any]] = {}
        self.selections: dict[Candidate, Any] = {}
        self.validation_passes = 0
        self.cpu: dict[Candidate, float] = {}  # CPU seconds spent on each candidate (build, steps, scoring)
        self.full_steps = full_steps
        self._input_size = tuple(next(iter(train))[0].shape[1:])

    def weights_file(self, c: Candidate, steps: int) -> Path | None:
        # One file per rung: a crash between saving the weights and reporting the rung cannot leave
        # a later rung's weights under an earlier rung's score.
        return None if self.weights is None else self.weights / f"{_slug(c.label)}@{steps}.pt"

    def resume(self, c: Candidate, done: Sequence[tuple[int, float]]) -> None:
        """Rungs of ``c`` an earlier call finished (their weights are in the folder): not trained again."""
        self.scores[c] = [v for _, v in done]
        self.steps[c] = done[-1][0]

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
        # Always given, None included: a candidate is its own setting, whatever instrument's defaults are.
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
        if blob is None and done:
            path = self.weights_file(c, done)
            if path is None or not path.exists():
                raise UsageError(f"tune: {c.label} is to continue from {done} steps, but those weights are gone "
                                 f"({path}). Hint: rerun with a new state path.")
            blob = torch.load(path, map_location=self.device, weights_only=False)
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
        self.validation_passes += 1
        self.cpu[c] = self.cpu.get(c, 0.0) + time.process_time() - cpu0
        self.steps[c] = to_steps
        self.scores.setdefault(c, []).append(value)
        blob = {"model": trainable.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
        self.blobs[c] = blob
        path = self.weights_file(c, to_steps)
        if path is not None:  # saved before the score is reported, so a reported rung has its weights
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(blob, path)

    def trained(self, c: Candidate, steps: int, say: Callable[[str], None]) -> nn.Module:
        """``c`` rebuilt with its weights at ``steps``: in memory, in the folder (a resumed search, or
        another worker's), or, when another machine trained it, trained here once from scratch."""
        blob = self.blobs.get(c) if self.steps.get(c) == steps else None
        path = self.weights_file(c, steps)
        if blob is None and path is not None and path.exists():
            blob = torch.load(path, map_location=self.device, weights_only=False)
        if blob is None:
            say(f"tune: {c.label} was trained elsewhere; training it here ({steps} steps, a fresh run of its setting)")
            self.steps[c], self.blobs[c] = 0, None
            self.advance(c, steps)
            blob = self.blobs[c]
        model, probed = self._build(c)
        trainable = probed if probed is not None else model
        trainable.to(self.device).load_state_dict(blob["model"])
        return trainable.eval()


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
