"""torchrun worker for tests/test_mi_ranks.py: IMacHSR with ``gather_mi=True`` under DDP, 2 CPU processes.

Run as ``torchrun --standalone --nproc_per_node 2 tests/_mi_ranks_worker.py OUT_DIR``. Each rank
takes its half of one combined batch (4 samples: too few for a 5 x 5 MI table alone), runs
one DDP forward/backward and saves its loss parts, the parts without gathering, and the
DDP-averaged gradients to ``OUT_DIR/rank<r>.pt``; the test compares them with one process
on the combined batch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import autoprobe

BATCH = 8
CLASSES = 5


def build(gather_mi: bool) -> autoprobe.Probed:
    """The probed model, identical on every process (no BatchNorm: per-rank statistics would differ; linear
    heads: the conv head's dropout draws different masks on each rank than on the combined batch)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES),
    )
    return autoprobe.instrument(net, input_size=(3, 8, 8), loss="imachsr",
                                loss_options=autoprobe.LossOptions(head="linear", gather_mi=gather_mi, alpha=1.0))


def combined_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = combined_batch()
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    probed = build(gather_mi=True)
    ddp = DistributedDataParallel(probed)
    total, parts = probed.loss(ddp(x[share]), y[share])
    total.backward()
    local = build(gather_mi=False)
    _, local_parts = local.loss(local(x[share]), y[share])
    torch.save(
        {
            "parts": parts,
            "local_parts": local_parts,
            "grads": {k: v.grad.clone() for k, v in probed.named_parameters()},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
