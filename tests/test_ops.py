"""The op registry (autoprobe/ops.py): one entry per op, one key on every backend, modules by type."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprobe import axes, ops
from autoprobe.backends import trace_export, trace_hooks
from autoprobe.graph import build_layer_graph
from autoprobe.trace import trace_fx

aten = torch.ops.aten


class Functional(nn.Module):
    """Every op a function or method call, so the graph's kinds come from the op registry alone."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, padding=1)
        y = F.batch_norm(y, None, None, self.scale, None, training=True)
        y = F.relu6(y) + torch.sigmoid(y)
        y = F.max_pool2d(y, 2)
        return y.flatten(2).transpose(1, 2).view(y.shape[0], -1, 8)


def _kinds(graph) -> dict[str, tuple[str, str, str]]:
    return {i.target: (i.kind, i.norm or i.act, i.layout and i.layout.value) for i in graph if i.op == "call_function"
            or i.op == "call_method"}


def test_function_and_method_calls_take_kind_family_and_layout_from_the_registry() -> None:
    kinds = _kinds(build_layer_graph(trace_fx(Functional(), (3, 8, 8))))
    assert kinds["conv2d"] == ("conv", "", "NCHW")
    assert kinds["batch_norm"] == ("norm", "batch", "NCHW")
    assert kinds["relu6"] == ("act", "relu6", "NCHW")
    assert kinds["sigmoid"] == ("gate", "", "NCHW")
    assert kinds["add"] == ("add", "", "NCHW")
    assert kinds["max_pool2d"] == ("pool", "", "NCHW")
    assert kinds["flatten"] == ("reshape", "", "NCL")
    assert kinds["transpose"] == ("reshape", "", "NLC")
    assert kinds["view"] == ("reshape", "", "NLC")


@pytest.mark.parametrize(
    ("targets", "kind", "rule"),
    [
        ((F.conv2d, torch.conv2d, aten.conv2d.default, aten.convolution.default, aten._convolution.default),
         "conv", "channels_first"),
        ((operator.add, "add", "add_", "__add__", torch.Tensor.__radd__, operator.iadd, aten.add.Tensor,
          aten.add_.Tensor), "add", "elementwise"),
        (("view", torch.Tensor.view, aten.view.default, aten._unsafe_view.default, "reshape", aten.view_as.default),
         "reshape", "view"),
        ((F.layer_norm, aten.layer_norm.default, aten.native_layer_norm.default), "norm", "layer_norm"),
        ((F.relu, torch.relu_, "relu_", aten.relu.default, aten.relu_.default), "act", "elementwise"),
    ],
)
def test_every_backend_spelling_of_an_op_finds_the_same_kind_and_axis_rule(targets: tuple, kind: str,
                                                                             rule: str) -> None:
    # fx function targets, fx method names, the hooks backend's torch functions and export's ATen overloads.
    for target in targets:
        entry = ops.lookup(target)
        assert entry is not None, target
        assert (entry.kind, entry.rule) == (kind, rule), target
        assert axes._RULES[entry.name] is axes._RULE_FUNCTIONS[rule]


def test_export_and_hooks_graphs_read_the_same_kinds_as_fx() -> None:
    model, size = Functional(), (3, 8, 8)
    fx_kinds = {i.kind for i in build_layer_graph(trace_fx(model, size))}
    export = build_layer_graph(trace_export(model, size))
    assert {"conv", "norm", "act", "gate", "add", "pool", "reshape"} <= {i.kind for i in export} == fx_kinds
    shown = {i.target: i.kind for i in export if i.op == "call_function"}
    assert shown["conv2d"] == "conv" and shown["batch_norm"] == "norm"  # ATen's convolution, native_batch_norm
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(), nn.Flatten(), nn.Linear(144, 2))
    hooks = [(i.kind, i.norm or i.act) for i in build_layer_graph(trace_hooks(net, size)) if i.op == "call_module"]
    assert hooks == [("conv", ""), ("norm", "batch"), ("act", "relu6"), ("other", ""), ("linear", "")]


def test_an_aten_op_is_shown_under_its_functional_name() -> None:
    assert ops.shown_name(aten.convolution.default) == "conv2d"
    assert ops.shown_name(aten._native_batch_norm_legit_no_training.default) == "batch_norm"
    assert ops.shown_name(aten._adaptive_avg_pool2d.default) == "adaptive_avg_pool2d"  # unshown: the private _ goes
    assert ops.OPS["hardtanh"].family == "relu6"  # F.relu6 exports as hardtanh
    # An in-place op keeps its trailing _ on every backend (fx shows torch.relu_ as relu_), renamed or not.
    assert (ops.shown_name(aten.relu_.default), ops.shown_name(aten.silu_.default)) == ("relu_", "silu_")
    assert ops.shown_name(aten.hardtanh_.default) == "relu6_" and ops.lookup(aten.hardtanh_.default).kind == "act"


def test_view_and_in_place_ops_are_marked_for_the_alias_analysis() -> None:
    for target in ("view", "__getitem__", operator.getitem, torch.flatten, "contiguous", "to", torch.t):
        assert ops.lookup(target).view, target
    for target in (operator.iadd, operator.imul, operator.setitem, operator.ixor):
        assert ops.lookup(target).in_place, target
    assert not ops.lookup(torch.relu).view and not ops.lookup(operator.add).in_place


def test_an_op_is_one_entry_and_names_a_bound_rule() -> None:
    assert axes._RULE_FUNCTIONS.keys() == ops.RULE_NAMES
    with pytest.raises(ValueError, match="registered twice"):
        ops._index(ops._ops("conv", "channels_first", ("conv2d",)), ops._ops("linear", "linear", ("conv2d",)))
    with pytest.raises(ValueError, match="not in RULE_NAMES"):
        ops._index(ops._ops("conv", "no_such_rule", ("conv2d",)))
    for name in ("mul_", "add_", "sigmoid_", "dropout_", "glu_like", "conv_tbc_like"):
        assert name not in ops.OPS  # op_name strips a trailing _, and the *_like keys named no op
    assert ops.op_name("sigmoid_") == "sigmoid" and ops.lookup("sigmoid_").kind == "gate"


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.Conv2d(3, 4, 3), ("conv", "")),
        (nn.ConvTranspose1d(3, 4, 3), ("conv", "")),
        (nn.Linear(3, 4), ("linear", "")),
        (nn.Bilinear(3, 3, 4), ("linear", "")),
        (nn.BatchNorm2d(4), ("norm", "batch")),
        (nn.SyncBatchNorm(4), ("norm", "batch")),
        (nn.InstanceNorm2d(4), ("norm", "instance")),
        (nn.LayerNorm(4), ("norm", "layer")),
        (nn.GroupNorm(2, 4), ("norm", "group")),
        (nn.RMSNorm(4), ("norm", "rms")),
        (nn.ReLU6(), ("act", "relu6")),
        (nn.GELU(), ("act", "gelu")),
        (nn.LeakyReLU(), ("act", "leakyrelu")),
        (nn.Sigmoid(), ("gate", "")),
        (nn.LogSigmoid(), ("gate", "")),
        (nn.Softmax(-1), ("softmax", "")),
        (nn.MaxPool2d(2), ("pool", "")),
        (nn.AdaptiveAvgPool2d(1), ("pool", "")),
        (nn.Upsample(scale_factor=2), ("resize", "")),
        (nn.Dropout(), ("identity", "")),
        (nn.Identity(), ("identity", "")),
        (nn.MultiheadAttention(8, 2), ("attention", "")),
        (nn.Flatten(), ("other", "")),
        (nn.Embedding(4, 4), ("weight", "")),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_torch_nn_modules_are_classified_by_type(module: nn.Module, expected: tuple[str, str]) -> None:
    found = ops.module_kind(module)
    assert (found.kind, found.family) == expected


def test_a_subclass_is_its_registered_base_whatever_its_name() -> None:
    class LinearNormalizer(nn.Conv2d):  # a name test would call it a linear
        pass

    class PoolingGate(nn.BatchNorm2d):
        pass

    class Attention(nn.ReLU):
        pass

    assert ops.module_kind(LinearNormalizer(3, 4, 3)).kind == "conv"
    assert ops.module_kind(PoolingGate(4))[:2] == ("norm", "batch")
    assert ops.module_kind(Attention())[:2] == ("act", "relu")


def test_timm_layers_are_classified_by_type() -> None:
    layers = pytest.importorskip("timm.layers")
    assert ops.module_kind(layers.BatchNormAct2d(4, act_layer=nn.SiLU)) == ops.ModuleKind("norm", "batch", "silu")
    assert ops.module_kind(layers.FrozenBatchNormAct2d(4)).family == "batch"
    assert ops.module_kind(layers.LayerNorm2d(4))[:2] == ("norm", "layer")
    assert ops.module_kind(layers.RmsNorm(4))[:2] == ("norm", "rms")
    assert ops.module_kind(layers.CondConv2d(4, 4, 3)).kind == "conv"
    assert ops.module_kind(layers.Conv2dSame(4, 4, 3)).kind == "conv"
    assert ops.module_kind(layers.DropPath(0.1)).kind == "identity"
    assert ops.module_kind(layers.Swish())[:2] == ("act", "silu")
    assert ops.module_kind(layers.HardSigmoid()).kind == "gate"
    assert ops.module_kind(layers.SelectAdaptivePool2d()).kind == "pool"

    class Stochastic(layers.DropPath):  # by name: nothing; by type: timm's drop path, an identity
        pass

    class Scale(layers.RmsNorm):
        pass

    assert ops.module_kind(Stochastic(0.1)).kind == "identity"
    assert ops.module_kind(Scale(4))[:2] == ("norm", "rms")


def test_torchvision_layers_are_classified_by_type() -> None:
    tv_ops = pytest.importorskip("torchvision.ops")
    assert ops.module_kind(tv_ops.FrozenBatchNorm2d(4))[:2] == ("norm", "batch")
    assert ops.module_kind(tv_ops.DeformConv2d(4, 4, 3)).kind == "conv"

    class Frozen(tv_ops.FrozenBatchNorm2d):  # by name: nothing; by type: a batch norm
        pass

    class Offsets(tv_ops.DeformConv2d):  # by name: a weight block; by type: a conv
        pass

    assert ops.module_kind(Frozen(4))[:2] == ("norm", "batch")
    assert ops.module_kind(Offsets(4, 4, 3)).kind == "conv"


def test_only_unknown_third_party_classes_are_read_by_name() -> None:
    class DropTokens(nn.Module):  # unknown code: its name is the only evidence
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class FancyConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4, 3, 3))

    assert ops.module_kind(DropTokens()).kind == "identity"
    assert ops.module_kind(FancyConv()).kind == "conv"
    assert ops.module_kind(nn.CrossMapLRN2d(3)).kind == "other"  # torch.nn's own: by type only, never by name
