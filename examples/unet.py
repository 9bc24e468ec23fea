"""A small U-Net (Ronneberger et al., 2015) for dense prediction, as a model spec.

timm has no encoder-decoder with long skips, so this is the U-Net the project's
reference lock (``[tool.autoprobe]`` in pyproject.toml) and its users can point
autoprobe at: ``autoprobe inspect examples.unet:unet --rules dense`` from the
repository root shows the skip detector at work.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet", "unet"]


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Encoder of ``depth`` levels halving the resolution, decoder concatenating the skips.

    Args:
        in_channels: input channels.
        num_classes: K, the logits' channels.
        width: channels at the first level; doubled at each level down.
        depth: number of downsamplings.

    Example:
        >>> UNet(num_classes=3, width=8, depth=3)(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 21, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(depth + 1)]
        self.stem = _DoubleConv(in_channels, widths[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), _DoubleConv(a, b)) for a, b in zip(widths, widths[1:]))
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:]))
        self.decode = nn.ModuleList(_DoubleConv(2 * a, a) for a in widths[:-1])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up, decode in zip(reversed(self.up), reversed(self.decode)):
            x = decode(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def unet() -> UNet:
    """The reference U-Net: 4 levels, 32 to 512 channels, 21 classes (Pascal VOC's count).

    Returns:
        A ``UNet``.
    """
    return UNet()
