"""DistributedDataParallel over a probed model: torchrun, 2 CPU processes, gloo.

Runs ``tests/_ddp_worker.py`` under torchrun without ``find_unused_parameters``
(so every parameter, adapters included, must receive a gradient each step) and
checks that after 3 steps on different per-rank batches the parameters are
identical across ranks and have moved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_two_cpu_processes_keep_parameters_identical(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "_ddp_worker.py"), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert rank0["points"] and rank0["points"] == rank1["points"]
    assert rank0["params"].keys() == rank1["params"].keys()
    assert any(k.startswith("autoprobe_adapters.") for k in rank0["params"])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs across ranks"
        assert not torch.equal(value, rank0["initial"][name]), f"{name} did not train"
    assert all(g > 0 for g in rank0["adapter_grads"].values())
