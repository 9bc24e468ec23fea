"""Selection policy: M, distance, exclusion zone, position bias, ties, and the notes.

Most tests run the policy on a "ruler": 20 linear layers in a row, so node ``"k"``
sits at depth k + 1 and D = 20, with hand-made candidates in place of the
detectors. That pins the policy's arithmetic exactly; the last tests run the
real detectors end to end.
"""

from __future__ import annotations

import random

import pytest

from autoprobe.graph import LayerGraph
from autoprobe.rules import Policy, load_rules
from autoprobe.select import Selection, auto_points, select_points
from conftest import graph_of, select_with_candidates
from toy_models import ATTENTIONS, UNET_SKIPS, ToyTransformer, ToyUNet, linear_ruler

RULER = 20


@pytest.fixture(scope="module")
def ruler() -> LayerGraph:
    return graph_of(linear_ruler(RULER), (8,))


def pick(
    ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch, strengths: dict[int, float], points: int | None = None, **policy
) -> Selection:
    """Select on the ruler with candidates at these depths (depth -> strength)."""
    by_node = {str(depth - 1): strength for depth, strength in strengths.items()}
    return select_with_candidates(ruler, monkeypatch, by_node, points, **policy)


def depths(selection: Selection) -> list[int]:
    return [p.depth for p in selection.points]


EVERYWHERE = {d: 1.0 for d in range(1, RULER + 1)}


# ----------------------------------------------------------------------------- M


@pytest.mark.parametrize(
    ("depth", "m"), [(1, 1), (2, 1), (3, 1), (5, 2), (18, 3), (50, 4), (148, 5), (3000, 8), (10**6, 8)]
)
def test_m_is_round_ln_d_clamped(depth: int, m: int) -> None:
    assert auto_points(depth, load_rules("default").policy) == m


def test_m_clamp_and_fixed_m_come_from_the_policy() -> None:
    assert auto_points(2, Policy(min_points=2, max_points=3)) == 2
    assert auto_points(10**6, Policy(min_points=2, max_points=3)) == 3
    assert auto_points(50, Policy(points=6)) == 6


def test_default_m_and_distance_on_the_ruler(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    sel = pick(ruler, monkeypatch, EVERYWHERE)
    # M = round(ln 20) = 3; usable depth 20 - ceil(0.1 * 20) = 18; distance floor(0.6 * 18 / 3) = 3
    assert (sel.depth, len(sel.points), sel.min_distance) == (20, 3, 3)
    assert depths(sel) == [1, 4, 7]
    assert sel.notes == ()


def test_points_override(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    sel = pick(ruler, monkeypatch, EVERYWHERE, points=5)
    assert (len(sel.points), sel.min_distance) == (5, 2)  # floor(0.6 * 18 / 5) = 2
    assert depths(sel) == [1, 3, 5, 7, 9]


# ----------------------------------------------------------------------------- distance and exclusion


def test_min_distance_keeps_strong_neighbours_apart(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    strong = {5: 3.0, 6: 2.9, 7: 2.8, 12: 1.0, 16: 1.0}
    sel = pick(ruler, monkeypatch, strong, points=3, min_distance=4)
    assert depths(sel) == [5, 12, 16]  # 6 and 7 score higher than 12 and 16 but sit too close to 5
    assert sel.min_distance == 4


def test_min_distance_between_all_points(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    sel = pick(ruler, monkeypatch, EVERYWHERE, points=3, min_distance=6)
    assert depths(sel) == [1, 7, 13]


def test_exclusion_zone_near_the_output(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    late = {3: 1.0, 18: 2.0, 19: 9.0}
    assert depths(pick(ruler, monkeypatch, late, points=1)) == [18]  # 19 > 20 - ceil(0.1 * 20)
    assert depths(pick(ruler, monkeypatch, late, points=1, exclude_output=0.0)) == [19]
    assert depths(pick(ruler, monkeypatch, late, points=1, exclude_output=0.5)) == [3]


# ----------------------------------------------------------------------------- position bias and ties


@pytest.mark.parametrize(("position", "expected"), [("input", 1), ("centre", 10), ("output", 18), ("none", 1)])
def test_position_bias_moves_the_point(
    ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch, position: str, expected: int
) -> None:
    assert depths(pick(ruler, monkeypatch, EVERYWHERE, points=1, position=position)) == [expected]


def test_position_bias_scales_scores(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    sel = pick(ruler, monkeypatch, {5: 1.0, 10: 1.0, 15: 1.0}, position="output", position_strength=0.5)
    scores = {c.node: c.score for c in sel.candidates}
    # 1 + 0.5 * (2t - 1), t = depth / 20
    assert scores == {"4": 0.75, "9": 1.0, "14": 1.25}


def test_bias_strength_can_outweigh_a_rule(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    two = {2: 1.0, 16: 1.2}
    assert depths(pick(ruler, monkeypatch, two, points=1, position="input", position_strength=0.0)) == [16]
    assert depths(pick(ruler, monkeypatch, two, points=1, position="input", position_strength=0.5)) == [2]


def test_ties_are_broken_by_execution_order(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    tied = {9: 1.0, 3: 1.0, 14: 1.0}
    assert depths(pick(ruler, monkeypatch, tied, points=1)) == [3]
    shuffled = list(EVERYWHERE.items())
    random.Random(7).shuffle(shuffled)
    assert depths(pick(ruler, monkeypatch, dict(shuffled), points=4)) == depths(
        pick(ruler, monkeypatch, EVERYWHERE, points=4)
    )


# ----------------------------------------------------------------------------- notes


def test_relaxation_is_noted(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    sel = pick(ruler, monkeypatch, EVERYWHERE, points=5, min_distance=10)
    # 10 fits 2 points (1, 11), 5 adds two (6, 16), 2 adds the fifth (3): a relaxation keeps the points placed at
    # the wider distance, so they stay spread (a fresh pick at 2 bunched them at 1, 3, 5, 7, 9)
    assert depths(sel) == [1, 3, 6, 11, 16]
    assert sel.min_distance == 2
    assert sel.notes == (
        "min_distance relaxed to 5 to place 5 points",
        "min_distance relaxed to 2 to place 5 points",
    )


def test_too_few_flagged_depths_are_made_up_with_spread_spine_nodes(
    ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Detectors flag depths 4 and 12 only (a leaf block hides its inside, as in NFNets): the spine nodes farthest
    # from the points so far make up M, and the notes say so.
    sel = pick(ruler, monkeypatch, {4: 1.0, 12: 1.0}, points=4)
    assert depths(sel) == [4, 8, 12, 18]  # 18 is farthest from 4 and 12 (6 away), then 8 (4 away from both)
    assert sel.notes[-1] == "2 of 4 points are spine nodes spread over the depth: the detectors flagged too few distinct depths"


def test_no_note_when_the_distance_fits(ruler: LayerGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pick(ruler, monkeypatch, EVERYWHERE, points=3, min_distance=6).notes == ()


def test_fallback_when_nothing_fires(ruler: LayerGraph) -> None:
    sel = select_points(ruler, load_rules("default"))  # the real detectors: a chain of linears has no criterion
    assert sel.notes == (
        "no detector fired inside the eligible depth range; fell back to evenly spread spine nodes",
    )
    assert depths(sel) == [1, 7, 13]  # spread over the usable 18: 18 / 3 = 6 apart
    assert all(p.fired[0].detector == "spine" for p in sel.points)
    assert [c.node for c in sel.candidates if c.node in sel.names] == list(sel.names)  # reports list them


# ----------------------------------------------------------------------------- end to end


def test_points_carry_their_record() -> None:
    g = graph_of(ToyUNet())
    sel = select_points(g, load_rules("default"))
    # enc2.1.add ends the second encoder stage: it feeds join2's skip, so it is off the spine, but on the trunk.
    assert sel.names == ("enc1.1.add", "enc2.1.add", UNET_SKIPS[0])
    join = sel.points[2]
    assert (join.name, join.module_path, join.depth, join.shape, join.layout) == (
        "join2.cat", "join2", 10, (2, 32, 8, 8), "NCHW"
    )
    assert join.fired[0].detector == "skip" and join.reason.startswith("skip joins enc2.1.add")
    assert sel.rules_sha256 == load_rules("default").sha256


def test_pack_position_moves_transformer_points() -> None:
    g = graph_of(ToyTransformer(ATTENTIONS["sdpa"], depth=6))
    assert select_points(g, load_rules("default")).names == ("blocks.0.add", "blocks.1.add", "blocks.2.add")
    # dense: centred, and one point per third of the depth (spread = "strata")
    assert select_points(g, load_rules("dense")).names == ("blocks.1.add", "blocks.2.add", "blocks.4.add")


def test_selection_is_a_pure_function_of_graph_and_pack() -> None:
    g = graph_of(ToyUNet())
    pack = load_rules("dense")
    assert select_points(g, pack) == select_points(g, pack)


def test_strata_take_the_best_of_each_third_of_the_depth() -> None:
    import dataclasses

    g = graph_of(ToyTransformer(ATTENTIONS["sdpa"], depth=6))  # D = 26, usable 23: thirds end at depths 8, 16, 23
    pack = load_rules("default")
    strata = dataclasses.replace(pack, policy=dataclasses.replace(pack.policy, spread="strata"))
    assert select_points(g, pack).names == ("blocks.0.add", "blocks.1.add", "blocks.2.add")  # greedy: the 3 best
    assert [p.depth for p in select_points(g, strata).points] == [3, 11, 19]  # one per third
    assert load_rules("dense").policy.spread == "strata" and pack.policy.spread == "greedy"

