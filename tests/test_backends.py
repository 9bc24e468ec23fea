"""The tracing fallback ladder: fx -> torch.export -> forward hooks.

Each model here is one fx cannot trace, for a reason users' models really have
(a branch on ``x.device``, a branch on tensor values); a branch on ``x.ndim`` fx now
specializes to the traced size (tests/test_meta_tracer.py). The ladder must pick the
next backend that works, still produce a selection with at least one point,
and say which backend it used and why it fell back.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprobe import TraceOptions, api
from autoprobe.api import analyze
from autoprobe.backends import LADDER, trace_export, trace_hooks, trace_with_fallbacks
from autoprobe.errors import InputSizeError, TraceError
from autoprobe.graph import build_layer_graph
from autoprobe.ops import OPS
from autoprobe.report import selection_to_dict
from autoprobe.trace import TraceOptions
from autoprobe.trace import trace_fx
from toy_models import BranchyNet as Net

SIZE = (3, 32, 32)


def _on_meta(branch: str) -> Net:
    with torch.device("meta"):
        return Net(branch)


def test_ladder_order_is_fx_export_hooks():
    assert LADDER == ("fx", "export", "hooks")


def test_traceable_model_stays_on_fx_without_notes():
    selection = analyze(_on_meta("none"), input_size=SIZE).selection
    assert selection.backend == "fx"
    assert not any(n.startswith("backend ") for n in selection.notes)


def test_shape_branch_stays_on_fx_specialized():
    selection = analyze(_on_meta("ndim"), input_size=SIZE).selection
    assert selection.backend == "fx"
    assert any(n.startswith("fx specialized the graph to input shape (2, 3, 32, 32)") for n in selection.notes), selection.notes


def test_device_branch_falls_back_to_export():
    analysis = analyze(_on_meta("device"), input_size=SIZE)
    selection = analysis.selection
    assert selection.backend == "export"
    assert analysis.graph.backend == "export"
    assert len(selection.points) >= 1
    assert any("backend fx failed" in n and "x.device.type" in n for n in selection.notes), selection.notes
    assert "fell back to backend export" in selection.notes
    assert selection_to_dict(selection, analysis.graph)["backend"] == "export"


def test_export_graph_matches_fx_graph_on_a_traceable_model():
    model = _on_meta("none")
    fx_graph = build_layer_graph(trace_fx(model, SIZE))
    export_graph = build_layer_graph(trace_export(model, SIZE))
    assert export_graph.depth == fx_graph.depth == 7
    weights = lambda g: [n.name for n in g if n.weight]  # noqa: E731
    assert weights(export_graph) == weights(fx_graph)
    # torch.nn leaves keep their paths and functions their module scope, as under fx.
    for name in ("stem.0", "stem.1", "stem.2", "stage1.0.add", "stage1.0.act", "down.0", "head"):
        assert name in export_graph and name in fx_graph
        assert export_graph[name].kind == fx_graph[name].kind
        assert export_graph[name].shape == fx_graph[name].shape
    assert export_graph["stem.1"].norm == "batch"
    assert export_graph["stem.2"].act == "relu"


def test_export_selection_matches_fx_on_a_real_model(analysed):
    from autoprobe.models import resolve_model
    from autoprobe.rules import load_rules
    from autoprobe.select import select_points

    resolved = resolve_model("tv:resnet18")
    via_export = trace_with_fallbacks(resolved.module, resolved.input_size, backends=("export",))
    selection = select_points(via_export.graph, load_rules(), model="tv:resnet18")
    reference = analysed("tv:resnet18").selection
    assert (selection.backend, reference.backend) == ("export", "fx")
    assert selection.depth == reference.depth
    assert selection.names == reference.names


def test_aten_aliases_name_kinds_graph_py_knows():
    # An ATen op shown under a functional name reads that name's kind: the name must be an op with one.
    shown = {op.name: op.shown for op in OPS.values() if op.shown}
    assert shown and all(OPS[name].kind for name in shown.values())


def test_value_branch_on_a_live_model_needs_allow_real_data():
    # inspect promises not to run the model on data: a forward that reads values is refused,
    # and the message names the option that allows the one real run.
    model = Net("value")
    with pytest.raises(TraceError, match="allow_real_data=True"):
        analyze(model, input_size=SIZE)


def test_value_branch_on_a_live_model_falls_back_to_hooks():
    torch.manual_seed(0)
    model = Net("value")
    selection = analyze(model, input_size=SIZE, options=TraceOptions(allow_real_data=True)).selection
    assert any("ran the model once on real values" in n for n in selection.notes)
    assert selection.backend == "hooks"
    assert len(selection.points) >= 1
    failed = [n for n in selection.notes if n.startswith("backend ")]
    assert [n.split()[1] for n in failed] == ["fx", "export"]
    assert "fell back to backend hooks" in selection.notes


def test_value_branch_on_meta_fails_with_every_reason():
    with pytest.raises(TraceError) as caught:
        analyze(_on_meta("value"), input_size=SIZE)
    message = str(caught.value)
    for backend in LADDER:
        assert f"  - {backend}: " in message
    assert "x.sum() > 0" in message


def test_hooks_graph_joins_the_branches_of_a_residual_add():
    graph = build_layer_graph(trace_hooks(_on_meta("none"), SIZE))
    assert graph.backend == "hooks"
    # The add is a function, not a module: the ReLU after it must see both the block and the skip.
    preds = {p.name for p in graph.predecessors("stage1.0.act")}
    assert preds == {"stage1.0.body.2", "stem.2"}
    assert graph.depth == 7


@pytest.mark.parametrize("backend", ["export", "hooks"])
def test_fallback_backends_leave_a_live_model_untouched(backend):
    torch.manual_seed(0)
    model = Net("none").eval()
    model.stage1.train()  # mixed flags must come back exactly as they were
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trace_with_fallbacks(model, SIZE, TraceOptions(mode="train"), backends=(backend,))
    assert [m.training for m in model.modules()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_wrong_input_size_is_still_an_input_size_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    with pytest.raises(InputSizeError) as caught:
        analyze(model, input_size=(3, 32, 32))
    # The size is wrong for the model's own code: no other backend is tried, the message stays short.
    assert "does not fit the model" in str(caught.value) and "export" not in str(caught.value)


def test_unknown_backend_is_refused():
    with pytest.raises(TraceError, match="unknown tracing backends"):
        trace_with_fallbacks(_on_meta("none"), SIZE, backends=("jit",))


def test_no_point_on_fx_retries_a_finer_backend(monkeypatch):
    real = api.select_points

    def fx_finds_nothing(graph, pack, **kwargs):
        selection = real(graph, pack, **kwargs)
        return selection if graph.backend != "fx" else api.replace(selection, points=())

    monkeypatch.setattr(api, "select_points", fx_finds_nothing)
    selection = analyze(_on_meta("none"), input_size=SIZE).selection
    assert selection.backend == "export"
    assert len(selection.points) >= 1
    assert any("backend fx gave no eligible point" in n for n in selection.notes)


class _UsesShared(nn.Module):
    def __init__(self, shared: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shared(self.conv(x))


class SharedModule(nn.Module):
    """One module owned by the root and by two blocks, as CoaT shares its ``crpe`` convs."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # registered first: its name is "pos"
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_UsesShared(self.pos), _UsesShared(self.pos))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("backend", ["export", "hooks"])
def test_a_shared_module_keeps_its_first_name(backend):
    with torch.device("meta"):
        model = SharedModule()
    graph = trace_with_fallbacks(model, SIZE, backends=(backend,)).graph
    names = [n.name for n in graph if n.weight]
    assert names[:3] == ["stem", "blocks.0.conv", "pos"]
    assert "pos_1" in names  # the second call of the same module


class _Keywords(nn.Module):
    """Called as ``model(pixel_values=x, scale=s, deep=True)``: the input is not the first parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.extra = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids=None, pixel_values=None, scale=None, deep=False):  # noqa: ANN001, ANN201
        x = self.stem(pixel_values) * scale
        if deep:
            x = self.extra(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("backend", LADDER)
def test_keyword_input_and_extra_inputs_on_every_backend(backend):
    options = TraceOptions(input_name="pixel_values", forward_kwargs={"scale": torch.ones(2, 8, 1, 1), "deep": True})
    graph = trace_with_fallbacks(_Keywords(), SIZE, options, backends=(backend,)).graph
    assert graph.depth == 3  # stem, extra (deep=True reached the forward), head
    assert graph[graph.input].shape == (2, *SIZE)
    shallow = trace_with_fallbacks(_Keywords(), SIZE, TraceOptions(input_name="pixel_values",
                                   forward_kwargs={"scale": torch.ones(2, 8, 1, 1)}), backends=(backend,)).graph
    assert shallow.depth == 2


def test_an_unusable_graph_sends_the_climb_to_the_finer_rungs() -> None:
    # analyze's rule (a graph without a point is not usable) lives in the ladder: a refused fx graph
    # is replaced by export's, and the notes say which rungs were retried.
    finer = trace_with_fallbacks(Net(), SIZE, usable=lambda graph: graph.backend != "fx")
    assert finer.backend == "export"
    assert "backend fx gave no eligible point; retried with ['export', 'hooks']" in finer.notes
    kept = trace_with_fallbacks(Net(), SIZE, usable=lambda graph: False)
    assert kept.backend == "fx"
    assert kept.notes[-1] == "backend export gave no eligible point either; kept fx"


# --------------------------------------------------------------------- fx takes the model's branch (issue 25.3)

class TypeBranchy(nn.Module):
    """Branches on the input's type, as MONAI's BasicUNetPlusPlus does (``torch.jit.isinstance(x, torch.Tensor)``).

    ``how`` picks the check: ``isinstance``, ``jit`` (``torch.jit.isinstance``) or ``type`` (``type(x) is
    torch.Tensor``, which no Proxy can answer). The other branch runs ``wrong``, whose 5 input channels never come.
    """

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.wrong = nn.Conv2d(5, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def is_tensor(self, x: torch.Tensor) -> bool:
        if self.how == "isinstance":
            return isinstance(x, torch.Tensor)
        if self.how == "jit":
            return torch.jit.isinstance(x, torch.Tensor)
        return type(x) is torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x) if self.is_tensor(x) else self.wrong(x)
        x = self.b(x).relu() if self.is_tensor(x) else self.wrong(x)
        return self.head(x)


@pytest.mark.parametrize("how", ["isinstance", "jit"])
def test_fx_takes_the_branch_an_isinstance_tensor_check_takes(how: str) -> None:
    model = TypeBranchy(how)
    traced = trace_fx(model, (3, 8, 8))
    called = [str(n.target) for n in traced.graph_module.graph.find_nodes(op="call_module")]
    assert called == ["a", "b", "head.0", "head.1", "head.2"]
    selection = analyze(model, input_size=(3, 8, 8)).selection
    assert selection.backend == "fx" and not any("failed" in note for note in selection.notes)
    # fx's own checks still see a Proxy: a tensor argument is not taken for a constant.
    assert not [n for n in traced.graph_module.graph.nodes if n.op == "get_attr" and "_tensor_constant" in str(n.target)]


def test_a_branch_fx_cannot_take_falls_to_export_with_a_note_not_an_input_size_error() -> None:
    # type(x) is torch.Tensor is False for any Proxy: fx's program runs `wrong` and fails on its channels, at a
    # size the model itself runs at. That is no InputSizeError: the next rungs run the model's own Python
    # (export's FakeTensor is no plain Tensor either, so the hooks rung, on meta tensors, is the one that works).
    model = TypeBranchy("type")
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    selection = analyze(model, input_size=(3, 8, 8)).selection
    assert selection.backend in ("export", "hooks")
    assert any("fx's graph failed at a size the model itself runs at" in note for note in selection.notes)
    assert "wrong" not in {p.module_path for p in selection.points}


# --------------------------------------------------------------------- an input too small for the model (issue 25.4)

class Window(nn.Module):
    """Refuses a map narrower than its window, as MONAI's SwinUNETR stages do at a too small input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] >= 4, "the feature map is smaller than the window"
        return self.conv(x)


class Shrinking(nn.Module):
    """Two stride-2 convs, then a window (``tail="window"``) or a 5x5 valid conv (``tail="kernel"``)."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        last = Window() if tail == "window" else nn.Conv2d(8, 8, 5)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), last
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("tail", ["window", "kernel"])
def test_an_input_the_plain_model_refuses_is_an_input_size_error(tail: str) -> None:
    model = Shrinking(tail)
    with pytest.raises((AssertionError, RuntimeError)):
        model(torch.randn(2, 3, 8, 8))  # plain PyTorch refuses it too
    with pytest.raises(InputSizeError) as info:
        analyze(model, input_size=(3, 8, 8))
    assert "no tracing backend" not in str(info.value) and "Hint: pass" in str(info.value)
    if tail == "window":  # every rung failed in the model's own code: the size it runs at is searched for
        assert "runs at (3, 16, 16)" in str(info.value)
        assert str(info.value).endswith("e.g. input_size=(3, 16, 16) (input_size=(3, 8, 8) fails).")


# --------------------------------------------------------------------- detection models: the backbone alone (issue 25.5)

class Detector(nn.Module):
    """A backbone, then a head that keeps the images with a positive score (a value read), one record per image."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.score = nn.Conv2d(16, 1, 1)

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        scores = self.score(self.backbone(x)).flatten(1)
        return [{"scores": s} for s in scores if s.max() > 0]  # a branch on values per image, as NMS keeps boxes


def test_a_model_no_backend_traces_is_inspected_through_its_backbone_with_a_note() -> None:
    import autoprobe
    from autoprobe.errors import InstrumentError

    model = Detector()
    selection = autoprobe.inspect(model, input_size=(3, 32, 32))
    assert selection.points and all(p.name.startswith("backbone.") for p in selection.points)
    assert any("traced its `backbone` submodule alone" in note for note in selection.notes)
    with pytest.raises(InstrumentError) as info:
        autoprobe.instrument(model, input_size=(3, 32, 32))
    assert "`backbone` submodule alone" in str(info.value)
    assert str(info.value).splitlines()[-1].startswith("Hint: supervise the backbone as a model of its own")
    # The selection inspect showed, given back: the same refusal, not the whole model's TraceError.
    with pytest.raises(InstrumentError, match="`backbone` submodule alone"):
        autoprobe.instrument(model, selection, input_size=(3, 32, 32))


def test_torchvision_mask_rcnn_shows_backbone_points_without_a_download() -> None:
    import autoprobe
    from autoprobe.models import resolve_model

    model = resolve_model("tv:maskrcnn_resnet50_fpn").module  # weights and weights_backbone off: no download
    selection = autoprobe.inspect(model, input_size=(3, 128, 128))
    assert selection.points and all(p.name.startswith("backbone.") for p in selection.points)
    assert any("`backbone` submodule alone" in note for note in selection.notes)
