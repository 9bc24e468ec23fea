"""``mi_estimator="region"``: Region Mutual Information (RMI; Zhao et al. 2019) against an independent
float64 computation, its ordering of good and bad heads, its gradients, ignore_index, the refusals
(grid too small, wrong output or target kind) and its wiring into IMacHSR / make_objective / instrument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoprobe import inspect, instrument
from autoprobe.errors import InstrumentError, UsageError
from autoprobe.losses import IMacHSR, LossOptions, MutualInformationLoss, OutputLoss, make_objective

from toy_models import MHAAttention, ToyTransformer, ToyUNet

torch.set_num_threads(1)

IGNORE = 255


def _numpy_rmi(logits: np.ndarray, labels: np.ndarray, ignore: int) -> float:
    """RMI written out from the paper and the reference's constants, float64 loops, no torch.

    Per image and class: mask ignored pixels out of the one-hot label and the softmax (then floor
    1e-6), avg-pool 3x3 / stride 3 / zero padding 1 (dividing by 9), stack the 3x3 neighbourhoods
    of the pooled grid into 9-vectors, centre, M = YY' - YP'(PP' + aI)^-1 PY', loss = 1/2 log det(M + aI) / 9.
    """
    b, k, h, w = logits.shape
    alpha = 5e-4
    values = []
    for n in range(b):
        z = logits[n].astype(np.float64)
        probs = np.exp(z - z.max(axis=0)) / np.exp(z - z.max(axis=0)).sum(axis=0)
        valid = (labels[n] != ignore).astype(np.float64)
        for c in range(k):
            y_map = (labels[n] == c).astype(np.float64) * valid
            p_map = np.clip(probs[c] * valid, 1e-6, 1.0)
            ph, pw = -(-h // 3), -(-w // 3)
            pooled = []
            for m in (y_map, p_map):
                out = np.zeros((ph, pw))
                for i in range(ph):
                    for j in range(pw):
                        total = 0.0
                        for a in range(3):
                            for bb in range(3):
                                r, s = 3 * i - 1 + a, 3 * j - 1 + bb
                                if 0 <= r < h and 0 <= s < w:
                                    total += m[r, s]
                        out[i, j] = total / 9.0
                pooled.append(out)
            vectors = []
            for m in pooled:
                rows = []
                for dy in range(3):
                    for dx in range(3):
                        rows.append([m[i + dy, j + dx] for i in range(ph - 2) for j in range(pw - 2)])
                v = np.array(rows)
                vectors.append(v - v.mean(axis=1, keepdims=True))
            y, p = vectors
            m_cond = y @ y.T - (y @ p.T) @ np.linalg.inv(p @ p.T + alpha * np.eye(9)) @ (p @ y.T)
            sign, logdet = np.linalg.slogdet(m_cond + alpha * np.eye(9))
            assert sign > 0
            values.append(0.5 * logdet / 9.0)
    return float(np.mean(values))


def _blocks(images: int, size: int, classes: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.zeros(images, size, size, dtype=torch.long)
    for i in range(images):
        for c in range(1, classes):
            top, left = (int(v) for v in torch.randint(size // 2, (2,), generator=gen))
            labels[i, top : top + size // 3, left : left + size // 3] = c
    return labels


def _rmi(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    return MutualInformationLoss(ignore_index=ignore_index, estimator="region", region_ce=0.0)(logits, labels)


@pytest.mark.parametrize("size", [(15, 15), (17, 20)])
def test_rmi_equals_an_independent_float64_computation(size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(2, 3, *size, generator=gen)
    labels = _blocks(2, max(size), 3, seed=1)[:, : size[0], : size[1]].clone()
    labels[0, :4, :5] = IGNORE  # ignored pixels too
    expected = _numpy_rmi(logits.numpy(), labels.numpy(), IGNORE)
    got = _rmi(logits, labels)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_a_near_perfect_prediction_is_exact_where_float32_covariances_would_not_be() -> None:
    # M is then a difference of nearly equal sums over the regions: with float32 covariances
    # this case is off by 1e-2 at 48x48 and NaN (a failed Cholesky) at 96x96.
    noise = torch.Generator().manual_seed(14)
    for size in (48, 96):
        labels = _blocks(2, size, 3, seed=2)
        logits = 8.0 * F.one_hot(labels, 3).movedim(-1, 1).float() + 0.01 * torch.randn(2, 3, size, size,
                                                                                           generator=noise)
        got = float(_rmi(logits, labels))
        assert np.isfinite(got)
        if size == 48:
            assert got == pytest.approx(_numpy_rmi(logits.numpy(), labels.numpy(), IGNORE), rel=1e-5)


def test_a_perfect_prediction_scores_lower_than_a_random_or_uniform_one() -> None:
    labels = _blocks(4, 24, 3, seed=2)
    perfect = 8.0 * F.one_hot(labels, 3).movedim(-1, 1).float()
    random = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    assert float(_rmi(perfect, labels)) < float(_rmi(random, labels)) - 1.0
    assert float(_rmi(perfect, labels)) < float(_rmi(torch.zeros(4, 3, 24, 24), labels)) - 1.0


@pytest.mark.parametrize(("case", "region_ce"), [("random", 0.0), ("perfect", 0.0), ("one class per image", 0.5)])
def test_gradients_are_finite_and_reach_the_logits(case: str, region_ce: float) -> None:
    labels = _blocks(2, 18, 3, seed=4)
    if case == "one class per image":
        # Y is constant, so M = 0 whatever P is: RMI alone has no gradient; its CE half has.
        labels = torch.zeros_like(labels)
    base = torch.randn(2, 3, 18, 18, generator=torch.Generator().manual_seed(5))
    if case == "perfect":
        base = 4.0 * F.one_hot(labels, 3).movedim(-1, 1).float()
    logits = base.clone().requires_grad_(True)
    loss = MutualInformationLoss(estimator="region", region_ce=region_ce)(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 1e-6


def test_ignored_pixels_leave_both_maps() -> None:
    labels = _blocks(2, 18, 3, seed=6)
    labels[:, 6:12, :] = IGNORE
    logits = torch.randn(2, 3, 18, 18, generator=torch.Generator().manual_seed(7))
    other = logits.clone()
    other[:, :, 6:12, :] = 50.0 * torch.randn(2, 3, 6, 18, generator=torch.Generator().manual_seed(8))
    # What the head predicts at ignored pixels does not count (the probabilities are masked) ...
    assert float(_rmi(logits, labels)) == pytest.approx(float(_rmi(other, labels)), abs=1e-6)
    # ... and the ignored pixels are not taken as class 0 (the labels are masked).
    as_class_0 = labels.masked_fill(labels == IGNORE, 0)
    assert abs(float(_rmi(logits, labels)) - float(_rmi(logits, as_class_0))) > 1e-3
    logits = logits.requires_grad_(True)
    _rmi(logits, labels).backward()
    assert logits.grad[:, :, 7:11, :].abs().max() == 0  # pooled windows of ignored pixels only get no gradient


def test_the_term_mixes_region_ce_of_cross_entropy_and_imachsr_logs_it_as_rmi() -> None:
    labels = _blocks(2, 16, 3, seed=9)
    head = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    rmi = float(_rmi(head, labels, ignore_index=-100))
    ce = float(OutputLoss()(head, labels))
    objective = IMacHSR(["s1"], {"s1": "NCHW"}, mi_estimator="region", region_ce=0.3)
    result = objective(torch.zeros(2, 3, 16, 16), {"s1": head}, {}, labels)
    assert sorted(result.parts) == ["ce", "rmi/s1"]
    assert float(result.parts["rmi/s1"]) == pytest.approx(0.7 * rmi + 0.3 * ce, rel=1e-5)
    default = IMacHSR(["s1"], {"s1": "NCHW"}, mi_estimator="region")
    assert float(default(torch.zeros(2, 3, 16, 16), {"s1": head}, {}, labels).parts["rmi/s1"]) == pytest.approx(
        0.5 * rmi + 0.5 * ce, rel=1e-5
    )
    assert "mi_estimator='region', region_ce=0.5" in repr(default)
    built = make_objective("imachsr", ["s1"], {"s1": "NCHW"}, options=LossOptions(mi_estimator="region", region_ce=0.3))
    assert float(built(torch.zeros(2, 3, 16, 16), {"s1": head}, {}, labels).parts["rmi/s1"]) == pytest.approx(
        0.7 * rmi + 0.3 * ce, rel=1e-5
    )


def test_bad_options_and_kinds_are_refused_naming_what_to_pass() -> None:
    with pytest.raises(UsageError, match="region_ce weighs the CE half.*Hint:"):
        IMacHSR(["s1"], {"s1": "NCHW"}, region_ce=0.5)
    with pytest.raises(UsageError, match=r"region_ce must be a number in \[0, 1\].*Hint:"):
        MutualInformationLoss(estimator="region", region_ce=1.5)
    with pytest.raises(InstrumentError, match="does not take \\['region_ce'\\]"):
        make_objective("dsn", ["s1"], options=LossOptions(region_ce=0.5))
    for kind in ("binary", "multilabel", "regression"):
        with pytest.raises(InstrumentError, match=f"target_kind is '{kind}'.*Hint: for {kind} targets use"):
            IMacHSR(["s1"], {"s1": "NCHW"}, mi_estimator="region", target_kind=kind)
    with pytest.raises(InstrumentError, match=r"needs 2-D dense logits \(B, K, H, W\).*Hint:"):
        _rmi(torch.zeros(8, 3), torch.zeros(8, dtype=torch.long))
    with pytest.raises(InstrumentError, match="needs 2-D dense logits"):
        _rmi(torch.zeros(2, 3, 40), torch.zeros(2, 40, dtype=torch.long))


def test_a_head_compared_at_a_grid_with_too_few_regions_is_refused_at_forward_naming_the_point() -> None:
    objective = IMacHSR(["s1", "s2"], {"s1": "NCHW", "s2": "NCHW"}, mi_estimator="region")
    output = torch.zeros(2, 3, 16, 16)
    heads = {"s1": torch.zeros(2, 3, 16, 16), "s2": torch.zeros(2, 3, 13, 13)}
    objective(output, heads, {}, torch.zeros(2, 16, 16, dtype=torch.long))  # 16x16 (16 regions) and 13x13 (9): fine
    with pytest.raises(InstrumentError, match="head of point 's2' is compared at 12x12, which gives 4.*Hint:"):
        objective(output, {**heads, "s2": torch.zeros(2, 3, 12, 12)}, {}, torch.zeros(2, 16, 16, dtype=torch.long))
    # A head at the output's size is compared at the target's: a small target is refused too.
    with pytest.raises(InstrumentError, match="head of point 's1' is compared at 8x8"):
        objective(output, heads, {}, torch.zeros(2, 8, 8, dtype=torch.long))


def _region_objective(model: torch.nn.Module, size: tuple[int, ...]) -> tuple[object, IMacHSR]:
    selection = inspect(model, input_size=size, points=2)
    names = [p.name for p in selection.points]
    return selection, IMacHSR(names, {p.name: p.layout for p in selection.points}, mi_estimator="region")


def test_instrument_refuses_a_point_whose_own_grid_is_too_small_naming_it() -> None:
    net = ToyUNet()
    selection, objective = _region_objective(net, (3, 16, 16))
    small = [p for p in selection.points if tuple(p.shape[2:]) == (8, 8)]
    assert small, [p.shape for p in selection.points]
    with pytest.raises(InstrumentError, match=f"head of point '{small[0].name}' is compared at 8x8.*Hint:"):
        instrument(net, selection, loss=objective, loss_options=LossOptions(label_resolution="downsample"))
    # At the output's resolution the same points are compared at the target's size, checked per batch.
    probed = instrument(net, selection, loss=objective)
    out = probed(torch.randn(2, 3, 16, 16))
    total, parts = probed.loss(out, _blocks(2, 16, 2, seed=11))
    total.backward()
    assert sorted(parts) == ["ce", *sorted(f"rmi/{p.name}" for p in selection.points)]
    assert all(torch.isfinite(p.grad).all() for p in probed.parameters() if p.grad is not None)


def test_instrument_refuses_region_for_a_vector_output() -> None:
    net = ToyTransformer(MHAAttention)
    _, objective = _region_objective(net, (3, 16, 16))
    with pytest.raises(InstrumentError, match=r"needs 2-D dense logits \(B, K, H, W\); the head of point"):
        instrument(net, input_size=(3, 16, 16), loss=objective)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rmi_on_the_gpu_equals_the_cpu_value() -> None:
    labels = _blocks(2, 30, 4, seed=12)
    logits = torch.randn(2, 4, 30, 30, generator=torch.Generator().manual_seed(13))
    cpu = MutualInformationLoss(estimator="region")(logits, labels)
    gpu_logits = logits.cuda().requires_grad_(True)
    gpu = MutualInformationLoss(estimator="region")(gpu_logits, labels.cuda())
    gpu.backward()
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert float(gpu) == pytest.approx(float(cpu), rel=1e-5, abs=1e-5)
    assert torch.isfinite(gpu_logits.grad).all()


def test_the_readme_example_runs_and_logs_rmi_parts() -> None:
    from _readme import python_block

    scope: dict[str, object] = {}
    exec(compile(python_block("### Region mutual information and conv heads"), "README.md", "exec"), scope)
    parts = scope["parts"]
    assert sorted(parts) == ["ce", *sorted(f"rmi/{name}" for name in scope["layouts"])]  # type: ignore[arg-type]
    assert {tap.adapter_type for tap in scope["probed"].report.taps} == {"ConvDenseAdapter"}  # type: ignore[attr-defined]
