"""Tiny hand-built models whose supervision points are known exactly.

Every model here is small enough to trace in milliseconds, and each one
isolates one criterion of the paper so a test can name the node a detector
must flag (and the nodes it must not flag). Node names are the module-qualified
names autoprobe (and torchvision's feature extraction) gives them: a call to a
submodule is named by its path (``enc1.conv``), a function call inside a
module's ``forward`` by the module path and the function (``dec2.cat``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def conv_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())


class Residual(nn.Module):
    """``y = x + conv(relu(conv(x)))``: a short residual add, same width and resolution."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


# ----------------------------------------------------------------------------- skip (U-Net)


class Up(nn.Module):
    """Upsample x2, then a conv to the skip's width."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CatJoin(nn.Module):
    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return torch.cat([skip, up], dim=1)


class AddJoin(nn.Module):
    def forward(self, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return skip + up


class ToyUNet(nn.Module):
    """Two-level U-Net, 16x16 -> 8x8 -> 4x4 and back, with residual blocks at every level.

    Expected skip points: the two encoder-decoder joins, ``join2.cat`` (concat,
    8x8) and ``join1.add`` (add, 16x16). The residual adds inside ``enc1.res``,
    ``enc2.res`` and ``bottom`` are short and must not fire.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(conv_relu(3, 8), Residual(8))  # 16x16
        self.pool1 = nn.MaxPool2d(2)
        self.enc2 = nn.Sequential(conv_relu(8, 16), Residual(16))  # 8x8
        self.pool2 = nn.MaxPool2d(2)
        self.bottom = nn.Sequential(conv_relu(16, 32), Residual(32))  # 4x4
        self.up2 = Up(32, 16)
        self.join2 = CatJoin()
        self.dec2 = conv_relu(32, 16)
        self.up1 = Up(16, 8)
        self.join1 = AddJoin()
        self.dec1 = conv_relu(8, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool1(e1))
        b = self.bottom(self.pool2(e2))
        d2 = self.dec2(self.join2(e2, self.up2(b)))
        d1 = self.dec1(self.join1(e1, self.up1(d2)))
        return self.head(d1)


UNET_SKIPS = ("join2.cat", "join1.add")
UNET_RESIDUAL_ADDS = ("enc1.1.add", "enc2.1.add", "bottom.1.add")


# ----------------------------------------------------------------------------- fusion


class TwoBranch(nn.Module):
    """A stem, two parallel two-conv branches (3x3 and 5x5), a concat, a head.

    Expected fusion point: ``merge.cat``. The residual add in ``post`` must not fire.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_relu(3, 8)
        self.left = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.right = nn.Sequential(nn.Conv2d(8, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2))
        self.merge = CatJoin()
        self.post = Residual(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.post(self.merge(self.left(x), self.right(x)))
        return self.fc(self.pool(x).flatten(1))


# ----------------------------------------------------------------------------- attention


class MHAAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class SDPAAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class ExplicitAttention(SDPAAttention):
    """``softmax(q k^T * scale) v`` written out, as many timm models do when fused attention is off."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        y = attn.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, attention: type[nn.Module], dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyTransformer(nn.Module):
    """Patch embedding (16x16 image, 4x4 patches: 16 tokens), ``depth`` blocks, mean-pool head.

    Expected attention points ("after", the default): the residual add that takes each
    attention's output back, ``blocks.i.add`` for every block i.
    """

    def __init__(self, attention: type[nn.Module], depth: int = 2, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(*(Block(attention, dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


ATTENTIONS = {"mha": MHAAttention, "sdpa": SDPAAttention, "explicit": ExplicitAttention}


class SoftmaxReadout(nn.Module):
    """``softmax(fc(x))``: a softmax over classes, not over tokens; not attention."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).softmax(dim=-1)


# ----------------------------------------------------------------------------- downsampling


def strided_and_pooled() -> nn.Sequential:
    """16x16 -> maxpool -> 8x8 -> strided conv -> 4x4.

    Expected "before downsampling" points: ``1`` (the ReLU feeding the max-pool) and
    ``2`` (the max-pool's output, feeding the strided conv). The global pool ``6`` is a
    read-out, not a downsampling.
    """
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0
        nn.ReLU(),  # 1
        nn.MaxPool2d(2),  # 2
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # 3
        nn.ReLU(),  # 4
        nn.Conv2d(16, 16, 3, padding=1),  # 5
        nn.AdaptiveAvgPool2d(1),  # 6
        nn.Flatten(),  # 7
        nn.Linear(16, 10),  # 8
    )


# ----------------------------------------------------------------------------- bottleneck


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce 32 -> 8, 3x3 at 8, 1x1 expand 8 -> 32, residual add."""

    def __init__(self, width: int = 32, narrow: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, narrow, 1)
        self.bn1 = nn.BatchNorm2d(narrow)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(narrow, narrow, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(narrow)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(narrow, width, 1)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.act3(x + self.bn3(self.conv3(y)))


class BottleneckNet(nn.Module):
    """Stem to 32 channels, one bottleneck block. Expected bottleneck point: ``block.act2``,
    the last node of the narrow plateau, right before the expansion."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.block = Bottleneck()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


# ----------------------------------------------------------------------------- norm / activation change


class NormActSwitch(nn.Module):
    """A BatchNorm+ReLU conv stage, then tokens with LayerNorm and a GELU MLP.

    Expected norm-act-change points: ``norm`` (BatchNorm -> LayerNorm) and
    ``act3`` (ReLU -> GELU). The second BatchNorm and ReLU repeat the family: no change.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.norm = nn.LayerNorm(8)
        self.fc1, self.act3, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.norm(x.flatten(2).transpose(1, 2))
        return self.fc2(self.act3(self.fc1(x)))


# ----------------------------------------------------------------------------- stage boundaries


class VGGLike(nn.Module):
    """Two stages of two 3x3 convs (8 ch @ 16x16, 16 ch @ 8x8), each followed by a max-pool.

    Expected stage boundaries: ``features.3`` and ``features.8``, the last ReLU of each stage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_relu(3, 8), *conv_relu(8, 8), nn.MaxPool2d(2),  # 0-3, pool 4
            *conv_relu(8, 16), *conv_relu(16, 16), nn.MaxPool2d(2),  # 5-8, pool 9
        )
        self.classifier = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ----------------------------------------------------------------------------- graph checks


def conv_chain() -> nn.Sequential:
    """Three convs and a linear: D = 4."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


class ChannelsLast(nn.Module):
    """Conv (NCHW), permute to channels-last, LayerNorm over C (NHWC), then tokens (NLC)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.fc(x.flatten(1, 2))


def linear_ruler(n: int = 20) -> nn.Sequential:
    """``n`` linear layers in a row: node ``"k"`` sits at depth k + 1 and D = n. No detector fires on it."""
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(n)))


class TrainOnlyScale(nn.Module):
    """Doubles its input in training mode only: the traced graph shows which mode was traced."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * 2 if self.training else x


class Branchy(nn.Module):
    """Stem conv, BatchNorm, a residual block, dropout and a classifier: state and flags to check."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = Residual(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.bn(self.stem(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


# ----------------------------------------------------------------------------- detector docstring examples


class AttentionExample(nn.Module):
    """``q, k, v = qkv(x).chunk(3, -1); x = x + proj(softmax(q @ k.T) @ v)`` on 16 tokens of width 32."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        return x + self.proj((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v)


class SkipExample(nn.Module):
    """``e = conv(x); d = up(conv(pool(conv(e)))); y = cat([e, d])``, ``up`` a stride-2 transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.conv1(x)
        d = self.up(self.conv3(self.pool(self.conv2(e))))
        return torch.cat([e, d], dim=1)


class FusionExample(nn.Module):
    """``y = cat([conv3(conv1(x)), conv5(conv1(x)), conv1(x)])``: three parallel branches from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv5 = nn.Conv2d(8, 8, 5, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv3(self.conv1(x)), self.conv5(self.conv1(x)), self.conv1(x)], dim=1)


def _conv_bn_act(cin: int, act: type[nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8), act()]


IMAGE = (3, 16, 16)
TOKENS = (16, 32)

# detector ID -> (passing model, input size, the nodes it must flag), (failing model, input size)
DOCSTRING_EXAMPLES: dict[str, tuple[tuple[Any, tuple[int, ...], tuple[str, ...]], tuple[Any, tuple[int, ...]]]] = {
    "downsampling": (
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), IMAGE, ("1",)),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)), IMAGE),
    ),
    "stage-boundary": (
        (lambda: nn.Sequential(*conv_relu(3, 8), *conv_relu(8, 8), *conv_relu(8, 16, stride=2)), IMAGE, ("3",)),
        (lambda: nn.Sequential(*conv_relu(3, 8)), IMAGE),
    ),
    "bottleneck": (
        (
            lambda: nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1)),
            IMAGE,
            ("2",),
        ),
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 32, 1)), IMAGE),
    ),
    "attention": ((AttentionExample, TOKENS, ("add",)), (SoftmaxReadout, (16,))),
    "skip": ((SkipExample, IMAGE, ("cat",)), (lambda: Residual(3), IMAGE)),
    "norm-act-change": (
        (lambda: nn.Sequential(*_conv_bn_act(3, nn.ReLU), *_conv_bn_act(8, nn.GELU)), IMAGE, ("5",)),
        (lambda: nn.Sequential(*_conv_bn_act(3, nn.ReLU), *_conv_bn_act(8, nn.ReLU)), IMAGE),
    ),
    "fusion": ((FusionExample, IMAGE, ("cat",)), (lambda: Residual(3), IMAGE)),
}


# ----------------------------------------------------------------------------- user model files (module:factory)

# fx cannot trace Gate: it branches on a tensor's value (line 6 of the written file).
VALUE_BRANCH_SOURCE = """\
from torch import nn


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean(dim=(2, 3)))


def build():
    return Net()
"""
# The same net branching on a shape: fx still cannot trace it, but as a leaf it runs on meta.
SHAPE_BRANCH_SOURCE = VALUE_BRANCH_SOURCE.replace("if x.sum() > 0:", "if x.shape[-1] > 4:")


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = _conv_bn_relu(width, width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class BranchyNet(nn.Module):
    """A small residual CNN; ``branch`` picks its control flow: ``ndim`` (a shape, fx specializes it),
    ``device`` (fx cannot decide it, export can), ``value`` (only a real run can decide it)."""

    def __init__(self, branch: str = "none") -> None:
        super().__init__()
        self.branch = branch
        self.stem = _conv_bn_relu(3, 16)
        self.stage1 = nn.Sequential(_Residual(16), _Residual(16))
        self.down = _conv_bn_relu(16, 32, stride=2)
        self.stage2 = nn.Sequential(_Residual(32), _Residual(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch == "ndim" and x.ndim == 3:  # shape-dependent: fx decides it at the traced size
            x = x.unsqueeze(0)
        if self.branch == "device" and x.device.type == "mps":  # device-dependent: export decides it, fx cannot
            x = x.contiguous()
        x = self.stage1(self.stem(x))
        if self.branch == "value" and x.sum() > 0:  # value-dependent: only a real run can decide it
            x = x * 0.5
        x = self.stage2(self.down(x))
        return self.head(x.mean((2, 3)))


class SliceThenShared(nn.Module):
    """Issue 12.3: fx stops at the in-place slice; export counted F.relu and the module relu's calls together."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.relu = nn.ReLU()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, 1, 1) for _ in range(6))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x[:, :2] = x[:, :2] * 0.5
        x = F.relu(x)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < 5:
                x = self.relu(x)
            if i in (1, 3):
                x = self.pool(x)
        return self.fc(x.mean((2, 3)))
