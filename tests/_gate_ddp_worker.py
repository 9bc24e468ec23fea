"""torchrun worker for tests/test_gate.py: 30 DDP steps of a probed tiny CNN with the gate, on CPU with gloo.

Run as ``torchrun --standalone --nproc_per_node 2 tests/_gate_ddp_worker.py OUT_DIR``. Every rank
sees different data, so its own batch's cosines differ from the other rank's: identical gate
weights on both ranks mean the gate summed its dot products and norms over the ranks. Each rank
saves the weights in force after every step (and the gate's last measurement) to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import autoprobe
from _ddp_worker import _model  # the same tiny CNN as the DDP test


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    found = {}
    for wrt in ("feature", "parameters"):
        gate = autoprobe.Gate("cosine", every=5, wrt=wrt)
        probed = autoprobe.instrument(_model(), input_size=(3, 16, 16), loss="dsn",
                                      loss_options=autoprobe.LossOptions(gate=gate))
        ddp = DistributedDataParallel(probed)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)  # different batches per rank
        weights, cosines = [], []
        for _ in range(30):
            x = torch.randn(8, 3, 16, 16, generator=data)
            y = torch.randint(0, 5, (8,), generator=data)
            optimizer.zero_grad()
            total, parts = ddp.module.loss(ddp(x), y)
            total.backward()
            optimizer.step()
            weights.append(probed.objective.gate.weights.clone())
            cosines.append([a.cosine for a in probed.objective.gate.last.values()])
        found[wrt] = {"weights": torch.stack(weights), "cosines": torch.tensor(cosines),
                      "points": list(probed.selection.names)}
    torch.save(found, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
