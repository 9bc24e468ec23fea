"""The loss kernels, on logits and ``MatchedTarget``s at the same resolution.

All run in float32 (float64 kept) with autocast off: logs of softmaxes and the MI joint
tables lose too much in fp16/bf16, and they cost little next to the network. No
scatter-add or NLLLoss kernels (their CUDA versions use atomics): cross entropy is a
gather of log-softmax, the MI joint a batched matmul.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .targets import MatchedTarget, RegressionLoss, TargetKind

# Floor of a weight sum: a group whose weights are all 0 has a zero numerator too.
_TINY = 1e-12

# How the MI of a label head is estimated (IMacHSR's ``mi_estimator``):
#   image:    one joint table per image over its positions (the paper's image-wise MI); for
#             classification one table over the batch. Invariant to relabelling the classes
#             within an image, so it rewards separating regions, not naming them.
#   pooled:   one table over every valid position of the batch: naming a class differently in
#             two images lowers it. Same as ``image`` for classification.
#   shuffled: the ``image`` table minus the same estimate with the labels moved to another
#             group (another image; for a single group, half the group away): what a prediction
#             unrelated to the labels would score, so the plug-in's upward bias (1.0 nat for
#             confident predictions at 32 samples x 10 classes, examples/mi_estimators.py) is
#             subtracted and a spurious association is not rewarded. May be negative; it also
#             underestimates an informative head's MI (0.52 for a true 1.03 at that size).
#   region:   Region Mutual Information (RMI; Zhao, Wang, Huang, Li, NeurIPS 2019): per image and
#             class, 1/2 log det of the conditional covariance of the 3x3 label regions given the
#             probability regions (``region_mutual_information``), a lower bound's loss, not nats.
#             Dense 2-D multiclass heads only; class-aligned and region-aware.
MIEstimator = Literal["image", "pooled", "shuffled", "region"]
# The plug-in estimators of an MI in nats, which take any head (examples/mi_estimators.py tabulates
# them side by side); RMI's bound is neither in nats nor defined on vectors, so it is listed apart.
MI_ESTIMATORS: tuple[str, ...] = ("image", "pooled", "shuffled")
# Every value ``mi_estimator`` takes.
MI_ESTIMATOR_CHOICES: tuple[str, ...] = (*MI_ESTIMATORS, "region")

# RMI's constants, as the reference (ZJULearning/RMI, losses/rmi/rmi.py) sets them: its training
# scripts pool with avg-pool (rmi_pool_way=1), kernel = stride = 3, padding 1, then take 3x3 regions.
RMI_POOL = 3
RMI_RADIUS = 3
RMI_POS_ALPHA = 5e-4  # times I, added to Cov(P) before inverting and to M before the Cholesky
_RMI_CLIP_MIN = 1e-6  # floor of the (masked) probabilities
_RMI_LOG_FLOOR = 1e-8  # inside the log of the Cholesky diagonal
# Fewer regions than the region's dimension (9) make every 9x9 covariance singular: the bound then
# measures the stabilizer, not the head. A head's pooled grid must give at least this many.
RMI_MIN_REGIONS = RMI_RADIUS * RMI_RADIUS


def full_precision(t: Tensor) -> torch.autocast:
    # Autocast would run bmm/matmul in half precision even on float32 inputs.
    return torch.autocast(device_type=t.device.type, enabled=False)


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(_TINY)


# --------------------------------------------------------------------------- homogeneous (the output's loss)


class CrossEntropyOptions(NamedTuple):
    """How the multiclass cross entropy weighs its terms (the objectives' ``label_smoothing`` and ``class_weights``).

    Attributes:
        label_smoothing: epsilon in [0, 1): the target becomes (1 - epsilon) * target + epsilon / K.
        class_weights: (K,) float weights w_k, or ``None`` for all ones.
    """

    label_smoothing: float = 0.0
    class_weights: Tensor | None = None


_PLAIN_CE = CrossEntropyOptions()


def homogeneous(
    kind: TargetKind,
    logits: Tensor,
    target: MatchedTarget,
    regression_loss: RegressionLoss,
    ce: CrossEntropyOptions = _PLAIN_CE,
) -> Tensor:
    """The output's loss for ``kind``: CE, BCE-with-logits, or MSE / L1."""
    if kind == "multiclass":
        return cross_entropy(logits, target, ce)
    if kind == "regression":
        return regression_error(logits, target, regression_loss)
    return binary_cross_entropy(logits, target)


def cross_entropy(logits: Tensor, target: MatchedTarget, options: CrossEntropyOptions = _PLAIN_CE) -> Tensor:
    """-sum_n sum_k w_k t_nk log p_nk / sum_n sum_k w_k t_nk, t smoothed as ``options`` says.

    Class ids are t = one-hot (a gather, not a product); soft targets t are used as they
    are. The denominator is the weight of the *unsmoothed* targets, so class ids and their
    one-hot floats give bit-identical losses, and class ids match
    ``F.cross_entropy(weight=, label_smoothing=, ignore_index=)``.
    """
    weight = cast(Tensor, target.weight)  # label targets always carry a weight
    with full_precision(logits):
        log_probs = F.log_softmax(_at_least_float32(logits), dim=1)
        class_weights = options.class_weights
        if class_weights is not None:
            class_weights = class_weights.to(log_probs.dtype)
        if target.values.is_floating_point():  # soft targets: each row sums to its position's weight
            soft = target.values.to(log_probs.dtype)
            if class_weights is not None:
                soft = soft * _along_classes(class_weights, soft.dim())
            per_position = (soft * log_probs).sum(dim=1)
            denominator = soft.sum(dim=1)
        else:
            picked = log_probs.gather(1, target.values.unsqueeze(1)).squeeze(1)
            denominator = weight if class_weights is None else weight * class_weights[target.values]
            per_position = picked * denominator
        if options.label_smoothing:
            uniform = log_probs if class_weights is None else log_probs * _along_classes(class_weights, log_probs.dim())
            epsilon = options.label_smoothing
            per_position = (1 - epsilon) * per_position + (epsilon / logits.shape[1]) * weight * uniform.sum(dim=1)
        return -(per_position.sum() / denominator.sum().clamp_min(_TINY))


def _along_classes(values: Tensor, rank: int) -> Tensor:
    """A (K,) vector shaped to broadcast along dim 1 of a rank-``rank`` tensor."""
    return values.view(1, -1, *([1] * (rank - 2)))


def binary_cross_entropy(logits: Tensor, target: MatchedTarget) -> Tensor:
    with full_precision(logits):
        x = _at_least_float32(logits)
        per_element = F.binary_cross_entropy_with_logits(x, target.values.to(x.dtype), reduction="none")
        return weighted_mean(per_element, target.weight)


def regression_error(logits: Tensor, target: MatchedTarget, loss: RegressionLoss) -> Tensor:
    with full_precision(logits):
        diff = _at_least_float32(logits) - target.values
        return (diff.square() if loss == "mse" else diff.abs()).mean()


# --------------------------------------------------------------------------- heterogeneous (iMacHSR's term)


def heterogeneous(
    kind: TargetKind,
    logits: Tensor,
    target: MatchedTarget,
    eps: float,
    estimator: MIEstimator = "image",
    gather: bool = False,
) -> Tensor:
    """iMacHSR's intermediate loss for ``kind``: -MI for labels, 1 - Pearson r for regression.

    ``estimator`` (``MIEstimator``) applies to multiclass labels (``"region"``: RMI's loss,
    ``region_mutual_information``, on (B, K, H, W) logits); the Bernoulli MI of binary
    and multi-label targets and the correlation keep their own grouping. ``gather`` sums the
    joint tables of groups that span the batch (classification, ``"pooled"``) over the ranks
    of the default process group; per-image groups need nothing from other ranks.
    """
    if kind == "multiclass":
        if estimator == "region":
            return region_mutual_information(logits, target)
        return -mutual_information(logits, target, eps, estimator, gather)
    if kind == "regression":
        return correlation_loss(logits, target, eps)
    return -bernoulli_mutual_information(logits, target, eps, gather)


def mutual_information(
    logits: Tensor, target: MatchedTarget, eps: float, estimator: MIEstimator = "image", gather: bool = False
) -> Tensor:
    num_classes = logits.shape[1]
    weight = cast(Tensor, target.weight)  # label targets always carry a weight
    # Soft targets enter the joint as they are, class last like a one-hot: (B, *S, K).
    labels = target.values.movedim(1, -1) if target.values.is_floating_point() else target.values
    soft = labels.dim() == logits.dim()
    with full_precision(logits):
        probs = F.softmax(_at_least_float32(logits), dim=1)
        if logits.dim() == 2:  # one group: the batch
            probs, labels, weight = probs.t().unsqueeze(0), labels.unsqueeze(0), weight.unsqueeze(0)
        elif estimator == "pooled":  # one group: every position of the batch
            probs = probs.transpose(0, 1).flatten(1).unsqueeze(0)
            labels = (labels.flatten(0, -2) if soft else labels.flatten()).unsqueeze(0)
            weight = weight.flatten().unsqueeze(0)
        else:  # one group per image: its positions
            probs, weight = probs.flatten(2), weight.flatten(1)
            labels = labels.flatten(1, -2) if soft else labels.flatten(1)
        gather = gather and (logits.dim() == 2 or estimator == "pooled")
        mi = _mi_of_groups(probs, _label_table(labels, weight, num_classes, probs.dtype), weight.sum(dim=1), eps,
                           gather)
        if estimator != "shuffled":
            return mi
        # Labels of another group (independent of these predictions), or half the group away.
        dim, shift = (0, 1) if labels.shape[0] > 1 else (1, labels.shape[1] // 2)
        labels, weight = labels.roll(shift, dim), weight.roll(shift, dim)
        chance = _mi_of_groups(probs, _label_table(labels, weight, num_classes, probs.dtype),
                               weight.sum(dim=1), eps, gather)
        return mi - chance


def region_count(size: Sequence[int]) -> int:
    """How many 3x3 regions RMI forms on a 2-D grid of ``size`` (H, W): (ceil(H/3) - 2) * (ceil(W/3) - 2), or 0.

    Example:
        >>> region_count((13, 13)), region_count((12, 12)), region_count((6, 64))
        (9, 4, 0)
    """
    pooled = [max(-(-int(s) // RMI_POOL) - (RMI_RADIUS - 1), 0) for s in size]  # avg-pool, padding 1: ceil(s / 3)
    return pooled[0] * pooled[1] if len(pooled) == 2 else 0


def region_mutual_information(logits: Tensor, target: MatchedTarget) -> Tensor:
    """RMI's loss: the mean over images and classes of 1/2 log det M / 9 (lower: more information).

    For logits (B, K, H, W) and a multiclass target at (H, W): y_c is the one-hot label (the
    soft target as given) and p_c = softmax(logits)_c, both zeroed at ignored positions (p then
    floored at 1e-6) and avg-pooled with kernel 3, stride 3, padding 1. Each pooled position
    whose 3x3 neighbourhood fits becomes a 9-vector; Y and P (9 x n) are those vectors centred
    over the n regions of one image and class, and, unnormalised as in the reference,

        M = Y Y^T - Y P^T (P P^T + a I)^-1 P Y^T,      loss = 1/2 log det(M + a I) / 9

    with a = 5e-4. The covariances, M and its Cholesky factor are float64: M is a difference of
    nearly equal sums over thousands of regions when P predicts Y. The reference sums the
    classes' values (K times this mean); the mean keeps the scale, and so ``alpha``, independent of K.
    """
    num_classes = logits.shape[1]
    weight = cast(Tensor, target.weight)  # label targets always carry a weight
    with full_precision(logits):
        probs = F.softmax(_at_least_float32(logits), dim=1)
        mask = weight.unsqueeze(1).to(probs.dtype)
        if target.values.is_floating_point():  # soft targets: rows already sum to the weight
            labels = target.values.to(probs.dtype)
        else:
            labels = F.one_hot(target.values, num_classes).movedim(-1, 1).to(probs.dtype) * mask
        probs = (probs * mask).clamp(_RMI_CLIP_MIN, 1.0)
        pool = {"kernel_size": RMI_POOL, "stride": RMI_POOL, "padding": RMI_POOL // 2}
        # Pooled first (1/9 of the positions), then float64: the cast costs little there.
        y = _region_vectors(F.avg_pool2d(labels, **pool).double())
        p = _region_vectors(F.avg_pool2d(probs, **pool).double())
        y = y - y.mean(dim=-1, keepdim=True)
        p = p - p.mean(dim=-1, keepdim=True)
        eye = torch.eye(y.shape[-2], dtype=y.dtype, device=y.device)
        cov_yp = y @ p.mT
        # (Cov(P) + a I)^-1 Cov(P, Y) by a solve, not an inverse; the _ex forms do not sync to check.
        solved, _ = torch.linalg.solve_ex(p @ p.mT + RMI_POS_ALPHA * eye, cov_yp.mT)
        conditional = y @ y.mT - cov_yp @ solved
        chol, _ = torch.linalg.cholesky_ex(conditional + RMI_POS_ALPHA * eye)
        # log det A = 2 sum log diag(chol A), so 1/2 log det is the sum of the logs.
        half_log_det = (chol.diagonal(dim1=-2, dim2=-1) + _RMI_LOG_FLOOR).log().sum(dim=-1)
        return (half_log_det / (RMI_RADIUS * RMI_RADIUS)).mean().to(probs.dtype)


def _region_vectors(maps: Tensor) -> Tensor:
    """(B, K, H, W) -> (B, K, 9, n): the 3x3 neighbourhood of each of the n positions where it fits."""
    rows, cols = maps.shape[-2] - (RMI_RADIUS - 1), maps.shape[-1] - (RMI_RADIUS - 1)
    shifted = [maps[..., dy : dy + rows, dx : dx + cols] for dy in range(RMI_RADIUS) for dx in range(RMI_RADIUS)]
    return torch.stack(shifted, dim=2).flatten(3)


def _label_table(labels: Tensor, weight: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """(G, N, K) label distributions, each row scaled by its weight: one-hot class ids, or soft targets as given."""
    if labels.is_floating_point():  # soft rows already sum to their weight
        return labels.to(dtype)
    return F.one_hot(labels, num_classes).to(dtype) * weight.unsqueeze(-1)


def bernoulli_mutual_information(logits: Tensor, target: MatchedTarget, eps: float, gather: bool = False) -> Tensor:
    weight = cast(Tensor, target.weight)  # label targets always carry a weight
    with full_precision(logits):
        x = _at_least_float32(logits)
        gather = gather and x.dim() == 2
        if x.dim() == 2:  # (B, K): one group per label, over the batch
            x, t, w = x.t(), target.values.t(), weight.t()
        else:  # (B, K, *S): one group per image and label, over its positions
            x, t, w = (v.flatten(2).flatten(0, 1) for v in (x, target.values, weight))
        # The two outcomes as a 2-class distribution; sigmoid(-x) avoids 1 - sigmoid(x) cancelling.
        probs = torch.stack([torch.sigmoid(-x), torch.sigmoid(x)], dim=1)  # (G, 2, N)
        labels = torch.stack([(1 - t) * w, t * w], dim=-1).to(probs.dtype)  # (G, N, 2)
        return _mi_of_groups(probs, labels, w.sum(dim=1), eps, gather)


def _mi_of_groups(probs: Tensor, labels: Tensor, counts: Tensor, eps: float, gather: bool = False) -> Tensor:
    """Mean over groups with weight of I(pred; label) from probs (G, Kp, N) and weighted labels (G, N, Kl).

    With ``gather`` the unnormalised tables and counts are summed over the ranks first, so
    every rank gets the MI of the combined batch. The sum's backward sums the (equal)
    gradients of all ranks, world_size times one rank's share; DDP then averages the
    parameter gradients over the ranks, which gives the combined batch's gradient.
    """
    joint = torch.bmm(probs, labels)
    if gather:
        joint, counts = _sum_over_ranks(joint), _sum_over_ranks(counts)
    joint = joint / counts.clamp_min(_TINY).view(-1, 1, 1)
    log_joint = joint.clamp_min(eps).log()
    log_pred = joint.sum(dim=2, keepdim=True).clamp_min(eps).log()
    log_label = joint.sum(dim=1, keepdim=True).clamp_min(eps).log()
    mi = (joint * (log_joint - log_pred - log_label)).sum(dim=(1, 2))
    # A group with no valid position carries no estimate; leave it out of the mean.
    present = (counts > 0).to(mi.dtype)
    return (mi * present).sum() / present.sum().clamp_min(1)


def _sum_over_ranks(t: Tensor) -> Tensor:
    """``t`` summed over the default process group's ranks, differentiably; ``t`` itself on one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    if torch.distributed.get_world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_reduce  # imported late: it loads the distributed autograd ops

    return all_reduce(t)


def correlation_loss(logits: Tensor, target: MatchedTarget, eps: float) -> Tensor:
    with full_precision(logits):
        h = _at_least_float32(logits)
        y = target.values.to(h.dtype)
        if h.dim() == 2:  # (B, C): one group per channel, over the batch
            h, y = h.t(), y.t()
        else:  # (B, C, *S): one group per image and channel, over its positions
            h, y = h.flatten(2).flatten(0, 1), y.flatten(2).flatten(0, 1)
        h = h - h.mean(dim=1, keepdim=True)
        y = y - y.mean(dim=1, keepdim=True)
        var_h, var_y = h.square().mean(dim=1), y.square().mean(dim=1)
        r = (h * y).mean(dim=1) / torch.sqrt((var_h + eps) * (var_y + eps))
        # A constant target (an absent joint's heatmap, a flat region) has no correlation to learn.
        present = (var_y > eps).to(r.dtype)
        return ((1 - r) * present).sum() / present.sum().clamp_min(1)


# --------------------------------------------------------------------------- DKS synergy


def synergy(kind: TargetKind, branches: Sequence[Tensor], temperature: float, weight: Tensor | None) -> Tensor:
    """T^2 * mean over ordered pairs (a, b), a != b, of the weighted mean KL(sg(q_b) || q_a)."""
    with full_precision(branches[0]):
        log_probs = [_log_distribution(kind, _at_least_float32(b) / temperature) for b in branches]
        targets = [lp.detach() for lp in log_probs]
        total = log_probs[0].new_zeros(())
        for a, log_q_a in enumerate(log_probs):
            for b, log_q_b in enumerate(targets):
                if a != b:
                    kl = (log_q_b.exp() * (log_q_b - log_q_a)).sum(dim=1)
                    total = total + weighted_mean(kl, weight)
        pairs = len(branches) * (len(branches) - 1)
        return total * (temperature**2 / pairs)


def _log_distribution(kind: TargetKind, x: Tensor) -> Tensor:
    # Categorical over dim 1 for multiclass; for 0/1 targets one Bernoulli per channel, its two
    # outcomes stacked at dim 1 so the KL's sum over dim 1 is the Bernoulli KL, (B, K, *S).
    if kind == "multiclass":
        return F.log_softmax(x, dim=1)
    return torch.stack([F.logsigmoid(-x), F.logsigmoid(x)], dim=1)


# --------------------------------------------------------------------------- negative entropy


def negative_entropy(z: Tensor, channel_dim: int, max_positions: int | None) -> Tensor:
    with full_precision(z):
        return _NegativeEntropy.apply(_position_grid(z, channel_dim, max_positions), channel_dim)


def _position_grid(z: Tensor, channel_dim: int, max_positions: int | None) -> Tensor:
    """A view of ``z`` on a strided grid of about ``max_positions`` positions, at a random offset."""
    channel = channel_dim % z.dim()
    spatial = [d for d in range(1, z.dim()) if d != channel]
    positions = 1
    for d in spatial:  # a loop, not math.prod over a generator: torch.compile traces it without a graph break
        positions *= z.shape[d]
    if max_positions is None or positions <= max_positions:
        return z
    stride = math.ceil((positions / max_positions) ** (1 / len(spatial)))
    for d in spatial:
        step = min(stride, z.shape[d])
        # offset + step * i, i < size // step: the same count at every offset, so the grid's shape
        # does not depend on the random draw (a compiled graph keeps static shapes and no host sync).
        offset = torch.randint(step, (), device=z.device)
        index = offset + step * torch.arange(z.shape[d] // step, device=z.device)
        z = z.index_select(d, index)
    return z


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
