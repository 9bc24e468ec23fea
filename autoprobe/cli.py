"""The ``autoprobe`` command line.

Every user error (an ``AutoprobeError``) prints one short message with a hint
and exits 2; exit 1 is reserved for a failing check. torch and timm are
imported only by the commands that need them, so ``autoprobe --help`` and
``autoprobe rules`` start instantly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AutoprobeError, InputSizeError, LockError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from .lock import Outcome

__all__ = ["main"]


def _input_size(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = (3, values[0], values[0])
    if not values or any(v <= 0 for v in values):
        raise InputSizeError(f"--input-size {text!r} is not a size. Hint: write C,H,W such as 3,224,224 (or just 224).")
    return values


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", default="default", metavar="PACK|FILE", help="built-in pack name or .toml file")
    parser.add_argument("--input-size", metavar="C,H,W", help="input size without batch (default: the model's own)")
    parser.add_argument("--points", type=int, metavar="N", help="number of points M (default: round(ln D))")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval", help="trace the eval or the train graph")
    parser.add_argument(
        "--leaf", action="append", default=[], metavar="MODULE_PATH",
        help="keep this submodule as one node when fx cannot trace it (repeatable)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoprobe", description="Find deep-supervision points in any PyTorch model and train with them."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = sub.add_parser("inspect", help="preview the chosen points of a model")
    inspect.add_argument("model", metavar="MODEL", help="timm name, tv:NAME (torchvision) or package.module:factory")
    _add_model_options(inspect)
    inspect.add_argument("--format", choices=("table", "json"), default="table")
    inspect.add_argument("--all-candidates", action="store_true", help="list every candidate, not only the points")
    inspect.add_argument("--graph", metavar="FILE", help="write an SVG picture of the layer graph")
    inspect.set_defaults(run=_inspect)

    rules = sub.add_parser("rules", help="list rule packs and detectors with their options")
    rules.set_defaults(run=_rules)

    lock = sub.add_parser(
        "lock", help="write a lockfile of the chosen points of models",
        description="Compute the selection of each MODEL and write it to a canonical JSON lockfile. "
        "With no MODEL, the models of [tool.autoprobe] in ./pyproject.toml are locked. "
        "Exit 0 when every model was locked; 2 when some failed on bad input (unknown model, input size, "
        "untraceable model); 1 when some failed on an unexpected error. The others are locked either way.",
    )
    lock.add_argument("models", nargs="*", metavar="MODEL", help="timm name, tv:NAME or package.module:factory")
    lock.add_argument("-o", "--output", metavar="FILE", help="the lockfile (default: [tool.autoprobe] lockfile, else autoprobe.lock)")
    _add_model_options(lock)
    lock.set_defaults(rules=None, mode=None)  # None = not given, so [tool.autoprobe] values apply
    _add_jobs_option(lock)
    lock.set_defaults(run=_lock)

    check = sub.add_parser(
        "check", help="recompute a lockfile and fail when a selection changed",
        description="Recompute every model of FILE with the settings recorded in it. Exit 0 when every selection "
        "is identical; 1 with a diff per model when a point moved, appeared or disappeared, or a rule's verdict "
        "changed; 2 when the lockfile is missing or malformed. Library versions, the rule pack's hash, reworded "
        "reasons and notes are printed as context, never a failure by themselves.",
    )
    check.add_argument("file", nargs="?", metavar="FILE", help="the lockfile (default: [tool.autoprobe] lockfile, else autoprobe.lock)")
    check.add_argument("--update", action="store_true", help="rewrite the lockfile with the recomputed selections")
    _add_jobs_option(check)
    check.set_defaults(run=_check)
    return parser


def _add_jobs_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-j", "--jobs", type=int, default=1, metavar="N",
        help="worker processes, one thread each (default 1: this process; 0: one per CPU)",
    )


def _workers(jobs: int) -> int:
    if jobs < 0:
        raise AutoprobeError(f"--jobs {jobs}: give a number of worker processes >= 1, or 0 for one per CPU.")
    return jobs or (os.cpu_count() or 1)


def _progress(total: int, verb: str) -> tuple[Progress, TaskID]:
    """A rich progress bar on stderr (silent when stderr is not a terminal, e.g. in CI logs)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn(verb), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[last]}"),
        console=console, transient=True, disable=not console.is_terminal,
    )
    return progress, progress.add_task(verb, total=total, last="")


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _lock(args: argparse.Namespace) -> int:
    import time

    from .lock import (
        DEFAULT_LOCKFILE, ModelRequest, Outcome, compute_entries, load_config, make_lock, resolve_rules,
        resolve_settings, write_lock,
    )
    from .rules import load_rules

    if args.points is not None and args.points < 1:
        raise AutoprobeError(f"--points {args.points}: need at least 1 point.")
    workers = _workers(args.jobs)
    config = load_config(Path("pyproject.toml"))
    configured = {m.spec: m for m in config.models} if config else {}
    if args.models:
        requests = [configured.get(spec.strip(), ModelRequest(spec.strip())) for spec in dict.fromkeys(args.models)]
    elif config is not None and config.models:
        requests = list(config.models)
    else:
        raise LockError(
            "no MODEL given and ./pyproject.toml has no [tool.autoprobe] models. "
            "Hint: `autoprobe lock resnet50 vit_tiny_patch16_224 -o autoprobe.lock`, or add "
            "`models = [\"resnet50\"]` under [tool.autoprobe] in pyproject.toml."
        )
    output = Path(args.output) if args.output else (config.lockfile if config else Path(DEFAULT_LOCKFILE))
    lock_dir = output.parent
    if not lock_dir.resolve().is_dir():
        raise LockError(f"cannot write lockfile {str(output)!r}: folder {str(lock_dir)!r} does not exist. Hint: create it first.")
    cli = ModelRequest(
        "", _input_size(args.input_size) if args.input_size else None, args.mode, args.rules, args.points, tuple(args.leaf)
    )
    defaults = config.defaults if config else None
    jobs = [(r.spec, r.spec, resolve_settings(r, cli=cli, defaults=defaults, lock_dir=lock_dir)) for r in requests]
    for rules in sorted({s.rules for _, _, s in jobs}):
        load_rules(resolve_rules(rules, lock_dir))  # a bad pack fails once, before any model is computed

    start = time.perf_counter()
    progress, task = _progress(len(jobs), "locking")

    def done(outcome: Outcome) -> None:
        if outcome.entry is not None:
            names = ", ".join(p["name"] for p in outcome.entry["points"])
            print(f"locked {outcome.key}: D={outcome.entry['depth']} M={outcome.entry['num_points']}  {names}")
        else:
            print(f"FAILED {outcome.key}:\n{_indent(outcome.error)}")
        progress.update(task, advance=1, last=outcome.key)

    with progress:
        outcomes = compute_entries(jobs, workers=workers, base_dir=lock_dir, on_done=done)
    entries = {k: o.entry for k, o in outcomes.items() if o.entry is not None}
    failed = [o for o in outcomes.values() if o.entry is None]
    seconds = time.perf_counter() - start
    if entries:
        write_lock(output, make_lock(entries))
        print(f"wrote {output}: {len(entries)} of {len(jobs)} models in {seconds:.1f} s")
    if not failed:
        return 0
    print(f"\n{len(failed)} of {len(jobs)} models failed and are not in the lock{'' if entries else ' (nothing written)'}:")
    for outcome in failed:
        print(f"  - {outcome.key}: {outcome.error.splitlines()[0]}")
    print("Hint: fix or drop those models (an untraceable one may need `--leaf MODULE_PATH`), then run `autoprobe lock` again.")
    return 2 if all(o.user_error for o in failed) else 1


def _check(args: argparse.Namespace) -> int:
    import time

    from .lock import DEFAULT_LOCKFILE, check_lock, load_config, read_lock, stale_models, write_lock

    workers = _workers(args.jobs)
    config = load_config(Path("pyproject.toml"))
    path = Path(args.file) if args.file else (config.lockfile if config else Path(DEFAULT_LOCKFILE))
    total = len(read_lock(path)["models"])
    start = time.perf_counter()
    progress, task = _progress(total, "checking")
    with progress:
        result = check_lock(path, workers=workers, on_done=lambda o: progress.update(task, advance=1, last=o.key))
    seconds = time.perf_counter() - start

    if result.versions:
        print("context (never a failure by itself): versions differ from the lock:")
        print("\n".join(f"  {line}" for line in result.versions))
    for report in result.reports:
        if report.error:
            print(f"{report.key}: could not be recomputed:\n{_indent(report.error)}")
        elif report.changes:
            print(f"{report.key}: selection changed:")
            print("\n".join(f"  {line}" for line in report.changes))
        if report.context:
            print(f"{report.key}: context (not a failure):")
            print("\n".join(f"  {line}" for line in report.context))
    stale = []
    if config is not None and path.resolve() == config.lockfile.resolve():
        stale = stale_models(config, read_lock(path), path.parent)
        for line in stale:
            print(f"stale: {line}")
    changed = sum(1 for r in result.reports if r.changes and not r.error)
    errors = sum(1 for r in result.reports if r.error)
    print(
        f"checked {total} models in {path} in {seconds:.1f} s: {total - changed - errors} unchanged, "
        f"{changed} changed, {errors} failed" + (f", {len(stale)} stale" if stale else "")
    )
    if args.update:
        from .lock import dumps_lock

        if dumps_lock(result.updated) == path.read_text(encoding="utf-8"):
            print(f"{path} is up to date")
        else:
            write_lock(path, result.updated)
            print(f"updated {path}" + (f" (kept the old entry of {errors} model(s) that failed)" if errors else ""))
        return 1 if errors or stale else 0
    if result.failed or stale:
        print(f"Hint: if the change is intended, run `autoprobe check {path} --update` (or `autoprobe lock`) and commit the lockfile.")
        return 1
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .api import analyze
    from .report import render_svg, render_table, selection_to_dict, to_json

    if args.points is not None and args.points < 1:
        raise AutoprobeError(f"--points {args.points}: need at least 1 point.")
    analysis = analyze(
        args.model,
        input_size=_input_size(args.input_size) if args.input_size else None,
        rules=args.rules,
        points=args.points,
        train=args.mode == "train",
        leaf_paths=tuple(args.leaf),
    )
    if args.graph:
        path = Path(args.graph)
        try:
            path.write_text(render_svg(analysis.selection, analysis.graph), encoding="utf-8")
        except OSError as exc:
            raise AutoprobeError(f"cannot write --graph {str(path)!r}: {exc.strerror}. Hint: check the folder exists.") from exc
    if args.format == "json":
        sys.stdout.write(to_json(selection_to_dict(analysis.selection, analysis.graph)))
    else:
        from rich.console import Console

        # Piped output gets a wide, stable table instead of rich's 80-column default.
        console = Console(width=None if sys.stdout.isatty() else 160)
        console.print(render_table(analysis.selection, analysis.graph, all_candidates=args.all_candidates))
        if args.graph:
            console.print(f"graph picture written to {args.graph}")
    return 0


def _rules(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .rules import builtin_packs, detector_summary

    console = Console(width=None if sys.stdout.isatty() else 160)
    packs = Table(title="rule packs (--rules NAME, or a path to your own .toml)", header_style="bold")
    packs.add_column("pack")
    packs.add_column("description")
    for name, description in builtin_packs().items():
        packs.add_row(name, description)
    console.print(packs)
    detectors = Table(title="detectors (\\[detectors.ID] tables; every one also takes enabled and weight)", header_style="bold")
    for column in ("ID", "fires at", "options (default)"):
        detectors.add_column(column, overflow="fold")
    for detector_id, summary, options in detector_summary():
        described = "; ".join(f"{k} ({o.default!r}): {o.help}" for k, o in options.items())
        detectors.add_row(detector_id, summary, described)
    console.print(detectors)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit code: 0 success, 1 a failed check, 2 bad input.

    Example:
        >>> main(["rules"])  # doctest: +SKIP
        0
    """
    args = _build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AutoprobeError as exc:
        print(f"autoprobe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
