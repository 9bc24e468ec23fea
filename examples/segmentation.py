"""Deep supervision for semantic segmentation: masks at image resolution, ``ignore_index=255``.

The loop a torchvision or Hugging Face user writes, with autoprobe added in three lines:

    probed = autoprobe.instrument(model, rules="dense", input_size=(3, H, W), ignore_index=255)
    out = probed(images)                    # out.output is the model's own dict / ModelOutput
    total, parts = probed.loss(out, masks)  # masks (B, H, W), 255 = unlabelled

The model's logits may be smaller than the masks (SegFormer predicts at 1/4): the objective
resizes the logits to the masks (bilinear), as Hugging Face does. ``--label-resolution
downsample`` keeps each adapter at its point's own resolution and resizes the masks to it
instead (nearest, 255 kept), as nnU-Net and MONAI do. torchvision's ``aux`` classifier is the
model's own output and is left alone; ``--aux-weight 0.5`` adds its loss the way torchvision's
reference script does. The data are random shapes on noise (no download); ``--quick`` runs two
steps of a small DeepLabV3 and a small SegFormer, as the test suite does.

Run: ``python examples/segmentation.py --model deeplabv3 --steps 50``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import autoprobe

IGNORE = 255


def synthetic_batch(batch: int, size: int, classes: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with one bright rectangle per class on noise, masks (B, H, W) with a 255 border."""
    images = torch.randn(batch, 3, size, size, generator=generator) * 0.1
    masks = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for k in range(1, classes):
            y0, x0 = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            h, w = torch.randint(size // 8, size // 2, (2,), generator=generator).tolist()
            masks[b, y0 : y0 + h, x0 : x0 + w] = k
            images[b, k % 3, y0 : y0 + h, x0 : x0 + w] += 1.0
    masks[:, :2], masks[:, -2:] = IGNORE, IGNORE  # unlabelled borders, as VOC's object outlines
    return images, masks


def build(name: str, classes: int) -> nn.Module:
    """A segmentation model from its constructor, with fresh weights (nothing is downloaded)."""
    if name == "deeplabv3":
        from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

        return deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=classes, aux_loss=True)
    if name == "lraspp":
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=classes)
    if name == "segformer":
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        config = SegformerConfig(
            num_labels=classes, num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], decoder_hidden_size=32,
            num_attention_heads=[1, 2], sr_ratios=[2, 1], strides=[4, 2], patch_sizes=[7, 3], mlp_ratios=[2, 2],
        )
        return SegformerForSemanticSegmentation(config)
    raise SystemExit(f"unknown model {name!r}; choose deeplabv3, lraspp or segformer")


def train(name: str, *, steps: int, size: int, classes: int, label_resolution: str, aux_weight: float) -> list[float]:
    """Train ``name`` with deep supervision on synthetic masks; returns the total loss per step."""
    torch.manual_seed(0)
    model = build(name, classes)
    probed = autoprobe.instrument(
        model, rules="dense", input_size=(3, size, size), ignore_index=IGNORE,
        loss_options=autoprobe.LossOptions(label_resolution=label_resolution),
    )
    print(probed.report.summary())
    optimizer = torch.optim.AdamW(probed.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    probed.train()
    for step in range(steps):
        images, masks = synthetic_batch(2, size, classes, generator)
        out = probed(images)
        total, parts = probed.loss(out, masks)
        if aux_weight and isinstance(out.output, dict) and "aux" in out.output:
            # The model's own auxiliary head, supervised like torchvision's reference does.
            aux = F.interpolate(out.output["aux"], size=masks.shape[-2:], mode="bilinear", align_corners=False)
            total = total + aux_weight * F.cross_entropy(aux, masks, ignore_index=IGNORE)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
        print(f"step {step}: total {total.item():.4f}, output CE {parts['ce'].item():.4f}")
    plain = probed.strip()  # the user's model, trained in place, for inference and export
    assert plain is model
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deeplabv3", choices=["deeplabv3", "lraspp", "segformer"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--label-resolution", default="upsample", choices=["upsample", "downsample"])
    parser.add_argument("--aux-weight", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="two steps of deeplabv3 and segformer at 32x32")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        for name in ("deeplabv3", "segformer"):
            train(name, steps=2, size=32, classes=3, label_resolution=args.label_resolution, aux_weight=0.5)
        return
    train(args.model, steps=args.steps, size=args.size, classes=args.classes,
          label_resolution=args.label_resolution, aux_weight=args.aux_weight)


if __name__ == "__main__":
    main()
