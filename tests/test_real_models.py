"""Real models of each output and target convention, built without weights, one training step each.

torchvision's DeepLabV3 / LR-ASPP (dict output, aux on), a Hugging Face SegFormer (logits at 1/4
of the masks) and ViT classifier (``ImageClassifierOutput``), a binary (K=1) U-Net, a 3-D U-Net at
its skip points, a 1-D dense model, a FlowNet-like and a two-stack hourglass with regression
targets under the homogeneous (DSN) and the heterogeneous (iMacHSR) objective. For each: every
adapter gets a non-zero gradient, and ``strip()`` returns the user's model with its original keys
and a bit-identical eval output. Inputs are 32x32 (16^3 for 3-D), batch 2.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

from autoprobe import LossOptions, instrument
from autoprobe.errors import InstrumentError
from autoprobe.trace import TraceOptions
from conftest import REPO

sys.path.insert(0, str(REPO))  # examples/ is not installed
from examples.dense_models import Dense1D, FlowNetLike, Hourglass, UNet3D  # noqa: E402
from examples.unet import UNet  # noqa: E402

torch.set_num_threads(2)

IMAGE = (3, 32, 32)


def _masks(k: int, size: tuple[int, ...] = (32, 32), ignore: int | None = 255) -> torch.Tensor:
    y = torch.randint(0, k, (2, *size), generator=torch.Generator().manual_seed(1))
    if ignore is not None:
        y[:, :4] = ignore  # a band of unlabelled pixels, as in VOC/Cityscapes masks
    return y


def _train_step_and_strip(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options: object):
    """One SGD step of the probed model; checks gradients and strip(); returns (probed, parts)."""
    torch.manual_seed(0)
    keys = list(model.state_dict())
    before = copy.deepcopy(model.state_dict())
    probed = instrument(model, input_size=tuple(x.shape[1:]), **options)
    assert probed.report.taps, "no tap was placed"
    probed.train()
    out = probed(x)
    total, parts = probed.loss(out, y)
    assert torch.isfinite(total)
    optimizer = torch.optim.SGD(probed.parameters(), lr=0.01)
    optimizer.zero_grad()
    total.backward()
    for name, param in probed.autoprobe_adapters.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"adapter {name} got no gradient"
    optimizer.step()
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if v.is_floating_point())
    plain = probed.strip()
    assert plain is model and list(plain.state_dict()) == keys
    probed.eval()
    with torch.no_grad():
        mine, theirs = probed(x).output, plain(x)
    _assert_same_output(mine, theirs)
    return probed, parts


def _assert_same_output(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # type: ignore[arg-type]
        for key in a:
            _assert_same_output(a[key], b[key])  # type: ignore[index]
    else:
        raise AssertionError(f"unexpected output {type(a)}")


# --------------------------------------------------------------------------- torchvision segmentation


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_torchvision_segmentation_trains_on_image_masks_with_ignore_index_255(name: str) -> None:
    from torchvision.models import segmentation

    options = {"aux_loss": True} if name.startswith("deeplab") else {}
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3, **options)
    x, y = torch.randn(2, *IMAGE), _masks(3)
    probed, parts = _train_step_and_strip(model, x, y, rules="dense", ignore_index=255)
    assert probed.report.output == "output['out']" and "logits = output['out']" in probed.report.summary()
    out = probed(x)
    assert isinstance(out.output, dict) and "out" in out.output  # the model's own dict, aux kept
    if name.startswith("deeplab"):
        assert "aux" in out.output
    assert all(h.shape == (2, 3, 32, 32) for h in out.heads.values())
    # ignore_index reaches the objective: the same masks with 255 replaced by a class give another loss.
    relabelled = torch.where(y == 255, torch.zeros_like(y), y)
    assert not torch.isclose(probed.loss(out, relabelled).parts["ce"], probed.loss(out, y).parts["ce"])


# --------------------------------------------------------------------------- Hugging Face


def _segformer(num_labels: int = 3) -> nn.Module:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_labels=num_labels, num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], decoder_hidden_size=16,
        num_attention_heads=[1, 2], sr_ratios=[2, 1], strides=[4, 2], patch_sizes=[7, 3], mlp_ratios=[2, 2],
    )
    return SegformerForSemanticSegmentation(config)


@pytest.mark.parametrize("label_resolution", ["upsample", "downsample"])
def test_segformer_from_config_trains_on_masks_four_times_its_logits(label_resolution: str) -> None:
    x, y = torch.randn(2, *IMAGE), _masks(3)
    probed, parts = _train_step_and_strip(_segformer(), x, y, rules="dense", ignore_index=255,
                                          loss_options=LossOptions(label_resolution=label_resolution))
    out = probed(x)
    assert type(out.output).__name__ == "SemanticSegmenterOutput" and out.output.logits.shape == (2, 3, 8, 8)
    assert probed.report.output == "output['logits']"
    if label_resolution == "upsample":
        assert all(h.shape == (2, 3, 8, 8) for h in out.heads.values())
    else:  # each head at its point's own grid
        assert {tuple(h.shape[2:]) for h in out.heads.values()} <= {(8, 8), (4, 4)}


def test_hugging_face_classifier_output_is_read_at_logits() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8, num_labels=4)
    x, y = torch.randn(2, *IMAGE), torch.tensor([0, 3])
    probed, parts = _train_step_and_strip(ViTForImageClassification(config), x, y)
    out = probed(x)
    assert type(out.output).__name__ == "ImageClassifierOutput"
    assert probed.logits(out) is out.output.logits and probed.report.task == "classification"
    # Called the Hugging Face way, with the input by keyword.
    by_name = instrument(probed.strip(), input_size=IMAGE, options=TraceOptions(input_name="pixel_values"))
    out = by_name(pixel_values=x)
    by_name.loss(out, y).total.backward()
    assert all(p.grad is not None for p in by_name.autoprobe_adapters.parameters())


# --------------------------------------------------------------------------- binary, 3-D, 1-D


def test_binary_unet_with_one_logit_trains_with_dense_rules() -> None:
    x = torch.randn(2, *IMAGE)
    y = (torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    probed, parts = _train_step_and_strip(UNet(num_classes=1, width=8, depth=2), x, y, rules="dense", task="binary")
    assert probed.report.num_classes == 1 and "ce" in parts
    assert all(h.shape == (2, 1, 32, 32) for h in probed(x).heads.values())


def test_binary_is_inferred_from_one_logit_and_takes_class_ids() -> None:
    x = torch.randn(2, *IMAGE)
    y = (torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).long()
    y[0, 0, :4] = 255  # ignore_index
    probed, parts = _train_step_and_strip(UNet(num_classes=1, width=8, depth=2), x, y, rules="dense", ignore_index=255)
    assert (probed.report.task, probed.report.task_source) == ("binary", "inferred from K=1")
    assert "binary (inferred from K=1)" in probed.report.summary()
    probed.train()
    with pytest.raises(InstrumentError, match="does not fit"):  # a class id 2 is no 0/1 target
        probed.loss(probed(x), torch.full((2, 32, 32), 2))


def test_class_ids_said_on_one_logit_are_refused() -> None:
    with pytest.raises(InstrumentError, match="pass task='binary'"):
        instrument(UNet(num_classes=1, width=8, depth=2), input_size=IMAGE, rules="dense", task="dense")


@pytest.mark.parametrize("label_resolution", ["upsample", "downsample"])
def test_3d_unet_is_supervised_at_its_skip_concatenations(label_resolution: str) -> None:
    x, y = torch.randn(2, 1, 16, 16, 16), _masks(3, (16, 16, 16), ignore=None)
    probed, _ = _train_step_and_strip(UNet3D(), x, y, rules="dense",
                                      loss_options=LossOptions(label_resolution=label_resolution))
    skips = [t for t in probed.report.taps if t.point.startswith("cat")]
    assert len(skips) == 2 and all(t.layout == "NCDHW" for t in skips)
    heads = probed(x).heads
    if label_resolution == "upsample":
        assert all(h.shape == (2, 3, 16, 16, 16) for h in heads.values())
    else:
        assert heads["cat"].shape == (2, 3, 8, 8, 8)  # the coarse skip keeps its own grid


def test_1d_dense_model_trains_with_dense_rules() -> None:
    x, y = torch.randn(2, 2, 32), _masks(4, (32,), ignore=None)
    probed, _ = _train_step_and_strip(Dense1D(), x, y, rules="dense")
    assert probed.report.task == "dense" and all(h.shape == (2, 4, 32) for h in probed(x).heads.values())


# --------------------------------------------------------------------------- regression


@pytest.mark.parametrize(("loss", "intermediate"), [("dsn", "dsn/"), ("imachsr", "corr/")])
@pytest.mark.parametrize(
    ("build", "size", "target"),
    [(FlowNetLike, (6, 32, 32), (2, 2, 32, 32)), (Hourglass, (3, 32, 32), (2, 3, 16, 16))],
    ids=["flownet", "hourglass"],
)
def test_multi_scale_regression_trains_under_both_objectives(
    build: Callable[[], nn.Module], size, target, loss: str, intermediate: str
) -> None:
    x = torch.randn(2, *size)
    y = torch.randn(target, generator=torch.Generator().manual_seed(0))
    probed, parts = _train_step_and_strip(build(), x, y, rules="dense", task="regression", loss=loss)
    assert "mse" in parts and any(p.startswith(intermediate) for p in parts)
    assert all(h.shape[1] == target[1] for h in probed(x).heads.values())  # adapters map to the target's channels


def test_regression_is_never_inferred_from_the_target() -> None:
    probed = instrument(Hourglass(), input_size=(3, 32, 32), rules="dense")
    assert probed.report.task == "dense"
    with pytest.raises(InstrumentError, match="task='regression'"):
        probed.loss(probed(torch.randn(2, 3, 32, 32)), torch.rand(2, 3, 16, 16))


def test_class_ids_given_to_a_regression_objective_and_unmatched_masks_are_refused() -> None:
    regression = instrument(Hourglass(), input_size=(3, 32, 32), rules="dense", task="regression")
    with pytest.raises(InstrumentError, match="regression"):
        regression.loss(regression(torch.randn(2, 3, 32, 32)), torch.randint(0, 3, (2, 16, 16)))
    dense = instrument(Dense1D(), input_size=(2, 32), rules="dense")
    with pytest.raises(InstrumentError, match=r"\(2, 32, 32\)"):  # 2-D masks for a 1-D output: no size can match
        dense.loss(dense(torch.randn(2, 2, 32)), torch.zeros(2, 32, 32, dtype=torch.long))


def test_segmentation_example_quick_mode_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from examples import segmentation

    segmentation.main(["--quick"])
    printed = capsys.readouterr().out
    assert "DeepLabV3: dense" in printed and "SegformerForSemanticSegmentation: dense" in printed
    assert "step 1: total" in printed


def test_multilabel_classifier_and_dense_multilabel_train() -> None:
    import timm

    classifier = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    x, y = torch.randn(2, *IMAGE), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    probed, parts = _train_step_and_strip(classifier, x, y, task="multilabel")
    assert probed.report.task == "multilabel" and "ce" in parts
    masks = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    probed, _ = _train_step_and_strip(UNet(num_classes=3, width=8, depth=2), x, masks, rules="dense", task="multilabel")
    assert all(h.shape == (2, 3, 32, 32) for h in probed(x).heads.values())
