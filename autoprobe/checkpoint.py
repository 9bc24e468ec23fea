"""The plain model's weights out of a checkpoint of a ``Probed``.

A ``Probed``'s state_dict holds ``model.<key>`` (the user's model) and
``autoprobe_adapters.<point>.<param>``; wrappers prefix both: a LightningModule by its
attribute (``probed.model.<key>``), DDP by ``module.``, ``torch.compile`` by ``_orig_mod.``.
``plain_state_dict`` finds the Probed by its adapters' keys and returns the model's keys
with that prefix and ``model.`` removed, so the plain model loads them with ``strict=True``.

Example:
    >>> import torch, autoprobe
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
    ...                           torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3))
    >>> probed = autoprobe.instrument(net, input_size=(3, 8, 8))
    >>> lightning_style = {"state_dict": {f"net.{k}": v for k, v in probed.state_dict().items()}, "epoch": 3}
    >>> net.load_state_dict(plain_state_dict(lightning_style), strict=True)
    <All keys matched successfully>
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UsageError
from .taps import ADAPTERS, MODEL

__all__ = ["plain_state_dict"]

# The files a Hugging Face Trainer writes in a folder, in the order they are looked for.
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")


def plain_state_dict(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any] | nn.Module, prefix: str | None = None
) -> dict[str, Tensor]:
    """The user's model's state_dict from a checkpoint of a ``Probed``.

    Args:
        checkpoint: a Lightning ``.ckpt``, a ``torch.save`` file of a state_dict (or of a dict
            holding one under ``"state_dict"``), a ``.safetensors`` file, a folder a Hugging Face
            Trainer saved (``model.safetensors``), one of those already loaded (a mapping), or a
            module holding a Probed.
        prefix: the Probed's key prefix (``"probed."``), when the checkpoint holds more than one
            Probed (an EMA copy beside the model); ``None`` finds the only one.

    Returns:
        The model's keys, without the Probed's prefix and ``model.``: ``model.load_state_dict(sd,
        strict=True)`` loads them into the plain model.

    Raises:
        UsageError: the file cannot be read, holds no state_dict, holds no Probed (no
            ``autoprobe_adapters.`` key), or holds several and ``prefix`` does not pick one.
    """
    state = _state_dict(checkpoint)
    marker = f"{ADAPTERS}."
    prefixes = sorted({key[: key.index(marker)] for key in state if marker in key and _is_prefix(key, marker)})
    if prefix is None:
        if not prefixes:
            raise UsageError(
                f"{_describe(checkpoint)} holds no autoprobe adapters (no key contains '{marker}'), so it is not a "
                "checkpoint of a Probed. Hint: a checkpoint of the plain model loads as it is: "
                "`model.load_state_dict(torch.load(path))`."
            )
        if len(prefixes) > 1:
            raise UsageError(
                f"{_describe(checkpoint)} holds {len(prefixes)} Probeds, under the prefixes {prefixes}. "
                f"Hint: pass prefix= with the one you want, e.g. `plain_state_dict(path, prefix={prefixes[0]!r})`."
            )
        prefix = prefixes[0]
    elif prefix not in prefixes:
        raise UsageError(
            f"prefix={prefix!r} is not the prefix of a Probed in {_describe(checkpoint)}; those are {prefixes}. "
            "Hint: pass one of them, or leave prefix out."
        )
    head = f"{prefix}{MODEL}."
    return {key[len(head):]: value for key, value in state.items() if key.startswith(head)}


def _is_prefix(key: str, marker: str) -> bool:
    start = key.index(marker)
    return start == 0 or key[start - 1] == "."


def _state_dict(checkpoint: Any) -> Mapping[str, Any]:
    if isinstance(checkpoint, nn.Module):
        return checkpoint.state_dict()
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = _load(Path(checkpoint))
    if not isinstance(checkpoint, Mapping):
        raise UsageError(
            f"plain_state_dict takes a path, a loaded checkpoint (a mapping) or a module; got "
            f"{type(checkpoint).__name__}. Hint: pass the checkpoint's path."
        )
    inner = checkpoint.get("state_dict")  # Lightning, and the common {"state_dict": ..., "optimizer": ...}
    state = inner if isinstance(inner, Mapping) else checkpoint
    if not any(isinstance(value, Tensor) for value in state.values()):
        raise UsageError(
            f"{_describe(checkpoint)} holds no tensors, so no state_dict; its keys are {sorted(state)[:8]}. "
            "Hint: pass the file `torch.save(probed.state_dict(), path)` or Lightning's `.ckpt` wrote."
        )
    return state


def _load(path: Path) -> Mapping[str, Any]:
    if path.is_dir():
        found = [path / name for name in _FOLDER_FILES if (path / name).is_file()]
        if not found:
            raise UsageError(
                f"{path} holds none of {list(_FOLDER_FILES)}. Hint: pass the folder `trainer.save_model` wrote, "
                "or the checkpoint file itself."
            )
        path = found[0]
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist. Hint: check the path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # installed with transformers, which writes these files

        return load_file(str(path))
    try:
        # weights_only: a checkpoint is data; never run code from it. Lightning's .ckpt loads this way.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for unreadable files
        raise UsageError(
            f"cannot read {path} as a weights-only checkpoint (torch.load raised {type(error).__name__}). "
            "Hint: if it is a pickled Probed (`torch.save(probed)`), load it yourself with "
            "`torch.load(path, weights_only=False)` (only from a source you trust) and pass the module."
        ) from error


def _describe(checkpoint: Any) -> str:
    if isinstance(checkpoint, (str, os.PathLike)):
        return f"checkpoint {os.fspath(checkpoint)}"
    return f"the given {type(checkpoint).__name__}"
