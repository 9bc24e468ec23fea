"""Tracing and the layer graph: depth D, layouts, names, and a live model left untouched."""

from __future__ import annotations

import resource
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18
from torchvision.models.feature_extraction import get_graph_node_names

from autoprobe.models import resolve_model
from autoprobe.trace import TraceOptions, trace_fx
from conftest import graph_of, snapshot
from toy_models import ATTENTIONS, Branchy, ChannelsLast, ToyTransformer, ToyUNet, TrainOnlyScale, conv_chain


# ----------------------------------------------------------------------------- depth


def test_depth_of_three_convs_and_a_linear() -> None:
    g = graph_of(conv_chain(), (3, 8, 8))
    assert g.depth == 4
    assert [n.name for n in g if n.weight] == ["0", "2", "4", "6"]


@pytest.mark.parametrize(("spec", "depth"), [("resnet18", 18), ("tv:resnet18", 18), ("resnet50", 50)])
def test_depth_of_resnets(spec: str, depth: int) -> None:
    model = resolve_model(spec).module
    assert graph_of(model, (3, 64, 64)).depth == depth


def test_depth_counts_attention_projections() -> None:
    # patch conv + 2 x (qkv, proj, fc1, fc2) + head
    for kind in ("sdpa", "explicit"):
        assert graph_of(ToyTransformer(ATTENTIONS[kind])).depth == 10, kind


def test_leaf_block_counts_every_weight_layer_inside() -> None:
    # The middle block kept whole by fx (a leaf, like timm's notrace blocks) holds two convs:
    # conv, [conv, conv], linear is four weight layers deep, as the traced model is.
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)),
        nn.Flatten(), nn.Linear(4 * 10 * 10, 2),
    )
    traced = graph_of(model, (3, 16, 16))
    leaf = graph_of(model, (3, 16, 16), leaf_paths=["1"])
    assert traced.depth == leaf.depth == 4
    assert leaf["1"].depth == 3 and leaf["1"].weight


def test_depth_is_the_longest_path() -> None:
    g = graph_of(ToyUNet())
    # enc1 3 (conv + residual 2), enc2 3, bottom 3, up2 1, dec2 1, up1 1, dec1 1, head 1
    assert g.depth == 14
    assert g["join1.add"].depth == 12  # max of its inputs, not of the shallow skip (depth 3)


# ----------------------------------------------------------------------------- layouts


def test_layouts_nchw_nhwc_nlc() -> None:
    g = graph_of(ChannelsLast())
    assert (g["conv"].layout, g["conv"].channels, g["conv"].spatial) == ("NCHW", 8, (16, 16))
    assert (g["norm"].layout, g["norm"].channels, g["norm"].spatial) == ("NHWC", 8, (16, 16))
    assert (g["fc"].layout, g["fc"].channels, g["fc"].spatial) == ("NLC", 8, (256,))


def test_tokens_are_nlc() -> None:
    g = graph_of(ToyTransformer(ATTENTIONS["sdpa"]))
    assert (g["transpose"].layout, g["transpose"].channels, g["transpose"].positions) == ("NLC", 32, 16)
    assert (g["blocks.0.mlp.1"].layout, g["blocks.0.mlp.1"].channels) == ("NLC", 128)


def test_attention_scores_have_no_channel_axis() -> None:
    g = graph_of(ToyTransformer(ATTENTIONS["explicit"]))
    for name in ("blocks.0.attn.matmul", "blocks.0.attn.mul", "blocks.0.attn.softmax", "blocks.0.attn.matmul_1"):
        assert (g[name].layout, g[name].channels, g[name].spatial) == (None, None, None), name


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("build", [resnet18, ToyUNet, lambda: ToyTransformer(ATTENTIONS["explicit"])])
def test_names_match_torchvision_feature_extraction(build: Callable[[], nn.Module]) -> None:
    model = build()
    expected = get_graph_node_names(model)[1]  # eval-mode names, without the output node
    traced = trace_fx(model, (3, 32, 32))
    assert list(traced.qualnames.values()) == [*expected, "output"]


def test_graph_nodes_are_keyed_by_qualified_name() -> None:
    g = graph_of(ToyUNet())
    assert g["join2.cat"].kind == "cat"
    assert (g["join2.cat"].module_path, g["join2.cat"].module_type) == ("join2", "CatJoin")
    assert (g["enc1.1.conv1"].module_path, g["enc1.1.conv1"].module_type) == ("enc1.1.conv1", "Conv2d")


def test_spine_of_a_residual_block_skips_the_branch() -> None:
    g = graph_of(Branchy())
    assert "block.conv1" not in g.spine and "block.add" in g.spine and "bn" in g.spine


# ----------------------------------------------------------------------------- the user's model


@pytest.mark.parametrize("train", [True, False])
def test_live_model_is_not_mutated(train: bool) -> None:
    model = Branchy()
    model.train()
    model.block.eval()  # mixed flags must come back exactly
    with torch.no_grad():
        model.bn.running_mean.uniform_()
    before = snapshot(model)
    traced = trace_fx(model, (3, 16, 16), TraceOptions(mode="train" if train else "eval"))
    assert traced.mode == ("train" if train else "eval")
    assert snapshot(model) == before
    assert int(model.bn.num_batches_tracked) == 0
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_train_flag_selects_the_traced_graph() -> None:
    model = TrainOnlyScale().eval()
    assert "mul" in graph_of(model, (3, 8, 8), mode="train")
    assert "mul" not in graph_of(model, (3, 8, 8), mode="eval")
    assert model.training is False


def test_live_model_sees_no_real_tensor() -> None:
    model = Branchy()
    seen = []
    model.stem.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    trace_fx(model, (3, 16, 16))
    # Shape propagation runs the recorded graph on plain meta tensors (no FakeTensor mode, no real data).
    assert seen and all(type(t) is torch.Tensor and t.device.type == "meta" for t in seen)


def test_meta_model_allocates_no_real_memory() -> None:
    width = 1 << 14  # two 16384x16384 layers: 2 GiB of float32 if they were ever materialised
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    g = graph_of(model, (width,))
    assert g.depth == 2 and g["2"].shape == (2, width)
    assert all(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024


def test_model_built_from_a_name_is_on_meta() -> None:
    model = resolve_model("resnet50").module
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}


def test_constructor_that_reads_tensor_values_still_builds_on_meta() -> None:
    # torchvision's RegNet computes its stage widths with tensors and `.tolist()`, which a
    # meta tensor cannot answer: the weights go to meta as they are registered instead.
    model = resolve_model("tv:regnet_x_400mf").module
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}
    assert nn.Module.register_parameter.__qualname__ == "Module.register_parameter"  # the patch is undone
    assert graph_of(model, (3, 64, 64)).depth > 20


def test_a_dataclass_output_is_traced_through_its_fields() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        features: torch.Tensor

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> Out:
            y = torch.relu(self.conv(x))
            return Out(self.fc(y.mean((2, 3))), y)

    g = graph_of(Net(), (3, 8, 8))
    assert g.depth == 2 and [n.name for n in g if n.weight] == ["conv", "fc"]


# ----------------------------------------------------------------------------- "input too small"


class _Placeholder(nn.Module):
    """smp's MiT encoder: a ``torch.empty(B, 0, H, W)`` stage output the decoder never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        features = [torch.empty([b, 0, h, w], dtype=x.dtype, device=x.device), self.conv(x)]
        return self.head(features[-1]) + features[0].sum()


class _NoPrefixTokens(nn.Module):
    """timm's rotary attention: ``q[:, :, :npt]`` with no prefix tokens is empty at every size."""

    def __init__(self, prefix: int = 0) -> None:
        super().__init__()
        self.prefix = prefix
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.embed(x).flatten(2).transpose(1, 2)
        q = torch.cat([q[:, : self.prefix], q[:, self.prefix :] * 2], dim=1)
        return self.proj(q)


class _Strided(nn.Module):
    """A 4x4-stride pooling after a valid 3x3 conv: a 2x2 input pools to 0x0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.pool = nn.AvgPool2d(4, stride=4, ceil_mode=False)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("model", [_Placeholder, _NoPrefixTokens], ids=["placeholder", "empty-slice"])
def test_a_zero_size_axis_the_model_makes_on_purpose_is_not_the_inputs_fault(model: Callable[[], nn.Module]) -> None:
    traced = trace_fx(model(), (3, 16, 16))
    empty = [n for n in traced.graph_module.graph.nodes if 0 in tuple(getattr(n.meta.get("tensor_meta"), "shape", ()))]
    assert empty  # the model does make a zero-size tensor, and tracing carries on


class _FunctionalStrided(_Strided):
    """The same pooling written as a function call: the op registry knows it is windowed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.avg_pool2d(self.conv(x), 4, stride=4).mean((2, 3)))


@pytest.mark.parametrize("model, pool_target", [(_Strided, "pool"), (_FunctionalStrided, F.avg_pool2d)],
                         ids=["module", "function"])
def test_a_windowed_op_that_shrinks_the_input_to_nothing_blames_the_input(model: Callable[[], nn.Module],
                                                                          pool_target: object) -> None:
    from autoprobe.errors import InputSizeError
    from autoprobe.trace import check_spatial

    traced = trace_fx(model(), (3, 8, 8))
    pool = next(n for n in traced.graph_module.graph.nodes if n.target == pool_target)
    # Shape the pool's output as a 2x2 input would have (0x0), without the kernel's own size check.
    meta = pool.meta["tensor_meta"]
    pool.meta["tensor_meta"] = meta._replace(shape=torch.Size((2, 8, 0, 0)))
    with pytest.raises(InputSizeError, match=rf"smaller than the model's total stride: node '{pool.name}' has shape \(2, 8, 0, 0\)"):
        check_spatial(traced)


# ----------------------------------------------------------------------------- one pass


@pytest.mark.parametrize("spec", ["resnet18", "live"])
def test_instrument_traces_each_mode_once(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18.1: the selection's eval trace is reused; only the train mode is traced again."""
    from autoprobe import trace
    from autoprobe.rewrite import instrument

    modes: list[str] = []
    trace_fx = trace.trace_fx

    def counted(model, size, options=trace.TraceOptions(), **kwargs):  # noqa: ANN001, ANN003, ANN202
        modes.append(options.mode)
        return trace_fx(model, size, options, **kwargs)

    for module in ("autoprobe.trace", "autoprobe.backends", "autoprobe.rewrite", "autoprobe.fx_engine"):
        monkeypatch.setattr(f"{module}.trace_fx", counted, raising=False)
    monkeypatch.setitem(__import__("autoprobe.backends").backends._TRACERS, "fx", counted)
    probed = instrument("resnet18" if spec == "resnet18" else resnet18(num_classes=10), input_size=(3, 64, 64))
    assert sorted(modes) == ["eval", "train"]
    assert probed.selection.model == ("resnet18" if spec == "resnet18" else "ResNet")


def test_a_failing_axis_rule_raises_with_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    # A rule that cannot read its arguments is a bug to report, not a point silently left without a layout.
    import autoprobe.axes as axes

    def broken(args: tuple, kwargs: dict, env: object) -> None:
        raise IndexError("tuple index out of range")

    monkeypatch.setitem(axes._RULES, "relu", broken)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x))

    with pytest.raises(axes.AxisRuleError, match=r"axis rule of op 'relu' failed at node 'relu'.*IndexError"):
        graph_of(Net(), (3, 8, 8))
