"""Layouts come from the graph's operations, never from sizes that happen to coincide (issue 12.1).

Each model is one of issue 12's minimal repros: a channel count equal to a spatial size used to flip
the guessed layout, so the same node read NCHW at one input size and NHWC at another. Every test
traces at two sizes, on every backend, and checks the exact layout of each node.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprobe
from autoprobe.axes import layout_of, reshape_labels
from autoprobe.backends import LADDER, trace_with_fallbacks


def layouts(model: nn.Module, size: tuple[int, ...], backend: str = "fx") -> dict[str, str | None]:
    graph = trace_with_fallbacks(model, size, backends=(backend,)).graph
    return {n.name: (str(n.layout) if n.layout else None) for n in graph if n.kind != "output"}


class Cat(nn.Module):
    """Issue 12's model: at 8x8 the channel cat (width 8 == W) was read as NHWC."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(16, 16, 3, 2, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.c(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


class Resize(nn.Module):
    """Upsample and interpolate whose output width equals the channels (16 at input 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2)
        self.d = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(self.up(self.c(x)), scale_factor=0.5)
        return self.d(y).mean((2, 3))


class Shuffle(nn.Module):
    """PixelShuffle to 8 channels at width 8 (input 4) or 16."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, 1, 1)
        self.ps = nn.PixelShuffle(2)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.ps(self.c(x))).mean((2, 3))


class PermutedNorm(nn.Module):
    """A LayerNorm done through permute; at input 8, C == H == W == 8."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, 1, 1)
        self.n = nn.LayerNorm(8)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.n(self.c(x).permute(0, 2, 3, 1))
        return self.d(F.gelu(y).permute(0, 3, 1, 2)).mean((2, 3))


class Tokens(nn.Module):
    """flatten(2) + transpose to tokens; at input 16 with 4x4 patches, C == L == 16."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 16, 4, 4)
        self.n = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        self.h = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.c(x).flatten(2).transpose(1, 2)
        return self.h(self.fc(self.n(t)).mean(1))


class UNet3d(nn.Module):
    """A 3-D U-Net of the nnU-Net kind: its skip concatenations are NCDHW."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Conv3d(1, 8, 3, 1, 1)
        self.n = nn.InstanceNorm3d(8)
        self.a = nn.LeakyReLU()
        self.down = nn.Conv3d(8, 16, 3, 2, 1)
        self.up = nn.ConvTranspose3d(16, 8, 2, 2)
        self.dec = nn.Conv3d(16, 8, 3, 1, 1)
        self.head = nn.Conv3d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.a(self.n(self.e(x)))
        return self.head(self.dec(torch.cat([self.up(self.down(e)), e], 1)))


class Signal(nn.Module):
    """1-D: conv, norm, pool, a channel chunk and cat, a mean over length; C == L == 8 at input 16."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(4, 8, 3, 1, 1)
        self.b = nn.BatchNorm1d(8)
        self.p = nn.MaxPool1d(2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.p(torch.relu(self.b(self.c(x)))).chunk(2, 1)
        return self.fc(torch.cat([b, a], 1).mean(2))


CASES = [
    (Cat, [(3, 8, 8), (3, 16, 16)], {"a": "NCHW", "b": "NCHW", "cat": "NCHW", "c": "NCHW", "mean": "NC", "fc": "NC"}),
    (Resize, [(3, 16, 16), (3, 32, 32)], {"up": "NCHW", "interpolate": "NCHW", "d": "NCHW"}),
    (Shuffle, [(3, 4, 4), (3, 8, 8)], {"c": "NCHW", "ps": "NCHW", "d": "NCHW"}),
    (PermutedNorm, [(3, 8, 8), (3, 16, 16)], {"permute": "NHWC", "n": "NHWC", "gelu": "NHWC", "permute_1": "NCHW"}),
    (Tokens, [(3, 16, 16), (3, 32, 32)], {"flatten": "NCL", "transpose": "NLC", "n": "NLC", "fc": "NLC", "mean": "NC"}),
    (UNet3d, [(1, 8, 8, 8), (1, 16, 16, 16)], {"e": "NCDHW", "up": "NCDHW", "cat": "NCDHW", "dec": "NCDHW"}),
    (Signal, [(4, 16), (4, 32)], {"c": "NCL", "p": "NCL", "getitem": "NCL", "cat": "NCL", "mean": "NC"}),
]


@pytest.mark.parametrize(("factory", "sizes", "expected"), CASES, ids=[c[0].__name__ for c in CASES])
@pytest.mark.parametrize("backend", LADDER)
def test_layout_follows_the_ops_at_every_size(factory, sizes, expected, backend) -> None:
    small, large = (layouts(factory(), size, backend) for size in sizes)
    assert small == large
    # The hooks backend sees module calls only; the function nodes exist on fx and export.
    for name, layout in expected.items():
        if name in small or backend != "hooks":
            assert small[name] == layout, (name, small)


def test_cat_model_selects_the_same_point_with_the_same_layout_at_both_sizes() -> None:
    chosen = [autoprobe.inspect(Cat(), input_size=(3, s, s)).points for s in (8, 16)]
    assert [(p.name, p.layout) for p in chosen[0]] == [(p.name, p.layout) for p in chosen[1]]
    assert all(p.layout == "NCHW" for p in chosen[0])


def test_unet3d_skip_concatenation_is_an_eligible_ncdhw_candidate() -> None:
    analysis = autoprobe.api.analyze(UNet3d(), input_size=(1, 16, 16, 16), rules="dense")
    cat = analysis.graph["cat"]
    assert (cat.layout, cat.channels, cat.spatial) == ("NCDHW", 16, (16, 16, 16))


class HeadsSplit(nn.Module):
    """Multi-head reshapes: the split heads have no single channel axis; the merged result after proj is NLC."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.head(self.proj(a.transpose(1, 2).reshape(b, n, c)).mean(1))


def test_attention_internals_have_no_layout_and_the_projection_is_nlc() -> None:
    small, large = layouts(HeadsSplit(), (3, 16, 16)), layouts(HeadsSplit(), (3, 32, 32))
    assert small == large
    for name in ("reshape", "getitem_3", "matmul", "softmax", "matmul_1", "transpose_2"):
        assert small[name] is None, name
    assert small["qkv"] == small["proj"] == "NLC"


def test_a_reshape_merging_channels_with_space_is_unknown() -> None:
    assert reshape_labels("NCSS", (2, 8, 4, 4), (2, 8, 16)) == "NCS"  # flatten(2): spatial with spatial
    assert reshape_labels("NCSS", (2, 8, 4, 4), (2, 32, 4)) == "N?S"  # channels with a spatial axis
    assert layout_of(reshape_labels("NCSS", (2, 8, 4, 4), (2, 128)), (2, 128)) is None
    # channel shuffle: split the channels, swap the groups, merge them back: still channels
    assert reshape_labels("NCCSS", (2, 2, 4, 4, 4), (2, 8, 4, 4)) == "NCSS"
