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

This module is ``tune`` itself and the public names; each job has its module:

* ``tunespace``: the search keys, ``Candidate`` (every ``instrument`` option spelled out), the
  rungs and the draw of candidates whose steps fit the budget;
* ``tunebudget``: the cost accounting, in units of one output-only run, as measured;
* ``tunetrain``: building a candidate once, training it rung by rung, scoring it, timing each;
* ``tuneengine``: the Optuna study, its storage, the synchronous halving pruner, a worker's loop;
* ``tuneworkers``: ``workers=N`` processes on this machine;
* ``tunehp``: ``hp_space`` and ``candidate`` for searches run by others (Hugging Face, Ray Tune),
  with ``train_candidate`` (``tunetrain``) the objective they run per trial;
* ``tunerecords``: the records handed back (``CandidateResult``, ``TuneCost``, ``TuneResult``).

Rules defined once here:

* cost: the search's training steps, validation passes and builds (``instrument`` calls) add up to
  at most ``max_cost`` output-only runs (default 3.5), measured in CPU seconds in the same search
  (``tunebudget``); a candidate whose next rung does not fit is stopped, and the table says so.
  Before any measuring, a space with more candidates than their steps alone allow is cut to
  output-only and a seeded draw of as many others as fit, dealt round-robin over the objectives
  so each objective is searched (the result says how many were dropped);
* continuation, pairing: ``tunetrain``; the caller's global RNG state is restored afterwards;
* engine: Optuna (the ``tune`` extra), ``tuneengine``;
* storage and resume: in memory by default; with ``state=PATH`` the study is an Optuna journal file
  and each rung's weights are saved beside it, so a rerun with the same arguments skips what is
  done; with ``storage=URL`` (an RDB) several calls, on one machine or many, share one study;
* workers: ``workers=N`` spawns N processes on this machine sharing the study; each candidate's
  training does not depend on which process runs it, so the choice is the one of a single worker
  (when the budget stops none: its measurements differ from process to process).

Example:
    >>> import math
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
    >>> # A toy: instrument's trace costs more than 9 steps here, so no bound (max_cost=math.inf).
    >>> result = tune(factory, train, val, task="classification", steps=9, progress=False, max_cost=math.inf,
    ...               search={"objective": ["output", "dsn"], "alpha": [0.3], "points": [None],
    ...                       "schedule": ["constant"]})
    >>> [c.candidate.label for c in result.table]
    ['output', 'dsn/alpha=0.3/M=auto/auto']
    >>> result.chosen.objective in ("output", "dsn"), result.cost.runs > 1
    (True, True)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UsageError
from .tunebudget import Spend, unit_s
from .tuneengine import (STUDY_PREFIX, Plan, WorkerStats, canonical, enqueue, open_storage, optuna_module, pruner,
                         reclaim, result, wait, work)
from .tunehp import candidate, hp_space
from .tunerecords import CandidateResult, TrainedCandidate, TuneCost, TuneResult
from .tunespace import (DEFAULT_SEARCH, OUTPUT, SEARCH_KEYS, Candidate, TuneTask, check_options, draw, rungs,
                        search_space)
from .tunetrain import Batch, Runner, RunnerSetup, TrainOptions, reiterable, train_candidate
from .tuneworkers import check_picklable, spawn

__all__ = ["Candidate", "CandidateResult", "TrainedCandidate", "TrainOptions", "TuneCost", "TuneResult",
           "SEARCH_KEYS", "DEFAULT_SEARCH", "tune", "hp_space", "candidate", "train_candidate"]

# The fingerprint's format: a study of another format is another search.
_FORMAT = 2


def tune(
    model: nn.Module | Callable[[], nn.Module],
    train: Iterable[Batch],
    val: Iterable[Batch],
    *,
    task: TuneTask,
    steps: int,
    search: Mapping[str, Sequence[Any]] | None = None,
    max_cost: float = 3.5,
    eta: int = 3,
    seed: int = 0,
    options: TrainOptions | None = None,
    state: str | Path | None = None,
    storage: str | None = None,
    workers: int = 1,
    progress: bool | Callable[[str], None] = True,
    **deprecated: Any,
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
        val: re-iterable of ``(inputs, targets)`` batches, scored by ``options.score``.
        task: ``"classification"`` (targets (B,)) or ``"dense"`` (targets (B, *S)).
        steps: training steps of one full run, the budget the survivors train.
        search: key -> values to search, keys from ``SEARCH_KEYS``; missing keys take
            ``DEFAULT_SEARCH``'s values. ``"output"`` is always added to ``objective``.
        max_cost: bound on what the search does (every candidate's training steps, validation passes
            and builds, ``instrument`` included), in output-only runs as measured in this search
            (``TuneCost``); >= 2 (output-only and one other candidate train the full budget), or
            ``math.inf`` for no bound. A candidate whose next rung would not fit is stopped.
        eta: successive halving's factor: each rung keeps 1/eta of the candidates and trains eta
            times longer.
        seed: initial weights, the draw of candidates when the space exceeds the cost bound.
        options: how each candidate trains and is scored (``TrainOptions``: the learning rate, an
            optimizer or learning-rate schedule of your own, the score, the rule pack, the device,
            the ignored target value); default ``TrainOptions()``.
        state: a file holding the study (an Optuna journal; each rung's weights in ``<state>.d/``);
            a rerun with the same arguments resumes, skipping finished rungs. One search per file.
        storage: an Optuna RDB URL (``"sqlite:///tune.db"``, ``"postgresql://..."``) holding the
            study, so that several calls, on one machine or many, share one search: each call
            trains the candidates nobody else has taken. Not with ``state``.
        workers: worker processes on this machine sharing the study (spawned; they share a journal
            in a temporary folder unless ``state`` or ``storage`` is given). With ``workers > 1``
            ``model`` (a factory), ``train``, ``val`` and the ``options``' ``score``, ``optimizer``
            and ``lr_factor`` must be picklable (defined at module level, no lambdas), and a calling
            script needs the ``if __name__ == "__main__":`` guard (spawned workers import it); the choice is the same
            as with one worker. Output-only's rungs fill the workers' waits at the rungs' barriers,
            and with a finite ``max_cost`` the unit is measured on output-only's first steps and one
            more validation pass (``score`` is called for it; counted in the cost).
        progress: print one line per finished rung to stderr (True), nothing (False), or call this
            (in this process, also with ``workers > 1``).
        **deprecated: ``lr``, ``optimizer``, ``lr_factor``, ``score``, ``rules``, ``device``,
            ``ignore_index``, the keywords before ``TrainOptions``: still accepted, each with a
            ``DeprecationWarning``.

    Returns:
        A ``TuneResult``.

    Raises:
        UsageError: optuna missing, an empty validation set, a one-shot iterator, a budget too small
            for one candidate, an unknown search key or value, a state file of another search, an
            unpicklable argument with ``workers > 1``, or a bad option.

    Example:
        See the module docstring.
    """
    train_options = TrainOptions.of(options, deprecated, "tune")
    optuna = optuna_module()
    space = search_space(search)
    check_options(task, steps, max_cost, eta)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"tune: workers={workers!r} must be a positive integer, the processes that train "
                         "candidates. Hint: workers=1 (this process) or workers=2.")
    if state is not None and storage is not None:
        raise UsageError("tune: pass state (a file for one search that resumes) or storage (an RDB URL shared by "
                         "several calls), not both. Hint: storage='sqlite:///tune.db' also resumes.")
    if storage is not None and not isinstance(storage, str):
        raise UsageError(f"tune: storage={storage!r} must be an Optuna RDB URL string. "
                         "Hint: storage='sqlite:///tune.db'.")
    train_batches = reiterable("train", train)
    val_batches = reiterable("val", val)
    if next(iter(val_batches), None) is None:
        raise UsageError("tune: the validation set is empty, so no candidate can be scored. "
                         "Hint: pass a list or DataLoader of (inputs, targets) batches held out from training.")
    if next(iter(train_batches), None) is None:
        raise UsageError("tune: the training set is empty. "
                         "Hint: pass a list or DataLoader of (inputs, targets) batches.")
    if workers > 1:
        check_picklable(workers, model=model, train=train_batches, val=val_batches, score=train_options.score,
                        optimizer=train_options.optimizer, lr_factor=train_options.lr_factor)
    rung_steps = rungs(steps, eta)
    candidates, dropped = draw(space, rung_steps, eta, steps, max_cost, seed)
    plan = Plan(tuple(candidates), tuple(rung_steps), eta, steps, float(max_cost),
                rebuild=workers > 1 or storage is not None, share=storage is None)
    say = _progress(progress)
    fingerprint = json.dumps([_FORMAT, [c.label for c in candidates], rung_steps, seed, train_options.lr, task,
                              float(max_cost)])
    setup = RunnerSetup(task=task, options=train_options, seed=seed, full_steps=steps)
    dev = torch.device(train_options.device)
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
        store = open_storage(optuna, spec)
        name = STUDY_PREFIX + hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        if state is not None:
            others = [n for n in optuna.get_all_study_names(store) if n != name]
            if others:
                raise UsageError(f"tune: state file {state} was written by a search with other arguments. "
                                 "Hint: pass a new state path, or delete this one to start over.")
        study = optuna.create_study(study_name=name, storage=store, direction="maximize", load_if_exists=True,
                                    sampler=optuna.samplers.RandomSampler(seed=seed),
                                    pruner=pruner(optuna, rung_steps, eta))
        study.set_user_attr("fingerprint", fingerprint)
        if state is not None:
            reclaim(optuna, study)  # one search per state file: a rerun takes over the rungs an interrupt left
        enqueue(study, candidates)
        run = setup.runner(model, train_batches, val_batches, weights)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            if workers == 1:
                stats = [work(optuna, study, store, run, plan, say, alone=storage is None)]
            else:
                payload = dict(model=model, train=train_batches, val=val_batches, weights=weights, setup=setup,
                               plan=plan, threads=torch.get_num_threads())
                stats = spawn(workers, payload, spec, name, say)
            wait(study, lambda t: t.state.is_finished(), alone=storage is None)  # other machines' (storage=)
            outcome = result(study, run, plan, dropped, seed, say)
            trials = canonical(study.get_trials(deepcopy=False))
            output = next(t for t in trials if t.user_attrs["label"] == OUTPUT.label)
            unit = unit_s(Spend.from_attr(output.user_attrs.get("spend")), steps)
    finally:
        optuna.logging.set_verbosity(verbosity)
        if scratch is not None:
            scratch.cleanup()
    return replace(outcome, cost=_cost(stats, run, outcome, unit, time.process_time() - cpu0,
                                       time.perf_counter() - wall0))


def _cost(stats: Sequence[WorkerStats], run: Runner, outcome: TuneResult, unit: float | None, cpu_here: float,
          wall: float) -> TuneCost:
    """The search's measured cost: every process's spends (this one's last, the returned model's build
    included), every worker's CPU on top of this process's."""
    here = os.getpid()
    spend = Spend()
    for s in stats:
        if s.pid != here:
            spend = sum(s.spend.values(), spend)
    spend = sum(run.spend.values(), spend)  # this process: its worker (workers=1) and the returned model
    cpu = cpu_here + sum(s.cpu_s for s in stats if s.pid != here)
    work_s = spend.total_s
    return TuneCost(steps=int(spend.steps), validation_passes=int(spend.passes), builds=int(spend.builds),
                    train_s=round(spend.train_s, 4), validation_s=round(spend.validation_s, 4),
                    build_s=round(spend.build_s, 4), cpu_s=round(cpu, 4), wall_s=round(wall, 4),
                    unit_s=round(unit, 4) if unit else math.nan,
                    runs=round(work_s / unit, 3) if unit else math.nan)


def _progress(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: None
