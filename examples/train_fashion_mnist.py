"""Train a small CNN on Fashion-MNIST with iMacHSR deep supervision, then ship the plain model.

The part that matters is ``train``: instrument, a normal loop with ``probed.loss``,
``strip()``. The data are the four IDX files of Fashion-MNIST, read from ``--data``
(default: where Debian's ``dataset-fashion-mnist`` package puts them); nothing is
downloaded.

Usage:
    apt-get install -y dataset-fashion-mnist
    python examples/train_fashion_mnist.py --epochs 1 --limit 12000
"""

from __future__ import annotations

import argparse
import gzip
import struct
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprobe

__all__ = ["SmallCNN", "train", "load_data"]


class SmallCNN(nn.Module):
    """Three conv stages and a linear classifier, 28x28 grey images to 10 logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> torch.Tensor:
    """One IDX file (gzipped or not): a big-endian header, then uint8 values."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype != 0x08:
        raise SystemExit(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r}).")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def load_data(root: Path, train: bool, limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST images, normalized to mean 0 / std 1, with integer labels.

    Args:
        root: directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        train: the 60,000 training images, else the 10,000 test images.
        limit: keep only the first ``limit`` examples.

    Returns:
        A ``TensorDataset`` of (1x28x28 float images, int64 labels).
    """
    prefix = "train" if train else "t10k"
    tensors = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [root / f"{prefix}-{kind}-ubyte.gz", root / f"{prefix}-{kind}-ubyte"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise SystemExit(
                f"Fashion-MNIST not found: no {candidates[0].name} in {root}.\n"
                "Hint: `apt-get install -y dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist), "
                "or pass --data DIR holding the four IDX files."
            )
        tensors.append(_read_idx(found)[:limit])
    images = (tensors[0].unsqueeze(1).float() / 255 - 0.286) / 0.353
    return TensorDataset(images, tensors[1].long())


def train(model: nn.Module, loader: DataLoader, epochs: int) -> nn.Module:
    """Deep-supervised training; returns the plain (stripped) model.

    Args:
        model: any classifier returning (B, K) logits.
        loader: batches of (images, integer labels).
        epochs: passes over ``loader``.

    Returns:
        The same model object, trained, with no adapters.
    """
    probed = autoprobe.instrument(model, input_size=(1, 28, 28), schedule="linear")
    print(probed.report.summary())
    optimizer = torch.optim.Adam(probed.parameters(), lr=1e-3)
    steps, done = epochs * len(loader), 0
    for epoch in range(epochs):
        probed.train()
        for x, y in loader:
            out = probed(x)
            total, parts = probed.loss(out, y, progress=done / steps)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            done += 1
        print(f"epoch {epoch}: loss {total.item():.3f}, " + ", ".join(f"{k} {v.item():.3f}" for k, v in parts.items()))
    return probed.strip().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEBIAN_DIR, help=f"directory of the IDX files (default {DEBIAN_DIR})")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly: shared machines)")
    parser.add_argument("--save", type=Path, default=None, help="write the stripped model's state_dict here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_set = load_data(args.data, train=True, limit=args.limit)
    test_set = load_data(args.data, train=False)
    wall, cpu = time.perf_counter(), time.process_time()
    model = train(SmallCNN(), DataLoader(train_set, args.batch, shuffle=True), args.epochs)
    print(f"trained on {len(train_set)} images in {time.perf_counter() - wall:.0f} s wall, "
          f"{time.process_time() - cpu:.0f} s CPU ({args.threads} threads)")
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test_set, 512):
            correct += (model(x).argmax(1) == y).sum().item()
    print(f"test accuracy of the stripped model: {correct / len(test_set):.3f}")
    if args.save is not None:
        torch.save(model.state_dict(), args.save)  # the plain keys: loads into SmallCNN()


if __name__ == "__main__":
    main()
