"""The model zoo: every timm and torchvision classification/segmentation model gets a selection.

The fast tests run a handful of models that each stress one part of the path
(plain fx, a fallback to export, optional forward arguments, a segmentation
model, a 299-pixel input) plus the sweep's own machinery (workers, the
timeout kill, ZOO.md). The full sweep is ``-m slow``; ``benchmarks/zoo_sweep.py``
runs it with a progress bar and writes ZOO.md.
"""

from __future__ import annotations

import importlib
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
zoo_sweep = importlib.import_module("zoo_sweep")

SAMPLE = {
    "resnet18": "fx",
    "gemma4_vit_167m": "export",  # branches on x.ndim: fx cannot trace it
    "hiera_tiny_224": "fx",  # forward(x, mask=None): needs the optional argument fixed
    "tv:lraspp_mobilenet_v3_large": "fx",  # segmentation, dict output
    "tv:inception_v3": "fx",  # 299 x 299 input
}


@pytest.mark.parametrize("spec", sorted(SAMPLE))
def test_sample_model_gets_a_selection(spec):
    result = zoo_sweep.run_one(spec)
    assert result.status == "ok", result.reason
    assert result.backend == SAMPLE[spec]
    assert len(result.points) >= 1
    assert result.depth >= len(result.points)
    if result.backend != "fx":
        assert result.reason.startswith("backend fx failed"), "a fallback must say why"


def test_zoo_lists_timm_and_torchvision_models():
    specs = zoo_sweep.zoo_models()
    import timm

    assert len(specs) == len(set(specs))
    assert set(timm.list_models()) <= set(specs)
    assert {"tv:resnet50", "tv:vit_b_16", "tv:deeplabv3_resnet50", "tv:fcn_resnet50"} <= set(specs)
    assert not any(s.startswith("tv:fasterrcnn") or s.startswith("tv:raft") for s in specs)


def test_family_is_the_prefix_before_a_digit_or_underscore():
    assert zoo_sweep.family("resnet50d") == "resnet"
    assert zoo_sweep.family("vit_base_patch16_224") == "vit"
    assert zoo_sweep.family("tv:deeplabv3_resnet50") == "tv:deeplabv"


def test_sweep_runs_in_workers_and_kills_a_model_past_the_timeout():
    results = zoo_sweep.sweep(["resnet18", "tv:alexnet"], workers=2, progress="off")
    assert [(r.model, r.status) for r in results] == [("resnet18", "ok"), ("tv:alexnet", "ok")]
    killed = zoo_sweep.sweep(["resnet50"], workers=1, timeout=0.01, progress="off")
    assert killed[0].status == "timeout" and "killed after" in killed[0].reason


def test_markdown_lists_every_failure_with_its_reason():
    results = [
        zoo_sweep.Result("resnet18", "resnet", "ok", "fx", 18, ["layer1.1.act2"], seconds=0.2),
        zoo_sweep.Result("gemma4_vit_167m", "gemma", "ok", "export", 65, ["a"], seconds=3.0, reason="backend fx failed (x)"),
        zoo_sweep.Result("brokennet", "brokennet", "fail", reason="TraceError: boom"),
    ]
    meta = {"command": "python benchmarks/zoo_sweep.py", "wall_seconds": 90.0, "workers": 2, "timeout": 60, "versions": {}}
    text = zoo_sweep.render_markdown(results, meta)
    assert "python benchmarks/zoo_sweep.py" in text and "1.5 min" in text
    assert "| `brokennet` | fail | TraceError: boom | not yet diagnosed |" in text
    assert "| `gemma4_vit_167m` | export | 65 | 1 | backend fx failed (x) |" in text


@pytest.mark.slow
def test_every_zoo_model_gets_a_selection_within_the_time_limit():
    results = zoo_sweep.sweep(zoo_sweep.zoo_models(), workers=2, progress="off")
    bad = [f"{r.model}: {r.status}: {r.reason}" for r in results if r.status != "ok"]
    assert not bad, "\n".join(bad)
    assert max(r.seconds for r in results) < zoo_sweep.DEFAULT_TIMEOUT
