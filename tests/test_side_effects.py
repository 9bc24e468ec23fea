"""Resolving a model has no process-wide side effects (issue 11.6)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
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


# --------------------------------------------------------------------- tracing leaves the model as it was (issue 25.1)

def _state(model: nn.Module) -> dict[str, dict[str, object]]:
    """Every module's instance attributes, by identity: registries by their entries, containers by their items."""

    def entry(value: object) -> object:
        if isinstance(value, dict):
            return tuple((k, id(v)) for k, v in value.items())
        if isinstance(value, (list, set)):
            return tuple(id(v) for v in value)
        return id(value)

    return {name: {k: entry(v) for k, v in vars(m).items()} for name, m in model.named_modules()}


def _shown(model: nn.Module) -> dict[str, dict[str, object]]:
    return {name: {k: v for k, v in vars(m).items() if not k.startswith("_")} for name, m in model.named_modules()}


def test_analyze_instrument_and_strip_leave_every_module_attribute_as_it_was() -> None:
    import copy

    import autoprobe

    torch.manual_seed(0)
    model = side_effect_models.StateWriting()
    before, shown = _state(model), _shown(model)
    size = (3, 4, 4)  # below the window of 7: the forward's minimum is the traced width, a Proxy in fx
    first = autoprobe.analyze(model, input_size=size)
    assert _state(model) == before, _shown(model)
    assert first.selection.backend == "fx"
    second = autoprobe.analyze(model, input_size=size)  # a leaked Proxy sent the second analyze to export
    assert (second.selection.backend, second.selection.names) == (first.selection.backend, first.selection.names)
    probed = autoprobe.instrument(model, input_size=size)  # the train trace read the eval trace's Proxy
    assert _state(model) == before and _shown(model) == shown
    assert probed.strip() is model
    assert _state(model) == before
    copy.deepcopy(model).load_state_dict(model.state_dict())
    out = probed(torch.randn(2, *size))
    assert out.output.shape == (2, 5)


def test_hooks_and_export_leave_module_attributes_as_they_were() -> None:
    from autoprobe.backends import trace_export, trace_hooks

    model = side_effect_models.StateWriting()
    before = _state(model)
    trace_export(model, (3, 4, 4))
    assert _state(model) == before
    trace_hooks(model, (3, 4, 4))
    assert _state(model) == before


def test_hf_swin_is_traced_the_same_twice_and_left_as_it_was() -> None:
    # Hugging Face's SwinLayer sets self.window_size = min(input_resolution) when the map is no larger
    # than its window (stage 2 here: 8x8 with window 8), a Proxy under fx.
    import copy

    transformers = pytest.importorskip("transformers")
    import autoprobe

    config = transformers.SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=8, num_labels=3
    )
    torch.manual_seed(0)
    model = transformers.SwinForImageClassification(config)
    before = _state(model)
    first = autoprobe.analyze(model, input_size=(3, 64, 64)).selection
    assert _state(model) == before, _shown(model)
    second = autoprobe.analyze(model, input_size=(3, 64, 64)).selection
    assert (second.backend, second.names) == (first.backend, first.names) and first.backend == "fx"
    probed = autoprobe.instrument(model, input_size=(3, 64, 64))
    assert _state(model) == before and probed.strip() is model
    copy.deepcopy(model).load_state_dict(model.state_dict())
