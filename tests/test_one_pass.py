"""One pass through the pipeline (issue 18): ``instrument`` traces each mode once, and a model whose
Python records the same program in both modes is traced, propagated and tapped once for both.

Each test checks behaviour as well as the counts: sharing one graph must never change what the
probed model computes in either mode.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import autoprobe
from autoprobe import fx_tracer, trace

SIZE = (3, 16, 16)


class Plain(nn.Module):
    """Mode-dependent only inside modules (batch norm, dropout): one program in both modes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.late = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.late(self.mid(self.stem(x))).mean((2, 3)))


class Branches(Plain):
    """Python that reads ``self.training``: the two modes are two programs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.stem(x))
        if self.training:
            x = x * 2
        return self.head(self.late(x).mean((2, 3)))


class FunctionalDropout(Plain):
    """``F.dropout(x, training=self.training)``: the flag is a constant of the traced call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.mid(self.stem(x)), 0.5, training=self.training)
        return self.head(self.late(x).mean((2, 3)))


class AuxInTrain(nn.Module):
    """A module of no known package: fx cannot see what it returns in train mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if self.training else x


class CustomLeaf(Plain):
    def __init__(self) -> None:
        super().__init__()
        self.custom = AuxInTrain()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.late(self.custom(self.mid(self.stem(x)))).mean((2, 3)))


def _counted(model: nn.Module, **kwargs) -> tuple[autoprobe.Probed, dict[str, int]]:
    counts = {"trace": 0, "propagate": 0}
    tracer_trace, propagate = fx_tracer.QualnameTracer.trace, trace.propagate_shapes

    def counted_trace(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        counts["trace"] += 1
        return tracer_trace(self, *args, **kw)

    def counted_propagate(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        counts["propagate"] += 1
        return propagate(*args, **kw)

    with mock.patch.object(fx_tracer.QualnameTracer, "trace", counted_trace), \
            mock.patch.object(trace, "propagate_shapes", counted_propagate):
        probed = autoprobe.instrument(model, input_size=SIZE, points=2, **kwargs)
    return probed, counts


def _agrees_with_plain(model: nn.Module, probed: autoprobe.Probed) -> None:
    """The probed model's output equals the plain model's in both modes (same dropout draws)."""
    x = torch.randn(2, *SIZE)
    for training in (True, False):
        model.train(training)
        probed.train(training)
        torch.manual_seed(0)
        want = model(x)
        torch.manual_seed(0)
        got = probed(x).output
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_one_program_is_traced_propagated_and_tapped_once() -> None:
    model = Plain()
    probed, counts = _counted(model)
    assert counts == {"trace": 2, "propagate": 1}  # the train trace is only compared, never propagated
    engine = probed._engine
    assert engine._graphs[True] is engine._graphs[False]
    _agrees_with_plain(model, probed)


@pytest.mark.parametrize("cls", [Branches, FunctionalDropout, CustomLeaf], ids=lambda c: c.__name__)
def test_mode_dependent_python_keeps_two_graphs(cls: type[nn.Module]) -> None:
    model = cls()
    probed, counts = _counted(model)
    assert counts == {"trace": 2, "propagate": 2}
    engine = probed._engine
    assert engine._graphs[True] is not engine._graphs[False]
    _agrees_with_plain(model, probed)


def test_same_program_compares_targets_arguments_and_constants() -> None:
    def graph(fn) -> fx.Graph:  # noqa: ANN001
        return fx.symbolic_trace(fn).graph

    assert trace.same_program(graph(lambda x: F.dropout(x, 0.5, True)), graph(lambda x: F.dropout(x, 0.5, True)))
    assert not trace.same_program(graph(lambda x: F.dropout(x, 0.5, True)), graph(lambda x: F.dropout(x, 0.5, False)))
    assert not trace.same_program(graph(lambda x: x.relu()), graph(lambda x: x.sigmoid()))
    assert not trace.same_program(graph(lambda x: x[:, 1:]), graph(lambda x: x[:, 2:]))
    assert not trace.same_program(graph(lambda x: x + 1), graph(lambda x: (x + 1).relu()))


def test_unpickling_traces_each_mode_once() -> None:
    import pickle

    probed = autoprobe.instrument(Plain(), input_size=SIZE, points=2)
    blob = pickle.dumps(probed)
    counts = {"propagate": 0}
    propagate = trace.propagate_shapes

    def counted_propagate(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        counts["propagate"] += 1
        return propagate(*args, **kw)

    with mock.patch.object(trace, "propagate_shapes", counted_propagate):
        restored = pickle.loads(blob)
    assert counts["propagate"] == 1
    x = torch.randn(2, *SIZE)
    probed.eval()
    restored.eval()
    torch.testing.assert_close(restored(x).output, probed(x).output)
