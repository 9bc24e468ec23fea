"""torchrun worker for tests/test_ddp.py: 3 DDP steps of a probed tiny CNN on CPU with gloo.

Run as ``torchrun --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT_DIR``. Every rank
sees different data, so identical parameters afterwards mean DDP averaged the
gradients of the model *and* of the adapters. Each rank saves its parameters
and the adapters' gradient norms to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import autoprobe


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    )


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same initial weights everywhere (DDP would broadcast rank 0's anyway)
    probed = autoprobe.instrument(_model(), input_size=(3, 16, 16))
    initial = {k: v.detach().clone() for k, v in probed.named_parameters()}
    ddp = DistributedDataParallel(probed)  # no find_unused_parameters: every parameter must get a gradient
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(100 + rank)  # different batches per rank
    for _ in range(3):
        x = torch.randn(8, 3, 16, 16, generator=data)
        y = torch.randint(0, 5, (8,), generator=data)
        optimizer.zero_grad()
        out = ddp(x)
        total, _ = ddp.module.loss(out, y)
        total.backward()
        optimizer.step()
    torch.save(
        {
            "params": {k: v.detach().clone() for k, v in probed.named_parameters()},
            "initial": initial,
            "adapter_grads": {
                k: v.grad.norm().item() for k, v in probed.named_parameters() if k.startswith("autoprobe_adapters.")
            },
            "points": list(probed.selection.names),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
