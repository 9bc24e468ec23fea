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

While a builder runs, the network is closed (``offline``): a connection or a name lookup to
another host raises at once, so a factory that would download (smp without
``encoder_weights=None``) fails in milliseconds, not after half a minute of retries, with a
``ModelSpecError`` that names the offline argument to pass. A ``package.module:factory`` that
only reaches a keyword argument through its ``**kwargs`` (smp's ``classes``, misspelt
``clases``) gets a ``ModelArgWarning``, since such a factory may ignore it.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import math
import os
import re
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ModelSpecError, UsageError
from .kwargs import Kwargs
from .meta import needs_values

__all__ = ["ResolvedModel", "resolve_model", "DEFAULT_INPUT_SIZE", "ModelArgWarning", "offline", "width_parameters"]

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


class ModelArgWarning(UserWarning):
    """A model argument that is no named parameter of its factory and only reaches its ``**kwargs``.

    Such a factory may ignore the argument (smp's ``**kwargs`` swallows ``num_classes``), so the
    model would be built without it, silently; the CLI prints it as ``autoprobe: warning: ...``.
    """


class NetworkBlocked(Exception):
    """What a connection or a name lookup to another host raises while ``offline`` is active.

    Deliberately no ``OSError``: HTTP clients retry connection errors with back-off (huggingface_hub
    waits 1 + 2 + 4 + 8 + 16 s before it gives up), while any other exception passes through them at
    once, so the build fails in milliseconds.
    """


_offline_lock = threading.Lock()
_offline_depth = 0
_MISSING = object()
_saved: dict[str, Any] = {}


def _address(host: Any) -> Any:
    """The IP address a host string spells, or ``None`` for a name."""
    import ipaddress

    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None


def _is_local(host: Any) -> bool:
    """Whether a host (name, address, or an AF_UNIX path) is this machine: those stay allowed."""
    if host is None or isinstance(host, (bytes, bytearray)) or host in ("", "localhost"):
        return True
    address = _address(host)
    return address is not None and address.is_loopback


def _blocked_connect(name: str) -> Callable[[socket.socket, Any], Any]:
    """``socket.socket.connect`` (or ``connect_ex``) refusing every host but this machine."""

    def connect(sock: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and not _is_local(address[0]):
            raise NetworkBlocked(f"a connection to {address[0]}:{address[1]}")
        return _saved[name](sock, address)

    return connect


def _blocked_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    # An address needs no lookup: its connect is what is refused, and says where it went.
    if not _is_local(host) and _address(host) is None:
        raise NetworkBlocked(f"a name lookup of {host}")
    return _saved["getaddrinfo"](host, *args, **kwargs)


_BLOCKED = {"connect": (socket.socket, _blocked_connect("connect")),
            "connect_ex": (socket.socket, _blocked_connect("connect_ex")), "getaddrinfo": (socket, _blocked_getaddrinfo)}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Close the network while the block runs: connecting to or looking up another host raises ``NetworkBlocked``.

    Scoped, never permanent: ``socket.socket.connect``, ``connect_ex`` and ``socket.getaddrinfo`` are
    replaced on entry and put back exactly as they were in ``finally`` (nested and concurrent uses
    count, and the last to leave restores). Loopback and AF_UNIX connections stay allowed. While it is
    active the whole process is offline, other threads included: builders run in a few seconds.

    Example:
        >>> import socket
        >>> connect = socket.socket.connect
        >>> with offline():
        ...     try:
        ...         socket.create_connection(("example.org", 80), timeout=30)
        ...     except NetworkBlocked as blocked:
        ...         print(blocked)
        a name lookup of example.org
        >>> socket.socket.connect is connect
        True
    """
    global _offline_depth
    with _offline_lock:
        if _offline_depth == 0:
            for name, (owner, blocked) in _BLOCKED.items():
                _saved[name] = getattr(owner, name)
                _saved[f"own:{name}"] = vars(owner).get(name, _MISSING)
                setattr(owner, name, blocked)
        _offline_depth += 1
    try:
        yield
    finally:
        with _offline_lock:
            _offline_depth -= 1
            if _offline_depth == 0:
                for name, (owner, _) in _BLOCKED.items():
                    own = _saved.pop(f"own:{name}")
                    # connect is inherited from _socket.socket: delete the override rather than pin a copy.
                    if own is _MISSING:
                        delattr(owner, name)
                    else:
                        setattr(owner, name, own)
                _saved.clear()


def _network_attempt(exc: BaseException | None) -> NetworkBlocked | None:
    """The ``NetworkBlocked`` an exception was caused by, however the builder wrapped it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, NetworkBlocked):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _offline_arguments(builder: Callable[..., Any] | None) -> list[str]:
    """The builder's own download switches (``encoder_weights``, ``weights_backbone``, ``pretrained``) set to off."""
    off = []
    for name, parameter in _parameters(builder).items():
        if re.search(r"weights|pretrained", name) and parameter.default not in (None, False, inspect.Parameter.empty):
            off.append(f"{name}={False if isinstance(parameter.default, bool) else None}")
    return off


def _download_refused(label: str, builder: Callable[..., Any] | None, blocked: NetworkBlocked) -> ModelSpecError:
    off = _offline_arguments(builder)
    if off:
        flags = " ".join(f"--model-arg {a}" for a in off)
        python = ", ".join(f"{a.split('=')[0]!r}: {a.split('=')[1]}" for a in off)
        hint = f"pass its offline argument: `{flags}` (Python: model_args={{{python}}})."
    else:
        hint = ("pass the builder's argument that turns its download off (often `--model-arg weights=None`, "
                "`encoder_weights=None` or `pretrained=False`).")
    return ModelSpecError(f"building {label} tried to download ({blocked}), and {_OFFLINE}.\nHint: {hint}")


def _parameters(builder: Callable[..., Any] | None) -> Mapping[str, inspect.Parameter]:
    """The builder's signature's parameters; empty when it has none to read (a C function)."""
    if builder is None:
        return {}
    try:
        return inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {}


def _named(parameters: Mapping[str, inspect.Parameter]) -> list[str]:
    return [n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _warn_swallowed(spec: str, builder: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Warn for each keyword that is no named parameter of the builder and only reaches its ``**kwargs``.

    Args:
        spec: the spec, for the message.
        builder: the factory about to be called.
        kwargs: the keyword arguments it will be called with.
    """
    parameters = _parameters(builder)
    var = next((n for n, p in parameters.items() if p.kind is p.VAR_KEYWORD), None)
    if var is None:
        return  # without **kwargs, an unknown keyword is the builder's own TypeError
    named = _named(parameters)
    for key, value in kwargs.items():
        if key not in named:
            warnings.warn(
                f"model argument {key}={value!r} is not a parameter of {spec}: it only reaches its **{var}, which may "
                f"ignore it.{_suggest(key, named)}\nHint: check the name against its parameters ({', '.join(named)}).",
                ModelArgWarning, stacklevel=5,
            )


def width_parameters(spec: str) -> tuple[str, ...]:
    """The builder parameters of a spec that set its output width: ``num_classes``, or a factory's own name.

    Args:
        spec: a model spec, as ``resolve_model`` takes it.

    Returns:
        ``("num_classes",)`` for timm and torchvision; for ``package.module:factory``, the named
        parameters about classes or labels (smp's ``classes``), else ``out_channels``; empty when
        none can be read.

    Example:
        >>> width_parameters("segmentation_models_pytorch:FPN"), width_parameters("resnet18")
        (('classes',), ('num_classes',))
    """
    if ":" not in spec or spec.startswith("tv:"):
        return ("num_classes",)
    try:
        named = _named(_parameters(_factory(spec)))
    except ModelSpecError:
        return ()
    found = tuple(n for n in named if re.search(r"class|label", n))
    return found or tuple(n for n in named if n == "out_channels")


def _build(
    factory: Callable[[], nn.Module], device: Device, label: str, builder: Callable[..., Any] | None = None
) -> nn.Module:
    """Call the factory offline with its weights on ``device``; a download attempt is a ``ModelSpecError``.

    Args:
        factory: builds the model with its arguments bound.
        device: ``"meta"`` or ``"cpu"``.
        label: the spec, for messages.
        builder: the callable ``factory`` calls, whose parameters name the offline argument.

    Returns:
        The model.

    Raises:
        ModelSpecError: the builder tried to reach the network (its hint names the offline argument).
    """
    try:
        with offline():
            return _build_on(factory, device)
    except Exception as exc:
        blocked = _network_attempt(exc)
        if blocked is None:
            raise
        raise _download_refused(label, builder, blocked) from exc


def _build_on(factory: Callable[[], nn.Module], device: Device) -> nn.Module:
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
        model = _build(lambda: timm.create_model(name, **kwargs), device, name)
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
    builder = tvm.get_model_builder(name)
    # Segmentation and detection builders download an ImageNet backbone by default (weights_backbone).
    backbone = "weights_backbone" in _parameters(builder)
    refused: dict[str, object] = {"weights": None, **({"weights_backbone": None} if backbone else {})}
    kwargs: dict[str, Any] = {**refused, **({"aux_loss": False} if segmentation else {})}
    kwargs.update(_call_kwargs(f"tv:{name}", num_classes, model_args, refused))
    try:
        model = _build(lambda: builder(**kwargs), device, f"tv:{name}", builder)
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


def _factory(spec: str) -> Callable[..., Any]:
    """The callable a ``package.module:factory`` spec names, imported."""
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
    return factory


def _callable(spec: str, num_classes: int | None, model_args: Kwargs, device: Device) -> ResolvedModel:
    factory = _factory(spec)
    kwargs = _call_kwargs(spec, num_classes, model_args, {})
    _warn_swallowed(spec, factory, kwargs)
    try:
        model = _build(lambda: factory(**kwargs), device, spec, factory)
    except ModelSpecError:
        raise  # a download attempt, already worded
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
