"""Misuse of the Python API is refused with an AutoprobeError that says what to do (issue 12.6, 12.7)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autoprobe
from autoprobe.backends import trace_with_fallbacks
from autoprobe.errors import AutoprobeError, InputSizeError, UsageError


def small() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


@pytest.mark.parametrize("points", [0, -1, "3", True, 2.0])
def test_points_must_be_a_positive_integer(points: object) -> None:
    with pytest.raises(UsageError, match=r"points must be a positive integer .* not") as caught:
        autoprobe.inspect(small(), input_size=(3, 16, 16), points=points)  # type: ignore[arg-type]
    assert "Hint:" in str(caught.value)


def test_leaf_modules_take_classes_not_names() -> None:
    with pytest.raises(UsageError, match="leaf_modules takes nn.Module classes, but got 'Conv2d'"):
        autoprobe.inspect(small(), input_size=(3, 16, 16),
                          options=autoprobe.TraceOptions(leaf_modules=["Conv2d"]))  # type: ignore[list-item]
    with pytest.raises(UsageError, match="leaf_modules must be a sequence"):
        autoprobe.inspect(small(), input_size=(3, 16, 16),
                          options=autoprobe.TraceOptions(leaf_modules=nn.Conv2d))  # type: ignore[arg-type]


def test_a_function_is_not_a_model() -> None:
    with pytest.raises(UsageError, match="model must be an nn.Module or a model spec string, not function"):
        autoprobe.inspect(lambda t: t)  # type: ignore[arg-type]


def test_leaf_paths_must_name_a_submodule() -> None:
    with pytest.raises(UsageError, match=r"leaf_paths names 'no.such.module', which is not a submodule"):
        autoprobe.inspect(small(), input_size=(3, 16, 16), options=autoprobe.TraceOptions(leaf_paths=["no.such.module"]))
    with pytest.raises(UsageError, match="Close names: 3"):
        trace_with_fallbacks(small(), (3, 16, 16), autoprobe.trace.TraceOptions(leaf_paths=["33"]))


class Slicer(nn.Module):
    """Shrinks its input by 8 with a slice, which torch accepts at any size: 8x8 leaves an empty map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)[:, :, 8:, 8:]
        return self.fc(y.mean((2, 3)))


def test_an_input_smaller_than_the_model_shrinks_to_nothing_is_refused() -> None:
    assert autoprobe.inspect(Slicer(), input_size=(3, 16, 16)).depth == 2
    with pytest.raises(InputSizeError, match=r"smaller than the model's total stride: node 'getitem'.*size 0") as caught:
        autoprobe.inspect(Slicer(), input_size=(3, 8, 8))
    assert "input_size=(3, 8, 8)" in str(caught.value)


def test_shape_errors_name_the_api_argument_not_the_cli_flag() -> None:
    one_channel = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(InputSizeError) as caught:
        autoprobe.inspect(one_channel)  # the default (3, 224, 224) does not fit a 1-channel model
    message = str(caught.value)
    assert "--input-size" not in message
    assert "input_size=(3, 224, 224) failed" in message


@pytest.mark.parametrize("size", [(3, 0, 16), (3, -1, 8), "3,a,8", (True, 8, 8), ()])
def test_a_bad_input_size_is_refused(size: object) -> None:
    with pytest.raises(InputSizeError, match="input_size="):
        autoprobe.inspect(small(), input_size=size)  # type: ignore[arg-type]


def test_options_and_keywords_are_not_mixed() -> None:
    with pytest.raises(UsageError, match="not both"):
        autoprobe.inspect(small(), input_size=(3, 16, 16), train=True,
                          options=autoprobe.trace.TraceOptions(mode="eval"))
    with pytest.raises(UsageError, match="mode must be 'train' or 'eval'"):
        autoprobe.trace.TraceOptions(mode="training")  # type: ignore[arg-type]


def test_usage_errors_are_autoprobe_errors_and_type_errors() -> None:
    # Code that caught the plain TypeError these misuses raised before keeps working.
    assert issubclass(UsageError, AutoprobeError) and issubclass(UsageError, TypeError)


class TopLevelAdd(nn.Module):
    """fx cannot trace it (a branch on the device); export can, but its top-level add cannot be hooked."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.device.type == "cpu":  # a device branch: fx (on meta) stops, export does not
            x = x * 1.0
        x = self.pool(self.body(x) + x)
        return self.fc(self.tail(x).mean((2, 3)))


def test_points_that_hooks_cannot_tap_are_never_chosen_on_export() -> None:
    analysis = autoprobe.api.analyze(TopLevelAdd(), input_size=(3, 16, 16))
    assert analysis.selection.backend == "export"
    assert analysis.graph["add"].call is None
    assert analysis.selection.points and all(analysis.graph[p.name].call for p in analysis.selection.points)
    scored = {c.node for c in analysis.selection.candidates}
    if "add" in scored:
        assert any("cannot be tapped" in n and "add" in n for n in analysis.selection.notes)


def test_points_can_be_chosen_by_name_and_untappable_ones_are_refused() -> None:
    analysis = autoprobe.api.analyze(TopLevelAdd(), input_size=(3, 16, 16))
    chosen = analysis.choose("tail.1", "body.1")
    assert chosen.names == ("body.1", "tail.1") and chosen.backend == "export"
    assert all(p.layout == "NCHW" for p in chosen.points)
    with pytest.raises(UsageError, match=r"'add' cannot be a point on the export backend .*not a module output"):
        analysis.choose("add")
    with pytest.raises(UsageError, match="is not a node"):
        analysis.choose("tail.9")


def test_a_chosen_selection_instruments_at_exactly_those_points() -> None:
    analysis = autoprobe.api.analyze(small(), input_size=(3, 16, 16))
    probed = autoprobe.instrument(small(), analysis.choose("4"), input_size=(3, 16, 16))
    assert [t.point for t in probed.report.taps] == ["4"]


def test_a_size_with_the_batch_axis_is_told_to_drop_it() -> None:
    # The first-hour slip: (1, 3, 32, 32) for a 2-d conv net; the hint names the batch axis.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputSizeError, match=r"without the batch axis \(if its leading 1 is a batch axis, drop it\)"):
        autoprobe.inspect(model, input_size=(1, 3, 32, 32))
    with pytest.raises(InputSizeError) as caught:
        autoprobe.inspect(model, input_size=(3, 3, 32, 32))
    assert "leading 1" not in str(caught.value)  # only a leading 1 reads as a batch axis
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
