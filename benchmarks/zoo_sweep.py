"""Sweep every timm architecture and torchvision classification/segmentation model through autoprobe.

Why: a selection rule that works on ten famous models says little about the
architecture a user brings. This runs the same path as ``autoprobe lock``
(``lock.lock_entry`` on a model spec: build on meta, trace with the fallback
ladder, detect, select, serialise the entry) on every name in ``timm.list_models()`` and every
classification and segmentation model of ``torchvision.models``, and writes
the outcome to ``ZOO.md``: counts by family, the backend each model needed, and
every failure with its reason.

Speed is what makes such a sweep something people rerun. The parent process
never imports torch; a forkserver imports torch, timm, torchvision and
autoprobe once and forks the workers from that warm state, so no worker pays
the imports again, even after a timeout kill. Each model is traced once, in
eval mode. The largest models are started first, so the sweep does not end
waiting on one straggler.

Usage:
    python benchmarks/zoo_sweep.py                       # the full sweep, writes ZOO.md + JSON
    python benchmarks/zoo_sweep.py --only '^resnet' --no-markdown
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

__all__ = ["Result", "zoo_models", "family", "run_one", "sweep", "render_markdown", "main"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 60.0

# Name fragments of the biggest variants: started first so they do not form the tail.
_BIG = re.compile(r"gigantic|giant|huge|_g14|_h14|_e_|_xxl|xlarge|_xl|_large|_l16|_l14|_l_|f[4-7]\b|b[78]\b|l2\b", re.I)


# Failures understood but not fixable in autoprobe: pattern -> diagnosis shown in ZOO.md. Empty:
# the one entry it had (torchvision RegNet on meta) was an autoprobe bug, fixed in models.py.
DIAGNOSES: tuple[tuple[str, str], ...] = ()


@dataclass
class Result:
    """One model's outcome.

    Attributes:
        model: the spec (``resnet50``, ``tv:resnet50``).
        family: name prefix before the first digit or underscore.
        status: ``ok`` (>= 1 point), ``no-points``, ``fail`` (an AutoprobeError), ``error``
            (any other exception: an autoprobe bug), ``timeout`` or ``crash`` (the worker died).
        backend: ``fx``, ``export`` or ``hooks`` (empty when it failed).
        depth: D.
        points: the chosen points' names; M is their count.
        seconds: wall time of the analysis inside the worker (build included).
        cpu_seconds: CPU time of the same, which other load on the machine does not inflate.
        reason: why it failed or fell back (empty for a plain fx success).
        notes: the selection's notes (fallbacks, relaxations).
    """

    model: str
    family: str
    status: str
    backend: str = ""
    depth: int = 0
    points: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def family(name: str) -> str:
    """The family of a model spec: the prefix before the first digit or underscore.

    Example:
        >>> family("resnet50"), family("tv:efficientnet_b0"), family("vit_base_patch16_224")
        ('resnet', 'tv:efficientnet', 'vit')
    """
    prefix, _, bare = name.rpartition(":")
    head = re.split(r"[0-9_]", bare, maxsplit=1)[0] or bare
    return f"{prefix}:{head}" if prefix else head


def zoo_models() -> list[str]:
    """Every timm name plus ``tv:NAME`` for torchvision's classification and segmentation models."""
    import timm
    import torchvision.models as tvm

    timm_names = list(timm.list_models())
    classification = tvm.list_models(module=tvm)
    segmentation = tvm.list_models(module=tvm.segmentation)
    return timm_names + [f"tv:{n}" for n in (*classification, *segmentation)]


def run_one(spec: str, backends: Sequence[str] | None = None) -> Result:
    """Compute one model's lock entry as ``autoprobe lock`` would, never raising.

    Args:
        spec: a timm name or ``tv:NAME``.
        backends: ``None`` for the real path (``lock.lock_entry``: ``api.analyze`` with the full ladder). A subset of
            ``backends.LADDER`` forces those rungs instead, to measure how far each fallback
            reaches across the zoo; then the model is resolved, traced and selected directly.

    Returns:
        The ``Result``; failures are recorded in it, never raised.

    Example:
        >>> r = run_one("resnet18")
        >>> r.status, r.backend, r.depth, len(r.points)
        ('ok', 'fx', 18, 3)
    """
    from autoprobe.errors import AutoprobeError

    start, cpu = time.perf_counter(), time.process_time()
    result = Result(spec, family(spec), "ok")
    try:
        entry = _lock_entry(spec, backends)
    except AutoprobeError as exc:
        result.status, result.reason = "fail", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a crash inside autoprobe or the model's code: recorded, not hidden
        result.status = "error"
        result.reason = f"{type(exc).__name__}: {str(exc).strip()[:500]} (at {_where(exc)})"
    else:
        result.backend = entry["backend"]
        result.depth = entry["depth"]
        result.points = [p["name"] for p in entry["points"]]
        result.notes = list(entry["notes"])
        result.reason = "; ".join(n for n in result.notes if n.startswith("backend "))
        if not result.points:
            result.status = "no-points"
    result.seconds = round(time.perf_counter() - start, 3)
    result.cpu_seconds = round(time.process_time() - cpu, 3)
    return result


def _lock_entry(spec: str, backends: Sequence[str] | None) -> dict[str, Any]:
    """The model's lock entry, computed as ``autoprobe lock`` does (or with forced rungs)."""
    from autoprobe.lock import LockSettings, entry_from_analysis, lock_entry

    if backends is None:
        return lock_entry(spec).to_json()
    from dataclasses import replace

    from autoprobe.api import Analysis
    from autoprobe.backends import trace_with_fallbacks
    from autoprobe.models import resolve_model
    from autoprobe.rules import load_rules
    from autoprobe.select import select_points

    resolved = resolve_model(spec)
    pack = load_rules()
    ladder = trace_with_fallbacks(resolved.module, resolved.input_size, backends=tuple(backends))
    selection = select_points(ladder.graph, pack, model=spec)
    selection = replace(selection, notes=(*ladder.notes, *selection.notes))
    return entry_from_analysis(Analysis(resolved, ladder.graph, pack, selection), LockSettings()).to_json()


def _where(exc: BaseException) -> str:
    """The innermost frame outside torch (the model or autoprobe code), then the raising frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown location"
    outside = [f for f in frames if "/site-packages/torch/" not in f.filename.replace("\\", "/")]
    shown = f"{frames[-1].filename}:{frames[-1].lineno}"
    if outside and outside[-1] is not frames[-1]:
        frame = outside[-1]
        shown = f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`, raised in {shown}"
    return shown


def _worker(conn: Connection) -> None:
    import warnings

    import torch

    # Models built on meta compute nothing; one thread per worker keeps two workers off each other's cores.
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # timm/torchvision deprecation chatter would drown the progress bar
    while True:
        task = conn.recv()
        if task is None:
            return
        spec, backends = task
        conn.send(asdict(run_one(spec, backends)))


class _Slot:
    """One worker process and the model it is busy with."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.spec: str | None = None
        self.started = 0.0

    def give(self, spec: str, backends: Sequence[str] | None) -> None:
        self.spec, self.started = spec, time.perf_counter()
        self.conn.send((spec, backends))

    def kill(self) -> None:
        self.proc.kill()  # our own child, by its handle
        self.proc.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):  # a worker that already died needs no goodbye
            self.conn.send(None)
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.kill()


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    # Imported once in the forkserver; every worker (and every replacement after a kill) forks from it.
    ctx.set_forkserver_preload(["torch", "timm", "torchvision", "autoprobe.api", "autoprobe.backends"])
    return ctx


def sweep(
    specs: Sequence[str],
    *,
    workers: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
    progress: str = "bar",
    backends: Sequence[str] | None = None,
) -> list[Result]:
    """Analyze ``specs`` in ``workers`` processes, killing any model that runs past ``timeout`` seconds.

    Args:
        specs: model specs.
        workers: worker processes.
        timeout: per-model limit in seconds; the worker is killed and replaced.
        progress: ``"bar"`` (rich progress bar), ``"lines"`` (a line every 50 models, for logs) or ``"off"``.
        backends: force these ladder rungs (see ``run_one``); ``None`` for the real path.

    Returns:
        One ``Result`` per spec, in the order of ``specs``.

    Example:
        >>> [r.status for r in sweep(["resnet18", "tv:alexnet"], workers=1, progress="off")]
        ['ok', 'ok']
    """
    order = sorted(specs, key=lambda s: (not _BIG.search(s), s))
    queue = list(reversed(order))
    results: dict[str, Result] = {}
    ctx = _context()
    slots = [_Slot(ctx) for _ in range(max(1, min(workers, len(specs))))]
    bar = _Progress(len(specs), progress)
    try:
        while queue or any(s.spec for s in slots):
            for slot in slots:
                if slot.spec is None and queue:
                    slot.give(queue.pop(), backends)
            busy = [s for s in slots if s.spec]
            now = time.perf_counter()
            wait_for = max(0.05, min(s.started + timeout - now for s in busy))
            ready = wait([s.conn for s in busy], timeout=wait_for)
            for index, slot in enumerate(slots):
                if slot.spec is None:
                    continue
                spec = slot.spec
                if slot.conn in ready:
                    try:
                        result = Result(**slot.conn.recv())
                    except (EOFError, OSError):
                        code = slot.proc.exitcode if not slot.proc.is_alive() else None
                        result = Result(spec, family(spec), "crash", reason=f"worker died (exit code {code})")
                        slot.kill()
                        slots[index] = slot = _Slot(ctx)
                    slot.spec = None
                elif time.perf_counter() - slot.started > timeout:
                    slot.kill()
                    result = Result(
                        spec, family(spec), "timeout", seconds=round(time.perf_counter() - slot.started, 3),
                        reason=f"killed after {timeout:.0f} s",
                    )
                    slots[index] = _Slot(ctx)
                else:
                    continue
                results[spec] = result
                bar.advance(result)
    finally:
        for slot in slots:
            slot.stop()
        bar.close()
    return [results[s] for s in specs]


class _Progress:
    """Running counts as a rich progress bar (``bar``), a log line every 50 models (``lines``) or nothing."""

    def __init__(self, total: int, mode: str) -> None:
        self.counts: Counter[str] = Counter()
        self.bar = None
        self.total, self.done, self.started, self.mode = total, 0, time.perf_counter(), mode
        if mode != "bar":
            return
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]zoo"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.description}"),
        )
        self.task = self.bar.add_task("", total=total)
        self.bar.start()

    def advance(self, result: Result) -> None:
        self.counts[result.status if result.status != "ok" else result.backend] += 1
        self.done += 1
        text = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{text}  last: {result.model}")
        elif self.mode == "lines" and (self.done % 50 == 0 or self.done == self.total):
            # Without a bar (a log file), a line now and then shows the sweep is alive.
            elapsed = time.perf_counter() - self.started
            print(f"{self.done}/{self.total} in {elapsed:.0f} s: {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {name: version(name) for name in ("torch", "torchvision", "timm")}
    found["python"] = platform.python_version()
    return found


def _diagnosis(reason: str) -> str:
    return next((text for pattern, text in DIAGNOSES if re.search(pattern, reason)), "not yet diagnosed")


def _expected_points(depth: int) -> int:
    """M = round(ln D) of the default pack (the selection's own rule, ``select.auto_points``)."""
    from autoprobe.rules import load_rules
    from autoprobe.select import auto_points

    return auto_points(max(depth, 1), load_rules().policy)


def _md_escape(text: str) -> str:
    text = re.sub(r"/\S*?/site-packages/", "", text)  # the install prefix is noise; the package path is enough
    return text.replace("|", "\\|").replace("\n", " ").strip()


def render_markdown(results: Sequence[Result], meta: dict[str, Any]) -> str:
    """ZOO.md: the command, run time, totals, per-family counts, fallbacks and every failure.

    Example:
        >>> md = render_markdown([Result("resnet18", "resnet", "ok", "fx", 18, ["a"], seconds=0.2)],
        ...                      {"command": "x", "wall_seconds": 1.0, "workers": 1, "timeout": 60, "versions": {}})
        >>> "| resnet | 1 | 1 |" in md
        True
    """
    ok = [r for r in results if r.status == "ok"]
    failed = [r for r in results if r.status != "ok"]
    backends = Counter(r.backend for r in ok)
    seconds = sorted(r.seconds for r in results)
    lines = [
        "# The model zoo sweep",
        "",
        "Every architecture in `timm.list_models()` and every classification and segmentation model in",
        "`torchvision.models`, built on the meta device (no weights), analysed by the same path as",
        "`autoprobe lock` (`lock.lock_entry(spec)`: trace with the fallback ladder fx -> export -> hooks, build the",
        "layer graph, run the default rule pack, select, write the lock entry). A model passes when it gets at least",
        "one point.",
        "Generated by `benchmarks/zoo_sweep.py`; raw per-model results are in",
        f"`{meta.get('json', 'benchmarks/zoo_results.json')}`.",
        "",
        "The fallback ladder (`autoprobe/backends.py`), tried in this order, first graph wins; every fallback is",
        "written into the selection's notes and its backend into `Selection.backend`:",
        "",
        "1. `fx`: torch.fx with timm's leaf modules and autowrap functions, optional forward arguments fixed",
        "   to their defaults.",
        "2. `export`: `torch.export.export(model, (input,), strict=False)` on the meta device; names from",
        "   `nn_module_stack`, so they read like fx's (`layer1.0.conv1`, `layer1.0.add`).",
        "3. `hooks`: forward hooks on the leaf modules, a coarse graph of module calls in execution order.",
        "",
        "## Run",
        "",
        f"- Command: `{meta['command']}`",
        f"- Total run time: **{meta['wall_seconds'] / 60:.1f} min** ({meta['wall_seconds']:.0f} s) with "
        f"{meta['workers']} worker processes on {meta.get('cpus', '?')} CPU cores; per-model timeout {meta['timeout']:.0f} s.",
        "- Target (issue 5): the whole sweep under 15 min on this machine, no model over 60 s.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in sorted(meta['versions'].items()))}.",
    ]
    if meta.get("date"):
        lines.append(f"- Date: {meta['date']}.")
    if meta.get("load_average"):
        before, after = meta["load_average"]
        lines.append(
            f"- 1-minute load average at start {before}, at end {after} (2 would be exactly our two workers; "
            "more means other processes shared the cores and stretched the wall times)."
        )
    lines += [
        "",
        "## Totals",
        "",
        "| models | with >= 1 point | fx | export | hooks | failed | timed out |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {len(results)} | {len(ok)} | {backends['fx']} | {backends['export']} | {backends['hooks']} | "
        f"{sum(r.status not in ('ok', 'timeout') for r in results)} | {sum(r.status == 'timeout' for r in results)} |",
        "",
    ]
    if seconds:
        p95 = seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))]
        lines += [
            f"Per model (build + trace + graph + select, inside the worker): median {statistics.median(seconds):.2f} s, "
            f"p95 {p95:.2f} s, max {seconds[-1]:.2f} s. CPU time, which other load does not inflate: "
            f"total {sum(r.cpu_seconds for r in results) / 60:.1f} min, max {max(r.cpu_seconds for r in results):.2f} s.",
            "",
            "Slowest ten: "
            + ", ".join(f"`{r.model}` {r.seconds:.1f} s" for r in sorted(results, key=lambda r: -r.seconds)[:10])
            + ".",
            "",
        ]
    if ok:
        m_counts = Counter(len(r.points) for r in ok)
        lines += [
            "Points per model (M): " + ", ".join(f"M={m}: {c}" for m, c in sorted(m_counts.items())) + ".",
            "",
        ]

    lines += ["## Failures", ""]
    if failed:
        lines += ["| model | status | reason | diagnosis |", "|---|---|---|---|"]
        lines += [
            f"| `{r.model}` | {r.status} | {_md_escape(r.reason)[:600]} | {_diagnosis(r.reason)} |" for r in failed
        ]
    else:
        lines.append("None: every model got a selection with at least one point.")
    lines.append("")

    short = [r for r in ok if len(r.points) < _expected_points(r.depth)]
    lines += [
        "## Fewer points than M = round(ln D)",
        "",
        f"{len(short)} of {len(ok)} models ({len(short) / max(len(ok), 1):.1%}; target: at most 1%) got fewer points "
        "than the default pack's M. Each row gives the selection's own notes, which say why (too few eligible "
        "candidates at distinct depths, or candidates without a layout).",
        "",
    ]
    if short:
        lines += ["| model | backend | D | M | points | why (the selection's notes) |", "|---|---|---:|---:|---:|---|"]
        lines += [
            f"| `{r.model}` | {r.backend} | {r.depth} | {_expected_points(r.depth)} | {len(r.points)} | "
            f"{_md_escape('; '.join(n for n in r.notes if 'relaxed' not in n))[:500]} |"
            for r in short
        ]
    lines.append("")

    fallbacks = [r for r in ok if r.backend != "fx"]
    lines += ["## Fallbacks (models fx could not serve)", ""]
    if fallbacks:
        lines += ["| model | backend | D | M | why fx was not used |", "|---|---|---:|---:|---|"]
        lines += [
            f"| `{r.model}` | {r.backend} | {r.depth} | {len(r.points)} | {_md_escape(r.reason)[:400]} |" for r in fallbacks
        ]
    else:
        lines.append("None.")
    lines.append("")

    if meta.get("coverage"):
        lines += [
            "## Reach of each fallback rung across the whole zoo",
            "",
            "fx serves almost every model above, so the other rungs were also forced on every model",
            "(`--backends export`, `--backends hooks`) to measure how far each one would carry the zoo alone.",
            "",
            "| forced backends | models | with >= 1 point | run time | raw results |",
            "|---|---:|---:|---:|---|",
        ]
        for cov in meta["coverage"]:
            lines.append(
                f"| {' -> '.join(cov['backends'])} | {cov['models']} | {cov['ok']} | {cov['minutes']} min | `{cov['json']}` |"
            )
        served_by_fx = {r.model: r for r in ok if r.backend == "fx"}
        for cov in meta["coverage"]:
            shared = [m for m in cov["selections"] if m in served_by_fx]
            if not shared or cov["backends"] == ["fx"]:
                continue
            same_depth = [m for m in shared if cov["selections"][m][0] == served_by_fx[m].depth]
            same_points = [m for m in shared if cov["selections"][m][1] == served_by_fx[m].points]
            deeper = Counter(
                served_by_fx[m].family for m in shared if cov["selections"][m][0] > 1.25 * served_by_fx[m].depth
            )
            lines += [
                "",
                f"Against fx on the {len(shared)} models fx serves, {' -> '.join(cov['backends'])} alone finds the same "
                f"D for {len(same_depth)} and the same points for {len(same_points)}.",
            ]
            if cov["backends"][0] == "hooks":
                lines.append(
                    "Hooks sees module calls only (no residual adds or concatenations as nodes), so its points are "
                    "module outputs and seldom the ones fx picks; it is the last resort, not a peer."
                )
            if deeper and cov["backends"][0] == "export":  # export sees inside leaves; hooks is coarser by design
                lines.append(
                    f"It finds D more than 25% deeper for {sum(deeper.values())} models, where fx records a whole block "
                    "as one node (a timm leaf module such as `NormFreeBlock`, or a function wrapped for fx such as "
                    "torchvision's `shifted_window_attention`) and so counts it as one weight layer at most (families: "
                    + ", ".join(f"{name} {count}" for name, count in deeper.most_common()) + ")."
                )
        for cov in meta["coverage"]:
            if cov["failures"]:
                lines += ["", f"Failures with {' -> '.join(cov['backends'])} alone, grouped by reason:", ""]
                lines += [f"- {count} x {_md_escape(reason)}" for reason, count in cov["failures"]]
        lines.append("")

    by_family: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_family[r.family].append(r)
    lines += [
        "## By family",
        "",
        "Family = the name's prefix before the first digit or underscore (`tv:` marks torchvision).",
        "",
        "| family | models | ok | fx | export | hooks | failed | D (min-max) | M (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sorted(by_family):
        group = by_family[name]
        good = [r for r in group if r.status == "ok"]
        count = Counter(r.backend for r in good)
        depths = [r.depth for r in good] or [0]
        ms = [len(r.points) for r in good] or [0]
        lines.append(
            f"| {name} | {len(group)} | {len(good)} | {count['fx']} | {count['export']} | {count['hooks']} | "
            f"{len(group) - len(good)} | {min(depths)}-{max(depths)} | {min(ms)}-{max(ms)} |"
        )
    lines.append("")
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="per-model limit in seconds (default 60)"
    )
    parser.add_argument("--only", metavar="REGEX", help="keep only specs matching this regex")
    parser.add_argument("--limit", type=int, help="keep the first N specs (after --only)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "zoo_results.json"), help="raw results file")
    parser.add_argument("--markdown", default=str(ROOT / "ZOO.md"), help="summary file")
    parser.add_argument("--no-markdown", action="store_true", help="do not write the summary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.add_argument(
        "--backends", metavar="LIST",
        help="force these ladder rungs, comma-separated (e.g. export), to measure a fallback's reach",
    )
    parser.add_argument(
        "--render", metavar="JSON",
        help="only rewrite the summary from an earlier run's raw results (its command and run time are kept)",
    )
    parser.add_argument(
        "--coverage", action="append", default=[], metavar="JSON",
        help="results of a --backends run to summarise in ZOO.md (repeatable)",
    )
    return parser.parse_args(argv)


def _select(specs: Iterable[str], only: str | None, limit: int | None) -> list[str]:
    chosen = [s for s in specs if not only or re.search(only, s)]
    return chosen[:limit] if limit is not None else chosen


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep and write the results; exit 1 when any model failed.

    Example:
        >>> main(["--only", "^resnet18$", "--no-markdown", "--no-progress", "--json", "/tmp/z.json"])  # doctest: +SKIP
        0
    """
    args = _parse(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text(encoding="utf-8"))
        meta = data["meta"]
        results = [Result(**r) for r in data["results"]]
        if args.coverage:
            meta["coverage"] = [_coverage(path) for path in args.coverage]
            _write_json(Path(args.render), meta, results)  # keep the raw file's summary in step with ZOO.md
        Path(args.markdown).write_text(render_markdown(results, meta), encoding="utf-8")
        return 0
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    specs = _select(_list_in_child(), args.only, args.limit)
    backends = tuple(b.strip() for b in args.backends.split(",")) if args.backends else None
    progress = "lines" if args.no_progress else "bar"
    results = sweep(specs, workers=args.workers, timeout=args.timeout, progress=progress, backends=backends)
    wall = time.perf_counter() - started
    shown = ["python", "benchmarks/zoo_sweep.py", *(argv if argv is not None else sys.argv[1:])]
    meta = {
        "command": " ".join(shown),
        "wall_seconds": wall,
        "workers": args.workers,
        "timeout": args.timeout,
        "cpus": os.cpu_count(),
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%d"),
        "json": _shown_path(args.json) if args.json else "",
        # Other processes on the machine stretch wall times; the load average says how much.
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "backends": list(backends) if backends else None,
        "coverage": [_coverage(path) for path in args.coverage],
    }
    if args.json:
        _write_json(Path(args.json), meta, results)
    if not args.no_markdown:
        Path(args.markdown).write_text(render_markdown(results, meta), encoding="utf-8")
    ok = sum(r.status == "ok" for r in results)
    print(f"{ok}/{len(results)} models with >= 1 point in {wall:.0f} s ({wall / 60:.1f} min)")
    for r in results:
        if r.status != "ok":
            print(f"  {r.status:9s} {r.model}: {r.reason[:200]}")
    return 0 if ok == len(results) else 1


def _write_json(path: Path, meta: dict[str, Any], results: Sequence[Result]) -> None:
    # The coverage runs keep their own raw files; their per-model selections need not be copied here.
    stored = {**meta, "coverage": [{k: v for k, v in c.items() if k != "selections"} for c in meta["coverage"]]}
    text = json.dumps({"meta": stored, "results": [asdict(r) for r in results]}, indent=1, sort_keys=True)
    path.write_text(text + "\n", encoding="utf-8")


def _coverage(path: str) -> dict[str, Any]:
    """The summary of a forced-backend run, for ZOO.md's coverage section."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    results = data["results"]
    return {
        "backends": data["meta"].get("backends") or ["fx", "export", "hooks"],
        "json": _shown_path(path),
        "models": len(results),
        "ok": sum(r["status"] == "ok" for r in results),
        "minutes": round(data["meta"]["wall_seconds"] / 60, 1),
        "failures": Counter(_short_reason(r) for r in results if r["status"] != "ok").most_common(),
        "selections": {r["model"]: [r["depth"], r["points"]] for r in results if r["status"] == "ok"},
    }


def _short_reason(result: dict[str, Any]) -> str:
    """A failure reason without model-specific detail, so alike failures count together."""
    text = result["reason"].split("\n")[-1] if result["status"] == "fail" else result["reason"]
    text = re.sub(r"^\s*- \w+: ", "", text)
    text = re.sub(r"\(at .*", "", text)
    text = re.sub(r"'[^']*'|`[^`]*`|\d+", "_", text)
    return f"{result['status']}: {text.strip()[:160]}"


def _shown_path(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def _list_in_child() -> list[str]:
    """The model list, computed in the forkserver's warm state so this process never imports torch."""
    ctx = _context()
    with ctx.Pool(1) as pool:
        return pool.apply(zoo_models)


if __name__ == "__main__":
    sys.exit(main())
