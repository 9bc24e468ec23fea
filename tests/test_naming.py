"""Node names: unique by construction on every backend, by the rule in ``autoprobe.trace.NodeNamer``.

The rule keeps module paths (what ``named_modules()`` and the state_dict say). It agrees with
torchvision's ``get_graph_node_names`` on models without ``_N``-named submodules, and differs, as
documented, where a submodule's own name ends in ``_N`` (torchvision strips and renumbers).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

import autoprobe
from autoprobe.backends import LADDER, trace_with_fallbacks
from autoprobe.trace import NodeNamer
from toy_models import SliceThenShared


class Dup(nn.Module):
    """Issue 12: the second call of ``conv`` and the module ``conv_1`` were both named ``conv_1``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_1 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv_1(self.conv(self.conv(self.stem(x)))).mean((2, 3)))


class Suffixed(nn.Module):
    """Submodules named ``conv_1``/``conv_2`` and a repeated functional call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv_1(x))
        x = F.relu(self.conv_2(x)) + x
        return self.fc(x.mean((2, 3)))


class Plain(nn.Module):
    """No ``_N`` names: a module called twice and functions repeated in a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.act(self.block(x) + x)
        x = self.block(x) + x
        return self.fc(x.mean((2, 3)))


class FunctionAndModule(nn.Module):
    """A top-level ``F.relu`` next to a module ``relu`` (issue 12.3): the path stays the module's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))


def names(model: nn.Module, backend: str = "fx") -> list[str]:
    return [n.name for n in trace_with_fallbacks(model, (3, 16, 16), backends=(backend,)).graph]


def test_the_namer_reserves_module_paths_and_numbers_repeats_around_them() -> None:
    namer = NodeNamer(["conv", "conv_1", "relu"])
    assert namer.name("relu", module=False) == "relu_1"  # a function may not take a module's path
    assert namer.name("conv", module=True) == "conv"
    assert namer.name("conv", module=True) == "conv_2"  # conv_1 is a module
    assert namer.name("conv_1", module=True) == "conv_1"
    assert namer.name("conv", module=True) == "conv_3"
    assert namer.name("relu", module=True) == "relu"


@pytest.mark.parametrize("backend", LADDER)
def test_dup_model_names_are_unique_and_calls_are_known(backend: str) -> None:
    graph = trace_with_fallbacks(Dup(), (3, 16, 16), backends=(backend,)).graph
    got = [n.name for n in graph]
    assert len(got) == len(set(got))
    assert [(n.name, n.call) for n in graph if n.call and n.call[0].startswith("conv")] == [
        ("conv", ("conv", 0)), ("conv_2", ("conv", 1)), ("conv_1", ("conv_1", 0))
    ]


def test_dup_model_inspects() -> None:
    selection = autoprobe.inspect(Dup(), input_size=(3, 16, 16))
    assert selection.points


@pytest.mark.parametrize("backend", LADDER)
def test_a_function_never_takes_a_module_path(backend: str) -> None:
    graph = trace_with_fallbacks(FunctionAndModule(), (3, 16, 16), backends=(backend,)).graph
    assert graph["relu"].call == ("relu", 0)
    if backend != "hooks":  # hooks sees module calls only
        assert graph["relu_1"].call is None and graph["relu_1"].order < graph["relu"].order


def test_names_agree_with_torchvision_without_suffixed_modules() -> None:
    model = Plain()
    _, tv = get_graph_node_names(model)
    ours = names(model)
    assert ours[:-1] == tv  # torchvision lists no output node
    assert "block.0_1" in ours and "add_1" in ours and "act_1" in ours


def test_names_keep_module_paths_where_torchvision_renumbers() -> None:
    model = Suffixed()
    _, tv = get_graph_node_names(model)
    ours = names(model)
    # torchvision strips the module's own _N and renumbers: conv_1, conv_2 become conv, conv_1
    assert [n for n in tv if n.startswith("conv")] == ["conv", "conv_1"]
    assert [n for n in ours if n.startswith("conv")] == ["conv_1", "conv_2"]
    # repeated functions are numbered the same way by both
    assert [n for n in ours if n.startswith(("relu", "add"))] == [n for n in tv if n.startswith(("relu", "add"))]


@pytest.mark.parametrize("backend", LADDER)
def test_every_backend_names_module_outputs_alike(backend: str) -> None:
    fx_names = {n for n in names(Dup(), "fx") if n not in ("x", "output", "mean")}
    assert fx_names <= set(names(Dup(), backend))


def test_export_names_each_call_of_a_shared_module_and_taps_catch_it() -> None:
    analysis = autoprobe.api.analyze(SliceThenShared(), input_size=(3, 16, 16))
    graph = analysis.graph
    assert analysis.selection.backend == "export"
    assert graph["relu_1"].call is None  # the top-level F.relu, not a call of the module
    assert [graph[f"relu{s}"].call for s in ("", "_2", "_3", "_4", "_5")] == [("relu", i) for i in range(5)]
    assert [graph[f"relu{s}"].shape[-1] for s in ("", "_2", "_3", "_4", "_5")] == [16, 16, 8, 8, 4]
    probed = autoprobe.instrument(SliceThenShared(), analysis.selection, input_size=(3, 16, 16))
    out = probed(torch.randn(2, 3, 16, 16))
    assert {t.point: tuple(t.feature_shape) for t in probed.report.taps} == {
        k: tuple(v.shape) for k, v in out.features.items()
    }


class DropConnect(nn.Module):
    """smp's EfficientNet block end: in train mode only, a random mask drawn without the input's data
    (``keep_prob + torch.rand(...)``, an ``add``) comes before the residual ``add``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.training:
            mask = 0.8
            mask += torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device)
            y = y / 0.8 * torch.floor(mask)
        return self.fc((x + y).mean((2, 3)))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_train_only_mask_does_not_renumber_the_data_ops(mode: str) -> None:
    traced = trace_with_fallbacks(DropConnect(), (4, 8, 8), autoprobe.TraceOptions(mode=mode)).traced
    names = {q: n for n, q in traced.qualnames.items()}
    residual = traced.graph_module.graph.find_nodes(op="call_function", target=__import__("operator").add)
    assert traced.backend == "fx"
    assert tuple(next(n for n in residual if n.name == names["add"]).meta["tensor_meta"].shape) == (2, 4, 8, 8)


def test_a_point_after_a_train_only_mask_instruments() -> None:
    model = DropConnect()
    selection = autoprobe.analyze(model, input_size=(4, 8, 8)).choose("add")
    probed = autoprobe.instrument(model, selection=selection, input_size=(4, 8, 8))
    assert [t.point for t in probed.report.taps] == ["add"]
    probed.train()
    out = probed(torch.randn(2, 4, 8, 8))
    assert out.features["add"].shape == (2, 4, 8, 8)
