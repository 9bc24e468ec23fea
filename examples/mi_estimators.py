"""Two properties of iMacHSR's MI term, measured for each ``IMacHSR(mi_estimator=...)``.

(a) Dense tasks: the paper's image-wise MI between an adapter's softmax and the labels does
    not change when the classes are relabelled within an image, so it rewards separating the
    regions, not naming the classes. Measured on label maps of 3 rectangles of random item
    classes on background: a head that names every class right, against one that separates
    the same regions but names them by a different random permutation in every image.
(b) Classification: the plug-in MI over one batch is biased upward. Confident predictions
    drawn independently of the labels (true MI 0) are scored over many batches of 32 samples x
    10 classes (and larger batches, to show the bias shrinking as about 1/N); and an informative
    head (70% right, errors uniform), whose true MI is known in closed form.

Usage:
    python examples/mi_estimators.py            # prints the tables (a few seconds on one core)
    python examples/mi_estimators.py --json     # the same numbers as JSON

The numbers are deterministic (fixed generator seeds).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from autoprobe.losses import MI_ESTIMATORS, MutualInformationLoss

__all__ = ["block_labels", "relabel_within_images", "dense_mi", "independent_mi", "informative_mi", "main"]

ESTIMATORS = MI_ESTIMATORS
CONFIDENT = 20.0  # logit of the predicted class: softmax within 1e-8 of one-hot


def _mi(logits: torch.Tensor, labels: torch.Tensor, estimator: str) -> float:
    """The MI iMacHSR's term estimates (the term is its negative)."""
    return -float(MutualInformationLoss(estimator=estimator)(logits, labels))  # type: ignore[arg-type]


def block_labels(images: int, size: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """(images, size, size) maps: background 0 and 3 rectangles of distinct random classes 1..classes-1."""
    labels = torch.zeros(images, size, size, dtype=torch.long)
    for i in range(images):
        for c in torch.randperm(classes - 1, generator=gen)[:3] + 1:
            top, left = (int(v) for v in torch.randint(size // 2, (2,), generator=gen))
            h, w = (int(v) for v in torch.randint(size // 4, size // 2, (2,), generator=gen))
            labels[i, top : top + h, left : left + w] = int(c)
    return labels


def relabel_within_images(labels: torch.Tensor, classes: int, gen: torch.Generator) -> torch.Tensor:
    """The same regions with the item classes renamed by a fresh random permutation per image."""
    out = torch.empty_like(labels)
    for i in range(labels.shape[0]):
        perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(classes - 1, generator=gen) + 1])
        out[i] = perm[labels[i]]
    return out


def dense_mi(images: int = 16, size: int = 32, classes: int = 11, seed: int = 0) -> dict[str, dict[str, float]]:
    """Property (a): each estimator's MI (nats) for a head naming classes right vs renaming them per image."""
    gen = torch.Generator().manual_seed(seed)
    labels = block_labels(images, size, classes, gen)
    renamed = relabel_within_images(labels, classes, gen)
    heads = {"right names": labels, "renamed per image": renamed}
    return {est: {name: _mi(CONFIDENT * F.one_hot(pred, classes).permute(0, 3, 1, 2).float(), labels, est)
                  for name, pred in heads.items()} for est in ESTIMATORS}


def independent_mi(batch: int = 32, classes: int = 10, draws: int = 500, seed: int = 0) -> dict[str, dict[str, float]]:
    """Property (b): mean, sd, min, max over ``draws`` batches of each estimator's MI when
    confident predictions are independent of uniform labels (true MI 0)."""
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {est: [] for est in ESTIMATORS}
    for _ in range(draws):
        labels = torch.randint(classes, (batch,), generator=gen)
        pred = torch.randint(classes, (batch,), generator=gen)
        logits = CONFIDENT * F.one_hot(pred, classes).float()
        for est in ESTIMATORS:
            values[est].append(_mi(logits, labels, est))
    return {est: _summary(v) for est, v in values.items()}


def informative_mi(batch: int = 32, classes: int = 10, accuracy: float = 0.7, draws: int = 500,
                   seed: int = 0) -> dict[str, float | dict[str, float]]:
    """Each estimator on a head right with probability ``accuracy`` (errors uniform), and the true MI."""
    gen = torch.Generator().manual_seed(seed)
    values: dict[str, list[float]] = {est: [] for est in ESTIMATORS}
    for _ in range(draws):
        labels = torch.randint(classes, (batch,), generator=gen)
        wrong = (labels + torch.randint(1, classes, (batch,), generator=gen)) % classes
        pred = torch.where(torch.rand(batch, generator=gen) < accuracy, labels, wrong)
        logits = CONFIDENT * F.one_hot(pred, classes).float()
        for est in ESTIMATORS:
            values[est].append(_mi(logits, labels, est))
    err = (1 - accuracy) / (classes - 1)
    true = math.log(classes) + accuracy * math.log(accuracy) + (1 - accuracy) * math.log(err)
    return {"true_mi": true, **{est: _summary(v) for est, v in values.items()}}


def _summary(v: Sequence[float]) -> dict[str, float]:
    t = torch.tensor(v, dtype=torch.float64)
    return {"mean": float(t.mean()), "sd": float(t.std()), "min": float(t.min()), "max": float(t.max())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {
        "a_dense_relabel": dense_mi(),
        "b_independent": {str(n): independent_mi(batch=n) for n in (32, 128, 512)},
        "b_informative_32": informative_mi(),
    }
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
        return 0
    print("(a) dense, 16 label maps 32x32, 11 classes; MI in nats of a confident head")
    print("| estimator | names right | renamed per image |\n|---|---|---|")
    for est, row in result["a_dense_relabel"].items():
        print(f"| {est} | {row['right names']:.3f} | {row['renamed per image']:.3f} |")
    print("\n(b) classification, 10 classes, confident predictions independent of the labels (true MI 0);"
          " mean [min, max] over 500 batches")
    print("| batch | " + " | ".join(ESTIMATORS) + " |\n|---|" + "---|" * len(ESTIMATORS))
    for n, row in result["b_independent"].items():
        print(f"| {n} | " + " | ".join(f"{row[e]['mean']:.3f} [{row[e]['min']:.2f}, {row[e]['max']:.2f}]"
                                       for e in ESTIMATORS) + " |")
    info = result["b_informative_32"]
    print(f"\n(b') batch 32, a head 70% right (true MI {info['true_mi']:.3f}): "
          + ", ".join(f"{e} {info[e]['mean']:.3f} (sd {info[e]['sd']:.3f})" for e in ESTIMATORS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
