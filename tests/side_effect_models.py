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
