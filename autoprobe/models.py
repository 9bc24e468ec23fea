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
calls ``.tolist()``), which the meta device cannot answer; those are built again
under a ``TorchFunctionMode`` that creates small tensors (up to 65,536 elements) on
the CPU, so their values can be read, and larger ones on meta, then the model is
moved to meta. Like ``torch.device("meta")``, the mode is thread-local and lives only
while the factory runs: nothing about ``nn.Module`` is patched, and another thread
building a model meanwhile is unaffected. ``instrument`` builds specs on the CPU with
fresh weights instead.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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
    """

    module: nn.Module
    label: str
    input_size: tuple[int, ...]


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


_SMALL = 1 << 16
_SIZED_FACTORIES = frozenset({"empty", "zeros", "ones", "full", "rand", "randn", "randint", "empty_strided"})


class _SmallTensorsReal(TorchFunctionMode):
    """Tensor factories without a device make small tensors on the CPU and large ones on meta.

    A constructor that reads values back computes them on small tensors (RegNet's widths from an
    ``arange``); weight matrices, the only large tensors a constructor makes, stay on meta.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in _SIZED_FACTORIES and kwargs.get("device") is None and getattr(func, "__module__", "") == "torch":
            size = _requested_numel(name, args, kwargs)
            if size is not None and size > _SMALL:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _requested_numel(name: str, args: tuple, kwargs: dict) -> int | None:
    """Elements a sized factory call asks for, from its size argument(s)."""
    if name == "randint":
        shape = args[-1] if args else kwargs.get("size")
    elif name == "full":
        shape = args[0] if args else kwargs.get("size")
    elif args and isinstance(args[0], (tuple, list, torch.Size)):
        shape = args[0]
    elif args:
        shape = args if name != "empty_strided" else args[0]
    else:
        shape = kwargs.get("size")
    try:
        return math.prod(int(s) for s in shape)
    except (TypeError, ValueError):
        return None


def _build(factory: Callable[[], nn.Module], device: Device) -> nn.Module:
    """Call the factory with its weights on ``device``, without allocating them for meta."""
    if device == "cpu":
        return factory()
    try:
        with torch.device("meta"):
            return factory()
    except (NotImplementedError, RuntimeError) as exc:
        # The constructor read a value back from a tensor ("Cannot copy out of meta tensor",
        # "Tensor.item() cannot be called on meta tensors"); any other error is the factory's own.
        if "meta" not in str(exc):
            raise
        with _SmallTensorsReal():
            model = factory()
        return model.to("meta")


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
    return ResolvedModel(model, name, input_size)


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
    return ResolvedModel(model, f"tv:{name}", size)


def _callable(spec: str, device: Device) -> ResolvedModel:
    module_name, _, attr = spec.partition(":")
    # Like uvicorn and gunicorn: a user's own module in the working directory must resolve
    # even when autoprobe runs as a console script (whose sys.path lacks the cwd). The entry is
    # there only for the import: sys.path is left exactly as it was found.
    added = os.getcwd() not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary code; report whatever it raised
        raise ModelSpecError(
            f"cannot import {module_name!r} from model spec {spec!r}: {type(exc).__name__}: {exc}\n"
            "Hint: the module must be importable from the current directory or the installed packages."
        ) from exc
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())
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
    return ResolvedModel(model, spec, DEFAULT_INPUT_SIZE)


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
