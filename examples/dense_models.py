"""Small dense models of the kinds deep supervision is used on, as model specs.

- ``UNet3D``: an nnU-Net / MONAI style 3-D U-Net (strided 3-D convs down, transposed convs
  up, skip concatenations, instance norm, leaky ReLU), logits (B, K, D, H, W);
- ``Dense1D``: a 1-D encoder-decoder for frame labelling, logits (B, K, L);
- ``FlowNetLike``: a FlowNet-style encoder-decoder that predicts a 2-channel flow at every
  decoder scale (the coarse ones are its own intermediate predictions), output (B, 2, H, W);
- ``Hourglass``: two stacked hourglasses, each followed by a heatmap head (B, J, H, W).

All are tiny (a few thousand weights) so the tests and ``examples/segmentation.py --quick``
run on a CPU in seconds. ``autoprobe inspect examples.dense_models:unet3d --rules dense
--input-size 1,16,16,16`` shows the 3-D skip points.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet3D", "Dense1D", "FlowNetLike", "Hourglass", "unet3d", "dense1d", "flownet_like", "hourglass"]


def _block3d(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class UNet3D(nn.Module):
    """nnU-Net's plain 3-D U-Net at its smallest.

    Example:
        >>> UNet3D(num_classes=3)(torch.zeros(1, 1, 16, 16, 16)).shape
        torch.Size([1, 3, 16, 16, 16])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 4, depth: int = 2) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.encoder = nn.ModuleList(
            [_block3d(in_channels, widths[0], 1), *(_block3d(a, b, 2) for a, b in zip(widths, widths[1:]))]
        )
        self.up = nn.ModuleList(nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:]))
        self.decoder = nn.ModuleList(_block3d(2 * a, a, 1) for a in widths[:-1])
        self.head = nn.Conv3d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for up, decode in zip(reversed(self.up), reversed(self.decoder)):
            x = decode(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class Dense1D(nn.Module):
    """A 1-D encoder-decoder with one skip, for (B, C, L) sequences and (B, K, L) frame logits.

    Example:
        >>> Dense1D(num_classes=4)(torch.zeros(2, 2, 32)).shape
        torch.Size([2, 4, 32])
    """

    def __init__(self, in_channels: int = 2, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(in_channels, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU())
        self.down = nn.Sequential(nn.Conv1d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm1d(2 * width),
                                  nn.ReLU(), nn.Conv1d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose1d(2 * width, width, 2, stride=2)
        self.decode = nn.Sequential(nn.Conv1d(2 * width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv1d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem(x)
        x = self.up(self.down(skip))
        return self.head(self.decode(torch.cat([x, skip], dim=1)))


class FlowNetLike(nn.Module):
    """FlowNetS in miniature: a strided encoder, then a decoder that predicts a flow at each scale,
    upsamples it and concatenates it with the deconvolved feature and the encoder skip.

    The coarse flows are FlowNet's own intermediate predictions (trained with MSE against the
    downsampled flow); autoprobe's points are chosen on the graph and supervised by its adapters.

    Example:
        >>> FlowNetLike()(torch.zeros(2, 6, 32, 32)).shape
        torch.Size([2, 2, 32, 32])
    """

    def __init__(self, in_channels: int = 6, width: int = 8) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, w, 3, 2, 1), nn.LeakyReLU(0.1))  # 1/2
        self.conv2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, 2, 1), nn.LeakyReLU(0.1))  # 1/4
        self.conv3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.LeakyReLU(0.1))  # 1/8
        self.predict3 = nn.Conv2d(4 * w, 2, 3, padding=1)
        self.deconv2 = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.1))
        self.upflow3 = nn.ConvTranspose2d(2, 2, 4, 2, 1)
        self.predict2 = nn.Conv2d(4 * w + 2, 2, 3, padding=1)
        self.deconv1 = nn.Sequential(nn.ConvTranspose2d(4 * w + 2, w, 4, 2, 1), nn.LeakyReLU(0.1))
        self.upflow2 = nn.ConvTranspose2d(2, 2, 4, 2, 1)
        self.predict1 = nn.Conv2d(2 * w + 2, 2, 3, padding=1)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.conv1(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        flow3 = self.predict3(c3)
        cat2 = torch.cat([c2, self.deconv2(c3), self.upflow3(flow3)], dim=1)
        flow2 = self.predict2(cat2)
        cat1 = torch.cat([c1, self.deconv1(cat2), self.upflow2(flow2)], dim=1)
        return self.upsample(self.predict1(cat1))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Hourglass(nn.Module):
    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.skip = _Residual(channels)
        self.down = nn.Sequential(nn.MaxPool2d(2), _Residual(channels))
        self.inner = _Hourglass(channels, depth - 1) if depth > 1 else _Residual(channels)
        self.after = _Residual(channels)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.up(self.after(self.inner(self.down(x))))


class Hourglass(nn.Module):
    """Two stacked hourglasses (Newell et al., 2016), each followed by a heatmap head; the first
    stack's heatmap is remapped and added back, as in the paper. Returns the last heatmap.

    Example:
        >>> Hourglass(joints=3)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, in_channels: int = 3, joints: int = 3, width: int = 8, stacks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.stacks = nn.ModuleList(_Hourglass(width, 2) for _ in range(stacks))
        self.heads = nn.ModuleList(nn.Conv2d(width, joints, 1) for _ in range(stacks))
        self.remaps = nn.ModuleList(nn.Conv2d(joints, width, 1) for _ in range(stacks - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        heatmap = x
        for i, (stack, head) in enumerate(zip(self.stacks, self.heads)):
            heatmap = head(stack(x))
            if i < len(self.remaps):
                x = x + self.remaps[i](heatmap)
        return heatmap


def unet3d() -> UNet3D:
    """The 3-D U-Net spec: 1 input channel, 3 classes, inputs like (1, 16, 16, 16)."""
    return UNet3D()


def dense1d() -> Dense1D:
    """The 1-D dense spec: 2 input channels, 4 classes, inputs like (2, 32)."""
    return Dense1D()


def flownet_like() -> FlowNetLike:
    """The FlowNet-like spec: an image pair (6 channels) to a 2-channel flow, inputs like (6, 32, 32)."""
    return FlowNetLike()


def hourglass() -> Hourglass:
    """The two-stack hourglass spec: 3 heatmaps at 1/2 resolution, inputs like (3, 32, 32)."""
    return Hourglass()
