"""Options travel as records (issue 27): ``TraceOptions`` is the one tracing argument of ``inspect``, ``analyze`` and
``instrument``; the old keywords still work, with a warning that names the record's field.
"""

from __future__ import annotations

import inspect as pyinspect
import warnings

import pytest
import torch
from torch import nn

import autoprobe
from autoprobe import LossOptions, TraceOptions
from autoprobe.errors import InstrumentError, UsageError
from autoprobe.losses import make_objective

SIZE = (3, 16, 16)
OLD_TRACE_KEYWORDS = {"train", "leaf_modules", "leaf_paths", "allow_real_data"}


def small() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("function", [autoprobe.inspect, autoprobe.analyze, autoprobe.instrument],
                         ids=lambda f: f.__name__)
def test_the_public_calls_declare_no_tracing_keyword_but_options(function) -> None:  # noqa: ANN001
    parameters = pyinspect.signature(function).parameters
    assert not OLD_TRACE_KEYWORDS & set(parameters)
    assert parameters["options"].kind is pyinspect.Parameter.KEYWORD_ONLY


def test_an_old_tracing_keyword_still_works_and_names_the_record() -> None:
    model = small()
    with pytest.warns(DeprecationWarning, match=r"inspect\(train=\.\.\.\) is deprecated; pass options=TraceOptions\(mode="):
        old = autoprobe.inspect(model, input_size=SIZE, train=True)
    new = autoprobe.inspect(model, input_size=SIZE, options=TraceOptions(mode="train"))
    assert old.mode == new.mode == "train" and old.names == new.names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autoprobe.inspect(model, input_size=SIZE, options=TraceOptions(leaf_paths=("3",)))  # the record: no warning


def test_a_keyword_no_call_takes_and_a_mix_are_refused() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'leaf'"):
        autoprobe.inspect(small(), input_size=SIZE, leaf=["3"])
    with pytest.raises(UsageError, match="not both"):
        autoprobe.analyze(small(), input_size=SIZE, allow_real_data=True, options=TraceOptions())
    with pytest.raises(UsageError, match="must be an autoprobe TraceOptions"):
        autoprobe.inspect(small(), input_size=SIZE, options={"mode": "train"})  # type: ignore[arg-type]
    torch.manual_seed(0)


def test_instrument_takes_twelve_parameters_and_the_two_records() -> None:
    parameters = pyinspect.signature(autoprobe.instrument).parameters
    named = [p for p in parameters.values() if p.kind is not pyinspect.Parameter.VAR_KEYWORD]
    assert len(named) <= 12, [p.name for p in named]
    assert {"points", "rules", "loss", "input_size", "task", "output", "ignore_index", "loss_options", "options"} \
        <= set(parameters)


def test_the_loss_record_reaches_the_objective_and_the_adapters() -> None:
    model = small()
    default = autoprobe.instrument(model, input_size=SIZE, points=2)
    probed = autoprobe.instrument(model, input_size=SIZE, points=2, loss="dsn",
                                  loss_options=autoprobe.LossOptions(alpha=0.7, head="linear"))
    assert probed.objective.alpha == dict.fromkeys(probed.selection.names, 0.7)
    assert default.objective.alpha != probed.objective.alpha  # the class default (0.3) where not given
    linear = {t.adapter_type for t in probed.report.taps}
    assert linear != {t.adapter_type for t in default.report.taps}
    # One warning per old keyword, each naming its own field (pytest.warns re-raises any it does not match).
    with pytest.warns(DeprecationWarning, match=r"instrument\((alpha|head)=\.\.\.\) is deprecated; pass "
                                                r"loss_options=LossOptions\((alpha|head)=\.\.\.\)") as seen:
        old = autoprobe.instrument(model, input_size=SIZE, points=2, loss="dsn", alpha=0.7, head="linear")
    assert sorted(str(w.message) for w in seen if w.category is DeprecationWarning) == [
        f"instrument({key}=...) is deprecated; pass loss_options=LossOptions({key}=...)." for key in ("alpha", "head")]
    assert old.objective.alpha == probed.objective.alpha and {t.adapter_type for t in old.report.taps} == linear
    with pytest.warns(DeprecationWarning, match=r"pass options=TraceOptions\(leaf_paths="):
        autoprobe.instrument(model, input_size=SIZE, points=2, leaf_paths=["3"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'heads'"):
        autoprobe.instrument(model, input_size=SIZE, heads="linear")
    with pytest.raises(autoprobe.errors.InstrumentError, match="does not take \\['lam'\\]"):
        autoprobe.instrument(model, input_size=SIZE, loss="dsn", loss_options=autoprobe.LossOptions(lam=0.1))


def test_an_old_make_objective_keyword_still_works_and_names_the_record() -> None:
    with pytest.warns(DeprecationWarning, match=r"make_objective\(alpha=\.\.\.\) is deprecated; pass "
                                                r"options=LossOptions\(alpha=\.\.\.\)"):
        old = make_objective("dsn", ["a", "b"], alpha=0.4)
    new = make_objective("dsn", ["a", "b"], options=LossOptions(alpha=0.4))
    assert old.alpha == new.alpha == {"a": 0.4, "b": 0.4}
    with pytest.raises(InstrumentError, match="not both"):
        make_objective("dsn", ["a"], alpha=0.4, options=LossOptions())


# ------------------------------------------------------------------------------------------------ tune's record


def _tiny_search() -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=gen)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long()
    return dict(model=lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                train=[(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)], val=[(x[64:], y[64:])],
                task="classification", steps=9, max_cost=float("inf"), progress=False,
                search={"objective": ["output", "dsn"], "alpha": [0.3], "points": [1], "schedule": ["constant"]})


def _accuracy(model: nn.Module, batches) -> float:  # noqa: ANN001
    return sum(float((model(x).argmax(1) == y).float().mean()) for x, y in batches)


def test_an_old_tune_keyword_still_works_and_names_the_record() -> None:
    pytest.importorskip("optuna")
    with pytest.warns(DeprecationWarning) as seen:
        old = autoprobe.tune(**_tiny_search(), lr=3e-3, score=_accuracy)
    assert sorted(str(w.message) for w in seen) == [
        "tune(lr=...) is deprecated; pass options=TrainOptions(lr=...).",
        "tune(score=...) is deprecated; pass options=TrainOptions(score=...).",
    ]
    assert all(w.filename == __file__ for w in seen)  # the user's line, not autoprobe's
    new = autoprobe.tune(**_tiny_search(), options=autoprobe.TrainOptions(lr=3e-3, score=_accuracy))
    assert old.table == new.table and old.chosen == new.chosen  # the same search, scored by the same function
    with pytest.raises(UsageError, match="not both"):
        autoprobe.tune(**_tiny_search(), lr=3e-3, options=autoprobe.TrainOptions())
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        autoprobe.tune(**_tiny_search(), learning_rate=3e-3)
    with pytest.raises(UsageError, match=r"lr=0 must be a positive number"):
        autoprobe.TrainOptions(lr=0)
    with pytest.raises(UsageError, match=r"score=0.5 must be a callable"):
        autoprobe.TrainOptions(score=0.5)  # type: ignore[arg-type]


def test_public_functions_take_about_twelve_parameters() -> None:
    """Issue 27's bound, over every public function of the package and of ``autoprobe.tuning``. ``tune`` takes 14:
    the data (model, train, val), the budget (task, steps, search, max_cost, eta, seed), where the study lives and
    who works on it (state, storage, workers), progress, and the ``TrainOptions`` record that took its seven
    training keywords (it took 20)."""
    from autoprobe import tuning

    allowed = {"tune": 14}
    functions = {name: getattr(autoprobe, name) for name in autoprobe.__all__}
    functions.update({name: getattr(tuning, name) for name in tuning.__all__})
    over = {}
    for name, function in functions.items():
        if not pyinspect.isfunction(function):
            continue
        named = [p for p in pyinspect.signature(function).parameters.values()
                 if p.kind not in (pyinspect.Parameter.VAR_KEYWORD, pyinspect.Parameter.VAR_POSITIONAL)]
        if len(named) > allowed.get(name, 12):
            over[name] = len(named)
    assert not over, over
