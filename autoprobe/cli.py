"""The ``autoprobe`` command line.

Every user error (an ``AutoprobeError``) prints one short message with a hint
and exits 2; exit 1 is reserved for a failing check. torch and timm are
imported only by the commands that need them, so ``autoprobe --help`` and
``autoprobe rules`` start instantly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import AutoprobeError, InputSizeError

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
    return parser


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
