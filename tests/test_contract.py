"""One contract: every point ``inspect`` chooses is tapped by ``instrument`` exactly where it is named.

Checked as a property over the fuzz families (``fuzz_models.check`` asserts it for every model) and
on real models, plus minimal repros of the two ways it broke: Hugging Face SegFormer's token
features, whose nearest map is the spatial-reduction conv beside the attention (issue 16.4), and
a non-square patch grid whose tokens the model also views as a 1xN row (issue 16.7).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprobe
from autoprobe.api import analyze
from autoprobe.errors import InstrumentError
from conftest import graph_of
from fuzz_models import FAMILIES, build, check


def assert_tapped_where_named(model: nn.Module, size: tuple[int, ...], **options: object) -> autoprobe.Probed:
    """inspect, then instrument the very selection: every point tapped by its own name, with its own shape."""
    selection = analyze(model, input_size=size, **options).selection
    assert selection.points, selection.notes
    probed = autoprobe.instrument(model, selection, input_size=size)
    assert [t.point for t in probed.report.taps] == list(selection.names)
    assert [tuple(t.feature_shape) for t in probed.report.taps] == [tuple(p.shape) for p in selection.points]
    probed.train()
    out = probed(torch.randn(2, *size))
    for point in selection.points:
        assert tuple(out.features[point.name].shape) == tuple(point.shape), point.name
    return probed


@pytest.mark.parametrize("family", FAMILIES)
def test_fuzz_family_points_are_tapped_where_named(family: str) -> None:
    for seed in range(3):
        case = build(family, seed)
        assert check(case) in ("ok", "refused: TraceError") or case.needs_values, (family, seed)


# ----------------------------------------------------------------------------- SegFormer (issue 16.4)


def _segformer() -> nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    # Two stages, the first with a spatial-reduction conv (sr_ratio 2) beside its attention.
    config = SegformerConfig(
        num_labels=3, num_encoder_blocks=2, depths=[2, 2], hidden_sizes=[8, 16], decoder_hidden_size=16,
        num_attention_heads=[1, 2], sr_ratios=[2, 1], strides=[4, 2], patch_sizes=[7, 3], mlp_ratios=[2, 2],
    )
    return SegformerForSemanticSegmentation(config)


@pytest.mark.parametrize("rules", ["default", "dense"])
def test_segformer_token_points_instrument(rules: str) -> None:
    torch.manual_seed(0)
    model = _segformer()
    probed = assert_tapped_where_named(model, (3, 32, 32), rules=rules)
    tokens = [t for t in probed.report.taps if t.layout == "NLC"]
    assert tokens  # token features are chosen, and each is laid on its stage's patch grid
    graph = analyze(model, input_size=(3, 32, 32)).graph
    for tap in tokens:
        grid, prefix = graph.token_grid(tap.point, 2)
        assert prefix == 0 and grid[0] * grid[1] == tap.feature_shape[1]


# ----------------------------------------------------------------------------- non-square grid (issue 16.7)


class RowMixer(nn.Module):
    """Tokens of a 2x8 patch grid, mixed by a conv over the tokens viewed as a 1x16 row, then laid back on 2x8."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.norm = nn.LayerNorm(8)
        self.mix = nn.Conv2d(8, 8, (1, 3), padding=(0, 1))
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.embed(x)
        b, c, h, w = grid.shape
        t = self.norm(grid.flatten(2).transpose(1, 2))  # (B, 16, C) tokens of the 2x8 grid
        row = self.mix(t.transpose(1, 2).unsqueeze(2))  # the same tokens as a 1x16 "map"
        t = t + self.mlp(row.squeeze(2).transpose(1, 2))
        out = self.head(t.transpose(1, 2).reshape(b, c, h, w))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_tokens_of_a_non_square_grid_are_laid_on_the_patch_grid_not_a_row_view() -> None:
    graph = graph_of(RowMixer(), (3, 8, 32))
    assert graph["mix"].spatial == (1, 16)  # a conv map of the tokens' count that is no patch grid
    assert graph.token_grid("norm", 2) == ((2, 8), 0)
    assert graph.token_grid("add", 2) == ((2, 8), 0)
    probed = assert_tapped_where_named(RowMixer(), (3, 8, 32), rules="dense", points=2)
    for tap in probed.report.taps:
        if tap.layout == "NLC":
            assert tap.head_shape == (2, 2, 8, 32)


def test_a_token_feature_without_a_grid_is_not_chosen_for_a_dense_output() -> None:
    class NoGrid(nn.Module):  # tokens from a linear over the rows: nothing says which grid they form
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.mlp(self.proj(x.mean(1)))  # (B, 16 rows, 8)
            return self.head(t.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 16))

    selection = analyze(NoGrid(), input_size=(3, 16, 16), rules="dense").selection
    assert all(p.layout != "NLC" for p in selection.points)
    graph = analyze(NoGrid(), input_size=(3, 16, 16)).graph
    mlp = next(n for n in graph if n.name == "mlp.2")
    assert mlp.layout == "NLC" and graph.token_grid("mlp.2", 2) is None
    chosen = autoprobe.api.analyze(NoGrid(), input_size=(3, 16, 16))
    with pytest.raises(InstrumentError, match="which grid its tokens form"):
        autoprobe.instrument(NoGrid(), chosen.selection.__class__(**{**chosen.selection.__dict__,
                                                                    "points": (_point(graph, "mlp.2"),)}))


def _point(graph, name):  # noqa: ANN001, ANN202
    from autoprobe.select import Point

    info = graph[name]
    return Point(name=name, fx_name=info.fx_name, module_path=info.module_path, depth=info.depth, shape=info.shape,
                 layout=info.layout, score=1.0, fired=())
