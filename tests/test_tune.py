"""autoprobe.tune: successive halving on validation that returns deep supervision only where it beats
output-only training, deterministic for a seed, resumable, and strict about its input."""

from __future__ import annotations

import math
import pytest
import torch
from torch import nn

import autoprobe
from autoprobe import TrainOptions, UsageError, tune


class _Detach(nn.Module):
    def forward(self, t):
        return t.detach()


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1, 8, 8, generator=gen)
    # four classes: the signs of the means of two opposite quadrants
    y = (x[:, 0, :4, :4].mean((1, 2)) > 0).long() * 2 + (x[:, 0, 4:, 4:].mean((1, 2)) > 0).long()
    train = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 768, 32)]
    return train, [(x[768:], y[768:])]


def _cut_net():
    """The output's gradient never reaches the zero-initialised stem (a detach sits above it), so
    output-only training leaves it blank; a head on the stem is the known-good setting."""
    stem = nn.Conv2d(1, 4, 3, padding=1)
    nn.init.zeros_(stem.weight)
    nn.init.zeros_(stem.bias)
    return nn.Sequential(stem, nn.Tanh(), nn.Conv2d(4, 8, 3, padding=1), nn.Tanh(), _Detach(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(512, 4))


def _plain_net():
    conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.ReLU()]  # noqa: E731
    return nn.Sequential(*conv(1, 8), *conv(8, 8), *conv(8, 8), *conv(8, 8), nn.Flatten(), nn.Linear(512, 4))


# A linear head on the stem: the known answer is that of a head whose 1x1 map reaches the stem at once
# (a conv head's BN and 3x3 conv need more than these 60 steps on a 4-channel stem).
_STEM_HEAD = {"objective": ["dsn"], "alpha": [1.0], "points": [1], "position": ["input"], "schedule": ["constant"],
              "head": ["linear"]}
# Weights that swamp the output loss with an input-side term: worse than output-only on this task.
_HARMFUL = {"objective": ["dsn", "imachsr"], "alpha": [100.0], "lam": [100.0], "points": [1], "position": ["input"],
            "schedule": ["constant"]}


def test_a_known_good_setting_wins_and_its_instrument_arguments_reproduce_it():
    train, val = _data()
    result = tune(_cut_net, train, val, task="classification", max_cost=math.inf, steps=60,
                  options=TrainOptions(lr=3e-3), search=_STEM_HEAD, progress=False)
    assert result.chosen.objective == "dsn" and result.chosen.position == "input"
    assert result.score > result.output_only_score + 0.3
    assert [row.candidate.label for row in result.table] == ["output", "dsn/alpha=1.0/M=1/input/head=linear"]
    assert result.cost_steps <= 4 * 60
    probed = autoprobe.instrument(_cut_net(), **result.instrument_kwargs)
    assert list(probed.selection.names) == ["1"] and type(probed.objective).__name__ == "DSN"
    assert probed.objective.alpha == {"1": 1.0}


def test_output_only_is_returned_when_no_candidate_beats_it():
    train, val = _data()
    result = tune(_plain_net, train, val, task="classification", max_cost=math.inf, steps=60,
                  options=TrainOptions(lr=3e-3), search=_HARMFUL, progress=False)
    assert result.chosen.objective == "output" and result.instrument_kwargs is None
    full = [row.score for row in result.table if row.steps == 60]
    assert len(full) >= 2 and result.score == max(full) == result.output_only_score


def test_the_same_seed_gives_the_same_table_and_an_interrupted_search_resumes(tmp_path):
    train, val = _data()
    # a decaying learning rate: a resumed candidate must follow the full run's schedule
    options = dict(task="classification", max_cost=math.inf, steps=18, search=_HARMFUL, progress=False, seed=1,
                   options=TrainOptions(lr=3e-3, lr_factor=lambda step: 1 - step / 18))
    first = tune(_plain_net, train, val, **options)
    assert tune(_plain_net, train, val, **options) == first

    class Stop(Exception):
        pass

    lines: list[str] = []

    def stop_after_three(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            raise Stop

    state = tmp_path / "tune.jsonl"
    with pytest.raises(Stop):
        tune(_plain_net, train, val, **{**options, "progress": stop_after_three, "state": state})
    built = []

    def counting_factory():
        built.append(1)
        return _plain_net()

    resumed = tune(counting_factory, train, val, **{**options, "state": state})
    assert resumed.table == first.table and resumed.chosen == first.chosen
    assert resumed.cost_steps == first.cost_steps
    assert len(built) < sum(len(row.scores) for row in first.table)  # finished rungs were not retrained


def test_bad_input_is_a_usage_error_with_a_hint():
    train, val = _data()
    with pytest.raises(UsageError, match="validation set is empty.*Hint"):
        tune(_plain_net, train, [], task="classification", steps=10, progress=False)
    with pytest.raises(UsageError, match="max_cost=1.5 is too small for one candidate.*Hint"):
        tune(_plain_net, train, val, task="classification", steps=10, max_cost=1.5, progress=False)
    with pytest.raises(UsageError, match=r"unknown search key\(s\) \['weight'\].*Hint"):
        tune(_plain_net, train, val, task="classification", steps=10, search={"weight": [1]}, progress=False)
    with pytest.raises(UsageError, match="one-shot iterator.*Hint"):
        tune(_plain_net, iter(train), val, task="classification", steps=10, progress=False)


def test_a_draw_that_fits_the_budget_searches_every_objective():
    from collections import Counter

    from autoprobe import tunespace

    space = tunespace.search_space(None)
    rungs = tunespace.rungs(1500, 3)
    for seed in range(20):
        kept, dropped = tunespace.draw(space, rungs, 3, 1500, 3.5, seed)
        assert kept[0].objective == "output" and dropped == len(space) - len(kept) > 0
        counts = Counter(c.objective for c in kept[1:])
        # each objective searched, and dealt evenly, whichever seed draws them
        assert set(counts) == {"dsn", "imachsr"} and abs(counts["dsn"] - counts["imachsr"]) <= 1, (seed, counts)
    assert {c.label for c in tunespace.draw(space, rungs, 3, 1500, 3.5, 0)[0]} != \
        {c.label for c in tunespace.draw(space, rungs, 3, 1500, 3.5, 1)[0]}


def test_a_gated_candidate_is_one_more_setting_and_trains():
    train, val = _data()
    search = {"objective": ["dsn"], "alpha": [0.3], "points": [1], "position": ["auto"], "schedule": ["constant"],
              "gate": [None, "cosine"]}
    result = tune(_plain_net, train, val, task="classification", max_cost=math.inf, steps=20,
                  options=TrainOptions(lr=3e-3), search=search, progress=False)
    labels = [row.candidate.label for row in result.table]
    assert labels == ["output", "dsn/alpha=0.3/M=1/auto", "dsn/alpha=0.3/M=1/auto/gate=cosine"]
    assert all(row.error is None and row.scores for row in result.table)
    gated = next(row.candidate for row in result.table if row.candidate.gate == "cosine")
    kwargs = gated.instrument_kwargs(input_size=(1, 8, 8))
    assert kwargs["loss_options"].gate == "cosine"
    assert autoprobe.instrument(_plain_net(), **kwargs).objective.gate is not None
    assert "gate" not in autoprobe.tuning.DEFAULT_SEARCH or autoprobe.tuning.DEFAULT_SEARCH["gate"] == (None,)


def _fresh_run(factory, kwargs, train, steps, lr, seed=0):
    """The chosen setting trained once, outside the search, the way tune trains a candidate."""
    torch.manual_seed(seed)
    probed = autoprobe.instrument(factory(), **kwargs)
    torch.manual_seed(seed + autoprobe.tunetrain.TRAIN_RNG_OFFSET)
    opt = torch.optim.AdamW(probed.parameters(), lr=lr)
    probed.train()
    batches = iter(train * (steps // len(train) + 1))
    for step in range(steps):
        x, y = next(batches)
        total = probed.loss(probed(x), y, progress=step / steps).total
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    return probed


def test_the_result_holds_the_chosen_model_trained_as_a_fresh_run_of_its_setting(tmp_path):
    train, val = _data()
    kwargs = dict(task="classification", max_cost=math.inf, steps=60, options=TrainOptions(lr=3e-3),
                  search=_STEM_HEAD, progress=False)
    result = tune(_cut_net, train, val, **kwargs)
    assert result.chosen.objective == "dsn" and isinstance(result.model, autoprobe.Probed)
    fresh = _fresh_run(_cut_net, result.instrument_kwargs, train, 60, 3e-3)
    got, want = result.model.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "the returned model is not the chosen run's"
    # Resumed from its state, the search hands back the same weights without training again.
    state = tmp_path / "tune.jsonl"
    first = tune(_cut_net, train, val, state=state, **kwargs)
    again = tune(_cut_net, train, val, state=state, **kwargs)
    assert all(torch.equal(again.model.state_dict()[k], first.model.state_dict()[k]) for k in want)
    # Output-only winning returns the plain model, trained.
    plain = tune(_plain_net, train, val, task="classification", max_cost=math.inf, steps=60,
                 options=TrainOptions(lr=3e-3), search=_HARMFUL, progress=False)
    assert plain.chosen.objective == "output" and not isinstance(plain.model, autoprobe.Probed)
    assert isinstance(plain.model, nn.Sequential)


def test_the_cost_is_measured_whole_in_units_of_one_output_only_run():
    train, val = _data()
    result = tune(_cut_net, train, val, task="classification", max_cost=math.inf, steps=60,
                  options=TrainOptions(lr=3e-3), search=_STEM_HEAD, progress=False)
    cost = result.cost
    assert cost.steps == result.cost_steps == 2 * 60  # two candidates, each trained the full budget once
    assert cost.validation_passes == sum(len(row.scores) for row in result.table) == 6
    assert cost.builds == 2  # one build each: the returned model is the search's, not rebuilt
    assert min(cost.train_s, cost.validation_s, cost.build_s, cost.unit_s) > 0
    assert cost.runs == pytest.approx((cost.train_s + cost.validation_s + cost.build_s) / cost.unit_s, rel=1e-2)
    assert cost.cpu_s >= cost.train_s + cost.validation_s + cost.build_s - 1e-3 and cost.wall_s > 0
    # Output-only's run is one unit; DSN's, with its heads, at least as much again.
    assert 2.0 < cost.runs < 6


class _Val(list):
    """A validation list that counts its passes (each ``iter`` is one)."""

    passes = 0

    def __iter__(self):
        type(self).passes += 1
        return super().__iter__()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_default_search_stays_within_max_cost_measured_validation_included(workers):
    """A large validation set (32768 inputs, 16x the training set): each pass costs a third of an
    output-only run here, so the 9 candidates whose steps alone fit 3.5 runs cannot all be searched.
    Two workers admit on output-only's first steps and one more (counted) validation pass."""
    _Val.passes = 0
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048 + 32768, 1, 8, 8, generator=gen)
    y = (x[:, 0, :4, :4].mean((1, 2)) > 0).long() * 2 + (x[:, 0, 4:, 4:].mean((1, 2)) > 0).long()
    train = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 2048, 32)]
    val = _Val([(x[i : i + 512], y[i : i + 512]) for i in range(2048, 2048 + 32768, 512)])
    lines: list[str] = []
    result = tune(_plain_net, train, val, task="classification", steps=180, progress=lines.append,
                  options=TrainOptions(lr=3e-3), workers=workers)
    cost, table = result.cost, result.table
    assert len(table) == 10 and result.dropped == 36 - 9  # the draw by steps alone: 9 and output-only
    assert cost.validation_passes == sum(len(row.scores) for row in table) + (workers > 1)  # the early measure's
    if workers == 1:
        assert cost.validation_passes == _Val.passes - 2  # tune checks it twice; the workers' passes are theirs
    share = cost.validation_s / cost.validation_passes / cost.unit_s
    assert 0.15 < share < 1.0, share  # one pass, in output-only runs
    stopped = [row for row in table if row.error and row.error.startswith("over budget")]
    assert stopped and any("stopped by max_cost" in line for line in lines)
    assert cost.runs <= 3.5, (cost, lines)  # the bound, measured: steps, validation passes and builds
    assert table[0].steps == 180 and result.model is not None


def test_the_default_search_trains_instruments_own_head():
    # One default, defined once: what tune searches is what instrument trains when told nothing.
    from autoprobe.defaults import DEFAULT_HEAD
    from autoprobe.tunespace import Candidate

    assert autoprobe.tuning.DEFAULT_SEARCH["head"] == (DEFAULT_HEAD,)
    kwargs = Candidate("dsn", 0.3).instrument_kwargs(input_size=(1, 8, 8))
    assert kwargs["loss_options"].head == DEFAULT_HEAD == autoprobe.LossOptions().head
    assert Candidate("dsn", 0.3).label == "dsn/alpha=0.3/M=auto/auto"
    assert Candidate("dsn", 0.3, head="linear").label == "dsn/alpha=0.3/M=auto/auto/head=linear"
