"""The real-models corpus of issue 25: builders of models the other tests do not name, all with random weights.

Each ``Case`` names a model as a user would meet it (smp on non-ResNet encoders, Hugging Face from config, MONAI,
nnU-Net's PlainConvUNet, torchvision segmentation and detection, timm hybrids), the library it needs, the input size
it is traced at, the rule pack, and whether it is in the fast subset of the default suite. Builders import their
library when called, so listing the corpus imports nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn


class Case(NamedTuple):
    """One corpus model: ``id``, the library it needs (for ``importorskip``), its builder, the traced input size
    (channels first, no batch), the rule pack, whether it runs in the default suite, and whether it is a detection
    model (inspected, and refused by ``instrument`` with what to pass), and the backend it traces on (fx, except
    where the notes of the case say why not)."""

    id: str
    library: str
    build: Callable[[], nn.Module]
    size: tuple[int, ...]
    rules: str = "dense"
    fast: bool = False
    detection: bool = False
    backend: str = "fx"


def _smp(architecture: str, encoder: str, **options: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, architecture)(encoder_name=encoder, encoder_weights=None, classes=2, **options)

    return build


def _hf(model: str, config: str, **options: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model)(getattr(transformers, config)(**options))

    return build


def _upernet() -> nn.Module:
    import transformers

    backbone = transformers.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                                           out_features=["stage1", "stage2", "stage3", "stage4"])
    return transformers.UperNetForSemanticSegmentation(transformers.UperNetConfig(
        backbone_config=backbone, hidden_size=32, auxiliary_in_channels=64, num_labels=3))


def _monai(name: str, **options: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import monai.networks.nets as nets

        return getattr(nets, name)(**options)

    return build


def _plain_conv_unet() -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn as tnn

    return PlainConvUNet(input_channels=1, n_stages=4, features_per_stage=(8, 16, 32, 64), conv_op=tnn.Conv2d,
                         kernel_sizes=3, strides=(1, 2, 2, 2), n_conv_per_stage=2, num_classes=3,
                         n_conv_per_stage_decoder=2, conv_bias=True, norm_op=tnn.InstanceNorm2d,
                         norm_op_kwargs={"affine": True}, nonlin=tnn.LeakyReLU, nonlin_kwargs={"inplace": True})


def _tv_segmentation(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import segmentation

        return getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3)

    return build


def _tv_detection(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import detection

        return getattr(detection, name)(weights=None, weights_backbone=None, num_classes=3)

    return build


def _timm(name: str, **options: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=5, **options)

    return build


_BEIT = dict(image_size=64, patch_size=8, num_hidden_layers=4, hidden_size=96, intermediate_size=384,
             num_attention_heads=4, use_relative_position_bias=True, num_labels=5)
_UNETR = dict(in_channels=1, out_channels=2, img_size=(32, 32, 32), feature_size=8, hidden_size=96, mlp_dim=192,
              num_heads=4)

CORPUS: tuple[Case, ...] = (
    # segmentation_models_pytorch, non-ResNet encoders (timm's ``tu-`` among them)
    Case("smp-Unet-efficientnet-b0", "segmentation_models_pytorch", _smp("Unet", "efficientnet-b0"), (3, 64, 64)),
    Case("smp-UnetPlusPlus-mobilenet_v2", "segmentation_models_pytorch", _smp("UnetPlusPlus", "mobilenet_v2"),
         (3, 64, 64)),
    Case("smp-DeepLabV3Plus-efficientnet-b3", "segmentation_models_pytorch", _smp("DeepLabV3Plus", "efficientnet-b3"),
         (3, 64, 64)),
    Case("smp-FPN-tu-convnext_atto", "segmentation_models_pytorch", _smp("FPN", "tu-convnext_atto"), (3, 64, 64)),
    Case("smp-Linknet-tu-regnety_002", "segmentation_models_pytorch", _smp("Linknet", "tu-regnety_002"), (3, 64, 64)),
    Case("smp-MAnet-mobilenet_v2", "segmentation_models_pytorch", _smp("MAnet", "mobilenet_v2"), (3, 64, 64)),
    Case("smp-PAN-tu-mobilenetv3_small_100", "segmentation_models_pytorch", _smp("PAN", "tu-mobilenetv3_small_100"),
         (3, 128, 128)),  # PAN's pyramid attention pools the 1/32 map three times more: 64x64 leaves nothing
    Case("smp-PSPNet-tu-efficientnet_lite0", "segmentation_models_pytorch", _smp("PSPNet", "tu-efficientnet_lite0"),
         (3, 64, 64)),
    Case("smp-UPerNet-tu-convnext_atto", "segmentation_models_pytorch", _smp("UPerNet", "tu-convnext_atto"),
         (3, 64, 64)),
    Case("smp-Segformer-mit_b0", "segmentation_models_pytorch", _smp("Segformer", "mit_b0"), (3, 64, 64)),
    # Hugging Face, from config
    Case("hf-beit", "transformers", _hf("BeitForImageClassification", "BeitConfig", **_BEIT), (3, 64, 64),
         rules="default", fast=True),
    Case("hf-swin", "transformers", _hf("SwinForImageClassification", "SwinConfig", image_size=64, patch_size=4,
                                        embed_dim=16, depths=[1, 1, 2], num_heads=[1, 2, 4], window_size=4,
                                        num_labels=5), (3, 64, 64), rules="default"),
    Case("hf-dpt", "transformers", _hf("DPTForSemanticSegmentation", "DPTConfig", image_size=64, patch_size=8,
                                       num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[
                                           16, 32, 64, 64], fusion_hidden_size=32, num_labels=3), (3, 64, 64)),
    Case("hf-upernet-convnext", "transformers", _upernet, (3, 64, 64)),
    Case("hf-mobilevitv2", "transformers", _hf("MobileViTV2ForSemanticSegmentation", "MobileViTV2Config",
                                               width_multiplier=0.5, num_labels=3), (3, 128, 128)),
    Case("hf-segformer", "transformers", _hf("SegformerForSemanticSegmentation", "SegformerConfig",
                                             hidden_sizes=[16, 32, 64, 128], decoder_hidden_size=64, num_labels=3),
         (3, 64, 64)),
    # MONAI, 2-D and 3-D
    Case("monai-unetr", "monai", _monai("UNETR", **_UNETR), (1, 32, 32, 32), fast=True),
    Case("monai-basicunet-2d", "monai", _monai("BasicUNet", spatial_dims=2, in_channels=1, out_channels=3,
                                               features=(8, 8, 16, 32, 64, 8)), (1, 64, 64), fast=True),
    Case("monai-swinunetr", "monai", _monai("SwinUNETR", in_channels=1, out_channels=2, feature_size=12),
         (1, 64, 64, 64), backend="export"),  # not yet on fx (issue 25.8 asks for BEiT and UNETR first)
    Case("monai-attentionunet-2d", "monai", _monai("AttentionUnet", spatial_dims=2, in_channels=1, out_channels=3,
                                                   channels=(8, 16, 32, 64), strides=(2, 2, 2)), (1, 64, 64)),
    Case("monai-segresnet-3d", "monai", _monai("SegResNet", spatial_dims=3, in_channels=1, out_channels=2,
                                               init_filters=8), (1, 32, 32, 32)),
    Case("monai-dynunet-3d", "monai", _monai("DynUNet", spatial_dims=3, in_channels=1, out_channels=2,
                                             kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                                             upsample_kernel_size=[2, 2, 2], filters=[8, 16, 32, 64]),
         (1, 32, 32, 32)),
    # nnU-Net's architectures
    Case("nnunet-plainconvunet", "dynamic_network_architectures", _plain_conv_unet, (1, 64, 64), fast=True),
    # torchvision segmentation and detection
    Case("tv-deeplabv3_mobilenet_v3_large", "torchvision", _tv_segmentation("deeplabv3_mobilenet_v3_large"),
         (3, 64, 64)),
    Case("tv-lraspp_mobilenet_v3_large", "torchvision", _tv_segmentation("lraspp_mobilenet_v3_large"), (3, 64, 64)),
    Case("tv-fcn_resnet50", "torchvision", _tv_segmentation("fcn_resnet50"), (3, 64, 64)),
    Case("tv-fasterrcnn_mobilenet_v3_large_fpn", "torchvision", _tv_detection("fasterrcnn_mobilenet_v3_large_fpn"),
         (3, 128, 128), detection=True),
    # timm hybrids (convolutions and attention)
    Case("timm-mobilevit_xxs", "timm", _timm("mobilevit_xxs"), (3, 128, 128), rules="default"),
    Case("timm-mobilevitv2_050", "timm", _timm("mobilevitv2_050"), (3, 128, 128), rules="default"),
    Case("timm-levit_128s", "timm", _timm("levit_128s"), (3, 224, 224), rules="default"),
    Case("timm-efficientformerv2_s0", "timm", _timm("efficientformerv2_s0"), (3, 224, 224), rules="default"),
    Case("timm-edgenext_xx_small", "timm", _timm("edgenext_xx_small"), (3, 128, 128), rules="default"),
    Case("timm-coatnet_pico_rw_224", "timm", _timm("coatnet_pico_rw_224"), (3, 224, 224), rules="default"),
    Case("timm-fastvit_t8", "timm", _timm("fastvit_t8"), (3, 128, 128), rules="default"),
)
