"""Running a model without its weights: meta twins, the value-read check, the seeded real batch.

Tracing and shape propagation run a model on the meta device, where tensors have shapes but no
data; each step that needs weights, or a batch for the one real run ``allow_real_data`` allows,
takes them from here, so every step makes them the same way.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> {name: t.device.type for name, t in meta_twins(net).items()}
    {'weight': 'meta', 'bias': 'meta'}
    >>> device_of(net).type, seeded_run(net, (2, 3)).example.shape
    ('cpu', torch.Size([2, 3]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ValuesNeeded", "ValueReadCheck", "needs_values", "meta_twins", "SeededRun", "seeded_run", "device_of"]


def meta_twins(module: nn.Module, *, remove_duplicate: bool = False) -> dict[str, torch.Tensor]:
    """An empty meta tensor for each parameter and buffer of ``module``, for ``torch.func.functional_call``.

    Args:
        module: the module whose weights are stood in for; its own tensors stay untouched.
        remove_duplicate: name a tied weight once (a whole model's call) rather than under each name.

    Returns:
        Each parameter's and buffer's name mapped to a meta tensor of its shape and dtype.

    Example:
        >>> meta_twins(torch.nn.BatchNorm1d(4))["running_mean"].shape
        torch.Size([4])
    """
    named = (*module.named_parameters(remove_duplicate=remove_duplicate),
             *module.named_buffers(remove_duplicate=remove_duplicate))
    return {name: torch.empty_like(t, device="meta") for name, t in named}


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else buffer); the CPU for a module without tensors.

    Args:
        module: any module.

    Returns:
        That device.

    Example:
        >>> device_of(torch.nn.ReLU()).type
        'cpu'
    """
    first = next((t for t in (*module.parameters(), *module.buffers())), None)
    return first.device if first is not None else torch.device("cpu")


class SeededRun(NamedTuple):
    """What the one real run ``allow_real_data`` allows gets, so that every such run is the same."""

    device: torch.device
    """Where the model's weights are, and so the batch."""
    example: torch.Tensor
    """A standard-normal batch drawn with seed 0."""
    buffers: dict[str, torch.Tensor]
    """Clones of the model's buffers, for ``functional_call``: a train-mode run updates the clones."""


def seeded_run(model: nn.Module, input_shape: Sequence[int]) -> SeededRun:
    """The seeded batch and buffer clones for one real forward of ``model``, which stays unchanged.

    Args:
        model: the model to run; its tensors are read, never written.
        input_shape: the full input shape, batch included.

    Returns:
        A ``SeededRun``; the same batch on every call.

    Example:
        >>> run = seeded_run(torch.nn.BatchNorm1d(3), (2, 3))
        >>> run.device.type, sorted(run.buffers), bool((run.example == seeded_run(torch.nn.ReLU(), (2, 3)).example).all())
        ('cpu', ['num_batches_tracked', 'running_mean', 'running_var'], True)
    """
    device = device_of(model)
    example = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    return SeededRun(device, example, {name: b.clone() for name, b in model.named_buffers()})


class ValuesNeeded(RuntimeError):
    """An ATen op needed a meta tensor's values: ``.item()``, ``bool(t)``, a boolean mask, ``nonzero``.

    A ``RuntimeError``, like the error the op's meta kernel raises (chained as ``__cause__``), so a
    model that catches that keeps doing so.
    """


_DATA_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)


class ValueReadCheck(TorchDispatchMode):
    """While active, an ATen op that fails on meta because its result depends on data raises ``ValuesNeeded``.

    The op's tags say so (``data_dependent_output``: ``.item()``, ``bool(t)``; ``dynamic_output_shape``:
    ``nonzero``, a boolean mask), as does a copy out of meta (``.cpu()``, ``.tolist()``); the
    error's wording is never read.

    Example:
        >>> import torch
        >>> with ValueReadCheck():
        ...     try:
        ...         bool(torch.ones(1, device="meta") > 0)
        ...     except ValuesNeeded as exc:
        ...         print(exc)
        aten._local_scalar_dense.default needs the values of a meta tensor
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not any(isinstance(t, torch.Tensor) and t.is_meta for t in pytree.tree_leaves((args, kwargs))):
                raise
            device = kwargs.get("device")
            copies_out = func is torch.ops.aten._to_copy.default and device is not None and torch.device(device).type != "meta"
            if copies_out or any(tag in func.tags for tag in _DATA_TAGS):
                raise ValuesNeeded(f"{func} needs the values of a meta tensor") from exc
            raise


def needs_values(run: Callable[[], Any]) -> bool:
    """Whether ``run`` (a computation on meta that failed) fails in an op that needs tensor values.

    Args:
        run: the failing computation, run again under ``ValueReadCheck``; it must be safe to repeat.

    Returns:
        True when an op needed values; False when it succeeds this time or fails for another reason.

    Example:
        >>> import torch
        >>> x = torch.empty(3, device="meta")
        >>> needs_values(lambda: x[x > 0]), needs_values(lambda: x.view(2, 2))
        (True, False)
    """
    try:
        with ValueReadCheck():
            run()
    except ValuesNeeded:
        return True
    except Exception:  # the other failure, reported by the caller as it was the first time
        return False
    return False
