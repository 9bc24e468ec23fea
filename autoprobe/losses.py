"""Training objectives: the output loss plus terms at the intermediate points.

iMacHSR (Eq. 3 in /work/shared/METHOD.md) adds two terms per point m to the
output cross entropy: a mutual-information loss on the adapter output q_m(z_m)
and a negative-entropy regularizer on the raw feature z_m. The MI term is
deliberately *heterogeneous*: it is not the output's cross entropy, so early
layers are pushed to carry label information without being forced to make the
output's decision early. Two homogeneous baselines sit beside it so the
evidence runs can compare like with like: DSN (the same CE at every adapter)
and DKS (DSN plus a pairwise KL "synergy" between all branches).

Conventions shared by every loss here:

- logits are (B, K) for classification or (B, K, H, W) for dense tasks, with
  integer labels (B,) or (B, H, W); labels equal to ``ignore_index`` are
  excluded everywhere;
- all terms are computed in float32 with autocast disabled: logs of K-way
  softmaxes and K x K joint tables lose too much in fp16/bf16, and they cost
  little next to the network;
- no scatter or NLLLoss kernels (their CUDA versions use atomics and have no
  deterministic mode); cross entropy is a gather of log-softmax, the MI joint a
  batched matmul;
- no state between calls, so the modules work under torch.compile and DDP.
  Label *values* are checked in eager mode only: the check needs a host sync
  and would break a compiled graph.
"""

from __future__ import annotations

import abc
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InstrumentError

__all__ = [
    "Schedule",
    "ObjectiveName",
    "LossResult",
    "OutputCrossEntropy",
    "MutualInformationLoss",
    "NegativeEntropyLoss",
    "NE_MAX_POSITIONS",
    "DSNLoss",
    "DKSLoss",
    "Objective",
    "IMacHSR",
    "DSN",
    "DKS",
    "channel_dim_for",
    "schedule_weight",
    "make_objective",
]

Schedule = Literal["constant", "linear", "cosine"]
ObjectiveName = Literal["imachsr", "dsn", "dks"]

# The keyword options of make_objective each objective accepts.
_OBJECTIVE_OPTIONS: dict[str, set[str]] = {
    "imachsr": {"layouts", "alpha", "lam"},
    "dsn": {"alpha"},
    "dks": {"alpha", "beta", "temperature"},
}
# Positions per example above which NE is estimated on a grid: a 32x32 map is exact, a
# 112x112 one is sampled with stride 4 (784 positions), 56x56 with stride 2.
NE_MAX_POSITIONS = 1024
_CHANNEL_DIMS: dict[str, int] = {"NC": 1, "NCL": 1, "NCHW": 1, "NCDHW": 1, "NLC": -1, "NHWC": -1}


class LossResult(NamedTuple):
    """What an ``Objective`` returns.

    Attributes:
        total: the weighted sum to back-propagate (scalar, float32).
        parts: every term *unweighted* and detached, for logging: ``"ce"``, then
            per point ``"mi/<point>"``, ``"ne/<point>"``, ``"dsn/<point>"``, and ``"dks"``.
    """

    total: Tensor
    parts: dict[str, Tensor]


# --------------------------------------------------------------------------- term losses


class OutputCrossEntropy(nn.Module):
    """Cross entropy of logits against integer labels, mean over non-ignored samples/pixels.

    CE = - (1/N) * sum over valid n of log softmax(logits_n)[y_n], N = number of valid n.
    Returns 0 (still connected to the graph) when every label is ignored, instead of NaN.

    Args:
        ignore_index: label value excluded from the mean.

    Example:
        >>> import torch
        >>> loss = OutputCrossEntropy()
        >>> round(loss(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])).item(), 4)  # log 2
        0.6931
    """

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = _check_int("ignore_index", ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross entropy of ``logits`` against ``target``.

        Args:
            logits: (B, K) or (B, K, H, W).
            target: integer labels, (B,) or (B, H, W).

        Returns:
            A float32 scalar.
        """
        _check_logits_and_target(logits, target, what="logits")
        _check_label_values(target, logits.shape[1], self.ignore_index, what="logits")
        return _cross_entropy(logits, target, self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"


class MutualInformationLoss(nn.Module):
    """Negative mutual information between predicted classes and true labels.

    With p_n = softmax(logits_n) and one-hot labels e_n over the N valid samples
    of a group:

        P[i, j] = (1/N) * sum_n p_n[i] * e_n[j]       (soft joint of prediction i, label j)
        P_i = sum_j P[i, j],   P_j = sum_i P[i, j]
        I = sum_ij P[i, j] * (log P[i, j] - log P_i - log P_j)
        loss = -I

    A group is the whole batch for classification and one image (its pixels) for
    dense tasks, the paper's "image-wise MI"; dense losses average I over the
    images that have at least one valid pixel. Logs take max(x, eps), which also
    makes 0 * log 0 = 0.

    Unlike cross entropy, MI does not ask each sample to be right: it rewards a
    prediction that is *informative* about the label, up to a relabelling of the
    classes. That is the heterogeneous signal iMacHSR wants at intermediate
    points. Range: 0 <= I <= min(H(pred), H(label)) <= log K, so the loss is in
    [-log K, 0]. For classification the estimate comes from one batch, so it is
    only informative when the batch is large next to K.

    Args:
        eps: floor inside the logs.
        ignore_index: label value excluded from the joint.

    Example:
        >>> import torch
        >>> loss = MutualInformationLoss()
        >>> labels = torch.tensor([0, 1, 0, 1])
        >>> round(loss(50.0 * F.one_hot(labels, 2).float(), labels).item(), 4)  # -log 2
        -0.6931
    """

    def __init__(self, eps: float = 1e-8, ignore_index: int = -100) -> None:
        super().__init__()
        self.eps = _check_positive_float("eps", eps)
        self.ignore_index = _check_int("ignore_index", ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Negative MI between the classes ``logits`` predict and ``target``.

        Args:
            logits: (B, K) or (B, K, H, W), usually an adapter's output.
            target: integer labels, (B,) or (B, H, W).

        Returns:
            -I, a float32 scalar in [-log K, 0].
        """
        _check_logits_and_target(logits, target, what="logits")
        _check_label_values(target, logits.shape[1], self.ignore_index, what="logits")
        return -_mutual_information(logits, target, self.ignore_index, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, ignore_index={self.ignore_index}"


class NegativeEntropyLoss(nn.Module):
    """Negative entropy of a raw feature, softmaxed over its channels at each position.

        p[c] = softmax over channels of z at one position
        NE = mean over batch and positions of sum_c p[c] * log p[c]

    NE is in [-log C, 0]: 0 when one channel dominates, -log C when all are equal.
    Minimizing it maximizes the entropy of the hidden feature, which discourages
    overconfident intermediate representations (Eq. 2). It needs no labels.

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
        channel_dim: the channel dimension of z (1 for NC/NCL/NCHW, -1 for NLC/NHWC);
            see ``for_layout``.
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
        self.channel_dim = _check_int("channel_dim", channel_dim)
        self.max_positions = _check_max_positions(max_positions)

    @classmethod
    def for_layout(cls, layout: str, max_positions: int | None = NE_MAX_POSITIONS) -> NegativeEntropyLoss:
        """The loss for features of one layout.

        Args:
            layout: ``NC``, ``NCL``, ``NLC``, ``NCHW``, ``NHWC`` or ``NCDHW``.
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
        return _negative_entropy(z, self.channel_dim, self.max_positions)

    def extra_repr(self) -> str:
        return f"channel_dim={self.channel_dim}, max_positions={self.max_positions}"


class DSNLoss(nn.Module):
    """Deeply-Supervised Nets: the output's cross entropy, applied at every adapter.

        DSN_m = CE(head_m, y)   for each point m

    This is the homogeneous baseline iMacHSR argues against: every point is asked
    for the output's decision.

    Args:
        ignore_index: label value excluded from each mean.

    Example:
        >>> import torch
        >>> loss = DSNLoss()
        >>> parts = loss({"stage1": torch.zeros(4, 3)}, torch.tensor([0, 1, 2, 0]))
        >>> round(parts["stage1"].item(), 4)  # log 3
        1.0986
    """

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = _check_int("ignore_index", ignore_index)

    def forward(self, heads: Mapping[str, Tensor], target: Tensor) -> dict[str, Tensor]:
        """Cross entropy of every head.

        Args:
            heads: point name -> adapter logits, (B, K) or (B, K, H, W).
            target: integer labels, (B,) or (B, H, W).

        Returns:
            Point name -> unweighted CE of that point's head.
        """
        losses: dict[str, Tensor] = {}
        for name, logits in heads.items():
            _check_logits_and_target(logits, target, what=f"head of point {name!r}")
            _check_label_values(target, logits.shape[1], self.ignore_index, what=f"head of point {name!r}")
            losses[name] = _cross_entropy(logits, target, self.ignore_index)
        return losses

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"


class DKSLoss(nn.Module):
    """Deeply-supervised Knowledge Synergy: dense pairwise KL between all branches.

    With q_k = softmax(logits_k / T) for the n >= 2 branches (adapter outputs and
    the model output), per sample or pixel:

        KL(a, b) = sum_c sg(q_b)[c] * (log sg(q_b)[c] - log q_a[c])
        loss = T^2 * (1 / (n (n - 1))) * sum over ordered pairs a != b of mean KL(a, b)

    sg() stops the gradient: each branch is pulled towards every other branch's
    current belief (top-down and bottom-up), never the reverse through the target.
    T^2 keeps gradient magnitudes independent of the temperature, as in
    distillation.

    Args:
        temperature: T > 0.
        ignore_index: with labels given, samples/pixels carrying it are left out.

    Example:
        >>> import torch
        >>> loss = DKSLoss()
        >>> loss([torch.zeros(2, 3), torch.zeros(2, 3)]).item()  # identical branches
        0.0
    """

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100) -> None:
        super().__init__()
        self.temperature = _check_positive_float("temperature", temperature)
        self.ignore_index = _check_int("ignore_index", ignore_index)

    def forward(self, logits: Sequence[Tensor], target: Tensor | None = None) -> Tensor:
        """Synergy between all branches.

        Args:
            logits: n >= 2 branches of the same shape, (B, K) or (B, K, H, W).
            target: optional labels; positions labelled ``ignore_index`` are left out.

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
        valid = None
        if target is not None:
            _check_logits_and_target(logits[0], target, what="DKS branches")
            valid = target != self.ignore_index
        return _synergy(logits, self.temperature, valid)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}"


# --------------------------------------------------------------------------- objectives


class Objective(nn.Module, abc.ABC):
    """Output cross entropy plus weighted terms at the declared points.

    Subclasses list their auxiliary terms; this base validates the inputs,
    applies the schedule and assembles a ``LossResult``:

        total = CE(output) + s(progress) * sum over terms of weight * term

    where s is the schedule factor (``schedule_weight``). With no points the
    objective is the output CE alone, a convenient "no deep supervision" baseline.

    Args:
        points: names of the supervised points, unique.
        schedule: how auxiliary weights change over training (``schedule_weight``).
        ignore_index: label value excluded from every term.

    Example:
        >>> import torch
        >>> class OutputOnly(Objective):
        ...     def _terms(self, output, heads, features, target):
        ...         return []
        >>> OutputOnly([])(torch.zeros(2, 3), {}, {}, torch.tensor([0, 1])).parts.keys()
        dict_keys(['ce'])
    """

    # Whether forward reads ``features``; only then are they checked against the points.
    uses_features: bool = False

    def __init__(self, points: Sequence[str], *, schedule: Schedule = "constant", ignore_index: int = -100) -> None:
        super().__init__()
        self.points: tuple[str, ...] = _check_points(points)
        if schedule not in get_args(Schedule):
            raise InstrumentError(f"unknown schedule {schedule!r}; expected one of {list(get_args(Schedule))}")
        self.schedule: Schedule = schedule
        self.ignore_index = _check_int("ignore_index", ignore_index)

    def forward(
        self,
        output: Tensor,
        heads: Mapping[str, Tensor],
        features: Mapping[str, Tensor],
        target: Tensor,
        *,
        progress: float | None = None,
    ) -> LossResult:
        """Compute the objective for one batch.

        Args:
            output: model logits, (B, K) or (B, K, H, W).
            heads: point name -> adapter logits, the same shape as ``output``.
            features: point name -> raw feature z_m (only read by objectives with
                ``uses_features``; others ignore it).
            target: integer labels, (B,) or (B, H, W).
            progress: fraction of training done, in [0, 1]; required unless the
                schedule is ``"constant"``.

        Returns:
            A ``LossResult``: the weighted total and the unweighted, detached parts.

        Raises:
            InstrumentError: a missing or extra head/feature, a shape that does not
                fit the labels, a label value outside 0..K-1, or a bad progress.
        """
        factor = schedule_weight(self.schedule, progress)
        self._check_inputs(output, heads, features, target)
        ce = _cross_entropy(output, target, self.ignore_index)
        total = ce
        parts = {"ce": ce.detach()}
        for name, weight, term in self._terms(output, heads, features, target):
            total = total + (factor * weight) * term
            parts[name] = term.detach()
        return LossResult(total, parts)

    @abc.abstractmethod
    def _terms(
        self, output: Tensor, heads: Mapping[str, Tensor], features: Mapping[str, Tensor], target: Tensor
    ) -> list[tuple[str, float, Tensor]]:
        """(part name, weight before the schedule, unweighted term) for every auxiliary term."""

    def _check_inputs(
        self, output: Tensor, heads: Mapping[str, Tensor], features: Mapping[str, Tensor], target: Tensor
    ) -> None:
        _check_logits_and_target(output, target, what="output")
        _check_names("head", heads, self.points)
        for name in self.points:
            head = heads[name]
            if head.shape != output.shape:
                raise InstrumentError(
                    f"head of point {name!r} has shape {tuple(head.shape)}; expected {tuple(output.shape)}, the "
                    f"output's shape, since labels have shape {tuple(target.shape)} "
                    "(dense adapters need out_size = the label resolution)"
                )
        if self.uses_features:
            _check_names("feature", features, self.points)
        _check_label_values(target, output.shape[1], self.ignore_index, what="output")

    def extra_repr(self) -> str:
        return f"points={list(self.points)}, schedule={self.schedule!r}, ignore_index={self.ignore_index}"


class IMacHSR(Objective):
    """iMacHSR, Eq. 3: CE(output) + sum over points m of alpha_m * MI_m + lambda_m * NE_m.

    MI_m = ``MutualInformationLoss`` of head m (in [-log K, 0]) and NE_m =
    ``NegativeEntropyLoss`` of feature m (in [-log C_m, 0]); parts hold them
    unweighted as ``"mi/<point>"`` and ``"ne/<point>"``.

    Defaults (METHOD.md gives per-point weights but no values, so these are ours):
    alpha = 0.5 keeps the intermediate signal at half the scale of the output CE,
    which it is comparable to (both are O(log K) nats), so the output stays the
    main objective; lambda = 0.01 because NE is a regularizer, and its magnitude
    grows with log C (about 6 nats at 512 channels): a large weight would push
    hidden features towards uniform channels and fight the task.

    Args:
        points: supervised point names.
        layouts: point name -> layout of its feature (for NE's channel dim).
        alpha: MI weight, one value or one per point.
        lam: NE weight, one value or one per point.
        schedule: how alpha and lambda change over training.
        ignore_index: label value excluded from CE and MI.
        eps: floor inside the MI logs.
        ne_positions: positions per example above which NE is estimated on a random
            strided grid (``NegativeEntropyLoss.max_positions``); ``None`` for the exact mean.

    Example:
        >>> import torch
        >>> objective = IMacHSR(["s1"], {"s1": "NCHW"})
        >>> result = objective(torch.zeros(2, 3), {"s1": torch.zeros(2, 3)},
        ...                    {"s1": torch.zeros(2, 4, 5, 5)}, torch.tensor([0, 2]))
        >>> sorted(result.parts)
        ['ce', 'mi/s1', 'ne/s1']
    """

    uses_features = True

    def __init__(
        self,
        points: Sequence[str],
        layouts: Mapping[str, str],
        alpha: float | Mapping[str, float] = 0.5,
        lam: float | Mapping[str, float] = 0.01,
        schedule: Schedule = "constant",
        ignore_index: int = -100,
        eps: float = 1e-8,
        ne_positions: int | None = NE_MAX_POSITIONS,
    ) -> None:
        super().__init__(points, schedule=schedule, ignore_index=ignore_index)
        self.ne_positions = _check_max_positions(ne_positions)
        _check_names("layout", layouts, self.points)
        self.layouts: dict[str, str] = {name: layouts[name] for name in self.points}
        self._channel_dims = {name: channel_dim_for(layout) for name, layout in self.layouts.items()}
        self.alpha = _per_point("alpha", alpha, self.points)
        self.lam = _per_point("lam", lam, self.points)
        self.eps = _check_positive_float("eps", eps)

    def _check_inputs(
        self, output: Tensor, heads: Mapping[str, Tensor], features: Mapping[str, Tensor], target: Tensor
    ) -> None:
        super()._check_inputs(output, heads, features, target)
        for name, layout in self.layouts.items():
            # A layout names one letter per dimension, so its length is the feature's rank.
            if features[name].dim() != len(layout):
                raise InstrumentError(
                    f"feature of point {name!r} has shape {tuple(features[name].shape)}; "
                    f"expected a {len(layout)}-D tensor for layout {layout!r}"
                )

    def _terms(
        self, output: Tensor, heads: Mapping[str, Tensor], features: Mapping[str, Tensor], target: Tensor
    ) -> list[tuple[str, float, Tensor]]:
        terms: list[tuple[str, float, Tensor]] = []
        for name in self.points:
            mi = -_mutual_information(heads[name], target, self.ignore_index, self.eps)
            terms.append((f"mi/{name}", self.alpha[name], mi))
            ne = _negative_entropy(features[name], self._channel_dims[name], self.ne_positions)
            terms.append((f"ne/{name}", self.lam[name], ne))
        return terms

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}, lam={self.lam}, ne_positions={self.ne_positions}"


class DSN(Objective):
    """Deeply-Supervised Nets: CE(output) + sum over points m of alpha_m * CE(head_m).

    Parts hold each point's CE unweighted as ``"dsn/<point>"``. The default
    alpha = 0.3 is in the range auxiliary-CE segmentation heads use (PSPNet
    uses 0.4): large enough to move early layers, small enough that the output
    loss dominates.

    Args:
        points: supervised point names.
        alpha: auxiliary CE weight, one value or one per point.
        schedule: how alpha changes over training.
        ignore_index: label value excluded from every CE.

    Example:
        >>> import torch
        >>> objective = DSN(["s1"])
        >>> result = objective(torch.zeros(2, 3), {"s1": torch.zeros(2, 3)}, {}, torch.tensor([0, 2]))
        >>> round(result.total.item(), 4)  # (1 + 0.3) * log 3
        1.4282
    """

    def __init__(
        self,
        points: Sequence[str],
        alpha: float | Mapping[str, float] = 0.3,
        schedule: Schedule = "constant",
        ignore_index: int = -100,
    ) -> None:
        super().__init__(points, schedule=schedule, ignore_index=ignore_index)
        self.alpha = _per_point("alpha", alpha, self.points)

    def _terms(
        self, output: Tensor, heads: Mapping[str, Tensor], features: Mapping[str, Tensor], target: Tensor
    ) -> list[tuple[str, float, Tensor]]:
        return [
            (f"dsn/{name}", self.alpha[name], _cross_entropy(heads[name], target, self.ignore_index))
            for name in self.points
        ]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"


class DKS(DSN):
    """DKS: DSN plus the synergy loss, CE + sum_m alpha_m * CE_m + beta * synergy.

    The synergy (``DKSLoss``) runs over the model output and every head; parts
    add ``"dks"`` (unweighted) to DSN's. With no points there is no pair, so the
    synergy is left out. Defaults weight every branch and the synergy equally
    with the output, as DKS trains all its classifiers as peers.

    Args:
        points: supervised point names.
        alpha: auxiliary CE weight, one value or one per point.
        beta: synergy weight.
        temperature: softmax temperature of the synergy.
        schedule: how alpha and beta change over training.
        ignore_index: label value excluded from CE and synergy.

    Example:
        >>> import torch
        >>> objective = DKS(["s1"])
        >>> result = objective(torch.zeros(2, 3), {"s1": torch.zeros(2, 3)}, {}, torch.tensor([0, 2]))
        >>> sorted(result.parts)
        ['ce', 'dks', 'dsn/s1']
    """

    def __init__(
        self,
        points: Sequence[str],
        alpha: float | Mapping[str, float] = 1.0,
        beta: float = 1.0,
        temperature: float = 1.0,
        schedule: Schedule = "constant",
        ignore_index: int = -100,
    ) -> None:
        super().__init__(points, alpha=alpha, schedule=schedule, ignore_index=ignore_index)
        self.beta = _check_weight("beta", beta)
        self.temperature = _check_positive_float("temperature", temperature)

    def _terms(
        self, output: Tensor, heads: Mapping[str, Tensor], features: Mapping[str, Tensor], target: Tensor
    ) -> list[tuple[str, float, Tensor]]:
        terms = super()._terms(output, heads, features, target)
        if self.points:
            branches = [output, *(heads[name] for name in self.points)]
            synergy = _synergy(branches, self.temperature, target != self.ignore_index)
            terms.append(("dks", self.beta, synergy))
        return terms

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, temperature={self.temperature}"


def make_objective(
    name: ObjectiveName,
    points: Sequence[str],
    layouts: Mapping[str, str] | None = None,
    *,
    alpha: float | Mapping[str, float] | None = None,
    lam: float | Mapping[str, float] | None = None,
    beta: float | None = None,
    temperature: float | None = None,
    schedule: Schedule = "constant",
    ignore_index: int = -100,
) -> Objective:
    """Build an objective by name, for configs and the CLI.

    Options left at ``None`` take the class default. An option the chosen
    objective does not have (``lam`` for ``dsn``, ``beta`` for ``imachsr``)
    is an error rather than silently ignored.

    Args:
        name: ``"imachsr"``, ``"dsn"`` or ``"dks"``.
        points: supervised point names.
        layouts: point name -> feature layout; required by ``imachsr`` only.
        alpha: intermediate weight (MI for imachsr, CE for dsn/dks).
        lam: NE weight (imachsr).
        beta: synergy weight (dks).
        temperature: synergy temperature (dks).
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        ignore_index: label value excluded from every term.

    Returns:
        An ``IMacHSR``, ``DSN`` or ``DKS``.

    Example:
        >>> make_objective("dsn", ["layer1", "layer3"], alpha=0.4)
        DSN(points=['layer1', 'layer3'], schedule='constant', ignore_index=-100, alpha={'layer1': 0.4, 'layer3': 0.4})
    """
    options = {"layouts": layouts, "alpha": alpha, "lam": lam, "beta": beta, "temperature": temperature}
    given = {key for key, option in options.items() if option is not None}
    if name not in _OBJECTIVE_OPTIONS:
        raise InstrumentError(f"unknown objective {name!r}; expected one of {list(get_args(ObjectiveName))}")
    foreign = sorted(given - _OBJECTIVE_OPTIONS[name])
    if foreign:
        raise InstrumentError(
            f"objective {name!r} does not take {foreign}; it takes {sorted(_OBJECTIVE_OPTIONS[name])}"
        )
    # Pass only what was given, so the class defaults stay defined in one place.
    weights = {key: option for key, option in (("alpha", alpha), ("lam", lam)) if option is not None}
    synergy = {key: option for key, option in (("beta", beta), ("temperature", temperature)) if option is not None}
    if name == "imachsr":
        if layouts is None:
            raise InstrumentError("objective 'imachsr' needs layouts: point name -> feature layout, for NE")
        return IMacHSR(points, layouts, schedule=schedule, ignore_index=ignore_index, **weights)
    if name == "dsn":
        return DSN(points, schedule=schedule, ignore_index=ignore_index, **weights)
    return DKS(points, schedule=schedule, ignore_index=ignore_index, **weights, **synergy)


def channel_dim_for(layout: str) -> int:
    """The channel dimension of a feature: 1 for NC/NCL/NCHW/NCDHW, -1 for NLC/NHWC.

    Args:
        layout: a layout string as in ``LayerInfo.layout``.

    Returns:
        The dim to softmax over in ``NegativeEntropyLoss``.

    Example:
        >>> channel_dim_for("NHWC")
        -1
    """
    if layout not in _CHANNEL_DIMS:
        raise InstrumentError(f"unknown feature layout {layout!r}; expected one of {list(_CHANNEL_DIMS)}")
    return _CHANNEL_DIMS[layout]


def schedule_weight(schedule: Schedule, progress: float | None) -> float:
    """The factor applied to every intermediate weight at ``progress``.

    constant: 1;  linear: 1 - progress;  cosine: (1 + cos(pi * progress)) / 2.
    Decaying schedules let deep supervision shape early training and then hand
    the network over to the output loss alone.

    Args:
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        progress: fraction of training done in [0, 1]; may be ``None`` for ``"constant"``.

    Returns:
        A factor in [0, 1].

    Example:
        >>> schedule_weight("linear", 0.25)
        0.75
    """
    if schedule not in get_args(Schedule):
        raise InstrumentError(f"unknown schedule {schedule!r}; expected one of {list(get_args(Schedule))}")
    if progress is None:
        if schedule != "constant":
            raise InstrumentError(f"schedule {schedule!r} needs progress=<fraction of training done, 0..1>")
        return 1.0
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise InstrumentError(f"progress must be a number in [0, 1]; got {progress!r}")
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


# --------------------------------------------------------------------------- math


def _full_precision(t: Tensor) -> torch.autocast:
    # Autocast would run bmm/matmul in half precision even on float32 inputs.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _cross_entropy(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    valid = target != ignore_index
    safe = torch.where(valid, target, 0).long()
    with _full_precision(logits):
        log_probs = F.log_softmax(logits.float(), dim=1)
        picked = log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
        return -(picked * valid).sum() / valid.sum().clamp_min(1)


def _mutual_information(logits: Tensor, target: Tensor, ignore_index: int, eps: float) -> Tensor:
    num_classes = logits.shape[1]
    with _full_precision(logits):
        probs = F.softmax(logits.float(), dim=1)
        if logits.dim() == 2:  # one group: the batch
            probs, labels = probs.t().unsqueeze(0), target.unsqueeze(0)
        else:  # one group per image: its pixels
            probs, labels = probs.flatten(2), target.flatten(1)
        valid = labels != ignore_index
        onehot = F.one_hot(torch.where(valid, labels, 0).long(), num_classes).float() * valid.unsqueeze(-1)
        counts = valid.sum(dim=1)
        joint = torch.bmm(probs, onehot) / counts.clamp_min(1).view(-1, 1, 1)  # (groups, K pred, K label)
        log_joint = joint.clamp_min(eps).log()
        log_pred = joint.sum(dim=2, keepdim=True).clamp_min(eps).log()
        log_label = joint.sum(dim=1, keepdim=True).clamp_min(eps).log()
        mi = (joint * (log_joint - log_pred - log_label)).sum(dim=(1, 2))
        # An image with no valid pixel carries no estimate; leave it out of the mean.
        present = (counts > 0).float()
        return (mi * present).sum() / present.sum().clamp_min(1)


def _negative_entropy(z: Tensor, channel_dim: int, max_positions: int | None) -> Tensor:
    with _full_precision(z):
        return _NegativeEntropy.apply(_position_grid(z, channel_dim, max_positions), channel_dim)


def _position_grid(z: Tensor, channel_dim: int, max_positions: int | None) -> Tensor:
    """A view of ``z`` on a strided grid of about ``max_positions`` positions, at a random offset."""
    channel = channel_dim % z.dim()
    spatial = [d for d in range(1, z.dim()) if d != channel]
    positions = math.prod(z.shape[d] for d in spatial)
    if max_positions is None or positions <= max_positions:
        return z
    stride = math.ceil((positions / max_positions) ** (1 / len(spatial)))
    index: list[slice] = [slice(None)] * z.dim()
    for d in spatial:
        step = min(stride, z.shape[d])
        index[d] = slice(int(torch.randint(step, ())), None, step)
    return z[tuple(index)]


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


class _NegativeEntropy(torch.autograd.Function):
    """Mean over positions of sum_c p_c log p_c, p = softmax(z) over ``dim``; saves only z.

    Autograd through log_softmax, exp, mul and sum would keep two feature-sized float32
    tensors per point alive until backward and run their backward ops one by one. With
    n_pos positions and NE(pos) = sum_j p_j log p_j, the gradient is

        d mean / d z_c = p_c * (log p_c - NE(pos)) / n_pos

    so backward recomputes log p from z (alive anyway: the backbone's next layer saved it)
    and forms the gradient in place, in one buffer.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, dim: int) -> Tensor:
        log_probs = F.log_softmax(_at_least_float32(z), dim=dim)
        per_position = (log_probs.exp() * log_probs).sum(dim=dim, keepdim=True)
        ctx.save_for_backward(z, per_position)
        ctx.dim = dim
        return per_position.mean()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        z, per_position = ctx.saved_tensors
        log_probs = F.log_softmax(_at_least_float32(z), dim=ctx.dim)
        probs = log_probs.exp()
        grad = log_probs.sub_(per_position).mul_(probs).mul_(grad_output / per_position.numel())
        return grad.to(z.dtype), None


def _synergy(branches: Sequence[Tensor], temperature: float, valid: Tensor | None) -> Tensor:
    with _full_precision(branches[0]):
        log_probs = [F.log_softmax(b.float() / temperature, dim=1) for b in branches]
        targets = [lp.detach() for lp in log_probs]
        total = log_probs[0].new_zeros(())
        for a, log_q_a in enumerate(log_probs):
            for b, log_q_b in enumerate(targets):
                if a != b:
                    kl = (log_q_b.exp() * (log_q_b - log_q_a)).sum(dim=1)
                    total = total + _masked_mean(kl, valid)
        pairs = len(branches) * (len(branches) - 1)
        return total * (temperature**2 / pairs)


def _masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return values.mean()
    return (values * valid).sum() / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------- validation


def _check_logits_and_target(logits: Tensor, target: Tensor, *, what: str) -> None:
    if logits.dim() not in (2, 4):
        raise InstrumentError(f"{what} has shape {tuple(logits.shape)}; expected (B, K) or (B, K, H, W) logits")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise InstrumentError(f"labels must be integer class ids; got dtype {target.dtype}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        task = "classification" if logits.dim() == 2 else "dense"
        raise InstrumentError(
            f"labels of shape {tuple(target.shape)} do not fit {what} of shape {tuple(logits.shape)}; "
            f"{task} needs labels of shape {expected}"
        )


def _check_label_values(target: Tensor, num_classes: int, ignore_index: int, *, what: str) -> None:
    # Needs a host sync and would break a compiled graph, so only eager mode checks.
    if torch.compiler.is_compiling():
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise InstrumentError(
            f"label value {value} does not fit {what} with K={num_classes} classes; "
            f"labels must be in 0..{num_classes - 1} or ignore_index={ignore_index}"
        )


def _check_names(kind: str, given: Mapping[str, object], points: tuple[str, ...]) -> None:
    missing = [p for p in points if p not in given]
    extra = sorted(set(given) - set(points))
    if missing or extra:
        raise InstrumentError(
            f"{kind}s do not match the declared points {list(points)}: missing {missing}, unexpected {extra}"
        )


def _check_points(points: Sequence[str]) -> tuple[str, ...]:
    if isinstance(points, str) or any(not isinstance(p, str) for p in points):
        raise InstrumentError(f"points must be a sequence of point names (str); got {points!r}")
    duplicates = sorted(p for p, n in Counter(points).items() if n > 1)
    if duplicates:
        raise InstrumentError(f"points must be unique; repeated: {duplicates}")
    return tuple(points)


def _per_point(name: str, value: float | Mapping[str, float], points: Sequence[str]) -> dict[str, float]:
    if isinstance(value, Mapping):
        _check_names(f"{name} weight", value, tuple(points))
        weights = {p: value[p] for p in points}
    else:
        weights = dict.fromkeys(points, value)
    return {point: _check_weight(f"{name} for {point!r}", weight) for point, weight in weights.items()}


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InstrumentError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def _check_positive_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InstrumentError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def _check_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InstrumentError(f"{name} must be an int; got {value!r}")
    return value


def _check_max_positions(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InstrumentError(f"max_positions must be a positive int or None (exact); got {value!r}")
    return value
