"""Dimension adapters q_m: map a tapped feature z_m into the label space.

The MI loss of iMacHSR (Eq. 1 in /work/shared/METHOD.md) compares a point's
feature with the labels, so each point gets a tiny trainable adapter that turns
z_m, whatever its layout, into class logits shaped like the model output:

- classification: global average pool over every position, then one Linear,
  giving (B, K);
- dense: one 1x1 Conv2d on the feature grid, then a bilinear upsample of the
  logits to the label resolution, giving (B, K, H, W).

Adapters are deliberately weak (a single linear map). The point of deep
supervision is to shape the backbone's feature; an expressive adapter would
learn the task itself and leave z_m unchanged. Keeping them tiny also keeps
the parameter overhead at C*K + K per point.

Why upsample the logits instead of downsampling the labels: nearest-neighbour
downsampling of a label map drops pixels (thin objects, boundaries and small
classes vanish) and majority pooling invents labels. Upsampling K logit
channels keeps the loss at label resolution, so every labelled pixel counts
exactly once and ``ignore_index`` pixels are excluded exactly, while the
adapter itself stays a 1x1 conv evaluated at the cheap feature resolution.
It is also what segmentation heads already do with their own output.

Adapters hold no hooks and no global state; they are plain modules, so they
work under torch.compile, AMP autocast and DDP like any other layer. They are
bound to the resolution they were built for: a dense adapter always returns
``out_size`` logits, and a token adapter expects the token count it was built
with (``spatial``).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InstrumentError

__all__ = [
    "Task",
    "ClassificationAdapter",
    "DenseAdapter",
    "make_adapter",
    "adapter_parameter_count",
    "adapter_parameters",
]

Task = Literal["classification", "dense"]

# Rank of the feature tensor for each layout, batch included.
_RANKS: dict[str, int] = {"NC": 2, "NCL": 3, "NLC": 3, "NCHW": 4, "NHWC": 4, "NCDHW": 5}
# Prefix tokens (cls, distillation, registers) a token sequence may carry before its grid.
_MAX_PREFIX_TOKENS = 8
_DENSE_LAYOUTS = ("NCHW", "NHWC", "NLC", "NCL")


class ClassificationAdapter(nn.Module):
    """Global average pool over all positions, then ``Linear(channels, num_classes)``.

    Args:
        channels: C, the feature width of z_m.
        num_classes: K.
        layout: layout of z_m: ``NC``, ``NCL``, ``NLC``, ``NCHW``, ``NHWC`` or ``NCDHW``.

    Example:
        >>> import torch
        >>> adapter = ClassificationAdapter(channels=64, num_classes=10, layout="NHWC")
        >>> adapter(torch.randn(2, 7, 7, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: int, num_classes: int, layout: str) -> None:
        super().__init__()
        if layout not in _RANKS:
            raise InstrumentError(f"unknown feature layout {layout!r}; expected one of {list(_RANKS)}")
        self.layout = layout
        channel_dim = 1 if layout.startswith("NC") else _RANKS[layout] - 1
        # Every non-batch, non-channel dimension is a position to average over.
        self._pool_dims = tuple(d for d in range(1, _RANKS[layout]) if d != channel_dim)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        """Pool z (layout ``self.layout``) and classify it.

        Args:
            z: the tapped feature, batch first.

        Returns:
            Logits of shape (B, K).
        """
        _check_rank(z, self.layout)
        pooled = z.mean(dim=self._pool_dims) if self._pool_dims else z
        return self.linear(pooled)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, pool='mean'"


class DenseAdapter(nn.Module):
    """Bring z_m to a (B, C, h, w) grid, apply a 1x1 conv, upsample logits to ``out_size``.

    Token features (``NLC``/``NCL``) are reshaped to a square grid after
    dropping ``prefix_tokens`` leading tokens (cls, distillation, registers).

    Args:
        channels: C, the feature width of z_m.
        num_classes: K.
        layout: ``NCHW``, ``NHWC``, ``NLC`` or ``NCL``.
        out_size: (H, W) of the labels; logits are upsampled to it.
        grid: (h, w) the tokens form, for token layouts; ``None`` for maps.
        prefix_tokens: leading tokens to drop before reshaping (token layouts only).

    Example:
        >>> import torch
        >>> adapter = DenseAdapter(channels=64, num_classes=10, layout="NLC", out_size=(32, 32),
        ...                        grid=(4, 4), prefix_tokens=1)
        >>> adapter(torch.randn(2, 17, 64)).shape
        torch.Size([2, 10, 32, 32])
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        layout: str,
        out_size: tuple[int, int],
        grid: tuple[int, int] | None = None,
        prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        if layout not in _DENSE_LAYOUTS:
            raise InstrumentError(f"dense adapters take layouts {list(_DENSE_LAYOUTS)}; got {layout!r}")
        if (grid is None) != (layout in ("NCHW", "NHWC")):
            raise InstrumentError(
                f"grid must be given for token layouts (NLC, NCL) and only for them; got layout {layout!r}, grid={grid}"
            )
        self.layout = layout
        self.out_size = (int(out_size[0]), int(out_size[1]))
        self.grid = grid
        self.prefix_tokens = prefix_tokens
        self.conv = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, z: Tensor) -> Tensor:
        """Adapt z (layout ``self.layout``) to dense logits.

        Args:
            z: the tapped feature, batch first.

        Returns:
            Logits of shape (B, K, H, W) with (H, W) = ``out_size``.
        """
        _check_rank(z, self.layout)
        logits = self.conv(self._to_nchw(z))
        if tuple(logits.shape[-2:]) == self.out_size:
            return logits
        return F.interpolate(logits, size=self.out_size, mode="bilinear", align_corners=False)

    def _to_nchw(self, z: Tensor) -> Tensor:
        if self.grid is None:
            return z if self.layout == "NCHW" else z.permute(0, 3, 1, 2)
        return self._tokens_to_nchw(z, self.grid)

    def _tokens_to_nchw(self, z: Tensor, grid: tuple[int, int]) -> Tensor:
        # The grid was fixed at construction, so check the token count here rather
        # than let reshape fail with a message that says nothing about adapters.
        tokens = z.shape[1] if self.layout == "NLC" else z.shape[2]
        expected = self.prefix_tokens + grid[0] * grid[1]
        if tokens != expected:
            raise InstrumentError(
                f"dense adapter built for {expected} tokens ({self.prefix_tokens} prefix + grid {grid}) "
                f"got a feature with {tokens} tokens (shape {tuple(z.shape)}); "
                "build the adapter for the input size used in training"
            )
        if self.layout == "NLC":
            return z[:, self.prefix_tokens :, :].reshape(z.shape[0], *grid, z.shape[2]).permute(0, 3, 1, 2)
        return z[:, :, self.prefix_tokens :].reshape(z.shape[0], z.shape[1], *grid)

    def extra_repr(self) -> str:
        tokens = f", grid={self.grid}, prefix_tokens={self.prefix_tokens}" if self.grid is not None else ""
        return f"layout={self.layout!r}{tokens}, out_size={self.out_size}, upsample='bilinear'"


def make_adapter(
    *,
    channels: int,
    layout: str,
    spatial: tuple[int, ...] | None,
    task: Task,
    num_classes: int,
    out_size: tuple[int, int] | None = None,
) -> nn.Module:
    """Build the dimension adapter q_m for one intermediate point.

    Args:
        channels: C, the feature width of z_m (``LayerInfo.channels``).
        layout: layout of z_m, batch first: ``NC``, ``NCL``, ``NLC``, ``NCHW``, ``NHWC``
            (``NCDHW`` is accepted for classification).
        spatial: (H, W) for maps, (N,) for token sequences, ``None`` for ``NC``
            (``LayerInfo.spatial``). Required for dense token features.
        task: ``"classification"`` (logits (B, K)) or ``"dense"`` (logits (B, K, H, W)).
        num_classes: K, at least 2.
        out_size: (H, W) of the labels; required for ``dense``, must be ``None`` for
            ``classification``.

    Returns:
        A ``ClassificationAdapter`` or ``DenseAdapter`` with C*K + K parameters.

    Raises:
        InstrumentError: an unknown layout or task, a bad size, a ``spatial`` that
            does not fit the layout, or dense tokens that do not form a square grid.

    Example:
        >>> adapter = make_adapter(channels=64, layout="NCHW", spatial=(8, 8), task="dense",
        ...                        num_classes=10, out_size=(32, 32))
        >>> adapter_parameter_count(adapter)
        650
    """
    if task not in get_args(Task):
        raise InstrumentError(f"unknown task {task!r}; expected one of {list(get_args(Task))}")
    if layout not in _RANKS:
        raise InstrumentError(f"unknown feature layout {layout!r}; expected one of {list(_RANKS)}")
    _check_positive("channels", channels, minimum=1)
    _check_positive("num_classes", num_classes, minimum=2)
    spatial_rank = _RANKS[layout] - 2
    if spatial is not None and len(spatial) != spatial_rank:
        raise InstrumentError(
            f"spatial={spatial} does not fit layout {layout!r}; expected {spatial_rank} spatial sizes"
        )

    if task == "classification":
        if out_size is not None:
            raise InstrumentError(
                f"out_size={out_size} was given for a classification adapter; it only applies to task='dense'"
            )
        return ClassificationAdapter(channels, num_classes, layout)

    if out_size is None or len(out_size) != 2 or any(not isinstance(s, int) or s < 1 for s in out_size):
        raise InstrumentError(
            f"dense adapters need out_size=(H, W), the label resolution, as two positive ints; got {out_size!r}"
        )
    if layout not in _DENSE_LAYOUTS:
        raise InstrumentError(
            f"a {layout!r} feature has no 2-D grid, so it cannot feed a dense adapter; "
            "pick a point with layout NCHW, NHWC, NLC or NCL"
        )
    if layout in ("NCHW", "NHWC"):
        return DenseAdapter(channels, num_classes, layout, out_size)
    if spatial is None:
        raise InstrumentError(f"dense adapters on {layout!r} tokens need spatial=(N,), the token count")
    grid, prefix = _token_grid(spatial[0])
    return DenseAdapter(channels, num_classes, layout, out_size, grid=grid, prefix_tokens=prefix)


def adapter_parameters(channels: int, num_classes: int) -> int:
    """Parameters of the adapter ``make_adapter`` builds for a C-channel point and K classes.

    Every built-in adapter is one C -> K linear map (a ``Linear`` after pooling, or a
    1x1 conv) with a bias, whatever the layout and task, so ``inspect`` can report the
    cost before anything is built.

    Args:
        channels: C, the point's feature width.
        num_classes: K, the model output's class axis.

    Returns:
        C*K + K.

    Example:
        >>> adapter_parameters(64, 10)
        650
    """
    return channels * num_classes + num_classes


def adapter_parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars in an adapter (C*K + K for every built-in one).

    Args:
        module: any module, usually from ``make_adapter``.

    Returns:
        The sum of ``p.numel()`` over its parameters.

    Example:
        >>> adapter_parameter_count(make_adapter(channels=64, layout="NC", spatial=None,
        ...                                      task="classification", num_classes=10))
        650
    """
    return sum(p.numel() for p in module.parameters())


def _token_grid(tokens: int) -> tuple[tuple[int, int], int]:
    # The smallest prefix wins: a perfect square means no cls token at all.
    for prefix in range(0, min(_MAX_PREFIX_TOKENS, tokens - 1) + 1):
        side = math.isqrt(tokens - prefix)
        if side * side == tokens - prefix:
            return (side, side), prefix
    raise InstrumentError(
        f"{tokens} tokens do not form a square grid, even after dropping up to {_MAX_PREFIX_TOKENS} "
        "prefix (cls/register) tokens; a dense adapter needs a square token grid"
    )


def _check_rank(z: Tensor, layout: str) -> None:
    if z.dim() != _RANKS[layout]:
        raise InstrumentError(
            f"adapter for layout {layout!r} expects a {_RANKS[layout]}-D feature; got shape {tuple(z.shape)}"
        )


def _check_positive(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InstrumentError(f"{name} must be an int >= {minimum}; got {value!r}")
