"""Factories for tests/test_side_effects.py, resolved as ``side_effect_models:NAME`` specs."""

from __future__ import annotations

import threading

import torch
from torch import nn

STARTED = threading.Event()  # the factory is inside its value-reading fallback build
RELEASE = threading.Event()  # the other thread is done; the factory may finish


def value_reading() -> nn.Module:
    """Reads a tensor value while building (as RegNet does), so it is built by the fallback path, and waits there."""
    width = sum(torch.arange(4).tolist()) + 2  # 8; a meta tensor cannot answer .tolist() (RegNet does this)
    if torch.empty(1).device.type != "meta":
        STARTED.set()
        RELEASE.wait(timeout=30)
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU())


def plain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


class Windowed(nn.Module):
    """Writes its own state in forward, as Hugging Face's Swin layers do (``self.window_size = ...``)."""

    def __init__(self, cin: int, cout: int, window_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.BatchNorm2d(cout)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Traced at a width below the window, the minimum is the traced size: an fx Proxy, or a meta value.
        self.window_size = min(self.window_size, x.shape[-1])
        self.seen = x.shape[-1]
        y = self.norm(self.conv(x)).relu()
        if self.window_size >= 4:  # the next trace reads the value the last one left
            y = y + x if x.shape[1] == y.shape[1] else y
        return y


class StateWriting(nn.Module):
    """A small classifier whose blocks write attributes in forward (issue 25.1)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Windowed(3, 8)
        self.block1 = Windowed(8, 8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.block2 = Windowed(16, 16)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.down(self.block1(self.stem(x)))))
