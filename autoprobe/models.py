"""Resolve a model spec to an ``nn.Module``, built on the meta device for inspection.

Specs:
    ``resnet50``               a timm model name (``timm.list_models()``), optionally with a
                               pretrained tag (``convnext_atto.d2_in1k``): the tag picks that
                               variant's config (its input size), never its weights;
    ``tv:resnet50``            a torchvision model (``torchvision.models.list_models()``),
                               classification or segmentation;
    ``package.module:factory`` a callable returning an ``nn.Module``, called with the spec's
                               keyword arguments (``model_args``), none by default.

Nothing is downloaded: ``hf-hub:`` names and torchvision weight enums
(``tv:resnet50.IMAGENET1K_V2``, ``ResNet50_Weights.DEFAULT``) are refused with a
``ModelSpecError`` that names the offline equivalent, and so are ``model_args`` that would
download (``pretrained=True`` for timm, ``weights=`` for torchvision).

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
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ModelSpecError, UsageError
from .kwargs import Kwargs
from .meta import needs_values

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
    def on_meta() -> nn.Module:
        with torch.device("meta"):
            return factory()

    try:
        return on_meta()
    except (NotImplementedError, RuntimeError):
        # Only a constructor that read a value back from a tensor (RegNet's widths, ``.tolist()``)
        # gets the fallback; any other error is the factory's own.
        if not needs_values(on_meta):
            raise
        with _SmallTensorsReal():
            model = factory()
        return model.to("meta")


_HUB_PREFIXES = ("hf-hub:", "hf_hub:")
# How people write a torchvision weight enum: ResNet50_Weights.IMAGENET1K_V2, torchvision.models.ResNet50_Weights.
_WEIGHTS_ENUM = re.compile(r"^(?:tv:)?(?:torchvision\.models\.)?(?P<enum>\w+_Weights)(?:\.(?P<tag>\w+))?$")
_OFFLINE = "autoprobe builds models offline and never downloads weights or configs"


def _refuse_hub(spec: str) -> ModelSpecError:
    import timm

    repo = spec.split(":", 1)[1]
    name = repo.rsplit("/", 1)[-1]
    known = name in timm.list_pretrained() or name in timm.list_models()
    instead = f"use the timm name `{name}`, built with pretrained=False" if known else \
        "use the architecture's timm name, built with pretrained=False"
    return ModelSpecError(
        f"model spec {spec!r} names a Hugging Face Hub repository, and {_OFFLINE}.\n"
        f"Hint: {instead}, or write a `package.module:factory` that builds the model from a local config."
    )


def _refuse_weights_enum(spec: str, enum: str, tag: str | None) -> ModelSpecError:
    import torchvision.models as tvm

    owners = [n for n in tvm.list_models() if tvm.get_model_weights(n).__name__ == enum]
    instead = f"`tv:{owners[0]}`" if owners else "`tv:NAME` (torchvision.models.list_models())"
    return ModelSpecError(
        f"model spec {spec!r} names torchvision weights{f' ({tag})' if tag else ''}, and {_OFFLINE}.\n"
        f"Hint: use {instead}, built with weights=None; load a checkpoint of your own after instrumenting."
    )


def _call_kwargs(
    label: str, num_classes: int | None, model_args: Kwargs, refused: Mapping[str, object]
) -> dict[str, Any]:
    """The keyword arguments a builder is called with: ``model_args`` plus ``num_classes``, checked.

    ``refused`` maps an argument that would download (``pretrained``) to the only value allowed.
    """
    kwargs = model_args.to_dict()
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise UsageError(f"num_classes must be a positive integer, not {num_classes!r}.\n"
                             "Hint: pass the classifier width, e.g. num_classes=10 (CLI: --num-classes 10).")
        if kwargs.get("num_classes", num_classes) != num_classes:
            raise UsageError(
                f"num_classes={num_classes} and model_args num_classes={kwargs['num_classes']!r} disagree for {label}.\n"
                "Hint: give the classifier width once (CLI: --num-classes N, or --model-arg num_classes=N)."
            )
        kwargs["num_classes"] = num_classes
    for key, allowed in refused.items():
        if key in kwargs and kwargs[key] != allowed:
            raise ModelSpecError(f"model argument {key}={kwargs[key]!r} for {label} would download weights, and {_OFFLINE}.\n"
                                 f"Hint: leave {key} out (autoprobe passes {key}={allowed!r}).")
    return kwargs


def _rejected(label: str, exc: TypeError) -> ModelSpecError:
    return ModelSpecError(f"building {label} with those arguments failed: TypeError: {exc}\n"
                          "Hint: check the names against the model's constructor (--model-arg KEY=VALUE).")


def _timm(name: str, num_classes: int | None, model_args: Kwargs, device: Device) -> ResolvedModel:
    import timm

    # A tagged name (convnext_atto.d2_in1k) selects a pretrained config: its input size, mean and std.
    known = timm.list_pretrained() if "." in name else timm.list_models()
    if name not in known:
        raise ModelSpecError(
            f"unknown model {name!r}: not a timm model name.{_suggest(name, known)}\n"
            "Hint: use a name from `timm.list_models()` (or a tagged one from `timm.list_pretrained()`), "
            "`tv:NAME` for torchvision, or `package.module:factory`."
        )
    kwargs = _call_kwargs(name, num_classes, model_args, {"pretrained": False})
    kwargs["pretrained"] = False
    try:
        model = _build(lambda: timm.create_model(name, **kwargs), device)
    except TypeError as exc:
        if not model_args:
            raise
        raise _rejected(name, exc) from exc
    input_size = tuple(model.pretrained_cfg.get("input_size", DEFAULT_INPUT_SIZE))
    return ResolvedModel(model, name, input_size)


def _torchvision(name: str, num_classes: int | None, model_args: Kwargs, device: Device) -> ResolvedModel:
    import torchvision.models as tvm

    names = tvm.list_models()
    base, _, tag = name.partition(".")
    if tag and base in names:
        raise _refuse_weights_enum(f"tv:{name}", tvm.get_model_weights(base).__name__, tag)
    if name not in names:
        raise ModelSpecError(
            f"unknown torchvision model {name!r}.{_suggest(name, names)}\n"
            "Hint: `torchvision.models.list_models()` lists them; write it as `tv:NAME`."
        )
    segmentation = name in tvm.list_models(module=tvm.segmentation)
    refused: dict[str, object] = {"weights": None, **({"weights_backbone": None} if segmentation else {})}
    kwargs: dict[str, Any] = {**refused, **({"aux_loss": False} if segmentation else {})}
    kwargs.update(_call_kwargs(f"tv:{name}", num_classes, model_args, refused))
    try:
        model = _build(lambda: tvm.get_model(name, **kwargs), device)
    except TypeError as exc:
        if not model_args:
            raise
        raise _rejected(f"tv:{name}", exc) from exc
    if name.startswith("inception"):
        size = (3, 299, 299)
    elif segmentation:
        size = (3, 256, 256)
    else:
        size = DEFAULT_INPUT_SIZE
    return ResolvedModel(model, f"tv:{name}", size)


def _callable(spec: str, num_classes: int | None, model_args: Kwargs, device: Device) -> ResolvedModel:
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
    kwargs = _call_kwargs(spec, num_classes, model_args, {})
    try:
        model = _build(lambda: factory(**kwargs), device)
    except Exception as exc:  # the factory is the user's code; report whatever it raised
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelSpecError(
            f"calling {spec}({shown}) failed: {type(exc).__name__}: {exc}\n"
            "Hint: check the factory's arguments (--model-arg KEY=VALUE; a network download needs e.g. "
            "--model-arg encoder_weights=None)."
        ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module.")
    return ResolvedModel(model, spec, DEFAULT_INPUT_SIZE)


def resolve_model(
    spec: str,
    *,
    num_classes: int | None = None,
    model_args: Mapping[str, Any] | None = None,
    device: Device = "meta",
) -> ResolvedModel:
    """Build the model a spec names, on the meta device unless told otherwise.

    Args:
        spec: a timm name (tagged or not), ``tv:NAME``, or ``package.module:factory``.
        num_classes: the classifier width, passed as ``num_classes=`` to the builder (timm,
            torchvision, or a factory that takes it).
        model_args: further keyword arguments of the builder (``{"encoder_weights": None}``), values
            JSON-able so a lock can record them; ``num_classes`` may be given here instead.
        device: ``"meta"`` (shapes only, nothing allocated) or ``"cpu"`` (fresh weights, to train).

    Returns:
        The ``ResolvedModel``.

    Raises:
        ModelSpecError: unknown name (with close matches), a name or argument that would download,
            failing import or factory.
        UsageError: ``num_classes`` or ``model_args`` malformed, or disagreeing.

    Example:
        >>> resolve_model("resnet18").module.fc.weight.device.type
        'meta'
        >>> resolve_model("resnet18", num_classes=10).module.fc.out_features
        10
        >>> resolve_model("convnext_atto.d2_in1k").input_size
        (3, 224, 224)
    """
    if not isinstance(spec, str):
        raise UsageError(f"a model spec is a string, not {type(spec).__name__}. Hint: e.g. 'resnet50'.")
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model spec. Hint: give a timm name such as `resnet50`.")
    args = model_args if isinstance(model_args, Kwargs) else Kwargs(model_args)
    if spec.startswith(_HUB_PREFIXES):
        raise _refuse_hub(spec)
    enum = _WEIGHTS_ENUM.match(spec)
    if enum:
        raise _refuse_weights_enum(spec, enum["enum"], enum["tag"])
    if spec.startswith("tv:"):
        return _torchvision(spec[3:], num_classes, args, device)
    if ":" in spec:
        return _callable(spec, num_classes, args, device)
    return _timm(spec, num_classes, args, device)
