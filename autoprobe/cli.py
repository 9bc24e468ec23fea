"""The ``autoprobe`` command line: a thin layer over ``api.analyze`` and the ``lock`` API.

``inspect`` calls ``analyze`` (and ``html_view`` for ``--html``); ``lock`` calls
``lock.plan_lock`` and ``lock.run_lock``; ``check`` calls ``lock.check_lock``. This module
only parses flags, prints, and words messages for a command-line user (a flag instead of a
Python keyword). ``--model-arg`` and ``--forward-arg`` are parsed by ``kwargs.parse_kwarg``,
the same parser that reads them from ``[tool.autoprobe]``.
Every user error (an ``AutoprobeError``) prints one short message with a hint
and exits 2; a bad flag value is an ``OptionError``; exit 1 is reserved for a
failing check. torch and timm are imported only by the commands that need them,
so ``autoprobe --help`` and ``autoprobe rules`` start instantly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .defaults import ADAPTER_HEADS, DEFAULT_HEAD
from .errors import AutoprobeError, InputSizeError, OptionError, RealDataNeeded
from .sizes import parse_input_size, reword_size_error

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from .api import Analysis
    from .graph import LayerGraph
    from .kwargs import Kwargs
    from .trace import TraceOptions

__all__ = ["main"]


def _input_size(text: str | None) -> tuple[int, ...] | None:
    return parse_input_size(text, argument="--input-size") if text is not None else None


def _kwargs(pairs: Sequence[str], option: str) -> Kwargs:
    """Repeated ``KEY=VALUE`` options as one ``Kwargs``; a key given twice with two values is refused."""
    from .kwargs import Kwargs, parse_kwarg

    found: dict[str, object] = {}
    for text in pairs:
        key, value = parse_kwarg(text, option)
        if key in found and found[key] != value:
            raise OptionError(f"{option} {key} is given twice ({found[key]!r} and {value!r}). Hint: give each KEY once.")
        found[key] = value
    return Kwargs(found, where=option)


def _model_args(args: argparse.Namespace) -> Kwargs:
    """``--model-arg`` options plus ``--num-classes`` (the builder's ``num_classes=``)."""
    from .kwargs import Kwargs

    found = _kwargs(args.model_arg, "--model-arg").to_dict()
    if args.num_classes is not None:
        if args.num_classes < 1:
            raise OptionError(f"--num-classes {args.num_classes}: need at least 1 class. "
                              "Hint: give the classifier width, e.g. --num-classes 10, or leave it out.")
        if found.get("num_classes", args.num_classes) != args.num_classes:
            raise OptionError(f"--num-classes {args.num_classes} and --model-arg num_classes={found['num_classes']!r} "
                              "disagree. Hint: give the width once.")
        found["num_classes"] = args.num_classes
    return Kwargs(found, where="--model-arg")


def _input_name(name: str | None) -> str | None:
    if name is not None and not name.isidentifier():
        raise OptionError(f"--input-name {name!r}: not a parameter name. Hint: give the forward parameter that takes "
                          "the input, e.g. --input-name pixel_values.")
    return name


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", default="default", metavar="PACK|FILE", help="built-in pack name or .toml file")
    parser.add_argument("--input-size", metavar="C,H,W", help="input size without batch (default: the model's own)")
    parser.add_argument("--points", type=int, metavar="N", help="number of points M (default: round(ln D))")
    parser.add_argument("--mode", choices=("eval", "train"), default="eval", help="trace the eval or the train graph")
    parser.add_argument(
        "--leaf", action="append", default=[], metavar="MODULE_PATH",
        help="keep this submodule as one node when fx cannot trace it (repeatable)",
    )
    parser.add_argument(
        "--model-arg", action="append", default=[], metavar="KEY=VALUE",
        help="keyword argument of the model's builder, VALUE a Python literal or a bare word taken as a string "
        "(repeatable), e.g. --model-arg encoder_weights=None",
    )
    parser.add_argument("--num-classes", type=int, metavar="N", help="classifier width, passed as num_classes=N to the builder")
    parser.add_argument(
        "--input-name", metavar="NAME",
        help="the forward parameter that receives the input, for a model called as model(NAME=x) (default: the first)",
    )
    parser.add_argument(
        "--forward-arg", action="append", default=[], metavar="KEY=VALUE",
        help="further forward argument, fixed while tracing (repeatable), e.g. --forward-arg return_dict=False",
    )


def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="autoprobe", description="Find deep-supervision points in any PyTorch model and train with them."
    )
    parser.add_argument("--version", action="version", version=f"autoprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = sub.add_parser("inspect", help="preview the chosen points of a model")
    inspect.add_argument("model", metavar="MODEL", help="timm name (tagged or not), tv:NAME (torchvision) or package.module:factory")
    _add_model_options(inspect)
    inspect.add_argument("--format", choices=("table", "json"), default="table")
    inspect.add_argument("--all-candidates", action="store_true", help="list every candidate, not only the points")
    inspect.add_argument(
        "--head", choices=ADAPTER_HEADS, default=DEFAULT_HEAD,
        help=f"the adapter form the adapter column counts, as LossOptions(head=...) (default {DEFAULT_HEAD})",
    )
    inspect.add_argument("--graph", metavar="FILE", help="write an SVG picture of the layer graph")
    inspect.add_argument(
        "--html", metavar="FILE",
        help="write one self-contained HTML page to browse the model: stages, blocks and layers, points marked, a search box",
    )
    inspect.add_argument(
        "--allow-real-data", action="store_true",
        help="let the hooks backend run the model once on a seeded random batch (no_grad, cloned buffers) when its "
        "forward reads tensor values; off by default, so the model is never run",
    )
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
        raise OptionError(f"--jobs {jobs}: not a number of worker processes. Hint: give N >= 1, or 0 for one per CPU.")
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


def _plural(count: int, noun: str) -> str:
    """``1 model``, ``2 models``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _points(points: int | None) -> int | None:
    if points is not None and points < 1:
        raise OptionError(f"--points {points}: need at least 1 point. Hint: leave it out for the pack's automatic M.")
    return points


def _lock(args: argparse.Namespace) -> int:
    import time

    from .lock import ModelRequest, Outcome, plan_lock, run_lock

    model_args, forward = _model_args(args), _kwargs(args.forward_arg, "--forward-arg")
    overrides = ModelRequest(
        "", _input_size(args.input_size), args.mode, args.rules, _points(args.points),
        tuple(args.leaf), model_args or None, _input_name(args.input_name), forward or None,
    )
    workers = _workers(args.jobs)
    plan = plan_lock(args.models, output=args.output, overrides=overrides, pyproject=Path("pyproject.toml"))

    start = time.perf_counter()
    progress, task = _progress(len(plan.jobs), "locking")

    def done(outcome: Outcome) -> None:
        if outcome.entry is not None:
            names = ", ".join(p.name for p in outcome.entry.points)
            print(f"locked {outcome.key}: D={outcome.entry.depth} M={outcome.entry.num_points}  {names}")
        else:
            print(f"FAILED {outcome.key}:\n{_indent(outcome.error)}")
        progress.update(task, advance=1, last=outcome.key)

    with progress:
        run = run_lock(plan, workers=workers, on_done=done)
    seconds = time.perf_counter() - start
    total, failed = len(plan.jobs), run.failed
    if run.written:
        print(f"wrote {run.path}: {len(run.entries)} of {_plural(total, 'model')} in {seconds:.1f} s")
    if not failed:
        return 0
    print(f"\n{len(failed)} of {_plural(total, 'model')} failed and are not in the lock{'' if run.written else ' (nothing written)'}:")
    for outcome in failed:
        print(f"  - {outcome.key}: {outcome.error.splitlines()[0]}")
    print("Hint: fix or drop those models (an untraceable one may need `--leaf MODULE_PATH`), then run `autoprobe lock` again.")
    return 2 if all(o.user_error for o in failed) else 1


def _check(args: argparse.Namespace) -> int:
    import time

    from .lock import Outcome, check_lock, lockfile_path
    from .lockconfig import load_config
    from .lockdiff import diff_entries
    from .lockfile import dumps_lock, read_lock, save_lock

    workers = _workers(args.jobs)
    config = load_config(Path("pyproject.toml"))
    path = lockfile_path(args.file, config)
    locked = read_lock(path).entries
    total = len(locked)
    start = time.perf_counter()
    progress, task = _progress(total, "checking")

    def done(outcome: Outcome) -> None:
        # Without a terminal (CI logs) there is no bar: one line per model as it finishes shows progress.
        if progress.disable:
            if outcome.entry is None:
                state = "could not be recomputed"
            else:
                changes = diff_entries(locked[outcome.key], outcome.entry).changes
                state = f"changed ({len(changes)} difference{'s' * (len(changes) != 1)})" if changes else "unchanged"
            print(f"checked {outcome.key}: {state} ({outcome.seconds:.1f} s)", flush=True)
        progress.update(task, advance=1, last=outcome.key)

    with progress:
        result = check_lock(path, pyproject=config, workers=workers, on_done=done)
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
    for line in result.stale:
        print(f"stale: {line}")
    changed = sum(1 for r in result.reports if r.changes and not r.error)
    errors = sum(1 for r in result.reports if r.error)
    print(
        f"checked {_plural(total, 'model')} in {path} in {seconds:.1f} s: {total - changed - errors} unchanged, "
        f"{changed} changed, {errors} failed" + (f", {len(result.stale)} stale" if result.stale else "")
    )
    if args.update:
        if dumps_lock(result.updated) == path.read_text(encoding="utf-8"):
            print(f"{path} is up to date")
        else:
            save_lock(path, result.updated)
            print(f"updated {path}" + (f" (kept the old entry of {_plural(errors, 'model')} that failed)" if errors else ""))
        return 1 if errors or result.stale else 0
    if result.failed or result.stale:
        print(f"Hint: if the change is intended, run `autoprobe check {path} --update` (or `autoprobe lock`) and commit the lockfile.")
        return 1
    return 0


def _analyze(args: argparse.Namespace, size: tuple[int, ...] | None, options: TraceOptions,
             model_args: Kwargs) -> Analysis:
    """``analyze`` of ``inspect``'s model, its hints reworded for a command-line user (a flag, not a keyword)."""
    from .api import analyze

    try:
        return analyze(args.model, input_size=size, rules=args.rules, points=_points(args.points), options=options,
                       model_args=model_args)
    except RealDataNeeded as exc:
        # The API's hint names its keyword; a CLI user gets the flags that do the same.
        raise RealDataNeeded(
            exc.reasons,
            "the model branches on tensor values. Rerun with `--allow-real-data` to let the hooks backend run it "
            "once on a seeded random batch (no_grad, the model left unchanged), or keep the branching submodule as "
            "one node with `--leaf MODULE_PATH`.",
        ) from exc
    except InputSizeError as exc:
        if size is None or exc.parts is None:
            raise
        # The API's message names its keyword (input_size=(3, 100, 100)); a CLI user typed the flag.
        raise reword_size_error(exc, "--input-size") from exc


def _inspect(args: argparse.Namespace) -> int:
    from .report import render_svg, render_table, selection_to_dict, to_json
    from .trace import TraceOptions

    model_args, forward = _model_args(args), _kwargs(args.forward_arg, "--forward-arg")
    options = TraceOptions(mode=args.mode, leaf_paths=tuple(args.leaf), input_name=_input_name(args.input_name),
                           forward_kwargs=forward.to_dict(), allow_real_data=args.allow_real_data)
    size = _input_size(args.input_size)
    with _model_arg_warnings():
        analysis = _analyze(args, size, options, model_args)
        _check_width(args.model, model_args.to_dict().get("num_classes"), analysis.graph)
    if args.graph:
        path = Path(args.graph)
        try:
            path.write_text(render_svg(analysis.selection, analysis.graph), encoding="utf-8")
        except OSError as exc:
            raise OptionError(f"cannot write --graph {str(path)!r}: {exc.strerror}. Hint: check the folder exists.") from exc
    if args.html:
        from .html_view import model_view, render_html

        path = Path(args.html)
        try:
            path.write_text(render_html(model_view(analysis.selection, analysis.graph, head=args.head)), encoding="utf-8")
        except OSError as exc:
            raise OptionError(f"cannot write --html {str(path)!r}: {exc.strerror}. Hint: check the folder exists.") from exc
    if args.format == "json":
        sys.stdout.write(to_json(selection_to_dict(analysis.selection, analysis.graph, head=args.head)))
    else:
        from rich.console import Console

        # Piped output gets a wide, stable table instead of rich's 80-column default.
        console = Console(width=None if sys.stdout.isatty() else 160)
        console.print(render_table(analysis.selection, analysis.graph, all_candidates=args.all_candidates,
                                   head=args.head))
        if args.graph:
            console.print(f"graph picture written to {args.graph}")
        if args.html:
            console.print(f"HTML view written to {args.html}")
    return 0


@contextlib.contextmanager
def _model_arg_warnings() -> Iterator[None]:
    """Print each ``ModelArgWarning`` (an argument a factory may ignore) as one ``autoprobe: warning:`` line.

    They are printed once the block succeeds; every other warning raised meanwhile is shown as
    Python would show it.
    """
    import warnings

    from .models import ModelArgWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModelArgWarning)
        yield  # on an error, its one message is all the user sees (exit 2)
    for w in caught:
        if issubclass(w.category, ModelArgWarning):
            print(f"autoprobe: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _check_width(spec: str, asked: int | None, graph: LayerGraph) -> None:
    """Refuse a model whose output is not the ``--num-classes`` asked for: its builder ignored the width.

    A builder that takes its width under another name (smp's ``classes``) and swallows ``num_classes``
    in ``**kwargs`` would otherwise be previewed at its default width, with exit code 0.

    Args:
        spec: the model spec.
        asked: the width asked for (``--num-classes`` or ``--model-arg num_classes=``), or ``None``.
        graph: the built model's layer graph, whose output gives the width it has.

    Raises:
        OptionError: the output's width is known and is not ``asked``.
    """
    from .models import width_parameters
    from .report import output_classes

    built = output_classes(graph)
    if asked is None or built is None or built == asked:
        return
    own = [n for n in width_parameters(spec) if n != "num_classes"]
    if own:
        instead = f"its builder takes the width as `{own[0]}`: pass `--model-arg {own[0]}={asked}` instead of --num-classes"
    else:
        instead = "pass the width with the builder's own parameter, `--model-arg NAME=" + f"{asked}`"
    raise OptionError(
        f"--num-classes {asked}: {spec} was built with an output of K={built}, so the builder did not use "
        f"num_classes={asked}.\nHint: {instead}."
    )


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
