"""Which part of a model's output is the prediction the losses read.

Models return a tensor, a tuple or list, a dict (torchvision's segmentation models:
``{"out": ..., "aux": ...}``), a dataclass, or a Hugging Face ``ModelOutput``
(``SemanticSegmenterOutput``, ``ImageClassifierOutput``: an ordered dict whose keys are
its non-``None`` fields, also readable as attributes). ``instrument(output=...)`` names
the prediction; ``ProbedOutput.output`` keeps the model's own object unchanged, so user
code reading ``out["aux"]`` or ``out.logits`` keeps working, and ``Probed.loss`` reads the
selected tensor.

The selector is one of:

- ``None`` (the default): the output itself when it is a tensor; else the entry ``out``,
  then ``logits``; else the only tensor it holds with a batch and a class axis (2 dims or more);
- a string: a key of a dict / ``ModelOutput``, or an attribute of a dataclass or object;
- an int: an index into a tuple or list;
- a callable: ``output -> Tensor``, for anything else.

A model's own auxiliary outputs (torchvision's ``aux`` classifier) are left alone: they
are not autoprobe points. To supervise ``aux`` too, add its loss to the total yourself,
``total = total + 0.5 * F.cross_entropy(F.interpolate(out.output["aux"], size=y.shape[-2:],
mode="bilinear"), y, ignore_index=255)`` (torchvision's reference weight).

Example:
    >>> import torch
    >>> spec = OutputSpec.resolve(None, {"out": torch.zeros(2, 3), "aux": torch.zeros(2, 3)}, model="Net")
    >>> spec.description, spec.select({"out": torch.ones(2, 3), "aux": torch.zeros(2, 3)}).sum().item()
    ("output['out']", 6.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from torch import Tensor

from .errors import InstrumentError

__all__ = ["OutputSelector", "OutputSpec", "describe_output", "check_channel_axis"]

OutputSelector = Union[None, str, int, Callable[[Any], Tensor]]
"""What ``instrument(output=...)`` accepts."""

_DEFAULT_NAMES = ("out", "logits")


@dataclass(frozen=True)
class OutputSpec:
    """How to read the prediction tensor from the model's output.

    Attributes:
        how: ``whole`` (the output is the tensor), ``key``, ``attribute``, ``index`` or ``callable``.
        key: the key, attribute name or index (``None`` for ``whole`` and ``callable``).
        fn: the user's callable (``callable`` only).
        source: ``given`` (the user's ``output=``) or ``default``.
        description: how a reader would write it (``output['out']``, ``output.logits``).
    """

    how: Literal["whole", "key", "attribute", "index", "callable"]
    key: str | int | None
    fn: Callable[[Any], Tensor] | None
    source: Literal["given", "default"]
    description: str

    @classmethod
    def resolve(cls, selector: OutputSelector, example: Any, *, model: str) -> OutputSpec:
        """Resolve ``selector`` against an example output of the model.

        Args:
            selector: the user's ``output=`` (see the module docstring).
            example: one output of the model (meta tensors are fine).
            model: the model's label, for messages.

        Returns:
            The ``OutputSpec``; ``spec.select(example)`` is a tensor.

        Raises:
            InstrumentError: the selector matches nothing, or the default finds no single
                prediction; the message lists what the output holds.
        """
        if selector is None:
            spec = cls._default(example, model)
        elif isinstance(selector, bool):
            raise InstrumentError(f"output={selector!r} is not a selector. {_hint(example)}")
        elif isinstance(selector, str):
            if isinstance(example, Mapping) and selector in example:
                spec = cls("key", selector, None, "given", f"output[{selector!r}]")
            elif not isinstance(example, Mapping) and hasattr(example, selector):
                spec = cls("attribute", selector, None, "given", f"output.{selector}")
            else:
                raise InstrumentError(
                    f"output={selector!r} matches nothing in {model}'s output, which is {describe_output(example)}. "
                    f"{_hint(example)}"
                )
        elif isinstance(selector, int):
            if not isinstance(example, (tuple, list)) or not -len(example) <= selector < len(example):
                raise InstrumentError(
                    f"output={selector} indexes nothing in {model}'s output, which is {describe_output(example)}. "
                    f"{_hint(example)}"
                )
            spec = cls("index", selector, None, "given", f"output[{selector}]")
        elif callable(selector):
            name = getattr(selector, "__name__", type(selector).__name__)
            spec = cls("callable", None, selector, "given", f"{name}(output)")
        else:
            raise InstrumentError(
                f"output= must be a key, attribute name, index or callable; got {type(selector).__name__}. "
                f"{_hint(example)}"
            )
        value = spec.select(example)
        if not isinstance(value, Tensor):
            raise InstrumentError(
                f"{spec.description} of {model}'s output is {describe_output(value)}, not a tensor. {_hint(example)}"
            )
        return spec

    @classmethod
    def _default(cls, example: Any, model: str) -> OutputSpec:
        if isinstance(example, Tensor):
            return cls("whole", None, None, "default", "output")
        named: tuple[str, Mapping[str, Any], Callable[[str], str]] | None = None
        if isinstance(example, Mapping):
            named = ("key", example, lambda name: f"output[{name!r}]")
        elif dataclasses.is_dataclass(example) and not isinstance(example, type):
            fields = {f.name: getattr(example, f.name) for f in dataclasses.fields(example)}
            named = ("attribute", fields, lambda name: f"output.{name}")
        if named is not None:
            # A dict's keys and a dataclass's fields are searched alike: 'out', then 'logits', then the only prediction.
            how, values, shown = named
            found = next((n for n in _DEFAULT_NAMES if isinstance(values.get(n), Tensor)), None)
            only = [k for k, v in values.items() if _prediction_like(v)]
            if found is None and len(only) == 1:
                found = only[0]
            if found is not None:
                return cls(how, found, None, "default", shown(found))
        elif isinstance(example, (tuple, list)):
            only = [i for i, v in enumerate(example) if _prediction_like(v)]
            if len(only) == 1:
                return cls("index", only[0], None, "default", f"output[{only[0]}]")
        raise InstrumentError(
            f"{model}'s output is {describe_output(example)}: no single prediction tensor to supervise "
            f"(looked for the tensor itself, then 'out', then 'logits', then the only tensor of 2 or more dims). "
            f"{_hint(example)}"
        )

    def select(self, output: Any) -> Tensor:
        """The prediction tensor of one output of the model."""
        if self.how == "whole":
            return output
        if self.how == "key":
            return output[self.key]
        if self.how == "attribute":
            return getattr(output, self.key)  # type: ignore[arg-type]
        if self.how == "index":
            return output[self.key]
        return self.fn(output)  # type: ignore[misc]


def check_channel_axis(axes: str | None, shape: tuple[int, ...], spec: OutputSpec, model: str) -> None:
    """Refuse a prediction whose axis 1, read as the K channels, is a spatial axis by the ops that made it.

    A depth map ``(B, H, W)`` (``DPTForDepthEstimation``'s ``predicted_depth``) or channels-last logits
    ``(B, H, W, K)`` would otherwise be taken as ``(B, K, *S)`` with K = H. A spatial axis of size 1
    (``depth.unsqueeze(1)``) is one channel, and unknown axes are not judged (no guess from sizes).

    Args:
        axes: the prediction's axis labels (``axes.Axis`` letters, ``"NSS"``), or ``None`` when unknown.
        shape: its shape, batch first.
        spec: how it was read from the model's output (for the message).
        model: the model's label.

    Raises:
        InstrumentError: axis 1 is a spatial axis of more than one entry; the hint says what to pass.

    Example:
        >>> spec = OutputSpec("attribute", "predicted_depth", None, "given", "output.predicted_depth")
        >>> check_channel_axis("NSS", (2, 1, 16), spec, "Depth")  # one row: one channel
        >>> check_channel_axis("NSS", (2, 16, 16), spec, "Depth")
        Traceback (most recent call last):
            ...
        autoprobe.errors.InstrumentError: output.predicted_depth of Depth's output has shape (2, 16, 16), whose axis 1 is a spatial axis (axes N, S, S: batch, spatial, spatial), not K channels: autoprobe reads a prediction as (B, K) or (B, K, *S).
        Hint: give it a channel axis, e.g. output=lambda o: o.predicted_depth.unsqueeze(1) with task='regression' for a map of values (or task='binary' for one logit per pixel).
    """
    if not isinstance(axes, str) or len(axes) != len(shape) or len(shape) < 3 or axes[1] != "S" or shape[1] == 1:
        return
    names = {"N": "batch", "C": "channels", "S": "spatial", "M": "merged batch", "?": "unknown"}
    shown = ", ".join(axes)
    read = ", ".join(names.get(a, a) for a in axes)
    if spec.how == "callable":
        name = getattr(spec.fn, "__name__", "")
        selected = f"{name}(o)" if name.isidentifier() else "(your selection from o)"
    else:
        selected = "o" + spec.description[len("output"):]
    if "C" in axes:
        fix = f"output=lambda o: {selected}.movedim({axes.index('C')}, 1) to put the channels on axis 1"
    else:
        fix = (f"output=lambda o: {selected}.unsqueeze(1) with task='regression' for a map of values "
               "(or task='binary' for one logit per pixel)")
    raise InstrumentError(
        f"{spec.description} of {model}'s output has shape {tuple(shape)}, whose axis 1 is a spatial axis "
        f"(axes {shown}: {read}), not K channels: autoprobe reads a prediction as (B, K) or (B, K, *S).\n"
        f"Hint: give it a channel axis, e.g. {fix}."
    )


def describe_output(value: Any) -> str:
    """A short description of an output's structure, for messages.

    Example:
        >>> import torch
        >>> describe_output({"out": torch.zeros(2, 3, 4, 4), "aux": None})
        "a dict with keys ['out' (tensor (2, 3, 4, 4)), 'aux' (NoneType)]"
    """
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        kind = "a dict" if type(value) is dict else f"a {type(value).__name__}"
        return f"{kind} with keys [{', '.join(f'{k!r} ({_short(v)})' for k, v in value.items())}]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = ", ".join(f"{f.name} ({_short(getattr(value, f.name))})" for f in dataclasses.fields(value))
        return f"a {type(value).__name__} with fields [{items}]"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} values [{', '.join(_short(v) for v in value)}]"
    return f"a {type(value).__name__}"


def _prediction_like(value: Any) -> bool:
    """A tensor with a batch and a class axis; a scalar (a loss, a count) is not a prediction."""
    return isinstance(value, Tensor) and value.dim() >= 2


def _short(value: Any) -> str:
    return f"tensor {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _hint(example: Any) -> str:
    if isinstance(example, Mapping):
        keys = [k for k, v in example.items() if isinstance(v, Tensor)]
        return f"Hint: pass output=<key>, one of {keys}, or output=<callable returning the logits>."
    if isinstance(example, (tuple, list)):
        return f"Hint: pass output=<index> (0..{len(example) - 1}) or output=<callable returning the logits>."
    if dataclasses.is_dataclass(example) and not isinstance(example, type):
        names = [f.name for f in dataclasses.fields(example) if isinstance(getattr(example, f.name), Tensor)]
        return f"Hint: pass output=<attribute>, one of {names}, or output=<callable returning the logits>."
    return "Hint: pass output=<callable returning the logits tensor>."
