"""Targets: their kinds, their checks, and matching them to logits of another resolution.

Four target kinds (``TargetKind``), each with the logits it goes with (``S`` is the
spatial extent: nothing for classification, ``(L,)``, ``(H, W)`` or ``(D, H, W)``):

- ``"multiclass"``: integer class ids (B, *S) for K >= 2 logits (B, K, *S), or soft class
  targets: floats (B, K, *S) whose rows (dim 1) are distributions over the K classes (timm's
  Mixup / CutMix targets, label-smoothed one-hot, a teacher's softmax); they have no ignored
  positions (a float target of zeros, or of any values whose rows are not distributions, is
  refused, naming ``task='regression'``);
- ``"binary"``: 0/1 masks (B, *S) or (B, 1, *S) for one logit channel (B, 1, *S);
- ``"multilabel"``: 0/1 per class (B, K, *S) for K independent logits (B, K, *S);
- ``"regression"``: floats (B, C, *S) for C outputs (B, C, *S) (flow, depth, heatmaps).

The kind is always given, never guessed from the target's dtype: a float target for a
multiclass objective, or an integer one for a regression objective, is an error that
says which task to pass. Binary and multi-label targets may be of any real dtype
(uint8 masks with 255 for "ignore" are common); their values must lie in [0, 1] (soft
targets are allowed) or equal ``ignore_index``. Regression targets have no ignore value.

Resolution. Any target whose rank matches the logits' can be matched to any spatial
size (sizes need not divide each other):

- logits are resized to the target (``resize_logits``: linear / bilinear / trilinear by
  rank, ``align_corners=False``), the Hugging Face SegFormer convention for the output;
- a target is resized to logits (``TargetMatcher.at``), the nnU-Net / MONAI convention for
  deep-supervision heads. Class ids use ``nearest-exact``, which never invents a class
  and keeps ``ignore_index`` values: a coarse position is ignored exactly when the fine
  position it samples is. Binary, multi-label and regression targets use area averaging
  (adaptive average pooling), which keeps the fraction of foreground a coarse position
  covers, where nearest would alias thin structures away; a binary/multi-label coarse
  position's target is the mean over its *valid* fine positions and its weight is the
  fraction of them that are valid, so with BCE (linear in the target) a coarse position
  costs exactly what its valid fine positions would at the coarse prediction.

Example:
    >>> import torch
    >>> mask = torch.tensor([[[0, 255, 1, 2]]])              # (B, H, W) = (1, 1, 4)
    >>> matched = TargetMatcher(mask, "multiclass", rank=4, ignore_index=255).at((1, 2))
    >>> matched.weight                                        # nearest-exact samples columns 1 and 3
    tensor([[[0., 1.]]])
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InstrumentError

__all__ = [
    "TargetKind",
    "RegressionLoss",
    "MatchedTarget",
    "TargetMatcher",
    "check_target",
    "check_target_kind",
    "check_target_values",
    "is_soft_target",
    "resize_logits",
]

TargetKind = Literal["multiclass", "binary", "multilabel", "regression"]
RegressionLoss = Literal["mse", "l1"]

# What to pass to ``instrument`` for each kind, for the hints.
_TASK_HINT: dict[str, str] = {
    "multiclass": "task='classification' (or 'dense')",
    "binary": "task='binary'",
    "multilabel": "task='multilabel'",
    "regression": "task='regression'",
}
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}
_AREA = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_AXES = {0: "", 1: ", L", 2: ", H, W", 3: ", D, H, W"}


class MatchedTarget(NamedTuple):
    """A target at one resolution, in the form the loss kernels read.

    Attributes:
        values: multiclass: int64 class ids (B, *S), ignored positions set to 0, or soft
            targets, float (B, K, *S) rows summing to the position's weight;
            binary / multilabel: float32 (B, K, *S) in [0, 1] (K = 1 for binary), 0 where
            ignored; regression: float32 (B, C, *S).
        weight: float32 weight of each position in [0, 1], 0 where ignored: (B, *S) for
            multiclass (a soft target row's sum), ``values``' shape for binary / multilabel (fractional after area
            downsampling); ``None`` for regression, where every element counts.
    """

    values: Tensor
    weight: Tensor | None


def check_target_kind(kind: str) -> TargetKind:
    """``kind`` if it is a ``TargetKind``, else an ``InstrumentError`` listing the kinds."""
    if kind not in get_args(TargetKind):
        raise InstrumentError(f"unknown target_kind {kind!r}; expected one of {list(get_args(TargetKind))}")
    return kind  # type: ignore[return-value]


def resize_logits(logits: Tensor, size: tuple[int, ...]) -> Tensor:
    """``logits`` (B, K, *S) resized to spatial ``size`` (linear / bilinear / trilinear), or as is.

    Args:
        logits: channels-first logits.
        size: the target's spatial size, of the same length as ``S``.

    Returns:
        ``logits`` itself when the size already matches, else the interpolated logits.

    Example:
        >>> resize_logits(torch.zeros(1, 3, 2, 2), (8, 8)).shape
        torch.Size([1, 3, 8, 8])
    """
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode=_INTERPOLATION[len(size)], align_corners=False)


class TargetMatcher:
    """One batch's target, matched to any resolution; each size is computed once.

    Args:
        target: the user's target, already accepted by ``check_target``.
        kind: its ``TargetKind``.
        rank: the rank of the logits it goes with (tells (B, *S) from (B, 1, *S) binary masks).
        ignore_index: target value excluded from every loss (not used for regression).

    Attributes:
        size: the target's own spatial size.
        soft: whether it holds soft class targets (B, K, *S) rather than class ids.
        original: the target as passed.
    """

    def __init__(self, target: Tensor, kind: TargetKind, *, rank: int, ignore_index: int) -> None:
        self.original = target  # as the user passed it, for a custom output loss
        if target.dtype == torch.bool:
            target = target.to(torch.uint8)
        if kind == "binary" and target.dim() == rank - 1:
            target = target.unsqueeze(1)
        self.kind = kind
        self.ignore_index = ignore_index
        self._target = target
        # Soft class targets carry the class axis, like the logits; class ids do not.
        self.soft = is_soft_target(target, kind, rank)
        ids = kind == "multiclass" and not self.soft
        self.size: tuple[int, ...] = tuple(target.shape[1:] if ids else target.shape[2:])
        self._cache: dict[tuple[int, ...], MatchedTarget] = {}

    def at(self, size: tuple[int, ...]) -> MatchedTarget:
        """The target at spatial ``size`` (see the module docstring for how it is resized)."""
        size = tuple(size)
        if size not in self._cache:
            self._cache[size] = self._match(size)
        return self._cache[size]

    def _match(self, size: tuple[int, ...]) -> MatchedTarget:
        target = self._target
        if self.soft:
            # Area averaging keeps each row a distribution (its sum the valid fraction), like 0/1 masks.
            values = target.float() if size == self.size else _AREA[len(size)](self.at(self.size).values, size)
            return MatchedTarget(values, values.sum(dim=1))
        if self.kind == "multiclass":
            if size != self.size:
                target = _nearest_exact(target, size)
            valid = target != self.ignore_index
            return MatchedTarget(torch.where(valid, target, 0).long(), valid.float())
        if self.kind == "regression":
            values = target.float()
            return MatchedTarget(values if size == self.size else _AREA[len(size)](values, size), None)
        native = self.at(self.size) if size != self.size else None
        if native is None:
            valid = target != self.ignore_index
            return MatchedTarget(torch.where(valid, target, 0).float(), valid.float())
        area = _AREA[len(size)]
        weight = area(native.weight, size)
        # Ignored positions hold 0, so the pooled values sum only valid ones.
        values = torch.where(weight > 0, area(native.values, size) / weight.clamp_min(1e-12), 0.0)
        return MatchedTarget(values, weight)


def is_soft_target(target: Tensor, kind: TargetKind, rank: int) -> bool:
    """Whether ``target`` holds soft class targets (B, K, *S) for multiclass logits of ``rank`` dims.

    Example:
        >>> is_soft_target(torch.tensor([[0.3, 0.7]]), "multiclass", 2), is_soft_target(torch.tensor([1]), "multiclass", 2)
        (True, False)
    """
    return kind == "multiclass" and target.dtype.is_floating_point and target.dim() == rank


def _nearest_exact(target: Tensor, size: tuple[int, ...]) -> Tensor:
    # nearest-exact in integer arithmetic (src = floor((dst + 0.5) * in / out)), by indexing:
    # exact for any label dtype and any ignore_index, no round trip through float.
    for axis, (n_in, n_out) in enumerate(zip(target.shape[1:], size), start=1):
        if n_in != n_out:
            index = ((2 * torch.arange(n_out, device=target.device) + 1) * n_in) // (2 * n_out)
            target = target.index_select(axis, index)
    return target


def check_target(logits: Tensor, target: Tensor, kind: TargetKind, *, what: str) -> None:
    """Check a target's type, dtype and shape against logits (not its values).

    Any spatial size is accepted (it is matched by resizing); the rank, the batch and,
    for binary / multi-label / regression, the channel count must fit.

    Args:
        logits: (B, K) or dense (B, K, L), (B, K, H, W), (B, K, D, H, W) logits.
        target: the user's target.
        kind: the objective's ``TargetKind``.
        what: how messages name the logits (``"output"``, ``"head of point 'x'"``).

    Raises:
        InstrumentError: naming both shapes and what to pass instead.
    """
    if not isinstance(target, Tensor):
        raise InstrumentError(f"the target must be a torch.Tensor; got {type(target).__name__}")
    if logits.dim() not in (2, 3, 4, 5):
        raise InstrumentError(
            f"{what} has shape {tuple(logits.shape)}; expected (B, K) logits or dense (B, K, L), (B, K, H, W) "
            "or (B, K, D, H, W) logits"
        )
    if target.dtype.is_complex:
        raise InstrumentError(f"the target has complex dtype {target.dtype}; expected a real tensor")
    batch, channels, spatial = logits.shape[0], logits.shape[1], logits.dim() - 2
    axes = _AXES[spatial]
    shapes = f"target of shape {tuple(target.shape)} does not fit {what} of shape {tuple(logits.shape)}"
    if kind == "multiclass":
        _check_multiclass(logits, target, what=what)
    elif kind in ("binary", "multilabel"):
        if kind == "binary" and channels != 1:
            raise InstrumentError(
                f"{what} has K={channels} channels; a binary target needs one logit channel (K=1). Hint: for "
                f"integer class ids pass {_TASK_HINT['multiclass']} to instrument; for K independent 0/1 labels "
                f"pass {_TASK_HINT['multilabel']}."
            )
        fits = target.dim() == logits.dim() and tuple(target.shape[:2]) == (batch, channels)
        if kind == "binary":
            fits = fits or (target.dim() == logits.dim() - 1 and target.shape[0] == batch)
        if not fits:
            needed = f"(B{axes}) or (B, 1{axes})" if kind == "binary" else f"(B, K{axes})"
            raise InstrumentError(
                f"{shapes}; a {kind} target has shape {needed} with B={batch}"
                + (f", K={channels}" if kind == "multilabel" else "")
                + (", any spatial size of the same rank (it is resized)" if spatial else "")
            )
    else:
        if not target.dtype.is_floating_point:
            raise InstrumentError(
                f"a regression target must be floating point; got dtype {target.dtype}, which holds class ids. "
                f"Hint: for class labels pass {_TASK_HINT['multiclass']} to instrument (or task='binary' / "
                "'multilabel' for 0/1 masks); if the integers are measurements, pass target.float()."
            )
        if target.dim() != logits.dim() or tuple(target.shape[:2]) != (batch, channels):
            raise InstrumentError(
                f"{shapes}; a regression target has shape (B, C{axes}) with B={batch} and C={channels}, the "
                "output's channels" + (", at any spatial size of the same rank (it is resized)" if spatial else "")
            )


def _check_multiclass(logits: Tensor, target: Tensor, *, what: str) -> None:
    batch, channels, spatial = logits.shape[0], logits.shape[1], logits.dim() - 2
    if channels < 2:
        raise InstrumentError(
            f"{what} has K={channels} channel; a multiclass loss needs K >= 2 class logits. Hint: for one-logit "
            f"binary masks pass {_TASK_HINT['binary']} to instrument (target_kind='binary' to make_objective)."
        )
    if target.dtype.is_floating_point and target.dim() == logits.dim():
        if target.shape[:2] != logits.shape[:2]:
            raise InstrumentError(
                f"soft class targets of shape {tuple(target.shape)} do not fit {what} of shape "
                f"{tuple(logits.shape)}: they need shape (B, K{_AXES[spatial]}) with B={batch}, K={channels}"
                + (", any spatial size of the same rank (it is resized)" if spatial else "")
                + ". Hint: for class ids pass an integer tensor without the class axis."
            )
        return  # soft class targets: their values are checked by check_target_values
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise InstrumentError(
            f"labels must be integer class ids; got dtype {target.dtype}. Hint: pass target.long() for class ids, "
            f"{_TASK_HINT['binary']} / {_TASK_HINT['multilabel']} for 0/1 masks, or {_TASK_HINT['regression']} "
            "for continuous targets."
        )
    if target.dim() != logits.dim() - 1 or target.shape[0] != batch:
        task = "classification" if spatial == 0 else "dense"
        expected = (batch, *logits.shape[2:])
        size = "" if spatial == 0 else f"; any ({batch}{_AXES[spatial]}) is resized to fit"
        hint = ""
        if tuple(target.shape) == tuple(logits.shape):
            hint = " They look like one-hot or soft labels: pass `target.argmax(1)`."
        elif target.dim() == logits.dim() and target.shape[:2] == (batch, 1):
            hint = " Drop the channel axis: pass `target.squeeze(1)`."
        raise InstrumentError(
            f"labels of shape {tuple(target.shape)} do not fit the {task} task: {what} has shape "
            f"{tuple(logits.shape)}, so labels must have shape {expected} (integer class ids{size}).{hint}"
        )


def check_target_values(target: Tensor, kind: TargetKind, num_classes: int, ignore_index: int, *, what: str) -> None:
    """Check a target's values (eager mode only: the check needs a host sync).

    Raises:
        InstrumentError: a class id outside 0..K-1, a binary/multi-label value outside [0, 1],
            or a non-finite regression value, none of them ``ignore_index``.
    """
    if torch.compiler.is_compiling():
        return
    if target.dtype == torch.bool:
        return
    if kind == "multiclass" and target.dtype.is_floating_point:
        _check_soft_values(target, what)
    elif kind == "multiclass":
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            raise InstrumentError(
                f"label value {int(target[bad][0])} does not fit {what} with K={num_classes} classes; "
                f"labels must be in 0..{num_classes - 1} or ignore_index={ignore_index}"
            )
    elif kind == "regression":
        bad = ~torch.isfinite(target)
        if bool(bad.any()):
            raise InstrumentError(
                f"the regression target holds a non-finite value ({float(target[bad][0])}); regression "
                "targets have no ignore value. Hint: replace or crop the invalid positions."
            )
    else:
        bad = (target != ignore_index) & ~((target >= 0) & (target <= 1))
        if bool(bad.any()):
            raise InstrumentError(
                f"target value {target[bad][0].item()} does not fit {what}: a {kind} target holds 0/1 (or "
                f"probabilities in [0, 1]) or ignore_index={ignore_index}. Hint: for class ids pass "
                f"{_TASK_HINT['multiclass']}; for continuous values pass {_TASK_HINT['regression']}."
            )


# How far a soft target row's sum may be from 1: float32 sums of K probabilities.
_SOFT_SUM_TOLERANCE = 1e-3


def _check_soft_values(target: Tensor, what: str) -> None:
    sums = target.sum(dim=1)
    in_range = bool(((target >= 0) & (target <= 1)).all())
    rows_fit = bool(((sums - 1).abs() <= _SOFT_SUM_TOLERANCE).all())
    if not (in_range and rows_fit):
        raise InstrumentError(
            f"the float target of shape {tuple(target.shape)} is shaped like {what}, so it is read as soft class "
            "targets, but its rows (dim 1) are not distributions: values must lie in [0, 1] and each row sum to 1. "
            "Hint: if it is a regression target (flow, depth, heatmaps), pass "
            f"{_TASK_HINT['regression']} to instrument; for 0/1 per class pass {_TASK_HINT['multilabel']}; "
            "for logits, pass `target.softmax(1)`."
        )
