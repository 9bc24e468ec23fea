"""Tables and PNG plots from compare.py's JSON-lines results (``python examples/compare.py --render``).

Every number is recomputed from the results file, never typed in: the mean and standard
deviation over seeds, the paired difference of each method to the baseline with a 95% paired-t
interval over the seeds both have (t quantile with n - 1 degrees of freedom), and the step-time
ratio to the baseline of the same seed.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

def _sibling(name: str):
    """A module beside this file (``default_rule``, ``mechanism``), imported as a script's sibling would be."""
    import importlib
    import sys

    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


__all__ = ["load", "paired", "summary_rows", "render"]

# A table's arms: (its name in tables and summary.json, the runs' method, the runs' setting).
# `imachsr` is the objective registered with the primary grid (alpha 0.5, lambda 0.01); `imachsr-mi`
# is the default shipped since (MI only, lambda 0), trained and scored on test like the others.
ARMS = (("baseline", "baseline", "none"), ("dsn", "dsn", "auto"), ("imachsr", "imachsr", "auto"),
        ("imachsr-mi", "imachsr", "auto/lam=0.0"), ("dks", "dks", "auto"), ("tuned", "tuned", "tuned"),
        ("tuned-returned", "tuned", "tuned/model=returned"))
SEG_METRICS = ("mIoU", "mF1", "mPrecision", "mRecall")
COLORS = {"baseline": "#555555", "dsn": "#1f77b4", "imachsr": "#d62728", "imachsr-mi": "#ff7f0e", "dks": "#2ca02c",
          "tuned": "#9467bd", "tuned-returned": "#8c564b"}


@dataclass(frozen=True)
class Paired:
    """A paired difference over seeds: mean, 95% t interval, number of pairs."""

    mean: float
    low: float
    high: float
    n: int

    def text(self, scale: float = 100.0) -> str:
        if self.n < 2:
            return f"{self.mean * scale:+.2f} (n={self.n})"
        return f"{self.mean * scale:+.2f} [{self.low * scale:+.2f}, {self.high * scale:+.2f}]"


def load(path: Path) -> list[dict]:
    """The non-quick records of a results file (pilots included; ``_main`` leaves them out)."""
    if not path.exists():
        return []
    return [r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip()) if not r.get("quick")]


# Seeds 5-9 confirm the default's rule (EVIDENCE.md section 7): their own rows, never merged into the tables.


# Defined once, in the rule's module: which seeds are the confirmation's, and how a record's canvas is read.
_RULE = _sibling("default_rule")
CONFIRMATION_SEEDS = frozenset(_RULE.CONFIRMATION_SEEDS)
canvas = _RULE.canvas


def _main(records: Sequence[dict]) -> list[dict]:
    """The runs of the main tables, seeds 0-4 scored on test at 32x32: pilots choose settings on validation
    and never enter a table of results, and the confirmation's seeds and the 64x64 regime have rows of their
    own."""
    return [r for r in records if not r.get("pilot") and r["seed"] not in CONFIRMATION_SEEDS and canvas(r) == 32]


# Student t 0.975 quantiles for 1..10 degrees of freedom (no scipy needed for a table this small).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.5 / df  # beyond 10: within 0.02 of the exact quantile


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """b - a over the seeds both have, with a 95% paired-t interval."""
    seeds = sorted(set(a) & set(b))
    d = [b[s] - a[s] for s in seeds]
    if not d:
        return Paired(math.nan, math.nan, math.nan, 0)
    m = statistics.fmean(d)
    if len(d) < 2:
        return Paired(m, math.nan, math.nan, len(d))
    half = _t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Paired(m, m - half, m + half, len(d))


def _ms(values: Sequence[float], scale: float = 100.0) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0] * scale:.2f}"
    return f"{statistics.fmean(values) * scale:.2f} ± {statistics.stdev(values) * scale:.2f}"


def _by_seed(records: Sequence[dict], metric: str) -> dict[int, float]:
    return {r["seed"]: r["metrics"][metric] for r in records}


def _select(records, **want) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in want.items())]


def _arms(records: Sequence[dict], **want) -> dict[str, list[dict]]:
    """Each arm's runs among ``records`` matching ``want`` (arms without runs included, empty)."""
    return {name: _select(records, method=method, setting=setting, **want) for name, method, setting in ARMS}


def _method_table(records: list[dict], task: str, model: str, metrics: Sequence[str]) -> tuple[str, dict]:
    rows = _arms(records, task=task, model=model)
    base = rows["baseline"]
    head = ["method", "seeds"] + [f"{k} (%)" for k in metrics] + [f"Δ{metrics[0]} vs baseline [95% CI]",
                                                                   "wall s/run", "CPU s/run", "CPU-time ratio",
                                                                   "step wall-time ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = {}
    base_step = {r["seed"]: r["times"]["step_wall_s"] for r in base}
    for m, rs in rows.items():
        if not rs:
            continue
        cells = [m, ",".join(str(s) for s in sorted(r["seed"] for r in rs))]
        cells += [_ms([r["metrics"][k] for r in rs]) for k in metrics]
        diff = paired(_by_seed(base, metrics[0]), _by_seed(rs, metrics[0]))
        cells.append("-" if m == "baseline" else diff.text())
        cells.append(f"{statistics.fmean(r['times']['wall_s'] for r in rs):.0f}")
        cells.append(f"{statistics.fmean(r['times']['cpu_s'] for r in rs):.0f}")
        base_cpu = {r["seed"]: r["times"]["cpu_s"] for r in base}
        cpu_ratios = [r["times"]["cpu_s"] / base_cpu[r["seed"]] for r in rs if r["seed"] in base_cpu]
        cells.append(f"{statistics.median(cpu_ratios):.2f}" if cpu_ratios else "-")
        ratios = [r["times"]["step_wall_s"] / base_step[r["seed"]] for r in rs if r["seed"] in base_step]
        cells.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
        lines.append("| " + " | ".join(cells) + " |")
        summary[m] = {"diff": diff, "records": rs}
    return "\n".join(lines), summary


def _placement_reference(records: Sequence[dict]) -> str:
    """The setting of the placement grids' automatic arm: ``auto/M=3`` since those grids moved to the
    current library (compare.py's selection test), ``auto`` in results files from before (the 200-step grid)."""
    spelled = _select(records, task="seg", model="deeplabv3plus", method="imachsr", setting="auto/M=3")
    return "auto/M=3" if spelled else "auto"


def _imachsr_rows(records: list[dict], settings: Sequence[tuple[str, str]], base: list[dict], reference: str) -> str:
    auto = _select(records, task="seg", model="deeplabv3plus", method="imachsr", setting=reference)
    head = ["setting", "points (seed 0)", "seeds", "mIoU (%)", "ΔmIoU vs baseline [95% CI]",
            "ΔmIoU vs automatic iMacHSR [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, setting in settings:
        rs = _select(records, task="seg", model="deeplabv3plus", method="imachsr", setting=setting)
        if not rs:
            lines.append(f"| {label} | (not run yet) | | | | |")
            continue
        pts = next((r["points"] for r in rs if r["seed"] == 0), rs[0]["points"])
        diff = paired(_by_seed(base, "mIoU"), _by_seed(rs, "mIoU"))
        lines.append(f"| {label} | {', '.join(pts)} | {','.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} "
                     f"| {_ms([r['metrics']['mIoU'] for r in rs])} | {diff.text()} "
                     f"| {'-' if setting == reference else paired(_by_seed(auto, 'mIoU'), _by_seed(rs, 'mIoU')).text()} |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curves(records: list[dict], task: str, model: str, out: Path) -> Path | None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn = False
    for m, rs in _arms(records, task=task, model=model).items():
        if not rs:
            continue
        drawn = True
        for ax, xs, ys in ((axes[0], "step", "train_ce"), (axes[1], "val_step", "val")):
            x = rs[0]["curve"][xs]
            mat = [r["curve"][ys] for r in rs if len(r["curve"][ys]) == len(x)]
            mean = [statistics.fmean(col) for col in zip(*mat)]
            sd = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*mat)]
            ax.plot(x, mean, color=COLORS[m], label=f"{m} (n={len(mat)})", marker="o" if ys == "val" else None)
            ax.fill_between(x, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)],
                            color=COLORS[m], alpha=0.15)
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(xlabel="step", ylabel="output cross-entropy (train, 10-step mean)", title=f"{model}: training loss",
                yscale="log")
    axes[1].set(xlabel="step", ylabel="val mIoU" if task == "seg" else "val accuracy",
                title=f"{model}: validation (mean ± sd over seeds)")
    axes[1].legend(fontsize=8)
    return _save(plt, fig, out / f"curves_{model}.png")


def _bars(summary: dict, metrics: Sequence[str], title: str, path: Path) -> Path | None:
    plt = _plt()
    methods = [name for name, _, _ in ARMS[1:] if name in summary]
    if not methods or "baseline" not in summary:
        return None
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(metrics), 3.4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        diffs = [paired(_by_seed(summary["baseline"]["records"], k), _by_seed(summary[m]["records"], k)) for k in metrics]
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(metrics))]
        means = [d.mean * 100 for d in diffs]
        err = [[(d.mean - d.low) * 100 if d.n > 1 else 0 for d in diffs],
               [(d.high - d.mean) * 100 if d.n > 1 else 0 for d in diffs]]
        ax.bar(xs, means, width, yerr=err, capsize=3, color=COLORS[m], label=m)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(metrics)), [f"Δ{k}" for k in metrics])
    ax.set_ylabel("paired difference to baseline (points)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _setting_plot(records, base, groups: dict[str, list[tuple[float, str]]], xlabel: str, title: str,
                  path: Path) -> Path | None:
    """One line per group: the paired mIoU difference to the baseline (same seeds) against x, with
    95% paired-t intervals where there are two or more seeds; n is written beside each point."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    drawn = False
    for gi, (name, points) in enumerate(groups.items()):
        xs, ys, lo, hi = [], [], [], []
        for x, setting in points:
            rs = _select(records, task="seg", model="deeplabv3plus", method="imachsr", setting=setting)
            if not rs:
                continue
            d = paired(_by_seed(base, "mIoU"), _by_seed(rs, "mIoU"))
            xs.append(x + 0.05 * (gi - (len(groups) - 1) / 2))
            ys.append(d.mean * 100)
            lo.append((d.mean - d.low) * 100 if d.n > 1 else 0)
            hi.append((d.high - d.mean) * 100 if d.n > 1 else 0)
            ax.annotate(f"n={d.n}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=6)
        if xs:
            drawn = True
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0, color="#555555", lw=1, label="baseline (paired)")
    ax.set(xlabel=xlabel, ylabel="ΔmIoU vs baseline (points)", title=title)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _delta_bars(records, base, settings: Sequence[tuple[str, str]], title: str, path: Path) -> Path | None:
    """Bars: each setting's paired mIoU difference to the baseline, with its 95% t interval."""
    plt = _plt()
    labels, means, lows, highs, ns = [], [], [], [], []
    for label, setting in settings:
        rs = _select(records, task="seg", model="deeplabv3plus", method="imachsr", setting=setting)
        if not rs:
            continue
        d = paired(_by_seed(base, "mIoU"), _by_seed(rs, "mIoU"))
        labels.append(label.replace(" ", "\n", 1))
        means.append(d.mean * 100)
        lows.append((d.mean - d.low) * 100 if d.n > 1 else 0)
        highs.append((d.high - d.mean) * 100 if d.n > 1 else 0)
        ns.append(d.n)
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 1.5, 3.6))
    ax.bar(range(len(labels)), means, yerr=[lows, highs], capsize=3, color=COLORS["imachsr"])
    for i, n in enumerate(ns):
        ax.annotate(f"n={n}", (i, 0), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("ΔmIoU vs baseline (points, paired)")
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, path)


def _qualitative(records: list[dict], out: Path) -> Path | None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from segdata import SegConfig, load_segmentation
    finally:
        sys.path.pop(0)
    pick = {}
    for m in ("baseline", "imachsr"):
        rs = _select(records, task="seg", model="deeplabv3plus", method=m, seed=0,
                     setting="none" if m == "baseline" else "auto")
        if rs and rs[0].get("test_predictions"):
            pick[m] = rs[0]
    if len(pick) < 2:
        return None
    cfg = SegConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in pick["baseline"]["data"].items()})
    data = load_segmentation(cfg)
    plt = _plt()
    n = len(pick["baseline"]["test_predictions"])
    fig, axes = plt.subplots(n, 4, figsize=(7, 1.8 * n))
    for i in range(n):
        panels = [(data.test.images[i, 0].numpy(), "gray", "image"), (data.test.labels[i].numpy(), "tab20", "ground truth"),
                  (pick["baseline"]["test_predictions"][i], "tab20", "baseline"),
                  (pick["imachsr"]["test_predictions"][i], "tab20", "iMacHSR")]
        for j, (img, cmap, name) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, cmap=cmap, **({} if cmap == "gray" else {"vmin": 0, "vmax": 19, "interpolation": "nearest"}))
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle("DeepLabV3+/ResNet-18, seed 0, first test canvases (colour = class, dark blue = background)",
                 fontsize=8)
    return _save(plt, fig, out / "qualitative_seg.png")


# ----------------------------------------------------------------------------- summary.json and pilots

_MODELS = (("seg", "deeplabv3plus"), ("seg", "unet"), ("cls", "resnet18n"), ("cls", "vit"))


def _trivial_pixel_accuracy(record: dict) -> float:
    """The all-background predictor's pixel accuracy on the record's test set (regenerated from its config)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from segdata import SegConfig, load_segmentation
    finally:
        sys.path.pop(0)
    cfg = SegConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["data"].items()})
    return float((load_segmentation(cfg).test.labels == 0).double().mean())


def summary_rows(records: Sequence[dict]) -> list[dict]:
    """The rows of ``summary.json`` (schema in issue 15 section 5): one per task, model, method and
    regime (steps, batch), over the test-scored runs; ``delta`` and ``ci95`` paired by seed against the
    ``baseline`` row of the same task, model and regime (null for the baseline itself)."""
    runs = _main(records)
    rows: list[dict] = []
    trivial: dict[str, float] = {}
    for task, model in _MODELS:
        regimes = sorted({(r["steps"], r["batch"]) for r in _select(runs, task=task, model=model)})
        for steps, batch in regimes:
            base = _select(runs, task=task, model=model, method="baseline", setting="none", steps=steps, batch=batch)
            metric = "mIoU" if task == "seg" else "accuracy"
            for m, rs in _arms(runs, task=task, model=model, steps=steps, batch=batch).items():
                if not rs:
                    continue
                values = [r["metrics"][metric] for r in sorted(rs, key=lambda r: r["seed"])]
                d = None if m == "baseline" else paired(_by_seed(base, metric), _by_seed(rs, metric))
                pixel = trivial_acc = None
                if task == "seg":
                    pixel = statistics.fmean(r["metrics"]["pixel_acc"] for r in rs)
                    key = json.dumps(rs[0]["data"], sort_keys=True)
                    if key not in trivial:
                        trivial[key] = _trivial_pixel_accuracy(rs[0])
                    trivial_acc = trivial[key]
                rows.append({
                    "task": task, "model": model, "method": m, "seeds": sorted(r["seed"] for r in rs),
                    "metric": "miou" if task == "seg" else "accuracy",
                    "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "delta": None if d is None or d.n == 0 else d.mean,
                    "ci95": None if d is None or d.n < 2 else [d.low, d.high],
                    "pixel_accuracy": pixel, "trivial_pixel_accuracy": trivial_acc, "steps": steps, "batch": batch,
                })
    return rows


def _flattening(steps: Sequence[int], values: Sequence[float]) -> float:
    """The share of the final validation score added in the last quarter of training (linear
    interpolation of the validation curve at 75% of the steps); the regime rule wants < 0.10."""
    at = 0.75 * steps[-1]
    for (s0, v0), (s1, v1) in zip(zip(steps, values), zip(steps[1:], values[1:])):
        if s0 <= at <= s1:
            start = v0 + (v1 - v0) * (at - s0) / (s1 - s0)
            return (values[-1] - start) / values[-1] if values[-1] else math.nan
    return math.nan


def _tune_table(records: Sequence[dict], task: str, model: str) -> str:
    """Per seed: what ``autoprobe.tune`` chose on validation, its and output-only's validation score,
    and the test score of the choice beside the baseline's of the same seed."""
    metric = "mIoU" if task == "seg" else "accuracy"
    base = _by_seed(_select(records, task=task, model=model, method="baseline", setting="none"), metric)
    parts = []
    for setting, title in (("tuned", "the choice retrained (before issue 26)"),
                           ("tuned/model=returned", "the model tune returns (issue 26: no retraining)")):
        tuned = sorted(_select(records, task=task, model=model, method="tuned", setting=setting), key=lambda r: r["seed"])
        if not tuned:
            continue
        returned = setting != "tuned"
        head = ["seed", "tune chose (validation)", "its val", "output-only's val", "test of the choice",
                "baseline's test", "training steps (x budget)"] + (["measured cost (runs)", "CPU s", "wall s"] if returned else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in tuned:
            t = r["tune"]
            chosen = next(row for row in t["table"] if row["candidate"] == t["chosen"])
            cells = [str(r["seed"]), t["chosen"], f"{chosen['scores'][-1] * 100:.2f}", f"{t['output_only_val_score'] * 100:.2f}",
                     f"{r['metrics'][metric] * 100:.2f}", f"{base[r['seed']] * 100 if r['seed'] in base else math.nan:.2f}",
                     f"{t['cost_steps'] / r['steps']:.2f}"]
            if returned:
                cost = t.get("cost") or {}
                cells += [f"{cost.get('runs', math.nan):.2f}", f"{cost.get('cpu_s', math.nan):.0f}",
                          f"{cost.get('wall_s', math.nan):.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append(f"`autoprobe.tune` per seed, {title} (scores in %):\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def _regime_check(base: Sequence[dict]) -> str:
    """Issue 15's regime targets for a segmentation baseline: its validation curve flattened (the last
    quarter adds < 10% of the final validation mIoU) and its test pixel accuracy >= 10 points above the
    all-background predictor's; mIoU >= 30% is in the table above."""
    if not base:
        return ""
    shares = [_flattening(r["curve"]["val_step"], r["curve"]["val"]) for r in base]
    trivial = _trivial_pixel_accuracy(base[0])
    pixel = statistics.fmean(r["metrics"]["pixel_acc"] for r in base)
    return (f"Regime check (baseline): last-quarter share of the final validation mIoU {_ms(shares)}% "
            f"(target < 10%); test pixel accuracy {pixel * 100:.2f}%, {(pixel - trivial) * 100:+.2f} points against "
            f"the all-background predictor's {trivial * 100:.2f}% (target >= +10).\n")


def _pilot_table(records: Sequence[dict]) -> str:
    pilots = [r for r in records if r.get("pilot")]
    if not pilots:
        return "(no pilots recorded)"
    head = ["task", "model", "method", "setting", "seed", "steps x batch", "lr", "val score (%): mIoU or accuracy",
            "val pixel acc (%)", "last-quarter share of final val score", "CPU s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in pilots:
        c, m = r["curve"], r["metrics"]
        score = m["mIoU"] if r["task"] == "seg" else m["accuracy"]
        pixel = f"{m['pixel_acc'] * 100:.2f}" if "pixel_acc" in m else "-"
        where = r["setting"] + ("" if canvas(r) == 32 else f" (canvas {canvas(r)})")
        lines.append(f"| {r['task']} | {r['model']} | {r['method']} | {where} | {r['seed']} "
                     f"| {r['steps']} x {r['batch']} | {r.get('lr', '-')} | {score * 100:.2f} | {pixel} "
                     f"| {_flattening(c['val_step'], c['val']):.3f} | {r['times']['cpu_s']:.0f} | {r['times']['wall_s']:.0f} |")
    return "\n".join(lines)


def _final_val(records: Sequence[dict], **want) -> dict[int, float]:
    """Seed -> the last validation score on the curve (test-scored runs record it along training)."""
    return {r["seed"]: r["curve"]["val"][-1] for r in _select(records, **want)}


_ALPHAS, _LAMBDAS = (0.05, 0.1, 0.2, 0.5), (0.0, 0.01, 0.1)


def _alpha_lambda_table(records: Sequence[dict], seed: int = 0) -> str:
    """iMacHSR's alpha x lambda grid on DeepLabV3+ (seed ``seed``, validation): each cell's final validation
    mIoU minus the baseline's, in points. A cell is the validation pilot of that setting, spelled as
    compare.py spells options (keys that differ from the registered alpha 0.5, lambda 0.01); the registered
    cell itself is the primary grid's iMacHSR run, whose validation curve is recorded."""
    regime = dict(task="seg", model="deeplabv3plus", seed=seed)
    base = _final_val(_main(records), method="baseline", setting="none", **regime)
    if seed not in base:
        return "(no baseline for this seed yet)"
    head = ["alpha \\ lambda"] + [str(lam) for lam in _LAMBDAS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for alpha in _ALPHAS:
        cells = [str(alpha)]
        for lam in _LAMBDAS:
            options = [f"alpha={alpha}"] * (alpha != 0.5) + [f"lam={lam}"] * (lam != 0.01)
            if options:
                runs = [r for r in records if r.get("pilot") and r["method"] == "imachsr"
                        and r["setting"] == "/".join(["auto"] + options)]
            else:
                runs = _select(_main(records), method="imachsr", setting="auto")
            val = _final_val(runs, **regime)
            cells.append(f"{(val[seed] - base[seed]) * 100:+.2f}" if seed in val else "not run")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _term_means(r: dict) -> tuple[float, float]:
    """Sum over points of the MI and of the NE term, averaged over the last quarter of the logged steps."""
    terms = r["curve"].get("terms", {})
    tail = max(1, len(r["curve"]["step"]) // 4)
    mi = sum(statistics.fmean(v[-tail:]) for k, v in terms.items() if k.startswith("mi/"))
    ne = sum(statistics.fmean(v[-tail:]) for k, v in terms.items() if k.startswith("ne/"))
    return mi, ne


def _diagnosis_table(records: Sequence[dict], task: str = "seg", model: str = "deeplabv3plus") -> str:
    """iMacHSR's variants on validation (pilots) beside the main grid's baseline and default iMacHSR of
    the same task and model, paired by seed on the final validation score."""
    runs = _main(records)
    regime = dict(task=task, model=model)
    pilots = [r for r in records if r.get("pilot") and r["method"] == "imachsr" and r["task"] == task and r["model"] == model]
    variants = sorted({r["setting"] for r in pilots})
    if not variants:
        return "(no diagnosis runs recorded yet)"
    base = _final_val(runs, method="baseline", setting="none", **regime)
    default = _final_val(runs, method="imachsr", setting="auto", **regime)
    score = "mIoU" if task == "seg" else "accuracy"
    head = ["iMacHSR variant", "seeds", f"final val {score} (%)", "Δ vs baseline [95% CI]", "Δ vs default iMacHSR [95% CI]",
            "MI, sum over points (nats, last quarter)", "NE, sum over points (nats, last quarter)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [("default (alpha 0.5, lam 0.01, image MI, constant): main grid", None)] + [(v, v) for v in variants]
    for label, setting in rows:
        rs = (_select(runs, method="imachsr", setting="auto", **regime) if setting is None
              else [r for r in pilots if r["setting"] == setting])
        if not rs:
            lines.append(f"| {label} | (not run yet) | | | | | |")
            continue
        val = {r["seed"]: r["curve"]["val"][-1] for r in rs}
        mi_ne = [_term_means(r) for r in rs]
        lines.append(f"| {label} | {','.join(map(str, sorted(val)))} | {_ms(list(val.values()))} "
                     f"| {paired(base, val).text()} | {'-' if setting is None else paired(default, val).text()} "
                     f"| {statistics.fmean(m for m, _ in mi_ne):.3f} | {statistics.fmean(n for _, n in mi_ne):.3f} |")
    return "\n".join(lines)


def _pilot_curves(records: Sequence[dict], out: Path) -> Path | None:
    pilots = [r for r in records if r.get("pilot") and r["method"] == "baseline"]
    if not pilots:
        return None
    plt = _plt()
    tasks = [t for t in ("seg", "cls") if any(r["task"] == t for r in pilots)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in pilots if r["task"] == task):
            ax.plot(r["curve"]["val_step"], r["curve"]["val"], marker="o",
                    label=f"{r['model']} {r['steps']}x{r['batch']}, lr {r.get('lr')}")
        ax.set(xlabel="step", ylabel="validation mIoU (item classes)" if task == "seg" else "validation accuracy",
               title=f"{task}: baseline pilots (validation only)")
        ax.legend(fontsize=7)
    return _save(plt, fig, out / "pilots.png")


def _term_curves(records: Sequence[dict], out: Path, task: str = "seg", model: str = "deeplabv3plus") -> Path | None:
    """Each logged loss term along training (mean over seeds), one panel per method with terms."""
    runs = [r for r in _main(records) if r["task"] == task and r["model"] == model
            and r["method"] in ("dsn", "imachsr") and r["setting"] == "auto" and r["curve"].get("terms")]
    methods = [m for m in ("dsn", "imachsr") if any(r["method"] == m for r in runs)]
    if not methods:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(5.6 * len(methods), 3.8), squeeze=False)
    for ax, m in zip(axes[0], methods):
        rs = [r for r in runs if r["method"] == m]
        steps = rs[0]["curve"]["step"]
        for name in sorted(rs[0]["curve"]["terms"]):
            mat = [r["curve"]["terms"][name] for r in rs if len(r["curve"]["terms"].get(name, ())) == len(steps)]
            ax.plot(steps, [statistics.fmean(col) for col in zip(*mat)], label=f"{name} (n={len(mat)})", lw=1)
        ax.axhline(0, color="black", lw=0.5)
        ax.set(xlabel="step", ylabel="unweighted term value (10-step mean)", title=f"{model} {m}: terms along training")
        ax.legend(fontsize=6)
    return _save(plt, fig, out / f"terms_{model}.png")


def render(results: Path, out: Path) -> str:
    """Write ``tables.md``, ``summary.json`` and the PNGs into ``out``; return the tables' text."""
    everything = load(results)
    records = _main(everything)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Tables rendered from {results.name} ({len(records)} test-scored runs, "
             f"{len(everything) - len(records)} validation pilots)\n",
             "## Pilots (validation split only)\n\n" + _pilot_table(everything) + "\n",
             "## Term diagnosis (validation split, paired by seed on the final validation mIoU)\n\n"
             + _diagnosis_table(everything) + "\n",
             "## alpha x lambda (DeepLabV3+, seed 0, validation): final val mIoU minus the baseline's, points\n\n"
             + _alpha_lambda_table(everything) + "\n",
             "## Term diagnosis, classification (ResNet-18n; validation accuracy on 2,000 held-out training "
             "images, paired by seed)\n\n" + _diagnosis_table(everything, "cls", "resnet18n") + "\n"]
    made: list[Path] = []
    summaries = {}
    for task, model, metrics in (("seg", "deeplabv3plus", SEG_METRICS), ("seg", "unet", SEG_METRICS),
                                 ("cls", "resnet18n", ("accuracy",)), ("cls", "vit", ("accuracy",))):
        if not _select(records, task=task, model=model):
            continue
        table, summary = _method_table(records, task, model, metrics)
        summaries[model] = summary
        parts.append(f"## {task} / {model}\n\nmean ± sd over seeds; Δ = method - baseline, paired by seed, "
                     f"95% paired-t interval; metrics in %{' (macro over the 10 item classes, background excluded)' if task == 'seg' else ''}.\n\n{table}\n")
        if task == "seg":
            bg = "\n".join(f"- {m}: mIoU with background {_ms([r['metrics']['mIoU_bg'] for r in s['records']])}, "
                           f"pixel accuracy {_ms([r['metrics']['pixel_acc'] for r in s['records']])}"
                           for m, s in summary.items())
            parts.append(f"With background counted (11 classes):\n\n{bg}\n")
            parts.append(_regime_check(summary.get("baseline", {}).get("records", [])))
        parts.append(_tune_table(records, task, model))
        made.append(_curves(records, task, model, out))
        made.append(_bars(summary, metrics, f"{model}: paired difference to the output-only baseline (95% t CI)",
                          out / f"bars_{model}.png"))
    base = _select(records, task="seg", model="deeplabv3plus", method="baseline")
    ref = _placement_reference(records)
    m_settings = [(f"M={m}", ref if m == 3 else f"auto/M={m}") for m in range(1, 6)]
    parts.append("## Ablation: number of points (automatic placement, M forced; M=3 is the automatic M)\n\n"
                 "iMacHSR at the weights of the primary grid (alpha 0.5, lambda 0.01); the last column is paired "
                 f"with the automatic arm (`{ref}`).\n\n" + _imachsr_rows(records, m_settings, base, ref) + "\n")
    made.append(_setting_plot(records, base, {"iMacHSR": [(m, s) for m, (_, s) in zip(range(1, 6), m_settings)]},
                              "number of points M", "iMacHSR: number of points", out / "ablate_m.png"))
    d_settings = [(f"{d} base unit(s) = {2 * d} weight layers", f"spaced/M=3/d={d}/centre") for d in (1, 2, 3)]
    parts.append("## Ablation: distance between adjacent points (3 points, centred, exact spacing)\n\n"
                 + _imachsr_rows(records, d_settings, base, ref) + "\n")
    made.append(_setting_plot(records, base, {"3 points, centre": [(d, f"spaced/M=3/d={d}/centre") for d in (1, 2, 3)]},
                              "distance between adjacent points (base units of 2 weight layers)",
                              "iMacHSR: spacing", out / "ablate_dist.png"))
    p_settings = [(f"M={m}, {pos}", f"spaced/M={m}/d=2/{pos}") for m in (1, 2, 3) for pos in ("input", "centre", "output")]
    parts.append("## Ablation: position (2 base units apart)\n\n" + _imachsr_rows(records, p_settings, base, ref) + "\n")
    made.append(_setting_plot(records, base, {pos: [(m, f"spaced/M={m}/d=2/{pos}") for m in (1, 2, 3)]
                                              for pos in ("input", "centre", "output")},
                              "number of points M", "iMacHSR: position by M", out / "ablate_pos.png"))
    s_settings = ([("automatic (autoprobe)", ref)]
                  + ([("automatic at 7a53067 (the primary grid's runs)", "auto")] if ref != "auto" else [])
                  + [("hand-picked stage ends", "hand"), ("last encoder stage only", "last")]
                  + [(f"random draw {d}", f"random/M=3/draw={d}") for d in range(3)])
    parts.append("## Selection test (iMacHSR, same budget; seeds as listed)\n\n"
                 + _imachsr_rows(records, s_settings, base, ref) + "\n")
    made.append(_delta_bars(records, base, s_settings, "Selection test: iMacHSR at different points (95% paired-t CI)",
                            out / "selection.png"))
    made.append(_qualitative(records, out))
    made.append(_pilot_curves(everything, out))
    made.extend(_term_curves(records, out, task, model) for task, model in _MODELS)
    rule, mechanism = _sibling("default_rule"), _sibling("mechanism")
    parts.append("## The default's validation rule (EVIDENCE.md section 7)\n\nd(c, m): the candidate's final "
                 "validation score minus output-only's, paired by seed, mean over seeds 0-2, in points (n: seeds "
                 "found so far); S: the mean of the four models, W: the worst.\n\n" + rule.rule_table(everything))
    parts.append("## The gate's weight in force over training (gated runs)\n\n" + rule.gate_table(everything))
    made.append(rule.gate_plot(everything, out / "gate_weights.png"))
    summary = {"rows": summary_rows(everything), "validation_rows": rule.validation_rows(everything),
               "confirmation_rows": rule.confirmation_rows(everything)}
    parts.append("## The confirmation (seeds 5-9, test split)\n\n" + rule.confirmation_table(summary["confirmation_rows"]))
    parts.append("## The mechanism check (`examples/mechanism.py`)\n\n"
                 + mechanism.render(mechanism.load(results.parent / "mechanism.jsonl"), summary["rows"], out))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    made.append(out / "summary.json")
    text = "\n".join(parts)
    (out / "tables.md").write_text(text)
    print(text)
    print("wrote", ", ".join(str(p) for p in made if p is not None))
    return text
