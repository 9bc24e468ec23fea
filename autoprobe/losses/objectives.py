"""The objectives: the output loss plus weighted terms at the intermediate points.

Each objective checks its inputs and matches the target to every head once per batch, then
computes its terms with the modules of ``terms`` (``forward_matched``), which hold the one
implementation of each term.
"""

from __future__ import annotations

import abc
import math
import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from ..defaults import DEFAULT_HEAD, DEFAULT_OBJECTIVE, AdapterHead, ObjectiveName
from ..errors import InstrumentError
from ..legacy import moved_into
from ..layout import Layout
from . import _math
from ._checks import check_max_positions, check_names, check_output_options, check_points, check_positive_float
from ._checks import check_weight, per_point
from .targets import MatchedTarget, RegressionLoss, TargetKind, TargetMatcher, check_target, check_target_kind
from .targets import check_target_values, resize_logits
from .terms import NE_MAX_POSITIONS, CorrelationLoss, DKSLoss, MutualInformationLoss, NegativeEntropyLoss, OutputLoss
from .terms import check_dks_kind, check_gather, check_mi_estimator, check_region_head, check_region_options
from .terms import check_regression_loss
from .gate import Gate, GradientGate

__all__ = [
    "Schedule",
    "ObjectiveName",
    "DEFAULT_OBJECTIVE",
    "MIEstimator",
    "LossResult",
    "Objective",
    "IMacHSR",
    "DSN",
    "DKS",
    "schedule_weight",
    "LossOptions",
    "make_objective",
]

Schedule = Literal["constant", "linear", "cosine"]
MIEstimator = _math.MIEstimator


class LossResult(NamedTuple):
    """What an ``Objective`` returns.

    Attributes:
        total: the weighted sum to back-propagate (scalar, float32).
        parts: every term *unweighted* and detached, for logging: the output loss first
            (``"ce"`` for labels, BCE for binary / multi-label; ``"mse"`` or ``"l1"`` for
            regression), then per point ``"mi/<point>"`` (``"corr/<point>"`` for
            regression, ``"rmi/<point>"`` for ``mi_estimator="region"``), ``"ne/<point>"``, ``"dsn/<point>"``, and ``"dks"``; with a gate, also
            ``"gate/<point>"``, the weight in force at the point (see ``Objective``).
    """

    total: Tensor
    parts: dict[str, Tensor]


class _Branch(NamedTuple):
    """One head's logits and the target at the resolution it is compared at."""

    logits: Tensor
    target: MatchedTarget


class Objective(nn.Module, abc.ABC):
    """Base class: the output loss plus weighted auxiliary terms, one schedule.

    Subclasses list their auxiliary terms in ``_terms``; the output loss (an ``OutputLoss``,
    or the user's ``output_loss``), the checks, the resolution matching and the schedule
    live here, once.

    Resolution: the output logits are resized to the target's spatial size when they
    differ (bilinear / linear / trilinear by rank, ``align_corners=False``; the Hugging
    Face SegFormer convention). A head at the output's spatial size is treated like the
    output (resized to the target); a head at any other size is compared with the
    target resized to *its* size (nnU-Net / MONAI): nearest-exact for class ids (keeps
    ``ignore_index``), area for binary / multi-label / regression targets (see
    ``autoprobe.losses.targets``). So adapters at the output's resolution reproduce
    "logits upsampled to the mask", and adapters at their point's own resolution give
    "mask downsampled to each point".

    Args:
        points: the supervised point names, in order.
        schedule: how the intermediate weights change over training (``schedule_weight``).
        ignore_index: target value excluded from every term.
        target_kind: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        regression_loss: ``"mse"`` or ``"l1"``, the output loss for regression.
        label_smoothing: epsilon in [0, 1) of the multiclass cross entropy (output and DSN
            heads): the target becomes (1 - epsilon) * target + epsilon / K, as
            ``F.cross_entropy(label_smoothing=)``. The MI terms read the unsmoothed target.
        class_weights: K weights of the multiclass cross entropy (output and DSN heads), as
            ``F.cross_entropy(weight=)``: the mean divides by the summed weights of the targets.
            The MI terms are not weighted: reweighting the joint would change the label
            distribution whose information they measure.
        output_loss: a callable ``(logits, target) -> scalar`` replacing the output's loss
            (and DSN's at each head, called with the head's logits resized to the target);
            it gets the logits at the target's size and the user's target as passed. Its part
            is ``"output"``. A module-level function or an ``nn.Module`` pickles with the model.
        gate: ``None`` (every term at its weight), ``"cosine"``, ``"binary"`` or a ``Gate``: each
            point's terms scaled by how well their gradient agrees with the output loss's
            (``autoprobe.losses.gate``; Du et al. 2018). A term belongs to the point its part name
            ends with (``"dsn/<point>"``); DKS's synergy belongs to none and is never gated. The
            parts then hold ``"gate/<point>"``: the schedule factor times the weight of the
            point's first term (alpha) times the gate's multiplier, in [0, alpha].

    Soft class targets (multiclass, floats (B, K, *S) whose rows are distributions: timm's
    Mixup / CutMix, dense CutMix masks) are taken wherever class ids are: CE is
    -sum_k t_k log p_k, the MI joint sums p_n t_n^T in place of p_n e_(y_n)^T (the expected
    one-hot), and DSN heads compare with the area-resized target. Soft targets have no ignored positions.
    One-hot floats give exactly the loss of their class ids.

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

    def __init__(
        self, points: Sequence[str], *, schedule: Schedule = "constant", ignore_index: int = -100,
        target_kind: TargetKind = "multiclass", regression_loss: RegressionLoss = "mse", label_smoothing: float = 0.0,
        class_weights: Sequence[float] | Tensor | None = None,
        output_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        gate: Gate | str | None = None,
    ) -> None:
        super().__init__()
        self.points: tuple[str, ...] = check_points(points)
        parsed = Gate.parse(gate)
        # None keeps forward exactly as it was before the gate existed (no module, no extra op).
        self.gate: GradientGate | None = None if parsed is None else GradientGate(self.points, parsed)
        if schedule not in get_args(Schedule):
            raise InstrumentError(f"unknown schedule {schedule!r}; expected one of {list(get_args(Schedule))}")
        self.schedule: Schedule = schedule
        kind = check_target_kind(target_kind)
        # Checked here too, for the options that conflict with a custom output_loss.
        weights = check_output_options(kind, label_smoothing, class_weights, output_loss)
        self._output_term = OutputLoss(
            kind, ignore_index, regression_loss, label_smoothing=label_smoothing, class_weights=weights
        )
        self.ignore_index = self._output_term.ignore_index
        self.target_kind: TargetKind = kind
        self.regression_loss: RegressionLoss = self._output_term.regression_loss
        self.label_smoothing = self._output_term.label_smoothing
        self.output_loss = output_loss

    @property
    def class_weights(self) -> Tensor | None:
        """The (K,) class weights of the cross entropy, on the objective's device, or ``None``."""
        return self._output_term.class_weights

    @property
    def output_part(self) -> str:
        """The name of the output loss in ``LossResult.parts``: ``"ce"``, ``"mse"``, ``"l1"``, or ``"output"``."""
        if self.output_loss is not None:
            return "output"
        return self.regression_loss if self.target_kind == "regression" else "ce"

    def _homogeneous(self, branch: _Branch, matcher: TargetMatcher) -> Tensor:
        """The output's loss of one branch: the user's ``output_loss``, else CE / BCE / MSE / L1."""
        if self.output_loss is None:
            return self._output_term.forward_matched(branch.logits, branch.target)
        value = self.output_loss(resize_logits(branch.logits, matcher.size), matcher.original)
        if not torch.compiler.is_compiling() and not (isinstance(value, Tensor) and value.dim() == 0):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise InstrumentError(
                f"output_loss returned {shape}; it must return a scalar tensor. "
                "Hint: reduce it, e.g. `reduction='mean'` or `.mean()`."
            )
        return value

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
            output: model logits, (B, K) or (B, K, *S) with S of 1, 2 or 3 dims.
            heads: point name -> adapter logits, (B, K, *S_m): the output's batch and
                channels, any spatial size of the same rank.
            features: point name -> raw feature z_m (only read by objectives with
                ``uses_features``; others ignore it).
            target: of the objective's ``target_kind``, at any spatial size of the output's rank.
            progress: fraction of training done, in [0, 1]; required unless the
                schedule is ``"constant"``.

        Returns:
            A ``LossResult``: the weighted total and the unweighted, detached parts.

        Raises:
            InstrumentError: a missing or extra head/feature, a shape that does not
                fit the target, a target value that does not fit its kind, or a bad progress.
        """
        factor = schedule_weight(self.schedule, progress)
        self._check_inputs(output, heads, features, target)
        matcher = TargetMatcher(target, self.target_kind, rank=output.dim(), ignore_index=self.ignore_index)
        out = _Branch(resize_logits(output, matcher.size), matcher.at(matcher.size))
        main = self._homogeneous(out, matcher)
        total = main
        parts = {self.output_part: main.detach()}
        branches = {name: self._branch(heads[name], output, matcher) for name in self.points}
        terms = self._terms(out, branches, features, matcher)
        if self.gate is None:
            for name, weight, term in terms:
                total = total + (factor * weight) * term
                parts[name] = term.detach()
            return LossResult(total, parts)
        return self._gated(self.gate, main, terms, features, factor, parts)

    def _gated(
        self, gate: GradientGate, main: Tensor, terms: list[tuple[str, float, Tensor]],
        features: Mapping[str, Tensor], factor: float, parts: dict[str, Tensor],
    ) -> LossResult:
        """The total with each point's terms scaled by the gate's multiplier (see ``gate`` in the class)."""
        owner = [self._point_of(name) for name, _, _ in terms]
        first_weight: dict[str, float] = {}
        for point, (_, weight, _) in zip(owner, terms):
            if point is not None:
                first_weight.setdefault(point, weight)
        # Each point's weighted terms are summed only on a call that measures: they are the gate's input.
        per_point: dict[str, Tensor] = {}
        if gate.measures(main):
            for point, (_, weight, term) in zip(owner, terms):
                if point is not None:
                    per_point[point] = per_point[point] + weight * term if point in per_point else weight * term
        multipliers = dict(zip(self.points, gate(main, per_point, features).unbind()))
        total = main
        for point, (name, weight, term) in zip(owner, terms):
            scale = factor * weight
            total = total + (scale if point is None else scale * multipliers[point]) * term
            parts[name] = term.detach()
        for point, weight in first_weight.items():
            parts[f"gate/{point}"] = (factor * weight) * multipliers[point].detach()
        return LossResult(total, parts)

    def _point_of(self, part: str) -> str | None:
        """The point a term's part name ends with (``"mi/layer1"`` -> ``"layer1"``), or None (``"dks"``)."""
        _, _, point = part.partition("/")
        return point if point in self.points else None

    @staticmethod
    def _branch(head: Tensor, output: Tensor, matcher: TargetMatcher) -> _Branch:
        if head.shape[2:] == output.shape[2:]:
            head = resize_logits(head, matcher.size)
        return _Branch(head, matcher.at(tuple(head.shape[2:])))

    @abc.abstractmethod
    def _terms(
        self, output: _Branch, heads: Mapping[str, _Branch], features: Mapping[str, Tensor], matcher: TargetMatcher
    ) -> list[tuple[str, float, Tensor]]:
        """(part name, weight before the schedule, unweighted term) for every auxiliary term."""

    def _check_inputs(
        self, output: Tensor, heads: Mapping[str, Tensor], features: Mapping[str, Tensor], target: Tensor
    ) -> None:
        check_target(output, target, self.target_kind, what="output")
        check_names("head", heads, self.points)
        for name in self.points:
            head = heads[name]
            if head.dim() != output.dim() or head.shape[:2] != output.shape[:2]:
                spatial = ", *S" if output.dim() > 2 else ""
                raise InstrumentError(
                    f"head of point {name!r} has shape {tuple(head.shape)}; expected (B, K{spatial}) with "
                    f"B={output.shape[0]}, K={output.shape[1]} like the output {tuple(output.shape)}"
                    + (", at any spatial size of the same rank" if output.dim() > 2 else "")
                )
        if self.uses_features or self.gate is not None:
            check_names("feature", features, self.points)
        if self.class_weights is not None and self.class_weights.numel() != output.shape[1]:
            raise InstrumentError(
                f"class_weights has {self.class_weights.numel()} weights; the output has K={output.shape[1]} classes. "
                "Hint: pass one weight per class."
            )
        check_target_values(target, self.target_kind, output.shape[1], self.ignore_index, what="output")

    def extra_repr(self) -> str:
        kind = "" if self.target_kind == "multiclass" else f", target_kind={self.target_kind!r}"
        kind += self._output_term.options_repr()
        if self.output_loss is not None:
            kind += f", output_loss={getattr(self.output_loss, '__name__', type(self.output_loss).__name__)}"
        if self.gate is not None:
            kind += f", gate={self.gate.gate}"
        return f"points={list(self.points)}, schedule={self.schedule!r}, ignore_index={self.ignore_index}{kind}"

    def __repr__(self) -> str:
        # One line, as ``RewriteReport.objective`` records it: the term modules are built from
        # the options extra_repr lists, so listing them as children would repeat those options.
        return f"{self._get_name()}({self.extra_repr()})"


class IMacHSR(Objective):
    """iMacHSR, Eq. 3: L_out(output) + sum over points m of alpha_m * MI_m + lambda_m * NE_m.

    MI_m = ``MutualInformationLoss`` of head m (in [-log K, 0]; for binary and
    multi-label targets the MI over each label's two outcomes) and NE_m =
    ``NegativeEntropyLoss`` of feature m (in [-log C_m, 0]); parts hold them
    unweighted as ``"mi/<point>"`` and ``"ne/<point>"``. For regression targets the
    heterogeneous term is ``CorrelationLoss``, 1 - Pearson r per image and channel
    (in [0, 2]), as ``"corr/<point>"``, and the output loss is MSE or L1.

    Defaults (METHOD.md gives per-point weights but no values, so these are ours):
    alpha = 0.5 keeps the intermediate signal at half the scale of the output CE,
    which it is comparable to (both are O(log K) nats), so the output stays the
    main objective. lambda = 0: NE is off unless asked for (``lam=0.01`` was the
    default until 2026-12-06). On the validation splits of EVIDENCE.md (section 2),
    MI alone came out above alpha 0.5 with lambda 0.01 on both segmentation and
    classification, by a rule fixed before those runs finished; the differences are
    within their intervals, so this is the lighter setting, not a proven gain (on test it
    still scored below output-only training on all four models there). NE is
    computed only at points whose lambda is not 0, so the default costs nothing for it
    and its parts hold no ``"ne/<point>"``.

    Args:
        points: supervised point names.
        layouts: point name -> layout of its feature (``Layout`` or its name, for NE's channel dim).
        alpha: MI (or correlation) weight, one value or one per point.
        lam: NE weight, one value or one per point (0, the default: NE off at that point).
        schedule: how alpha and lambda change over training.
        ignore_index: target value excluded from the output loss and MI.
        eps: floor inside the MI logs (added to the variances for regression).
        ne_positions: positions per example above which NE is estimated on a random
            strided grid (``NegativeEntropyLoss.max_positions``); ``None`` for the exact mean.
        target_kind: the ``TargetKind``.
        regression_loss: ``"mse"`` or ``"l1"``, the output loss for regression.
        mi_estimator: how the MI of multiclass labels is estimated: ``"image"`` (the paper's
            image-wise MI; the batch for classification), ``"pooled"`` (one table over the
            batch's positions, so naming a class differently in two images costs), or
            ``"shuffled"`` (the image-wise MI minus its value with the labels of another
            image or sample: the plug-in estimate's upward bias removed). See
            ``examples/mi_estimators.py`` for both properties measured. ``"region"``: Region
            Mutual Information (RMI; Zhao et al. 2019) for 2-D dense multiclass outputs, logged
            as ``"rmi/<point>"`` (a bound's loss, not nats); see ``MutualInformationLoss``.
            Vector, 1-D/3-D and non-multiclass outputs are refused, and so is a head compared at
            a grid with fewer than 9 3x3 regions (``check_heads``): a refusal, not a skipped point,
            so every listed point is supervised.
        gather_mi: sum the MI joint tables over the ranks of the default process group
            before taking the MI, so each rank's MI is the combined batch's (classification,
            and ``mi_estimator="pooled"``; per-image tables need no other rank). For small
            per-GPU batches, where one rank's K x K table is too sparse to estimate. Under DDP
            the gradients then equal one process's on the combined batch. Off, or on one
            process, each rank estimates from its own batch.
        label_smoothing, class_weights, output_loss, gate: see ``Objective``.
        region_ce: with ``mi_estimator="region"``, the weight in [0, 1] of the CE half:
            the term is (1 - region_ce) * RMI + region_ce * CE; ``None`` for 0.5, the
            reference's 0.5 * CE + 0.5 * RMI (why: ``MutualInformationLoss``). Refused with
            another estimator.

    Example:
        >>> import torch
        >>> objective = IMacHSR(["s1"], {"s1": "NCHW"}, lam=0.01)
        >>> result = objective(torch.zeros(2, 3), {"s1": torch.zeros(2, 3)},
        ...                    {"s1": torch.zeros(2, 4, 5, 5)}, torch.tensor([0, 2]))
        >>> sorted(result.parts), sorted(IMacHSR(["s1"], {"s1": "NCHW"})(
        ...     torch.zeros(2, 3), {"s1": torch.zeros(2, 3)}, {}, torch.tensor([0, 2])).parts)
        (['ce', 'mi/s1', 'ne/s1'], ['ce', 'mi/s1'])
        >>> region = IMacHSR(["s1"], {"s1": "NCHW"}, mi_estimator="region", region_ce=0.3)
        >>> sorted(region(torch.zeros(2, 3, 16, 16), {"s1": torch.zeros(2, 3, 16, 16)}, {},
        ...               torch.randint(0, 3, (2, 16, 16))).parts)
        ['ce', 'rmi/s1']
    """

    def __init__(
        self,
        points: Sequence[str],
        layouts: Mapping[str, str | Layout],
        alpha: float | Mapping[str, float] = 0.5,
        lam: float | Mapping[str, float] = 0.0,
        schedule: Schedule = "constant",
        ignore_index: int = -100,
        eps: float = 1e-8,
        ne_positions: int | None = NE_MAX_POSITIONS,
        target_kind: TargetKind = "multiclass",
        regression_loss: RegressionLoss = "mse",
        mi_estimator: MIEstimator = "image",
        gather_mi: bool = False,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | Tensor | None = None,
        output_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        gate: Gate | str | None = None,
        region_ce: float | None = None,
    ) -> None:
        super().__init__(
            points, schedule=schedule, ignore_index=ignore_index, target_kind=target_kind,
            regression_loss=regression_loss, label_smoothing=label_smoothing, class_weights=class_weights,
            output_loss=output_loss, gate=gate,
        )
        # Checked here as well as in MutualInformationLoss: regression builds no MI term.
        self.gather_mi = check_gather("gather_mi", gather_mi)
        self.mi_estimator: MIEstimator = check_mi_estimator(mi_estimator)
        self.region_ce = check_region_options(self.mi_estimator, self.target_kind, region_ce)
        self.ne_positions = check_max_positions(ne_positions)
        check_names("layout", layouts, self.points)
        # A list in the points' order, not a ModuleDict: point names hold dots ("layer1.0").
        self._ne_terms = nn.ModuleList(
            NegativeEntropyLoss.for_layout(layouts[name], self.ne_positions) for name in self.points
        )
        self.layouts: dict[str, Layout] = {name: Layout.parse(layouts[name]) for name in self.points}
        self.alpha = per_point("alpha", alpha, self.points)
        self.lam = per_point("lam", lam, self.points)
        # NE runs where its weight is not 0: a point without it costs nothing and logs no "ne/" part.
        self._ne_points = frozenset(name for name in self.points if self.lam[name] != 0)
        self.uses_features = bool(self._ne_points)
        self.eps = check_positive_float("eps", eps)
        self._heterogeneous_term: MutualInformationLoss | CorrelationLoss
        if self.target_kind == "regression":
            self._heterogeneous_term = CorrelationLoss(self.eps)
        else:
            self._heterogeneous_term = MutualInformationLoss(
                self.eps, self.ignore_index, self.target_kind, estimator=self.mi_estimator, gather=self.gather_mi,
                region_ce=region_ce,
            )
        self._mi_part = "corr" if self.target_kind == "regression" else "rmi" if self.mi_estimator == "region" else "mi"

    def _check_inputs(
        self, output: Tensor, heads: Mapping[str, Tensor], features: Mapping[str, Tensor], target: Tensor
    ) -> None:
        super()._check_inputs(output, heads, features, target)
        for name, layout in self.layouts.items():
            if name in self._ne_points and features[name].dim() != layout.rank:
                raise InstrumentError(
                    f"feature of point {name!r} has shape {tuple(features[name].shape)}; "
                    f"expected a {layout.rank}-D tensor for layout {layout.value!r}"
                )
        if self.mi_estimator == "region":
            # The grid each head is compared at: a head at the output's size is resized to the target's.
            size = tuple(target.shape[-(output.dim() - 2):]) if output.dim() > 2 else ()
            self.check_heads({name: tuple(head.shape) for name, head in heads.items()}, tuple(output.shape), size)

    def check_heads(
        self, heads: Mapping[str, tuple[int, ...]], output_shape: tuple[int, ...], target_size: tuple[int, ...] = ()
    ) -> None:
        """Refuse heads ``mi_estimator="region"`` cannot be estimated on; nothing for the other estimators.

        ``instrument`` calls it with the adapters' shapes (no target yet), ``forward`` with the batch's.

        Args:
            heads: point name -> the head's logits shape.
            output_shape: the model output's shape: a head of its spatial size is compared at
                the target's size (``Objective``).
            target_size: the target's spatial size; ``()`` when not known yet, and then heads at
                the output's size are left to ``forward``.

        Raises:
            InstrumentError: naming the point and its grid (``terms.check_region_head``).

        Example:
            >>> objective = IMacHSR(["s1"], {"s1": "NCHW"}, mi_estimator="region")
            >>> objective.check_heads({"s1": (2, 3, 4, 4)}, (2, 3, 64, 64))
            Traceback (most recent call last):
            ...
            autoprobe.errors.InstrumentError: mi_estimator='region' (RMI) needs ... the head of point 's1' is compared at 4x4, which gives 0. ...
        """
        if self.mi_estimator != "region":
            return
        for name, shape in heads.items():
            compared = tuple(shape)
            if len(shape) > 2 and tuple(shape[2:]) == tuple(output_shape[2:]):
                if not target_size:
                    continue
                compared = (*shape[:2], *target_size)
            check_region_head(compared, f"head of point {name!r}")

    def _terms(
        self, output: _Branch, heads: Mapping[str, _Branch], features: Mapping[str, Tensor], matcher: TargetMatcher
    ) -> list[tuple[str, float, Tensor]]:
        terms: list[tuple[str, float, Tensor]] = []
        for name, negative_entropy in zip(self.points, self._ne_terms):
            head = heads[name]
            mi = self._heterogeneous_term.forward_matched(head.logits, head.target)
            terms.append((f"{self._mi_part}/{name}", self.alpha[name], mi))
            if name in self._ne_points:
                terms.append((f"ne/{name}", self.lam[name], negative_entropy(features[name])))
        return terms

    def extra_repr(self) -> str:
        estimator = "" if self.mi_estimator == "image" else f", mi_estimator={self.mi_estimator!r}"
        estimator += ", gather_mi=True" if self.gather_mi else ""
        estimator += f", region_ce={self.region_ce}" if self.mi_estimator == "region" else ""
        return f"{super().extra_repr()}, alpha={self.alpha}, lam={self.lam}, ne_positions={self.ne_positions}{estimator}"


class DSN(Objective):
    """Deeply-Supervised Nets: L_out(output) + sum over points m of alpha_m * L_out(head_m).

    L_out is the output's loss (CE; BCE for binary / multi-label; MSE or L1 for
    regression, FlowNet's and the stacked hourglass' per-scale loss), each head against
    the target at its resolution: the objective's ``OutputLoss`` (or ``output_loss``) at
    every head, as ``DSNLoss``. Parts hold each point's loss unweighted as
    ``"dsn/<point>"``. The default alpha = 0.3 is in the range auxiliary-CE
    segmentation heads use (PSPNet uses 0.4): large enough to move early layers, small
    enough that the output loss dominates.

    Args:
        points: supervised point names.
        alpha: auxiliary loss weight, one value or one per point.
        schedule: how alpha changes over training.
        ignore_index: target value excluded from every loss.
        target_kind: the ``TargetKind``.
        regression_loss: ``"mse"`` or ``"l1"``, for regression.
        label_smoothing, class_weights, output_loss: see ``Objective``; they apply at every head.
        gate: see ``Objective``.

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
        target_kind: TargetKind = "multiclass",
        regression_loss: RegressionLoss = "mse",
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | Tensor | None = None,
        output_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        gate: Gate | str | None = None,
    ) -> None:
        super().__init__(points, schedule=schedule, ignore_index=ignore_index, target_kind=target_kind,
                         regression_loss=regression_loss, label_smoothing=label_smoothing,
                         class_weights=class_weights, output_loss=output_loss, gate=gate)
        self.alpha = per_point("alpha", alpha, self.points)

    def _terms(
        self, output: _Branch, heads: Mapping[str, _Branch], features: Mapping[str, Tensor], matcher: TargetMatcher
    ) -> list[tuple[str, float, Tensor]]:
        return [(f"dsn/{name}", self.alpha[name], self._homogeneous(heads[name], matcher)) for name in self.points]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"


class DKS(DSN):
    """DKS: DSN plus the synergy loss, CE + sum_m alpha_m * CE_m + beta * synergy.

    The synergy (``DKSLoss``; Bernoulli KLs for binary / multi-label) runs over the
    model output and every head, all at the target's resolution (heads of another
    size are resized to it like the output), ignored elements left out; parts add
    ``"dks"`` (unweighted) to DSN's. With no points there is no pair, so the synergy
    is left out. Defaults weight every branch and the synergy equally with the
    output, as DKS trains all its classifiers as peers. Regression targets are
    refused (no distribution to match).

    Args:
        points: supervised point names.
        alpha: auxiliary CE weight, one value or one per point.
        beta: synergy weight.
        temperature: softmax (sigmoid) temperature of the synergy.
        schedule: how alpha and beta change over training.
        ignore_index: label value excluded from CE and synergy.
        target_kind: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        label_smoothing, class_weights, output_loss, gate: see ``Objective``; the synergy is never gated.

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
        target_kind: TargetKind = "multiclass",
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | Tensor | None = None,
        output_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        gate: Gate | str | None = None,
    ) -> None:
        check_dks_kind(target_kind)
        super().__init__(
            points, alpha=alpha, schedule=schedule, ignore_index=ignore_index, target_kind=target_kind,
            label_smoothing=label_smoothing, class_weights=class_weights, output_loss=output_loss, gate=gate,
        )
        self.beta = check_weight("beta", beta)
        self._synergy_term = DKSLoss(temperature, self.ignore_index, self.target_kind)
        self.temperature = self._synergy_term.temperature

    def _terms(
        self, output: _Branch, heads: Mapping[str, _Branch], features: Mapping[str, Tensor], matcher: TargetMatcher
    ) -> list[tuple[str, float, Tensor]]:
        terms = super()._terms(output, heads, features, matcher)
        if self.points:
            branches = [output.logits, *(resize_logits(heads[name].logits, matcher.size) for name in self.points)]
            terms.append(("dks", self.beta, self._synergy_term.forward_matched(branches, output.target)))
        return terms

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, temperature={self.temperature}"


_HEADS = {"metadata": {"objective": False}}
"""A field of ``LossOptions`` that shapes the heads the loss compares, read by ``instrument``, not by the objective."""


@dataclass(frozen=True)
class LossOptions:
    """How the deep supervision is trained: the objective's options and the heads' form, one record.

    ``instrument(loss_options=...)`` takes it (the way ``prepare_fx`` takes a ``QConfigMapping``) and hands it to
    ``make_objective``; every option left at its default takes the objective class's own default. An option the
    chosen objective does not take (``lam`` for ``dsn``) is an error, never silently ignored: which objective
    takes which option is read from the classes' own signatures.

    Attributes:
        alpha: intermediate weight (MI / correlation for imachsr, the output loss for dsn/dks), one value or per point.
        lam: negative-entropy weight (imachsr), one value or per point.
        beta: synergy weight (dks).
        temperature: synergy temperature (dks).
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` decay of the intermediate weights.
        regression_loss: ``"mse"`` or ``"l1"``, for regression targets.
        mi_estimator: ``"image"``, ``"pooled"``, ``"shuffled"`` or ``"region"`` (imachsr; see ``IMacHSR``).
        gather_mi: sum the MI joint over the ranks of the default process group (imachsr).
        region_ce: the CE half's weight of ``mi_estimator="region"`` (imachsr).
        label_smoothing: epsilon in [0, 1) of the multiclass cross entropy (see ``Objective``).
        class_weights: K weights of the multiclass cross entropy (see ``Objective``).
        output_loss: a callable ``(logits, target) -> scalar`` replacing the output's loss (see ``Objective``).
        gate: ``"cosine"``, ``"binary"`` or a ``Gate`` (see ``Objective``); ``None`` keeps every term at its weight.
        head: the adapters' form, ``"conv"`` (the default, ``defaults.DEFAULT_HEAD``) or ``"linear"``
            (see ``autoprobe.adapters``); ``instrument`` reads it, the objective does not.
        label_resolution: dense outputs: ``"upsample"`` (adapter logits at the output's resolution) or
            ``"downsample"`` (at each point's own, the target resized to it); read by ``instrument``.

    Example:
        >>> LossOptions(alpha=0.5, schedule="cosine").given()
        {'alpha': 0.5, 'schedule': 'cosine'}
    """

    alpha: float | Mapping[str, float] | None = None
    lam: float | Mapping[str, float] | None = None
    beta: float | None = None
    temperature: float | None = None
    schedule: Schedule = "constant"
    regression_loss: RegressionLoss = "mse"
    mi_estimator: MIEstimator | None = None
    gather_mi: bool = False
    region_ce: float | None = None
    label_smoothing: float = 0.0
    class_weights: Sequence[float] | Tensor | None = None
    output_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    gate: Gate | str | None = None
    head: AdapterHead = field(default=DEFAULT_HEAD, **_HEADS)  # type: ignore[arg-type]
    label_resolution: Literal["upsample", "downsample"] = field(default="upsample", **_HEADS)  # type: ignore[arg-type]

    def given(self, *, objective: bool = True) -> dict[str, Any]:
        """The options set to something else than their default; with ``objective``, the objective's only."""
        return {
            f.name: value for f in dataclasses.fields(self)
            if (not objective or f.metadata.get("objective", True))
            and not _is_default(value := getattr(self, f.name), f.default)
        }


def _is_default(value: Any, default: Any) -> bool:
    """Whether an option is at its default: ``None`` by identity (a tensor's ``==`` is elementwise), else by value."""
    return value is None if default is None else bool(value == default)


_OBJECTIVES: dict[str, type[Objective]] = {"imachsr": IMacHSR, "dsn": DSN, "dks": DKS}
"""The objectives ``make_objective`` builds, by name (``ObjectiveName``)."""


def _takes(cls: type[Objective]) -> frozenset[str]:
    """The ``LossOptions`` fields ``cls`` takes: those of its constructor's parameters."""
    names = {f.name for f in dataclasses.fields(LossOptions) if f.metadata.get("objective", True)}
    return frozenset(names & set(inspect.signature(cls).parameters))


def loss_options(options: LossOptions | None, legacy: Mapping[str, Any], call: str) -> LossOptions:
    """The one ``LossOptions`` of a call: ``options``, or a default one with the old keywords moved in.

    The old keywords (``alpha=``, ``gate=``, ``head=``, ...: every ``LossOptions`` field) still work, with a
    ``DeprecationWarning`` that names the field.

    Args:
        options: the call's record; ``None`` is ``LossOptions()``.
        legacy: the call's other keyword arguments.
        call: the function's name, and the record's keyword, for messages (``"make_objective"``,
            ``"instrument"``).

    Returns:
        The ``LossOptions``.

    Raises:
        InstrumentError: ``options`` is not a ``LossOptions``, or it is given together with an old keyword.
        TypeError: a keyword that is no ``LossOptions`` field, as Python words it.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     loss_options(None, {"alpha": 0.4}, "make_objective").alpha
        0.4
        >>> print(seen[0].message)
        make_objective(alpha=...) is deprecated; pass options=LossOptions(alpha=...).
    """
    keyword = "loss_options" if call == "instrument" else "options"
    return moved_into(LossOptions, options, legacy, call, keyword, InstrumentError, stacklevel=4)


def make_objective(
    name: ObjectiveName,
    points: Sequence[str],
    layouts: Mapping[str, str | Layout] | None = None,
    *,
    target_kind: TargetKind = "multiclass",
    ignore_index: int = -100,
    options: LossOptions | None = None,
    **deprecated: Any,
) -> Objective:
    """Build an objective by name, for ``instrument``, configs and the CLI.

    Options left at their defaults take the class default. An option the chosen objective does not
    have (``lam`` for ``dsn``, ``beta`` for ``imachsr``) is an error rather than silently ignored; which
    class takes which option is read from its constructor.

    Per target kind: ``"imachsr"`` uses MI for labels (Bernoulli MI for binary and
    multi-label) and 1 - Pearson r for regression; ``"dsn"`` applies the output's loss
    (CE, BCE, or MSE / L1) at every point, FlowNet's homogeneous baseline for
    regression; ``"dks"`` needs labels.

    Args:
        name: ``"imachsr"``, ``"dsn"`` or ``"dks"``.
        points: supervised point names.
        layouts: point name -> feature layout; required by ``imachsr`` only.
        target_kind: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        ignore_index: target value excluded from every term (labels only).
        options: the ``LossOptions`` (weights, schedule, estimator, output-loss options, gate); ``head`` and
            ``label_resolution`` are ``instrument``'s and not read here.
        **deprecated: ``LossOptions`` fields as keywords, the form before the record: still taken, with a
            ``DeprecationWarning``.

    Returns:
        An ``IMacHSR``, ``DSN`` or ``DKS``.

    Raises:
        InstrumentError: an unknown name or kind, an option the objective does not take, ``"dks"`` with
            regression, or ``regression_loss="l1"`` with labels.

    Example:
        >>> make_objective("dsn", ["layer1", "layer3"], options=LossOptions(alpha=0.4))
        DSN(points=['layer1', 'layer3'], schedule='constant', ignore_index=-100, alpha={'layer1': 0.4, 'layer3': 0.4})
    """
    options = loss_options(options, deprecated, "make_objective")
    if name not in _OBJECTIVES:
        raise InstrumentError(f"unknown objective {name!r}; expected one of {list(_OBJECTIVES)}")
    cls = _OBJECTIVES[name]
    given = options.given()
    takes = _takes(cls)
    foreign = sorted(set(given) - takes)
    if foreign:
        raise InstrumentError(f"objective {name!r} does not take {foreign}; it takes {sorted(takes)}")
    kind = check_target_kind(target_kind)
    check_regression_loss(options.regression_loss)
    if options.regression_loss != "mse" and kind != "regression":
        raise InstrumentError(
            f"regression_loss={options.regression_loss!r} applies to regression targets; target_kind is {kind!r}. "
            "Hint: pass task='regression' to instrument, or leave regression_loss at its default."
        )
    if name == "dks":
        check_dks_kind(kind)
    if "layouts" in inspect.signature(cls).parameters:
        if layouts is None:
            raise InstrumentError(f"objective {name!r} needs layouts: point name -> feature layout, for NE")
        return cls(points, layouts, target_kind=kind, ignore_index=ignore_index, **given)  # type: ignore[call-arg]
    return cls(points, target_kind=kind, ignore_index=ignore_index, **given)  # type: ignore[call-arg]


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

