"""Encoder-decoders: every encoder stage end is a stage boundary, decoder merges are candidates, points reach both.

The toy models (``encdec_models.py``) wire their stages the way FPN, UPerNet, DeepLabV3+ and
PSPNet do: each encoder stage also feeds the decoder, so only the first stage is on the spine
(the nodes every path crosses). ``LayerGraph.trunk`` (the spine through the lowest-resolution
feature) holds them all.
"""

from __future__ import annotations

import pytest
from torch import nn

from autoprobe.axes import layout_of, propagate
from autoprobe.rules import load_rules
from autoprobe.select import select_points
from conftest import fired, graph_of
from encdec_models import (
    ASPP_FUSION,
    ASPP_SKIP,
    DPT_TAPS,
    ENCODER_STAGE_ENDS,
    FPN_FUSION,
    FPN_SKIPS,
    PSP_FUSION,
    UPERNET_FUSION,
    ToyASPP,
    ToyDPT,
    ToyFPN,
    ToyPSP,
    ToyUPerNet,
)

SIZE = (3, 32, 32)
# model, its fusion points, its skips
CASES = {
    "fpn": (ToyFPN, FPN_FUSION, FPN_SKIPS),
    "upernet": (ToyUPerNet, UPERNET_FUSION, FPN_SKIPS),
    "aspp": (ToyASPP, ASPP_FUSION, ASPP_SKIP),
    "psp": (ToyPSP, PSP_FUSION, ()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_encoder_stage_end_is_a_stage_boundary_off_the_spine(case: str) -> None:
    g = graph_of(CASES[case][0](), SIZE)
    assert set(ENCODER_STAGE_ENDS) <= set(fired(g, "stage-boundary"))
    if case != "psp":  # PSP's encoder is a plain chain: its stage ends are on the spine anyway
        assert not set(ENCODER_STAGE_ENDS[1:]) & set(g.spine)  # they feed the decoder, so no path-crossing node
    assert set(g.spine) <= set(g.trunk)


@pytest.mark.parametrize("case", sorted(CASES))
def test_decoder_merges_are_candidates(case: str) -> None:
    build, fusion, skips = CASES[case]
    g = graph_of(build(), SIZE)
    assert fired(g, "fusion") == fusion
    assert fired(g, "skip") == skips


def test_a_stride_in_a_stage_that_feeds_the_decoder_marks_that_stage_not_the_first() -> None:
    # Snapping to the spine put every downsampling on the first stage's end; the trunk keeps each stage's own.
    assert fired(graph_of(ToyFPN(), SIZE), "downsampling") == ENCODER_STAGE_ENDS[:2]


@pytest.mark.parametrize("case", ["fpn", "upernet", "aspp"])
def test_dense_points_reach_encoder_and_decoder_without_relaxed_spacing(case: str) -> None:
    g = graph_of(CASES[case][0](), SIZE)
    sel = select_points(g, load_rules("dense"))
    bottom = g[ENCODER_STAGE_ENDS[-1]].depth
    depths = [p.depth for p in sel.points]
    assert min(depths) < bottom < max(depths), sel.names
    assert not any("relaxed" in n for n in sel.notes)


def test_a_classifier_trunk_is_its_spine() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    g = graph_of(net, SIZE)
    assert g.trunk == g.spine


def test_stack_then_sum_over_the_stacked_axis_keeps_the_layout() -> None:
    from autoprobe.axes import AxisEnv

    stacked = propagate("stack", (["NCSS", "NCSS"],), {}, AxisEnv.simple({"NCSS": (2, 8, 4, 4)}, out=(2, 2, 8, 4, 4)))
    assert stacked == "?NCSS" and layout_of(stacked, (2, 2, 8, 4, 4)) is None  # the stack itself is no feature
    summed = propagate("sum", (stacked, 0), {}, AxisEnv.simple({stacked: (2, 2, 8, 4, 4)}, out=(2, 8, 4, 4)))
    assert layout_of(summed, (2, 8, 4, 4)) == "NCHW"


def test_a_padding_module_keeps_the_layout() -> None:
    # smp's EfficientNet pads with nn.ZeroPad2d before every conv: unknown there, it left the whole encoder unknown.
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ZeroPad2d(1), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                        nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(8, 8, 3))
    g = graph_of(net, SIZE)
    assert g["1"].layout == "NCHW" and g["4"].layout == "NCHW" and g["5"].layout == "NCHW"


def test_a_vit_block_the_decoder_reads_is_a_stage_boundary() -> None:
    g = graph_of(ToyDPT(), SIZE)
    ends = fired(g, "stage-boundary", block_weight=0.0)  # stage ends only, no (weaker) block ends
    assert set(DPT_TAPS) <= set(ends) and "blocks.0.add" not in ends and "blocks.2.add" not in ends
