"""Each detector on a tiny model that isolates its criterion: the exact nodes it flags, and none else."""

from __future__ import annotations

import pytest

from autoprobe.detectors import DETECTORS
from conftest import detect, fired, graph_of
from toy_models import (
    ATTENTIONS,
    DOCSTRING_EXAMPLES,
    UNET_RESIDUAL_ADDS,
    UNET_SKIPS,
    BottleneckNet,
    NormActSwitch,
    ToyTransformer,
    ToyUNet,
    TwoBranch,
    VGGLike,
    strided_and_pooled,
)


# ----------------------------------------------------------------------------- skip


def test_skip_fires_at_unet_joins_not_at_residual_adds() -> None:
    g = graph_of(ToyUNet())
    for add in UNET_RESIDUAL_ADDS:  # they are real two-input merges, so not firing there is a decision
        assert g[add].kind == "add" and len(g.predecessors(add)) == 2
    assert fired(g, "skip") == UNET_SKIPS


def test_skip_without_round_trip_still_needs_span() -> None:
    g = graph_of(ToyUNet())
    assert fired(g, "skip", require_round_trip=False) == UNET_SKIPS
    assert fired(g, "skip", min_span=20) == ()


# ----------------------------------------------------------------------------- fusion


def test_fusion_fires_at_the_merge_of_two_branches() -> None:
    g = graph_of(TwoBranch())
    assert g["post.add"].kind == "add"  # the residual add after the merge is not a fusion
    assert fired(g, "fusion") == ("merge.cat",)


def test_fusion_needs_deep_branches() -> None:
    assert fired(graph_of(TwoBranch()), "fusion", min_branch_depth=3) == ()


def test_fusion_ignores_unet_joins() -> None:
    # The encoder feature is an ancestor of the decoder feature: a skip, not parallel branches.
    assert fired(graph_of(ToyUNet()), "fusion") == ()


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("kind", sorted(ATTENTIONS))
def test_attention_fires_after_each_attention(kind: str) -> None:
    g = graph_of(ToyTransformer(ATTENTIONS[kind]))
    assert fired(g, "attention") == ("blocks.0.add", "blocks.1.add")


@pytest.mark.parametrize("kind", sorted(ATTENTIONS))
def test_attention_before_is_the_feature_entering_each_block(kind: str) -> None:
    g = graph_of(ToyTransformer(ATTENTIONS[kind]))
    assert fired(g, "attention", position="before") == ("transpose", "blocks.0.add_1")


def test_attention_reasons_name_the_attention_op() -> None:
    g = graph_of(ToyTransformer(ATTENTIONS["mha"]))
    reasons = [c.reason for c in detect(g, "attention")]
    assert reasons == [
        "after attention blocks.0.attn.mha (MultiheadAttention)",
        "after attention blocks.1.attn.mha (MultiheadAttention)",
    ]


# ----------------------------------------------------------------------------- downsampling


def test_downsampling_before_pool_and_strided_conv() -> None:
    g = graph_of(strided_and_pooled())
    assert [g[n].kind for n in ("2", "3", "6")] == ["pool", "conv", "pool"]
    assert fired(g, "downsampling") == ("1", "2")  # the global pool 6 is a read-out


def test_downsampling_after_is_the_reduced_feature() -> None:
    g = graph_of(strided_and_pooled())
    # After the strided conv 3 the point is its ReLU 4, the feature the conv block hands on (issue 25.6: no raw conv
    # output before its norm and activation).
    assert fired(g, "downsampling", position="after") == ("2", "4")
    assert fired(g, "downsampling", position="both") == ("1", "2", "4")


def test_downsampling_min_factor() -> None:
    assert fired(graph_of(strided_and_pooled()), "downsampling", min_factor=5.0) == ()


def test_downsampling_ignores_transformer_attention_maps() -> None:
    # q @ k^T is (batch, heads, tokens, tokens); read as a 16x16 map it would look like a
    # 256 -> 16 reduction at the attention's projection.
    g = graph_of(ToyTransformer(ATTENTIONS["explicit"]))
    assert fired(g, "downsampling") == ("x",)  # only the patch embedding's 16x16 -> 4x4


# ----------------------------------------------------------------------------- bottleneck


def test_bottleneck_fires_at_the_end_of_the_narrow_plateau() -> None:
    g = graph_of(BottleneckNet())
    assert g["block.act1"].channels == g["block.act2"].channels == 8
    assert fired(g, "bottleneck") == ("block.act2",)


def test_bottleneck_min_ratio() -> None:
    assert fired(graph_of(BottleneckNet()), "bottleneck", min_ratio=5.0) == ()


# ----------------------------------------------------------------------------- norm / activation change


def test_norm_act_change_fires_where_the_family_changes() -> None:
    g = graph_of(NormActSwitch())
    assert fired(g, "norm-act-change") == ("norm", "act3")


def test_norm_act_change_options_select_norms_or_acts() -> None:
    g = graph_of(NormActSwitch())
    assert fired(g, "norm-act-change", acts=False) == ("norm",)
    assert fired(g, "norm-act-change", norms=False) == ("act3",)


# ----------------------------------------------------------------------------- stage boundary


def test_stage_boundary_at_the_end_of_each_vgg_stage() -> None:
    g = graph_of(VGGLike())
    found = detect(g, "stage-boundary")
    assert [(c.node, c.strength) for c in found] == [("features.3", 1.0), ("features.8", 1.0)]


def test_stage_boundary_min_depth() -> None:
    assert fired(graph_of(VGGLike()), "stage-boundary", min_depth=3) == ()


def test_stage_boundary_marks_block_ends_weaker_in_a_single_stage_transformer() -> None:
    g = graph_of(ToyTransformer(ATTENTIONS["sdpa"]))
    found = {c.node: c.strength for c in detect(g, "stage-boundary")}
    assert found == {"blocks.0.add_1": 0.4, "blocks.1.add_1": 0.4, "norm": 1.0}
    assert fired(g, "stage-boundary", block_weight=0.0) == ("norm",)


# ----------------------------------------------------------------------------- docstring examples


def test_every_detector_has_docstring_examples() -> None:
    assert sorted(DOCSTRING_EXAMPLES) == sorted(d.ID for d in DETECTORS)
    for module in DETECTORS:
        assert "Passing example" in module.__doc__ and "Failing example" in module.__doc__, module.ID


@pytest.mark.parametrize("detector_id", sorted(DOCSTRING_EXAMPLES))
def test_docstring_passing_example_fires(detector_id: str) -> None:
    (build, size, expected), _ = DOCSTRING_EXAMPLES[detector_id]
    assert fired(graph_of(build(), size), detector_id) == expected


@pytest.mark.parametrize("detector_id", sorted(DOCSTRING_EXAMPLES))
def test_docstring_failing_example_does_not_fire(detector_id: str) -> None:
    _, (build, size) = DOCSTRING_EXAMPLES[detector_id]
    assert fired(graph_of(build(), size), detector_id) == ()
