"""Tiny multi-scale encoder-decoders whose stage ends and fusion points are known exactly.

Each mirrors one wiring of the field's segmentation decoders, small enough to trace in
milliseconds: every encoder stage feeds the decoder (so none but the first is on the
spine), and the decoder merges the stages back:

* ``ToyFPN``: lateral 1x1 convs added top-down to the upsampled coarser level (FPN, PAN), then
  the levels stacked and summed (smp's FPN ``MergeBlock``);
* ``ToyUPerNet``: the same top-down adds, then every level upsampled and concatenated, then a
  fuse conv (UPerNet);
* ``ToyASPP``: a low-level skip beside an ASPP of parallel one-conv branches (DeepLabV3+);
* ``ToyPSP``: ``cat([x, *pooled(x)])``, the pyramid pooling module (PSPNet).

The expected names sit beside each model; the encoder is the same three-stage one everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
    )


class Encoder(nn.Module):
    """Three stages, 32x32 -> 16x16 -> 8x8 for a 32x32 input; returns every stage's end."""

    def __init__(self) -> None:
        super().__init__()
        self.s1 = _stage(3, 8, 1)
        self.s2 = _stage(8, 16, 2)
        self.s3 = _stage(16, 32, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.s1(x)
        c2 = self.s2(c1)
        return [c1, c2, self.s3(c2)]


ENCODER_STAGE_ENDS = ("encoder.s1.5", "encoder.s2.5", "encoder.s3.5")


class _TopDown(nn.Module):
    """``lateral(skip) + upsample(coarse)``: the FPN merge."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(cin, width, 1)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.lateral(skip) + F.interpolate(coarse, size=skip.shape[-2:], mode="nearest")


class ToyFPN(nn.Module):
    """FPN: lateral adds top-down, a conv per level, the levels stacked and summed, a head."""

    def __init__(self, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.p3 = nn.Conv2d(32, width, 1)
        self.p2 = _TopDown(16, width)
        self.p1 = _TopDown(8, width)
        self.smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(3))
        self.head = nn.Conv2d(width, classes, 1)

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The top-down pyramid, each level smoothed and upsampled to the finest."""
        c1, c2, c3 = self.encoder(x)
        p3 = self.p3(c3)
        p2 = self.p2(p3, c2)
        p1 = self.p1(p2, c1)
        return [F.interpolate(s(p), size=c1.shape[-2:], mode="nearest") for s, p in zip(self.smooth, (p3, p2, p1))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.stack(self.levels(x)).sum(0))


FPN_SKIPS = ("p2.add", "p1.add")  # the top-down adds: a lateral of a stage joins the round trip through 8x8
FPN_FUSION = ("sum",)  # the stack is no feature; the sum that folds it is the fusion point


class ToyUPerNet(ToyFPN):
    """UPerNet: the FPN's top-down adds, then the levels upsampled, concatenated and fused by a conv."""

    def __init__(self, classes: int = 2, width: int = 8) -> None:
        super().__init__(classes, width)
        self.fuse = nn.Sequential(nn.Conv2d(3 * width, width, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fuse(torch.cat(self.levels(x), dim=1)))


UPERNET_FUSION = ("cat",)


class ToyASPP(nn.Module):
    """DeepLabV3+: an ASPP of four one-conv branches (one pooled) on the last stage, a low-level skip from stage 1."""

    def __init__(self, classes: int = 2, width: int = 6) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(32, width, 3, padding=d, dilation=d), nn.ReLU()) for d in (1, 2, 3)
        )
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, width, 1), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(4 * width, width, 1), nn.ReLU())
        self.low = nn.Sequential(nn.Conv2d(8, width, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, _, c3 = self.encoder(x)
        pooled = F.interpolate(self.pooled(c3), size=c3.shape[-2:], mode="nearest")
        aspp = self.project(torch.cat([b(c3) for b in self.branches] + [pooled], dim=1))
        up = F.interpolate(aspp, size=c1.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([self.low(c1), up], dim=1))


ASPP_FUSION = ("cat",)  # four parallel branches, each one conv deep
ASPP_SKIP = ("cat_1",)  # the low-level feature joins the ASPP's output, which went down to 8x8


class ToyPSP(nn.Module):
    """PSPNet: ``cat([x, *pooled(x)])`` over the last stage, then a conv and the head."""

    def __init__(self, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.levels = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(size), nn.Conv2d(32, width, 1), nn.ReLU()) for size in (1, 2, 4)
        )
        self.fuse = nn.Sequential(nn.Conv2d(32 + 3 * width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.encoder(x)[-1]
        pooled = [F.interpolate(level(c3), size=c3.shape[-2:], mode="nearest") for level in self.levels]
        return self.head(self.fuse(torch.cat([c3, *pooled], dim=1)))


PSP_FUSION = ("cat",)  # three pooled branches beside the feature they are computed from


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t + self.mlp(t)


class ToyDPT(nn.Module):
    """DPT: a ViT (one stage of four blocks) whose blocks 1 and 3 the decoder reassembles into maps and fuses."""

    def __init__(self, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, width, 4, 4)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(4))
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.lateral = nn.Conv2d(width, width, 1)
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.embed(x)
        b, c, h, w = grid.shape
        t = grid.flatten(2).transpose(1, 2)
        taps = []
        for block in self.blocks:
            t = block(t)
            taps.append(t)
        maps = [tap.transpose(1, 2).reshape(b, c, h, w) for tap in (taps[1], taps[3])]
        coarse = F.interpolate(self.down(maps[1]), size=(h, w), mode="nearest")
        return self.head(self.lateral(maps[0]) + coarse)


DPT_TAPS = ("blocks.1.add",)  # block 1 changes no representation: it ends a stage because the decoder reads it
