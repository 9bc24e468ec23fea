"""``tune``'s engine on Optuna: the study and its storage, the synchronous halving pruner, one worker's loop.

Each candidate is a fixed trial of one study (enqueued, its one parameter the candidate's label),
each rung's score is ``trial.report``-ed, and the halving is the study's pruner (``pruner``: the
whole rung's best 1/eta go on, output-only never pruned). Before every rung of a candidate other
than output-only, the worker asks ``tunebudget.room`` whether it fits ``max_cost``, from what every
candidate has spent (each trial carries its measured ``Spend`` as a user attribute). Each trial
also records who trained each of its rungs (``trained``: step, process id, wall clock at its end).

Example:
    >>> import optuna
    >>> from autoprobe.tuneengine import canonical, enqueue
    >>> from autoprobe.tunespace import search_space
    >>> study = optuna.create_study()
    >>> enqueue(study, search_space({"objective": ["dsn"], "alpha": [0.3], "points": [1], "schedule": ["constant"]}))
    >>> [t.user_attrs["label"] for t in canonical(study.get_trials())]
    ['output', 'dsn/alpha=0.3/M=1/auto']
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .errors import UsageError
from .tunebudget import PRIOR_STEP_RATIO, Spend, room
from .tunerecords import CandidateResult, TuneResult
from .tunespace import OUTPUT, Candidate, survivors
from .tunetrain import Runner

__all__ = ["Plan", "WorkerStats", "optuna_module", "open_storage", "pruner", "kept", "canonical", "enqueue", "reclaim",
           "claim", "wait", "work", "probe_steps", "result", "STUDY_PREFIX"]

STUDY_PREFIX = "autoprobe-tune-"


class Plan(NamedTuple):
    """What every worker of one search needs to know besides the data.

    Attributes:
        candidates: output-only first, then the others in the order they are admitted.
        rung_steps: steps at the end of each rung.
        eta: the halving factor.
        steps: one full run's steps.
        max_cost: the bound, in output-only runs (``math.inf``: none).
        rebuild: the returned model is built again in the calling process (another process trained it).
        share: the workers of one ``spawn`` own the whole study (no ``storage=`` shared with other
            calls), so each later rung's survivors are dealt afresh over them, continuing from the
            saved weights of the rung before, and output-only's rungs fill the barriers (``work``).
    """

    candidates: tuple[Candidate, ...]
    rung_steps: tuple[int, ...]
    eta: int
    steps: int
    max_cost: float
    rebuild: bool
    share: bool = False


class WorkerStats(NamedTuple):
    """What one worker did, sent back to the calling process.

    Attributes:
        pid: its process id.
        spend: candidate label -> what its work cost in this worker.
        cpu_s: the worker's CPU seconds (its start included), or 0 for the calling process.
    """

    pid: int
    spend: dict[str, Spend]
    cpu_s: float


def optuna_module() -> Any:
    """Optuna, imported on first use: only ``tune`` needs it, so it is an extra."""
    try:
        import optuna
    except ImportError as exc:
        raise UsageError('tune: runs its search on Optuna, which is not installed. '
                         'Hint: pip install "autoprobe[tune]"') from exc
    return optuna


def open_storage(optuna: Any, spec: tuple[str, str] | None) -> Any:
    """The study's storage: in memory (None), an RDB ``("url", URL)`` or a journal file ``("journal", PATH)``."""
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


def _entered(t: Any, step: int, first: int) -> bool:
    """Whether trial ``t`` counts in the rung ending at ``step``: it reported it, or it could not be
    built (an error at the first rung; a candidate the budget stopped never entered)."""
    attrs = t.user_attrs
    return step in t.intermediate_values or (step == first and "error" in attrs and not attrs.get("budget"))


def pruner(optuna: Any, rung_steps: Sequence[int], eta: int) -> Any:
    """Synchronous successive halving as an Optuna pruner.

    Optuna's ``SuccessiveHalvingPruner`` is asynchronous: it promotes a trial when it is in the top
    1/eta of those that have reached the rung *so far*, so the first trial of a rung always goes on,
    and its rungs are ``min_resource * eta**k`` steps, not ``steps / eta**k``. tune's rule is that of
    the whole rung: asked only once every candidate has reported the rung (``wait``), it keeps the
    best ``ceil(n / eta)`` of the ``n`` candidates that entered it (ties: the earlier candidate), and
    never prunes output-only.
    """

    class HalvingPruner(optuna.pruners.BasePruner):
        def prune(self, study: Any, trial: Any) -> bool:
            step = trial.last_step
            if step is None or trial.user_attrs.get("label") == OUTPUT.label or step >= rung_steps[-1]:
                return False
            return trial.number not in kept(study.get_trials(deepcopy=False), step, rung_steps, eta)

    return HalvingPruner()


def kept(trials: Iterable[Any], step: int, rung_steps: Sequence[int], eta: int) -> set[int]:
    """The trial numbers the rung ending at ``step`` keeps: output-only, and the best ``ceil(n / eta)``
    of the ``n`` other candidates that entered it (ties: the earlier candidate). A function of the
    scores reported at ``step`` only, so every worker computes it alike at any time after the rung."""
    trials = canonical(trials)
    entered = [t for t in trials if t.user_attrs["label"] != OUTPUT.label and _entered(t, step, rung_steps[0])]
    ranked = sorted((t for t in entered if step in t.intermediate_values),
                    key=lambda t: (-t.intermediate_values[step], t.user_attrs["index"]))
    best = {t.number for t in ranked[:survivors(len(entered), eta)]}
    return best | {t.number for t in trials if t.user_attrs["label"] == OUTPUT.label}


def canonical(trials: Iterable[Any]) -> list[Any]:
    """The trial of each candidate: its lowest-numbered one not failed. A failed trial is one an
    interrupt left (``reclaim`` enqueued its candidate again) or a duplicate of a race to enqueue."""
    by: dict[str, Any] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state.name != "FAIL" and "label" in t.user_attrs:
            by.setdefault(t.user_attrs["label"], t)
    return sorted(by.values(), key=lambda t: t.user_attrs["index"])


def enqueue(study: Any, candidates: Sequence[Candidate]) -> None:
    """Each candidate not in the study yet becomes a fixed trial: the set searched is exactly the draw."""
    have = {t.user_attrs["label"] for t in canonical(study.get_trials(deepcopy=False))}
    for i, c in enumerate(candidates):
        if c.label not in have:
            study.enqueue_trial({"candidate": c.label}, user_attrs={"label": c.label, "index": i})


def reclaim(optuna: Any, study: Any) -> None:
    """Trials left running by an interrupted call: failed, their candidates enqueued again carrying the
    rungs they finished (their weights are in the state folder) and what they spent, so the rerun
    continues them within the same budget."""
    for t in canonical(study.get_trials(deepcopy=False)):
        if t.state == optuna.trial.TrialState.RUNNING:
            done = sorted(t.intermediate_values.items())
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            attrs = {k: t.user_attrs[k] for k in ("label", "index", "spend", "admitted", "admitted_at", "trained")
                     if k in t.user_attrs}
            study.enqueue_trial({"candidate": t.user_attrs["label"]},
                                user_attrs={**attrs, "resumed": [[s, v] for s, v in done]})


def claim(optuna: Any, study: Any, store: Any, rank: int, size: int) -> Any:
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


def wait(study: Any, ready: Callable[[Any], bool], alone: bool, poll: float = 0.05,
         idle: Callable[[], bool] | None = None) -> None:
    """Until ``ready`` holds for every candidate's trial (others' workers report into the same study).

    Args:
        study: the study.
        ready: trial -> whether it is where the caller needs it.
        alone: no other process works on the study, so a trial not ready would never be.
        poll: seconds between looks.
        idle: work to do meanwhile instead of sleeping (True: it did some, look again at once).
    """
    while not all(ready(t) for t in canonical(study.get_trials(deepcopy=False))):
        if alone:
            late = [t.user_attrs["label"] for t in canonical(study.get_trials(deepcopy=False)) if not ready(t)]
            raise RuntimeError(f"tune: the trials of {late} are held by no worker (an internal error: "
                               "an interrupted search's trials are reclaimed when it resumes).")
        if idle is None or not idle():
            time.sleep(poll)


def _output_spend(attrs: dict[str, Any]) -> Spend:
    """What output-only has spent, as the unit is read from it: its rungs' record once it has one with
    a validation pass, else its early measure (``probe``, the first steps of its first rung)."""
    spend = Spend.from_attr(attrs.get("spend"))
    return spend if spend.passes else Spend.from_attr(attrs.get("probe"))


def _spends(study: Any) -> tuple[dict[str, Spend], dict[str, float], int]:
    """label -> spent, label -> reserved (a rung in flight), and how many candidates were admitted."""
    trials = canonical(study.get_trials(deepcopy=False))
    spends = {t.user_attrs["label"]: _output_spend(t.user_attrs) if t.user_attrs["label"] == OUTPUT.label
              else Spend.from_attr(t.user_attrs.get("spend")) for t in trials}
    reserved = {t.user_attrs["label"]: float(t.user_attrs.get("reserve", 0.0)) for t in trials}
    admitted = sum(1 for t in trials if t.user_attrs.get("admitted"))
    return spends, reserved, admitted


def probe_steps(first: int) -> int | None:
    """The steps timed by output-only's early measure of the unit in a first rung of ``first`` steps,
    after one warm-up step, or None when the rung is too short to hold both (it is then measured whole).

    An eighth of the rung: the other workers' admissions wait only that long (``work``). The warm-up
    step is trained and charged but not timed for the measure: a process's first step costs about
    twice a later one (the optimizer's state, the allocator), which extrapolated from ten steps to a
    whole run would overstate the unit by a tenth, and so admit more than ``max_cost`` allows.

    Example:
        >>> probe_steps(80), probe_steps(3), probe_steps(2)
        (10, 1, None)
    """
    k = max(1, first // 8)
    return k if 1 + k < first else None


def _take(folder: Path, number: int, step: int) -> bool:
    """Whether this process is the first to take trial ``number``'s rung ending at ``step``.

    An atomic create of a token file in the study's folder (``O_CREAT | O_EXCL``): exactly one of the
    processes sharing that folder wins. A trial an interrupt left running is failed and enqueued again
    under a new number when the search resumes (``reclaim``), so its old tokens hold nothing back.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(folder / f"take-{number}@{step}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def work(optuna: Any, study: Any, store: Any, run: Runner, plan: Plan, say: Callable[[str], None], rank: int = 0,
         size: int = 1, alone: bool = False) -> WorkerStats:
    """One worker: takes candidates from the study, trains them rung by rung within the budget, reports, prunes.

    The first rung hands out the candidates: dealt round-robin over the ``size`` workers (this is
    number ``rank``), and a worker done with its own takes any still waiting (another machine's
    call, a slow start). Before a later rung every worker waits until every candidate has reported
    the rung before (or finished), so the pruner compares the whole rung. A candidate whose next
    rung does not fit the budget is stopped (pruned, ``error`` "over budget: ..."); once one is
    stopped at the first rung no later candidate is admitted. With a finite ``max_cost`` a candidate's
    first rung waits for the unit, measured on output-only.

    When the workers of one call own the study (``plan.share``, ``size > 1``), the rungs after the
    first are jobs: a rung's survivors other than output-only are dealt round-robin again, and a
    worker done with its own takes any job still untaken, continuing from the saved weights of the
    rung before (bit-equal to continuing in memory); each job is taken once (``_take``). Output-only,
    never pruned and not ranked, waits at no barrier: a worker that has no job trains output-only's
    next rung instead of idling, when its rung before is done and no other worker holds it. And the
    unit is measured early: output-only's worker trains one step, times the next ``probe_steps`` and
    one validation pass (counted in its spend, no score), and the others' admissions wait only for
    that. Otherwise (an RDB shared with other calls) the worker that took a candidate keeps
    it, output-only included, continuing in memory.

    Args:
        optuna: the module.
        study: the search's study (every candidate enqueued).
        store: its storage.
        run: this process's ``Runner``.
        plan: the search.
        say: where progress lines go.
        rank: this worker's number among ``size``.
        size: the workers sharing the study in this call.
        alone: no other process works on the study.

    Returns:
        What this worker did (``WorkerStats``).
    """
    pruned = optuna.trial.TrialState.PRUNED
    rungs = plan.rung_steps
    by_label = {c.label: c for c in plan.candidates}
    objectives = {c.label: c.objective for c in plan.candidates}
    labels = list(by_label)
    shared = plan.share and size > 1
    if shared and run.weights is None:
        raise RuntimeError("tune: workers sharing a study need a folder for the rungs' weights (an internal error).")
    probe = probe_steps(rungs[0]) if shared and math.isfinite(plan.max_cost) else None
    mine: list[tuple[Any, Candidate]] = []
    base: dict[str, Spend] = {}  # what each candidate had spent before this worker took it

    def record(trial: Any, c: Candidate) -> None:
        trial.set_user_attr("spend", (base[c.label] + run.spend.get(c, Spend())).to_attr())

    def stop(trial: Any, c: Candidate, head: str, why: str, budget: bool) -> bool:
        trial.set_user_attr("error", why)
        if budget:
            trial.set_user_attr("budget", True)
        record(trial, c)
        study.tell(trial, state=pruned)
        run.drop(c)
        say(f"{head}: {'stopped' if budget else 'skipped'} ({why})")
        return False

    def train(trial: Any, c: Candidate, r: int) -> bool:
        head = f"tune: rung {r + 1}/{len(rungs)} ({rungs[r]} steps) {c.label}"
        if c != OUTPUT and r == 0 and study.user_attrs.get("closed"):
            return stop(trial, c, head, "over budget: an earlier candidate's first rung did not fit max_cost", True)
        built = run.build(c)
        if not built:
            return stop(trial, c, head, run.errors[c], False)
        if c != OUTPUT:
            if r == 0 and math.isfinite(plan.max_cost):
                # The unit is measured on output-only (its first steps, or its first rung): another
                # worker may be measuring it. No bound, no unit to wait for.
                wait(study, lambda t: t.user_attrs["label"] != OUTPUT.label or _output_spend(t.user_attrs).passes > 0,
                     alone)
            record(trial, c)
            spends, reserved, admitted = _spends(study)
            why = room(spends, reserved, c.label, objectives, rung=r, rung_steps=rungs, eta=plan.eta,
                       steps=plan.steps, max_cost=plan.max_cost, admitted=admitted + (r == 0), rebuild=plan.rebuild)
            if why is not None:
                if r == 0:
                    study.set_user_attr("closed", True)
                return stop(trial, c, head, why, True)
            if r == 0:
                trial.set_user_attr("admitted", True)
                trial.set_user_attr("admitted_at", time.time())
            if math.isfinite(plan.max_cost):  # what the rung in flight will spend, for the others' checks
                out, own = spends[OUTPUT.label], spends[c.label]
                rate = own.train_s / own.steps if own.steps else PRIOR_STEP_RATIO * out.train_s / out.steps
                trial.set_user_attr("reserve", (rungs[r] - own.steps) * rate)
        elif r == 0 and probe is not None and run.steps.get(c, 0) == 0:
            measured = run.measure(c, 1, 1 + probe)
            built = run.spend[c]
            trial.set_user_attr("probe", (base[c.label] + Spend(builds=built.builds, build_s=built.build_s)
                                          + measured).to_attr())
        run.advance(c, rungs[r])
        end = time.time()  # before its spend is recorded: a worker waiting for that sees a later clock
        record(trial, c)
        trial.set_user_attr("reserve", 0.0)
        # Who trained each rung and when it ended (the wall clock of this machine).
        trial.set_user_attr("trained", trial.user_attrs.get("trained", []) + [[rungs[r], os.getpid(), end]])
        trial.report(run.scores[c][-1], rungs[r])
        say(f"{head}: {run.scores[c][-1]:.4f}")
        return True

    def take(t: Any, r: int) -> Any:
        """Trial ``t``'s rung ``r`` for this worker: as it is now that no other can change it (None: taken)."""
        if _take(run.weights, t.number, rungs[r]):
            return store.get_trial(t._trial_id)
        run.drop(by_label[t.user_attrs["label"]])  # another worker trains it on: a copy here would be stale
        return None

    def here(t: Any) -> Any:
        """The taken trial ``t``, its candidate continuing here from where another process left it."""
        c = by_label[t.user_attrs["label"]]
        done = sorted(t.intermediate_values.items())
        if run.steps.get(c) != done[-1][0] or not run.holds(c):
            run.drop(c)
            run.resume(c, done)
        # What it spent, less what this worker's own record of it already holds.
        base[c.label] = Spend.from_attr(t.user_attrs.get("spend")) - run.spend.get(c, Spend())
        return optuna.trial.Trial(study, t._trial_id)

    def fill() -> bool:
        """Output-only's next rung, trained here when it is free; whether it was."""
        t = next(t for t in canonical(study.get_trials(deepcopy=False)) if t.user_attrs["label"] == OUTPUT.label)
        if t.state.is_finished() or rungs[0] not in t.intermediate_values:
            return False  # its first rung is its claimer's
        r = rungs.index(max(t.intermediate_values)) + 1
        if r == len(rungs) or (t := take(t, r)) is None:
            return False
        trial = here(t)
        train(trial, OUTPUT, r)
        if r == len(rungs) - 1:
            study.tell(trial, run.scores[OUTPUT][-1])
        return True

    while (trial := claim(optuna, study, store, rank, size)) is not None:
        attrs = trial.user_attrs
        c = by_label[attrs["label"]]
        canon = {t.user_attrs["label"]: t for t in canonical(study.get_trials(deepcopy=False))}
        if canon[c.label].number != trial.number:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # a duplicate of a race to enqueue
            continue
        base[c.label] = Spend.from_attr(attrs.get("spend"))
        trial.suggest_categorical("candidate", labels)  # the enqueued label: records the parameter
        resumed = [(int(s), float(v)) for s, v in attrs.get("resumed", [])]
        for s, v in resumed:
            trial.report(v, s)
        if resumed:
            run.resume(c, resumed)
            mine.append((trial, c))
        elif train(trial, c, 0):
            mine.append((trial, c))
        if shared and c == OUTPUT and len(rungs) > 1 and run.steps.get(c) == rungs[-1]:
            study.tell(trial, run.scores[c][-1])  # resumed whole: no rung left for a filler to end it
    if shared and len(rungs) > 1:
        _later_rungs(optuna, study, run, plan, by_label, train, take, here, fill, rank, size)
        return WorkerStats(os.getpid(), {c.label: s for c, s in run.spend.items()}, 0.0)
    for r in range(1, len(rungs)):
        wait(study, lambda t: t.state.is_finished() or rungs[r - 1] in t.intermediate_values, alone)
        alive = []
        for trial, c in mine:
            if run.steps[c] < rungs[r]:
                if trial.should_prune():
                    study.tell(trial, state=pruned)
                    run.drop(c)
                    continue
                if not train(trial, c, r):
                    continue
            alive.append((trial, c))
        mine = alive
    for trial, c in mine:
        study.tell(trial, run.scores[c][-1])
    return WorkerStats(os.getpid(), {c.label: s for c, s in run.spend.items()}, 0.0)


def _later_rungs(optuna: Any, study: Any, run: Runner, plan: Plan, by_label: dict[str, Candidate],
                 train: Callable[[Any, Candidate, int], bool], take: Callable[[Any, int], Any],
                 here: Callable[[Any], Any], fill: Callable[[], bool], rank: int, size: int) -> None:
    """The rungs after the first, when the workers of one call own the study (``work``'s jobs).

    Every worker computes the same rung: the pruner's decision is a function of the rung's reports,
    so the survivors other than output-only are dealt alike, round-robin in search order, and each
    pruned one is told by the worker it is dealt to. A worker trains its own jobs, then any other
    still untaken (``take``: each once; ``here``: continued from its saved weights); then, until the
    next rung's barrier, output-only's next rungs (``fill``).
    """
    rungs = plan.rung_steps
    for r in range(1, len(rungs)):
        step = rungs[r - 1]
        wait(study, lambda t: t.user_attrs["label"] == OUTPUT.label or t.state.is_finished()
             or step in t.intermediate_values, False, idle=fill)
        # The rung's trials, a set no worker's later report changes: those that reported ``step``.
        trials = canonical(study.get_trials(deepcopy=False))
        rung = [t for t in trials if t.user_attrs["label"] != OUTPUT.label and step in t.intermediate_values]
        keep = kept(trials, step, rungs, plan.eta)
        for j, t in enumerate(t for t in rung if t.number not in keep):
            run.drop(by_label[t.user_attrs["label"]])
            if j % size == rank and not t.state.is_finished():
                study.tell(t.number, state=optuna.trial.TrialState.PRUNED)
        jobs = [(j, t) for j, t in enumerate(t for t in rung if t.number in keep)]
        for _, t in sorted(jobs, key=lambda job: (job[0] % size != rank, job[0])):
            if t.state.is_finished() or (t := take(t, r)) is None:
                continue
            if rungs[r] in t.intermediate_values:  # resumed past this rung (its taker alone sees to it)
                if r == len(rungs) - 1:
                    study.tell(t.number, t.intermediate_values[rungs[r]])
                continue
            c = by_label[t.user_attrs["label"]]
            if train(trial := here(t), c, r) and r == len(rungs) - 1:
                study.tell(trial, run.scores[c][-1])
    # Output-only's last rungs may remain: trained by whichever worker is free, one at a time.
    wait(study, lambda t: t.user_attrs["label"] != OUTPUT.label or t.state.is_finished(), False, idle=fill)


def result(study: Any, run: Runner, plan: Plan, dropped: int, seed: int, say: Callable[[str], None]) -> TuneResult:
    """The choice (strictly higher than output-only at the full budget, else output-only) and its model."""
    trials = {t.user_attrs["label"]: t for t in canonical(study.get_trials(deepcopy=False))}
    table = []
    for c in plan.candidates:
        t = trials[c.label]
        done = sorted(t.intermediate_values.items())
        table.append(CandidateResult(c, done[-1][0] if done else 0, tuple(v for _, v in done),
                                     done[-1][0] if done else 0, t.user_attrs.get("error")))
    output = table[0]
    finalists = [row for row in table[1:] if row.steps == plan.rung_steps[-1] and row.error is None]
    best = max(finalists, key=lambda row: (row.score, -plan.candidates.index(row.candidate)), default=output)
    # Ties go to output-only, the simpler setting: another is chosen only if strictly higher.
    chosen = best if best.score > output.score else output
    cost_steps = sum(row.cost_steps for row in table)
    stopped = sum(1 for row in table if row.error and row.error.startswith("over budget"))
    say(f"tune: chose {chosen.candidate.label} (val {chosen.score:.4f}; output-only {output.score:.4f}); "
        f"{cost_steps} steps = {cost_steps / plan.steps:.2f} x the budget"
        + (f"; {stopped} candidate(s) stopped by max_cost" if stopped else ""))
    # Built first: rebuilding the choice also places its points, which instrument_kwargs reads.
    model = run.trained(chosen.candidate, chosen.steps, say)
    return TuneResult(
        chosen=chosen.candidate,
        score=chosen.score,
        output_only_score=output.score,
        table=tuple(table),
        instrument_kwargs=None if chosen.candidate.objective == "output" else run.instrument_kwargs(chosen.candidate),
        budget_steps=plan.steps,
        cost_steps=cost_steps,
        dropped=dropped,
        model=model,
        seed=seed,
    )
