"""autoprobe.placement: exactly spaced, named and random points, with answers known by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoprobe
from autoprobe.api import analyze
from autoprobe.errors import SelectionError
from autoprobe.placement import by_name, depth_points, main_path, random_points, spaced


def _chain() -> nn.Sequential:
    """Eight 3x3 convs then a linear: conv i is at depth i + 1, D = 9, usable depths 1..8."""
    convs = [nn.Conv2d(1 if i == 0 else 4, 4, 3, padding=1) for i in range(8)]
    return nn.Sequential(*convs, nn.Flatten(), nn.Linear(64, 3))


class _Residual(nn.Module):
    """stem (d1) -> c1 (d2) -> act1 -> c2 (d3) -> add <- short (d2, a side branch) -> act2 -> head (d4)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.short = nn.Conv2d(4, 4, 1)
        self.act2 = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.act2(self.c2(self.act1(self.c1(s))) + self.short(s))
        return self.fc(self.flat(self.pool(self.block(y))))


@pytest.fixture(scope="module")
def chain():
    return analyze(_chain(), input_size=(1, 4, 4))


@pytest.fixture(scope="module")
def residual():
    return analyze(_Residual(), input_size=(1, 6, 6))


def _depths(sel) -> list[int]:
    return [p.depth for p in sel.points]


def test_every_depth_of_the_chain_has_its_conv(chain):
    assert chain.graph.depth == 9
    assert {d: i.name for d, i in depth_points(chain).items()} == {d: str(d - 1) for d in range(1, 9)}


@pytest.mark.parametrize(
    ("m", "spacing", "position", "names"),
    [
        (2, 3, "input", ("0", "3")),     # depths 1, 4: the smallest anchor
        (2, 3, "output", ("4", "7")),    # depths 5, 8: the last usable depth is 9 - ceil(0.05 * 9) = 8
        (2, 3, "centre", ("2", "5")),    # depths 3, 6: middle 4.5 = the middle of 1..8
        (3, 2, "centre", ("1", "3", "5")),  # depths 2, 4, 6 (middle 4) beats 3, 5, 7 (middle 5) by the tie rule
        (1, 5, "input", ("0",)),
        (1, 5, "output", ("7",)),
        (1, 5, "centre", ("3",)),        # depths 4 and 5 are equally central: the smaller wins
        (4, 2, "input", ("0", "2", "4", "6")),
    ],
)
def test_spaced_places_points_exactly_apart(chain, m, spacing, position, names):
    sel = spaced(chain, m, spacing, position)
    assert sel.names == names
    assert all(b - a == spacing for a, b in zip(_depths(sel), _depths(sel)[1:]))
    assert sel.min_distance == spacing
    assert "placement.spaced" in sel.notes[-1] and position in sel.notes[-1]


def test_spaced_refuses_what_does_not_fit(chain):
    with pytest.raises(SelectionError, match=r"no 3 points exactly 4 weight layers apart.*eligible depths with a point: 1, 2"):
        spaced(chain, 3, 4, "centre")   # needs 9 usable depths, the chain has 8
    with pytest.raises(SelectionError, match="position='middle'"):
        spaced(chain, 2, 1, "middle")
    with pytest.raises(SelectionError, match="m=0"):
        spaced(chain, 0, 1)


def test_main_path_follows_the_longest_branch_not_the_shortcut(residual):
    names = [i.name for i in main_path(residual.graph)]
    assert "short" not in names and names[names.index("stem") + 1 : names.index("stem") + 5] == ["c1", "act1", "c2", "add"]
    # depth 2 is c1 -> act1 on the long branch; short (also depth 2, executed later) is a side branch
    points = {d: i.name for d, i in depth_points(residual).items()}
    assert points == {1: "stem", 2: "act1", 3: "act2", 4: "pool"}  # flat, a view of pool, is skipped


def test_by_name_takes_nodes_and_module_outputs_in_execution_order(residual):
    sel = by_name(residual, ["block", "c1", "stem"])
    assert sel.names == ("stem", "c1", "block.1")   # "block" (a Sequential) means its output, block.1
    assert "placement.by_name" in sel.notes[-1]


def test_by_name_unknown_name_lists_close_matches(residual):
    with pytest.raises(SelectionError, match=r"'c3' is not a node.*close matches: .*c2, c1"):
        by_name(residual, ["c3"])
    with pytest.raises(SelectionError, match="already chosen"):
        by_name(residual, ["block", "block.1"])
    with pytest.raises(SelectionError, match="non-empty list"):
        by_name(residual, "stem")


def test_random_points_are_reproducible_and_eligible(residual):
    a, b = random_points(residual, 2, seed=3), random_points(residual, 2, seed=3)
    assert a.names == b.names and len(set(a.names)) == 2
    pool = {i.name for i in residual.graph.ordered if 1 <= i.depth <= 4 and i.channels is not None
            and i.name not in (residual.graph.input, residual.graph.output)}
    assert set(a.names) <= pool
    seen = {random_points(residual, 1, seed=s).names[0] for s in range(40)}
    assert seen == pool, "every eligible node can be drawn, not only spine or candidate nodes"
    with pytest.raises(SelectionError, match="cannot draw 99"):
        random_points(residual, 99, seed=0)


def test_instrument_taps_exactly_the_placed_points():
    model = _Residual()
    sel = by_name(analyze(model, input_size=(1, 6, 6)), ["c1", "act2"])
    probed = autoprobe.instrument(model, sel, input_size=(1, 6, 6))
    out = probed(torch.randn(2, 1, 6, 6))
    assert list(out.heads) == ["c1", "act2"]
    total, _ = probed.loss(out, torch.tensor([0, 2]))
    total.backward()
