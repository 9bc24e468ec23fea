"""torchrun worker for tests/test_fsdp.py: 3 FSDP2 steps of a probed tiny ViT on CPU with gloo.

Run as ``torchrun --standalone --nproc_per_node 2 tests/_fsdp_worker.py OUT_DIR``. The model is
instrumented first, then sharded the way ``Probed``'s docstring says: ``fully_shard`` on each block
of ``probed.model``, then on ``probed`` as the root. Every rank trains on the same batches, so the
losses must equal a single process's on those batches (computed here first, without sharding).
Each rank saves its losses, the reference losses and its adapters' gradient norms to
``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import autoprobe

STEPS = 3


def _model() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
        num_classes=5,
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = torch.Generator().manual_seed(100)
    return [(torch.randn(4, 3, 32, 32, generator=data), torch.randint(0, 5, (4,), generator=data)) for _ in range(STEPS)]


def _train(probed: nn.Module, loss_of) -> list[float]:  # noqa: ANN001
    optimizer = torch.optim.SGD(probed.parameters(), lr=0.05)
    losses = []
    for x, y in _batches():
        optimizer.zero_grad()
        total, _ = loss_of(probed(x), y)
        total.backward()
        optimizer.step()
        losses.append(total.item())
    return losses


def main(out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    reference = autoprobe.instrument(_model(), input_size=(3, 32, 32)).train()
    expected = _train(reference, reference.loss)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    probed = autoprobe.instrument(_model(), input_size=(3, 32, 32)).train()
    for block in probed.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(probed, mesh=mesh)
    try:  # sharding first and instrumenting after is refused with a message, not a DTensor crash
        autoprobe.instrument(probed.model, input_size=(3, 32, 32))
        refused = ""
    except autoprobe.InstrumentError as exc:
        refused = str(exc)
    losses = _train(probed, probed.loss)
    grads = {
        k: v.grad.full_tensor().norm().item() if hasattr(v.grad, "full_tensor") else v.grad.norm().item()
        for k, v in probed.named_parameters() if k.startswith("autoprobe_adapters.")
    }
    torch.save(
        {"losses": losses, "expected": expected, "adapter_grads": grads, "points": list(probed.selection.names),
         "refused": refused},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
