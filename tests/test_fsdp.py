"""FSDP2 (``fully_shard``) over a probed ViT: torchrun, 2 CPU processes, gloo.

Runs ``tests/_fsdp_worker.py``: the probed model is sharded per block and at the root after
``instrument``, trains 3 steps, and must give the same losses as one unsharded process on the
same batches, with a gradient on every adapter. (Before the fix, the fx graph ran the blocks'
code inline, so FSDP's hooks never unsharded their parameters: ``aten.native_layer_norm.default
got mixed torch.Tensor and DTensor``.)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _torchrun import run_two_processes


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_fsdp2_two_cpu_processes_match_the_single_process_losses(tmp_path: Path) -> None:
    run_two_processes("_fsdp_worker.py", tmp_path, timeout=400)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["points"]
        assert len(saved["losses"]) == 3 and all(math.isfinite(v) for v in saved["losses"])
        for got, want in zip(saved["losses"], saved["expected"]):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (saved["losses"], saved["expected"])
        assert saved["adapter_grads"] and all(g > 0 for g in saved["adapter_grads"].values())
        assert "already sharded with fully_shard" in saved["refused"] and "then shard the probed one" in saved["refused"]
