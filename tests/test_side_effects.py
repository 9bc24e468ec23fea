"""Resolving a model has no process-wide side effects (issue 11.6)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from torch import nn

import side_effect_models
from autoprobe.models import resolve_model


def test_a_value_reading_build_does_not_touch_another_thread() -> None:
    # While one thread builds a model by the meta fallback (its constructor reads a value), a model
    # built in another thread keeps real CPU weights: nothing about nn.Module is patched.
    side_effect_models.STARTED.clear()
    side_effect_models.RELEASE.clear()
    result: dict[str, nn.Module] = {}
    builder = threading.Thread(target=lambda: result.setdefault("m", resolve_model("side_effect_models:value_reading").module))
    builder.start()
    try:
        assert side_effect_models.STARTED.wait(timeout=30)
        other = nn.Linear(4, 4)
        other.register_buffer("stat", other.weight.detach().clone())
    finally:
        side_effect_models.RELEASE.set()
        builder.join(timeout=60)
    assert other.weight.device.type == "cpu" and other.stat.device.type == "cpu"
    assert {p.device.type for p in result["m"].parameters()} == {"meta"}
    assert result["m"][0].out_channels == 8


def test_regnet_still_builds_on_meta() -> None:
    model = resolve_model("tv:regnet_y_400mf").module
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}


def test_module_factory_leaves_sys_path_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "side_effect_cwd_model.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    model = resolve_model("side_effect_cwd_model:build").module
    assert isinstance(model, nn.Sequential)
    assert sys.path == before
