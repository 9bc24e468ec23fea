"""autoprobe.tune on Optuna: the candidates are fixed trials, the rungs are reports, the halving is a
pruner that never prunes output-only, and a setting is chosen only if strictly higher; the study lives
in memory, in a journal (``state=``) or an RDB (``storage=``), and two worker processes choose as one."""

from __future__ import annotations

import math
import os
import sys
import time

import optuna
import pytest
import torch
from torch import nn

import autoprobe
from autoprobe import TrainOptions, UsageError, tune
from autoprobe.tuning import candidate, hp_space


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 8, 8, generator=gen)
    y = (x[:, 0, :4, :4].mean((1, 2)) > 0).long() * 2 + (x[:, 0, 4:, 4:].mean((1, 2)) > 0).long()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 384, 32)], [(x[384:], y[384:])]


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))


# Three candidates: output-only, one DSN, one iMacHSR setting; steps=18 gives rungs of 2, 6 and 18 steps.
_TWO = {"objective": ["dsn", "imachsr"], "alpha": [0.3], "lam": [0.0], "points": [1], "position": ["auto"],
        "schedule": ["constant"]}


class _Scripted:
    """A score read off a script, call by call: in one process tune scores the candidates in their
    order, rung by rung (output, dsn, imachsr; then output and the survivor; twice)."""

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, model, val):
        return self.values.pop(0)


def _trials(state):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(state)))
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    return {t.user_attrs["label"]: t for t in trials}


@pytest.mark.parametrize("last", [0.2, 0.2 + 1e-6])
def test_output_only_is_a_trial_never_pruned_and_another_wins_only_if_strictly_higher(tmp_path, last):
    train, val = _data()
    # Output-only scores worst at the first rung (kept anyway); iMacHSR beats DSN there and goes on;
    # at the full budget iMacHSR ties output-only (output-only chosen) or beats it by 1e-6 (chosen).
    script = _Scripted([0.0, 0.5, 0.6, 0.1, 0.7, 0.2, last])
    state = tmp_path / "study.journal"
    result = tune(_net, train, val, task="classification", max_cost=math.inf, steps=18, search=_TWO,
                  options=TrainOptions(score=script), state=state, progress=False)
    trials = _trials(state)
    assert trials["output"].state == optuna.trial.TrialState.COMPLETE
    assert trials["output"].intermediate_values == {2: 0.0, 6: 0.1, 18: 0.2}
    dsn, imachsr = (trials[row.candidate.label] for row in result.table[1:])
    assert dsn.state == optuna.trial.TrialState.PRUNED and dsn.last_step == 2
    assert imachsr.state == optuna.trial.TrialState.COMPLETE and imachsr.last_step == 18
    assert [row.scores for row in result.table] == [(0.0, 0.1, 0.2), (0.5,), (0.6, 0.7, last)]
    if last > 0.2:
        assert result.chosen.objective == "imachsr" and result.score == last
    else:
        assert result.chosen.objective == "output" and result.instrument_kwargs is None
    assert result.output_only_score == 0.2


class _Accuracy:
    """Accuracy, noting the process that scored (picklable, so worker processes can run it); the score
    ``slow_at`` is returned a second late, so the worker holding that candidate reports its rung last."""

    def __init__(self, log, slow_at=None):
        self.log, self.slow_at = log, slow_at

    def __call__(self, model, val):
        value = autoprobe.tunetrain.accuracy(model, val)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        if value == self.slow_at:
            time.sleep(1.0)
        return value


def test_two_worker_processes_choose_as_one_train_each_rung_once_and_prune_on_the_whole_rung(tmp_path):
    train, val = _data()
    log = tmp_path / "pids"
    options = dict(task="classification", max_cost=math.inf, steps=18, search=_TWO, seed=3)
    one = tune(_net, train, val, progress=False, options=TrainOptions(lr=3e-3, score=_Accuracy(log)), **options)
    assert set(log.read_text().split()) == {str(os.getpid())}
    log.unlink()
    # The first rung's winner (DSN, dealt to the second worker) reports late: a worker that pruned
    # before the whole rung had reported would keep the loser (iMacHSR) on a rung of one.
    output, winner, loser = one.table
    assert len(loser.scores) == 1 and len(winner.scores) == 3
    assert winner.scores[0] not in (output.scores[0], loser.scores[0])
    lines: list[str] = []
    state = tmp_path / "two.journal"
    two = tune(_net, train, val, progress=lines.append, workers=2, state=state,
               options=TrainOptions(lr=3e-3, score=_Accuracy(log, slow_at=winner.scores[0])), **options)
    pids = log.read_text().split()
    assert len(set(pids)) == 2 and str(os.getpid()) not in pids  # two worker processes trained and scored
    assert two == one  # the same table (scores bit-equal), the same choice: the pruner saw whole rungs
    # No rung trained twice: one scoring per rung, one progress line per rung, one trial per candidate.
    rung_lines = [line.split(":")[1] for line in lines if "rung" in line]
    assert len(pids) == len(rung_lines) == len(set(rung_lines)) == sum(len(row.scores) for row in one.table)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(state)))
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    assert sorted(t.user_attrs["label"] for t in trials) == sorted(row.candidate.label for row in one.table)
    assert all(t.state.is_finished() and t.state.name != "FAIL" for t in trials)
    assert two.cost.validation_passes == one.cost.validation_passes
    got, want = two.model.state_dict(), one.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_output_only_is_trained_by_a_worker_a_barrier_would_idle(tmp_path):
    """The first rung's winner (DSN, the second worker's) scores a second late: the first worker, done
    with its share of the rung (output-only, iMacHSR), trains output-only's later rungs meanwhile
    instead of waiting at the barrier, and the table is still one worker's, bit-equal."""
    train, val = _data()
    options = dict(task="classification", max_cost=math.inf, steps=18, search=_TWO, seed=3)
    one = tune(_net, train, val, progress=False, options=TrainOptions(lr=3e-3, score=_Accuracy(tmp_path / "one")),
               **options)
    output, winner, loser = one.table
    assert winner.scores[0] not in output.scores + loser.scores  # only the winner's first rung is slow
    state = tmp_path / "two.journal"
    two = tune(_net, train, val, progress=False, workers=2, state=state,
               options=TrainOptions(lr=3e-3, score=_Accuracy(tmp_path / "two", slow_at=winner.scores[0])), **options)
    assert two == one
    trials = _trials(state)
    # user attribute "trained": [step, pid, wall clock at the rung's end] per rung, whoever trained it
    out = {step: (pid, end) for step, pid, end in trials["output"].user_attrs["trained"]}
    (late,) = [(pid, end) for step, pid, end in trials[winner.candidate.label].user_attrs["trained"] if step == 2]
    assert sorted(out) == [2, 6, 18]
    assert out[6][1] < late[1] and out[18][1] < late[1]  # both before the barrier they would have waited at
    assert out[6][0] != late[0]  # by the worker that was not busy


@pytest.mark.parametrize("max_cost", [1e9, math.inf])
def test_a_first_rung_waits_for_output_only_only_as_long_as_the_unit_needs(tmp_path, max_cost):
    """With a finite max_cost the unit is measured on output-only's first steps and one validation pass
    (counted), so another worker admits its candidate before output-only's first rung ends; with no
    bound it waits for nothing. Output-only's rung continues bit-equal: the table is one worker's."""
    train, val = _data()
    # steps=27: a first rung of 3 steps, one to warm up and one timed for the measure.
    options = dict(task="classification", max_cost=max_cost, steps=27, search=_TWO, seed=3)
    one = tune(_net, train, val, progress=False, options=TrainOptions(lr=3e-3), **options)
    state = tmp_path / "two.journal"
    # The first worker's first scoring after the measure's (its first with no bound) is output-only's
    # first rung: a second late, so that rung ends a second after the unit could be known.
    probe = autoprobe.tuneengine.probe_steps(3) if math.isfinite(max_cost) else None
    two = tune(_net, train, val, progress=False, workers=2, state=state,
               options=TrainOptions(lr=3e-3, score=_SlowCall(1 + (probe is not None))), **options)
    trials = _trials(state)
    first_rung_end = next(end for step, _, end in trials["output"].user_attrs["trained"] if step == 3)
    admitted = [t.user_attrs["admitted_at"] for label, t in trials.items() if label != "output"]
    assert min(admitted) < first_rung_end
    assert probe is None or probe == 1 and trials["output"].user_attrs["probe"]["steps"] == probe
    assert two == one and two.cost.validation_passes == one.cost.validation_passes + (probe is not None)


def test_the_early_measure_leaves_output_onlys_first_rung_bit_equal():
    """Trained one step, then measured (steps and a validation pass whose score is dropped, which here
    also draws random numbers), then to the rung's end: the weights and the score of the rung trained
    in one go, dropout included."""
    from autoprobe import tunetrain
    from autoprobe.tunespace import OUTPUT

    train, val = _data()

    def runner(score):
        return tunetrain.Runner(_dropout_net, train, val, task="classification",
                                options=TrainOptions(lr=3e-3, score=score), seed=0, full_steps=27, weights=None)

    def drawing(model, batches):  # a score that uses the global RNG
        torch.rand(3)
        return tunetrain.accuracy(model, batches)

    whole, measured = runner(drawing), runner(drawing)
    whole.advance(OUTPUT, 9)
    part = measured.measure(OUTPUT, 1, 3)
    measured.advance(OUTPUT, 9)
    assert (part.steps, part.passes) == (2, 1) and measured.spend[OUTPUT].steps == 9
    assert measured.scores[OUTPUT] == whole.scores[OUTPUT]
    got, want = measured._live[OUTPUT].model.state_dict(), whole._live[OUTPUT].model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def _dropout_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(256, 4))


class _SlowCall:
    """Accuracy, its ``n``-th call in each process a second late (picklable: each worker counts its own)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, model, val):
        self.calls += 1
        if self.calls == self.n:
            time.sleep(1.0)
        return autoprobe.tunetrain.accuracy(model, val)


def test_workers_refuse_what_cannot_be_pickled():
    train, val = _data()
    with pytest.raises(UsageError, match="so model must be picklable.*Hint: define it at module level"):
        tune(lambda: _net(), train, val, task="classification", steps=6, search=_TWO, workers=2, progress=False)
    with pytest.raises(UsageError, match="workers=0 must be a positive integer.*Hint"):
        tune(_net, train, val, task="classification", steps=6, search=_TWO, workers=0, progress=False)


def test_an_rdb_storage_shares_the_study_so_a_second_call_trains_nothing(tmp_path):
    train, val = _data()
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    options = dict(task="classification", max_cost=math.inf, steps=18, options=TrainOptions(lr=3e-3), search=_TWO,
                   progress=False)
    first = tune(_net, train, val, storage=url, **options)
    assert first == tune(_net, train, val, **options)  # the same search as in memory
    built = []

    def counting():
        built.append(1)
        return _net()

    again = tune(counting, train, val, storage=url, **options)
    # Only the choice is rebuilt, once: its weights were in the first call's scratch folder, so it
    # is trained here again as a fresh run of its setting (one pass at its end), to the same weights.
    assert again == first and again.cost.validation_passes == 1 and again.cost.builds == 1
    assert again.cost.steps == 18 and len(built) == 1
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in first.model.state_dict().items())


def test_a_state_file_of_the_older_format_or_another_search_is_refused(tmp_path):
    train, val = _data()
    old = tmp_path / "old.jsonl"
    old.write_text('{"fingerprint": "x", "candidate": "output", "steps": 2, "scores": [0.5]}\n')
    with pytest.raises(UsageError, match="format of an older autoprobe.*Hint"):
        tune(_net, train, val, task="classification", steps=6, search=_TWO, state=old, progress=False)
    state = tmp_path / "s.journal"
    tune(_net, train, val, task="classification", max_cost=math.inf, steps=6, search=_TWO, state=state, progress=False)
    with pytest.raises(UsageError, match="written by a search with other arguments.*Hint"):
        tune(_net, train, val, task="classification", max_cost=math.inf, steps=6, search=_TWO, state=state, seed=1,
             progress=False)
    with pytest.raises(UsageError, match="not both.*Hint"):
        tune(_net, train, val, task="classification", steps=6, state=state, storage="sqlite://", progress=False)


def test_without_optuna_tune_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    train, val = _data()
    with pytest.raises(UsageError, match=r'not installed\. Hint: pip install "autoprobe\[tune\]"'):
        tune(_net, train, val, task="classification", max_cost=math.inf, steps=6, search=_TWO, progress=False)


def test_hp_space_samples_every_key_and_candidate_builds_the_setting_tune_searches():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        params = hp_space(trial, search=_TWO)
        assert set(params) == set(autoprobe.tuning.SEARCH_KEYS) and trial.params == params
        seen.add(candidate(params))
        study.tell(trial, 0.0)
    assert seen == set(autoprobe.tunespace.search_space(_TWO))  # output-only, the DSN and the iMacHSR setting
    with pytest.raises(UsageError, match="unknown search key.*Hint"):
        candidate({"weight": 1})


def test_a_worker_prunes_only_once_the_whole_rung_has_reported():
    """Worker 0 of 2 (a thread here) holds output-only and iMacHSR; this test is worker 1, holding DSN,
    and reports DSN's first rung late and higher: iMacHSR must be pruned, not kept on a partial rung."""
    import threading
    import time

    from autoprobe import tuneengine, tunespace, tunetrain

    train, val = _data()
    rungs, candidates = [2, 6, 18], tunespace.search_space(_TWO)
    store = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=store, direction="maximize", pruner=tuneengine.pruner(optuna, rungs, 3))
    tuneengine.enqueue(study, candidates)
    mine = tuneengine.claim(optuna, study, store, 1, 2)
    assert mine.user_attrs["label"] == candidates[1].label
    mine.suggest_categorical("candidate", [c.label for c in candidates])
    run = tunetrain.Runner(_net, train, val, task="classification",
                           options=TrainOptions(score=lambda model, batches: 0.5), seed=0, full_steps=18, weights=None)
    plan = tuneengine.Plan(tuple(candidates), tuple(rungs), 3, 18, math.inf, False)
    worker = threading.Thread(target=tuneengine.work, args=(optuna, study, store, run, plan, lambda s: None, 0, 2))
    worker.start()
    other = lambda: {t.user_attrs["label"]: t for t in study.get_trials()}[candidates[2].label]  # noqa: E731
    while 2 not in other().intermediate_values:
        time.sleep(0.01)
    time.sleep(0.3)  # worker 0 has reported its first rung and waits for this one
    for step in rungs:
        mine.report(0.9, step)
        while not (other().state.is_finished() or step in other().intermediate_values):
            time.sleep(0.01)
        assert not mine.should_prune()
    study.tell(mine, 0.9)
    worker.join(timeout=60)
    assert other().state == optuna.trial.TrialState.PRUNED and other().last_step == 2


def test_a_search_interrupted_in_one_process_resumes_with_two_workers(tmp_path):
    train, val = _data()
    options = dict(task="classification", max_cost=math.inf, steps=18, options=TrainOptions(lr=3e-3), search=_TWO,
                   seed=2)
    whole = tune(_net, train, val, progress=False, **options)

    class Stop(Exception):
        pass

    def stop_after_four(line, seen=[]):  # noqa: B006 (a counter across calls)
        seen.append(line)
        if len(seen) == 4:  # the first rung of all three and output-only's second
            raise Stop

    state = tmp_path / "tune.jsonl"
    with pytest.raises(Stop):
        tune(_net, train, val, progress=stop_after_four, state=state, **options)
    lines: list[str] = []
    resumed = tune(_net, train, val, progress=lines.append, state=state, workers=2, **options)
    assert resumed == whole
    # only the rungs the interrupt left were trained: the first rung's three and output-only's second were not
    assert sum("rung" in line for line in lines) == sum(len(row.scores) for row in whole.table) - 4
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in whole.model.state_dict().items())


class _StopAt:
    """A progress callback that raises once it has seen ``n`` rung lines (module level: tune passes it nothing
    to pickle; it runs in the calling process, so the raise terminates the workers mid-rung)."""

    class Stop(Exception):
        pass

    def __init__(self, n):
        self.n, self.seen = n, []

    def __call__(self, line):
        self.seen.append(line)
        if sum("rung" in seen for seen in self.seen) == self.n:
            raise self.Stop


def test_a_two_worker_search_killed_mid_rung_resumes_with_two_workers(tmp_path):
    """The workers are terminated while they train (their taken rungs' tokens stay in the state folder, their
    trials stay running); the rerun reclaims those trials under new numbers, so no token holds them back, and
    gives the uninterrupted search's table, choice and model."""
    train, val = _data()
    options = dict(task="classification", max_cost=math.inf, steps=18, options=TrainOptions(lr=3e-3), search=_TWO,
                   seed=2)
    whole = tune(_net, train, val, progress=False, **options)
    state = tmp_path / "tune.journal"
    stop = _StopAt(4)  # the first rung's three and one later rung: the other worker is mid-rung
    with pytest.raises(_StopAt.Stop):
        tune(_net, train, val, progress=stop, state=state, workers=2, **options)
    assert any(t.state == optuna.trial.TrialState.RUNNING for t in _trials(state).values())
    assert list(state.with_name(state.name + ".d").glob("take-*")), "no rung was taken before the kill"
    resumed = tune(_net, train, val, progress=False, state=state, workers=2, **options)
    assert resumed == whole
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in whole.model.state_dict().items())


def test_train_candidate_is_tunes_objective_for_one_setting():
    from autoprobe.tuning import train_candidate

    train, val = _data()
    options = dict(task="classification", steps=18, options=TrainOptions(lr=3e-3), seed=2)
    whole = tune(_net, train, val, search=_TWO, max_cost=math.inf, progress=False, **options)
    dsn = next(row for row in whole.table if row.candidate.objective == "dsn")
    reports: list[tuple[int, float]] = []
    done = train_candidate(dsn.candidate, _net, train, val, report=lambda step, v: reports.append((step, v)),
                           **options)
    assert [s for s, _ in reports] == [2, 6, 18] and done.row.scores == tuple(v for _, v in reports)
    assert done.row.scores[: len(dsn.scores)] == dsn.scores  # the rungs tune trained, bit-equal
    if whole.chosen == dsn.candidate:
        got, want = done.model.state_dict(), whole.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert isinstance(done.model, autoprobe.Probed)
