"""Target kinds, ignore_index, resolution matching, 1-D / 3-D shapes and bad input,
each against a hand computation (plain Python loops over tiny tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autoprobe.errors import InstrumentError
from autoprobe.losses import (
    DKS,
    DSN,
    CorrelationLoss,
    DKSLoss,
    DSNLoss,
    IMacHSR,
    LossOptions,
    MutualInformationLoss,
    OutputCrossEntropy,
    OutputLoss,
    TargetMatcher,
    make_objective,
    resize_logits,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- reference math


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def rows(logits: torch.Tensor) -> list[list[float]]:
    """(B, K, *S) logits as per-position rows, image-major."""
    return logits.movedim(1, -1).reshape(-1, logits.shape[1]).tolist()


def hand_ce(logits: torch.Tensor, labels: torch.Tensor, ignore: int) -> float:
    terms = [-math.log(softmax(r)[y]) for r, y in zip(rows(logits), labels.flatten().tolist()) if y != ignore]
    return sum(terms) / len(terms)


def hand_bce(x: float, t: float) -> float:
    return -(t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))


def hand_mi(probs: list[list[float]], labels: list[list[float]]) -> float:
    """I from per-sample predicted distributions and (soft) label distributions."""
    kp, kl, n = len(probs[0]), len(labels[0]), len(probs)
    joint = [[sum(p[i] * e[j] for p, e in zip(probs, labels)) / n for j in range(kl)] for i in range(kp)]
    pred = [sum(joint[i]) for i in range(kp)]
    true = [sum(joint[i][j] for i in range(kp)) for j in range(kl)]
    return sum(
        joint[i][j] * (math.log(joint[i][j]) - math.log(pred[i]) - math.log(true[j]))
        for i in range(kp)
        for j in range(kl)
        if joint[i][j] > 0
    )


def hand_kl(q: list[float], p: list[float]) -> float:
    return sum(qc * (math.log(qc) - math.log(pc)) for qc, pc in zip(q, p))


def hand_pearson(h: list[float], y: list[float]) -> float:
    mh, my = sum(h) / len(h), sum(y) / len(y)
    cov = sum((a - mh) * (b - my) for a, b in zip(h, y))
    return cov / math.sqrt(sum((a - mh) ** 2 for a in h) * sum((b - my) ** 2 for b in y))


def value(tensor: torch.Tensor) -> float:
    return float(tensor.item())


def randn(*shape: int, seed: int = 0, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


# --------------------------------------------------------------------------- ignore_index = 255


MASK_255 = torch.tensor([[[0, 255, 2], [1, 255, 1]], [[2, 2, 255], [0, 1, 2]]], dtype=torch.uint8)


def test_cross_entropy_ignores_255_in_uint8_masks() -> None:
    logits = randn(2, 3, 2, 3, seed=1)
    expected = hand_ce(logits, MASK_255.long(), 255)
    assert value(OutputCrossEntropy(ignore_index=255)(logits, MASK_255)) == pytest.approx(expected, rel=1e-6)
    objective = DSN([], ignore_index=255)
    assert value(objective(logits, {}, {}, MASK_255).total) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(InstrumentError, match="label value 255 does not fit"):
        OutputCrossEntropy()(logits, MASK_255)  # the default -100 does not ignore 255


def test_mi_leaves_255_out_of_the_joint() -> None:
    logits = randn(2, 3, 2, 3, seed=2)
    per_image = []
    for b in range(2):
        kept = [(h, w) for h in range(2) for w in range(3) if int(MASK_255[b, h, w]) != 255]
        probs = [softmax(logits[b, :, h, w].tolist()) for h, w in kept]
        labels = [[1.0 if j == int(MASK_255[b, h, w]) else 0.0 for j in range(3)] for h, w in kept]
        per_image.append(hand_mi(probs, labels))
    got = MutualInformationLoss(ignore_index=255)(logits, MASK_255)
    assert value(got) == pytest.approx(-sum(per_image) / 2, rel=1e-5)


def test_dsn_and_dks_leave_255_out() -> None:
    output, head = randn(2, 3, 2, 3, seed=3), randn(2, 3, 2, 3, seed=4)
    assert value(DSNLoss(ignore_index=255)({"a": head}, MASK_255)["a"]) == pytest.approx(
        hand_ce(head, MASK_255.long(), 255), rel=1e-6
    )
    kept = [i for i, y in enumerate(MASK_255.flatten().tolist()) if y != 255]
    ra, rb = rows(output), rows(head)
    kl = [hand_kl(softmax(rb[i]), softmax(ra[i])) + hand_kl(softmax(ra[i]), softmax(rb[i])) for i in kept]
    synergy = sum(kl) / len(kept) / 2
    assert value(DKSLoss(ignore_index=255)([output, head], MASK_255)) == pytest.approx(synergy, rel=1e-5)
    result = DKS(["a"], ignore_index=255)(output, {"a": head}, {}, MASK_255)
    assert value(result.parts["dks"]) == pytest.approx(synergy, rel=1e-5)


# --------------------------------------------------------------------------- resolution matching


def test_output_logits_are_linearly_upsampled_to_the_mask() -> None:
    # L = 2 -> 4, align_corners=False: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
    logits = torch.tensor([[[1.0, -1.0], [0.0, 2.0]]])  # (B, K, L) = (1, 2, 2)
    up = [[x0, 0.75 * x0 + 0.25 * x1, 0.25 * x0 + 0.75 * x1, x1] for x0, x1 in logits[0].tolist()]
    labels = torch.tensor([[0, 1, 255, 1]])
    terms = [-math.log(softmax([up[0][i], up[1][i]])[y]) for i, y in enumerate(labels[0].tolist()) if y != 255]
    expected = sum(terms) / len(terms)
    assert value(OutputCrossEntropy(ignore_index=255)(logits, labels)) == pytest.approx(expected, rel=1e-6)
    objective = make_objective("dsn", [], ignore_index=255)
    assert value(objective(logits, {}, {}, labels).parts["ce"]) == pytest.approx(expected, rel=1e-6)


def test_mask_is_downsampled_to_a_head_with_nearest_exact_keeping_255() -> None:
    mask = torch.tensor([[[0, 1, 2, 255], [1, 255, 0, 2], [2, 2, 1, 1], [0, 0, 255, 1]]])  # (1, 4, 4)
    # nearest-exact 4 -> 2 samples rows and columns 1 and 3.
    coarse = torch.tensor([[[255, 2], [0, 1]]])
    matched = TargetMatcher(mask, "multiclass", rank=4, ignore_index=255).at((2, 2))
    assert matched.values.tolist() == [[[0, 2], [0, 1]]]  # the ignored position holds 0 ...
    assert matched.weight.tolist() == [[[0.0, 1.0], [1.0, 1.0]]]  # ... and weighs nothing  # type: ignore[union-attr]
    head = randn(1, 3, 2, 2, seed=5)
    expected = hand_ce(head, coarse, 255)
    assert value(DSNLoss(ignore_index=255)({"a": head}, mask)["a"]) == pytest.approx(expected, rel=1e-6)
    output = randn(1, 3, 4, 4, seed=6)
    result = DSN(["a"], ignore_index=255, alpha=1.0)(output, {"a": head}, {}, mask)
    assert value(result.parts["dsn/a"]) == pytest.approx(expected, rel=1e-6)
    assert value(result.parts["ce"]) == pytest.approx(hand_ce(output, mask, 255), rel=1e-6)


@pytest.mark.parametrize(("n_in", "n_out"), [(4, 2), (7, 3), (5, 8), (224, 56), (13, 13), (3, 10)])
def test_nearest_exact_matches_torch_interpolate(n_in: int, n_out: int) -> None:
    labels = torch.randint(0, 5, (2, n_in, n_in + 1), generator=torch.Generator().manual_seed(n_in))
    got = TargetMatcher(labels, "multiclass", rank=4, ignore_index=-100).at((n_out, n_out + 2)).values
    reference = F.interpolate(labels[:, None].float(), size=(n_out, n_out + 2), mode="nearest-exact")[:, 0].long()
    assert torch.equal(got, reference)


def test_a_head_at_the_output_size_is_upsampled_like_the_output() -> None:
    # The SegFormer case: output and one head at 1/2 of the mask, another head at 1/4.
    mask = torch.randint(0, 3, (1, 4, 4), generator=torch.Generator().manual_seed(7))
    output, same, small = randn(1, 3, 2, 2, seed=8), randn(1, 3, 2, 2, seed=9), randn(1, 3, 1, 1, seed=10)
    result = DSN(["same", "small"])(output, {"same": same, "small": small}, {}, mask)
    up = F.interpolate(same, size=(4, 4), mode="bilinear", align_corners=False)
    assert value(result.parts["dsn/same"]) == pytest.approx(hand_ce(up, mask, -100), rel=1e-6)
    nearest = mask[:, 2:3, 2:3]  # 4 -> 1 samples index floor(0.5 * 4) = 2
    assert value(result.parts["dsn/small"]) == pytest.approx(hand_ce(small, nearest, -100), rel=1e-6)


def test_binary_mask_is_area_downsampled_with_ignored_pixels_weighted_out() -> None:
    mask = torch.tensor([[[1, 255, 0, 1]]], dtype=torch.uint8)  # (B, H, W) = (1, 1, 4)
    matched = TargetMatcher(mask, "binary", rank=4, ignore_index=255).at((1, 2))
    # coarse 0 covers {1, ignored}: target 1, weight 1/2; coarse 1 covers {0, 1}: target 1/2, weight 1.
    assert matched.values.flatten().tolist() == [1.0, 0.5]
    assert matched.weight.flatten().tolist() == [0.5, 1.0]  # type: ignore[union-attr]
    head = torch.tensor([[[[0.5, -2.0]]]])
    expected = (0.5 * hand_bce(0.5, 1.0) + 1.0 * hand_bce(-2.0, 0.5)) / 1.5
    got = DSNLoss(ignore_index=255, target_kind="binary")({"a": head}, mask)["a"]
    assert value(got) == pytest.approx(expected, rel=1e-6)


def test_regression_target_is_area_downsampled_and_logits_bilinearly_upsampled() -> None:
    flow = torch.tensor([[[0.0, 2.0, 4.0, 6.0]]])  # (B, C, L)
    head = torch.tensor([[[1.5, 4.0]]])  # compared with [1, 5]
    assert value(DSNLoss(target_kind="regression")({"a": head}, flow)["a"]) == pytest.approx((0.25 + 1.0) / 2)
    l1 = DSNLoss(target_kind="regression", regression_loss="l1")({"a": head}, flow)["a"]
    assert value(l1) == pytest.approx((0.5 + 1.0) / 2)
    up = [1.5, 0.75 * 1.5 + 0.25 * 4.0, 0.25 * 1.5 + 0.75 * 4.0, 4.0]  # the output resized to L = 4
    expected = sum((u - f) ** 2 for u, f in zip(up, flow.flatten().tolist())) / 4
    assert value(OutputLoss("regression")(head, flow)) == pytest.approx(expected, rel=1e-6)


def test_resize_logits_is_identity_at_the_same_size() -> None:
    logits = randn(1, 2, 3, 3)
    assert resize_logits(logits, (3, 3)) is logits


# --------------------------------------------------------------------------- binary and multi-label


def test_binary_bce_by_hand_in_both_mask_shapes_and_with_255() -> None:
    logits = torch.tensor([[[[0.3, -1.2], [2.0, 0.0]]]])  # (1, 1, 2, 2)
    mask = torch.tensor([[[1, 0], [255, 1]]])
    expected = (hand_bce(0.3, 1) + hand_bce(-1.2, 0) + hand_bce(0.0, 1)) / 3
    loss = OutputLoss("binary", ignore_index=255)
    assert value(loss(logits, mask)) == pytest.approx(expected, rel=1e-6)
    assert value(loss(logits, mask[:, None].float())) == pytest.approx(expected, rel=1e-6)
    classification = OutputLoss("binary")(torch.tensor([[0.3], [-1.2]]), torch.tensor([True, False]))
    assert value(classification) == pytest.approx((hand_bce(0.3, 1) + hand_bce(-1.2, 0)) / 2, rel=1e-6)


def test_binary_mi_is_the_two_outcome_mi_per_image() -> None:
    logits = randn(2, 1, 2, 3, seed=11).double()  # MI is small here: float64 keeps 1e-5 relative
    mask = torch.tensor([[[1, 0, 1], [0, 255, 1]], [[0, 0, 1], [1, 1, 0]]])
    per_image = []
    for b in range(2):
        kept = [(h, w) for h in range(2) for w in range(3) if int(mask[b, h, w]) != 255]
        probs = [[1 - sigmoid(float(logits[b, 0, h, w])), sigmoid(float(logits[b, 0, h, w]))] for h, w in kept]
        labels = [[1.0 - int(mask[b, h, w]), float(mask[b, h, w])] for h, w in kept]
        per_image.append(hand_mi(probs, labels))
    got = MutualInformationLoss(ignore_index=255, target_kind="binary")(logits, mask)
    assert value(got) == pytest.approx(-sum(per_image) / 2, rel=1e-5)
    perfect = MutualInformationLoss(target_kind="binary")(torch.tensor([[50.0], [-50.0]]), torch.tensor([1, 0]))
    assert value(perfect) == pytest.approx(-math.log(2), abs=1e-6)


def test_multilabel_bce_and_mi_are_per_label() -> None:
    logits = randn(4, 2, seed=12)  # (B, K) multi-label classification
    target = torch.tensor([[1, 0], [1, 1], [0, -100], [0, 1]])
    pairs = [(float(logits[b, k]), int(target[b, k])) for b in range(4) for k in range(2) if int(target[b, k]) != -100]
    expected_bce = sum(hand_bce(x, t) for x, t in pairs) / len(pairs)
    assert value(OutputLoss("multilabel")(logits, target)) == pytest.approx(expected_bce, rel=1e-6)
    per_label = []
    for k in range(2):  # one group per label, over the batch
        kept = [b for b in range(4) if int(target[b, k]) != -100]
        probs = [[1 - sigmoid(float(logits[b, k])), sigmoid(float(logits[b, k]))] for b in kept]
        labels = [[1.0 - int(target[b, k]), float(target[b, k])] for b in kept]
        per_label.append(hand_mi(probs, labels))
    got = MutualInformationLoss(target_kind="multilabel")(logits, target)
    assert value(got) == pytest.approx(-sum(per_label) / 2, rel=1e-5)


def test_dks_on_binary_branches_is_the_bernoulli_kl() -> None:
    a, b = torch.tensor([[[0.5, -1.0, 2.0]]]), torch.tensor([[[-0.5, 1.0, 0.0]]])  # (B, 1, L)
    mask = torch.tensor([[1, 255, 0]])
    t = 2.0

    def bern(x: float) -> list[float]:
        return [1 - sigmoid(x / t), sigmoid(x / t)]

    kept = [0, 2]
    qa, qb = [bern(float(v)) for v in a.flatten()], [bern(float(v)) for v in b.flatten()]
    kl = [hand_kl(qb[i], qa[i]) + hand_kl(qa[i], qb[i]) for i in kept]
    expected = t * t * (sum(kl) / len(kept)) / 2
    got = DKSLoss(temperature=t, ignore_index=255, target_kind="binary")([a, b], mask)
    assert value(got) == pytest.approx(expected, rel=1e-5)


def test_binary_objectives_have_parts_and_gradients() -> None:
    output, head = randn(2, 1, 4, 4, seed=13, grad=True), randn(2, 1, 2, 2, seed=14, grad=True)
    mask = (randn(2, 4, 4, seed=15) > 0).to(torch.uint8)
    mask[0, 0, 0] = 255
    feature = randn(2, 6, 2, 2, seed=16)
    for name in ("imachsr", "dsn", "dks"):
        layouts = {"p": "NCHW"} if name == "imachsr" else None
        objective = make_objective(
            name, ["p"], layouts, target_kind="binary", ignore_index=255  # type: ignore[arg-type]
        )
        result = objective(output, {"p": head}, {"p": feature}, mask)
        assert "ce" in result.parts and torch.isfinite(result.total)
        output.grad = head.grad = None
        result.total.backward()
        assert head.grad is not None and head.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- regression


def test_correlation_loss_by_hand() -> None:
    h = torch.tensor([[[1.0, 2.0, 4.0], [0.0, 0.0, 1.0]], [[3.0, 1.0, 2.0], [5.0, 5.0, 5.0]]])  # (B, C, L)
    y = torch.tensor([[[1.0, 3.0, 2.0], [2.0, 2.0, 2.0]], [[0.0, 1.0, 5.0], [1.0, 2.0, 3.0]]])
    # Group (0, 1) has a constant target and is left out; group (1, 1) has a constant head: r = 0.
    groups = [(0, 0), (1, 0), (1, 1)]
    rs = [hand_pearson(h[b, c].tolist(), y[b, c].tolist()) if (b, c) != (1, 1) else 0.0 for b, c in groups]
    expected = sum(1 - r for r in rs) / 3
    assert value(CorrelationLoss()(h, y)) == pytest.approx(expected, rel=1e-6)
    assert value(CorrelationLoss()(-2 * y + 1, y)) == pytest.approx(2.0, abs=1e-6)  # anti-correlated
    # (B, C) targets: one group per channel, over the batch.
    flat_h = torch.tensor([[1.0, 0.0], [2.0, 1.0], [4.0, 3.0]])
    flat_y = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])
    rs = [hand_pearson(flat_h[:, c].tolist(), flat_y[:, c].tolist()) for c in range(2)]
    assert value(CorrelationLoss()(flat_h, flat_y)) == pytest.approx(sum(1 - r for r in rs) / 2, rel=1e-6)


def test_regression_objectives_by_hand() -> None:
    flow = randn(2, 2, 4, 4, seed=17)
    output, head = randn(2, 2, 4, 4, seed=18, grad=True), randn(2, 2, 2, 2, seed=19, grad=True)
    feature = randn(2, 3, 2, 2, seed=20)
    pooled = F.avg_pool2d(flow, 2)  # 4 -> 2 is an exact 2x2 area mean
    mse = value(((output - flow) ** 2).mean())
    dsn_objective = make_objective("dsn", ["p"], target_kind="regression", options=LossOptions(alpha=0.5))
    dsn = dsn_objective(output, {"p": head}, {}, flow)
    assert sorted(dsn.parts) == ["dsn/p", "mse"]
    assert value(dsn.parts["mse"]) == pytest.approx(mse, rel=1e-6)
    assert value(dsn.parts["dsn/p"]) == pytest.approx(value(((head - pooled) ** 2).mean()), rel=1e-6)
    imachsr = make_objective("imachsr", ["p"], {"p": "NCHW"}, target_kind="regression",
                             options=LossOptions(regression_loss="l1", lam=0.01))
    result = imachsr(output, {"p": head}, {"p": feature}, flow)
    assert sorted(result.parts) == ["corr/p", "l1", "ne/p"]
    assert value(result.parts["l1"]) == pytest.approx(value((output - flow).abs().mean()), rel=1e-6)
    groups = [(b, c) for b in range(2) for c in range(2)]
    rs = [hand_pearson(head[b, c].flatten().tolist(), pooled[b, c].flatten().tolist()) for b, c in groups]
    assert value(result.parts["corr/p"]) == pytest.approx(sum(1 - r for r in rs) / 4, rel=1e-5)
    result.total.backward()
    assert head.grad is not None and torch.isfinite(head.grad).all() and head.grad.abs().sum() > 0


# --------------------------------------------------------------------------- 1-D and 3-D


@pytest.mark.parametrize("spatial", [(5,), (2, 3, 2)])
def test_every_objective_runs_in_1d_and_3d(spatial: tuple[int, ...]) -> None:
    layout = {1: "NCL", 3: "NCDHW"}[len(spatial)]
    output = randn(2, 3, *spatial, seed=21, grad=True)
    head_small = randn(2, 3, *(max(1, s // 2) for s in spatial), seed=22, grad=True)
    feature = randn(2, 4, *spatial, seed=23)
    labels = torch.randint(0, 3, (2, *(2 * s for s in spatial)), generator=torch.Generator().manual_seed(24))
    labels.view(-1)[0] = 255
    up = resize_logits(output, tuple(labels.shape[1:]))
    mode = {1: "linear", 3: "trilinear"}[len(spatial)]
    torch.testing.assert_close(up, F.interpolate(output, size=labels.shape[1:], mode=mode, align_corners=False))
    for name in ("imachsr", "dsn", "dks"):
        layouts = {"p": layout} if name == "imachsr" else None
        objective = make_objective(name, ["p"], layouts, ignore_index=255)  # type: ignore[arg-type]
        result = objective(output, {"p": head_small}, {"p": feature}, labels)
        assert value(result.parts["ce"]) == pytest.approx(hand_ce(up, labels, 255), rel=1e-5), name
        head_small.grad = None
        result.total.backward()
        assert head_small.grad is not None and head_small.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- bad input


def test_a_regression_target_for_a_classification_objective_says_what_to_pass() -> None:
    output, flow = randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=1)
    with pytest.raises(InstrumentError, match=r"a regression target.*pass task='regression' to instrument"):
        DSN([])(output, {}, {}, flow)


def test_class_ids_for_a_regression_objective_say_what_to_pass() -> None:
    with pytest.raises(InstrumentError, match=r"must be floating point.*pass task='classification'"):
        DSN([], target_kind="regression")(randn(2, 3, 4, 4), {}, {}, torch.zeros(2, 3, 4, 4, dtype=torch.long))


def test_kind_and_channel_mismatches_say_what_to_pass() -> None:
    with pytest.raises(InstrumentError, match=r"K=1 channel.*task='binary'"):
        OutputLoss()(randn(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(InstrumentError, match=r"K=3 channels; a binary target needs one logit.*task='multilabel'"):
        OutputLoss("binary")(randn(2, 3, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(InstrumentError, match=r"target value 2 does not fit.*task='classification'"):
        OutputLoss("binary", ignore_index=255)(randn(2, 1, 4), torch.tensor([[0, 1, 2, 255], [0, 0, 0, 0]]))
    with pytest.raises(InstrumentError, match=r"regression target has shape \(B, C, L\) with B=2 and C=3"):
        OutputLoss("regression")(randn(2, 3, 4), randn(2, 2, 4))
    with pytest.raises(InstrumentError, match="non-finite"):
        OutputLoss("regression")(randn(1, 1, 2), torch.tensor([[[0.0, float("nan")]]]))


def test_a_target_of_another_rank_names_both_shapes() -> None:
    match = r"labels of shape \(2, 4, 4, 4\) do not fit the dense task: output has shape \(2, 3, 4, 4\).*\(2, H, W\)"
    with pytest.raises(InstrumentError, match=match):
        DSN([])(randn(2, 3, 4, 4), {}, {}, torch.zeros(2, 4, 4, 4, dtype=torch.long))
    one_hot = r"must have shape \(2,\).*one-hot or soft labels: pass `target.argmax\(1\)`"
    with pytest.raises(InstrumentError, match=one_hot):
        DSN([])(randn(2, 5), {}, {}, F.one_hot(torch.tensor([0, 1]), 5))
    binary = r"target of shape \(2, 4\) does not fit output of shape \(2, 1, 4, 4\); a binary target has shape "
    binary += r"\(B, H, W\)"
    with pytest.raises(InstrumentError, match=binary):
        DSN([], target_kind="binary")(randn(2, 1, 4, 4), {}, {}, torch.zeros(2, 4))
    with pytest.raises(InstrumentError, match=r"head of point 'p' has shape \(2, 3, 4\)"):
        DSN(["p"])(randn(2, 3, 4, 4), {"p": randn(2, 3, 4)}, {}, torch.zeros(2, 4, 4, dtype=torch.long))


def test_dks_refuses_regression_and_l1_needs_regression() -> None:
    with pytest.raises(InstrumentError, match=r"use loss='dsn'.*or loss='imachsr'"):
        make_objective("dks", ["p"], target_kind="regression")
    with pytest.raises(InstrumentError, match=r"use loss='dsn'"):
        DKS(["p"], target_kind="regression")
    with pytest.raises(InstrumentError, match=r"use loss='dsn'"):
        DKSLoss(target_kind="regression")
    with pytest.raises(InstrumentError, match=r"regression_loss='l1' applies to regression targets"):
        make_objective("dsn", ["p"], options=LossOptions(regression_loss="l1"))
    with pytest.raises(InstrumentError, match="unknown target_kind 'mask'"):
        make_objective("dsn", ["p"], target_kind="mask")  # type: ignore[arg-type]
    with pytest.raises(InstrumentError, match="CorrelationLoss"):
        MutualInformationLoss(target_kind="regression")
    with pytest.raises(InstrumentError, match="no known layout"):
        IMacHSR(["p"], {"p": None})  # type: ignore[dict-item]


def test_binary_objective_compiles_without_graph_breaks() -> None:
    output, head = randn(2, 1, 4, 4, seed=25), randn(2, 1, 2, 2, seed=26)
    mask = (randn(2, 8, 8, seed=27) > 0).to(torch.uint8)
    objective = DKS(["p"], target_kind="binary", ignore_index=255)
    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    got = compiled(output, {"p": head}, {}, mask)
    assert value(got.total) == pytest.approx(value(objective(output, {"p": head}, {}, mask).total), rel=1e-6)


@pytest.mark.parametrize("kind", ["binary", "multilabel", "regression"])
def test_new_kinds_are_float32_under_autocast(kind: str) -> None:
    channels = 1 if kind == "binary" else 2
    output, head = randn(2, channels, 4, 4, seed=28).bfloat16(), randn(2, channels, 2, 2, seed=29).bfloat16()
    feature = randn(2, 3, 2, 2, seed=30).bfloat16()
    target = randn(2, channels, 8, 8, seed=31)
    if kind != "regression":
        target = (target > 0).float()
    objective = make_objective("imachsr", ["p"], {"p": "NCHW"}, target_kind=kind)  # type: ignore[arg-type]
    eager = objective(output, {"p": head}, {"p": feature}, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = objective(output, {"p": head}, {"p": feature}, target)
    assert autocast.total.dtype == torch.float32
    assert value(autocast.total) == pytest.approx(value(eager.total), rel=1e-6)
