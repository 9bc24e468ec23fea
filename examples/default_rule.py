"""EVIDENCE.md section 7: the rule that chooses ``instrument``'s default objective, applied to the results.

Reads the results file only (like ``evidence_plots``), never the test split: every score here is the
final validation score of a run (``curve.val[-1]``: seg mIoU on the 600 validation canvases, cls
accuracy on 2,000 held-out training images), paired by seed with the output-only run's.

- ``CANDIDATES``: the rule's arms as (name, method, setting); ``tests/test_evidence_grids.py``
  checks they are the settings ``compare.py``'s grids train.
- ``validation_rows``: ``summary.json``'s ``validation_rows``, one per model and candidate, in the
  schema of its ``rows``.
- ``apply_rule``: S(c), W(c) and the choice, once every candidate has its runs.
- ``gate_table`` / ``gate_plot``: the gate's weight in force over training, per point.

Example:
    >>> apply_rule([]).applied
    False
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CANDIDATES", "CURRENT", "SEEDS", "CONFIRMATION_SEEDS", "canvas", "RuleOutcome", "validation_rows", "apply_rule",
           "rule_table", "confirmation_rows", "confirmation_table", "gate_table", "gate_plot"]

MODELS = (("seg", "deeplabv3plus"), ("seg", "unet"), ("cls", "resnet18n"), ("cls", "vit"))
SEEDS = (0, 1, 2)
CONFIRMATION_SEEDS = (5, 6, 7, 8, 9)
CANVASES = (32, 64)  # the segmentation canvas sides the confirmation ran at (64: issue 24's larger regime)


def canvas(record: dict) -> int:
    """The segmentation canvas side a run trained on: 32 where the record has no field (those before the
    64x64 regime) or None (classification records, as compare.py writes them).

    Example:
        >>> canvas({"canvas": 64}), canvas({"canvas": None}), canvas({})
        (64, 32, 32)
    """
    return int(record.get("canvas") or 32)


# (name, method, setting, pilot): the runs a candidate is read from. DeepLabV3+'s DSN at today's
# points is a pilot spelled `auto/M=3` (its main-table runs had older points); see _arm_runs.
CANDIDATES: tuple[tuple[str, str, str], ...] = (
    ("output-only", "baseline", "none"),
    ("dsn", "dsn", "auto"),
    ("imachsr-mi", "imachsr", "auto/lam=0.0"),
    ("dsn-gated", "dsn", "auto/gate=cosine"),
    ("imachsr-gated", "imachsr", "auto/lam=0.0/gate=cosine"),
    ("dsn-conv", "dsn", "auto/head=conv"),
    ("imachsr-region", "imachsr", "auto/lam=0.0/mi_estimator=region"),
    ("imachsr-region-conv", "imachsr", "auto/lam=0.0/mi_estimator=region/head=conv"),
    ("imachsr-region-gated", "imachsr", "auto/lam=0.0/mi_estimator=region/gate=cosine"),
)
CURRENT = "imachsr-mi"  # instrument's default when the rule was registered
# RMI is defined on 2-D dense outputs only: these run on the segmentation models, are reported beside the
# rule, and cannot be instrument's default for every task (amendment of 13:20 UTC, before any of their runs).
DENSE_ONLY = frozenset(name for name, _, setting in CANDIDATES if "mi_estimator=region" in setting)
DSN_TODAY = "auto/M=3"
# Options per candidate, for the tie rule (fewer options wins).
_OPTIONS = {name: setting.count("/") for name, _, setting in CANDIDATES}


@dataclass(frozen=True)
class RuleOutcome:
    """What the rule gives: per candidate S (mean over models) and W (worst model), and the choice."""

    scores: dict[str, dict[str, float]]
    """Candidate -> model -> d(c, m), the mean paired validation difference in points (complete ones only)."""
    missing: dict[str, int]
    """Candidate -> runs still missing (out of 3 seeds x 4 models)."""
    applied: bool
    chosen: str | None

    def s(self, name: str) -> float:
        return statistics.fmean(self.scores[name].values())

    def w(self, name: str) -> float:
        return min(self.scores[name].values())


def _val(record: dict) -> float:
    return float(record["curve"]["val"][-1])


def _arm_runs(records: Sequence[dict], task: str, model: str, method: str, setting: str) -> dict[int, dict]:
    """Seed -> the run a candidate is read from (a pilot or a main-table run: both carry the validation curve)."""
    if (model, method, setting) == ("deeplabv3plus", "dsn", "auto"):
        setting = DSN_TODAY  # today's points; the main table's DSN ran at 7a53067's
    out: dict[int, dict] = {}
    for r in records:
        if ((r["task"], r["model"], r["method"], r["setting"]) == (task, model, method, setting) and not r.get("quick")
                and canvas(r) == 32):
            if r["seed"] in SEEDS and r["curve"]["val"]:
                out.setdefault(r["seed"], r)
    return out


def _paired(base: dict[int, float], arm: dict[int, float]) -> tuple[float, list[float] | None, int]:
    seeds = sorted(set(base) & set(arm))
    d = [arm[s] - base[s] for s in seeds]
    if not d:
        return math.nan, None, 0
    mean = statistics.fmean(d)
    if len(d) < 2:
        return mean, None, len(d)
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(d), 2.776)
    half = t * statistics.stdev(d) / math.sqrt(len(d))
    return mean, [mean - half, mean + half], len(d)


def validation_rows(records: Sequence[dict]) -> list[dict]:
    """``summary.json``'s ``validation_rows``: the rule's candidates on validation, in the ``rows`` schema.

    ``mean``/``sd`` are over the seeds found of 0-2; ``delta``/``ci95`` are paired with output-only's
    validation score of the same seed (None for output-only itself).
    """
    rows = []
    for task, model in MODELS:
        base = {s: _val(r) for s, r in _arm_runs(records, task, model, "baseline", "none").items()}
        for name, method, setting in CANDIDATES:
            runs = _arm_runs(records, task, model, method, setting)
            if not runs:
                continue
            values = {s: _val(r) for s, r in runs.items()}
            rows.append(_row(task, model, name, values, base, next(iter(runs.values()))))
    return rows


def _row(task: str, model: str, name: str, values: dict[int, float], base: dict[int, float], run: dict) -> dict:
    """One row of ``summary.json``'s schema: the arm's scores by seed, paired with output-only's (``base``)."""
    mean, ci, n = (None, None, 0) if name == "output-only" else _paired(base, values)
    return {
        "task": task, "model": model, "method": name, "seeds": sorted(values),
        "metric": "miou" if task == "seg" else "accuracy",
        "mean": statistics.fmean(values.values()),
        "sd": statistics.stdev(values.values()) if len(values) > 1 else 0.0,
        "delta": None if name == "output-only" or n == 0 else mean, "ci95": ci,
        "pixel_accuracy": None, "trivial_pixel_accuracy": None,
        "steps": run["steps"], "batch": run["batch"],
    }


def apply_rule(records: Sequence[dict]) -> RuleOutcome:
    """The registered rule (EVIDENCE.md section 7): applied only when every candidate has all its runs."""
    scores: dict[str, dict[str, float]] = {}
    missing: dict[str, int] = {}
    for name, method, setting in CANDIDATES[1:]:
        per_model, lacking = {}, 0
        models = [(t, m) for t, m in MODELS if t == "seg" or name not in DENSE_ONLY]
        for task, model in models:
            base = {s: _val(r) for s, r in _arm_runs(records, task, model, "baseline", "none").items()}
            arm = {s: _val(r) for s, r in _arm_runs(records, task, model, method, setting).items()}
            lacking += len(SEEDS) - len(set(arm) & set(base))
            if set(SEEDS) <= set(arm) & set(base):
                per_model[model] = 100 * statistics.fmean(arm[s] - base[s] for s in SEEDS)
        missing[name] = lacking
        if len(per_model) == len(models):
            scores[name] = per_model
    # The dense-only candidates cannot be chosen, so the rule does not wait for them (amendment 13:55 UTC).
    applied = all(n == 0 for name, n in missing.items() if name not in DENSE_ONLY)
    chosen = None
    if applied:
        current = scores[CURRENT]
        s_cur, w_cur = statistics.fmean(current.values()), min(current.values())
        better = [n for n in scores if n != CURRENT and n not in DENSE_ONLY
                  and statistics.fmean(scores[n].values()) > s_cur and min(scores[n].values()) > w_cur]
        better.sort(key=lambda n: (-statistics.fmean(scores[n].values()), _OPTIONS[n]))
        chosen = better[0] if better else CURRENT
    return RuleOutcome(scores, missing, applied, chosen)


def rule_table(records: Sequence[dict]) -> str:
    """The rule's table, as markdown: d(c, m) per model, S, W, and what is still missing."""
    outcome = apply_rule(records)
    head = ["candidate", *(m for _, m in MODELS), "S (mean)", "W (worst)", "runs missing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, _, _ in CANDIDATES[1:]:
        partial = _partial(records, name)
        cells = [f"{partial[m]:+.2f} (n={n})" if m in partial else "-" for m, n in
                 ((m, _count(records, name, t, m)) for t, m in MODELS)]
        full = outcome.scores.get(name)
        s = f"{statistics.fmean(full.values()):+.2f}" if full else "-"
        w = f"{min(full.values()):+.2f}" if full else "-"
        label = f"{name} (dense only, not eligible)" if name in DENSE_ONLY else name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {s} | {w} | {outcome.missing[name]} |")
    verdict = (f"Applied: the rule chooses **{outcome.chosen}**." if outcome.applied else
               f"Not applied yet: {sum(outcome.missing.values())} candidate runs are missing.")
    return "\n".join(lines) + f"\n\n{verdict}\n"


def _partial(records: Sequence[dict], name: str) -> dict[str, float]:
    """Model -> mean paired difference (points) over the seeds found so far."""
    method, setting = next((m, s) for n, m, s in CANDIDATES if n == name)
    out = {}
    for task, model in MODELS:
        base = {s: _val(r) for s, r in _arm_runs(records, task, model, "baseline", "none").items()}
        arm = {s: _val(r) for s, r in _arm_runs(records, task, model, method, setting).items()}
        seeds = sorted(set(base) & set(arm))
        if seeds:
            out[model] = 100 * statistics.fmean(arm[s] - base[s] for s in seeds)
    return out


def _count(records: Sequence[dict], name: str, task: str, model: str) -> int:
    method, setting = next((m, s) for n, m, s in CANDIDATES if n == name)
    return len(_arm_runs(records, task, model, method, setting))


def confirmation_rows(records: Sequence[dict]) -> list[dict]:
    """``summary.json``'s ``confirmation_rows``: seeds 5-9 on test, per model and canvas (32, and 64 for the
    segmentation models' larger regime), output-only and each candidate found there, in the ``rows`` schema
    plus ``canvas``; ``delta``/``ci95`` paired with output-only's test score of the same canvas."""
    rows = []
    for size in CANVASES:
        for task, model in MODELS:
            metric = "mIoU" if task == "seg" else "accuracy"
            base: dict[int, float] = {}
            for name, method, setting in CANDIDATES:
                runs = {r["seed"]: r for r in records
                        if (r["task"], r["model"], r["method"], r["setting"]) == (task, model, method, setting)
                        and r["seed"] in CONFIRMATION_SEEDS and not r.get("pilot") and not r.get("quick")
                        and canvas(r) == size}
                if not runs:
                    continue
                if name == "output-only":
                    base = {s: r["metrics"][metric] for s, r in runs.items()}
                values = {s: r["metrics"][metric] for s, r in runs.items()}
                rows.append({**_row(task, model, name, values, base, next(iter(runs.values()))), "canvas": size})
    return rows


def confirmation_table(rows: Sequence[dict]) -> str:
    """The confirmation rows as markdown (points; 95% paired-t interval)."""
    if not rows:
        return "No confirmation runs yet (`python examples/compare.py --grid confirm-baseline --grid confirm-NAME`).\n"
    lines = ["| model | canvas | arm | seeds | mean (%) | delta vs output-only [95% CI] |", "|---|---|---|---|---|---|"]
    for r in rows:
        delta = "-" if r["delta"] is None else (f"{100 * r['delta']:+.2f}" + (
            f" [{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}]" if r["ci95"] else ""))
        canvas = f"{r['canvas']}x{r['canvas']}" if r["task"] == "seg" else "28x28"
        lines.append(f"| {r['model']} | {canvas} | {r['method']} | {','.join(map(str, r['seeds']))} | "
                     f"{100 * r['mean']:.2f} | {delta} |")
    return "\n".join(lines) + "\n"


def _gated_runs(records: Sequence[dict]) -> list[dict]:
    return sorted((r for r in records if "gate=" in r.get("setting", "") and not r.get("quick")),
                  key=lambda r: (r["model"], r["setting"], r["seed"]))


def gate_table(records: Sequence[dict]) -> str:
    """Per gated run's point: the mean weight in each third of training, and when it first sat at 0."""
    lines = ["| model | candidate | seed | point | alpha | weight, 1st / 2nd / 3rd third | share at 0 | first 0 at step |",
             "|---|---|---|---|---|---|---|---|"]
    names = {(m, s): n for n, m, s in CANDIDATES}
    for r in _gated_runs(records):
        steps = r["curve"]["step"]
        for part, values in sorted(r["curve"]["terms"].items()):
            if not part.startswith("gate/"):
                continue
            third = max(1, len(values) // 3)
            means = [statistics.fmean(values[i * third:(i + 1) * third or None]) for i in range(3)]
            zero = [s for s, v in zip(steps, values) if v == 0.0]
            alpha = 0.3 if r["method"] == "dsn" else 0.5
            lines.append(f"| {r['model']} | {names.get((r['method'], r['setting']), r['setting'])} | {r['seed']} | "
                         f"{part[5:]} | {alpha} | {' / '.join(f'{m:.3f}' for m in means)} | "
                         f"{len(zero) / len(values):.0%} | {zero[0] if zero else '-'} |")
    return "\n".join(lines) + "\n"


def gate_plot(records: Sequence[dict], path: Path) -> Path | None:
    """The gate's weight in force over training, per point, seed 0: a row per gated candidate, a column per model."""
    runs = [r for r in _gated_runs(records) if r["seed"] == 0]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {(m, s): n for n, m, s in CANDIDATES}
    rows = sorted({names.get((r["method"], r["setting"]), r["setting"]) for r in runs})
    models = [m for _, m in MODELS if any(r["model"] == m for r in runs)]
    fig, axes = plt.subplots(len(rows), len(models), figsize=(3.4 * len(models), 2.6 * len(rows)),
                             squeeze=False, sharey=True)
    for r in runs:
        ax = axes[rows.index(names.get((r["method"], r["setting"]), r["setting"]))][models.index(r["model"])]
        for part, values in sorted(r["curve"]["terms"].items()):
            if part.startswith("gate/"):
                ax.plot(r["curve"]["step"], values, label=part[5:], lw=0.8)
        ax.set_title(f"{r['model']}: {names.get((r['method'], r['setting']), r['setting'])}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    for row in axes:
        row[0].set_ylabel("weight in force\n(mean of 10 steps)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
