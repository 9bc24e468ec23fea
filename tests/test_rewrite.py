"""Tests for ``autoprobe.rewrite``: instrument, the probed forward and loss, strip, save/load, engines.

Real timm models are built with fresh weights (``pretrained=False``) at 64x64
inputs, so the whole file runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprobe
from autoprobe.api import analyze
from autoprobe.errors import InstrumentError, SelectionError
from autoprobe.losses import DSN, LossOptions
from autoprobe.rewrite import ADAPTERS, Probed, ProbedOutput, RewriteReport, Tap, instrument
from autoprobe.select import Fired, Point
from conftest import REPO

sys.path.insert(0, str(REPO))  # examples/ is not installed; the reference lock resolves it from the repo root too
from examples.unet import UNet  # noqa: E402

torch.set_num_threads(2)


# --------------------------------------------------------------------------- models


def TinyUNet(num_classes: int = 4) -> UNet:  # noqa: N802 - reads like the class it builds
    """The example U-Net at its smallest: two downsamplings, 8 to 32 channels, (B, K, H, W) logits."""
    return UNet(num_classes=num_classes, width=8, depth=2)


def _small_cnn(num_classes: int = 5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


def _timm(name: str, **kwargs: object) -> nn.Module:
    import timm

    return timm.create_model(name, num_classes=10, pretrained=False, **kwargs)


def _fingerprint(model: nn.Module) -> dict[str, object]:
    """Everything instrument must leave alone: flags, attribute names, hooks, tensors (by identity and value)."""
    return {
        "modules": [(name, id(m), m.training, sorted(vars(m)), sorted(m._modules), sorted(m._parameters),
                     sorted(m._buffers), len(m._forward_hooks), len(m._forward_pre_hooks))
                    for name, m in model.named_modules()],
        "state": {k: (id(v), v.clone()) for k, v in model.state_dict(keep_vars=True).items()},
    }


def _same_fingerprint(a: dict[str, object], b: dict[str, object]) -> bool:
    if a["modules"] != b["modules"] or a["state"].keys() != b["state"].keys():
        return False
    return all(a["state"][k][0] == b["state"][k][0] and torch.equal(a["state"][k][1], b["state"][k][1])
               for k in a["state"])


def _selection_at(model: nn.Module, names: list[str], input_size: tuple[int, ...]) -> autoprobe.Selection:
    """A selection with hand-picked points, for cases the rules would not pick."""
    analysis = analyze(model, input_size=input_size)
    graph = analysis.graph
    chosen = tuple(
        Point(name=n, fx_name=graph[n].fx_name, module_path=graph[n].module_path, depth=graph[n].depth,
              shape=graph[n].shape, layout=graph[n].layout, score=1.0,
              fired=(Fired(detector="test", reason="hand-picked", score=1.0),))
        for n in names
    )
    return dataclasses.replace(analysis.selection, points=chosen)


# --------------------------------------------------------------------------- done-when: four architectures

CASES = {
    "resnet18": (lambda: _timm("resnet18"), (3, 64, 64), "classification"),
    "convnext_tiny": (lambda: _timm("convnext_tiny"), (3, 64, 64), "classification"),
    "vit_small_patch16_224": (lambda: _timm("vit_small_patch16_224", img_size=64), (3, 64, 64), "classification"),
    "unet": (lambda: TinyUNet(num_classes=4), (3, 32, 32), "dense"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_reaches_every_adapter_and_strip_is_bit_identical(case: str) -> None:
    build, size, task = CASES[case]
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    before = _fingerprint(model)

    probed = instrument(model, input_size=size)
    assert _same_fingerprint(before, _fingerprint(model)), "instrument changed the user's model"
    assert probed.task == task and probed.report.task_source == "inferred"
    assert len(probed.report.taps) >= 1

    x = torch.randn(4, *size)
    out = probed.train()(x)
    k = out.output.shape[1]
    y = torch.randint(0, k, (4,)) if task == "classification" else torch.randint(0, k, (4, *size[1:]))
    total, parts = probed.loss(out, y)
    optimizer = torch.optim.SGD(probed.parameters(), lr=0.05)
    optimizer.zero_grad()
    total.backward()
    assert torch.isfinite(total)
    points = [t.point for t in probed.report.taps]
    # The default objective, DSN: CE at the output and at every point's (conv) head.
    assert set(parts) == {"ce", *(f"dsn/{p}" for p in points)}
    for name, param in getattr(probed, ADAPTERS).named_parameters():
        assert param.grad is not None, f"adapter parameter {name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"adapter parameter {name} has a non-finite gradient"
    optimizer.step()
    trained = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    assert any(not torch.equal(v, reference.state_dict()[k]) for k, v in trained.items()), "user weights did not train"

    plain = probed.strip()
    assert plain is model
    assert list(plain.state_dict()) == list(reference.state_dict())
    probed.eval()
    assert not plain.training
    with torch.no_grad():
        stripped_out = plain(x)
        probed_out = probed(x).output
        reference.load_state_dict(plain.state_dict())
        reference.eval()
        assert torch.equal(stripped_out, probed_out)
        assert torch.equal(stripped_out, reference(x))


# --------------------------------------------------------------------------- forward, report, names


def test_forward_returns_typed_output_with_heads_and_features_per_point() -> None:
    torch.manual_seed(0)
    model = _timm("resnet18")
    probed = instrument(model, input_size=(3, 64, 64))
    out = probed(torch.randn(2, 3, 64, 64))
    assert isinstance(out, ProbedOutput)
    names = list(probed.selection.names)
    assert list(out.heads) == names and list(out.features) == names
    for tap in probed.report.taps:
        assert out.heads[tap.point].shape == (2, 10)
        assert out.features[tap.point].shape[1:] == tap.feature_shape[1:]
    assert isinstance(probed.report, RewriteReport) and all(isinstance(t, Tap) for t in probed.report.taps)
    assert probed.report.adapter_parameters == sum(p.numel() for p in getattr(probed, ADAPTERS).parameters())
    assert probed.report.taps[0].adapter == f"{ADAPTERS}.layer1_1_act2"
    assert "layer1.1.act2" in probed.report.summary()


def test_state_dict_keys_are_the_models_own_plus_adapters_and_round_trip() -> None:
    torch.manual_seed(0)
    model = _small_cnn()
    probed = instrument(model, input_size=(3, 16, 16))
    keys = list(probed.state_dict())
    model_keys = [k for k in keys if k.startswith("model.")]
    assert [k.removeprefix("model.") for k in model_keys] == list(model.state_dict())
    assert all(k.startswith(f"{ADAPTERS}.") for k in keys if k not in model_keys)
    assert len(keys) == len(set(keys)), "a tensor appears twice in the state_dict"

    torch.manual_seed(1)
    other = instrument(_small_cnn(), input_size=(3, 16, 16))
    other.load_state_dict(probed.state_dict())
    x = torch.randn(2, 3, 16, 16)
    probed.eval(), other.eval()
    a, b = probed(x), other(x)
    assert torch.equal(a.output, b.output)
    assert all(torch.equal(a.heads[n], b.heads[n]) for n in a.heads)


def test_torch_save_and_load_of_the_whole_module_keeps_type_sharing_and_outputs() -> None:
    torch.manual_seed(0)
    probed = instrument(_small_cnn(), input_size=(3, 16, 16)).eval()
    buffer = io.BytesIO()
    torch.save(probed, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, Probed)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x).output, probed(x).output)
    # The reloaded graphs run on the reloaded model: training it moves what strip() returns.
    loaded.train()
    total, _ = loaded.loss(loaded(x), torch.tensor([0, 1]))
    total.backward()
    with torch.no_grad():
        for p in loaded.parameters():
            p.sub_(0.1 * p.grad)
    loaded.eval()
    assert torch.equal(loaded(x).output, loaded.strip()(x))
    assert not torch.equal(loaded(x).output, probed(x).output)
    clone = copy.deepcopy(probed)
    assert torch.equal(clone(x).output, probed(x).output)


def test_train_and_eval_mode_run_their_own_traced_graph() -> None:
    class Block(nn.Module):  # not a leaf: fx bakes its `if self.training` into the graph
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * 2.0 if self.training else y

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Block(), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    probed = instrument(model, input_size=(3, 8, 8))
    assert not probed.training and not model.training, "instrument must keep the user's mode"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(probed.eval()(x).output, model(x))
        assert torch.equal(probed.train()(x).output, model(x))  # model is now in train mode as well
        assert not torch.equal(probed.train()(x).output, probed.eval()(x).output)


def test_feature_is_copied_when_a_later_inplace_op_would_overwrite_it() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.ReLU(inplace=True)
            self.proj = nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.act(self.bn(self.conv(x)))  # ReLU(inplace=True) writes into the bn output
            return self.proj(y).add_(x)  # and add_ into the proj output

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Residual(), Residual(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    selection = _selection_at(model, ["2.conv", "2.bn", "3.proj"], (3, 8, 8))
    probed = instrument(model, selection, input_size=(3, 8, 8))
    cloned = {t.point: t.cloned for t in probed.report.taps}
    assert cloned == {"2.conv": False, "2.bn": True, "3.proj": True}
    x = torch.randn(2, 3, 8, 8)
    out = probed.eval()(x)
    with torch.no_grad():
        expected = model[2].bn(model[2].conv(model[1](model[0](x))))
    assert torch.equal(out.features["2.bn"], expected)
    assert torch.equal(out.output, model(x))
    probed.train()
    total, _ = probed.loss(probed(x), torch.tensor([0, 2]))
    total.backward()  # autograd would reject the overwritten saved tensors without the copies


def test_adapter_init_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(3)
    model = _small_cnn()
    state = torch.get_rng_state()
    a = instrument(model, input_size=(3, 16, 16))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(3)
    b = instrument(model, input_size=(3, 16, 16))
    for (ka, va), (kb, vb) in zip(getattr(a, ADAPTERS).state_dict().items(), getattr(b, ADAPTERS).state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# --------------------------------------------------------------------------- task, losses, options


def test_dense_task_is_inferred_and_heads_match_the_output_resolution() -> None:
    torch.manual_seed(0)
    probed = instrument(TinyUNet(num_classes=3), input_size=(3, 16, 16))
    assert probed.task == "dense"
    out = probed(torch.randn(2, 3, 16, 16))
    assert all(h.shape == out.output.shape == (2, 3, 16, 16) for h in out.heads.values())
    assert all(t.adapter_type == "ConvDenseAdapter" for t in probed.report.taps)  # the default conv head


def test_task_override_is_checked_against_the_output() -> None:
    assert instrument(_small_cnn(), input_size=(3, 16, 16), task="classification").report.task_source == "given"
    with pytest.raises(InstrumentError, match=r"task='dense' does not fit Sequential's output of shape \(2, 5\)"):
        instrument(_small_cnn(), input_size=(3, 16, 16), task="dense")


@pytest.mark.parametrize(("loss", "parts"), [("dsn", {"ce", "dsn/"}), ("dks", {"ce", "dsn/", "dks"})])
def test_other_objectives(loss: str, parts: set[str]) -> None:
    torch.manual_seed(0)
    probed = instrument(_small_cnn(), input_size=(3, 16, 16), loss=loss, loss_options=LossOptions(alpha=0.2))
    total, got = probed.loss(probed(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    assert {p.split("/")[0] + ("/" if "/" in p else "") for p in got} == parts
    # alpha=0.2 reaches every intermediate CE: the total is rebuilt from the unweighted parts.
    expected = got["ce"] + 0.2 * sum(v for k, v in got.items() if k.startswith("dsn/"))
    if loss == "dks":
        expected = expected + probed.objective.beta * got["dks"]
    torch.testing.assert_close(total.detach(), expected)
    total.backward()


def test_imachsr_weights_are_applied_to_the_parts() -> None:
    torch.manual_seed(0)
    probed = instrument(_small_cnn(), input_size=(3, 16, 16), loss="imachsr",
                        loss_options=LossOptions(alpha=0.2, lam=0.05))
    total, got = probed.loss(probed(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    names = [t.point for t in probed.report.taps]
    expected = got["ce"] + sum(0.2 * got[f"mi/{n}"] + 0.05 * got[f"ne/{n}"] for n in names)
    torch.testing.assert_close(total.detach(), expected)
    assert abs(total.item() - got["ce"].item()) > 1e-4  # the intermediate terms are not vanishing


def test_given_objective_and_conflicting_options() -> None:
    model = _small_cnn()
    names = list(autoprobe.inspect(model, input_size=(3, 16, 16)).names)
    probed = instrument(model, input_size=(3, 16, 16), loss=DSN(names, alpha=0.1))
    assert isinstance(probed.objective, DSN)
    with pytest.raises(InstrumentError, match="objective is over points"):
        instrument(model, input_size=(3, 16, 16), loss=DSN(["nope"]))
    with pytest.raises(InstrumentError, match="already has its own"):
        instrument(model, input_size=(3, 16, 16), loss=DSN(names), loss_options=LossOptions(alpha=0.5))
    with pytest.raises(InstrumentError, match="does not take"):
        instrument(model, input_size=(3, 16, 16), loss="dsn", loss_options=LossOptions(lam=0.1))


def test_schedule_decays_intermediate_terms() -> None:
    torch.manual_seed(0)
    probed = instrument(_small_cnn(), input_size=(3, 16, 16), loss_options=LossOptions(schedule="linear"))
    out = probed(torch.randn(4, 3, 16, 16))
    y = torch.tensor([0, 1, 2, 3])
    total, parts = probed.loss(out, y, progress=1.0)
    assert math.isclose(total.item(), parts["ce"].item(), rel_tol=1e-6)


def test_spec_string_is_built_live_on_cpu() -> None:
    probed = instrument("resnet18", num_classes=4, input_size=(3, 32, 32))
    assert next(probed.parameters()).device.type == "cpu"
    assert probed.report.model == "resnet18" and probed.report.num_classes == 4
    out = probed(torch.randn(2, 3, 32, 32))
    probed.loss(out, torch.tensor([0, 3])).total.backward()


def test_bf16_autocast_on_cpu() -> None:
    torch.manual_seed(0)
    probed = instrument(_small_cnn(), input_size=(3, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = probed(torch.randn(4, 3, 16, 16))
        total, _ = probed.loss(out, torch.tensor([0, 1, 2, 3]))
    assert out.output.dtype == torch.bfloat16 and total.dtype == torch.float32
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in getattr(probed, ADAPTERS).parameters())


def test_dynamo_captures_the_probed_forward_in_one_graph() -> None:
    # backend="eager" checks graph capture (no breaks, fullgraph=True) without inductor's C++ build.
    torch._dynamo.reset()
    torch.manual_seed(0)
    probed = instrument(_small_cnn(), input_size=(3, 16, 16))
    compiled = torch.compile(probed, backend="eager", fullgraph=True)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out = compiled(x)
    assert isinstance(out, ProbedOutput)
    total, _ = probed.loss(out, y)
    total.backward()
    assert torch.allclose(out.output, probed(x).output)


@pytest.mark.slow
@pytest.mark.parametrize("fullgraph", [False, True])
def test_torch_compile_default_mode_trains(fullgraph: bool) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    probed = instrument(_small_cnn(), input_size=(3, 16, 16))
    compiled = torch.compile(probed, fullgraph=fullgraph)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out = compiled(x)
    total, _ = probed.loss(out, y)
    total.backward()
    assert torch.allclose(out.output, probed(x).output, atol=1e-5)
    assert all(p.grad is not None for p in getattr(probed, ADAPTERS).parameters())


# --------------------------------------------------------------------------- bad input


def test_labels_that_do_not_fit_the_task_name_the_expected_shape() -> None:
    probed = instrument(_small_cnn(), input_size=(3, 16, 16))
    out = probed(torch.randn(2, 3, 16, 16))
    with pytest.raises(InstrumentError, match=r"labels of shape \(2, 5\) do not fit.*\(2,\)"):
        probed.loss(out, F.one_hot(torch.tensor([0, 1]), 5))
    dense = instrument(TinyUNet(num_classes=3), input_size=(3, 16, 16))
    out = dense(torch.randn(2, 3, 16, 16))
    with pytest.raises(InstrumentError, match=r"labels of shape \(2, 1, 16, 16\) do not fit"):
        dense.loss(out, torch.zeros(2, 1, 16, 16, dtype=torch.long))
    # A regression target given to a class-id objective, and float labels: each says what to pass instead.
    with pytest.raises(InstrumentError, match="pass task='regression'"):
        dense.loss(out, torch.zeros(2, 3, 16, 16))
    with pytest.raises(InstrumentError, match="integer class ids"):
        dense.loss(out, torch.zeros(2, 16, 16))
    with pytest.raises(InstrumentError, match="target must be a tensor"):
        dense.loss(out, [[0, 1]])
    with pytest.raises(InstrumentError, match="ProbedOutput"):
        dense.loss(out.output, torch.zeros(2, 16, 16, dtype=torch.long))


def test_selection_from_another_model_is_rejected() -> None:
    deeper = nn.Sequential(*(m for _ in range(4) for m in (nn.Conv2d(3 if _ == 0 else 8, 8, 3, padding=1), nn.ReLU())),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    selection = autoprobe.inspect(deeper, input_size=(3, 16, 16))
    with pytest.raises(SelectionError, match="(?s)made for 'Sequential'.*depth D=5.*D=4.*another model"):
        instrument(_small_cnn(), selection)
    same_depth = nn.Sequential(*list(deeper)[2:])
    same_depth[0] = nn.Conv2d(3, 8, 3, padding=1)
    selection = autoprobe.inspect(same_depth, input_size=(3, 16, 16))
    with pytest.raises(SelectionError, match=r"(?s)expects a NCHW feature of shape \(8, 16, 16\).*another model"):
        instrument(_small_cnn(), selection)


def test_point_that_no_longer_exists_is_named() -> None:
    model = _small_cnn()
    selection = autoprobe.inspect(model, input_size=(3, 16, 16))
    stale = dataclasses.replace(selection.points[0], name="features.3.act")
    with pytest.raises(SelectionError, match=r"point 'features.3.act' .* is not a node of Sequential's train-mode"):
        instrument(model, dataclasses.replace(selection, points=(stale,)))


def test_selection_at_another_input_size_is_rejected() -> None:
    model = _small_cnn()
    selection = autoprobe.inspect(model, input_size=(3, 16, 16))
    with pytest.raises(SelectionError, match=r"expects a NCHW feature of shape \(8, 16, 16\).*\(8, 32, 32\)"):
        instrument(model, selection, input_size=(3, 32, 32))
    with pytest.raises(SelectionError, match="pass one or the other"):
        instrument(model, selection, points=2)


def test_models_instrument_cannot_train_are_explained() -> None:
    with torch.device("meta"):
        meta = _small_cnn()
    with pytest.raises(InstrumentError, match="meta device"):
        instrument(meta, input_size=(3, 16, 16))

    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _small_cnn()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"a": self.net(x), "b": self.net(x)}

    # Neither 'out' nor 'logits' nor a single tensor: the message lists what the output holds.
    with pytest.raises(InstrumentError, match=r"a dict with keys \['a' \(tensor \(2, 5\)\), 'b' .*output=<key>"):
        instrument(DictOut(), input_size=(3, 16, 16))
    with pytest.raises(InstrumentError, match=r"output='logits' matches nothing in DictOut's output"):
        instrument(DictOut(), input_size=(3, 16, 16), output="logits")
    with pytest.raises(InstrumentError, match="num_classes=7 but"):
        instrument(_small_cnn(), input_size=(3, 16, 16), num_classes=7)


class _TokenSeg(nn.Module):
    """Patch embedding to a (gh, gw) token grid, optional cls token, one mixing layer, tokens back to a map."""

    def __init__(self, cls_token: bool) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, 16)) if cls_token else None
        self.mix = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.patch(x)
        grid = z.shape[2:]
        tokens = z.flatten(2).transpose(1, 2)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = self.norm(tokens + self.mix(tokens))
        if self.cls is not None:
            tokens = tokens[:, 1:]
        return self.head(tokens.transpose(1, 2).reshape(x.shape[0], 16, *grid))


@pytest.mark.parametrize(("size", "cls_token", "grid", "prefix"), [((3, 8, 16), False, (2, 4), 0),
                                                                    ((3, 12, 12), True, (3, 3), 1)])
def test_token_grid_and_prefix_come_from_the_graph(size, cls_token: bool, grid, prefix: int) -> None:
    # 8 tokens of a 2x4 grid (a square-root guess reads 4 prefix tokens + 2x2) and 3x3 + cls (read as 3x3, no prefix).
    model = _TokenSeg(cls_token)
    analysis = analyze(model, input_size=size, rules="dense")
    name = next(n.name for n in analysis.graph if n.name == "norm")
    point = analysis.graph[name]
    selection = dataclasses.replace(analysis.selection, points=(
        Point(name=name, fx_name=point.fx_name, module_path=point.module_path, depth=point.depth, shape=point.shape,
              layout=point.layout, score=1.0, fired=()),
    ))
    probed = instrument(model, selection)
    adapter = getattr(probed, ADAPTERS)["norm"]
    assert (adapter.grid, adapter.prefix_tokens) == (grid, prefix)
    out = probed(torch.randn(2, *size))
    assert out.heads["norm"].shape == out.output.shape


def test_a_model_without_weight_layers_is_refused_at_instrument_time() -> None:
    class NoWeights(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(x, 2).flatten(1)[:, :4]

    with pytest.raises(InstrumentError, match="no point to supervise"):
        instrument(NoWeights(), input_size=(3, 8, 8))


def test_hooks_of_modules_fx_traced_through_run_around_their_code() -> None:
    # FSDP2 unshards a block's weights in its forward pre-hook and reshards them in its forward hook;
    # the fx engine runs the block's code inline, so it must call both, once per call, in order.
    torch.manual_seed(0)
    model = TinyUNet(num_classes=3)
    probed = instrument(model, input_size=(3, 16, 16))
    block = model.down[0]  # a traced-through Sequential: fx records its convs, not the block
    events: list[tuple[str, tuple[int, ...]]] = []
    block.register_forward_pre_hook(lambda m, args: events.append(("pre", tuple(args[0].shape))))
    block.register_forward_hook(lambda m, args, out: events.append(("post", tuple(out.shape))))
    root = model.register_forward_hook(lambda m, args, out: out * 0)  # a hook may replace the output, as in eager
    x = torch.randn(2, 3, 16, 16)
    out = probed(x)
    assert events == [("pre", (2, 8, 16, 16)), ("post", (2, 16, 8, 8))]
    assert torch.equal(out.output, torch.zeros(2, 3, 16, 16))
    root.remove()
    assert "_run_forward_pre_hooks" in probed.code
