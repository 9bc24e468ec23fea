"""IMacHSR's MI estimators: (a) the image-wise MI ignores how classes are named within an image
and the pooled one does not; (b) the plug-in MI over a classification batch is biased upward and
the shuffled estimator removes that bias. The measurements live in examples/mi_estimators.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autoprobe.errors import InstrumentError
from autoprobe.losses import IMacHSR, LossOptions, make_objective

_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mi_estimators.py"


def _example():
    spec = importlib.util.spec_from_file_location("_mi_estimators_example", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_wise_mi_is_blind_to_renaming_classes_within_an_image_and_pooled_mi_is_not():
    table = _example().dense_mi(images=8, size=32, classes=11, seed=1)
    assert table["image"]["right names"] == pytest.approx(table["image"]["renamed per image"], abs=1e-6)
    assert table["shuffled"]["right names"] == pytest.approx(table["shuffled"]["renamed per image"], abs=1e-6)
    assert table["pooled"]["right names"] > table["pooled"]["renamed per image"] + 0.2


def test_plug_in_mi_of_independent_predictions_is_biased_up_and_the_shuffled_estimate_is_not():
    stats = _example().independent_mi(batch=32, classes=10, draws=200, seed=3)
    assert stats["image"]["mean"] > 0.5
    assert abs(stats["shuffled"]["mean"]) < 0.05
    # the bias shrinks with the batch: about 1/N
    assert _example().independent_mi(batch=512, classes=10, draws=20, seed=3)["image"]["mean"] < 0.15


def test_imachsr_reports_the_estimator_it_was_given():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(10, (32,), generator=gen)
    unrelated = 20.0 * F.one_hot(torch.randint(10, (32,), generator=gen), 10).float()
    parts = {}
    for estimator in ("image", "shuffled"):
        objective = make_objective("imachsr", ["s1"], {"s1": "NC"}, options=LossOptions(mi_estimator=estimator))
        result = objective(torch.zeros(32, 10), {"s1": unrelated}, {"s1": torch.zeros(32, 4)}, labels)
        parts[estimator] = -float(result.parts["mi/s1"])
    assert parts["image"] > 0.5 and parts["shuffled"] < parts["image"] - 0.4
    assert "mi_estimator='shuffled'" in repr(objective)


def test_an_unknown_estimator_is_refused_with_the_choices():
    with pytest.raises(InstrumentError, match="unknown mi_estimator 'plugin'.*'image', 'pooled', 'shuffled'"):
        IMacHSR(["s1"], {"s1": "NC"}, mi_estimator="plugin")
    with pytest.raises(InstrumentError, match="does not take \\['mi_estimator'\\]"):
        make_objective("dsn", ["s1"], options=LossOptions(mi_estimator="pooled"))
