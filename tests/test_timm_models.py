"""Real timm models, built on the meta device, analysed with the default pack."""

from __future__ import annotations

import math
import re

import pytest

from autoprobe.api import analyze
from autoprobe.models import resolve_model
from conftest import REFERENCE_MODELS, Analysed


@pytest.mark.parametrize("spec", REFERENCE_MODELS)
def test_round_ln_d_points_each_with_reasons(spec: str, analysed: Analysed) -> None:
    sel = analysed(spec).selection
    assert len(sel.points) == max(1, min(8, round(math.log(sel.depth))))
    assert sel.backend == "fx" and sel.notes == ()
    candidates = {c.node: c for c in sel.candidates}
    for point in sel.points:
        assert point.fired and all(f.reason for f in point.fired)
        assert candidates[point.name].fired == point.fired
        assert point.shape[0] == 2 and point.layout  # a per-example feature with a known layout


@pytest.mark.parametrize("spec", REFERENCE_MODELS)
def test_points_respect_the_policy(spec: str, analysed: Analysed) -> None:
    analysis = analysed(spec)
    sel, policy = analysis.selection, analysis.pack.policy
    got = [p.depth for p in sel.points]
    assert got == sorted(got)  # execution order
    assert all(b - a >= sel.min_distance for a, b in zip(got, got[1:]))
    assert all(1 <= d <= sel.depth - math.ceil(policy.exclude_output * sel.depth) for d in got)


def test_resnet50_points_sit_at_stage_boundaries(analysed: Analysed) -> None:
    sel = analysed("resnet50").selection
    assert sel.depth == 50
    for point in sel.points:
        assert {f.detector for f in point.fired} & {"stage-boundary", "downsampling"}, point.name
    # one point per stage end at most: the stages are layer1..layer4
    stages = [m.group(1) for p in sel.points if (m := re.match(r"(layer\d)\.", p.name))]
    assert len(stages) == len(set(stages))


def test_vit_points_spread_over_the_blocks(analysed: Analysed) -> None:
    sel = analysed("vit_base_patch16_224").selection
    blocks = [int(m.group(1)) for p in sel.points if (m := re.match(r"blocks\.(\d+)\.", p.name))]
    assert len(blocks) == len(sel.points) == 4
    assert len(set(blocks)) == 4
    assert all(any(f.detector == "attention" for f in p.fired) for p in sel.points)


def test_swin_points_are_token_features(analysed: Analysed) -> None:
    # Window attention folds positions into the batch; none of its internals may be a point.
    for point in analysed("swin_tiny_patch4_window7_224").selection.points:
        assert point.layout in ("NLC", "NHWC") and ".attn." not in point.name, point


def test_detectors_read_no_timm_annotations(analysed: Analysed) -> None:
    model = resolve_model("resnet50").module
    annotations = ("feature_info", "pretrained_cfg", "default_cfg", "pretrained_model_args")
    for name in annotations:
        delattr(model, name)  # anything reading them now raises AttributeError
    assert not any(hasattr(model, name) for name in annotations)
    sel = analyze(model, input_size=(3, 224, 224)).selection
    assert sel.names == analysed("resnet50").selection.names
