"""Start-up time of ``autoprobe inspect`` against ``python -c "import timm"``, side by side in one run.

A misspelt timm name needs timm's registry to be refused with close matches, so importing timm
(which imports torch and torchvision) is the least it can cost; the target is under 2x that. The
commands run as fresh processes, round-robin (one of each per repeat, so the machine's load falls on
all of them alike); each ratio is the median over repeats of that repeat's ratio to ``import timm``,
wall time, and the medians of the wall times are printed beside them.

Commands:
    import torch          ``python -c "import torch"`` (what every command pays)
    import timm           ``python -c "import timm"`` (the reference)
    inspect misspelt      ``python -m autoprobe inspect resnet5O`` (exit 2, close matches)
    inspect resnet50      ``python -m autoprobe inspect resnet50`` (the full analysis)

Usage:
    python benchmarks/cli_startup.py                  # 5 repeats
    python benchmarks/cli_startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, tuple[list[str], int]] = {
    "import torch": ([sys.executable, "-c", "import torch"], 0),
    "import timm": ([sys.executable, "-c", "import timm"], 0),
    "inspect misspelt": ([sys.executable, "-m", "autoprobe", "inspect", "resnet5O"], 2),
    "inspect resnet50": ([sys.executable, "-m", "autoprobe", "inspect", "resnet50"], 0),
}
"""Label -> (command line, the exit code it must give)."""


def _run(command: list[str], expected: int) -> float:
    """Wall seconds of one fresh process; a wrong exit code stops the benchmark (it measured something else)."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != expected:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}, expected {expected}:\n{done.stderr[-2000:]}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run every command ``--repeats`` times, round-robin, and print medians and ratios to ``import timm``.

    Args:
        argv: command-line arguments (``--repeats N``).

    Returns:
        0, or 1 when the misspelt name is not under 2x ``import timm``.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    _run(*COMMANDS["import timm"])  # warm the file cache once, so the first repeat is not a cold disk
    for repeat in range(args.repeats):
        # Alternate the order, so no command always runs right after the same one.
        order = list(COMMANDS) if repeat % 2 == 0 else list(reversed(COMMANDS))
        for label in order:
            times[label].append(_run(*COMMANDS[label]))

    reference = times["import timm"]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeats} repeats, fresh process each, wall time")
    print(f"{'command':<18} {'median s':>9} {'x import timm (median of ratios)':>34}")
    ratios = {}
    for label, seconds in times.items():
        ratios[label] = statistics.median(s / r for s, r in zip(seconds, reference))
        print(f"{label:<18} {statistics.median(seconds):>9.2f} {ratios[label]:>34.2f}")
    target = ratios["inspect misspelt"] < 2.0
    print(f"target: inspect of a misspelt timm name under 2x import timm: {'met' if target else 'NOT met'}")
    return 0 if target else 1


if __name__ == "__main__":
    sys.exit(main())
