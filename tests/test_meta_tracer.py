"""Shape specialization in the fx tracer: Python control flow on shapes is decided at the traced size.

Each tiny model reads a shape-derived value the way real models do (``if h % 16``, ``assert
x.shape[1] == C``, ``range(x.size(0))``, ``x.ndim != 4``, ``int(n ** 0.5)``). fx traces it, the graph
is the branch taken at the traced size, and the notes name the line. A branch on tensor values or on
a device still fails fx, so the model goes down the ladder as before.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import fx, nn

from autoprobe.api import analyze
from autoprobe.backends import trace_with_fallbacks
from autoprobe.errors import TraceError
from autoprobe.trace import TraceOptions, trace_fx

SIZE = (3, 32, 32)


def _ops(traced) -> list[str]:
    """The graph's computing nodes by qualified name (placeholders, outputs and unused reads left out)."""
    return [
        traced.qualnames[n.name]
        for n in traced.graph_module.graph.nodes
        if n.op not in ("placeholder", "output") and n.users
        or n.op == "call_module"
    ]


def _line(marker: str) -> int:
    """The line of this file holding ``marker``: notes name the model code by ``module:line``."""
    with open(__file__) as source:
        return next(i for i, text in enumerate(source, 1) if marker in text and "_line(" not in text)


def _site(marker: str, how: str) -> str:
    return f"{__name__}:{_line(marker)} ({how})"


class Divisible(nn.Module):
    """smp's ``check_input_shape``: refuses sizes the encoder's stride does not divide."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 16 or w % 16:  # marker: divisible
            raise RuntimeError(f"Wrong input shape height={h}, width={w}")
        return self.conv(x)


class Asserted(nn.Module):
    """An assert on the channel count, as Hugging Face models check ``num_channels``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3, "expected RGB"  # marker: asserted
        return self.conv(x)


class PerSample(nn.Module):
    """A loop over the batch: unrolled at the traced batch of 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.stack([y[i] * 2 for i in range(x.size(0))])  # marker: per-sample


class Batched(nn.Module):
    """Adds a batch axis to an unbatched input: ``x.ndim != 4`` is False at the traced size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:  # marker: batched
            x = x.unsqueeze(0)
        return self.conv(x)


class TokenGrid(nn.Module):
    """A ViT-style token grid side read with ``int(n ** 0.5)``: the reshape gets the constant 8."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.embed(x).flatten(2).transpose(1, 2))
        side = int(tokens.shape[1] ** 0.5)  # marker: token-grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], 8, side, side)


class ValueBranch(nn.Module):
    """A branch on tensor values: no size decides it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 0.5
        return self.head(y)


class DeviceBranch(nn.Module):
    """A branch on the device: on meta it would read ``meta``, not the device the model trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            x = x.contiguous()
        return self.conv(x)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).mean(-1)


def _returns_tuple(forward):
    """Hugging Face's ``can_return_tuple``: a ``functools.wraps`` decorator that pops from ``**kwargs``."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        output = forward(self, *args, **kwargs)
        return output if return_dict else (output,)

    return wrapper


class Decorated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    @_returns_tuple
    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if pixel_values.shape[1] != 3:  # marker: decorated
            raise ValueError("expected 3 channels")
        return self.conv(pixel_values)


def test_modulo_branch_is_decided_at_the_traced_size() -> None:
    traced = trace_fx(Divisible(), SIZE)
    assert _ops(traced) == ["conv"]
    assert traced.notes == (
        f"fx specialized the graph to input shape (2, 3, 32, 32): the model's Python read shapes or dtypes of "
        f"traced tensors at {_site('marker: divisible', 'bool')}; the branches taken and sizes read hold for this "
        "size only",
    )


def test_modulo_branch_refuses_the_size_the_model_refuses() -> None:
    with pytest.raises(TraceError, match="Wrong input shape height=40, width=40"):
        trace_fx(Divisible(), (3, 40, 40))


def test_assert_on_channels_is_checked_not_recorded() -> None:
    traced = trace_fx(Asserted(), SIZE)
    assert _ops(traced) == ["conv"]
    assert _site("marker: asserted", "bool") in traced.notes[0]
    with pytest.raises(TraceError, match="expected RGB"):
        trace_fx(Asserted(), (4, 32, 32))


def test_loop_over_the_batch_is_unrolled_at_the_traced_batch() -> None:
    model = PerSample()
    traced = trace_fx(model, SIZE)
    assert _ops(traced) == ["conv", "getitem", "mul", "getitem_1", "mul_1", "stack"]
    assert _site("marker: per-sample", "index") in traced.notes[0]
    x = torch.randn(2, *SIZE)
    assert torch.equal(traced.graph_module(x), model(x))


def test_ndim_branch_takes_the_batched_path() -> None:
    traced = trace_fx(Batched(), SIZE)
    assert _ops(traced) == ["conv"]
    assert _site("marker: batched", "bool") in traced.notes[0]


def test_int_of_a_size_becomes_a_constant() -> None:
    model = TokenGrid()
    traced = trace_fx(model, SIZE)
    reshape = next(n for n in traced.graph_module.graph.nodes if n.target == "reshape")
    assert reshape.args[2:] == (8, 8, 8)
    assert tuple(reshape.meta["tensor_meta"].shape) == (2, 8, 8, 8)
    assert _site("marker: token-grid", "int") in traced.notes[0]
    x = torch.randn(2, *SIZE)
    assert torch.equal(traced.graph_module(x), model(x))


def test_a_model_that_reads_no_value_traces_as_plain_fx_without_a_note() -> None:
    model = Plain()
    traced = trace_fx(model, SIZE)
    assert traced.notes == ()
    plain = fx.symbolic_trace(model)
    assert [(n.op, n.target) for n in traced.graph_module.graph.nodes] == [(n.op, n.target) for n in plain.graph.nodes]


def test_value_branch_still_fails_fx_and_goes_down_the_ladder() -> None:
    with pytest.raises(TraceError, match="gt is Tensor-valued, not read from shapes"):
        trace_fx(ValueBranch(), SIZE)
    result = trace_with_fallbacks(ValueBranch(), SIZE, TraceOptions(allow_real_data=True))
    assert result.backend == "hooks"
    assert [a.backend for a in result.failed] == ["fx", "export"]


def test_device_branch_still_fails_fx() -> None:
    with pytest.raises(TraceError, match="depends on a tensor's device"):
        trace_fx(DeviceBranch(), SIZE)
    result = trace_with_fallbacks(DeviceBranch(), SIZE)
    assert (result.backend, [a.backend for a in result.failed]) == ("export", ["fx"])


def test_decorated_forward_with_kwargs_traces() -> None:
    model = Decorated()
    traced = trace_fx(model, SIZE, TraceOptions(input_name="pixel_values"))
    assert _ops(traced) == ["conv"]
    assert _site("marker: decorated", "bool") in traced.notes[0]


def test_specialization_is_in_the_selection_notes() -> None:
    notes = analyze(Divisible(), input_size=SIZE).selection.notes
    assert any(n.startswith("fx specialized the graph to input shape (2, 3, 32, 32)") for n in notes), notes


@pytest.mark.parametrize("arch", ["FPN", "DeepLabV3Plus"])
def test_smp_models_trace_with_fx(arch: str) -> None:
    smp = pytest.importorskip("segmentation_models_pytorch")
    with torch.device("meta"):
        model = getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=2)
    selection = analyze(model, input_size=(3, 64, 64)).selection
    assert selection.backend == "fx"
    assert not any(n.startswith("backend fx failed") for n in selection.notes), selection.notes
    assert any("segmentation_models_pytorch.base.model:" in n for n in selection.notes), selection.notes
    assert len(selection.points) >= 1


def test_hugging_face_vit_from_config_traces_with_fx() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                    image_size=32, patch_size=8)
    with torch.device("meta"):
        model = transformers.ViTForImageClassification(config)
    selection = analyze(model, input_size=SIZE, options=TraceOptions(input_name="pixel_values")).selection
    assert selection.backend == "fx"
    assert any("transformers.models.vit.modeling_vit:" in n for n in selection.notes), selection.notes


def test_a_returned_model_output_keeps_its_class_through_fx() -> None:
    """fx lowers a returned dict subclass to a plain dict; the trace records the class and the
    instrumented model returns the model's own ``ModelOutput`` again."""
    transformers = pytest.importorskip("transformers")
    from autoprobe import instrument
    from autoprobe.trace import trace_fx

    config = transformers.ViTConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                    image_size=32, patch_size=8, num_labels=4)
    model = transformers.ViTForImageClassification(config)
    traced = trace_fx(model, SIZE, TraceOptions(input_name="pixel_values"))
    assert traced.output_type is transformers.modeling_outputs.ImageClassifierOutput
    assert trace_fx(torch.nn.Conv2d(3, 4, 3), SIZE).output_type is None
    out = instrument(model, input_size=SIZE)(torch.randn(2, *SIZE))
    assert type(out.output) is transformers.modeling_outputs.ImageClassifierOutput
    assert out.output.logits.shape == (2, 4)
