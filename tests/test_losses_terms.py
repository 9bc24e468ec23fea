"""The objectives are built from the public term modules: each term has one implementation.

An objective checks its inputs and matches the target once, then computes every term with
the module of ``autoprobe.losses.terms`` that implements it (``forward_matched``). So a term
used alone and the same term inside an objective give bit-identical values and gradients,
and a change to a term module changes the objectives with it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from autoprobe.errors import InstrumentError, UsageError
from autoprobe.losses import DKS, DSN, CorrelationLoss, DKSLoss, DSNLoss, IMacHSR, LossResult, MutualInformationLoss
from autoprobe.losses import LossOptions, NegativeEntropyLoss, Objective, OutputLoss, make_objective

torch.set_num_threads(1)

KINDS = ("multiclass", "binary", "multilabel", "regression")


def _batch(kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output (B, K, 8, 8), a head at another size (4, 4), a 40x40 feature (NE samples a grid), a target at 8x8."""
    g = torch.Generator().manual_seed(seed)
    k = 1 if kind == "binary" else 3
    output = torch.randn(2, k, 8, 8, generator=g, requires_grad=True)
    head = torch.randn(2, k, 4, 4, generator=g, requires_grad=True)
    feature = torch.randn(2, 5, 40, 40, generator=g, requires_grad=True)
    if kind == "multiclass":
        target = torch.randint(0, k, (2, 8, 8), generator=g)
        target[0, :2] = -100
    elif kind == "binary":
        target = torch.randint(0, 2, (2, 8, 8), generator=g)
    elif kind == "multilabel":
        target = torch.randint(0, 2, (2, k, 8, 8), generator=g).float()
    else:
        target = torch.randn(2, k, 8, 8, generator=g)
    return output, head, feature, target


def _value_and_grads(compute: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    torch.manual_seed(3)  # the same NE grid offset for both sides
    value = compute()
    return [value.detach(), *(torch.autograd.grad(value, inputs) if inputs else ())]


def _assert_same(objective_side: list[torch.Tensor], term_side: list[torch.Tensor]) -> None:
    assert len(objective_side) == len(term_side)
    for got, expected in zip(objective_side, term_side):
        assert torch.equal(got, expected), (got, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_imachsr_terms_are_the_term_modules_bit_for_bit(kind: str) -> None:
    output, head, feature, target = _batch(kind)
    options = {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 0.5]} if kind == "multiclass" else {}
    mi_term = CorrelationLoss(1e-6) if kind == "regression" else MutualInformationLoss(1e-6, target_kind=kind)
    ne_term = NegativeEntropyLoss.for_layout("NCHW", 400)

    def objective(alpha: float, lam: float) -> Callable[[], LossResult]:
        loss = IMacHSR(["p"], {"p": "NCHW"}, alpha=alpha, lam=lam, eps=1e-6, ne_positions=400, target_kind=kind,
                       **options)  # type: ignore[arg-type]
        return lambda: loss(output, {"p": head}, {"p": feature}, target)

    torch.manual_seed(3)  # the same NE grid offset for both sides
    parts = objective(0.5, 0.01)().parts
    output_name, mi_name = ("mse", "corr/p") if kind == "regression" else ("ce", "mi/p")
    assert torch.equal(parts[output_name], OutputLoss(kind, **options)(output, target).detach())  # type: ignore[arg-type]
    assert torch.equal(parts[mi_name], mi_term(head, target).detach())
    torch.manual_seed(3)
    assert torch.equal(parts["ne/p"], ne_term(feature).detach())
    # Gradients: an objective with one term weighted 1 and the other 0 against that term alone.
    only_mi = _value_and_grads(lambda: objective(1.0, 0.0)().total, [head])
    _assert_same(only_mi[1:], _value_and_grads(lambda: mi_term(head, target), [head])[1:])
    only_ne = _value_and_grads(lambda: objective(0.0, 1.0)().total, [feature])
    _assert_same(only_ne[1:], _value_and_grads(lambda: ne_term(feature), [feature])[1:])


@pytest.mark.parametrize("estimator", ["image", "pooled", "shuffled"])
def test_every_mi_estimator_is_the_mi_module(estimator: str) -> None:
    output, head, feature, target = _batch("multiclass", seed=1)
    objective = make_objective("imachsr", ["p"], {"p": "NCHW"},
                               options=LossOptions(alpha=1.0, lam=0.0, mi_estimator=estimator))  # type: ignore[arg-type]
    term = MutualInformationLoss(estimator=estimator)  # type: ignore[arg-type]
    got = _value_and_grads(lambda: objective(output, {"p": head}, {"p": feature}, target).parts["mi/p"], [])
    assert torch.equal(got[0], term(head, target).detach())
    assert f"estimator={estimator!r}" in repr(term) or estimator == "image"


@pytest.mark.parametrize("kind", KINDS)
def test_dsn_heads_are_dsn_loss_and_the_output_is_output_loss(kind: str) -> None:
    output, head, _, target = _batch(kind, seed=2)
    options = {"label_smoothing": 0.2, "class_weights": [2.0, 1.0, 1.0]} if kind == "multiclass" else {}
    loss = "l1" if kind == "regression" else "mse"
    objective = DSN(["p"], alpha=1.0, target_kind=kind, regression_loss=loss, **options)  # type: ignore[arg-type]
    result = objective(output, {"p": head}, {}, target)
    dsn = DSNLoss(target_kind=kind, regression_loss=loss, **options)({"p": head}, target)  # type: ignore[arg-type]
    assert torch.equal(result.parts["dsn/p"], dsn["p"].detach())
    output_name = "l1" if kind == "regression" else "ce"
    expected = OutputLoss(kind, regression_loss=loss, **options)(output, target)  # type: ignore[arg-type]
    assert torch.equal(result.parts[output_name], expected.detach())
    got = _value_and_grads(lambda: objective(output, {"p": head}, {}, target).total, [output, head])
    _assert_same(got, _value_and_grads(lambda: expected + dsn["p"], [output, head]))


@pytest.mark.parametrize("kind", ["multiclass", "binary", "multilabel"])
def test_dks_synergy_is_dks_loss(kind: str) -> None:
    output, _, _, target = _batch(kind, seed=4)
    head = (0.5 * output).detach().requires_grad_(True)  # at the output's size: no resize on either side
    objective = DKS(["p"], alpha=0.0, beta=1.0, temperature=2.0, target_kind=kind)  # type: ignore[arg-type]
    synergy = DKSLoss(2.0, target_kind=kind)  # type: ignore[arg-type]
    got = _value_and_grads(lambda: objective(output, {"p": head}, {}, target).parts["dks"], [])
    assert torch.equal(got[0], synergy([output, head], target).detach())
    total = _value_and_grads(lambda: objective(output, {"p": head}, {}, target).total, [output, head])
    ce = OutputLoss(kind)(output, target)  # type: ignore[arg-type]
    _assert_same(total, _value_and_grads(lambda: ce + synergy([output, head], target), [output, head]))


def test_objectives_compute_every_term_through_the_term_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    # A change to a term module must reach the objectives: no objective keeps its own copy.
    marks = {OutputLoss: 1.0, MutualInformationLoss: 2.0, CorrelationLoss: 3.0, DKSLoss: 4.0}
    for term, mark in marks.items():
        monkeypatch.setattr(term, "forward_matched", lambda self, logits, target, mark=mark: torch.tensor(mark))
    monkeypatch.setattr(NegativeEntropyLoss, "forward", lambda self, z: torch.tensor(5.0))
    output, head, feature, target = _batch("multiclass")
    imachsr = IMacHSR(["p"], {"p": "NCHW"}, lam=0.01)(output, {"p": head}, {"p": feature}, target).parts
    assert {name: part.item() for name, part in imachsr.items()} == {"ce": 1.0, "mi/p": 2.0, "ne/p": 5.0}
    output, head, feature, target = _batch("regression")
    regression = IMacHSR(["p"], {"p": "NCHW"}, target_kind="regression")(output, {"p": head}, {"p": feature}, target)
    assert regression.parts["corr/p"].item() == 3.0
    output, head, _, target = _batch("binary")
    dks = DKS(["p"], target_kind="binary")(output, {"p": head}, {}, target).parts
    assert {name: part.item() for name, part in dks.items()} == {"ce": 1.0, "dsn/p": 1.0, "dks": 4.0}


def test_the_objective_repr_stays_one_line_and_class_weights_follow_the_objective() -> None:
    objective = DSN(["a.b"], class_weights=[1.0, 3.0], label_smoothing=0.1)
    assert repr(objective) == (
        "DSN(points=['a.b'], schedule='constant', ignore_index=-100, label_smoothing=0.1, "
        "class_weights=[1.0, 3.0], alpha={'a.b': 0.3})"
    )
    # The weights live in the output term, a child module, so `.to()` moves them with the objective.
    assert objective.double().class_weights is not None and objective.class_weights.dtype == torch.float64
    assert "\n" not in repr(IMacHSR(["layer1.0"], {"layer1.0": "NHWC"}))  # no term children listed


def test_output_loss_smoothing_and_weights_match_torch() -> None:
    logits, labels = torch.randn(6, 3, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 2, 1, 0])
    weights = torch.tensor([1.0, 2.0, 0.5])
    loss = OutputLoss(label_smoothing=0.1, class_weights=weights)(logits, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, weight=weights, label_smoothing=0.1).item())


def test_term_options_are_checked_with_the_objectives_messages() -> None:
    with pytest.raises(UsageError, match="label_smoothing and class_weights configure the multiclass"):
        OutputLoss("binary", label_smoothing=0.1)
    with pytest.raises(InstrumentError, match="unknown mi_estimator 'best'"):
        MutualInformationLoss(estimator="best")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="gather must be True or False"):
        MutualInformationLoss(gather=1)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="gather_mi must be True or False"):
        IMacHSR([], {}, gather_mi=1)  # type: ignore[arg-type]


def test_a_user_objective_still_gets_the_output_term() -> None:
    class OutputOnly(Objective):
        def _terms(self, output, heads, features, target):  # type: ignore[no-untyped-def]
            return []

    output, _, _, target = _batch("multiclass")
    result = OutputOnly([], class_weights=[1.0, 2.0, 3.0])(output, {}, {}, target)
    assert torch.equal(result.total, OutputLoss(class_weights=[1.0, 2.0, 3.0])(output, target))


def test_a_one_class_classification_batch_is_warned_once_its_mi_being_0():
    import warnings

    import torch

    from autoprobe.losses import IMacHSR

    objective = IMacHSR(["p"], {"p": "NC"})
    logits = torch.randn(6, 4, requires_grad=True)
    with pytest.warns(UserWarning, match="every label of this batch of 6 is class 2"):
        result = objective(torch.randn(6, 4), {"p": logits}, {}, torch.full((6,), 2))
    assert result.parts["mi/p"].item() == pytest.approx(0.0, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second one-class batch is quiet
        objective(torch.randn(6, 4), {"p": logits}, {}, torch.full((6,), 2))
    fresh = IMacHSR(["p"], {"p": "NC"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a batch of two classes is not warned about
        fresh(torch.randn(6, 4), {"p": logits}, {}, torch.tensor([0, 1, 0, 1, 0, 1]))
