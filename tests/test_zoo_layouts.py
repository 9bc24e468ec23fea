"""Layouts the timm zoo needs (issue 16.6), each as the smallest model that shows it.

csatv2 gathers DCT coefficients with a constant list index; TNT unfolds pixels into patches with
``nn.Unfold``; NesT regroups its blocks with ``deblockify``, a Python function fx keeps whole. Each
left every later node without a layout, so those models got no point, or all points in one level.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from autoprobe.axes import AxisEnv, propagate
from conftest import graph_of


def test_a_constant_list_index_keeps_its_axis() -> None:
    env = AxisEnv.simple({"NCS": (2, 8, 64)}, out=(2, 8, 3))
    assert propagate("getitem", ("NCS", (slice(None), slice(None), [0, 8, 1])), {}, env) == "NCS"
    # beside an integer, advanced indexing may move the axis to the front: unknown
    assert propagate("getitem", ("NCS", (0, slice(None), [0, 8, 1])), {}, AxisEnv.simple({"NCS": (2, 8, 64)})) is None


class Unfolded(nn.Module):
    """TNT's pixel embedding: a conv map unfolded into patches, the patches as tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 3, padding=1)
        self.unfold = nn.Unfold(kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.unfold(self.proj(x)).transpose(1, 2))
        return self.head(t.mean(1))


def test_unfold_makes_channels_first_patches() -> None:
    g = graph_of(Unfolded(), (3, 16, 16))
    assert g["unfold"].layout == "NCL" and g["norm"].layout == "NLC" and g["norm"].spatial == (16,)


def regroup(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, T, N, C) blocks of ``block`` x ``block`` tokens back to a (B, H, W, C) map (NesT's deblockify)."""
    b, t, _, c = x.shape
    side = int(t**0.5)
    x = x.reshape(b, side, side, block, block, c).transpose(2, 3)
    return x.reshape(b, side * block, side * block, c)


fx.wrap("regroup")


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, 2)
        self.mlp = nn.Linear(8, 8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.embed(x).permute(0, 2, 3, 1)  # (B, 8, 8, C)
        b, h, w, c = m.shape
        blocks = m.reshape(b, 2, 4, 2, 4, c).transpose(2, 3).reshape(b, 4, 16, c)
        y = regroup(self.mlp(blocks), 4).permute(0, 3, 1, 2)
        return self.head(self.conv(y).mean((2, 3)))


def test_a_function_fx_keeps_whole_gets_the_labels_of_the_ops_inside_it() -> None:
    g = graph_of(Nested(), (3, 16, 16))
    opaque = next(n for n in g if n.target == "regroup")
    assert opaque.layout == "NHWC" and g["conv"].layout == "NCHW"


class Embeds(nn.Module):
    """naflexvit's embedding: patches as tokens, returned with the grid they came from (a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // 4, 4, w // 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // 4) * (w // 4), -1)
        return self.proj(patches), (h // 4, w // 4)


class FlexViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeds = Embeds()
        self.mlp = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.embeds(x)
        tokens = tokens + self.mlp(tokens)
        return self.head(tokens.mean(1))


def test_a_leaf_block_gets_the_labels_of_the_ops_inside_it_on_meta_weights() -> None:
    model = FlexViT()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = graph_of(model, (3, 16, 16), leaf_modules=(Embeds,))
    assert g["embeds"].op == "call_module" and g["add"].layout == "NLC" and g["mlp.3"].layout == "NLC"
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in model.state_dict().items())
