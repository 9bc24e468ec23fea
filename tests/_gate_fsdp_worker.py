"""torchrun worker for tests/test_gate.py: 3 FSDP2 steps of a probed tiny ViT with the gate, on CPU with gloo.

Run as ``torchrun --standalone --nproc_per_node 2 tests/_gate_fsdp_worker.py OUT_DIR``. Every rank
trains on the same batches, so the losses and the gate's weights must equal one unsharded
process's (computed here first). Each rank saves both to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import autoprobe
from _fsdp_worker import _batches, _model


def _train(probed) -> tuple[list[float], list[list[float]]]:  # noqa: ANN001
    optimizer = torch.optim.SGD(probed.parameters(), lr=0.05)
    losses, weights = [], []
    for x, y in _batches():
        optimizer.zero_grad()
        total, _ = probed.loss(probed(x), y)
        total.backward()
        optimizer.step()
        losses.append(total.item())
        weights.append(probed.objective.gate.weights.tolist())
    return losses, weights


def main(out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    found = {}
    gates = {wrt: autoprobe.Gate("cosine", every=1, wrt=wrt) for wrt in ("feature", "parameters")}
    expected = {wrt: _train(autoprobe.instrument(_model(), input_size=(3, 32, 32), loss="dsn",
                                              loss_options=autoprobe.LossOptions(gate=g)).train())
                for wrt, g in gates.items()}
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for wrt, gate in gates.items():
        probed = autoprobe.instrument(_model(), input_size=(3, 32, 32), loss="dsn",
                                      loss_options=autoprobe.LossOptions(gate=gate)).train()
        for block in probed.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(probed, mesh=mesh)
        found[wrt] = {"got": _train(probed), "expected": expected[wrt]}
    torch.save(found, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
