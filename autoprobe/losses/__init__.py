"""Training objectives: the output loss plus terms at the intermediate points.

iMacHSR (Eq. 3 in /work/shared/METHOD.md) adds two terms per point m to the
output loss: a mutual-information loss on the adapter output q_m(z_m) and a
negative-entropy regularizer on the raw feature z_m. The MI term is deliberately
*heterogeneous*: it is not the output's loss, so early layers are pushed to carry
label information without being forced to make the output's decision early. Two
homogeneous baselines sit beside it so the evidence runs can compare like with
like: DSN (the output's loss at every adapter) and DKS (DSN plus a pairwise KL
"synergy" between all branches). ``instrument`` trains DSN by default (``DEFAULT_OBJECTIVE``):
on the evidence, iMacHSR lowered the test score on all four models, and DSN with conv heads
was the candidate the registered rule chose on validation (EVIDENCE.md section 7).

The package, one module per job:

- ``targets``: the four target kinds (multiclass, binary, multilabel, regression),
  their checks, and matching a target and logits of different resolutions;
- ``terms``: each term as a module (output loss, MI, correlation, NE, DSN, DKS): its one
  implementation, used alone or by the objectives (``forward_matched``);
- ``objectives``: ``IMacHSR``, ``DSN``, ``DKS``, ``make_objective`` and the schedules, built
  from the term modules: they check and match the target once per batch, then call them;
- ``gate``: the gradient-similarity gate every objective can weight its points' terms with;
- ``_math``: the kernels they share.

Conventions shared by every loss here:

- logits are (B, K) for classification or (B, K, *S) for dense tasks with S of 1, 2
  or 3 dims (sequences, images, volumes); targets as ``targets`` describes, at any
  spatial size of the logits' rank; elements equal to ``ignore_index`` (default
  -100, PyTorch's; 255 for torchvision / Cityscapes masks) are excluded everywhere;
- the kind of target is always given (``target_kind``), never guessed from its dtype;
- all terms are computed in float32 with autocast disabled: logs of K-way
  softmaxes and K x K joint tables lose too much in fp16/bf16, and they cost
  little next to the network;
- no scatter-add or NLLLoss kernels (their CUDA versions use atomics and have no
  deterministic mode); cross entropy is a gather of log-softmax, the MI joint a
  batched matmul. The one exception is resizing logits to a target of another size:
  interpolate's CUDA backward accumulates with atomics (as the dense adapters' own
  resize does), so under ``torch.use_deterministic_algorithms(True)`` train with
  targets at the logits' size (or heads at their own size, where the *target* is
  resized, which needs no gradient);
- no state between calls, so the modules work under torch.compile and DDP; the one
  exception is the optional gate, which holds its measured weights between measurements
  (the same on every rank, and only read inside a compiled graph);
  Target *values* are checked in eager mode only: the check needs a host sync
  and would break a compiled graph.

Example:
    >>> import torch
    >>> objective = make_objective("dsn", ["s1"], target_kind="binary", ignore_index=255)
    >>> mask = torch.tensor([[[0, 1, 255, 1]]], dtype=torch.uint8)       # (B, H, W), image resolution
    >>> result = objective(torch.zeros(1, 1, 1, 2), {"s1": torch.zeros(1, 1, 1, 2)}, {}, mask)
    >>> round(result.parts["ce"].item(), 4)                              # log 2 on the 3 valid pixels
    0.6931
"""

from __future__ import annotations

from .objectives import (
    DEFAULT_OBJECTIVE,
    DKS,
    DSN,
    IMacHSR,
    LossOptions,
    LossResult,
    Objective,
    ObjectiveName,
    Schedule,
    make_objective,
    schedule_weight,
)
from ._math import MI_ESTIMATOR_CHOICES, MI_ESTIMATORS
from .gate import Agreement, Gate, GateKind, GradientGate, gradient_agreement
from .targets import MatchedTarget, RegressionLoss, TargetKind, TargetMatcher, resize_logits
from .terms import (
    NE_MAX_POSITIONS,
    CorrelationLoss,
    DKSLoss,
    DSNLoss,
    MutualInformationLoss,
    NegativeEntropyLoss,
    OutputCrossEntropy,
    OutputLoss,
    channel_dim_for,
)

__all__ = [
    "Schedule",
    "ObjectiveName",
    "DEFAULT_OBJECTIVE",
    "TargetKind",
    "RegressionLoss",
    "LossOptions",
    "LossResult",
    "OutputLoss",
    "OutputCrossEntropy",
    "MutualInformationLoss",
    "CorrelationLoss",
    "NegativeEntropyLoss",
    "NE_MAX_POSITIONS",
    "MI_ESTIMATORS",
    "MI_ESTIMATOR_CHOICES",
    "DSNLoss",
    "DKSLoss",
    "Objective",
    "IMacHSR",
    "DSN",
    "DKS",
    "MatchedTarget",
    "TargetMatcher",
    "resize_logits",
    "channel_dim_for",
    "schedule_weight",
    "make_objective",
    "Gate",
    "GateKind",
    "GradientGate",
    "Agreement",
    "gradient_agreement",
]
