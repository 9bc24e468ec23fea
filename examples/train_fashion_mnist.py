"""Train a small CNN on Fashion-MNIST with deep supervision (autoprobe's default: DSN, conv heads), then ship the plain model.

The part that matters is ``train``: instrument, a normal loop with ``probed.loss``,
``strip()``. The data are the four IDX files of Fashion-MNIST, read from ``--data``
(default: where Debian's ``dataset-fashion-mnist`` package puts them); nothing is
downloaded.

Usage:
    apt-get install -y dataset-fashion-mnist
    python examples/train_fashion_mnist.py --epochs 1 --limit 12000
    python examples/train_fashion_mnist.py --quick      # 512 images, a few seconds (a test runs it)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprobe

try:  # run as a script (examples/ on sys.path) or imported as examples.train_fashion_mnist
    from segdata import DEBIAN_DIR, DataMissingError, read_fashion_mnist
except ImportError:
    from .segdata import DEBIAN_DIR, DataMissingError, read_fashion_mnist

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


def load_data(root: Path, train: bool, limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST images, normalized to mean 0 / std 1, with integer labels.

    Args:
        root: directory holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        train: the 60,000 training images, else the 10,000 test images.
        limit: keep only the first ``limit`` examples.

    Returns:
        A ``TensorDataset`` of (1x28x28 float images, int64 labels).
    """
    images, labels = read_fashion_mnist(root, train=train)
    tensors = (images[:limit], labels[:limit])
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
    probed = autoprobe.instrument(model, input_size=(1, 28, 28), loss_options=autoprobe.LossOptions(schedule="linear"))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEBIAN_DIR, help=f"directory of the IDX files (default {DEBIAN_DIR})")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set explicitly: shared machines)")
    parser.add_argument("--save", type=Path, default=None, help="write the stripped model's state_dict here")
    parser.add_argument("--quick", action="store_true", help="512 train and 512 test images, 1 epoch (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.epochs, args.batch = 512, 1, 64
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        train_set = load_data(args.data, train=True, limit=args.limit)
        test_set = load_data(args.data, train=False, limit=512 if args.quick else None)
    except DataMissingError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
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
