"""Deep supervision in Lightning: a Probed inside a LightningModule, every term logged, DDP-ready.

The recipe is ``ProbedModule``: the Probed is an attribute of the LightningModule (so its
adapters train and checkpoint with the model), ``training_step`` logs the total and every
term with ``log_dict``, and the model summary lists ``probed.model`` and
``probed.autoprobe_adapters`` as separate rows (``ModelSummary(max_depth=2)``). After
training, ``autoprobe.plain_state_dict`` reads the plain model's weights out of the Lightning
checkpoint, loadable with ``strict=True``.

Usage (synthetic data, CPU; ``--devices 2`` runs DDP on 2 processes with gloo):
    python examples/lightning_probed.py --devices 2 --steps 8 --out runs/lightning
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.model_summary import summarize
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprobe

__all__ = ["ProbedModule", "make_model", "make_data", "main"]

IMAGE = (3, 16, 16)
CLASSES = 4


def make_model() -> nn.Module:
    """A small CNN: the plain model to supervise and, after training, to ship."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES),
    )


def make_data(n: int, seed: int) -> TensorDataset:
    """Images whose class is the quadrant with the brightest mean: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *IMAGE, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    for i, label in enumerate(y.tolist()):
        row, col = divmod(label, 2)
        x[i, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 1.5
    return TensorDataset(x, y)


class ProbedModule(L.LightningModule):
    """A LightningModule around a Probed: loss from ``probed.loss``, every term logged.

    Args:
        probed: from ``autoprobe.instrument``.
        lr: the SGD learning rate.
    """

    def __init__(self, probed: autoprobe.Probed, lr: float = 0.05) -> None:
        super().__init__()
        self.probed = probed
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        total, parts = self.probed.loss(self.probed(x), y)
        self.log("train/loss", total, prog_bar=True, sync_dist=True)
        self.log_dict({f"train/{name}": value for name, value in parts.items()}, sync_dist=True)
        return total

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        total, parts = self.probed.loss(self.probed(x), y)
        self.log("val/loss", total, sync_dist=True)
        self.log_dict({f"val/{name}": value for name, value in parts.items()}, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> int:
    """Train, checkpoint, and load the plain model back from the checkpoint; files go to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1, help="CPU processes; 2 or more runs the DDP strategy")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/lightning"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    L.seed_everything(0, workers=True)

    model = make_model()
    probed = autoprobe.instrument(model, input_size=IMAGE)
    module = ProbedModule(probed)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps, limit_val_batches=2, val_check_interval=args.steps, log_every_n_steps=1,
        logger=CSVLogger(args.out, name="", version=""), callbacks=[ModelSummary(max_depth=2)],
        enable_checkpointing=False, enable_progress_bar=False, deterministic=True,
    )
    trainer.fit(module, DataLoader(make_data(128, 1), batch_size=8, shuffle=True),
                DataLoader(make_data(32, 2), batch_size=8))
    checkpoint = args.out / "last.ckpt"
    trainer.save_checkpoint(checkpoint)  # every rank calls it; rank 0 writes

    if trainer.is_global_zero:
        # The shipped model: a fresh plain model, loaded strictly from the Lightning checkpoint.
        plain = make_model()
        plain.load_state_dict(autoprobe.plain_state_dict(checkpoint), strict=True)
        torch.save(plain.state_dict(), args.out / "plain.pt")
        (args.out / "summary.txt").write_text(str(summarize(module, max_depth=2)) + "\n")
        (args.out / "run.json").write_text(json.dumps({"world_size": trainer.world_size,
                                                        "strategy": type(trainer.strategy).__name__}) + "\n")
        print(f"plain model loaded from {checkpoint}; metrics in {args.out / 'metrics.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
