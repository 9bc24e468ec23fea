"""The whole training step, the probed forward plus ``probed.loss``, is one graph under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import autoprobe

torch.set_num_threads(1)


def _probed(loss: str) -> autoprobe.Probed:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )
    return autoprobe.instrument(net, input_size=(3, 40, 40), loss=loss)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("loss", "target"),
    [
        ("imachsr", torch.tensor([0, 1, 2, 3])),
        ("imachsr", torch.full((4, 4), 0.25)),  # soft targets
        ("dks", torch.tensor([0, 1, 2, 3])),
    ],
)
def test_forward_and_loss_have_no_graph_break(loss: str, target: torch.Tensor) -> None:
    probed = _probed(loss)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return probed.loss(probed(x), y).total

    torch._dynamo.reset()
    # 40 x 40 = 1600 positions: negative entropy takes its random strided grid, the path that broke the graph.
    explanation = torch._dynamo.explain(step)(torch.randn(4, 3, 40, 40), target)
    reasons = [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_the_compiled_step_matches_eager_and_trains() -> None:
    probed = _probed("imachsr")
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])  # 256 positions: NE is exact, so values match

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return probed.loss(probed(x), y).total

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    # The conv heads' dropout draws from the global RNG: the same seed before each step gives both the same masks.
    torch.manual_seed(7)
    eager_total = step(x, y)
    torch.manual_seed(7)
    total = compiled(x, y)
    assert torch.allclose(total, eager_total, rtol=1e-5, atol=1e-6)
    total.backward()
    assert all(p.grad is not None for p in probed.parameters())
