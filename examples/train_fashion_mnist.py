"""Train a small CNN on Fashion-MNIST with iMacHSR deep supervision, then ship the plain model.

The part that matters is ``train``: instrument, a normal loop with ``probed.loss``,
``strip()``. Fashion-MNIST is read from ``--data`` if it is already there (nothing
is downloaded); otherwise torchvision's ``FakeData`` stands in, so the script
runs anywhere, but its accuracy then means nothing.

Usage:
    python examples/train_fashion_mnist.py --data ~/datasets --epochs 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

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


def load_data(root: Path | None, train: bool) -> tuple[Dataset, bool]:
    """Fashion-MNIST from ``root`` when present, else ``FakeData`` of the same shape.

    Returns:
        The dataset and whether it is the real one.
    """
    from torchvision import datasets, transforms

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.286,), (0.353,))])
    if root is not None:
        try:
            return datasets.FashionMNIST(str(root), train=train, download=False, transform=to_tensor), True
        except RuntimeError:
            pass  # not downloaded: fall through to synthetic data
    size = 2048 if train else 512
    return datasets.FakeData(size, (1, 28, 28), 10, transform=to_tensor, random_offset=0 if train else size), False


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
    parser.add_argument("--data", type=Path, default=None, help="directory holding FashionMNIST/raw")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--save", type=Path, default=None, help="write the stripped model's state_dict here")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_set, real = load_data(args.data, train=True)
    test_set, _ = load_data(args.data, train=False)
    if not real:
        print("Fashion-MNIST not found under --data; training on FakeData (accuracy is meaningless).")
    model = train(SmallCNN(), DataLoader(train_set, args.batch, shuffle=True), args.epochs)
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(test_set, 512):
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    print(f"test accuracy of the stripped model: {correct / total:.3f}")
    if args.save is not None:
        torch.save(model.state_dict(), args.save)  # the plain keys: loads into SmallCNN()


if __name__ == "__main__":
    main()
