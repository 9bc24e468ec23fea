"""What ``instrument`` trains unless told, defined once and importable without torch (the CLI reads it).

Both defaults were chosen on validation by the rule EVIDENCE.md section 7 registered before its runs,
and then confirmed on seeds never used before (EVIDENCE.md, "The confirmation"):

- ``DEFAULT_OBJECTIVE = "dsn"``: the output's loss at every head (DSN, alpha 0.3). iMacHSR, the
  default until then, lowered the test score on all four evidence models; it stays available as
  ``loss="imachsr"``.
- ``DEFAULT_HEAD = "conv"``: mmsegmentation's FCN auxiliary head at each point (3x3 conv to
  min(C, 128) channels, BatchNorm, ReLU, dropout 0.1, 1x1 conv; for vector outputs Linear,
  LayerNorm, ReLU, dropout, Linear). With it DSN's mean validation gain over the four models rose
  from +0.64 to +0.88 points and its worst model from -1.07 to -0.17. ``head="linear"`` (one
  C -> K map) stays available.

Example:
    >>> from autoprobe.defaults import DEFAULT_HEAD, DEFAULT_OBJECTIVE
    >>> DEFAULT_OBJECTIVE, DEFAULT_HEAD
    ('dsn', 'conv')
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["ObjectiveName", "AdapterHead", "ADAPTER_HEADS", "DEFAULT_OBJECTIVE", "DEFAULT_HEAD"]

ObjectiveName = Literal["imachsr", "dsn", "dks"]
"""The objectives ``instrument(loss=...)`` and ``make_objective`` build by name."""

AdapterHead = Literal["linear", "conv"]
"""The adapter's form: one linear map, or mmseg's FCN auxiliary head (the default; see ``autoprobe.adapters``)."""

ADAPTER_HEADS: tuple[str, ...] = get_args(AdapterHead)
DEFAULT_OBJECTIVE: ObjectiveName = "dsn"
DEFAULT_HEAD: AdapterHead = "conv"
