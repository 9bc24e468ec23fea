"""The README's Ray Tune recipe on a local Ray (two CPUs): ASHA schedules ``autoprobe.tuning.train_candidate``,
tune's own objective, over the same keys; each trial reports the scores tune's table shows for its setting,
and output-only, trained outside the scheduler, decides the choice as in tune (strictly higher, else output-only)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import test_tune_optuna
from autoprobe import TrainOptions, tune
from autoprobe.tuning import candidate, train_candidate
from test_tune_optuna import _data, _net

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune")

_STEPS = 18  # rungs of 2, 6 and 18 steps: three reports per trial
_SEARCH = {"objective": ["dsn", "imachsr"], "alpha": [0.3], "lam": [0.0], "points": [1], "position": ["auto"],
           "schedule": ["constant"], "gate": [None], "head": ["linear"]}


def _trainable(config, train, val):
    from ray import tune as rt

    torch.set_num_threads(1)  # as this process: kernels sum in the same order, so scores are bit-equal
    train_candidate(candidate(config), _net, train, val, task="classification", steps=_STEPS,
                    options=TrainOptions(lr=3e-3), report=lambda step, score: rt.report({"score": score, "step": step}))


def test_ray_tune_asha_runs_tunes_objective_and_the_output_only_guarantee_is_applied(tmp_path):
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler

    for module in (sys.modules[__name__], test_tune_optuna):  # Ray's workers cannot import the tests
        ray.cloudpickle.register_pickle_by_value(module)
    train, val = _data()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        space = {k: (rt.grid_search(list(v)) if k == "objective" else v[0]) for k, v in _SEARCH.items()}
        tuner = rt.Tuner(
            rt.with_parameters(_trainable, train=train, val=val), param_space=space,
            tune_config=rt.TuneConfig(metric="score", mode="max",
                                      scheduler=ASHAScheduler(max_t=3, grace_period=1, reduction_factor=3)),
            run_config=rt.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0))
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert not results.errors
    plain = train_candidate(candidate({"objective": "output"}), _net, train, val, task="classification",
                            steps=_STEPS, options=TrainOptions(lr=3e-3))
    whole = tune(_net, train, val, task="classification", steps=_STEPS, options=TrainOptions(lr=3e-3), search=_SEARCH,
                 max_cost=math.inf, progress=False)
    rows = {row.candidate.label: row for row in whole.table}
    assert plain.row.scores == rows["output"].scores  # the same objective, in this process
    for res in results:
        reported = tuple(res.metrics_dataframe["score"])
        row = rows[candidate(res.config).label]
        n = min(len(reported), len(row.scores))
        assert n >= 1 and reported[:n] == row.scores[:n], (res.config["objective"], reported, row.scores)
    best = results.get_best_result()
    better = best.metrics["score"] > plain.row.score
    chosen = candidate(best.config) if better else candidate({"objective": "output"})
    assert chosen.objective in ("output", "dsn", "imachsr")
    if not better:
        assert chosen.objective == "output"
