"""The gradient-similarity gate (``autoprobe.losses.gate``): known answers on toy models and terms.

A term built to be the negative of the output loss has cosine exactly -1 with it, one built to be a
multiple of it +1: those are the exact answers the gate's weights are checked against. Training
with an opposing gated term must then follow output-only training bit for bit, and ``gate=None``
must leave the objective exactly as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _torchrun import run_two_processes
from torch import nn
from torch.autograd.graph import get_gradient_edge

import autoprobe
from autoprobe.errors import InstrumentError
from autoprobe.losses import DSN, Gate, GradientGate, IMacHSR, LossOptions, gradient_agreement
from autoprobe.losses.gate import _feature_edge


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(512, 10),
    )


class _Mirror(DSN):
    """DSN whose term at each point is ``sign`` times the output's own CE: cos(g_term, g_output) = sign."""

    def __init__(self, points, sign: float, **kwargs) -> None:
        super().__init__(points, **kwargs)
        self.sign = sign

    def _terms(self, output, heads, features, matcher):
        # The head's CE times 0, so the adapters stay in the graph (their gradient is 0), plus the mirror.
        mirrored = self.sign * self._homogeneous(output, matcher)
        return [(f"dsn/{name}", self.alpha[name], mirrored + 0.0 * self._homogeneous(heads[name], matcher))
                for name in self.points]


def _batches(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _train(probed_or_net, batches, probed: bool) -> dict[str, torch.Tensor]:
    model = probed_or_net
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "autoprobe_adapters" not in n], lr=0.1)
    for x, y in batches:
        if probed:
            total, _ = model.loss(model(x), y)
        else:
            total = F.cross_entropy(model(x), y)
        opt.zero_grad()
        total.backward()
        opt.step()
    net = model.strip() if probed else model
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("wrt", ["feature", "parameters"])
def test_an_opposing_term_is_switched_off_and_training_follows_output_only(wrt: str) -> None:
    plain = _train(_net(), _batches(), probed=False)
    net = _net()
    selection = autoprobe.inspect(net, input_size=(3, 16, 16))
    objective = _Mirror(selection.names, -1.0, alpha=0.5, gate=Gate("cosine", every=2, wrt=wrt))
    probed = autoprobe.instrument(net, selection, loss=objective, input_size=(3, 16, 16))
    gated = _train(probed, _batches(), probed=True)
    assert probed.objective.gate.last and all(a.cosine == pytest.approx(-1.0, abs=1e-5)
                                               for a in probed.objective.gate.last.values())
    assert probed.objective.gate.weights.tolist() == [0.0] * len(selection.names)
    for key, value in plain.items():
        assert torch.equal(value, gated[key]), f"{key} moved off output-only training"


@pytest.mark.parametrize("kind", ["cosine", "binary"])
def test_an_aligned_term_keeps_its_weight(kind: str) -> None:
    net = _net()
    selection = autoprobe.inspect(net, input_size=(3, 16, 16))
    objective = _Mirror(selection.names, 2.0, alpha=0.4, gate=kind)
    probed = autoprobe.instrument(net, selection, loss=objective, input_size=(3, 16, 16))
    x, y = _batches(1)[0]
    _, parts = probed.loss(probed(x), y)
    for name in selection.names:
        assert probed.objective.gate.last[name].cosine == pytest.approx(1.0, abs=1e-5)
        assert probed.objective.gate.last[name].norm_ratio == pytest.approx(0.4 * 2.0, rel=1e-4)  # the weighted term
        assert parts[f"gate/{name}"].item() == pytest.approx(0.4, abs=1e-5)


# Pinned from the library before the gate existed (5c0647e): the total and the gradients' abs-sums,
# as float.hex, of DSN and iMacHSR (lambda 0.01) on a seeded dense batch.
_BEFORE_THE_GATE = {
    "DSN": ("0x1.46c08c0000000p+1", ["0x1.8d5c880000000p+0", "0x1.edc34e0000000p-2", None]),
    "IMacHSR": ("0x1.e3112c0000000p+0", ["0x1.8d5c880000000p+0", "0x1.9d04700000000p-4", "0x1.7efb240000000p-8"]),
}


def test_gate_none_is_bit_identical_to_the_objective_before_the_gate() -> None:
    torch.manual_seed(3)
    output, head = torch.randn(4, 5, 6, 6, requires_grad=True), torch.randn(4, 5, 6, 6, requires_grad=True)
    feature = torch.randn(4, 7, 6, 6, requires_grad=True)
    y = torch.randint(0, 5, (4, 6, 6))
    for objective in (DSN(["p"], gate=None), IMacHSR(["p"], {"p": "NCHW"}, lam=0.01, gate=None)):
        result = objective(output, {"p": head}, {"p": feature}, y)
        grads = torch.autograd.grad(result.total, [output, head, feature], allow_unused=True)
        found = (result.total.item().hex(), [None if g is None else g.abs().sum().item().hex() for g in grads])
        assert found == _BEFORE_THE_GATE[type(objective).__name__]
        assert objective.gate is None and not list(objective.buffers())
        assert not any(name.startswith("gate/") for name in result.parts)


def test_gated_parts_hold_the_weight_in_force_within_0_and_alpha() -> None:
    net = _net()
    probed = autoprobe.instrument(net, input_size=(3, 16, 16), loss="dsn",
                                  loss_options=LossOptions(alpha=0.3, gate=Gate("cosine", every=1)))
    opt = torch.optim.SGD(probed.parameters(), lr=0.05)
    seen = []
    for x, y in _batches(4):
        total, parts = probed.loss(probed(x), y)
        opt.zero_grad()
        total.backward()
        opt.step()
        for name in probed.selection.names:
            weight = parts[f"gate/{name}"].item()
            cosine = probed.objective.gate.last[name].cosine
            assert 0.0 <= weight <= 0.3
            assert weight == pytest.approx(0.3 * max(0.0, cosine), abs=1e-6)
            seen.append(weight)
    assert seen


def test_the_gate_measures_every_n_training_calls_and_never_without_grad() -> None:
    z = torch.randn(3, 4, requires_grad=True)
    gate = GradientGate(["p"], Gate("binary", every=3))
    measured = []
    for sign in (-1, 1, 1, 1, -1, -1, 1):
        gate(z.sum(), {"p": sign * z.sum()}, {"p": z})
        measured.append(gate.weights.item())
    # Measured at calls 0, 3 and 6 (signs -1, 1, 1); held in between.
    assert measured == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    with torch.no_grad():
        gate(z.sum(), {"p": -z.sum()}, {"p": z})
    assert gate.weights.item() == 1.0 and gate.calls == 7


def test_a_copied_feature_is_measured_at_the_tensor_it_copies() -> None:
    x = torch.randn(6, requires_grad=True)
    z = x * 3
    copy = z.clone()  # what an engine hands back when a later in-place op would overwrite z
    weights = z.detach() + torch.linspace(-1.0, 1.0, 6)
    main, term = (z ** 2).sum(), (copy * weights).sum()
    edge = _feature_edge(main, copy, "p")
    through_copy = gradient_agreement(main, {"p": term}, {"p": [edge]})["p"].cosine
    direct = gradient_agreement(main, {"p": (z * weights).sum()}, {"p": [get_gradient_edge(z)]})["p"].cosine
    assert through_copy == pytest.approx(direct, abs=1e-6) and abs(direct) > 0.1
    assert gradient_agreement(main, {"p": term}, {"p": [copy]})["p"].cosine == 0.0  # the copy itself: unreached


def test_the_parameter_form_takes_only_the_parameters_both_losses_reach() -> None:
    torch.manual_seed(0)
    trunk, head, adapter = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)
    x = torch.randn(5, 4)
    z = trunk(x)
    main, aux = head(z).pow(2).sum(), adapter(z).pow(2).sum()
    gate = GradientGate(["p"], Gate("cosine", wrt="parameters"))
    gate(main, {"p": aux}, {"p": z})
    g_main = torch.autograd.grad(main, list(trunk.parameters()), retain_graph=True)
    g_aux = torch.autograd.grad(aux, list(trunk.parameters()), retain_graph=True)
    dot = sum((a * b).sum() for a, b in zip(g_main, g_aux))
    norm = (sum(a.pow(2).sum() for a in g_main) * sum(b.pow(2).sum() for b in g_aux)).sqrt()
    assert gate.last["p"].cosine == pytest.approx(float(dot / norm), abs=1e-5)


def test_strip_and_the_state_dict_are_untouched_by_the_gate() -> None:
    net = _net()
    keys = list(net.state_dict())
    plain = autoprobe.instrument(_net(), input_size=(3, 16, 16), loss="imachsr")
    gated = autoprobe.instrument(net, input_size=(3, 16, 16), loss="imachsr",
                                  loss_options=LossOptions(gate="cosine"))
    assert list(gated.state_dict()) == list(plain.state_dict())
    x, y = _batches(1)[0]
    gated.loss(gated(x), y)[0].backward()
    assert gated.strip() is net and list(net.state_dict()) == keys


def test_the_compiled_step_reads_the_weights_in_force_as_one_graph() -> None:
    probed = autoprobe.instrument(_net(), input_size=(3, 16, 16), loss="dsn",
                                  loss_options=LossOptions(gate=Gate("cosine", every=1)))
    x, y = _batches(1)[0]
    probed.loss(probed(x), y)  # an eager call measures
    probed.objective.gate.weights.copy_(torch.tensor([0.25] * len(probed.selection.names)))

    def step(x, y):
        return probed.loss(probed(x), y)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    total, parts = compiled(x, y)
    eager_calls = probed.objective.gate.calls
    assert eager_calls == 1  # the compiled call neither measured nor counted
    for name in probed.selection.names:
        assert parts[f"gate/{name}"].item() == pytest.approx(0.3 * 0.25)
    expected = parts["ce"] + sum(0.3 * 0.25 * parts[f"dsn/{n}"] for n in probed.selection.names)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gate_options_are_checked() -> None:
    with pytest.raises(InstrumentError, match="unknown gate kind 'cos'"):
        autoprobe.instrument(_net(), input_size=(3, 16, 16), loss="dsn", loss_options=LossOptions(gate="cos"))
    with pytest.raises(InstrumentError, match="every=0"):
        Gate("cosine", every=0)
    with pytest.raises(InstrumentError, match="gate must be"):
        IMacHSR(["p"], {"p": "NCHW"}, gate=1)  # type: ignore[arg-type]
    with pytest.raises(InstrumentError, match="features do not match"):
        DSN(["p"], gate="cosine")(torch.zeros(2, 3), {"p": torch.zeros(2, 3)}, {}, torch.tensor([0, 1]))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_ranks_hold_the_same_gate_weights(tmp_path: Path) -> None:
    run_two_processes("_gate_ddp_worker.py", tmp_path, timeout=240)
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for wrt in ("feature", "parameters"):
        assert torch.equal(rank0[wrt]["weights"], rank1[wrt]["weights"]), f"{wrt}: the ranks' gate weights differ"
        assert torch.equal(rank0[wrt]["cosines"], rank1[wrt]["cosines"])
        assert rank0[wrt]["cosines"].abs().sum() > 0  # the cosines were measured, not left at 0


def test_the_readme_example_runs_and_logs_the_weight_in_force() -> None:
    from _readme import python_block

    namespace: dict = {}
    exec(python_block("### Gating the terms: deep supervision that backs off where it would hurt"), namespace)
    parts = namespace["parts"]
    gates = [name for name in parts if name.startswith("gate/")]
    assert gates and len(gates) == len(namespace["probed"].selection.names)
    assert all(0.0 <= parts[name].item() <= 0.3 for name in gates)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_gated_training_matches_one_unsharded_process(tmp_path: Path) -> None:
    # FSDP2 reshards after a backward; the gate's measuring call keeps the parameters unsharded.
    run_two_processes("_gate_fsdp_worker.py", tmp_path, timeout=400)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for wrt in ("feature", "parameters"):
            (losses, weights), (want_losses, want_weights) = saved[wrt]["got"], saved[wrt]["expected"]
            assert losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6), wrt
            assert torch.tensor(weights) == pytest.approx(torch.tensor(want_weights), abs=1e-5), wrt
            assert any(w > 0 for step in weights for w in step)  # measured, and not all switched off


@pytest.mark.parametrize("wrt", ["feature", "parameters"])
def test_under_autocast_the_gate_measures_a_bfloat16_forward_and_holds_float32_weights(wrt: str) -> None:
    net = _net()
    selection = autoprobe.inspect(net, input_size=(3, 16, 16))
    # The feature form differentiates with respect to bfloat16 features. (An exact -1 cannot tell a
    # float32 sum from a bfloat16 one: the mirrored products cancel exactly either way.)
    objective = _Mirror(selection.names, -1.0, alpha=0.5, gate=Gate("cosine", every=1, wrt=wrt))
    probed = autoprobe.instrument(net, selection, loss=objective, input_size=(3, 16, 16))
    x, y = _batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = probed(x)
        assert out.output.dtype == torch.bfloat16  # the forward ran in bfloat16
        total, parts = probed.loss(out, y)
    total.backward()
    assert all(a.cosine == pytest.approx(-1.0, abs=1e-5) for a in probed.objective.gate.last.values())
    assert probed.objective.gate.weights.dtype == torch.float32
    assert all(parts[f"gate/{name}"].item() == 0.0 for name in selection.names)


def test_the_labels_call_the_trainers_use_carries_the_gate_parts() -> None:
    # transformers.Trainer and AutoprobeCallback read ProbedLossOutput.parts from `probed(x, labels=y)`.
    probed = autoprobe.instrument(_net(), input_size=(3, 16, 16), loss="dsn",
                                  loss_options=LossOptions(gate="cosine"))
    x, y = _batches(1)[0]
    record = probed(x, labels=y)
    assert {f"gate/{name}" for name in probed.selection.names} <= set(record.parts)
    record.loss.backward()
