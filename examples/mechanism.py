"""The mechanism check, without training a method: does each term's gradient agree with the output loss's?

For each evidence model (seed 0, the regime of ``examples/compare.py``) the plain model is trained
as the output-only baseline, and checkpoints are kept at 10%, 50% and 100% of its run. At each
checkpoint the adapters of the automatic points (today's library) are fitted as linear probes on
the frozen trunk (``PROBE_STEPS`` steps of DSN's CE: a head fresh from initialisation would measure
a random projection), then, over ``BATCHES`` training batches, the cosine between the gradient of
the output CE and the gradient of each point's term, per point and per term:

- ``dsn``: DSN's CE at the head (alpha 0.3);
- ``mi``: iMacHSR's MI at the head (alpha 0.5, the shipped default);
- ``ne``: iMacHSR's negative entropy of the feature (lambda 0.01, the registered weight);

each both ways ``autoprobe.losses.gate`` can take it: at the point's feature (``feature``) and on
the model parameters both losses reach (``parameters``). The norm ratio is |g_term| / |g_output|.
It is the gate's own measurement (``gradient_agreement``), so the table says how much the cheap form
agrees with the exact one on these models.

Which form the gate ships (decided by this rule, written before the first full run): the cheap
``feature`` form is the default only if, over every (model, checkpoint, term, point) cell, its mean
cosine has the sign of the ``parameters`` form's in at least 90% of the cells *and* the two correlate
with Pearson r >= 0.9; otherwise the exact ``parameters`` form is the default. Amended at 12:58 UTC,
after the first 8 of 72 cells were in and showed the feature form's cosines an order of magnitude
smaller: the rule as first written is scale-free, and the gate's weight max(0, cos) is not, so the
cheap form must also give multipliers max(0, cos) within 0.1 of the exact form's on average.

Results go to ``examples/evidence/mechanism.jsonl``, one line per (model, checkpoint, term, form,
point), resumable; ``examples/evidence_plots.py`` renders the table and the plot.

Usage:
    python examples/mechanism.py --models unet vit --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import compare  # noqa: E402
    from segdata import DEBIAN_DIR, SegConfig, Split, load_classification, load_segmentation  # noqa: E402
else:
    from . import compare
    from .segdata import DEBIAN_DIR, SegConfig, Split, load_classification, load_segmentation

__all__ = ["CHECKPOINTS", "TERMS", "measure_model", "agreement", "render", "main"]

RESULTS = compare.EVIDENCE / "mechanism.jsonl"
CHECKPOINTS = (0.1, 0.5, 1.0)
BATCHES = 20
PROBE_STEPS = 100
# term -> (objective, its options): each measured alone, so the gate's per-point cosine is that term's.
TERMS = {
    "dsn": ("dsn", {"alpha": 0.3}),
    "mi": ("imachsr", {"alpha": 0.5, "lam": 0.0}),
    "ne": ("imachsr", {"alpha": 0.0, "lam": 0.01}),
}
FORMS = ("feature", "parameters")


def _train_baseline(spec: compare.RunSpec, train: Split, device: str):
    """The baseline of ``compare.run_one`` (same seed, init, batches, optimizer and schedule), yielding
    (fraction, state_dict copy) at each checkpoint."""
    torch.manual_seed(spec.seed)
    model = compare.build_model(spec.model).to(device)
    torch.manual_seed(spec.seed + compare.TRAIN_RNG_OFFSET)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=compare.WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, compare._lr_lambda(spec.steps))
    at = {max(1, round(spec.steps * f)): f for f in CHECKPOINTS}
    model.train()
    for step, idx in enumerate(compare._batches(len(train), spec.batch, spec.steps, spec.seed)):
        loss = F.cross_entropy(model(train.images[idx].to(device)), train.labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step + 1 in at:
            yield at[step + 1], copy.deepcopy(model.state_dict())


def _probed(spec: compare.RunSpec, state: dict, size: tuple[int, ...], train: Split, device: str, term: str,
            form: str, probe_seed: int):
    """A probed copy of the checkpoint whose objective measures ``term`` at every call, with fitted heads."""
    import autoprobe
    from autoprobe.losses import Gate

    model = compare.build_model(spec.model)
    model.load_state_dict(state)
    rules = "dense" if spec.task == "seg" else "default"
    name, options = TERMS[term]
    torch.manual_seed(probe_seed)  # the same heads for every term and form of a checkpoint
    probed = autoprobe.instrument(model, loss=name, input_size=size, rules=rules,
                                  loss_options=autoprobe.LossOptions(gate=Gate("cosine", every=1, wrt=form),
                                                                     **options)).to(device)
    _fit_heads(probed, spec, train, device, probe_seed)
    return probed


def _fit_heads(probed, spec: compare.RunSpec, train: Split, device: str, seed: int) -> None:
    """Linear probes: the adapters trained on DSN's CE with the trunk frozen (and in eval mode)."""
    adapters = list(probed.autoprobe_adapters.parameters())
    opt = torch.optim.Adam(adapters, lr=3e-3)
    probed.eval()
    for idx in compare._batches(len(train), spec.batch, PROBE_STEPS, seed):
        x, y = train.images[idx].to(device), train.labels[idx].to(device)
        with torch.no_grad():
            out = probed(x)
        heads = {k: probed.autoprobe_adapters[k](out.features[p]) for k, p in _keys(probed).items()}
        logits = probed.logits(out)
        loss = sum(F.cross_entropy(F.interpolate(h, size=logits.shape[2:], mode="bilinear", align_corners=False)
                                   if h.dim() == 4 and h.shape[2:] != logits.shape[2:] else h, y)
                   for h in heads.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _keys(probed) -> dict[str, str]:
    """Adapter key -> point name."""
    return {tap.adapter.split(".", 1)[1]: tap.point for tap in probed.report.taps}


def measure_model(model_name: str, data, cfg: SegConfig, device: str, done: set[str], out: Path) -> None:
    """Train the baseline of ``model_name`` and write one line per measurement not in ``done``."""
    task = "seg" if model_name in ("deeplabv3plus", "unet") else "cls"
    steps, batch = (compare.SEG_STEPS, compare.SEG_BATCH) if task == "seg" else (compare.CLS_STEPS, compare.CLS_BATCH)
    spec = compare.RunSpec(task, model_name, "baseline", 0, steps, batch)
    size = compare.input_size(task, cfg)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for fraction, state in _train_baseline(spec, data.train, device):
        for term in TERMS:
            for form in FORMS:
                key = json.dumps([model_name, fraction, term, form])
                if key in done:
                    continue
                probed = _probed(spec, state, size, data.train, device, term, form, probe_seed=int(fraction * 1000))
                probed.train()
                sums: dict[str, list[float]] = {}
                t0, c0 = time.perf_counter(), time.process_time()
                for idx in compare._batches(len(data.train), spec.batch, BATCHES, seed=12345):
                    x, y = data.train.images[idx].to(device), data.train.labels[idx].to(device)
                    probed.loss(probed(x), y)  # every=1: the gate measures on this batch
                    for point, agreement in probed.objective.gate.last.items():
                        sums.setdefault(point, []).append(agreement.cosine)
                        sums.setdefault(point + "\0ratio", []).append(agreement.norm_ratio)
                points = [p for p in sums if "\0" not in p]
                record = {
                    "key": key, "model": model_name, "task": task, "checkpoint": fraction, "term": term, "form": form,
                    "points": points,
                    "cosine": {p: _mean(sums[p]) for p in points},
                    "cosine_sd": {p: _sd(sums[p]) for p in points},
                    "norm_ratio": {p: _mean(sums[p + "\0ratio"]) for p in points},
                    "batches": BATCHES, "probe_steps": PROBE_STEPS, "seed": 0,
                    "times": {"measure_wall_s": round(time.perf_counter() - t0, 3),
                              "measure_cpu_s": round(time.process_time() - c0, 3)},
                    "autoprobe": compare._provenance(), "versions": compare._versions(),
                    "threads": torch.get_num_threads(),
                    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                with out.open("a") as f:
                    f.write(json.dumps(record, sort_keys=True) + "\n")
                print(f"{model_name} {fraction:.0%} {term:>3} {form:>10}: "
                      + "  ".join(f"{p}={record['cosine'][p]:+.2f}" for p in points), flush=True)
    print(f"{model_name}: {time.perf_counter() - wall0:.0f}s wall, {time.process_time() - cpu0:.0f}s cpu", flush=True)


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 6)


def _sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return round((sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5, 6)


def load(path: Path) -> list[dict]:
    """The mechanism records of ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cells(records: list[dict]) -> dict[tuple[str, float, str, str], dict[str, float]]:
    """(model, checkpoint, term, point) -> form -> mean cosine."""
    cells: dict[tuple[str, float, str, str], dict[str, float]] = {}
    for r in records:
        for point, cos in r["cosine"].items():
            cells.setdefault((r["model"], r["checkpoint"], r["term"], point), {})[r["form"]] = cos
    return {k: v for k, v in cells.items() if set(v) == set(FORMS)}


def agreement(records: list[dict]) -> dict[str, float]:
    """How the feature form agrees with the exact one over every cell: the numbers of the form rule."""
    cells = list(_cells(records).values())
    if len(cells) < 2:
        return {"cells": len(cells)}
    f = [c["feature"] for c in cells]
    p = [c["parameters"] for c in cells]
    same_sign = sum((a > 0) == (b > 0) for a, b in zip(f, p)) / len(cells)
    mf, mp = sum(f) / len(f), sum(p) / len(p)
    cov = sum((a - mf) * (b - mp) for a, b in zip(f, p))
    sf = sum((a - mf) ** 2 for a in f) ** 0.5
    sp = sum((b - mp) ** 2 for b in p) ** 0.5
    r = cov / (sf * sp) if sf > 0 and sp > 0 else float("nan")
    gap = sum(abs(max(0.0, a) - max(0.0, b)) for a, b in zip(f, p)) / len(cells)
    cheap = same_sign >= 0.9 and r >= 0.9 and gap <= 0.1
    return {"cells": len(cells), "same_sign": same_sign, "pearson_r": r, "multiplier_gap": gap,
            "mean_abs_feature": sum(abs(a) for a in f) / len(f), "mean_abs_parameters": sum(abs(b) for b in p) / len(p),
            "feature_form_ships": cheap}


# The measured test deltas each term predicts: (table arm, term whose cosine stands for it).
_ARM_TERMS = (("dsn", "dsn"), ("imachsr", "mi"), ("imachsr-mi", "mi"))


def render(records: list[dict], summary_rows: list[dict], out: Path) -> str:
    """The mechanism table (markdown), the form agreement, the sign check and ``mechanism.png``.

    Args:
        records: mechanism records (``load``).
        summary_rows: ``summary.json``'s test rows (for the measured deltas the cosines should predict).
        out: where ``mechanism.png`` goes.

    Returns:
        The markdown text.
    """
    if not records:
        return "No mechanism measurements yet (`python examples/mechanism.py`).\n"
    by = {}
    for r in records:
        by[(r["model"], r["term"], r["form"], r["checkpoint"])] = r
    models = [m for m in ("deeplabv3plus", "unet", "resnet18n", "vit") if any(k[0] == m for k in by)]
    head = ["model", "term", "form", *(f"cos at {c:.0%}" for c in CHECKPOINTS), "norm ratio at 100%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        for term in TERMS:
            for form in FORMS:
                row = [by.get((model, term, form, c)) for c in CHECKPOINTS]
                if not any(row):
                    continue
                cos = ["-" if x is None else " ".join(f"{x['cosine'][p]:+.2f}" for p in x["points"]) for x in row]
                last = row[-1]
                ratio = "-" if last is None else " ".join(f"{last['norm_ratio'][p]:.2f}" for p in last["points"])
                lines.append(f"| {model} | {term} | {form} | " + " | ".join(cos) + f" | {ratio} |")
    text = ("Cosine between the gradient of the output CE and that of each term, per point in the "
            "selection's order, mean over " f"{BATCHES} training batches, at checkpoints of the seed-0 "
            "baseline (heads fitted as linear probes first).\n\n" + "\n".join(lines) + "\n")
    a = agreement(records)
    if a.get("cells", 0) >= 2:
        text += (f"\nForm agreement over {a['cells']} cells: same sign in {a['same_sign']:.0%}, Pearson r "
                 f"{a['pearson_r']:+.2f}, mean |max(0, cos_feature) - max(0, cos_parameters)| {a['multiplier_gap']:.3f}; "
                 f"mean |cos| {a['mean_abs_feature']:.3f} (feature) against {a['mean_abs_parameters']:.3f} "
                 f"(parameters). By the rule in `examples/mechanism.py` the "
                 f"{'feature' if a['feature_form_ships'] else 'parameters'} form is the gate's default.\n")
    text += _sign_check(records, summary_rows)
    _plot(records, models, out / "mechanism.png")
    return text


def _sign_check(records: list[dict], summary_rows: list[dict]) -> str:
    """Does the mean exact-form cosine (points and checkpoints) predict the sign of each measured delta?"""
    rows = {(r["model"], r["method"]): r for r in summary_rows if r.get("delta") is not None}
    lines = ["| model | arm | mean cos (parameters) | predicts | test delta (points) | sign right? |",
             "|---|---|---|---|---|---|"]
    right = total = 0
    for model in ("deeplabv3plus", "unet", "resnet18n", "vit"):
        for arm, term in _ARM_TERMS:
            cos = [c for r in records if r["model"] == model and r["term"] == term and r["form"] == "parameters"
                   for c in r["cosine"].values()]
            if not cos or (model, arm) not in rows:
                continue
            mean = sum(cos) / len(cos)
            delta = 100 * rows[(model, arm)]["delta"]
            ok = (mean > 0) == (delta > 0)
            right += ok
            total += 1
            lines.append(f"| {model} | {arm} | {mean:+.3f} | {'gain' if mean > 0 else 'loss'} | {delta:+.2f} | "
                         f"{'yes' if ok else 'no'} |")
    if not total:
        return ""
    return ("\nThe sign check (predicted: a gain where the mean cosine is above 0; `imachsr` rows use the MI "
            f"term's cosine): right on {right} of {total}.\n\n" + "\n".join(lines) + "\n")


def _plot(records: list[dict], models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models) + 1, figsize=(3.0 * (len(models) + 1), 2.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for term, color in zip(TERMS, ("#1f77b4", "#ff7f0e", "#2ca02c")):
            for form, style in zip(FORMS, ("--", "-")):
                xs, ys = [], []
                for c in CHECKPOINTS:
                    r = next((x for x in records if (x["model"], x["term"], x["form"], x["checkpoint"]) ==
                              (model, term, form, c)), None)
                    if r:
                        xs.append(c)
                        ys.append(sum(r["cosine"].values()) / len(r["cosine"]))
                if xs:
                    ax.plot(xs, ys, style, color=color, marker="o", ms=3, label=f"{term} ({form})")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("fraction of the baseline's run", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("cos with the output CE (mean over points)", fontsize=8)
    axes[0][0].legend(fontsize=6)
    cells = list(_cells(records).values())
    ax = axes[0][-1]
    ax.scatter([c["parameters"] for c in cells], [c["feature"] for c in cells], s=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("cos, parameters (exact)", fontsize=8)
    ax.set_ylabel("cos, feature (cheap)", fontsize=8)
    ax.set_title("the two forms, every cell", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["deeplabv3plus", "unet", "resnet18n", "vit"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--data", type=Path, default=DEBIAN_DIR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    done = set()
    if args.results.exists():
        done = {json.loads(line)["key"] for line in args.results.read_text().splitlines() if line.strip()}
    cfg = SegConfig()
    seg = cls = None
    for model_name in args.models:
        if model_name in ("deeplabv3plus", "unet"):
            seg = seg or load_segmentation(cfg, args.data)
            data = seg
        else:
            cls = cls or load_classification(args.data)
            data = cls
        wanted = {json.dumps([model_name, f, t, m]) for f in CHECKPOINTS for t in TERMS for m in FORMS}
        if wanted <= done:
            continue
        measure_model(model_name, data, cfg, args.device, done, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
