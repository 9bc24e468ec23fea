"""Objectives against hand computations: every expected value is built from plain
Python loops over tiny tensors, never by calling the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from autoprobe.errors import InstrumentError
from autoprobe.layout import Layout
from autoprobe.losses import (
    DKS,
    DSN,
    DKSLoss,
    DSNLoss,
    IMacHSR,
    LossOptions,
    MutualInformationLoss,
    NegativeEntropyLoss,
    OutputCrossEntropy,
    channel_dim_for,
    make_objective,
    schedule_weight,
)

torch.set_num_threads(1)


# --------------------------------------------------------------------------- reference math


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def rows(logits: torch.Tensor) -> list[list[float]]:
    """(B, K) or (B, K, H, W) logits as a list of per-sample / per-pixel rows, image-major."""
    if logits.dim() == 2:
        return logits.tolist()
    return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).tolist()


def hand_ce(logits: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> float:
    terms = [-math.log(softmax(r)[y]) for r, y in zip(rows(logits), labels.flatten().tolist()) if y != ignore]
    return sum(terms) / len(terms)


def hand_mi(probs: list[list[float]], labels: list[int], k: int) -> float:
    joint = [[0.0] * k for _ in range(k)]
    for p, y in zip(probs, labels):
        for i in range(k):
            joint[i][y] += p[i] / len(labels)
    pred = [sum(joint[i]) for i in range(k)]
    true = [sum(joint[i][j] for i in range(k)) for j in range(k)]
    return sum(
        joint[i][j] * (math.log(joint[i][j]) - math.log(pred[i]) - math.log(true[j]))
        for i in range(k)
        for j in range(k)
        if joint[i][j] > 0
    )


def hand_ne(z_rows: list[list[float]]) -> float:
    return sum(sum(p * math.log(p) for p in softmax(r)) for r in z_rows) / len(z_rows)


def hand_kl(target_row: list[float], row: list[float], t: float) -> float:
    q, p = softmax([v / t for v in target_row]), softmax([v / t for v in row])
    return sum(qc * (math.log(qc) - math.log(pc)) for qc, pc in zip(q, p))


def hand_synergy(branches: list[torch.Tensor], t: float) -> float:
    total, pairs = 0.0, 0
    for a, branch_a in enumerate(branches):
        for b, branch_b in enumerate(branches):
            if a != b:
                kls = [hand_kl(rb, ra, t) for ra, rb in zip(rows(branch_a), rows(branch_b))]
                total += sum(kls) / len(kls)
                pairs += 1
    return t * t * total / pairs


def value(tensor: torch.Tensor) -> float:
    return float(tensor.item())


# --------------------------------------------------------------------------- cross entropy


def test_cross_entropy_classification_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]])
    labels = torch.tensor([1, 2, 0])
    assert value(OutputCrossEntropy()(logits, labels)) == pytest.approx(hand_ce(logits, labels), rel=1e-6)


def test_cross_entropy_dense_ignores_pixels_by_hand() -> None:
    logits = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[[0, 1], [2, -100]], [[1, 1], [-100, 0]]])
    expected = hand_ce(logits, labels)
    assert value(OutputCrossEntropy()(logits, labels)) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_with_every_label_ignored_is_zero_not_nan() -> None:
    logits = torch.randn(2, 3, requires_grad=True)
    loss = OutputCrossEntropy(ignore_index=255)(logits, torch.tensor([255, 255]))
    assert value(loss) == 0.0
    loss.backward()  # still part of the graph


# --------------------------------------------------------------------------- mutual information


def test_mi_perfect_balanced_binary_prediction_is_minus_log_2() -> None:
    labels = torch.tensor([0, 1, 1, 0])
    logits = 50.0 * torch.nn.functional.one_hot(labels, 2).float()
    # Joint is diag(1/2, 1/2): I = 2 * 1/2 * (log 1/2 - 2 log 1/2) = log 2.
    assert value(MutualInformationLoss()(logits, labels)) == pytest.approx(-math.log(2), abs=1e-6)


def test_mi_independent_prediction_is_zero() -> None:
    labels = torch.tensor([0, 1, 1, 0, 2, 1])
    logits = torch.tensor([[0.3, -1.0, 2.0]]).repeat(6, 1)  # the same belief whatever the label
    assert value(MutualInformationLoss()(logits, labels)) == pytest.approx(0.0, abs=1e-6)


def test_mi_classification_by_hand() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.9, 0.1], [-0.5, 0.5, 2.0], [1.5, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1, 2, 0, -100])
    kept = [(r, y) for r, y in zip(logits.tolist(), labels.tolist()) if y != -100]
    expected = hand_mi([softmax(r) for r, _ in kept], [y for _, y in kept], 3)
    assert value(MutualInformationLoss()(logits, labels)) == pytest.approx(-expected, rel=1e-5)


def test_mi_dense_is_image_wise_and_skips_fully_ignored_images() -> None:
    logits = torch.randn(3, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor(
        [[[0, 1, 2], [1, 1, -100]], [[2, 2, 0], [0, 1, 2]], [[-100, -100, -100], [-100, -100, -100]]]
    )
    per_image = []
    for b in range(2):  # image 2 has no valid pixel and carries no estimate
        pixels = [(softmax(logits[b, :, h, w].tolist()), int(labels[b, h, w])) for h in range(2) for w in range(3)]
        pixels = [(p, y) for p, y in pixels if y != -100]
        per_image.append(hand_mi([p for p, _ in pixels], [y for _, y in pixels], 3))
    expected = sum(per_image) / 2
    assert value(MutualInformationLoss()(logits, labels)) == pytest.approx(-expected, rel=1e-5)


def test_mi_stays_in_its_range_and_has_gradients() -> None:
    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    labels = torch.arange(64) % 4
    loss = MutualInformationLoss()(logits, labels)
    assert -math.log(4) <= value(loss) <= 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_mi_survives_saturated_softmax() -> None:
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    loss = MutualInformationLoss()(logits, torch.tensor([0, 0]))  # one label only: no information
    assert value(loss) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()  # type: ignore[arg-type]


# --------------------------------------------------------------------------- negative entropy


def test_negative_entropy_uniform_is_minus_log_c() -> None:
    assert value(NegativeEntropyLoss()(torch.zeros(2, 8, 3, 3))) == pytest.approx(-math.log(8), rel=1e-6)


def test_negative_entropy_peaked_is_about_zero() -> None:
    z = torch.zeros(2, 8, 3, 3)
    z[:, 0] = 100.0
    assert value(NegativeEntropyLoss()(z)) == pytest.approx(0.0, abs=1e-6)


def test_negative_entropy_by_hand_in_both_layouts() -> None:
    z = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(3))
    expected = hand_ne(rows(z))
    assert value(NegativeEntropyLoss.for_layout("NCHW")(z)) == pytest.approx(expected, rel=1e-6)
    assert value(NegativeEntropyLoss.for_layout("NHWC")(z.permute(0, 2, 3, 1))) == pytest.approx(expected, rel=1e-6)
    tokens = z.flatten(2).transpose(1, 2)
    assert value(NegativeEntropyLoss(channel_dim=channel_dim_for("NLC"))(tokens)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("layout", "dim"),
    [("NC", 1), ("NCL", 1), ("NCHW", 1), ("NCDHW", 1), ("NLC", 2), ("NHWC", 3), ("NDHWC", 4), (Layout.NHWC, 3)],
)
def test_channel_dim_for(layout: str, dim: int) -> None:
    assert channel_dim_for(layout) == dim


# --------------------------------------------------------------------------- DSN, DKS


def test_dsn_loss_is_ce_at_every_head() -> None:
    labels = torch.tensor([2, 0])
    heads = {
        "a": torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 0.0]]),
        "b": torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    }
    losses = DSNLoss()(heads, labels)
    for name, logits in heads.items():
        assert value(losses[name]) == pytest.approx(hand_ce(logits, labels), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dks_synergy_is_mean_pairwise_kl_by_hand(temperature: float) -> None:
    g = torch.Generator().manual_seed(4)
    branches = [torch.randn(3, 4, generator=g) for _ in range(3)]
    expected = hand_synergy(branches, temperature)
    assert value(DKSLoss(temperature)(branches)) == pytest.approx(expected, rel=1e-5)


def test_dks_synergy_dense_ignores_pixels_by_hand() -> None:
    g = torch.Generator().manual_seed(5)
    branches = [torch.randn(1, 3, 1, 3, generator=g) for _ in range(2)]
    labels = torch.tensor([[[0, -100, 2]]])
    kept = [branch[..., [0, 2]] for branch in branches]  # the pixels whose label counts
    assert value(DKSLoss()(branches, labels)) == pytest.approx(hand_synergy(kept, 1.0), rel=1e-5)


def test_dks_synergy_detaches_the_target_side() -> None:
    # With two branches only the "a" side of each KL carries gradient, so
    # d loss / d logits_a = T^2 / 2 * (1/N) * (q_a - q_b) / T.
    t = 2.0
    a = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]], requires_grad=True)
    DKSLoss(t)([a, b]).backward()
    for n in range(2):
        q_a, q_b = softmax([v / t for v in a[n].tolist()]), softmax([v / t for v in b[n].tolist()])
        expected = [t / 2 / 2 * (x - y) for x, y in zip(q_a, q_b)]
        assert a.grad[n].tolist() == pytest.approx(expected, abs=1e-6)  # type: ignore[index]


# --------------------------------------------------------------------------- objectives

POINTS = ["layer1", "layer2.0"]
LAYOUTS = {"layer1": "NCHW", "layer2.0": "NLC"}


def _dense_batch(seed: int = 6) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    output = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    heads = {p: torch.randn(2, 3, 4, 4, generator=g, requires_grad=True) for p in POINTS}
    features = {"layer1": torch.randn(2, 5, 2, 2, generator=g), "layer2.0": torch.randn(2, 4, 6, generator=g)}
    labels = torch.randint(0, 3, (2, 4, 4), generator=g)
    labels[0, 0, 0] = -100
    return output, heads, features, labels


def test_imachsr_total_is_the_weighted_sum_of_its_parts() -> None:
    output, heads, features, labels = _dense_batch()
    alpha, lam = {"layer1": 0.5, "layer2.0": 0.25}, 0.1
    result = IMacHSR(POINTS, LAYOUTS, alpha=alpha, lam=lam)(output, heads, features, labels)
    assert sorted(result.parts) == ["ce", "mi/layer1", "mi/layer2.0", "ne/layer1", "ne/layer2.0"]
    parts = result.parts
    expected = parts["ce"] + sum(alpha[p] * parts[f"mi/{p}"] + lam * parts[f"ne/{p}"] for p in POINTS)
    assert value(result.total) == pytest.approx(value(expected), rel=1e-6)
    # The parts are the unweighted terms.
    assert value(result.parts["ce"]) == pytest.approx(hand_ce(output, labels), rel=1e-5)
    mi = MutualInformationLoss()(heads["layer1"], labels)
    assert value(result.parts["mi/layer1"]) == pytest.approx(value(mi), rel=1e-6)
    tokens = features["layer2.0"].reshape(-1, 6).tolist()  # NLC: one row of 6 channels per token
    assert value(result.parts["ne/layer2.0"]) == pytest.approx(hand_ne(tokens), rel=1e-5)
    assert not any(part.requires_grad for part in result.parts.values())
    result.total.backward()
    assert all(h.grad is not None for h in heads.values()) and output.grad is not None


def test_dsn_total_is_ce_plus_weighted_head_ces() -> None:
    output, heads, features, labels = _dense_batch()
    result = DSN(POINTS, alpha=0.3)(output, heads, {}, labels)
    assert sorted(result.parts) == ["ce", "dsn/layer1", "dsn/layer2.0"]
    expected = hand_ce(output, labels) + 0.3 * sum(hand_ce(heads[p], labels) for p in POINTS)
    assert value(result.total) == pytest.approx(expected, rel=1e-5)


def test_dks_total_adds_the_synergy_over_output_and_heads() -> None:
    output, heads, _, _ = _dense_batch()
    labels = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(7))
    result = DKS(POINTS, alpha=0.5, beta=2.0, temperature=1.5)(output, heads, {}, labels)
    assert sorted(result.parts) == ["ce", "dks", "dsn/layer1", "dsn/layer2.0"]
    synergy = hand_synergy([output, *heads.values()], 1.5)
    assert value(result.parts["dks"]) == pytest.approx(synergy, rel=1e-5)
    expected = hand_ce(output, labels) + 0.5 * sum(hand_ce(heads[p], labels) for p in POINTS) + 2.0 * synergy
    assert value(result.total) == pytest.approx(expected, rel=1e-5)


def test_without_points_every_objective_is_the_output_ce() -> None:
    output, _, _, labels = _dense_batch()
    for objective in (IMacHSR([], {}), DSN([]), DKS([])):
        result = objective(output, {}, {}, labels)
        assert list(result.parts) == ["ce"]
        assert value(result.total) == pytest.approx(hand_ce(output, labels), rel=1e-5)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [("constant", [1.0, 1.0, 1.0]), ("linear", [1.0, 0.5, 0.0]), ("cosine", [1.0, 0.5, 0.0])],
)
def test_schedule_values(schedule: str, expected: list[float]) -> None:
    got = [schedule_weight(schedule, progress) for progress in (0.0, 0.5, 1.0)]  # type: ignore[arg-type]
    assert got == pytest.approx(expected, abs=1e-12)
    assert schedule_weight("cosine", 0.25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_schedule_scales_every_intermediate_weight() -> None:
    output, heads, features, labels = _dense_batch()
    objective = IMacHSR(POINTS, LAYOUTS, alpha=0.5, lam=0.1, schedule="linear")
    half = objective(output, heads, features, labels, progress=0.5)
    parts = half.parts
    expected = parts["ce"] + 0.5 * sum(0.5 * parts[f"mi/{p}"] + 0.1 * parts[f"ne/{p}"] for p in POINTS)
    assert value(half.total) == pytest.approx(value(expected), rel=1e-6)
    done = objective(output, heads, features, labels, progress=1.0)
    assert value(done.total) == pytest.approx(value(done.parts["ce"]), rel=1e-6)


def test_classification_objective_and_make_objective() -> None:
    g = torch.Generator().manual_seed(8)
    output, labels = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 3, 1, 0])
    heads = {"s": torch.randn(6, 4, generator=g)}
    objective = make_objective("imachsr", ["s"], {"s": "NLC"}, options=LossOptions(alpha=1.0, lam=0.5))
    assert isinstance(objective, IMacHSR)
    result = objective(output, heads, {"s": torch.randn(6, 5, 8, generator=g)}, labels)
    assert value(result.parts["ce"]) == pytest.approx(hand_ce(output, labels), rel=1e-6)
    assert isinstance(make_objective("dks", ["s"], options=LossOptions(beta=0.5)), DKS)
    assert make_objective("dsn", ["s"]).alpha == {"s": 0.3}


def test_losses_are_float32_under_autocast() -> None:
    output, heads, features, labels = _dense_batch()
    objective = IMacHSR(POINTS, LAYOUTS, lam=0.01)
    half = {p: h.detach().bfloat16() for p, h in heads.items()}
    eager = objective(output.detach().bfloat16(), half, features, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = objective(output.detach().bfloat16(), half, features, labels)
    assert autocast.total.dtype == torch.float32
    assert value(autocast.total) == pytest.approx(value(eager.total), rel=1e-6)


def test_objective_compiles_without_graph_breaks() -> None:
    output, heads, features, labels = _dense_batch()
    objective = DKS(POINTS)
    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    got = compiled(output, heads, features, labels)
    assert value(got.total) == pytest.approx(value(objective(output, heads, features, labels).total), rel=1e-6)


# --------------------------------------------------------------------------- errors


def _imachsr_call(**changes: object) -> None:
    output, heads, features, labels = _dense_batch()
    arguments: dict[str, object] = {"output": output, "heads": heads, "features": features, "target": labels}
    arguments.update(changes)
    IMacHSR(POINTS, LAYOUTS, lam=0.01)(**arguments)  # type: ignore[arg-type]


def _dense_objective_with(schedule: str, *, progress: float | None) -> None:
    output, heads, features, labels = _dense_batch()
    objective = IMacHSR(POINTS, LAYOUTS, schedule=schedule)  # type: ignore[arg-type]
    objective(output, heads, features, labels, progress=progress)


def test_missing_and_extra_heads_and_features_raise() -> None:
    output, heads, features, labels = _dense_batch()
    with pytest.raises(InstrumentError, match=r"heads do not match .* missing \['layer2.0'\]"):
        _imachsr_call(heads={"layer1": heads["layer1"]})
    with pytest.raises(InstrumentError, match=r"unexpected \['layer9'\]"):
        _imachsr_call(heads={**heads, "layer9": heads["layer1"]})
    with pytest.raises(InstrumentError, match=r"features do not match .* missing \['layer1'\]"):
        _imachsr_call(features={"layer2.0": features["layer2.0"]})
    with pytest.raises(InstrumentError, match=r"feature of point 'layer1' has shape \(2, 5, 4\)"):
        _imachsr_call(features={**features, "layer1": torch.randn(2, 5, 4)})


def test_labels_that_do_not_fit_raise() -> None:
    output, heads, _, labels = _dense_batch()
    rank = (
        r"labels of shape \(2, 8\) do not fit the dense task: output has shape \(2, 3, 4, 4\), so labels must "
        r"have shape \(2, 4, 4\) \(integer class ids; any \(2, H, W\) is resized"
    )
    with pytest.raises(InstrumentError, match=rank):
        _imachsr_call(target=torch.zeros(2, 8, dtype=torch.long))
    wrong_channels = r"head of point 'layer1' has shape \(2, 4, 2, 2\); expected \(B, K, \*S\) with B=2, K=3"
    with pytest.raises(InstrumentError, match=wrong_channels):
        _imachsr_call(heads={**heads, "layer1": torch.randn(2, 4, 2, 2)})
    squeeze = r"classification task: .* must have shape \(4,\) \(integer class ids\)\. Drop the channel axis"
    with pytest.raises(InstrumentError, match=squeeze):
        OutputCrossEntropy()(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(InstrumentError, match="label value 3 does not fit output with K=3"):
        _imachsr_call(target=torch.full_like(labels, 3))
    with pytest.raises(InstrumentError, match="label value -1"):
        _imachsr_call(target=torch.full_like(labels, -1))
    with pytest.raises(InstrumentError, match="integer class ids"):
        _imachsr_call(target=labels.float())
    with pytest.raises(InstrumentError, match=r"expected \(B, K\) logits or dense"):
        MutualInformationLoss()(torch.randn(2, 3, 1, 1, 1, 4), torch.zeros(2, 1, 1, 1, 4, dtype=torch.long))


def test_bad_options_raise() -> None:
    choices = r"unknown schedule 'step'; expected one of \['constant', 'linear', 'cosine'\]"
    with pytest.raises(InstrumentError, match=choices):
        IMacHSR(POINTS, LAYOUTS, schedule="step")  # type: ignore[arg-type]
    with pytest.raises(InstrumentError, match="needs progress"):
        _dense_objective_with("linear", progress=None)
    with pytest.raises(InstrumentError, match=r"progress must be a number in \[0, 1\]; got 1.5"):
        _dense_objective_with("cosine", progress=1.5)
    with pytest.raises(InstrumentError, match=r"alpha weights do not match .* missing \['layer2.0'\]"):
        IMacHSR(POINTS, LAYOUTS, alpha={"layer1": 0.5})
    with pytest.raises(InstrumentError, match="lam for 'layer1' must be a finite number >= 0; got -1"):
        IMacHSR(POINTS, LAYOUTS, lam=-1)
    with pytest.raises(InstrumentError, match="unknown feature layout 'CHW'"):
        IMacHSR(POINTS, {"layer1": "CHW", "layer2.0": "NLC"})
    with pytest.raises(InstrumentError, match=r"layouts do not match .* missing \['layer2.0'\]"):
        IMacHSR(POINTS, {"layer1": "NCHW"})
    with pytest.raises(InstrumentError, match=r"points must be unique; repeated: \['a'\]"):
        DSN(["a", "b", "a"])
    with pytest.raises(InstrumentError, match="sequence of point names"):
        DSN("layer1")
    with pytest.raises(InstrumentError, match="temperature must be a finite number > 0"):
        DKS(POINTS, temperature=0.0)
    with pytest.raises(InstrumentError, match="eps must be a finite number > 0"):
        MutualInformationLoss(eps=0.0)
    with pytest.raises(InstrumentError, match="needs at least 2 branches"):
        DKSLoss()([torch.randn(2, 3)])
    with pytest.raises(InstrumentError, match=r"DKS branch 1 has shape \(2, 4\)"):
        DKSLoss()([torch.randn(2, 3), torch.randn(2, 4)])
    with pytest.raises(InstrumentError, match="channels at dim 3"):
        NegativeEntropyLoss(channel_dim=3)(torch.randn(2, 4))


def test_make_objective_rejects_unknown_names_and_foreign_options() -> None:
    with pytest.raises(InstrumentError, match=r"unknown objective 'ce'; expected one of \['imachsr', 'dsn', 'dks'\]"):
        make_objective("ce", POINTS)  # type: ignore[arg-type]
    with pytest.raises(InstrumentError, match=r"objective 'dsn' does not take \['lam'\]"):
        make_objective("dsn", POINTS, options=LossOptions(lam=0.1))
    with pytest.raises(InstrumentError, match="needs layouts"):
        make_objective("imachsr", POINTS)


@pytest.mark.parametrize(("shape", "dim"), [((2, 5, 3, 4), 1), ((2, 6, 7), -1), ((3, 4), 1)])
def test_negative_entropy_gradient_matches_autograd_of_the_formula(shape: tuple[int, ...], dim: int) -> None:
    # The loss has a hand-written backward; gradcheck compares it with finite differences
    # and the plain autograd formula pins the value and the gradient.
    torch.manual_seed(0)
    z = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    loss = NegativeEntropyLoss(channel_dim=dim)
    assert torch.autograd.gradcheck(loss, (z,))
    reference = z.detach().clone().requires_grad_()
    log_p = torch.log_softmax(reference, dim=dim)
    torch.testing.assert_close(loss(z), (log_p.exp() * log_p).sum(dim=dim).mean())
    (log_p.exp() * log_p).sum(dim=dim).mean().backward()
    loss(z).backward()
    torch.testing.assert_close(z.grad, reference.grad)


def test_negative_entropy_on_a_large_map_averages_to_the_exact_value_over_the_grid_offsets() -> None:
    # 8x8 positions, at most 16 per example: stride 2, four possible offsets. Each offset is one
    # estimate; their mean is exactly the full mean, in NCHW and NHWC alike.
    torch.manual_seed(0)
    z = torch.randn(3, 5, 8, 8, dtype=torch.float64)
    exact = NegativeEntropyLoss(max_positions=None)(z)
    for layout, feature in (("NCHW", z), ("NHWC", z.permute(0, 2, 3, 1))):
        sampled = NegativeEntropyLoss.for_layout(layout, max_positions=16)
        by_offset = {}
        for seed in range(64):
            torch.manual_seed(seed)
            estimate = sampled(feature)
            by_offset[round(estimate.item(), 12)] = estimate
        assert len(by_offset) == 4, layout  # four grids, each reached
        torch.testing.assert_close(torch.stack(list(by_offset.values())).mean(), exact)


def test_negative_entropy_gradient_reaches_only_the_sampled_grid() -> None:
    torch.manual_seed(0)
    z = torch.randn(2, 4, 12, 12, requires_grad=True)
    NegativeEntropyLoss(max_positions=36)(z).backward()  # 144 positions -> stride 2 -> 36
    touched = (z.grad.abs().sum(dim=(0, 1)) > 0).float()
    assert touched.sum() == 36
    assert NegativeEntropyLoss(max_positions=144)(z).requires_grad  # at the limit: exact, no sampling


def test_negative_entropy_small_maps_and_tokens_are_exact_by_default() -> None:
    # The default limit (1024) leaves 32x32 maps and ViT's 197 tokens exact: no randomness.
    z, tokens = torch.randn(2, 8, 32, 32), torch.randn(2, 197, 16)
    state = torch.get_rng_state()
    exact = NegativeEntropyLoss(max_positions=None)
    assert torch.equal(NegativeEntropyLoss()(z), exact(z))
    assert torch.equal(NegativeEntropyLoss.for_layout("NLC")(tokens), NegativeEntropyLoss.for_layout("NLC", None)(tokens))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_negative_entropy_max_positions_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(InstrumentError, match="max_positions must be a positive int or None"):
        NegativeEntropyLoss(max_positions=bad)  # type: ignore[arg-type]


def test_ne_runs_only_where_its_weight_is_not_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default (lam=0, EVIDENCE.md section 2): no NE part, no NE computed, features not needed.
    output, heads, features, labels = _dense_batch()
    default = IMacHSR(POINTS, LAYOUTS)
    assert sorted(default(output, heads, {}, labels).parts) == ["ce", "mi/layer1", "mi/layer2.0"]
    mixed = IMacHSR(POINTS, LAYOUTS, lam={"layer1": 0.0, "layer2.0": 0.01})
    assert sorted(mixed(output, heads, features, labels).parts) == ["ce", "mi/layer1", "mi/layer2.0", "ne/layer2.0"]

    def refuse(self, feature):  # noqa: ANN001, ANN202
        raise AssertionError("NE computed at a point whose weight is 0")

    monkeypatch.setattr(NegativeEntropyLoss, "forward", refuse)
    default(output, heads, features, labels)
    with pytest.raises(AssertionError, match="NE computed"):
        IMacHSR(POINTS, LAYOUTS, lam=0.01)(output, heads, features, labels)
