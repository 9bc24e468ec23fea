"""The terms of the objectives, as modules: the one implementation of each, usable alone.

Every term has two entry points. ``forward`` takes logits and the user's target, checks them,
and applies the resolution conventions of ``targets``: an output loss resizes the logits to
the target; an intermediate term (MI, correlation, DSN) compares its logits with the target
resized to them. ``forward_matched`` takes a target already matched to the logits
(``targets.MatchedTarget``) and computes the term: the objectives check and match the target
once per batch and call it, so a term alone and inside an objective run the same code.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import InstrumentError, UsageError
from ..layout import Layout
from . import _math
from ._checks import check_int, check_max_positions, check_output_options, check_positive_float
from .targets import MatchedTarget, RegressionLoss, TargetKind, TargetMatcher, check_target, check_target_kind
from .targets import check_target_values, resize_logits

__all__ = [
    "NE_MAX_POSITIONS",
    "OutputLoss",
    "OutputCrossEntropy",
    "MutualInformationLoss",
    "CorrelationLoss",
    "NegativeEntropyLoss",
    "DSNLoss",
    "DKSLoss",
    "channel_dim_for",
    "check_regression_loss",
    "check_dks_kind",
    "check_mi_estimator",
    "check_region_options",
    "check_region_head",
    "check_gather",
    "REGION_CE",
]

# Positions per example above which NE is estimated on a grid: a 32x32 map is exact, a
# 112x112 one is sampled with stride 4 (784 positions), 56x56 with stride 2.
NE_MAX_POSITIONS = 1024
_CLASS_KINDS = ("multiclass", "binary", "multilabel")
# The CE half of the region estimator by default: the reference's 0.5 * CE + 0.5 * RMI (see
# ``MutualInformationLoss``'s ``region_ce``).
REGION_CE = 0.5


def check_regression_loss(value: str) -> RegressionLoss:
    """``value`` if it is ``"mse"`` or ``"l1"``, else an ``InstrumentError``."""
    if value not in ("mse", "l1"):
        raise InstrumentError(f"unknown regression_loss {value!r}; expected 'mse' or 'l1'")
    return value  # type: ignore[return-value]


def _prepare(logits: Tensor, target: Tensor, kind: TargetKind, ignore_index: int, what: str) -> TargetMatcher:
    check_target(logits, target, kind, what=what)
    check_target_values(target, kind, logits.shape[1], ignore_index, what=what)
    return TargetMatcher(target, kind, rank=logits.dim(), ignore_index=ignore_index)


def _spatial(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape[2:])


class _HeadTerm(nn.Module, abc.ABC):
    """A term of one head's logits against the target: ``forward`` checks, ``forward_matched`` computes.

    Subclasses set ``target_kind`` and ``ignore_index`` and implement ``forward_matched``.
    """

    target_kind: TargetKind
    ignore_index: int

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The term of ``logits`` against the user's ``target``, resized to the logits' size.

        Args:
            logits: (B, K) or (B, K, *S), usually an adapter's output.
            target: of the term's ``target_kind``, at any spatial size of the same rank.

        Returns:
            A float32 scalar (the class gives its range).
        """
        matcher = _prepare(logits, target, self.target_kind, self.ignore_index, "logits")
        return self.forward_matched(logits, matcher.at(_spatial(logits)))

    @abc.abstractmethod
    def forward_matched(self, logits: Tensor, target: MatchedTarget) -> Tensor:
        """The term of ``logits`` against a target already matched to them, unchecked: what the objectives call.

        Args:
            logits: (B, K) or (B, K, *S).
            target: the target at S (``TargetMatcher.at``).

        Returns:
            A float32 scalar.
        """


class OutputLoss(_HeadTerm):
    """The output's loss for any target kind, mean over the non-ignored elements.

    - multiclass: CE = -(1/N) sum over valid n of log softmax(logits_n)[y_n];
    - binary / multilabel: BCE-with-logits, -(1/N) sum over valid elements of
      t log sigmoid(x) + (1 - t) log sigmoid(-x), one element per position and label;
    - regression: MSE = mean (x - y)^2 or L1 = mean |x - y| over every element.

    Logits at another spatial size than the target are resized to it first (bilinear,
    linear or trilinear, ``align_corners=False``: the SegFormer convention). Returns 0,
    still connected to the graph, when every element is ignored. The objectives' output
    loss and DSN's loss at each head are this module.

    Args:
        target_kind: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        ignore_index: target value excluded from the mean (not used for regression).
        regression_loss: ``"mse"`` or ``"l1"``, for regression.
        label_smoothing: epsilon in [0, 1) of the multiclass cross entropy, as
            ``F.cross_entropy(label_smoothing=)``.
        class_weights: K weights of the multiclass cross entropy, as ``F.cross_entropy(weight=)``.

    Raises:
        InstrumentError: an unknown kind or regression loss, or an ``ignore_index`` that is not an int.
        UsageError: ``label_smoothing`` or ``class_weights`` out of range, or given for another kind.

    Example:
        >>> import torch
        >>> loss = OutputLoss("binary", ignore_index=255)
        >>> round(loss(torch.zeros(1, 1, 2), torch.tensor([[1, 255]])).item(), 4)  # log 2
        0.6931
        >>> smoothed = OutputLoss(label_smoothing=0.1, class_weights=[1.0, 3.0])
        >>> round(smoothed(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item(), 4)  # as F.cross_entropy's
        0.4396
    """

    def __init__(
        self,
        target_kind: TargetKind = "multiclass",
        ignore_index: int = -100,
        regression_loss: RegressionLoss = "mse",
        *,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        self.target_kind = check_target_kind(target_kind)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.regression_loss = check_regression_loss(regression_loss)
        weights = check_output_options(self.target_kind, label_smoothing, class_weights, None)
        self.label_smoothing = float(label_smoothing)
        # A buffer so `.to(device)` moves it; not persistent, so state_dicts keep only weights.
        self.class_weights: Tensor | None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of ``logits``, resized to the target's size (unlike the other terms), against ``target``.

        Args:
            logits: (B, K) or (B, K, *S).
            target: as ``targets.TargetKind`` describes, at any spatial size of the same rank.

        Returns:
            A float32 scalar.
        """
        matcher = _prepare(logits, target, self.target_kind, self.ignore_index, "logits")
        return self.forward_matched(resize_logits(logits, matcher.size), matcher.at(matcher.size))

    def forward_matched(self, logits: Tensor, target: MatchedTarget) -> Tensor:
        """CE, BCE, MSE or L1 (see ``_HeadTerm.forward_matched``)."""
        options = _math.CrossEntropyOptions(self.label_smoothing, self.class_weights)
        return _math.homogeneous(self.target_kind, logits, target, self.regression_loss, options)

    def options_repr(self) -> str:
        """The options beyond kind and ``ignore_index`` that are set, for reprs (the objectives' too).

        Returns:
            ``", name=value"`` for each of ``regression_loss`` (regression only),
            ``label_smoothing`` and ``class_weights`` in use; ``""`` for none.

        Example:
            >>> OutputLoss(label_smoothing=0.1).options_repr()
            ', label_smoothing=0.1'
        """
        text = f", regression_loss={self.regression_loss!r}" if self.target_kind == "regression" else ""
        if self.label_smoothing:
            text += f", label_smoothing={self.label_smoothing}"
        if self.class_weights is not None:
            text += f", class_weights={[round(w, 6) for w in self.class_weights.tolist()]}"
        return text

    def extra_repr(self) -> str:
        return f"target_kind={self.target_kind!r}, ignore_index={self.ignore_index}{self.options_repr()}"


class OutputCrossEntropy(OutputLoss):
    """Cross entropy (BCE for binary / multilabel) of logits, mean over non-ignored elements.

    ``OutputLoss`` for the label kinds; see it for the formulas and resizing.

    Args:
        ignore_index: label value excluded from the mean.
        target_kind: ``"multiclass"`` (default), ``"binary"`` or ``"multilabel"``.

    Example:
        >>> import torch
        >>> loss = OutputCrossEntropy()
        >>> round(loss(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])).item(), 4)  # log 2
        0.6931
    """

    def __init__(self, ignore_index: int = -100, target_kind: TargetKind = "multiclass") -> None:
        if target_kind == "regression":
            raise InstrumentError("OutputCrossEntropy is for labels. Hint: use OutputLoss('regression') (MSE or L1).")
        super().__init__(target_kind, ignore_index)


class MutualInformationLoss(_HeadTerm):
    """Negative mutual information between the predicted outcomes and the true labels.

    Multiclass: with p_n = softmax(logits_n) and one-hot labels e_n over the N valid
    samples of a group:

        P[i, j] = (1/N) * sum_n p_n[i] * e_n[j]       (soft joint of prediction i, label j)
        P_i = sum_j P[i, j],   P_j = sum_i P[i, j]
        I = sum_ij P[i, j] * (log P[i, j] - log P_i - log P_j)
        loss = -I

    A group is the whole batch for classification and one image (its positions) for
    dense tasks, the paper's "image-wise MI"; dense losses average I over the images
    that have at least one valid position. Logs take max(x, eps), which also makes
    0 * log 0 = 0.

    Binary and multi-label: each label is a 2-class problem, p_n = [sigmoid(-x_n),
    sigmoid(x_n)] against e_n = [1 - t_n, t_n], with the same estimator; a group is
    one label over the batch (classification) or one label of one image (dense), and
    the loss is minus the mean of the groups' MIs (for binary: per image). Soft or
    area-downsampled targets enter e_n as they are, each position weighted by its
    valid fraction.

    Unlike cross entropy, MI does not ask each sample to be right: it rewards a
    prediction that is *informative* about the label, up to a relabelling of the
    classes. That is the heterogeneous signal iMacHSR wants at intermediate points.
    Range: 0 <= I <= log K (log 2 per label for binary), so the loss is in [-log K, 0].

    ``estimator="region"``: Region Mutual Information (RMI; Zhao, Wang, Huang, Li,
    NeurIPS 2019), for 2-D dense multiclass logits (B, K, H, W) only. Per image and
    class, labels y_c and probabilities p_c = softmax(logits)_c, both zeroed at
    ``ignore_index`` positions and avg-pooled with kernel and stride 3; each pooled
    position's 3x3 neighbourhood is a 9-vector, giving centred matrices Y and P, and

        M = Cov(Y) - Cov(Y, P) (Cov(P) + a I)^-1 Cov(Y, P)^T,     a = 5e-4
        RMI = mean over images and classes of 1/2 log det(M + a I) / 9

    (``_math.region_mutual_information``: float64 covariances and Cholesky, the
    reference's constants). I(Y; P) >= H(Y) - 1/2 log((2 pi e)^9 det M) with H(Y)
    fixed by the labels, so lowering RMI raises a lower bound on the MI of the regions;
    it is class-aligned (class c's probabilities against class c's labels) but, like any
    MI, blind to an invertible linear map of P (p_c = 1 - y_c scores as well as p_c = y_c).
    The value is not in nats and has no fixed range (IMacHSR logs it as ``"rmi/<point>"``).
    The term is ``(1 - region_ce) * RMI + region_ce * CE``, CE the plain cross entropy of
    the same logits.

    ``region_ce`` defaults to 0.5, the reference's pairing (``loss_weight_lambda=0.5``,
    ``lambda_way=1``: 0.5 * BCE + 0.5 * RMI; here CE, the softmax counterpart): every
    published RMI result trains with it, and the CE half is what asks the head to *name*
    the classes, which the bound alone does not. ``region_ce=0`` is the bound alone, the
    purely heterogeneous reading.

    RMI needs regions to estimate 9 x 9 covariances: a head compared at a grid with fewer
    than 9 regions (under 13 x 13; a 2x2 or 4x4 map has none) is refused with an
    ``InstrumentError`` rather than skipped, so a point that is listed as supervised is
    supervised (``check_region_head``; ``instrument`` and ``IMacHSR`` name the point).
    For classification the estimate comes from one batch, so it is only informative
    when the batch is large next to K. The target is resized to the logits' size
    (``targets.TargetMatcher``) when they differ. iMacHSR's MI term is this module.

    Args:
        eps: floor inside the logs.
        ignore_index: label value excluded from the joint.
        target_kind: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        estimator: how the MI of multiclass labels is estimated: ``"image"`` (above),
            ``"pooled"`` or ``"shuffled"`` (``IMacHSR``'s ``mi_estimator``).
        gather: sum the joint tables over the ranks of the default process group first
            (``IMacHSR``'s ``gather_mi``); per-image estimators, ``"region"`` among them,
            need nothing from other ranks.
        region_ce: weight in [0, 1] of the CE half of ``estimator="region"``; ``None``
            for its default, 0.5 (``REGION_CE``). Only with ``"region"``.

    Raises:
        InstrumentError: a bad ``eps``, ``ignore_index``, kind (regression; anything but
            multiclass for ``"region"``) or estimator; with ``"region"``, logits that are not
            (B, K, H, W) or a grid with fewer than 9 regions (at ``forward``).
        UsageError: ``gather`` that is not a bool; ``region_ce`` out of [0, 1] or given
            without ``estimator="region"``.

    Example:
        >>> import torch
        >>> loss = MutualInformationLoss()
        >>> labels = torch.tensor([0, 1, 0, 1])
        >>> round(loss(50.0 * torch.nn.functional.one_hot(labels, 2).float(), labels).item(), 4)  # -log 2
        -0.6931
        >>> rmi = MutualInformationLoss(estimator="region", region_ce=0.0)
        >>> mask = (torch.rand(2, 24, 24) > 0.5).long()
        >>> right = 8.0 * torch.nn.functional.one_hot(mask, 2).movedim(-1, 1).float()
        >>> bool(rmi(right, mask) < rmi(torch.randn(2, 2, 24, 24), mask))   # informative: lower
        True
    """

    def __init__(
        self,
        eps: float = 1e-8,
        ignore_index: int = -100,
        target_kind: TargetKind = "multiclass",
        *,
        estimator: _math.MIEstimator = "image",
        gather: bool = False,
        region_ce: float | None = None,
    ) -> None:
        super().__init__()
        self.eps = check_positive_float("eps", eps)
        self.ignore_index = check_int("ignore_index", ignore_index)
        if check_target_kind(target_kind) not in _CLASS_KINDS:
            raise InstrumentError(
                "mutual information needs labels; target_kind='regression' has none. "
                "Hint: use CorrelationLoss, iMacHSR's term for continuous targets."
            )
        self.target_kind = target_kind
        self.estimator = check_mi_estimator(estimator)
        self.gather = check_gather("gather", gather)
        self.region_ce = check_region_options(self.estimator, target_kind, region_ce)
        self._warned_one_class = False

    def forward_matched(self, logits: Tensor, target: MatchedTarget) -> Tensor:
        """-I, in [-log K, 0]; for ``"region"``, (1 - region_ce) * RMI + region_ce * CE.

        A classification batch whose labels are all one class has an MI of exactly 0, and no
        gradient, with every estimator: the batch's joint table has a single label column
        (``"pooled"`` is the same table for vector outputs, ``"shuffled"`` subtracts another
        sample's, also 0). It is warned about once per term (eager mode only). A larger batch, a
        class-balanced sampler, or ``gather_mi=True`` (the tables of every rank summed) avoid it.

        See ``_HeadTerm.forward_matched``.
        """
        if self.estimator == "region":
            check_region_head(tuple(logits.shape), "logits")
        if logits.dim() == 2 and not self._warned_one_class and not torch.compiler.is_compiling():
            self._warn_one_class(target)
        loss = _math.heterogeneous(self.target_kind, logits, target, self.eps, self.estimator, self.gather)
        if not self.region_ce:  # 0 for the other estimators
            return loss
        return (1.0 - self.region_ce) * loss + self.region_ce * _math.cross_entropy(logits, target)

    def _warn_one_class(self, target: MatchedTarget) -> None:
        """Warn (once) when every labelled sample of a class-id batch has the same class."""
        if self.target_kind != "multiclass" or target.values.is_floating_point() or target.weight is None:
            return
        labels = target.values[target.weight > 0]
        if labels.numel() > 1 and bool((labels == labels[0]).all()):
            self._warned_one_class = True
            warnings.warn(
                f"MI term: every label of this batch of {labels.numel()} is class {int(labels[0])}, so its MI is "
                "exactly 0 and gives no gradient (it is warned once). Hint: a larger or class-balanced batch, "
                "or gather_mi=True to sum the MI tables over the ranks.",
                UserWarning, stacklevel=3,
            )

    def extra_repr(self) -> str:
        text = f"eps={self.eps}, ignore_index={self.ignore_index}, target_kind={self.target_kind!r}"
        text += "" if self.estimator == "image" else f", estimator={self.estimator!r}"
        text += f", region_ce={self.region_ce}" if self.estimator == "region" else ""
        return text + (", gather=True" if self.gather else "")


class CorrelationLoss(_HeadTerm):
    """iMacHSR's heterogeneous term for continuous targets: one minus Pearson's r.

    For each group g (one image and channel of a dense target, over its positions; one
    channel over the batch for (B, C) targets), with h the head and y the target,
    centred h' = h - mean(h), y' = y - mean(y) over the group:

        r_g = mean(h' y') / sqrt((mean(h'^2) + eps) * (mean(y'^2) + eps))
        loss = mean over groups with mean(y'^2) > eps of (1 - r_g)        in [0, 2]

    Why this counterpart of MI: like MI, r does not ask the head to reproduce the
    output's values; it is invariant to any positive affine map a h + b of the head,
    so it rewards a feature that is (linearly) informative about where the target is
    high or low, not one already calibrated like the output. For jointly Gaussian
    variables I(h; y) = -1/2 log(1 - r^2), so maximizing r maximizes that MI. A group
    whose target is constant (an absent joint's heatmap) carries no signal and is left
    out; the loss is 0 when no group is left. eps keeps the gradient finite for a
    constant head. The target is area-resized to the head when their sizes differ.
    iMacHSR's term for regression targets is this module.

    Args:
        eps: added to both variances.

    Example:
        >>> import torch
        >>> y = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])             # (B, C, L)
        >>> round(CorrelationLoss()(3 * y + 1, y).item(), 6)       # an affine copy: r = 1
        0.0
    """

    target_kind: TargetKind = "regression"
    ignore_index = -100  # not read: a regression target has no ignored value

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = check_positive_float("eps", eps)

    def forward_matched(self, logits: Tensor, target: MatchedTarget) -> Tensor:
        """1 - r, in [0, 2] (see ``_HeadTerm.forward_matched``)."""
        return _math.heterogeneous("regression", logits, target, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class NegativeEntropyLoss(nn.Module):
    """Negative entropy of a raw feature, softmaxed over its channels at each position.

        p[c] = softmax over channels of z at one position
        NE = mean over batch and positions of sum_c p[c] * log p[c]

    NE is in [-log C, 0]: 0 when one channel dominates, -log C when all are equal.
    Minimizing it maximizes the entropy of the hidden feature, which discourages
    overconfident intermediate representations (Eq. 2). It needs no labels, so it is the
    same for every target kind.

    Estimator: NE is a mean over positions, so on a large map (the first stages of a
    CNN: 112x112 positions at 64 channels) it is estimated, like a minibatch estimates
    a mean over the data, on a strided grid of at most about ``max_positions``
    positions per example, at a random offset drawn each call from torch's default
    generator. Every position is in the grid with the same probability, so the
    estimate and its gradient are unbiased when each size is a multiple of the
    stride (nearly so otherwise) and every position is regularized over the steps.
    The full mean costs a softmax, its backward and a gradient the size of the map at
    every step; the estimate keeps NE's cost small next to the layers it regularizes
    (``benchmarks/overhead.py``). ``max_positions=None`` computes the exact mean.

    Args:
        channel_dim: the channel dimension of z (``Layout.channel_dim``); see ``for_layout``.
        max_positions: positions per example above which NE is estimated on a grid;
            ``None`` for the exact mean.

    Example:
        >>> import torch, math
        >>> loss = NegativeEntropyLoss.for_layout("NHWC")
        >>> math.isclose(loss(torch.zeros(2, 3, 3, 8)).item(), -math.log(8), rel_tol=1e-6)
        True
    """

    def __init__(self, channel_dim: int = 1, max_positions: int | None = NE_MAX_POSITIONS) -> None:
        super().__init__()
        self.channel_dim = check_int("channel_dim", channel_dim)
        self.max_positions = check_max_positions(max_positions)

    @classmethod
    def for_layout(cls, layout: str | Layout, max_positions: int | None = NE_MAX_POSITIONS) -> NegativeEntropyLoss:
        """The loss for features of one layout.

        Args:
            layout: a ``Layout`` or its name (``NC``, ``NCL``, ``NLC``, ``NCHW``, ``NHWC``, ``NCDHW``, ``NDHWC``).
            max_positions: see the class.

        Returns:
            A ``NegativeEntropyLoss`` softmaxing over that layout's channel dim.
        """
        return cls(channel_dim_for(layout), max_positions)

    def forward(self, z: Tensor) -> Tensor:
        """Negative entropy of ``z`` over its channels.

        Args:
            z: a batched feature with channels at ``channel_dim``.

        Returns:
            A float32 scalar in [-log C, 0].
        """
        if z.dim() < 2 or not -z.dim() <= self.channel_dim < z.dim():
            raise InstrumentError(
                f"negative entropy needs a batched feature with channels at dim {self.channel_dim}; "
                f"got shape {tuple(z.shape)}"
            )
        return _math.negative_entropy(z, self.channel_dim, self.max_positions)

    def extra_repr(self) -> str:
        return f"channel_dim={self.channel_dim}, max_positions={self.max_positions}"


class DSNLoss(nn.Module):
    """Deeply-Supervised Nets: the output's loss, applied at every adapter.

        DSN_m = OutputLoss(head_m, y resized to head_m)   for each point m

    CE for class ids, BCE for binary / multi-label, MSE / L1 for regression (FlowNet's
    per-scale flow loss, the stacked hourglass' per-stack heatmap loss). This is the
    homogeneous baseline iMacHSR argues against: every point is asked for the output's
    decision. Each head's loss is ``loss``, an ``OutputLoss``, on the head and the target
    resized to it.

    Args:
        ignore_index: target value excluded from each mean.
        target_kind: the ``TargetKind``.
        regression_loss: ``"mse"`` or ``"l1"``, for regression.
        label_smoothing, class_weights: of the multiclass cross entropy (``OutputLoss``).

    Example:
        >>> import torch
        >>> loss = DSNLoss()
        >>> parts = loss({"stage1": torch.zeros(4, 3)}, torch.tensor([0, 1, 2, 0]))
        >>> round(parts["stage1"].item(), 4)  # log 3
        1.0986
    """

    def __init__(
        self,
        ignore_index: int = -100,
        target_kind: TargetKind = "multiclass",
        regression_loss: RegressionLoss = "mse",
        *,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        self.loss = OutputLoss(
            target_kind, ignore_index, regression_loss, label_smoothing=label_smoothing, class_weights=class_weights
        )
        self.ignore_index, self.target_kind, self.regression_loss = (
            self.loss.ignore_index, self.loss.target_kind, self.loss.regression_loss
        )

    def forward(self, heads: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """The output's loss at every head.

        Args:
            heads: point name -> adapter logits, (B, K) or (B, K, *S), any S of the target's rank.
            target: the target, resized to each head's size where they differ.

        Returns:
            Point name -> the unweighted loss of that point's head.
        """
        losses: dict[str, Tensor] = {}
        for name, logits in heads.items():
            matcher = _prepare(logits, target, self.target_kind, self.ignore_index, f"head of point {name!r}")
            losses[name] = self.loss.forward_matched(logits, matcher.at(_spatial(logits)))
        return losses


class DKSLoss(nn.Module):
    """Deeply-supervised Knowledge Synergy: dense pairwise KL between all branches.

    With q_k = softmax(logits_k / T) for the n >= 2 branches (adapter outputs and
    the model output), per sample or position:

        KL(a, b) = sum_c sg(q_b)[c] * (log sg(q_b)[c] - log q_a[c])
        loss = T^2 * (1 / (n (n - 1))) * sum over ordered pairs a != b of mean KL(a, b)

    For binary and multi-label branches q_k is one Bernoulli per label,
    sigmoid(logits_k / T), and KL(a, b) is the Bernoulli KL, averaged over the valid
    (label, position) elements. sg() stops the gradient: each branch is pulled
    towards every other branch's current belief (top-down and bottom-up), never the
    reverse through the target. T^2 keeps gradient magnitudes independent of the
    temperature, as in distillation. Regression has no distribution to match:
    use DSN or iMacHSR's correlation term. DKS's synergy term is this module.

    Args:
        temperature: T > 0.
        ignore_index: with labels given, elements carrying it are left out.
        target_kind: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.

    Example:
        >>> import torch
        >>> loss = DKSLoss()
        >>> loss([torch.zeros(2, 3), torch.zeros(2, 3)]).item()  # identical branches
        0.0
    """

    def __init__(
        self, temperature: float = 1.0, ignore_index: int = -100, target_kind: TargetKind = "multiclass"
    ) -> None:
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.target_kind = check_dks_kind(target_kind)

    def forward(self, logits: Sequence[Tensor], target: Tensor | None = None) -> Tensor:
        """Synergy between all branches.

        Args:
            logits: n >= 2 branches of the same shape, (B, K) or (B, K, *S).
            target: optional labels (resized to the branches); elements equal to
                ``ignore_index`` are left out.

        Returns:
            The synergy loss, a float32 scalar.
        """
        if len(logits) < 2:
            raise InstrumentError(f"the DKS synergy needs at least 2 branches; got {len(logits)}")
        for k, branch in enumerate(logits):
            if branch.shape != logits[0].shape:
                raise InstrumentError(
                    f"DKS branch {k} has shape {tuple(branch.shape)}; every branch must match branch 0, "
                    f"{tuple(logits[0].shape)}"
                )
        matched = None
        if target is not None:
            matcher = _prepare(logits[0], target, self.target_kind, self.ignore_index, "DKS branches")
            matched = matcher.at(_spatial(logits[0]))
        return self.forward_matched(logits, matched)

    def forward_matched(self, logits: Sequence[Tensor], target: MatchedTarget | None) -> Tensor:
        """Synergy between branches of one shape, unchecked.

        Args:
            logits: n >= 2 branches of the same shape (B, K) or (B, K, *S).
            target: the labels at S (``TargetMatcher.at``), whose ignored elements are
                left out, or ``None`` to average over every element.

        Returns:
            The synergy loss, a float32 scalar.
        """
        weight = None if target is None else target.weight
        return _math.synergy(self.target_kind, logits, self.temperature, weight)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}, target_kind={self.target_kind!r}"


_DKS_REGRESSION = (
    "DKS matches the class distributions of its branches, and a regression target has none. "
    "Hint: use loss='dsn' (the output's MSE/L1 at every point, as FlowNet) or loss='imachsr' "
    "(1 - Pearson r at every point)."
)


def check_dks_kind(target_kind: str) -> TargetKind:
    """``target_kind`` if DKS can match its branches' distributions (a label kind), else an ``InstrumentError``.

    Args:
        target_kind: the objective's target kind.

    Returns:
        The kind, checked.

    Example:
        >>> check_dks_kind("binary")
        'binary'
    """
    kind = check_target_kind(target_kind)
    if kind not in _CLASS_KINDS:
        raise InstrumentError(_DKS_REGRESSION)
    return kind


def check_mi_estimator(value: str) -> _math.MIEstimator:
    """``value`` if it names an MI estimator (``MI_ESTIMATOR_CHOICES``), else an ``InstrumentError``.

    Args:
        value: ``IMacHSR``'s ``mi_estimator``.

    Returns:
        The estimator, checked.

    Example:
        >>> check_mi_estimator("pooled")
        'pooled'
    """
    if value not in _math.MI_ESTIMATOR_CHOICES:
        raise InstrumentError(
            f"unknown mi_estimator {value!r}; expected one of {list(_math.MI_ESTIMATOR_CHOICES)}. "
            "Hint: 'image' is the paper's image-wise MI."
        )
    return value  # type: ignore[return-value]


def check_region_options(estimator: str, target_kind: str, region_ce: float | None) -> float:
    """The CE weight of ``estimator="region"``, checked with the target kind; 0.0 for the other estimators.

    Args:
        estimator: the MI estimator (checked already).
        target_kind: the objective's target kind.
        region_ce: the CE half's weight in [0, 1], or ``None`` for ``REGION_CE`` (0.5).

    Returns:
        The weight to use: ``region_ce``, ``REGION_CE`` for ``None`` with ``"region"``, 0.0 otherwise.

    Raises:
        InstrumentError: ``"region"`` with a target kind other than multiclass.
        UsageError: ``region_ce`` out of [0, 1], or given with another estimator.

    Example:
        >>> check_region_options("region", "multiclass", None), check_region_options("image", "binary", None)
        (0.5, 0.0)
    """
    if estimator != "region":
        if region_ce is not None:
            raise UsageError(
                f"region_ce weighs the CE half of mi_estimator='region'; mi_estimator is {estimator!r}. "
                "Hint: leave region_ce out, or pass mi_estimator='region'."
            )
        return 0.0
    if target_kind != "multiclass":
        instead = "loss='dsn' or mi_estimator='image' (the Bernoulli MI)" if target_kind in _CLASS_KINDS else (
            "mi_estimator='image' (IMacHSR's regression term is 1 - Pearson r) or loss='dsn'"
        )
        raise InstrumentError(
            f"mi_estimator='region' (RMI) is defined for multiclass segmentation labels; target_kind is "
            f"{target_kind!r}. Hint: for {target_kind} targets use {instead}."
        )
    if region_ce is None:
        return REGION_CE
    if isinstance(region_ce, bool) or not isinstance(region_ce, (int, float)) or not 0.0 <= region_ce <= 1.0:
        raise UsageError(
            f"region_ce must be a number in [0, 1]; got {region_ce!r}. "
            f"Hint: {REGION_CE} is the reference's 0.5 * CE + 0.5 * RMI; 0 is the bound alone."
        )
    return float(region_ce)


def check_region_head(shape: tuple[int, ...], what: str) -> None:
    """Refuse a head RMI cannot be estimated on: logits that are not (B, K, H, W), or fewer than 9 regions.

    Args:
        shape: the head's logits shape at the size it is compared at.
        what: how the message names the head (``"head of point 'layer1'"``).

    Raises:
        InstrumentError: naming ``what``, its shape or grid and the region count, with a hint.

    Example:
        >>> check_region_head((2, 3, 13, 13), "logits")   # 5x5 pooled positions: 9 regions
        >>> check_region_head((2, 3, 12, 12), "logits")
        Traceback (most recent call last):
        ...
        autoprobe.errors.InstrumentError: mi_estimator='region' (RMI) needs at least 9 3x3 regions ...
    """
    if len(shape) != 4:
        raise InstrumentError(
            f"mi_estimator='region' (RMI) needs 2-D dense logits (B, K, H, W); the {what} has shape {shape}. "
            "Hint: RMI is a loss for 2-D segmentation; for classification or 1-D/3-D outputs use "
            "mi_estimator='image' (or loss='dsn')."
        )
    regions = _math.region_count(shape[2:])
    if regions < _math.RMI_MIN_REGIONS:
        raise InstrumentError(
            f"mi_estimator='region' (RMI) needs at least {_math.RMI_MIN_REGIONS} 3x3 regions of the stride-3 "
            f"pooled grid (a grid of at least 13x13) to estimate its 9x9 covariances; the {what} is compared at "
            f"{shape[2]}x{shape[3]}, which gives {regions}. Hint: keep label_resolution='upsample' (heads at the "
            "output's resolution, compared at the target's), choose points with larger maps, or use "
            "mi_estimator='image'."
        )


def check_gather(name: str, value: bool) -> bool:
    """``value`` if it is a bool, else a ``UsageError`` naming the option ``name``.

    Args:
        name: the option, ``"gather_mi"`` or ``"gather"``.
        value: its value.

    Returns:
        The value, checked.

    Example:
        >>> check_gather("gather_mi", True)
        True
    """
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False; got {value!r}. Hint: True sums the MI tables over the ranks.")
    return value


def channel_dim_for(layout: str | Layout) -> int:
    """The channel dimension of a feature of ``layout``, ``Layout.parse(layout).channel_dim``.

    Args:
        layout: a ``Layout`` or its name, as in ``LayerInfo.layout``.

    Returns:
        The (non-negative) dim to softmax over in ``NegativeEntropyLoss``.

    Raises:
        InstrumentError: an unknown layout, or ``None`` (a feature whose layout the graph could not derive).

    Example:
        >>> channel_dim_for("NHWC")
        3
    """
    if layout is None:
        raise InstrumentError(
            "the feature has no known layout, so negative entropy cannot find its channel axis. "
            "Hint: pick another point, or use loss='dsn', which does not read features."
        )
    try:
        return Layout.parse(layout).channel_dim
    except ValueError:
        known = [member.value for member in Layout]
        raise InstrumentError(f"unknown feature layout {layout!r}; expected one of {known}") from None
