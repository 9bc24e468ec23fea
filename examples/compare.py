"""Compare output-only training, DSN, iMacHSR and DKS on the same model, data, optimizer and seeds.

Every run trains one model from one seed with one method and appends one JSON line to the
results file as soon as it finishes; a run whose key (task, model, method, setting, seed,
steps, batch, data) is already in the file is skipped, so a long grid can be completed over
several sittings and re-rendered at any time (``--render``).

Paired seeds: for seed s every method starts from the same initial weights
(``torch.manual_seed(s)`` right before the model is built, before any adapter exists) and
sees the same batches in the same order (a separate ``torch.Generator`` seeded with s draws
the permutation). The baseline trains the plain model with ``F.cross_entropy`` on its output;
the other methods train ``autoprobe.instrument(model, loss=METHOD, ...)`` with the library's
default weights. Evaluation always runs the plain model (``probed.strip()`` is that object)
in eval mode, so every method is measured by the same code.

Grids (``--grid NAME``, repeatable, or ``all``); EVIDENCE.md says which ran on which library:

  pilot-seg, pilot-cls   baseline regime pilots, seed 0, scored on validation only
  primary        DeepLabV3+/ResNet-18, baseline and iMacHSR x 5 seeds   (pre-registered)
  primary-dsn, primary-tuned   the DSN and tuned arms of the same table
  seg-shipped    iMacHSR at the shipped default (MI only), the same table
  diagnose, candidates-seg, candidates-cls, diagnose-more   iMacHSR variants, validation only
  seg-unet       U-Net/ResNet-18: baseline, DSN, iMacHSR, iMacHSR (MI only) x 5 seeds
  seg-unet-tuned its tuned arm, 5 seeds
  placement      iMacHSR at the automatic points, hand-picked stage ends, the last stage only and
                 3 random draws; M = 1, 2, 4, 5 automatic points; 3 points 1, 2, 3 base units
                 apart; seeds 0-2
  position       1/2/3 points near input / centre / output, 2 units apart, seeds 0-2
  cls-resnet     timm ResNet-18 (half width) on Fashion-MNIST, baseline/DSN/iMacHSR x 5 seeds
  cls-vit        a small timm ViT on Fashion-MNIST, baseline/DSN/iMacHSR x 5 seeds
  cls-resnet-tuned, cls-vit-tuned   the tuned arm of each, 5 seeds
  tuned-returned the tuned arm after issue 26 on all four models (the returned model, no retrain)
  cls-shipped, vit-shipped   iMacHSR at the shipped default on ResNet-18n and the ViT, 5 seeds
  default-gated, default-heads   the default's validation rule (EVIDENCE.md section 7): the gated
                 candidates (and DeepLabV3+'s DSN at today's points), then Region MI and conv heads;
                 seeds 0-2, validation only
  confirm-NAME   the rule's choice (or baseline) at seeds 5-9 on the four models, scored on test
  pilot-seg64, confirm64-NAME   the 64x64 regime (issue 24 item 4): its baseline pilots (seed 0,
                 validation only), then NAME at seeds 5-9 on DeepLabV3+ and the U-Net, scored on test
  all            every grid but the pilots and the validation-only ones

Usage:
    python examples/compare.py --grid primary --threads 1
    python examples/compare.py --task seg --quick          # a few steps, one seed, tiny data
    python examples/compare.py --render                    # tables + plots from the results
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    # Run as a script: the sibling modules live beside this file, not on sys.path by default.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from segdata import DEBIAN_DIR, SegConfig, Split, load_classification, load_segmentation  # noqa: E402
else:
    from .segdata import DEBIAN_DIR, SegConfig, Split, load_classification, load_segmentation

__all__ = ["Placement", "RunSpec", "GRIDS", "grid_specs", "run_one", "main"]

ROOT = Path(__file__).resolve().parent.parent
EVIDENCE = ROOT / "examples" / "evidence"
RESULTS = EVIDENCE / "runs.jsonl"
TUNE_STATE = Path(os.environ.get("AUTOPROBE_TUNE_STATE", "/tmp/autoprobe_tune_state"))
METHODS = ("baseline", "dsn", "imachsr", "dks")
NUM_SEG_CLASSES = 11
BASE_UNIT = 2  # weight layers per base unit of distance: one ResNet BasicBlock (two 3x3 convs)

# Training settings shared by every method (none was tuned on the test set; see EVIDENCE.md).
# The regime of issue 15, chosen on validation by the recorded pilots (grid pilot-seg): the
# baseline's validation mIoU has flattened by 1,500 steps of batch 16 (EVIDENCE.md section 1).
SEG_STEPS, SEG_BATCH = 1500, 16
# Classification: 2 epochs of the 55,000 training images at batch 32 (issue 15: >= 2 epochs).
CLS_STEPS, CLS_BATCH = 3438, 32
# Learning rate per task: seg 3e-3 was picked over 1e-3 on the validation split (baseline, seed 0,
# 250 steps: val mIoU 0.118 vs 0.045); cls keeps Adam's common 1e-3, untuned.
LR = {"seg": 3e-3, "cls": 1e-3}
WEIGHT_DECAY, WARMUP = 1e-4, 10
CURVE_EVERY, VAL_POINTS, CLS_VAL = 10, 10, 2000
# Dropout (smp's ASPP Dropout(0.5)) draws from the global RNG, which building adapters advances;
# reseeding with this offset right before the first step gives every method of a seed the same
# masks (the adapters draw nothing during training).
TRAIN_RNG_OFFSET = 7919
# The `imachsr` arm is iMacHSR as shipped when the grids were registered (alpha 0.5, lambda 0.01), pinned so
# the recorded runs rerun as they were after the library's default became lambda 0 (EVIDENCE.md section 2);
# the new default is the setting `auto/lam=0.0`.
IMACHSR_REGISTERED = (("alpha", 0.5), ("lam", 0.01))
# The gate and the heads every registered arm trained with (instrument's defaults when they ran).
REGISTERED_GATE, REGISTERED_HEAD = None, "linear"
# The options that turn IMACHSR_REGISTERED into the default shipped now (MI only).
SHIPPED = (("lam", 0.0),)
QUALITATIVE = 6  # test canvases whose predictions seed-0 seg runs keep


@dataclass(frozen=True)
class Placement:
    """Where the intermediate points go.

    kind: ``auto`` (autoprobe's selection, ``points`` forces M), ``spaced`` (exactly
    ``spacing`` base units apart at ``position``), ``hand`` (the encoder's stage ends),
    ``last`` (one point at the last encoder stage), ``random`` (``points`` nodes drawn
    uniformly among the eligible ones with draw number ``draw``).
    """

    kind: str = "auto"
    points: int | None = None
    spacing: int | None = None
    position: str | None = None
    draw: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "auto":
            return "auto" if self.points is None else f"auto/M={self.points}"
        if self.kind == "spaced":
            return f"spaced/M={self.points}/d={self.spacing}/{self.position}"
        if self.kind == "random":
            return f"random/M={self.points}/draw={self.draw}"
        return self.kind


@dataclass(frozen=True)
class RunSpec:
    """One training run: what is trained, how, and on which data."""

    task: str           # seg | cls
    model: str          # deeplabv3plus | unet | resnet18n | vit
    method: str         # baseline | dsn | imachsr | dks
    seed: int
    steps: int
    batch: int
    placement: Placement = Placement()
    quick: bool = False
    lr: float | None = None  # None: the task's LR
    pilot: bool = False  # scored on validation only; the test split is never evaluated
    # iMacHSR's options other than the defaults, e.g. (("lam", 0.0),) or (("mi_estimator", "pooled"),)
    options: tuple[tuple[str, float | str], ...] = ()
    canvas: int = 32  # segmentation canvas side: 32 (the main tables) or 64 (issue 24's larger regime)

    @property
    def learning_rate(self) -> float:
        return LR[self.task] if self.lr is None else self.lr

    @property
    def setting(self) -> str:
        if self.method == "baseline":
            return "none"
        if self.method == "tuned":
            # `tuned` alone: the arm of before issue 26 (the choice retrained); options name the later arms.
            return "/".join(["tuned"] + [f"{k}={v}" for k, v in self.options])
        return "/".join([self.placement.label] + [f"{k}={v}" for k, v in self.options])

    def key(self) -> str:
        # Fields added later enter the key only when they differ from their default, so every recorded
        # run keeps its key.
        return json.dumps([self.task, self.model, self.method, self.setting, self.seed, self.steps, self.batch,
                           self.quick] + ([] if self.lr is None else [self.lr]) + (["pilot"] if self.pilot else [])
                          + ([] if self.canvas == 32 else [f"canvas={self.canvas}"]))


# ----------------------------------------------------------------------------- models

def build_model(name: str) -> nn.Module:
    """The four models of the evidence, sized for a 2-core CPU (see EVIDENCE.md)."""
    if name == "deeplabv3plus":
        import segmentation_models_pytorch as smp

        # The paper's model: DeepLabV3+ on a ResNet-18 encoder. encoder_depth=4 keeps stages 1-3
        # (output stride 16 without dilation: 3x3 at the ASPP for a 48x48 canvas) and a 128-wide
        # decoder, which halves the step time on this CPU.
        return smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=NUM_SEG_CLASSES, in_channels=1,
                                 encoder_depth=4, decoder_channels=128)
    if name == "unet":
        import segmentation_models_pytorch as smp

        return smp.Unet("resnet18", encoder_weights=None, classes=NUM_SEG_CLASSES, in_channels=1,
                        encoder_depth=4, decoder_channels=(64, 32, 16, 16))
    if name == "resnet18n":
        import timm

        # timm's ResNet-18 at half width (32-256 channels): 2.8M parameters.
        return timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1,
                                 channels=(32, 64, 128, 256))
    if name == "vit":
        import timm

        # vit_tiny at 28x28: patch 7 (16 tokens), 6 blocks of width 96 with 3 heads.
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1,
                                 img_size=28, patch_size=7, depth=6, embed_dim=96, num_heads=3)
    raise SystemExit(f"unknown model {name!r}; choose deeplabv3plus, unet, resnet18n or vit")


def input_size(task: str, cfg: SegConfig) -> tuple[int, int, int]:
    return (1, cfg.size, cfg.size) if task == "seg" else (1, 28, 28)


# smp's ResNetEncoder.forward returns these modules' outputs as its features (out_channels
# 1, 64, 64, 128, 256 for encoder_depth=4): the stage ends a person wires heads to.
SMP_RESNET_STAGES = ("encoder.relu", "encoder.layer1", "encoder.layer2", "encoder.layer3")


def make_selection(model: nn.Module, spec: RunSpec, size: tuple[int, ...]):
    """The Selection for a placement, or None for autoprobe's own (instrument makes it)."""
    pl = spec.placement
    if pl.kind == "auto":
        return None
    from autoprobe import placement
    from autoprobe.api import analyze

    rules = "dense" if spec.task == "seg" else "default"
    analysis = analyze(model, input_size=size, rules=rules)
    if pl.kind == "spaced":
        return placement.spaced(analysis, pl.points, pl.spacing * BASE_UNIT, pl.position)
    if pl.kind == "hand":
        return placement.by_name(analysis, SMP_RESNET_STAGES[1:])
    if pl.kind == "last":
        return placement.by_name(analysis, SMP_RESNET_STAGES[-1:])
    if pl.kind == "random":
        return placement.random_points(analysis, pl.points, seed=pl.draw)
    raise SystemExit(f"unknown placement {pl.kind!r}")


# ----------------------------------------------------------------------------- metrics

def confusion(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(target.flatten() * k + pred.flatten(), minlength=k * k).reshape(k, k)


def seg_metrics(cm: torch.Tensor) -> dict[str, float]:
    """Macro IoU, F1, precision and recall over the 10 item classes (background excluded),
    from a dataset-level confusion matrix (rows: truth, columns: prediction); the same with
    background as ``*_bg``, and pixel accuracy."""
    cm = cm.double()
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    per = {
        "IoU": tp / (tp + fp + fn).clamp(min=1),
        "F1": 2 * tp / (2 * tp + fp + fn).clamp(min=1),
        "Precision": tp / (tp + fp).clamp(min=1),
        "Recall": tp / (tp + fn).clamp(min=1),
    }
    out = {}
    for name, v in per.items():
        out[f"m{name}"] = float(v[1:].mean())
        out[f"m{name}_bg"] = float(v.mean())
    out["pixel_acc"] = float(tp.sum() / cm.sum())
    out["IoU_per_class"] = [round(float(x), 6) for x in per["IoU"]]
    return out


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, task: str, batch: int = 100) -> dict[str, float]:
    was = model.training
    model.eval()
    if task == "seg":
        cm = torch.zeros(NUM_SEG_CLASSES, NUM_SEG_CLASSES, dtype=torch.long)
        for i in range(0, len(split), batch):
            logits = model(split.images[i : i + batch])
            cm += confusion(logits.argmax(1), split.labels[i : i + batch], NUM_SEG_CLASSES)
        result = seg_metrics(cm)
    else:
        correct = 0
        for i in range(0, len(split), batch):
            correct += int((model(split.images[i : i + batch]).argmax(1) == split.labels[i : i + batch]).sum())
        result = {"accuracy": correct / len(split)}
    model.train(was)
    return result


# ----------------------------------------------------------------------------- training

def _lr_lambda(steps: int):
    def f(step: int) -> float:
        if step < WARMUP:
            return (step + 1) / WARMUP
        t = (step - WARMUP) / max(1, steps - WARMUP)
        return 0.5 * (1 + math.cos(math.pi * t))
    return f


def _batches(n: int, batch: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    perm, at = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if at + batch > n:
            perm, at = torch.randperm(n, generator=gen), 0
        yield perm[at : at + batch]
        at += batch


def run_one(spec: RunSpec, data, cfg: SegConfig, device: str, threads: int) -> dict:
    """Train one run and return its result record (not yet written)."""
    size = input_size(spec.task, cfg)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(spec.seed)
    model = build_model(spec.model)
    points: list[str] = []
    notes: list[str] = []
    tuned = None
    returned = spec.method == "tuned" and dict(spec.options).get("model") == "returned"
    if spec.method == "tuned":
        tuned = _tune(spec, data, device)
        if not returned:  # the old arm retrains the choice from a fresh model
            torch.manual_seed(spec.seed)
            model = build_model(spec.model)
    if returned:
        # Issue 26: tune returns the choice trained, as its search trained it; nothing is retrained,
        # so what this row scores on test is what a user of tune ships, and its cost is the search's.
        from autoprobe import Probed

        model = tuned.model.strip() if isinstance(tuned.model, Probed) else tuned.model
        trainable, probed = model, None
        if tuned.instrument_kwargs is not None:
            points = list(tuned.model.selection.names)
            notes = list(tuned.model.selection.notes)
    elif spec.method == "baseline" or (tuned is not None and tuned.instrument_kwargs is None):
        trainable: nn.Module = model
        probed = None
    else:
        import autoprobe

        if tuned is not None:
            probed = autoprobe.instrument(model, **tuned.instrument_kwargs)
        elif spec.options:
            probed = _instrument_with_options(model, spec, size)
        else:
            selection = make_selection(model, spec, size)
            kwargs = {"rules": "dense"} if spec.task == "seg" and selection is None else {}
            if spec.placement.kind == "auto" and spec.placement.points is not None:
                kwargs["points"] = spec.placement.points
            # The arms as registered, whatever instrument's defaults become: no gate, linear heads.
            weights = dict(IMACHSR_REGISTERED) if spec.method == "imachsr" else {}
            kwargs["loss_options"] = autoprobe.LossOptions(**weights, gate=REGISTERED_GATE, head=REGISTERED_HEAD)
            probed = autoprobe.instrument(model, selection, loss=spec.method, input_size=size, **kwargs)
        points = list(probed.selection.names)
        notes = list(probed.selection.notes)
        trainable = probed
    trainable.to(device)
    torch.manual_seed(spec.seed + TRAIN_RNG_OFFSET)
    opt = torch.optim.AdamW(trainable.parameters(), lr=spec.learning_rate, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(spec.steps))
    setup_wall = time.perf_counter() - wall0
    train_set = data.train
    curve: dict[str, list] = {"step": [], "train_ce": [], "val_step": [], "val": [], "terms": {}}
    window: list[float] = []
    term_window: dict[str, list[float]] = {}
    val_at = {round(spec.steps * k / VAL_POINTS) for k in range(1, VAL_POINTS + 1)}
    trainable.train()
    step_wall = 0.0
    eval_wall = 0.0
    cpu_train0 = time.process_time()
    train_steps = 0 if returned else spec.steps  # a returned model is scored as tune trained it
    for step, idx in enumerate(_batches(len(train_set), spec.batch, train_steps, spec.seed)):
        x, y = train_set.images[idx].to(device), train_set.labels[idx].to(device)
        t0 = time.perf_counter()
        if probed is None:
            out = model(x)
            loss = F.cross_entropy(out, y)
            ce = loss.detach()
        else:
            out = probed(x)
            loss, parts = probed.loss(out, y, progress=step / spec.steps)
            ce = parts["ce"]
            for name, value in parts.items():
                term_window.setdefault(name, []).append(float(value))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step_wall += time.perf_counter() - t0
        window.append(float(ce))
        if not math.isfinite(window[-1]):
            raise SystemExit(f"{spec.key()}: the loss became {window[-1]} at step {step}")
        if (step + 1) % CURVE_EVERY == 0 or step + 1 == spec.steps:
            curve["step"].append(step + 1)
            curve["train_ce"].append(round(sum(window) / len(window), 6))
            window = []
            for name, values in term_window.items():
                curve["terms"].setdefault(name, []).append(round(sum(values) / len(values), 6))
            term_window = {}
        if step + 1 in val_at:
            t1 = time.perf_counter()
            val = data.val if spec.task == "seg" else Split(data.val.images[:CLS_VAL], data.val.labels[:CLS_VAL])
            v = evaluate(model, val, spec.task)
            eval_wall += time.perf_counter() - t1
            curve["val_step"].append(step + 1)
            curve["val"].append(round(v["mIoU" if spec.task == "seg" else "accuracy"], 6))
    train_cpu = time.process_time() - cpu_train0
    t1 = time.perf_counter()
    # A pilot chooses settings, so it never sees the test split: its metrics are validation's.
    metrics = evaluate(model, data.val if spec.pilot else data.test, spec.task)
    test_wall = time.perf_counter() - t1
    examples = None
    if spec.task == "seg" and spec.seed == 0 and not spec.pilot:
        # Predictions on the first test canvases, for the qualitative figure (weights are not kept).
        with torch.no_grad():
            model.eval()
            examples = model(data.test.images[:QUALITATIVE]).argmax(1).tolist()
    return {
        "test_predictions": examples,
        "task": spec.task,
        "model": spec.model,
        "method": spec.method,
        "setting": spec.setting,
        "placement": dataclasses.asdict(spec.placement),
        "seed": spec.seed,
        "steps": spec.steps,
        "batch": spec.batch,
        "quick": spec.quick,
        "pilot": spec.pilot,
        "canvas": cfg.size if spec.task == "seg" else None,
        "metrics_split": "val" if spec.pilot else "test",
        "lr": spec.learning_rate,
        "key": spec.key(),
        "points": points,
        "selection_notes": notes,
        "tune": None if tuned is None else {
            "chosen": tuned.chosen.label, "val_score": tuned.score, "output_only_val_score": tuned.output_only_score,
            "cost_steps": tuned.cost_steps, "dropped": tuned.dropped, "retrained": not returned,
            "cost": None if tuned.cost is None else {k: (round(v, 3) if isinstance(v, float) else v)
                                                     for k, v in dataclasses.asdict(tuned.cost).items()},
            "table": [{"candidate": row.candidate.label, "steps": row.steps, "scores": list(row.scores),
                       "error": row.error} for row in tuned.table]},
        "metrics": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
        "curve": curve,
        "times": {
            "wall_s": round(time.perf_counter() - wall0, 3),
            "cpu_s": round(time.process_time() - cpu0, 3),
            "setup_wall_s": round(setup_wall, 3),
            "train_step_wall_s": round(step_wall, 3),
            "train_cpu_s": round(train_cpu, 3),
            "step_wall_s": round(step_wall / spec.steps, 5),
            "val_wall_s": round(eval_wall, 3),
            "test_wall_s": round(test_wall, 3),
        },
        "optimizer": {"name": "AdamW", "lr": spec.learning_rate, "weight_decay": WEIGHT_DECAY,
                      "schedule": f"linear warmup {WARMUP} steps, cosine to 0"},
        "data": dataclasses.asdict(cfg) if spec.task == "seg" else {"train": len(data.train), "test": len(data.test)},
        "device": device,
        "threads": threads,
        "autoprobe": _provenance(),
        "versions": _versions(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# Options that configure the adapters rather than the objective: they go to `instrument` itself.
INSTRUMENT_OPTIONS = ("head",)


def _instrument_with_options(model: nn.Module, spec: RunSpec, size: tuple[int, ...]):
    """iMacHSR or DSN at the automatic points with options, some of which instrument has no keyword for
    (``mi_estimator``): the objective is built by ``make_objective`` (iMacHSR from the registered weights),
    the adapter options go to ``instrument``."""
    import autoprobe
    from autoprobe.api import analyze
    from autoprobe.losses import LossOptions, make_objective

    if spec.method not in ("imachsr", "dsn") or spec.placement.kind != "auto":
        raise SystemExit(f"{spec.key()}: options apply to iMacHSR or DSN at automatic points")
    selection = analyze(model, input_size=size, rules="dense" if spec.task == "seg" else "default",
                        points=spec.placement.points).selection
    options = dict(spec.options)
    # The objective carries its own gate (make_objective's default: none); the heads go to instrument.
    adapter_options = {"head": REGISTERED_HEAD, **{k: options.pop(k) for k in INSTRUMENT_OPTIONS if k in options}}
    if spec.method == "imachsr":
        objective = make_objective("imachsr", selection.names, {p.name: p.layout for p in selection.points},
                                   options=LossOptions(**{**dict(IMACHSR_REGISTERED), **options}))
    else:
        objective = make_objective("dsn", selection.names, options=LossOptions(**options))
    return autoprobe.instrument(model, selection, loss=objective, input_size=size,
                                loss_options=LossOptions(**adapter_options))


class _TrainBatches:
    """The training batches of a run, re-iterable (``autoprobe.tune`` reads them once per candidate)."""

    def __init__(self, split: Split, spec: RunSpec) -> None:
        self.split, self.spec = split, spec

    def __iter__(self):
        for idx in _batches(len(self.split), self.spec.batch, self.spec.steps, self.spec.seed):
            yield self.split.images[idx], self.split.labels[idx]


def _tune(spec: RunSpec, data, device: str):
    """``autoprobe.tune`` on the training and validation splits only (never test), at the run's budget,
    optimizer and learning-rate schedule; resumable from a state file beside the results."""
    import autoprobe

    val = data.val if spec.task == "seg" else Split(data.val.images[:CLS_VAL], data.val.labels[:CLS_VAL])
    val_batches = [(val.images[i : i + 100], val.labels[i : i + 100]) for i in range(0, len(val), 100)]
    # Candidates' weights (about 140 MB each for DeepLabV3+ with AdamW's moments) stay out of the repository.
    state = None if spec.quick else TUNE_STATE / f"{spec.task}_{spec.model}_s{spec.seed}_{spec.steps}x{spec.batch}.jsonl"
    if state is not None:
        state.parent.mkdir(parents=True, exist_ok=True)
    return autoprobe.tune(
        lambda: build_model(spec.model), _TrainBatches(data.train, spec), val_batches,
        task="dense" if spec.task == "seg" else "classification", steps=spec.steps, seed=spec.seed, state=state,
        options=autoprobe.TrainOptions(
            optimizer=lambda params: torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=WEIGHT_DECAY),
            lr_factor=_lr_lambda(spec.steps), device=device, rules="dense" if spec.task == "seg" else "default",
            score=lambda model, batches: _score_val(model, batches, spec.task),
        ),
    )


def _score_val(model: nn.Module, batches, task: str) -> float:
    images, labels = zip(*batches)
    v = evaluate(model, Split(torch.cat(images), torch.cat(labels)), task)
    return v["mIoU" if task == "seg" else "accuracy"]


_PROVENANCE: dict | None = None


def _provenance() -> dict:
    """The autoprobe commit, and a hash of its sources as imported (the tree may be uncommitted)."""
    global _PROVENANCE
    if _PROVENANCE is None:
        import autoprobe

        pkg = Path(autoprobe.__file__).resolve().parent
        h = hashlib.sha256()
        for f in sorted(pkg.rglob("*.py")) + sorted((pkg.parent / "rules").glob("*.toml")):
            h.update(str(f.relative_to(pkg.parent)).encode())
            h.update(f.read_bytes())
        snapshot = pkg.parent / "SNAPSHOT_COMMIT"  # a frozen copy of a commit (plus named extra files)
        if snapshot.exists():
            lines = snapshot.read_text().split()
            _PROVENANCE = {"commit": lines[0], "dirty": len(lines) > 1, "extra": lines[1:],
                           "source_sha256": h.hexdigest()[:16], "snapshot": str(pkg.parent)}
            return _PROVENANCE
        try:
            commit = subprocess.run(["git", "-C", str(pkg.parent), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
            dirty = bool(subprocess.run(["git", "-C", str(pkg.parent), "status", "--porcelain", "autoprobe", "rules"],
                                        capture_output=True, text=True, check=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            commit, dirty = "unknown", True
        _PROVENANCE = {"commit": commit, "dirty": dirty, "source_sha256": h.hexdigest()[:16]}
    return _PROVENANCE


def _versions() -> dict:
    import timm

    out = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        import segmentation_models_pytorch as smp

        out["segmentation_models_pytorch"] = smp.__version__
    except ImportError:
        pass
    return out


# ----------------------------------------------------------------------------- grids

def _methods(task: str, model: str, seeds: Sequence[int], steps: int, batch: int, quick: bool = False):
    return [RunSpec(task, model, m, s, steps, batch, quick=quick) for s in seeds for m in METHODS]


def _imachsr(placements: Sequence[Placement], seeds: Sequence[int]) -> list[RunSpec]:
    return [RunSpec("seg", "deeplabv3plus", "imachsr", s, SEG_STEPS, SEG_BATCH, p) for s in seeds for p in placements]


def _ablation_m() -> list[Placement]:
    # M=3 is the automatic M (the selection test's reference arm, auto/M=3).
    return [Placement("auto", points=m) for m in (1, 2, 4, 5)]


def _ablation_dist() -> list[Placement]:
    return [Placement("spaced", points=3, spacing=d, position="centre") for d in (1, 2, 3)]


def _ablation_pos() -> list[Placement]:
    return [Placement("spaced", points=m, spacing=2, position=pos)
            for m in (1, 2, 3) for pos in ("input", "centre", "output")]


def _selection_test() -> list[Placement]:
    # auto/M=3 is the library's automatic selection spelled with its M, so its key differs from the main
    # table's `auto` runs, which ran on the frozen 7a53067 whose selection for DeepLabV3+ was older
    # (EVIDENCE.md, "Two libraries").
    return ([Placement("auto", points=3), Placement("hand"), Placement("last")]
            + [Placement("random", points=3, draw=d) for d in range(3)])


def _placements(seeds: Sequence[int], position: bool) -> list[RunSpec]:
    """Sections 4-5 in the new regime, seed-major: the selection test and the number and distance
    ablations, or (``position``) the position ablation's cells the distance ablation does not have."""
    if position:
        kinds = [p for p in _ablation_pos() if p not in _ablation_dist()]
    else:
        kinds = _selection_test() + _ablation_m() + _ablation_dist()
    return _imachsr(kinds, seeds)


def _shipped(task: str, model: str, seeds: Sequence[int]) -> list[RunSpec]:
    """iMacHSR at the default shipped since the rule of EVIDENCE.md section 2 (MI only: alpha 0.5,
    lambda 0), trained and scored on test like every main-table arm."""
    steps, batch = (SEG_STEPS, SEG_BATCH) if task == "seg" else (CLS_STEPS, CLS_BATCH)
    return [RunSpec(task, model, "imachsr", s, steps, batch, options=SHIPPED) for s in seeds]


def _unet(seeds: Sequence[int]) -> list[RunSpec]:
    """The second segmentation family (smp U-Net/ResNet-18), the DeepLabV3+ regime, seed-major."""
    return [spec for s in seeds for spec in
            [RunSpec("seg", "unet", m, s, SEG_STEPS, SEG_BATCH) for m in ("baseline", "dsn", "imachsr")]
            + _shipped("seg", "unet", (s,))]


def _seg_pilots() -> list[RunSpec]:
    """Baseline regime pilots, seed 0, scored on validation only (issue 15 section 2)."""
    return [RunSpec("seg", "deeplabv3plus", "baseline", 0, steps, batch, lr=lr, pilot=True)
            for steps, batch, lr in ((1500, 16, 3e-3), (3000, 16, 3e-3), (1500, 16, 1e-3))]


def _cls_pilots() -> list[RunSpec]:
    """Classification baselines at the 2-epoch budget, seed 0, scored on validation only: do they
    reach the 85% the regime asks for before any seeded grid runs?"""
    return [RunSpec("cls", m, "baseline", 0, CLS_STEPS, CLS_BATCH, pilot=True) for m in ("resnet18n", "vit")]


def _cls(model: str, methods: Sequence[str]) -> list[RunSpec]:
    """A classification table's arms, paired seeds 0-4, seed-major."""
    return [RunSpec("cls", model, m, s, CLS_STEPS, CLS_BATCH) for s in range(5) for m in methods]


def _primary(methods: Sequence[str]) -> list[RunSpec]:
    """The pre-registered comparison (EVIDENCE.md section 1): paired seeds 0-4, seed-major order."""
    return [RunSpec("seg", "deeplabv3plus", m, s, SEG_STEPS, SEG_BATCH) for s in range(5) for m in methods]


def _diagnosis(seeds: Sequence[int]) -> list[RunSpec]:
    """Issue 15 section 3, on validation only: iMacHSR's terms one at a time, a light weight, a
    decaying schedule and the two other MI estimators. Both terms at the defaults, and the baseline,
    are the primary grid's runs (their validation curves are recorded)."""
    variants = ((("lam", 0.0),), (("alpha", 0.0),), (("mi_estimator", "pooled"),), (("mi_estimator", "shuffled"),),
                (("alpha", 0.1),), (("schedule", "cosine"),))
    return [RunSpec("seg", "deeplabv3plus", "imachsr", s, SEG_STEPS, SEG_BATCH, pilot=True, options=v)
            for s in seeds for v in variants]


def _candidates(task: str, seeds: Sequence[int]) -> list[RunSpec]:
    """The two lighter iMacHSR settings seed 0's diagnosis pointed at (MI only; alpha 0.1), on more
    seeds, validation only: the evidence a change of the shipped defaults would rest on."""
    model, steps, batch = ("deeplabv3plus", SEG_STEPS, SEG_BATCH) if task == "seg" else ("resnet18n", CLS_STEPS, CLS_BATCH)
    return [RunSpec(task, model, "imachsr", s, steps, batch, pilot=True, options=v)
            for s in seeds for v in ((("alpha", 0.1),), (("lam", 0.0),))]


def _diagnosis_more() -> list[RunSpec]:
    """The rest of issue 15 section 3, on validation only and on the library of the seed-0 diagnosis
    (7a53067, so the points are the same): the alpha x lambda grid at seed 0 (cells not run before),
    the linear schedule, the other two estimators on segmentation seeds 1-2, and the shuffled estimator
    on classification seeds 0-1."""
    registered = dict(IMACHSR_REGISTERED)
    cells = []
    for alpha in (0.05, 0.1, 0.2, 0.5):
        for lam in (0.0, 0.01, 0.1):
            options = tuple((k, v) for k, v in (("alpha", alpha), ("lam", lam)) if registered[k] != v)
            if options and options not in ((("alpha", 0.1),), (("lam", 0.0),)):  # those two ran as candidates
                cells.append(options)
    seg = [RunSpec("seg", "deeplabv3plus", "imachsr", 0, SEG_STEPS, SEG_BATCH, pilot=True, options=o)
           for o in cells + [(("schedule", "linear"),)]]
    seg += [RunSpec("seg", "deeplabv3plus", "imachsr", s, SEG_STEPS, SEG_BATCH, pilot=True, options=(("mi_estimator", e),))
            for s in (1, 2) for e in ("pooled", "shuffled")]
    cls = [RunSpec("cls", "resnet18n", "imachsr", s, CLS_STEPS, CLS_BATCH, pilot=True, options=(("mi_estimator", e),))
           for s in (0, 1) for e in ("shuffled",)]
    return seg + cls


# The candidates of the default's validation rule (EVIDENCE.md section 7, registered before its runs):
# name -> (method, options). Output-only, DSN and iMacHSR as shipped (MI only) are read from the main
# tables' validation curves; these are trained for it, at the automatic points, on validation only.
GATE = (("gate", "cosine"),)
REGION = (("mi_estimator", "region"),)
CONV = (("head", "conv"),)
DEFAULT_CANDIDATES: dict[str, tuple[str, tuple[tuple[str, float | str], ...]]] = {
    "dsn-gated": ("dsn", GATE),
    "imachsr-gated": ("imachsr", SHIPPED + GATE),
    "dsn-conv": ("dsn", CONV),
    "imachsr-region": ("imachsr", SHIPPED + REGION),
    "imachsr-region-conv": ("imachsr", SHIPPED + REGION + CONV),
    "imachsr-region-gated": ("imachsr", SHIPPED + REGION + GATE),
}
EVIDENCE_MODELS = (("seg", "deeplabv3plus"), ("seg", "unet"), ("cls", "resnet18n"), ("cls", "vit"))
# DeepLabV3+'s DSN arm ran on 7a53067, whose automatic points were older; at today's points (the
# candidates' points) it is run again for the rule, spelled with its M so its key is its own.
DSN_TODAY = Placement("auto", points=3)


def _default_validation(names: Sequence[str], seeds: Sequence[int] = (0, 1, 2)) -> list[RunSpec]:
    """The rule's candidate runs (validation only), seed-major, the four models interleaved."""
    specs = []
    for s in seeds:
        for name in names:
            method, options = DEFAULT_CANDIDATES[name]
            for task, model in EVIDENCE_MODELS:
                if task == "cls" and ("mi_estimator", "region") in options:
                    continue  # RMI is defined on 2-D dense outputs only (instrument refuses it on a vector)
                steps, batch = (SEG_STEPS, SEG_BATCH) if task == "seg" else (CLS_STEPS, CLS_BATCH)
                specs.append(RunSpec(task, model, method, s, steps, batch, pilot=True, options=options))
        if "dsn-gated" in names:
            specs.append(RunSpec("seg", "deeplabv3plus", "dsn", s, SEG_STEPS, SEG_BATCH, DSN_TODAY, pilot=True))
    return specs


# The confirmation of the rule's choice (issue 24 item 4): seeds never used before, scored on test.
CONFIRMATION_SEEDS = (5, 6, 7, 8, 9)
# Candidates of the rule read from the main tables, spelled as the grids spell them.
TABLE_CANDIDATES = {"dsn": ("dsn", ()), "imachsr-mi": ("imachsr", SHIPPED)}


def _confirmation(name: str, canvas: int = 32) -> list[RunSpec]:
    """``name`` (``baseline`` or a candidate of the rule) at seeds 5-9, test-scored: on the four models at
    ``canvas`` 32, on the two segmentation models at 64 (the larger regime)."""
    method, options = ("baseline", ()) if name == "baseline" else {**TABLE_CANDIDATES, **DEFAULT_CANDIDATES}[name]
    specs = []
    for s in CONFIRMATION_SEEDS:
        for task, model in EVIDENCE_MODELS:
            if canvas != 32 and task != "seg":
                continue
            steps, batch = (SEG_STEPS, SEG_BATCH) if task == "seg" else (CLS_STEPS, CLS_BATCH)
            specs.append(RunSpec(task, model, method, s, steps, batch, options=options, canvas=canvas))
    return specs


def _tuned_returned() -> list[RunSpec]:
    """The tuned arm again after issue 26 (issue 24 item 5): the draw dealt over the objectives, the
    search on Optuna within max_cost, and the chosen model scored as tune returns it (no retraining);
    the four models, seeds 0-4, seed-major."""
    return [RunSpec(task, model, "tuned", s, steps, batch, options=(("model", "returned"),))
            for s in range(5)
            for task, model, steps, batch in (("seg", "deeplabv3plus", SEG_STEPS, SEG_BATCH),
                                              ("seg", "unet", SEG_STEPS, SEG_BATCH),
                                              ("cls", "resnet18n", CLS_STEPS, CLS_BATCH),
                                              ("cls", "vit", CLS_STEPS, CLS_BATCH))]


def _pilots64() -> list[RunSpec]:
    """The 64x64 regime's baseline pilots (issue 24 item 4), seed 0, validation only: does the registered
    budget (1,500 x 16 at 3e-3) flatten there, and is pixel accuracy 10 points over all-background?"""
    return [RunSpec("seg", model, "baseline", 0, SEG_STEPS, SEG_BATCH, pilot=True, canvas=64)
            for model in ("deeplabv3plus", "unet")]


GRIDS = {
    "pilot-seg": _seg_pilots,
    "primary": lambda: _primary(("baseline", "imachsr")),
    "primary-dsn": lambda: _primary(("dsn",)),
    "primary-tuned": lambda: _primary(("tuned",)),
    "diagnose": lambda: _diagnosis((0, 1)),
    "diagnose0": lambda: _diagnosis((0,)),
    "diagnose1": lambda: _diagnosis((1,)),
    "candidates-seg": lambda: _candidates("seg", (1, 2, 3, 4)),
    "candidates-cls": lambda: _candidates("cls", (0, 1, 2)),
    "diagnose-more": _diagnosis_more,
    "seg-shipped": lambda: _shipped("seg", "deeplabv3plus", range(5)),
    "seg-unet": lambda: _unet(range(5)),
    "seg-unet-tuned": lambda: [RunSpec("seg", "unet", "tuned", s, SEG_STEPS, SEG_BATCH) for s in range(5)],
    "placement": lambda: _placements(range(3), position=False),
    "position": lambda: _placements(range(3), position=True),
    "pilot-cls": _cls_pilots,
    "cls-resnet": lambda: _cls("resnet18n", ("baseline", "dsn", "imachsr")),
    "cls-vit": lambda: _cls("vit", ("baseline", "dsn", "imachsr")),
    "cls-resnet-tuned": lambda: _cls("resnet18n", ("tuned",)),
    "cls-vit-tuned": lambda: _cls("vit", ("tuned",)),
    "tuned-returned": _tuned_returned,
    "cls-shipped": lambda: _shipped("cls", "resnet18n", range(5)),
    "vit-shipped": lambda: _shipped("cls", "vit", range(5)),
    "default-gated": lambda: _default_validation(("dsn-gated", "imachsr-gated")),
    "default-heads": lambda: _default_validation(("dsn-conv", "imachsr-region", "imachsr-region-conv",
                                                  "imachsr-region-gated")),
    **{f"confirm-{name}": (lambda name=name: _confirmation(name))
       for name in ("baseline", *TABLE_CANDIDATES, *DEFAULT_CANDIDATES)},
    "pilot-seg64": _pilots64,
    **{f"confirm64-{name}": (lambda name=name: _confirmation(name, canvas=64))
       for name in ("baseline", *TABLE_CANDIDATES, *DEFAULT_CANDIDATES)},
}
# `--grid all`: the main tables first, then the second family, the placement grids and the rest.
ROUNDS = ("primary", "primary-dsn", "primary-tuned", "seg-shipped", "cls-resnet", "cls-resnet-tuned", "seg-unet",
          "seg-unet-tuned", "placement", "cls-shipped", "cls-vit", "vit-shipped", "cls-vit-tuned", "position")


def grid_specs(names: Sequence[str]) -> list[RunSpec]:
    """The runs of the named grids in order, duplicates dropped (``all`` = every grid)."""
    if "all" in names:
        names = list(ROUNDS)
    specs, seen = [], set()
    for name in names:
        if name not in GRIDS:
            raise SystemExit(f"unknown grid {name!r}; choose from {', '.join(GRIDS)} or all")
        for s in GRIDS[name]():
            if s.key() not in seen:
                seen.add(s.key())
                specs.append(s)
    return specs


def quick_specs(task: str) -> list[RunSpec]:
    if task == "seg":
        return _methods("seg", "deeplabv3plus", (0,), 3, 4, quick=True)
    return _methods("cls", "resnet18n", (0,), 3, 8, quick=True)


QUICK_SEG = SegConfig(train=32, val=8, test=8)
# The canvas sets by side. 64x64 (issue 24 item 4) doubles the side and the item scale and keeps every
# other setting, so the grids at the points are 4x larger (DeepLabV3+'s ASPP 4x4, its layer1 16x16).
SEG_CONFIGS = {32: SegConfig(), 64: SegConfig(size=64, scale=(24, 48))}


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            keys.add(json.loads(line)["key"])
    return keys


def _claim(claims: Path, spec: RunSpec) -> bool:
    """Claim ``spec`` for this worker: True if no other worker had (the claim file is created exclusively)."""
    claims.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(claims / hashlib.sha256(spec.key().encode()).hexdigest()[:20], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, spec.key().encode())
    os.close(fd)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--grid", action="append", default=[], help="grid name (repeatable) or all")
    parser.add_argument("--task", choices=("seg", "cls"), default=None, help="with --quick: which task")
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed, tiny data (CI)")
    parser.add_argument("--render", action="store_true", help="re-render tables and plots from the results")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON-lines results file (default {RESULTS})")
    parser.add_argument("--out", type=Path, default=EVIDENCE, help="where --render writes tables and PNGs")
    parser.add_argument("--data", type=Path, default=DEBIAN_DIR, help="directory of the Fashion-MNIST IDX files")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly: shared machines)")
    parser.add_argument("--limit", type=int, default=None, help="stop after N new runs")
    parser.add_argument("--lr", type=float, default=None, help="override the learning rate (validation pilots only)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    parser.add_argument("--claims", type=Path, default=None,
                        help="a directory where each worker claims a run before it starts it, so several workers "
                             "can share one grid without running a cell twice")
    parser.add_argument("--models", default=None, help="comma-separated subset of the models (split a grid by model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="only these seeds of the grids (two workers can split one grid without overlap)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.render:
        if __package__ in (None, ""):
            from evidence_plots import render
        else:
            from .evidence_plots import render
        render(args.results, args.out)
        return 0
    if args.quick:
        tasks = [args.task] if args.task else ["seg", "cls"]
        specs = [s for t in tasks for s in quick_specs(t)]
    else:
        if not args.grid:
            parser.error("give --grid NAME (or all), --quick or --render")
        specs = grid_specs(args.grid)
        if args.seeds is not None:
            specs = [sp for sp in specs if sp.seed in args.seeds]
    try:
        canvases = sorted({s.canvas for s in specs if s.task == "seg"})
        cfgs = {32: QUICK_SEG} if args.quick else {c: SEG_CONFIGS[c] for c in canvases}
        segs = {c: load_segmentation(cfgs[c], args.data) for c in canvases}
        cls = (load_classification(args.data, limit=64 if args.quick else None)
               if any(s.task == "cls" for s in specs) else None)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.lr is not None:
        specs = [dataclasses.replace(s, lr=args.lr) for s in specs]
    if args.methods:
        specs = [s for s in specs if s.method in args.methods.split(",")]
    if args.models:
        specs = [s for s in specs if s.model in args.models.split(",")]
    done = done_keys(args.results)
    todo = [s for s in specs if s.key() not in done]
    print(f"{len(specs)} runs in the grid, {len(specs) - len(todo)} already in {args.results}, {len(todo)} to do",
          flush=True)
    failed = 0
    for n, spec in enumerate(todo):
        if args.limit is not None and n >= args.limit:
            break
        data = segs[spec.canvas] if spec.task == "seg" else cls
        cfg = cfgs.get(spec.canvas, SEG_CONFIGS[32])
        if args.claims is not None and not _claim(args.claims, spec):
            continue
        try:
            record = run_one(spec, data, cfg, args.device, args.threads)
        except Exception:  # one broken run must not stop a two-hour grid; it is reported and not recorded
            failed += 1
            print(f"[{n + 1}/{len(todo)}] FAILED {spec.key()}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            continue
        with args.results.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        main_metric = record["metrics"].get("mIoU", record["metrics"].get("accuracy"))
        print(f"[{n + 1}/{len(todo)}] {spec.task} {spec.model} {spec.method} {spec.setting} seed={spec.seed}: "
              f"{main_metric:.4f}  {record['times']['wall_s']:.0f}s wall {record['times']['cpu_s']:.0f}s cpu  "
              f"points={record['points']}", flush=True)
    if failed:
        print(f"{failed} run(s) failed; see the tracebacks above", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
