"""Issue 25, problems 6 and 7 on toy models that isolate each fact: reasons that are true and dense points where an
engineer would put them.

* the bottleneck's widths are facts of the path: a transformer's LayerNorms (the residual stream, a packed ``qkv``)
  and a DenseNet growth slice (widened only by a concat) are no bottleneck; a ResNet bottleneck and an inverted
  residual still are;
* a size an enlarging op made (a pool to a larger grid, a window padding) going back is no downsampling;
* after a strided conv the point is the end of its norm and activation, not the raw conv output;
* a fold gives channels-first maps again after an unfold whose patches no rule follows (MobileViT);
* the dense pack's head zone ends at the decoder's last merge (the balance of an encoder-decoder's points is a
  rule case on smp's UNet++, ``rule_cases/families``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoprobe.rules import load_rules
from autoprobe.select import select_points, usable_depth
from conftest import fired, graph_of
from toy_models import ATTENTIONS, BottleneckNet, ToyTransformer


def test_transformer_layernorms_are_no_bottleneck() -> None:
    g = graph_of(ToyTransformer(ATTENTIONS["sdpa"], depth=3))
    assert fired(g, "bottleneck") == ()


class InvertedResidual(nn.Module):
    """MobileNetV2 blocks: a 8-wide stream, each block expanding to 48 and projecting back, added to the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 48, 1), nn.ReLU6(), nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.ReLU6(),
                          nn.Conv2d(48, 8, 1)) for _ in range(3))
        self.head = nn.Conv2d(8, 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).mean((2, 3))


def test_inverted_residual_and_resnet_bottlenecks_still_fire() -> None:
    assert fired(graph_of(BottleneckNet()), "bottleneck") == ("block.act2",)
    # the stream's last add, before the 64-wide head (the other adds also feed the next add: a plateau)
    assert fired(graph_of(InvertedResidual()), "bottleneck") == ("add_2",)


class Dense(nn.Module):
    """A dense block: each layer reads the concat so far, squeezes to 16 and grows it by 4 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16 + 4 * i, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 3, padding=1)) for i in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


def test_a_densenet_growth_slice_is_no_bottleneck() -> None:
    g = graph_of(Dense())
    assert g["layers.0.2"].channels == 4  # the growth slice, widened only by the concat that appends it
    assert fired(g, "bottleneck") == ()


class PyramidPool(nn.Module):
    """A 4x4 map pooled to a 6x6 grid (larger), convolved and interpolated back to 4x4 (UperNet's pyramid pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.level = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.interpolate(self.level(F.adaptive_avg_pool2d(x, 6)), size=x.shape[-2:], mode="bilinear")
        return self.head(torch.cat([x, y], 1))


class WindowPad(nn.Module):
    """An 8x8 map padded to 14x14 for 7x7 windows and sliced back (sam2's window unpad)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.stem(x), (0, 6, 0, 6))
        return self.mix(x)[:, :, :8, :8]


def test_going_back_from_an_enlarged_size_is_no_downsampling() -> None:
    g = graph_of(PyramidPool(), (3, 4, 4))
    assert g.native_positions["level"] == 16 and g["level"].positions == 36
    assert fired(g, "downsampling", position="both") == ()
    g = graph_of(WindowPad(), (3, 8, 8))
    assert fired(g, "downsampling", position="both") == ()


def test_a_real_reduction_after_an_enlargement_still_fires() -> None:
    class UpThenDown(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.down = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=4, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(F.interpolate(self.stem(x), scale_factor=2.0)).mean((2, 3))

    # 8x8 -> 16x16 -> 4x4: below the 8x8 the content was computed at, so a reduction (from 16x16 as the reason says)
    g = graph_of(UpThenDown(), (3, 8, 8))
    assert fired(g, "downsampling") == ("interpolate",)


class ConvBnAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


def test_after_a_strided_conv_the_point_is_its_activation() -> None:
    g = graph_of(nn.Sequential(ConvBnAct(3, 8), ConvBnAct(8, 16, 2), ConvBnAct(16, 16)))
    assert fired(g, "downsampling", position="after") == ("1.2",)


class PatchTransformer(nn.Module):
    """MobileViT's unfold -> (B, C, pixels, patches) -> 1x1 convs -> fold back, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, c, h, w = x.shape
        patches = F.unfold(x, kernel_size=2, stride=2).reshape(b, c, 4, -1)
        patches = self.mix(patches)
        x = F.fold(patches.reshape(b, c * 4, -1), output_size=(h, w), kernel_size=2, stride=2)
        return self.out(x)


def test_fold_after_unfold_gives_maps_again() -> None:
    g = graph_of(PatchTransformer(), (3, 8, 8))
    assert g["fold"].layout is not None and g["fold"].spatial == (8, 8)
    assert g["out"].layout is not None and g["out"].channels == 8


class ShortDecoder(nn.Module):
    """A 63-conv encoder to 2x2, a 3-branch fusion, a skip concat with the 8x8 feature, then a 2-conv head:
    the decoder lies inside the last 10% of the depth."""

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Sequential(ConvBnAct(3, 8), ConvBnAct(8, 8, 2), ConvBnAct(8, 8))
        self.deep = nn.Sequential(*[ConvBnAct(8, 8, 2 if i in (0, 4) else 1) for i in range(60)])
        self.branches = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in range(3))
        self.head = nn.Sequential(ConvBnAct(16, 8), nn.Conv2d(8, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.low(x)
        deep = self.deep(low)
        fused = torch.cat([b(deep) for b in self.branches], 1).sum(1, keepdim=True).expand(-1, 8, -1, -1)
        up = F.interpolate(fused, size=low.shape[-2:])
        return self.head(torch.cat([low, up], 1))


def test_the_dense_head_zone_ends_at_the_decoders_last_merge() -> None:
    g = graph_of(ShortDecoder())
    dense, default = load_rules("dense"), load_rules("default")
    join = g["cat_1"]
    assert usable_depth(g, default.policy) < join.depth == usable_depth(g, dense.policy)
    assert "cat_1" in select_points(g, dense).names

