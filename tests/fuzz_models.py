"""Random small models of the families in issue 12, and the guarantees autoprobe must keep on each.

``build(family, seed)`` makes one model from a seed (``random.Random(seed)`` picks widths, depths,
norms, activations, strides, branch counts); ``check(case)`` runs it through ``analyze`` (at two input
sizes where the model allows both), ``instrument``, one training step, ``loss``, ``strip()`` and a
pickle round trip, and raises ``Broken`` with the guarantee that failed. An ``AutoprobeError`` is an
allowed outcome (autoprobe refused the model with a message); any other exception is a failure.

Used by ``tests/test_fuzz.py`` (a fixed-seed CI slice) and ``benchmarks/fuzz.py`` (the long run).
"""

from __future__ import annotations

import copy
import io
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import autoprobe
from autoprobe.api import analyze
from autoprobe.errors import AutoprobeError
from autoprobe.trace import TraceOptions

FAMILIES = (
    "sequential", "residual", "inception", "unet", "attention", "normmix", "shared", "control", "inplace",
    "conv1d", "conv3d", "functional", "encdec", "attrs", "isinstance",
)


class Broken(AssertionError):
    """A guarantee autoprobe must keep did not hold."""


@dataclass
class Case:
    """One random model and how to feed it."""

    family: str
    seed: int
    model: nn.Module
    sizes: tuple[tuple[int, ...], ...]  # one or two input sizes (without batch) the model accepts
    dense: bool = False  # output (B, K, *spatial): labels are masks
    needs_values: bool = False  # its forward reads tensor values: inspect needs allow_real_data
    on_fx: bool = False  # its Python reads types or sizes only: fx must trace it (no fallback)
    notes: list[str] = field(default_factory=list)


def _norm(r: random.Random, c: int, dims: int = 2) -> nn.Module:
    kind = r.choice(["batch", "group", "instance", "none"])
    if kind == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](c)
    if kind == "group":
        return nn.GroupNorm(2 if c % 2 == 0 else 1, c)
    if kind == "instance":
        return (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1](c, affine=True)
    return nn.Identity()


def _act(r: random.Random, inplace: bool = False) -> nn.Module:
    return r.choice([lambda: nn.ReLU(inplace=inplace), nn.GELU, nn.SiLU, lambda: nn.LeakyReLU(0.1), nn.Hardswish])()


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, dims: int = 2) -> nn.Module:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](cin, cout, k, stride, k // 2)


def _width(r: random.Random) -> int:
    return r.choice([4, 6, 8, 12, 16])


class _Head(nn.Module):
    def __init__(self, c: int, k: int, dims: int) -> None:
        super().__init__()
        self.dims = tuple(range(2, 2 + dims))
        self.fc = nn.Linear(c, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(self.dims))


def _sequential(r: random.Random, dims: int = 2) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    c = r.choice([1, 3]) if dims == 2 else r.choice([1, 2, 4])
    cin = c
    downs = 0
    for _ in range(r.randint(2, 5)):
        cout = _width(r)
        stride = 2 if r.random() < 0.35 and downs < 2 else 1
        downs += stride == 2
        layers += [_conv(c, cout, 3, stride, dims), _norm(r, cout, dims), _act(r)]
        if r.random() < 0.2 and downs < 2:
            layers.append((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[dims - 1](2))
            downs += 1
        c = cout
    layers.append(_Head(c, r.randint(2, 5), dims))
    model = nn.Sequential(*layers)
    model.cin = cin  # type: ignore[assignment]
    return model, cin


class _Residual(nn.Module):
    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c = _width(r)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), _norm(r, c), _act(r))
        blocks = []
        for _ in range(r.randint(1, 3)):
            blocks.append(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), _norm(r, c), _act(r), nn.Conv2d(c, c, 3, 1, 1)))
        self.blocks = nn.ModuleList(blocks)
        self.down = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.act = _act(r)
        self.head = _Head(2 * c, r.randint(2, 5), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = self.act(block(x) + x)
        return self.head(self.down(x))


class _Inception(nn.Module):
    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c = _width(r)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), _act(r))
        widths = [_width(r) for _ in range(r.randint(2, 4))]
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, w, r.choice([1, 3]), 1, 0), _norm(r, w), _act(r)) if i % 2 == 0 else
            nn.Sequential(nn.Conv2d(c, w, 1), nn.Conv2d(w, w, 3, 1, 1), _act(r))
            for i, w in enumerate(widths)
        )
        # 1x1 branches keep the size; the others pad: every branch keeps H x W
        for b in self.branches:
            for m in b.modules():
                if isinstance(m, nn.Conv2d):
                    m.padding = (m.kernel_size[0] // 2,) * 2
        total = sum(widths)
        self.mix = nn.Conv2d(total, total, 3, 2, 1)
        self.head = _Head(total, r.randint(2, 5), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.mix(torch.cat([b(x) for b in self.branches], 1)))


class _UNet(nn.Module):
    def __init__(self, r: random.Random, dims: int = 2) -> None:
        super().__init__()
        c = _width(r)
        conv = lambda a, b, s=1: _conv(a, b, 3, s, dims)  # noqa: E731
        self.enc1 = nn.Sequential(conv(1 if dims == 3 else 3, c), _norm(r, c, dims), _act(r))
        self.enc2 = nn.Sequential(conv(c, 2 * c, 2), _norm(r, 2 * c, dims), _act(r))
        self.bottom = nn.Sequential(conv(2 * c, 2 * c, 2), _act(r))
        self.up2 = (nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 2](2 * c, 2 * c, 2, 2)
        self.dec2 = nn.Sequential(conv(4 * c, 2 * c), _act(r))
        self.mode = r.choice(["transpose", "interpolate"])
        self.up1 = (nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 2](2 * c, c, 2, 2)
        self.reduce = _conv(2 * c, c, 1, 1, dims)
        self.dec1 = nn.Sequential(conv(2 * c, c), _act(r))
        self.head = _conv(c, r.randint(2, 4), 1, 1, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottom(e2)
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        if self.mode == "transpose":
            u = self.up1(d2)
        else:
            u = self.reduce(F.interpolate(d2, scale_factor=2.0, mode="nearest"))
        return self.head(self.dec1(torch.cat([u, e1], 1)))


class _EncDec(nn.Module):
    """A multi-scale encoder whose every stage feeds the decoder through a lateral 1x1 conv, merged top-down
    (FPN, PAN) and then summed over a stack (smp's FPN) or concatenated and fused (UPerNet)."""

    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c, stages = _width(r), r.randint(2, 3)
        widths = [c * 2**i for i in range(stages)]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3 if i == 0 else widths[i - 1], w, 3, 1 if i == 0 else 2, 1), _norm(r, w), _act(r),
                          *(m for _ in range(r.randint(0, 2)) for m in (nn.Conv2d(w, w, 3, 1, 1), _act(r))))
            for i, w in enumerate(widths)
        )
        d = r.choice([4, 8])
        self.laterals = nn.ModuleList(nn.Conv2d(w, d, 1) for w in widths)
        self.smooth = nn.ModuleList(nn.Sequential(nn.Conv2d(d, d, 3, 1, 1), _act(r)) for _ in widths)
        self.merge = r.choice(["sum", "cat"])
        self.fuse = nn.Conv2d(d * len(widths) if self.merge == "cat" else d, d, 3, 1, 1)
        self.head = nn.Conv2d(d, r.randint(2, 4), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        p = self.laterals[-1](features[-1])
        pyramid = [p]
        for lateral, feature in zip(self.laterals[-2::-1], features[-2::-1]):
            p = lateral(feature) + F.interpolate(p, size=feature.shape[-2:], mode="nearest")
            pyramid.append(p)
        size = features[0].shape[-2:]
        levels = [F.interpolate(s(q), size=size, mode="nearest") for s, q in zip(self.smooth, pyramid)]
        merged = torch.stack(levels).sum(0) if self.merge == "sum" else torch.cat(levels, 1)
        return self.head(self.fuse(merged))


class _Attention(nn.Module):
    def __init__(self, r: random.Random) -> None:
        super().__init__()
        d = r.choice([8, 16])
        self.patch = r.choice([2, 4])
        self.embed = nn.Conv2d(3, d, self.patch, self.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if r.random() < 0.5 else None
        self.kind = r.choice(["mha", "manual", "sdpa"])
        self.blocks = nn.ModuleList()
        for _ in range(r.randint(1, 2)):
            block = nn.Module()
            block.norm1 = nn.LayerNorm(d)
            block.attn = nn.MultiheadAttention(d, 2, batch_first=True) if self.kind == "mha" else nn.Linear(d, 3 * d)
            block.proj = nn.Linear(d, d)
            block.norm2 = nn.LayerNorm(d)
            block.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.blocks.append(block)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, r.randint(2, 5))

    def _attend(self, block: nn.Module, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "mha":
            return block.attn(t, t, t, need_weights=False)[0]
        b, n, d = t.shape
        q, k, v = block.attn(t).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4).unbind(0)
        if self.kind == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = ((q @ k.transpose(-2, -1)) * (d // 2) ** -0.5).softmax(-1) @ v
        return block.proj(a.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        for block in self.blocks:
            t = t + self._attend(block, block.norm1(t))
            t = t + block.mlp(block.norm2(t))
        return self.head(self.norm(t).mean(1))


class _NormMix(nn.Module):
    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c = _width(r)
        self.c1 = nn.Conv2d(3, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)
        self.ln = nn.LayerNorm(c)
        self.c2 = nn.Conv2d(c, c, 3, 2, 1)
        self.gn = nn.GroupNorm(1, c)
        self.act = _act(r)
        self.order = r.sample(["bn", "ln", "gn"], 3)
        self.head = _Head(c, r.randint(2, 5), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        for name in self.order:
            if name == "ln":
                x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            else:
                x = getattr(self, name)(x)
            x = self.act(x)
        return self.head(self.c2(x))


class _Shared(nn.Module):
    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c = _width(r)
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.relu = nn.ReLU()
        if r.random() < 0.5:
            self.conv_1 = nn.Conv2d(c, c, 3, 1, 1)  # a sibling named like the second call
        self.repeats = r.randint(2, 3)
        self.down = nn.Conv2d(c, c, 3, 2, 1)
        self.head = _Head(c, r.randint(2, 5), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        for _ in range(self.repeats):
            x = self.relu(self.conv(x))
        if hasattr(self, "conv_1"):
            x = self.relu(self.conv_1(x))
        return self.head(self.down(x))


class _Control(nn.Module):
    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c = _width(r)
        self.kind = r.choice(["shape", "value"])
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), _act(r))
        self.a = nn.Conv2d(c, c, 3, 1, 1)
        self.b = nn.Conv2d(c, c, 3, 1, 1)
        self.down = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), _act(r))
        self.head = _Head(c, r.randint(2, 5), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.kind == "shape":
            x = self.a(x) if x.shape[-1] >= 8 else self.b(x)
        else:
            x = self.a(x) if x.sum() > 0 else self.b(x)
        return self.head(self.down(x))


class _InPlace(nn.Module):
    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c = _width(r)
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.kind = r.choice(["slice", "iadd", "relu_"])
        self.relu = nn.ReLU(inplace=True)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for _ in range(r.randint(2, 4)))
        self.pool = nn.MaxPool2d(2)
        self.head = _Head(c, r.randint(2, 5), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.kind == "slice":
            x[:, :2] = x[:, :2] * 0.5
        x = F.relu(x)
        for i, conv in enumerate(self.convs):
            y = conv(x)
            if self.kind == "iadd":
                y += x
            x = self.relu(y)
            if i == 1:
                x = self.pool(x)
        return self.head(x)


class _Functional(nn.Module):
    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c = _width(r)
        self.w1 = nn.Parameter(torch.randn(c, 3, 3, 3) * 0.1)
        self.w2 = nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.w3 = nn.Parameter(torch.randn(r.randint(2, 5), c) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.w1, padding=1))
        x = F.max_pool2d(F.relu(F.conv2d(x, self.w2, padding=1)), 2)
        x = F.gelu(F.conv2d(x, self.w2, padding=1))
        return F.linear(x.mean((2, 3)), self.w3)


class _Attrs(nn.Module):
    """A forward that writes attributes (issue 25.1): a window clipped to the map's size (HF Swin's
    ``self.window_size = min(input_resolution)``), the last input size seen and a call counter."""

    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c = _width(r)
        self.window = r.choice([4, 8, 32])
        self.calls = 0
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), _act(r))
        self.mix = nn.Conv2d(c, c, 3, 1, 1)
        self.down = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), _act(r))
        self.head = _Head(c, r.randint(2, 5), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.last_size = x.shape[-1]
        x = self.stem(x)
        if min(x.shape[-2:]) <= self.window:
            self.window = min(x.shape[-2:])
        return self.head(self.down(self.mix(x) + x))


class _IsInstance(nn.Module):
    """A forward that branches on ``isinstance(x, torch.Tensor)`` (MONAI's ``torch.jit.isinstance``, issue 25.3):
    a tensor goes through ``a``, a tuple or list through ``b``; fx must take the branch the model takes."""

    def __init__(self, r: random.Random) -> None:
        super().__init__()
        c = _width(r)
        self.jit = r.random() < 0.5
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), _act(r))
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), _act(r))
        self.b = nn.Conv2d(c, 2 * c, 1)  # another width: the wrong branch fails, it does not pass unseen
        self.head = _Head(c, r.randint(2, 5), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        tensor = torch.jit.isinstance(x, torch.Tensor) if self.jit else isinstance(x, torch.Tensor)
        return self.head(self.a(x) if tensor else self.b(x[0]))


def build(family: str, seed: int) -> Case:
    """One random model of ``family`` from ``seed``, with the input sizes it accepts."""
    r = random.Random(f"{family}:{seed}")
    torch.manual_seed(seed)
    two_d = ((3, 8, 8), (3, 16, 16))
    if family == "sequential":
        model, cin = _sequential(r)
        return Case(family, seed, model, ((cin, 8, 8), (cin, 16, 16)))
    if family == "conv1d":
        model, cin = _sequential(r, dims=1)
        return Case(family, seed, model, ((cin, 16), (cin, 32)))
    if family == "conv3d":
        if r.random() < 0.5:
            model, cin = _sequential(r, dims=3)
            return Case(family, seed, model, ((cin, 8, 8, 8), (cin, 16, 16, 16)))
        return Case(family, seed, _UNet(r, dims=3), ((1, 8, 8, 8), (1, 16, 16, 16)), dense=True)
    if family == "unet":
        return Case(family, seed, _UNet(r), two_d, dense=True)
    if family == "attention":
        return Case(family, seed, _Attention(r), two_d)
    if family == "encdec":
        return Case(family, seed, _EncDec(r), two_d, dense=True)
    if family == "control":
        model = _Control(r)
        return Case(family, seed, model, two_d, needs_values=model.kind == "value")
    factories: dict[str, Callable[[random.Random], nn.Module]] = {
        "residual": _Residual, "inception": _Inception, "normmix": _NormMix, "shared": _Shared,
        "inplace": _InPlace, "functional": _Functional, "attrs": _Attrs, "isinstance": _IsInstance,
    }
    return Case(family, seed, factories[family](r), two_d, on_fx=family in ("attrs", "isinstance"))


# ----------------------------------------------------------------------------- the guarantees


def _snapshot(model: nn.Module) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = tuple((n, m.training) for n, m in model.named_modules())
    hooks = tuple(
        (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()
    )
    # Every module's own attributes by identity (a forward that writes one, traced, must not leave a Proxy behind).
    attributes = tuple((n, tuple((k, id(v)) for k, v in vars(m).items() if not k.startswith("_")))
                       for n, m in model.named_modules())
    return state, flags, hooks, attributes


def _same_snapshot(a: tuple, b: tuple) -> bool:
    if a[1] != b[1] or a[2] != b[2] or a[3] != b[3] or a[0].keys() != b[0].keys():
        return False
    return all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _layouts(graph: autoprobe.graph.LayerGraph) -> dict[str, object]:
    return {n.name: n.layout for n in graph}


def check(case: Case) -> str:
    """Run every guarantee on ``case``; returns ``"ok"`` or ``"refused: <error class>"``, raises ``Broken``.

    Other exceptions propagate: they are crashes (not an ``AutoprobeError``).
    """
    model = case.model
    before = _snapshot(model)
    real = case.needs_values
    try:
        analyses = [analyze(model, input_size=size, options=TraceOptions(allow_real_data=real)) for size in case.sizes]
    except AutoprobeError as exc:
        if not _same_snapshot(before, _snapshot(model)):
            raise Broken("analyze changed the user's model") from exc
        return f"refused: {type(exc).__name__}"
    if not _same_snapshot(before, _snapshot(model)):
        raise Broken("analyze changed the user's model (parameters, buffers, flags or hooks)")
    first = analyses[0]
    for other in analyses[1:]:
        mine, theirs = _layouts(first.graph), _layouts(other.graph)
        # A forward that branches on values may take another branch on another batch: compare the common nodes.
        diff = {k: (v, theirs[k]) for k, v in mine.items() if k in theirs and theirs[k] != v}
        if diff or (not case.needs_values and mine.keys() != theirs.keys()):
            raise Broken(f"layouts depend on the input size: {diff or set(mine) ^ set(theirs)}")
        if case.needs_values:
            continue
        got = [(p.name, p.layout) for p in first.selection.points]
        if got != [(p.name, p.layout) for p in other.selection.points]:
            raise Broken(f"the selection depends on the input size: {got} vs "
                         f"{[(p.name, p.layout) for p in other.selection.points]}")
    selection = first.selection
    if case.on_fx and selection.backend != "fx":
        raise Broken(f"a forward that reads only types or sizes fell off fx: {selection.notes}")
    for point in selection.points:
        if point.layout is None or first.graph[point.name].channels is None:
            raise Broken(f"point {point.name} has no layout")
        if selection.backend != "fx" and first.graph[point.name].call is None:
            raise Broken(f"point {point.name} is not a module output on the {selection.backend} backend")
    size = case.sizes[0]
    reference = copy.deepcopy(model)
    try:
        probed = autoprobe.instrument(model, selection, input_size=size,
                                      options=TraceOptions(allow_real_data=real))
    except AutoprobeError as exc:
        if not _same_snapshot(before, _snapshot(model)):
            raise Broken("a refused instrument changed the user's model") from exc
        return f"refused: {type(exc).__name__} (instrument)"
    if not _same_snapshot(before, _snapshot(model)):
        raise Broken("instrument changed the user's model")
    x = torch.randn(2, *size)
    probed.train()
    try:
        out = probed(x)
    except AutoprobeError as exc:
        # A value branch took the other way on this batch: the hook engine says so instead of tapping wrongly.
        if not case.needs_values:
            raise Broken(f"the forward refused a model without value branches: {exc}") from exc
        return f"refused: {type(exc).__name__} (forward)"
    # One contract: every point inspect chose is tapped by its own name, with the shape inspect recorded.
    if [t.point for t in probed.report.taps] != list(selection.names):
        raise Broken(f"instrument tapped {[t.point for t in probed.report.taps]}, inspect chose {selection.names}")
    for tap, point in zip(probed.report.taps, selection.points):
        if tuple(tap.feature_shape) != tuple(point.shape):
            raise Broken(f"tap {tap.point} has shape {tap.feature_shape}, inspect recorded {point.shape}")
    for tap in probed.report.taps:
        feature = out.features[tap.point]
        if tuple(feature.shape) != tuple(tap.feature_shape):
            raise Broken(f"tap {tap.point} caught {tuple(feature.shape)}, the selection recorded {tap.feature_shape}")
    logits = probed.logits(out)
    k = logits.shape[1]
    target = torch.randint(k, (2, *logits.shape[2:])) if case.dense else torch.randint(k, (2,))
    result = probed.loss(out, target)
    total = result[0] if isinstance(result, tuple) else result.total
    if not torch.isfinite(total):
        raise Broken(f"loss is not finite: {total}")
    total.backward()
    optimizer = torch.optim.SGD(probed.parameters(), lr=1e-3)
    optimizer.step()
    blob = io.BytesIO()
    pickle.dump(probed, blob)
    blob.seek(0)
    restored = pickle.load(blob)
    probed.eval()
    restored.eval()
    with torch.no_grad():
        mine, theirs = probed(x), restored(x)
    if not torch.equal(probed.logits(mine), restored.logits(theirs)):
        raise Broken("a pickle round trip changed the output")
    stripped = probed.strip()
    if stripped is not model:
        raise Broken("strip() did not return the user's model")
    if stripped.state_dict().keys() != before[0].keys():
        raise Broken("strip() changed the state_dict keys")
    reference.load_state_dict(stripped.state_dict())
    copy.deepcopy(stripped).load_state_dict(stripped.state_dict())  # a leaked Proxy broke deepcopy (issue 25.1)
    stripped.eval()
    reference.eval()
    with torch.no_grad():
        if not torch.equal(stripped(x), reference(x)):
            raise Broken("strip() is not bit-identical to the plain model in eval")
    return "ok"
