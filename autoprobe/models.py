"""Resolve a model spec to an ``nn.Module``, built on the meta device for inspection.

Specs:
    ``resnet50``               a timm model name (``timm.list_models()``);
    ``tv:resnet50``            a torchvision model (``torchvision.models.list_models()``),
                               classification or segmentation;
    ``package.module:factory`` a callable returning an ``nn.Module``, called with no arguments.

Models named by spec are built with ``pretrained=False`` under
``torch.device("meta")``: no weights are allocated or downloaded, so even
billion-parameter models are inspected in seconds. A few constructors compute
their layout with tensor ops whose values they read back (torchvision's RegNet
calls ``.tolist()``), which the meta device cannot answer; those are built
with real tensors for the arithmetic while every parameter and buffer goes to
meta the moment it is registered, as accelerate's ``init_empty_weights`` does.
``instrument`` builds specs on the CPU with fresh weights instead.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import ModelSpecError

__all__ = ["ResolvedModel", "resolve_model", "DEFAULT_INPUT_SIZE"]

DEFAULT_INPUT_SIZE = (3, 224, 224)

Device = Literal["meta", "cpu"]


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready for tracing.

    Attributes:
        module: the model (on meta when built from a name).
        label: the spec or class name, for reports.
        input_size: the input size (C, H, W) the model was built for; the feeding detail
            only, detectors never see it.
        task: ``classification`` or ``dense`` when the source says so, else ``""``.
    """

    module: nn.Module
    label: str
    input_size: tuple[int, ...]
    task: str


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


@contextmanager
def _weights_on_meta() -> Iterator[None]:
    """Move every parameter and buffer to meta as it is registered; other tensors stay real."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


def _build(factory: Callable[[], nn.Module], device: Device) -> nn.Module:
    """Call the factory with its weights on ``device``, without allocating them for meta."""
    if device == "cpu":
        return factory()
    try:
        with torch.device("meta"):
            return factory()
    except NotImplementedError:
        # The constructor read a value back from a tensor ("Cannot copy out of meta tensor").
        with _weights_on_meta():
            return factory()


def _timm(name: str, num_classes: int | None, device: Device) -> ResolvedModel:
    import timm

    if name not in timm.list_models():
        raise ModelSpecError(
            f"unknown model {name!r}: not a timm model name.{_suggest(name, timm.list_models())}\n"
            "Hint: use a name from `timm.list_models()`, `tv:NAME` for torchvision, or `package.module:factory`."
        )
    extra = {} if num_classes is None else {"num_classes": num_classes}
    model = _build(lambda: timm.create_model(name, pretrained=False, **extra), device)
    input_size = tuple(model.pretrained_cfg.get("input_size", DEFAULT_INPUT_SIZE))
    return ResolvedModel(model, name, input_size, "classification")


def _torchvision(name: str, num_classes: int | None, device: Device) -> ResolvedModel:
    import torchvision.models as tvm

    names = tvm.list_models()
    if name not in names:
        raise ModelSpecError(
            f"unknown torchvision model {name!r}.{_suggest(name, names)}\n"
            "Hint: `torchvision.models.list_models()` lists them; write it as `tv:NAME`."
        )
    segmentation = name in tvm.list_models(module=tvm.segmentation)
    kwargs: dict[str, object] = {"weights": None}
    if segmentation:
        kwargs.update(weights_backbone=None, aux_loss=False)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _build(lambda: tvm.get_model(name, **kwargs), device)
    if name.startswith("inception"):
        size = (3, 299, 299)
    elif segmentation:
        size = (3, 256, 256)
    else:
        size = DEFAULT_INPUT_SIZE
    return ResolvedModel(model, f"tv:{name}", size, "dense" if segmentation else "classification")


def _callable(spec: str, device: Device) -> ResolvedModel:
    module_name, _, attr = spec.partition(":")
    # Like uvicorn and gunicorn: a user's own module in the working directory must resolve
    # even when autoprobe runs as a console script (whose sys.path lacks the cwd).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary code; report whatever it raised
        raise ModelSpecError(
            f"cannot import {module_name!r} from model spec {spec!r}: {type(exc).__name__}: {exc}\n"
            "Hint: the module must be importable from the current directory or the installed packages."
        ) from exc
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelSpecError(
                f"{module_name!r} has no attribute {attr!r} (model spec {spec!r}). "
                f"Hint: write it as `package.module:factory`, where factory returns an nn.Module."
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelSpecError(f"{spec!r} is not callable. Hint: point to a function or class returning an nn.Module.")
    try:
        model = _build(factory, device)
    except Exception as exc:
        raise ModelSpecError(f"calling {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module.")
    return ResolvedModel(model, spec, DEFAULT_INPUT_SIZE, "")


def resolve_model(spec: str, *, num_classes: int | None = None, device: Device = "meta") -> ResolvedModel:
    """Build the model a spec names, on the meta device unless told otherwise.

    Args:
        spec: a timm name, ``tv:NAME``, or ``package.module:factory``.
        num_classes: override the classifier width (timm and torchvision only).
        device: ``"meta"`` (shapes only, nothing allocated) or ``"cpu"`` (fresh weights, to train).

    Returns:
        The ``ResolvedModel``.

    Raises:
        ModelSpecError: unknown name (with close matches), failing import or factory.

    Example:
        >>> resolve_model("resnet18").module.fc.weight.device.type
        'meta'
    """
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model spec. Hint: give a timm name such as `resnet50`.")
    if spec.startswith("tv:"):
        return _torchvision(spec[3:], num_classes, device)
    if ":" in spec:
        return _callable(spec, device)
    return _timm(spec, num_classes, device)
