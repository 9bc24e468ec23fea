"""Property test: random small models of issue 12's families keep autoprobe's guarantees.

For each model (``fuzz_models.build``): no exception but an ``AutoprobeError``; the layout of every
node and the selection are the same at two input sizes; no chosen point lacks a layout or is
untappable on its backend; inspect and instrument leave the user's model unchanged (parameters,
buffers, training flags, hooks); every tap catches the shape the selection recorded; one training
step has a finite loss; a pickle round trip keeps the output; ``strip()`` returns the user's model
with its own keys, bit-identical to the plain model in eval.

The CI slice is fixed (``derandomize=True``): 100 models. The long run is
``python benchmarks/fuzz.py --models 2400`` (counts per family, every failure with its seed).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_models import FAMILIES, build, check


@settings(max_examples=100, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(FAMILIES), seed=st.integers(min_value=0, max_value=10_000))
def test_random_models_keep_every_guarantee(family: str, seed: int) -> None:
    torch.set_num_threads(1)
    outcome = check(build(family, seed))
    assert outcome == "ok" or outcome.startswith("refused: "), outcome
