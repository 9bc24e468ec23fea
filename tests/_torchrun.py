"""Run a test worker script under torchrun on 2 CPU processes (gloo), for the DDP and FSDP tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_two_processes(worker: str, out_dir: Path, timeout: int) -> None:
    """Run ``tests/<worker>`` with ``out_dir`` as its argument; fail with both streams if it fails."""
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / worker), str(out_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
