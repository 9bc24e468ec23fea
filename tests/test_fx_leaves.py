"""fx keeps whole what it cannot trace through but is one call (issue 25.8): a module called with sizes only (BEiT's
relative position bias, which writes into an index table in Python) and einops' layers (UNETR's Rearrange). So a
transformer's block outputs are fx nodes and can be tapped, instead of export's inner LayerNorms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoprobe
from autoprobe.ops import is_library_leaf


class SizeBias(nn.Module):
    """A bias table indexed by an index built in Python from the token grid's size (item assignment, as BEiT)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(64, dim))

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        index = torch.zeros(size[0] * size[1], dtype=torch.long)
        index[1:] += 1  # fx cannot trace this on a Proxy
        return self.table[index]


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.bias = SizeBias(8)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2] // 4, x.shape[3] // 4
        t = self.embed(x).flatten(2).transpose(1, 2) + self.bias((h, w))
        t = t + self.block(t)
        return self.head(t.mean(1))


def test_a_module_called_with_sizes_only_is_one_fx_call() -> None:
    model = Tokens()
    analysis = autoprobe.api.analyze(model, input_size=(3, 16, 16))
    assert analysis.selection.backend == "fx", analysis.selection.notes
    assert "add_1" in analysis.graph  # the block output, an fx node a point can be
    probed = autoprobe.instrument(model, autoprobe.api.analyze(model, input_size=(3, 16, 16)).choose("add_1"),
                                  input_size=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    out = probed(x)
    assert torch.equal(out.output, model(x))


def test_einops_rearrange_is_one_fx_call() -> None:
    einops = pytest.importorskip("einops.layers.torch")
    assert is_library_leaf(einops.Rearrange("b c h w -> b (h w) c")) and not is_library_leaf(nn.ReLU())

    class Rearranged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, 4)
            self.tokens = einops.Rearrange("b c h w -> b (h w) c")
            self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.tokens(self.embed(x))
            t = t + self.block(t)
            return self.head(t.mean(1))

    graph = autoprobe.api.analyze(Rearranged(), input_size=(3, 16, 16)).graph
    assert graph.backend == "fx" and graph["tokens"].layout is not None and graph["add"].channels == 8
