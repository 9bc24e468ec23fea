"""Dimension adapters: shapes and sizes for every layout x task, 1-D/2-D/3-D grids, layout invariance, errors.

The linear head's tests spell ``head="linear"`` (``make_adapter`` builds the conv head by default);
the conv head has its own in ``test_conv_head.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from autoprobe.adapters import (
    ClassificationAdapter,
    DenseAdapter,
    HeadShape,
    adapter_parameter_count,
    adapter_parameters,
)
from autoprobe.adapters import make_adapter as _make_adapter
from autoprobe.errors import InstrumentError

torch.set_num_threads(1)

make_adapter = functools.partial(_make_adapter, head="linear")

C, K, B = 64, 10, 2
# One 4x4 grid of C channels, in every layout: (feature shape, spatial).
LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {
    "NC": ((B, C), None),
    "NCL": ((B, C, 16), (16,)),
    "NLC": ((B, 16, C), (16,)),
    "NCHW": ((B, C, 4, 4), (4, 4)),
    "NHWC": ((B, 4, 4, C), (4, 4)),
}


# Token layouts feeding a 2-D output need the grid their 16 tokens form (instrument reads it from the graph).
GRIDS = {"NCL": {"grid": (4, 4)}, "NLC": {"grid": (4, 4)}}


def _grid_in(layout: str, grid: torch.Tensor) -> torch.Tensor:
    """The same (B, C, 4, 4) feature, written in ``layout``."""
    return {
        "NCHW": grid,
        "NHWC": grid.permute(0, 2, 3, 1),
        "NCL": grid.flatten(2),
        "NLC": grid.flatten(2).transpose(1, 2),
    }[layout]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_classification_shape_and_size(layout: str) -> None:
    shape, spatial = LAYOUTS[layout]
    adapter = make_adapter(channels=C, layout=layout, spatial=spatial, task="classification", num_classes=K)
    assert isinstance(adapter, ClassificationAdapter)
    assert adapter(torch.randn(shape)).shape == (B, K)
    assert adapter_parameter_count(adapter) == C * K + K == 650


@pytest.mark.parametrize("layout", ["NCL", "NLC", "NCHW", "NHWC"])
def test_dense_shape_and_size(layout: str) -> None:
    shape, spatial = LAYOUTS[layout]
    adapter = make_adapter(
        channels=C, layout=layout, spatial=spatial, task="dense", num_classes=K, out_size=(8, 12), **GRIDS.get(layout, {})
    )
    assert isinstance(adapter, DenseAdapter)
    assert adapter(torch.randn(shape)).shape == (B, K, 8, 12)
    assert adapter_parameter_count(adapter) == 650


def test_classification_pools_every_position_whatever_the_layout() -> None:
    grid = torch.randn(B, C, 4, 4)
    reference = make_adapter(channels=C, layout="NCHW", spatial=(4, 4), task="classification", num_classes=K)
    # By hand: mean over the 16 positions, then W x + b.
    pooled = grid.sum(dim=(2, 3)) / 16
    expected = pooled @ reference.linear.weight.T + reference.linear.bias
    for layout in ("NCHW", "NHWC", "NCL", "NLC"):
        spatial = LAYOUTS[layout][1]
        adapter = make_adapter(channels=C, layout=layout, spatial=spatial, task="classification", num_classes=K)
        adapter.load_state_dict(reference.state_dict())
        torch.testing.assert_close(adapter(_grid_in(layout, grid)), expected)


def test_dense_is_the_same_map_in_every_layout() -> None:
    grid = torch.randn(B, C, 4, 4)
    reference = make_adapter(channels=C, layout="NCHW", spatial=(4, 4), task="dense", num_classes=K, out_size=(4, 4))
    # At out_size == grid a 1x1 conv is a per-position linear map.
    expected = torch.einsum("kc,bchw->bkhw", reference.conv.weight[:, :, 0, 0], grid)
    expected = expected + reference.conv.bias.view(1, K, 1, 1)
    for layout in ("NCHW", "NHWC", "NCL", "NLC"):
        adapter = make_adapter(
            channels=C, layout=layout, spatial=LAYOUTS[layout][1], task="dense", num_classes=K, out_size=(4, 4),
            **GRIDS.get(layout, {}),
        )
        adapter.load_state_dict(reference.state_dict())
        torch.testing.assert_close(adapter(_grid_in(layout, grid)), expected)


def test_dense_upsamples_logits_bilinearly_to_label_size() -> None:
    adapter = make_adapter(channels=C, layout="NCHW", spatial=(4, 4), task="dense", num_classes=K, out_size=(16, 16))
    z = torch.randn(B, C, 4, 4)
    small = adapter.conv(z)
    expected = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(adapter(z), expected)
    # Upsampling a constant map keeps it constant: a quick check of the weights.
    torch.nn.init.zeros_(adapter.conv.weight)
    torch.testing.assert_close(adapter(z), adapter.conv.bias.view(1, K, 1, 1).expand(B, K, 16, 16))


@pytest.mark.parametrize(("tokens", "prefix", "grid"), [(17, 1, (4, 4)), (18, 2, (4, 4)), (9, 1, (2, 4)), (10, 1, (3, 3))])
def test_dense_tokens_drop_the_given_prefix_and_use_the_given_grid(tokens: int, prefix: int, grid) -> None:
    # A 2x4 grid and a 3x3 grid with a cls token: a square-root guess misreads both (issue 12.4).
    adapter = make_adapter(channels=C, layout="NLC", spatial=(tokens,), task="dense", num_classes=K, out_size=(4, 4),
                           grid=grid, prefix_tokens=prefix)
    assert (adapter.grid, adapter.prefix_tokens) == (grid, prefix)
    z = torch.randn(B, tokens, C)
    by_hand = torch.einsum("kc,bnc->bkn", adapter.conv.weight[:, :, 0, 0], z[:, prefix:]).reshape(B, K, *grid)
    by_hand = by_hand + adapter.conv.bias.view(1, K, 1, 1)
    expected = F.interpolate(by_hand, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(adapter(z), expected)


def test_tokens_of_a_2d_output_without_a_grid_raise() -> None:
    with pytest.raises(InstrumentError, match="without the token grid it forms"):
        make_adapter(channels=C, layout="NLC", spatial=(16,), task="dense", num_classes=K, out_size=(4, 4))
    with pytest.raises(InstrumentError, match="do not make 1 prefix tokens plus a grid"):
        make_adapter(channels=C, layout="NLC", spatial=(16,), task="dense", num_classes=K, out_size=(4, 4),
                     grid=(4, 4), prefix_tokens=1)


def test_token_count_differing_from_construction_raises() -> None:
    adapter = make_adapter(channels=C, layout="NLC", spatial=(17,), task="dense", num_classes=K, out_size=(8, 8),
                           grid=(4, 4), prefix_tokens=1)
    with pytest.raises(InstrumentError, match="built for 17 tokens"):
        adapter(torch.randn(B, 26, C))


@pytest.mark.parametrize(("layout", "shape", "mode"), [
    ("NCL", (B, C, 5), "linear"), ("NLC", (B, 5, C), "linear"),
    ("NCDHW", (B, C, 2, 3, 4), "trilinear"), ("NDHWC", (B, 2, 3, 4, C), "trilinear"),
])
def test_dense_1d_and_3d_are_a_1x1_conv_then_linear_or_trilinear_resize(layout: str, shape, mode: str) -> None:
    rank = len(shape) - 2
    out_size = (10,) if rank == 1 else (4, 6, 8)
    adapter = make_adapter(channels=C, layout=layout, spatial=None, task="dense", num_classes=K, out_size=out_size)
    z = torch.randn(shape)
    channels_first = z if layout.startswith("NC") else z.movedim(-1, 1)
    weight = adapter.conv.weight.reshape(K, C)
    small = torch.einsum("kc,bc...->bk...", weight, channels_first) + adapter.conv.bias.view(1, K, *[1] * rank)
    torch.testing.assert_close(adapter(z), F.interpolate(small, size=out_size, mode=mode, align_corners=False))
    assert adapter_parameter_count(adapter) == adapter_parameters(C, K, "linear")


@pytest.mark.parametrize(("layout", "shape"), [("NCL", (B, C, 5)), ("NCHW", (B, C, 4, 4)), ("NDHWC", (B, 2, 3, 4, C))])
def test_own_resolution_keeps_the_point_grid(layout: str, shape) -> None:
    # label_resolution="downsample": the logits stay at the point's resolution; the objective resizes the target.
    adapter = make_adapter(channels=C, layout=layout, spatial=None, task="dense", num_classes=1, own_resolution=True)
    grid = shape[2:] if layout.startswith("NC") else shape[1:-1]
    assert adapter.out_size is None
    assert adapter(torch.randn(shape)).shape == (B, 1, *grid)


def test_one_output_channel_is_allowed_for_binary_and_regression_heads() -> None:
    adapter = make_adapter(channels=C, layout="NCHW", spatial=(4, 4), task="dense", num_classes=1, out_size=(8, 8))
    assert adapter(torch.randn(B, C, 4, 4)).shape == (B, 1, 8, 8)


def test_classification_with_cls_token_pools_all_tokens() -> None:
    adapter = make_adapter(channels=C, layout="NLC", spatial=(17,), task="classification", num_classes=K)
    z = torch.randn(B, 17, C)
    torch.testing.assert_close(adapter(z), adapter.linear(z.mean(dim=1)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layout": "NCWH"}, "unknown layout 'NCWH'"),
        ({"task": "detection"}, "unknown adapter head 'detection'"),
        ({"channels": 0}, "channels must be an int >= 1"),
        ({"num_classes": 0}, "num_classes must be an int >= 1"),
        ({"spatial": (4, 4, 4)}, r"spatial=\(4, 4, 4\) does not fit layout 'NCHW'"),
        ({"task": "dense"}, "dense adapters need out_size"),
        ({"task": "dense", "out_size": (0, 8)}, "dense adapters need out_size"),
        ({"out_size": (8, 8)}, "only apply to task='dense'"),
        ({"task": "dense", "out_size": (8, 8), "layout": "NC", "spatial": None}, "NC feature has no grid"),
        ({"task": "dense", "out_size": (8, 8, 8)}, "without the token grid it forms"),
    ],
)
def test_bad_arguments_raise(options: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "channels": C, "layout": "NCHW", "spatial": (4, 4), "task": "classification", "num_classes": K,
    }
    with pytest.raises(InstrumentError, match=message):
        make_adapter(**{**arguments, **options})  # type: ignore[arg-type]


def test_wrong_feature_rank_raises() -> None:
    adapter = make_adapter(channels=C, layout="NCHW", spatial=(4, 4), task="classification", num_classes=K)
    with pytest.raises(InstrumentError, match=r"expects a 4-D feature; got shape \(2, 64\)"):
        adapter(torch.randn(B, C))


@pytest.mark.parametrize("task", ["classification", "dense"])
def test_gradient_reaches_adapter_and_feature(task: HeadShape) -> None:
    out_size = (8, 8) if task == "dense" else None
    adapter = make_adapter(channels=C, layout="NHWC", spatial=(4, 4), task=task, num_classes=K, out_size=out_size)
    z = torch.randn(B, 4, 4, C, requires_grad=True)
    adapter(z).square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


def test_adapters_are_plain_deterministic_modules() -> None:
    adapter = make_adapter(channels=C, layout="NLC", spatial=(17,), task="dense", num_classes=K, out_size=(8, 8),
                           grid=(4, 4), prefix_tokens=1)
    z = torch.randn(B, 17, C)
    assert torch.equal(adapter(z), adapter(z))
    assert not adapter._forward_hooks and not adapter._forward_pre_hooks
    assert "layout='NLC', grid=(4, 4), prefix_tokens=1, out_size=(8, 8)" in repr(adapter)
    assert "layout='NCHW', pool='mean'" in repr(ClassificationAdapter(C, K, "NCHW"))


def test_adapter_compiles_without_graph_breaks_and_runs_under_autocast() -> None:
    adapter = make_adapter(channels=C, layout="NLC", spatial=(17,), task="dense", num_classes=K, out_size=(8, 8),
                           grid=(4, 4), prefix_tokens=1)
    z = torch.randn(B, 17, C)
    compiled = torch.compile(adapter, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(z), adapter(z))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = adapter(z)
    assert logits.shape == (B, K, 8, 8)
    torch.testing.assert_close(logits.float(), adapter(z), atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    ("layout", "spatial", "task", "out_size"),
    [("NC", None, "classification", None), ("NCHW", (8, 8), "classification", None), ("NLC", (16,), "classification", None),
     ("NCHW", (8, 8), "dense", (32, 32)), ("NHWC", (8, 8), "dense", (32, 32)), ("NLC", (16,), "dense", (16,)),
     ("NCDHW", (2, 4, 4), "dense", (8, 8, 8))],
)
@pytest.mark.parametrize("channels", [24, 200])  # below and above the conv head's hidden width (128)
def test_reported_adapter_size_is_what_make_adapter_builds(layout, spatial, task, out_size, channels) -> None:
    # ``inspect`` reports adapter_parameters() before anything is built; it must be the real count, for both heads.
    built = make_adapter(channels=channels, layout=layout, spatial=spatial, task=task, num_classes=7, out_size=out_size)
    assert adapter_parameter_count(built) == adapter_parameters(channels, 7, "linear") == channels * 7 + 7
    conv = _make_adapter(channels=channels, layout=layout, spatial=spatial, task=task, num_classes=7, out_size=out_size)
    rank = len(out_size) if task == "dense" else None
    assert adapter_parameter_count(conv) == adapter_parameters(channels, 7, dense_rank=rank)
