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
from autoprobe import LossOptions, backends, fx_tracer, labelling, trace

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
    """``instrument`` with its tracing counted: fx traces, shape propagations, layer graphs, tracing objects."""
    counts = {"trace": 0, "propagate": 0, "graph": 0, "tracing": 0}
    tracer_trace, propagate = fx_tracer.QualnameTracer.trace, trace.propagate_shapes
    build, init = backends.build_layer_graph, backends.ModelTrace.__init__

    def counting(key, fn):  # noqa: ANN001, ANN202
        def counted(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            counts[key] += 1
            return fn(*args, **kw)
        return counted

    with mock.patch.object(fx_tracer.QualnameTracer, "trace", counting("trace", tracer_trace)), \
            mock.patch.object(trace, "propagate_shapes", counting("propagate", propagate)), \
            mock.patch.object(backends, "build_layer_graph", counting("graph", build)), \
            mock.patch.object(backends.ModelTrace, "__init__", counting("tracing", init)):
        probed = autoprobe.instrument(model, input_size=SIZE, points=2, loss_options=LossOptions(head="linear"),
                                      **kwargs)
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
    # One tracing object; the train trace is only compared with the eval one, never propagated or graphed.
    assert counts == {"trace": 2, "propagate": 1, "graph": 1, "tracing": 1}
    engine = probed._engine
    assert engine._graphs[True] is engine._graphs[False]
    _agrees_with_plain(model, probed)


@pytest.mark.parametrize("cls", [Branches, FunctionalDropout, CustomLeaf], ids=lambda c: c.__name__)
def test_mode_dependent_python_keeps_two_graphs(cls: type[nn.Module]) -> None:
    model = cls()
    probed, counts = _counted(model)
    assert counts == {"trace": 2, "propagate": 2, "graph": 2, "tracing": 1}
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


_RUNS: list[str] = []
"""One entry per completed forward of ``Unfx`` on tensors (fx's proxies are not runs): module attributes a
forward sets are put back after every trace, a module-level list is not."""


class Unfx(nn.Module):
    """A dense model fx cannot trace: ``device`` (export decides it) or ``value`` (only the hooks backend's real run)."""

    def __init__(self, branch: str) -> None:
        super().__init__()
        self.branch = branch
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.late = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch == "device" and x.device.type == "mps":
            x = x.contiguous()
        x = self.stem(x)
        if self.branch == "value" and x.sum() > 0:
            x = x * 0.5
        out = self.head(self.late(self.mid(x)))
        if not isinstance(x, fx.Proxy):
            _RUNS.append(type(x).__name__)
        return out


@pytest.mark.parametrize("branch, backend", [("device", "export"), ("value", "hooks")])
def test_export_and_hooks_run_the_models_python_once(branch: str, backend: str) -> None:
    """The selection's run is the one tapped and the example output and its axes are read from it: no other run."""
    model = Unfx(branch)
    _RUNS.clear()
    probed, counts = _counted(model, options=autoprobe.TraceOptions(allow_real_data=backend == "hooks"))
    assert probed.selection.backend == backend
    assert counts["tracing"] == 1
    assert len(_RUNS) == 1, _RUNS  # export: on fake tensors; hooks: the one real run (its meta run stopped early)
    assert probed.report.output_shape == (2, 4, *SIZE[1:])
    _RUNS.clear()
    x = torch.randn(2, *SIZE)
    out = probed(x)
    torch.testing.assert_close(out.output, model(x))
    assert set(out.heads) == set(probed.selection.names)


def test_a_channels_last_prediction_is_refused_from_the_trace_alone() -> None:
    """The output's axes come from the trace (export's graph here): a (B, H, W, K) prediction is not read as K=H."""

    class Last(Unfx):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).permute(0, 2, 3, 1)

    _RUNS.clear()
    with pytest.raises(autoprobe.InstrumentError, match="axis 1 is a spatial axis"):
        autoprobe.instrument(Last("device"), input_size=SIZE, points=1)
    assert len(_RUNS) == 1, _RUNS


def _labelled_in_one_walk(model: nn.Module) -> tuple[autoprobe.Analysis, list[tuple[str, bool, bool]]]:
    """``analyze`` with every ``Labeller.label`` call recorded: (node, its shape was there, the next node's was)."""
    calls: list[tuple[str, bool, bool]] = []
    label = labelling.Labeller.label

    def recorded(self, node):  # noqa: ANN001, ANN202
        later = node.next
        calls.append((node.name, "tensor_meta" in node.meta or node.op == "output",
                      later.op != "root" and "tensor_meta" in later.meta))
        return label(self, node)

    with mock.patch.object(labelling.Labeller, "label", recorded):
        analysis = autoprobe.analyze(model, input_size=SIZE, points=2)
    return analysis, calls


@pytest.mark.parametrize("model, backend", [(Plain(), "fx"), (Unfx("device"), "export")], ids=["fx", "export"])
def test_shapes_and_axis_labels_are_recorded_in_one_walk(model: nn.Module, backend: str) -> None:
    """Each node is labelled once, right after its shape is recorded and before the next node's (not in a second
    pass over a graph whose shapes are all there), and building the layer graph labels nothing."""
    analysis, calls = _labelled_in_one_walk(model)
    assert analysis.graph.backend == backend
    names = [c[0] for c in calls]
    assert len(names) == len(set(names)), "a node was labelled twice"
    assert {info.fx_name for info in analysis.graph} <= set(names)
    assert all(had_shape for _, had_shape, _ in calls), "a node was labelled before its shape was recorded"
    assert not any(next_had_shape for _, _, next_had_shape in calls), "labels were computed after all the shapes"
    assert [info.layout.value for info in analysis.graph.ordered[:2]] == ["NCHW", "NCHW"]
