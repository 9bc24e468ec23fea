"""``head="conv"`` adapters (mmsegmentation's FCN auxiliary head) and ``head="linear"`` left as it was:
shapes for vector, dense and token points, parameter counts from the real modules, strip, a training
step reaching every adapter parameter, refusals of unknown heads, and the linear head's bit identity."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprobe import LossOptions, instrument
from autoprobe.adapters import (
    ClassificationAdapter,
    ConvClassificationAdapter,
    ConvDenseAdapter,
    DenseAdapter,
    adapter_parameter_count,
    make_adapter,
)
from autoprobe.errors import InstrumentError
from toy_models import MHAAttention, ToyTransformer, ToyUNet

torch.set_num_threads(1)

C, K, B = 64, 10, 2


@pytest.mark.parametrize(
    ("layout", "shape", "spatial"),
    [("NC", (B, C), None), ("NCHW", (B, C, 4, 4), (4, 4)), ("NHWC", (B, 4, 4, C), (4, 4)), ("NLC", (B, 17, C), (17,))],
)
def test_conv_head_for_vector_outputs_is_pool_then_an_mlp(layout, shape, spatial) -> None:
    adapter = make_adapter(channels=C, layout=layout, spatial=spatial, task="classification", num_classes=K,
                           head="conv")
    assert isinstance(adapter, ConvClassificationAdapter)
    assert [type(m) for m in adapter.linear] == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout, nn.Linear]
    assert adapter.linear[0].out_features == min(C, 128) and adapter.linear[3].p == 0.1
    assert adapter(torch.randn(shape)).shape == (B, K)
    assert adapter.eval()(torch.randn(1, *shape[1:])).shape == (1, K)  # LayerNorm: a batch of one works


@pytest.mark.parametrize(
    ("layout", "shape", "spatial", "out_size", "conv", "norm", "drop"),
    [("NCHW", (B, C, 8, 8), (8, 8), (32, 32), nn.Conv2d, nn.BatchNorm2d, nn.Dropout2d),
     ("NHWC", (B, 8, 8, C), (8, 8), (32, 32), nn.Conv2d, nn.BatchNorm2d, nn.Dropout2d),
     ("NCL", (B, C, 16), (16,), (64,), nn.Conv1d, nn.BatchNorm1d, nn.Dropout1d),
     ("NCDHW", (B, C, 4, 4, 4), (4, 4, 4), (8, 8, 8), nn.Conv3d, nn.BatchNorm3d, nn.Dropout3d)],
)
def test_conv_head_for_dense_outputs_is_the_fcn_aux_head_of_the_grid_rank(
    layout, shape, spatial, out_size, conv, norm, drop
) -> None:
    adapter = make_adapter(channels=C, layout=layout, spatial=spatial, task="dense", num_classes=K,
                           out_size=out_size, head="conv")
    assert isinstance(adapter, ConvDenseAdapter)
    assert [type(m) for m in adapter.conv] == [conv, norm, nn.ReLU, drop, conv]
    first, last = adapter.conv[0], adapter.conv[4]
    assert first.kernel_size == (3,) * len(spatial) and first.padding == (1,) * len(spatial) and first.bias is None
    assert first.out_channels == min(C, 128) and last.kernel_size == (1,) * len(spatial)
    assert adapter(torch.randn(shape)).shape == (B, K, *out_size)
    own = make_adapter(channels=C, layout=layout, spatial=spatial, task="dense", num_classes=K, own_resolution=True,
                       head="conv")
    assert own(torch.randn(shape)).shape == (B, K, *spatial)


def test_conv_head_of_tokens_feeding_a_dense_output_convolves_their_grid() -> None:
    adapter = make_adapter(channels=200, layout="NLC", spatial=(17,), task="dense", num_classes=K, out_size=(16, 16),
                           grid=(4, 4), prefix_tokens=1, head="conv")
    assert adapter.conv[0].out_channels == 128  # min(C, 128)
    tokens = torch.randn(B, 17, 200)
    assert adapter(tokens).shape == (B, K, 16, 16)
    # The 3x3 conv sees grid neighbours: moving one token changes the logits around its grid cell only.
    adapter.eval()
    moved = tokens.clone()
    moved[:, 1 + 0] += 5.0  # grid cell (0, 0)
    changed = (adapter.conv(adapter._channels_first(moved)) - adapter.conv(adapter._channels_first(tokens))).abs()
    assert changed[:, :, :2, :2].sum() > 0 and changed[:, :, 2:, :].abs().max() == 0 and changed[:, :, :, 2:].max() == 0


@pytest.mark.parametrize("task", ["classification", "dense"])
def test_parameter_count_is_the_sum_of_numel_of_the_built_modules(task: str) -> None:
    out_size = (16, 16) if task == "dense" else None
    adapter = make_adapter(channels=C, layout="NCHW", spatial=(8, 8), task=task, num_classes=K, out_size=out_size,
                           head="conv")
    hidden = min(C, 128)
    expected = (9 * C * hidden + 2 * hidden + hidden * K + K) if task == "dense" else (
        C * hidden + hidden + 2 * hidden + hidden * K + K
    )
    assert adapter_parameter_count(adapter) == sum(p.numel() for p in adapter.parameters()) == expected


def _unet_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 2, (2, 32, 32), generator=gen)


@pytest.mark.parametrize("loss", ["imachsr", "dsn"])
def test_instrument_with_conv_heads_reports_their_real_size_strips_them_and_trains_them(loss: str) -> None:
    net = ToyUNet()
    keys = set(net.state_dict())
    probed = instrument(net, input_size=(3, 32, 32), points=2, loss_options=LossOptions(head="conv"), loss=loss)
    adapters = {tap.point: probed.get_submodule(tap.adapter) for tap in probed.report.taps}
    assert all(isinstance(a, ConvDenseAdapter) for a in adapters.values())
    for tap in probed.report.taps:
        assert tap.adapter_type == "ConvDenseAdapter"
        assert tap.parameters == sum(p.numel() for p in adapters[tap.point].parameters())
    assert probed.report.adapter_parameters == sum(
        p.numel() for a in adapters.values() for p in a.parameters()
    )
    x, y = _unet_batch()
    out = probed(x)
    assert all(h.shape == (2, 2, 32, 32) for h in out.heads.values())
    total, _ = probed.loss(out, y)
    total.backward()
    for adapter in adapters.values():
        for name, p in adapter.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    stripped = probed.strip()
    assert stripped is net and set(stripped.state_dict()) == keys


def test_conv_heads_on_a_classification_model_are_mlps() -> None:
    net = ToyTransformer(MHAAttention)
    keys = set(net.state_dict())
    probed = instrument(net, input_size=(3, 16, 16), points=2, loss_options=LossOptions(head="conv"), loss="dsn")
    assert {tap.adapter_type for tap in probed.report.taps} == {"ConvClassificationAdapter"}
    out = probed(torch.randn(2, 3, 16, 16))
    assert all(h.shape == (2, 10) for h in out.heads.values())
    total, _ = probed.loss(out, torch.tensor([1, 7]))
    total.backward()
    for tap in probed.report.taps:
        adapter = probed.get_submodule(tap.adapter)
        assert tap.parameters == sum(p.numel() for p in adapter.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert set(probed.strip().state_dict()) == keys


def test_an_unknown_head_is_refused_with_the_choices() -> None:
    choices = r"expected one of \['linear', 'conv'\]\. Hint:"
    with pytest.raises(InstrumentError, match="unknown adapter head='mlp'; " + choices):
        make_adapter(channels=C, layout="NC", spatial=None, task="classification", num_classes=K, head="mlp")
    with pytest.raises(InstrumentError, match=choices):
        instrument(ToyUNet(), input_size=(3, 32, 32), points=1, loss_options=LossOptions(head="fcn"))


def test_linear_head_builds_the_same_modules_and_outputs_as_before() -> None:
    # Before ``head`` existed, make_adapter built nn.Linear(C, K) / a 1x1 nn.Conv2d(C, K) from the RNG.
    torch.manual_seed(3)
    vector = make_adapter(channels=C, layout="NCHW", spatial=(4, 4), task="classification", num_classes=K,
                          head="linear")
    torch.manual_seed(3)
    linear = nn.Linear(C, K)
    torch.manual_seed(4)
    dense = make_adapter(channels=C, layout="NCHW", spatial=(4, 4), task="dense", num_classes=K, out_size=(8, 8),
                         head="linear")
    torch.manual_seed(4)
    conv = nn.Conv2d(C, K, kernel_size=1)
    assert type(vector) is ClassificationAdapter and type(dense) is DenseAdapter
    assert list(vector.state_dict()) == ["linear.weight", "linear.bias"]
    assert list(dense.state_dict()) == ["conv.weight", "conv.bias"]
    assert torch.equal(vector.linear.weight, linear.weight) and torch.equal(vector.linear.bias, linear.bias)
    assert torch.equal(dense.conv.weight, conv.weight) and torch.equal(dense.conv.bias, conv.bias)
    z = torch.randn(B, C, 4, 4)
    assert torch.equal(vector(z), linear(z.mean(dim=(2, 3))))
    assert torch.equal(dense(z), F.interpolate(conv(z), size=(8, 8), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("make", [ToyUNet, lambda: ToyTransformer(MHAAttention)])
def test_instrument_head_linear_is_bit_identical_to_the_library_before_conv_heads(make) -> None:
    runs = []
    for options in ({}, {"loss_options": LossOptions(head="linear")}):
        torch.manual_seed(0)
        net = make()
        torch.manual_seed(1)
        probed = instrument(net, input_size=(3, 32, 32) if make is ToyUNet else (3, 16, 16), points=2, **options)
        runs.append((probed.state_dict(), [t.adapter_type for t in probed.report.taps]))
    (_, types_default), (state_b, types_b) = runs
    # The default is the conv head (EVIDENCE.md section 7); head="linear" builds the one-map adapters.
    assert set(types_default) <= {"ConvClassificationAdapter", "ConvDenseAdapter"} and types_default
    assert set(types_b) <= {"ClassificationAdapter", "DenseAdapter"} and len(types_b) == len(types_default)
    # As before ``head`` existed: each point's one Linear / 1x1 conv drawn from its own seeded generator.
    for tap in probed.report.taps:
        digest = hashlib.sha256(f"1:{tap.point}".encode()).digest()  # instrument ran after manual_seed(1)
        torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        channels = tap.feature_shape[1 if tap.layout.startswith("NC") else -1]
        classes = tap.head_shape[1]
        before = nn.Linear(channels, classes) if len(tap.head_shape) == 2 else nn.Conv2d(channels, classes, 1)
        prefix = tap.adapter + (".linear" if len(tap.head_shape) == 2 else ".conv")
        assert torch.equal(state_b[f"{prefix}.weight"], before.weight)
        assert torch.equal(state_b[f"{prefix}.bias"], before.bias)
