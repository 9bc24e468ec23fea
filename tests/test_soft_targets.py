"""Soft class targets (timm Mixup / CutMix, dense), label smoothing, class weights and a
user-supplied output loss, on the objectives and through ``instrument``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import autoprobe
from autoprobe.errors import InstrumentError, UsageError
from autoprobe.losses import DKS, DSN, IMacHSR

torch.set_num_threads(1)


def _objectives(points: list[str], layout: str, **options: object) -> list[torch.nn.Module]:
    layouts = dict.fromkeys(points, layout)
    return [IMacHSR(points, layouts, **options), DSN(points, **options), DKS(points, **options)]


def _batch(seed: int, batch: int, classes: int, spatial: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    output = torch.randn(batch, classes, *spatial, generator=g) * 3
    head = torch.randn(batch, classes, *spatial, generator=g) * 3
    feature = torch.randn(batch, 5, *spatial, generator=g) if spatial else torch.randn(batch, 5, 2, 2, generator=g)
    labels = torch.randint(0, classes, (batch, *spatial), generator=g)
    return output, head, feature, labels


# --------------------------------------------------------------------------- the property


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 6),
    classes=st.integers(2, 6),
    dense=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.1]),
    weighted=st.booleans(),
)
def test_one_hot_float_targets_give_exactly_the_loss_of_their_class_ids(
    seed: int, batch: int, classes: int, dense: bool, smoothing: float, weighted: bool
) -> None:
    spatial = (3, 4) if dense else ()
    output, head, feature, labels = _batch(seed, batch, classes, spatial)
    one_hot = F.one_hot(labels, classes).movedim(-1, 1).float()
    weights = torch.arange(1, classes + 1, dtype=torch.float32) if weighted else None
    layout = "NCHW"
    for objective in _objectives(["p"], layout, label_smoothing=smoothing, class_weights=weights):
        heads, features = {"p": head.clone().requires_grad_()}, {"p": feature}
        by_ids = objective(output, heads, features, labels)
        grad_ids = torch.autograd.grad(by_ids.total, heads["p"])[0]
        heads = {"p": head.clone().requires_grad_()}
        by_floats = objective(output, heads, features, one_hot)
        grad_floats = torch.autograd.grad(by_floats.total, heads["p"])[0]
        assert by_ids.parts.keys() == by_floats.parts.keys()
        for name in by_ids.parts:
            assert torch.equal(by_ids.parts[name], by_floats.parts[name]), (type(objective).__name__, name)
        assert torch.equal(by_ids.total, by_floats.total)
        assert torch.equal(grad_ids, grad_floats)


# --------------------------------------------------------------------------- soft targets


def test_timm_mixup_and_cutmix_targets_train_a_probed_classifier() -> None:
    from timm.data import Mixup

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    )
    probed = autoprobe.instrument(net, input_size=(3, 16, 16), task="classification", loss="imachsr")
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    x, soft = mixup(x, y)
    assert soft.shape == (8, 5) and soft.dtype.is_floating_point and not torch.equal(soft, soft.round())
    out = probed(x)
    total, parts = probed.loss(out, soft)
    total.backward()
    assert all(p.grad is not None for p in probed.parameters())
    logits = probed.logits(out)
    expected_ce = -(soft * logits.log_softmax(1)).sum(1).mean()
    assert parts["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    # The MI joint is the mean of p_n t_n^T: the target distribution takes the one-hot's place.
    # (A confident head, so the MI is far from 0 and a relative tolerance means something.)
    point = probed.selection.names[0]
    out = out._replace(heads={point: 4 * torch.randn(8, 5, generator=torch.Generator().manual_seed(5))})
    parts = probed.loss(out, soft).parts
    p = out.heads[point].softmax(1)
    joint = p.t() @ soft / 8
    mi = (joint * (joint.log() - joint.sum(1, keepdim=True).log() - joint.sum(0, keepdim=True).log())).sum()
    assert parts[f"mi/{point}"].item() == pytest.approx(-mi.item(), rel=1e-5)


def test_dense_soft_targets_are_area_resized_for_heads_at_their_own_resolution() -> None:
    g = torch.Generator().manual_seed(3)
    soft = torch.rand(2, 3, 8, 8, generator=g).softmax(1)  # (B, K, H, W), at image resolution
    output, head = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    parts = DSN(["p"])(output, {"p": head}, {}, soft).parts
    coarse = F.adaptive_avg_pool2d(soft, (4, 4))
    expected = -(coarse * head.log_softmax(1)).sum(1).mean()
    assert parts["dsn/p"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(coarse.sum(1), torch.ones(2, 4, 4))


def test_soft_targets_that_are_not_distributions_name_the_regression_task() -> None:
    output = torch.randn(2, 3, 4, 4)
    with pytest.raises(InstrumentError, match=r"not distributions.*pass task='regression'"):
        DSN([])(output, {}, {}, torch.rand(2, 3, 4, 4) * 2)
    with pytest.raises(InstrumentError, match=r"not distributions.*pass task='regression'"):
        DSN([])(output, {}, {}, torch.zeros(2, 3, 4, 4))
    with pytest.raises(InstrumentError, match=r"soft class targets of shape \(2, 4\) do not fit output"):
        DSN([])(torch.randn(2, 3), {}, {}, torch.full((2, 4), 0.25))


# --------------------------------------------------------------------------- smoothing and weights


def test_label_smoothing_and_class_weights_match_torch_cross_entropy_with_ignore_index() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    labels = torch.randint(0, 4, (2, 3, 5), generator=g)
    labels[0, 0, :2] = 255
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0])
    expected = F.cross_entropy(logits, labels, weight=weights, label_smoothing=0.2, ignore_index=255)
    for objective in (DSN([], ignore_index=255, label_smoothing=0.2, class_weights=weights),
                      IMacHSR([], {}, ignore_index=255, label_smoothing=0.2, class_weights=[0.5, 1, 2, 3])):
        got = objective(logits, {}, {}, labels).parts["ce"]
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_instrument_passes_smoothing_and_weights_to_the_output_and_dsn_heads() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3),
    )
    weights = [1.0, 2.0, 0.5]
    probed = autoprobe.instrument(net, input_size=(3, 8, 8), loss="dsn",
                                  loss_options=autoprobe.LossOptions(label_smoothing=0.1, class_weights=weights))
    out, y = probed(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 1])
    parts = probed.loss(out, y).parts
    w = torch.tensor(weights)
    assert parts["ce"].item() == pytest.approx(
        F.cross_entropy(out.output, y, weight=w, label_smoothing=0.1).item(), rel=1e-6)
    point = probed.selection.names[0]
    assert parts[f"dsn/{point}"].item() == pytest.approx(
        F.cross_entropy(out.heads[point], y, weight=w, label_smoothing=0.1).item(), rel=1e-6)
    assert "label_smoothing=0.1" in probed.report.objective


# --------------------------------------------------------------------------- a custom output loss


def focal(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_p = logits.log_softmax(1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (-(1 - log_p.exp()) ** 2 * log_p).mean()


def test_a_user_output_loss_replaces_the_output_and_dsn_losses() -> None:
    g = torch.Generator().manual_seed(2)
    output, head = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    labels = torch.randint(0, 3, (4, 8, 8), generator=g)
    result = DSN(["p"], output_loss=focal)(output, {"p": head}, {}, labels)
    assert list(result.parts) == ["output", "dsn/p"]
    assert result.parts["output"].item() == pytest.approx(focal(output, labels).item(), rel=1e-6)
    up = F.interpolate(head, size=(8, 8), mode="bilinear", align_corners=False)
    assert result.parts["dsn/p"].item() == pytest.approx(focal(up, labels).item(), rel=1e-6)
    imachsr = IMacHSR(["p"], {"p": "NCHW"}, lam=0.01, output_loss=focal)(output, {"p": head}, {"p": head}, labels)
    assert sorted(imachsr.parts) == ["mi/p", "ne/p", "output"]
    with pytest.raises(InstrumentError, match=r"output_loss returned \(4,\); it must return a scalar"):
        DSN([], output_loss=lambda x, y: x.mean((1, 2, 3)))(output, {}, {}, labels)


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"label_smoothing": 1.0}, r"label_smoothing must be a number in \[0, 1\).*Hint"),
        ({"label_smoothing": "0.1"}, r"label_smoothing must be a number"),
        ({"class_weights": [1.0, -1.0]}, r"class_weights must hold K >= 2 finite weights >= 0.*Hint"),
        ({"class_weights": "12"}, r"class_weights must be a sequence of numbers.*Hint"),
        ({"class_weights": torch.ones(2, 2)}, r"class_weights must be a 1-D float tensor"),
        ({"output_loss": 3}, r"output_loss must be a callable.*Hint"),
        ({"output_loss": focal, "label_smoothing": 0.1}, r"which output_loss replaces.*Hint"),
        ({"target_kind": "binary", "class_weights": [1.0, 2.0]}, r"configure the multiclass cross entropy.*Hint"),
        ({"gather_mi": 1}, r"gather_mi must be True or False.*Hint"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_option(options: dict[str, object], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        IMacHSR(["p"], {"p": "NCHW"}, **options)  # type: ignore[arg-type]


def test_class_weights_of_the_wrong_width_and_options_beside_a_given_objective() -> None:
    with pytest.raises(InstrumentError, match=r"class_weights has 2 weights; the output has K=3 classes"):
        DSN([], class_weights=[1.0, 2.0])(torch.randn(2, 3), {}, {}, torch.tensor([0, 1]))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(64, 3))
    names = autoprobe.inspect(net, input_size=(3, 8, 8)).names
    with pytest.raises(UsageError, match=r"a given Objective already has its own.*Hint"):
        autoprobe.instrument(net, input_size=(3, 8, 8), loss=DSN(list(names)),
                             loss_options=autoprobe.LossOptions(label_smoothing=0.1))
    assert math.isfinite(DSN([], label_smoothing=0.1)(torch.randn(2, 3), {}, {}, torch.tensor([0, 1])).total.item())


def test_the_readme_block_runs() -> None:
    from _readme import python_block

    scope: dict[str, object] = {}
    exec(compile(python_block("### Soft targets and custom losses"), "README.md", "exec"), scope)
    assert scope["y"].shape == (8, 10) and any(name.startswith("dsn/") for name in scope["parts"])  # type: ignore[union-attr]
    assert "output" in scope["parts"] and "class_weights=" in scope["smoothed"].report.objective  # type: ignore[union-attr]
