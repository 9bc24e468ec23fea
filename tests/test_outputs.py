"""Output conventions: which tensor of a model's output the losses read, and forward keyword inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprobe import instrument
from autoprobe.errors import InstrumentError
from autoprobe.outputs import OutputSpec, describe_output
from autoprobe.trace import TraceOptions

torch.set_num_threads(1)

SIZE = (3, 8, 8)


@dataclasses.dataclass
class Result:
    logits: torch.Tensor
    features: torch.Tensor


class Net(nn.Module):
    """Two convs and a 1x1 head; ``kind`` picks the output container."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        z = self.b(self.a(x).relu()).relu()
        logits = self.head(z)
        if self.kind == "dict":
            return {"aux": z, "out": logits}
        if self.kind == "tuple":
            return (z.mean(), logits)
        if self.kind == "pair":
            return (z, logits)
        if self.kind == "dataclass":
            return Result(logits, z)
        return logits


def _hf_output(logits: torch.Tensor, hidden: torch.Tensor):  # noqa: ANN202
    from transformers.modeling_outputs import SemanticSegmenterOutput

    return SemanticSegmenterOutput(logits=logits, hidden_states=(hidden,))


@pytest.mark.parametrize(
    ("kind", "selector", "description"),
    [("dict", None, "output['out']"), ("tuple", None, "output[1]"), ("pair", 1, "output[1]"),
     ("dict", "out", "output['out']"), ("tensor", None, "output")],
)
def test_the_selected_tensor_is_what_the_loss_reads(kind: str, selector, description: str) -> None:
    torch.manual_seed(0)
    model = Net(kind)
    probed = instrument(model, input_size=SIZE, output=selector, points=1, rules="dense")
    assert probed.report.output == description
    x, y = torch.randn(2, *SIZE), torch.randint(0, 4, (2, 8, 8))
    out = probed(x)
    assert type(out.output) is type(model(x))  # the model's own object, unchanged
    logits = probed.logits(out)
    assert logits.shape == (2, 4, 8, 8)
    total, parts = probed.loss(out, y)
    torch.testing.assert_close(parts["ce"], F.cross_entropy(logits, y).detach())
    total.backward()


def test_a_callable_selector_and_its_summary() -> None:
    probed = instrument(Net("pair"), input_size=SIZE, output=lambda out: out[1], points=1)
    assert probed.report.output == "<lambda>(output)"
    assert "logits = <lambda>(output)" in probed.report.summary()


def test_a_dataclass_output_is_read_at_logits_and_a_scalar_is_not_a_prediction() -> None:
    spec = OutputSpec.resolve(None, Result(torch.zeros(2, 3), torch.zeros(2, 3)), model="Net")
    assert spec.description == "output.logits"
    assert OutputSpec.resolve(None, (torch.zeros(()), torch.zeros(2, 3)), model="Net").description == "output[1]"


def test_hugging_face_model_output_is_read_at_logits_by_default() -> None:
    example = _hf_output(torch.zeros(2, 3, 4, 4, device="meta"), torch.zeros(2, 8, 4, 4, device="meta"))
    spec = OutputSpec.resolve(None, example, model="Seg")
    assert spec.description == "output['logits']"
    assert spec.select(_hf_output(torch.ones(2, 3, 4, 4), torch.zeros(2, 8, 4, 4))).sum() == 96


@pytest.mark.parametrize(
    ("kind", "selector", "message"),
    [
        ("pair", None, r"a tuple of 2 values \[tensor \(2, 8, 8, 8\), tensor \(2, 4, 8, 8\)\].*output=<index> \(0..1\)"),
        ("dict", "logits", r"output='logits' matches nothing.*keys \['aux' \(tensor \(2, 8, 8, 8\)\), 'out'.*one of \['aux', 'out'\]"),
        ("pair", 2, r"output=2 indexes nothing"),
        ("tuple", 0, r"Net's output has shape \(\); autoprobe supports \(B, K\) outputs"),
        ("dict", 1.5, "must be a key, attribute name, index or callable"),
    ],
)
def test_a_bad_selector_lists_what_the_output_holds(kind: str, selector, message: str) -> None:
    with pytest.raises(InstrumentError, match=message):
        instrument(Net(kind), input_size=SIZE, output=selector, points=1)


def test_a_scalar_selected_as_logits_is_refused() -> None:
    with pytest.raises(InstrumentError, match=r"supports \(B, K\) outputs and dense"):
        instrument(Net("tuple"), input_size=SIZE, output=lambda out: out[0].reshape(1), points=1)


def test_describe_output_names_every_entry() -> None:
    assert describe_output(Result(torch.zeros(2, 3), torch.zeros(2))) == (
        "a Result with fields [logits (tensor (2, 3)), features (tensor (2,))]"
    )


class Keyword(nn.Module):
    """Called as ``model(pixel_values=x, scale=s)`` like a Hugging Face model, with an extra input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, pixel_values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        z = self.b(self.a(pixel_values).relu() * scale).relu()
        return self.fc(z.mean((2, 3)))


def test_keyword_inputs_are_traced_and_passed_through() -> None:
    torch.manual_seed(0)
    model = Keyword()
    options = TraceOptions(input_name="pixel_values", forward_kwargs={"scale": torch.ones(2, 1, 1, 1)})
    probed = instrument(model, input_size=SIZE, options=options, points=1)
    x, scale = torch.randn(2, *SIZE), torch.full((2, 1, 1, 1), 2.0)
    out = probed(pixel_values=x, scale=scale)
    torch.testing.assert_close(out.output, model(pixel_values=x, scale=scale))
    assert not torch.allclose(out.output, model(pixel_values=x, scale=torch.ones(2, 1, 1, 1)))
    total, _ = probed.loss(out, torch.tensor([0, 4]))
    total.backward()


# --------------------------------------------------------------------- an output without a channel axis (issue 25.2)

class DepthOutput(dict):
    """A ModelOutput-like record (a dict whose entries read as attributes), as DPT's ``DepthEstimatorOutput``."""

    def __getattr__(self, name: str) -> torch.Tensor:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Depth(nn.Module):
    """Returns a (B, H, W) depth map, as ``DPTForDepthEstimation``'s ``predicted_depth``."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.enc = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(16, 3 if channels_last else 1, 1))

    def forward(self, x: torch.Tensor) -> DepthOutput:
        y = self.head(self.enc(x))
        return DepthOutput(predicted_depth=y.permute(0, 2, 3, 1) if self.channels_last else y.squeeze(1))


def test_an_output_callable_gets_the_models_own_output_type() -> None:
    seen: list[type] = []

    def depth(o: DepthOutput) -> torch.Tensor:
        seen.append(type(o))
        return o.predicted_depth.unsqueeze(1)  # an attribute read: a plain dict has none

    probed = instrument(Depth(), input_size=(3, 16, 16), output=depth, task="regression")
    assert seen and set(seen) == {DepthOutput}
    out = probed(torch.randn(2, 3, 16, 16))
    assert isinstance(out.output, DepthOutput)
    total, _ = probed.loss(out, torch.randn(2, 1, 16, 16))
    total.backward()


@pytest.mark.parametrize("task", [None, "regression"])
def test_a_map_without_a_channel_axis_is_refused_with_what_to_pass(task: str | None) -> None:
    # (B, H, W) was read as (B, K, L) with K = H, and refused later with a token-grid message.
    with pytest.raises(InstrumentError) as info:
        instrument(Depth(), input_size=(3, 16, 16), task=task)
    message = str(info.value)
    assert "(2, 16, 16)" in message and "axis 1 is a spatial axis" in message and "token" not in message
    assert message.splitlines()[-1] == (
        "Hint: give it a channel axis, e.g. output=lambda o: o['predicted_depth'].unsqueeze(1) with "
        "task='regression' for a map of values (or task='binary' for one logit per pixel)."
    )
    with pytest.raises(InstrumentError, match=r"lambda o: \(your selection from o\)\.unsqueeze\(1\)"):
        instrument(Depth(), input_size=(3, 16, 16), output=lambda o: o.predicted_depth, task="regression")


def test_channels_last_logits_are_refused_with_a_movedim() -> None:
    with pytest.raises(InstrumentError, match=r"movedim\(3, 1\)"):
        instrument(Depth(channels_last=True), input_size=(3, 16, 16), output=lambda o: o["predicted_depth"])
