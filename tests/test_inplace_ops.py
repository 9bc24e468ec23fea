"""The probed forward runs the model's own ``x += y`` in place, as the model does (issue 19).

fx has no in-place operators, so a trace turns ``x += y`` into ``x + y``: a fresh tensor per
residual block (674 MiB per resnet50 step at batch 32). The tracer records where the model wrote
in place and the fx engine runs those nodes in place again; analysis keeps the ``add`` node.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprobe.api import analyze
from autoprobe.rewrite import instrument

torch.set_num_threads(1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        y += x  # in place into the bn output, as timm's Bottleneck does
        y *= 0.5
        return self.act(y)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Block(), _Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 3))


def _bn_outputs(model: nn.Module, run) -> list[torch.Tensor]:  # noqa: ANN001
    """The tensors the blocks' BatchNorms returned, as they are after ``run()`` finished."""
    seen: list[torch.Tensor] = []
    handles = [model[i].bn.register_forward_hook(lambda m, a, o: seen.append(o)) for i in (1, 2)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_the_probed_forward_writes_in_place_where_the_model_does() -> None:
    model = _model().eval()
    probed = instrument(model, input_size=(3, 8, 8)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = _bn_outputs(model, lambda: model(x))
        tapped = _bn_outputs(model, lambda: probed(x))
        # The model's `y += x; y *= 0.5` then ReLU(inplace) leave the block's output in the bn's own buffer.
        for p, t in zip(plain, tapped, strict=True):
            assert torch.equal(p, t)
        assert torch.equal(tapped[1], model[2](model[1](model[0](x))))
        assert torch.equal(probed(x).output, model(x))
    assert "+= " in probed.code and "*= " in probed.code


def test_analysis_keeps_the_out_of_place_node_names() -> None:
    graph = analyze(_model(), input_size=(3, 8, 8)).graph
    names = {n.name for n in graph.ordered}
    assert {"1.add", "1.mul", "2.add", "2.mul"} <= names


@pytest.mark.parametrize("point", ["1.bn", "1.add"])
def test_a_point_the_in_place_op_overwrites_is_copied_and_trains(point: str) -> None:
    model = _model()
    analysis = analyze(model, input_size=(3, 8, 8))
    selection = analysis.choose(point)
    probed = instrument(model, selection, input_size=(3, 8, 8))
    assert probed.report.taps[0].cloned
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        probed.eval()
        feature = probed(x).features[point]
        model.eval()
        y = model[1].bn(model[1].conv(model[0](x)))
        expected = y if point == "1.bn" else y + model[0](x)
        assert torch.allclose(feature, expected)
    probed.train()
    total, _ = probed.loss(probed(x), torch.tensor([0, 2]))
    total.backward()  # autograd rejects a saved tensor overwritten in place; the copy prevents it
    assert all(p.grad is not None for p in probed.autoprobe_adapters.parameters())
