"""DistributedDataParallel over a probed model: torchrun, 2 CPU processes, gloo.

Runs ``tests/_ddp_worker.py`` under torchrun without ``find_unused_parameters``
(so every parameter, adapters included, must receive a gradient each step) and
checks that after 3 steps on different per-rank batches the parameters are
identical across ranks and have moved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _torchrun import run_two_processes


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_two_cpu_processes_keep_parameters_identical(tmp_path: Path) -> None:
    run_two_processes("_ddp_worker.py", tmp_path, timeout=240)

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0["points"] and rank0["points"] == rank1["points"]
    assert rank0["params"].keys() == rank1["params"].keys()
    assert any(k.startswith("autoprobe_adapters.") for k in rank0["params"])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs across ranks"
        assert not torch.equal(value, rank0["initial"][name]), f"{name} did not train"
    assert all(g > 0 for g in rank0["adapter_grads"].values())
