"""What ``autoprobe.tune`` costs at its default search, measured, in units of one output-only run.

Two parts, one run:

1. The conversion factors, side by side on one model: the CPU seconds of an output-only training
   step, a DSN and an iMacHSR step (the default space's objectives, automatic points), a validation
   pass, and a build (the factory alone for output-only; the factory and ``instrument`` otherwise),
   each as ``tune``'s own ``Runner`` measures them, and each over one output-only run of ``--steps``
   steps (its steps, one validation pass and its build): what ``max_cost`` converts them by.
2. ``tune`` at the default search and ``max_cost=3.5``: ``result.cost`` (steps, passes, builds, CPU
   and wall seconds; ``runs`` is what the bound covers) and the candidates the budget stopped.

The model is a small CNN (four conv-BN-ReLU blocks, 16x16 inputs, batch 64; ``tune_workers.py``'s),
one intra-op thread. Prints the machine's load average, which matters on a shared machine.

Usage:
    python benchmarks/tune_cost.py                # steps=450, a validation set of 1024 inputs
    python benchmarks/tune_cost.py --steps 900 --val 4096
"""

from __future__ import annotations

import argparse
import os
import time

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Measure and print the conversion factors and the default search's cost."""
    import torch

    from autoprobe import TrainOptions, tune
    from autoprobe.tunespace import OUTPUT, Candidate
    from autoprobe.tunetrain import Runner

    from tune_workers import factory

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--val", type=int, default=1024)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024 + args.val, 1, 16, 16, generator=gen)
    y = (x[:, 0, :8, :8].mean((1, 2)) > 0).long() * 2 + (x[:, 0, 8:, 8:].mean((1, 2)) > 0).long()
    train = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1024, 64)]
    val = [(x[i : i + 256], y[i : i + 256]) for i in range(1024, 1024 + args.val, 256)]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average before: {os.getloadavg()}")

    run = Runner(factory, train, val, task="classification", options=TrainOptions(lr=3e-3), seed=0,
                 full_steps=args.steps, weights=None)
    probe = max(30, args.steps // 9)
    settings = [OUTPUT, Candidate("dsn", 0.2), Candidate("imachsr", 0.2, 0.01)]
    for c in settings:  # the order alternates in a second pass, so drift in the load does not favour one
        run.advance(c, probe // 2)
    for c in reversed(settings):
        run.advance(c, probe)
    out = run.spend[OUTPUT]
    step_out = out.train_s / out.steps
    val_s = out.validation_s / out.passes
    unit = out.build_s / out.builds + args.steps * step_out + val_s
    print(f"one output-only run ({args.steps} steps, one pass, its build): {unit:.3f} CPU s")
    print(f"{'':10} {'step ms':>8} {'x output':>9} {'build s':>8} {'build, runs':>12} {'pass, runs':>11}")
    for c in settings:
        s = run.spend[c]
        step = s.train_s / s.steps
        print(f"{c.objective:10} {1e3 * step:8.2f} {step / step_out:9.2f} {s.build_s / s.builds:8.3f} "
              f"{s.build_s / s.builds / unit:12.4f} {s.validation_s / s.passes / unit:11.4f}")

    t0 = time.perf_counter()
    result = tune(factory, train, val, task="classification", steps=args.steps, options=TrainOptions(lr=3e-3),
                  progress=False)
    wall = time.perf_counter() - t0
    c = result.cost
    stopped = [row for row in result.table if row.error and row.error.startswith("over budget")]
    print(f"tune, default search, max_cost=3.5: {len(result.table) - 1} candidates drawn ({result.dropped} dropped "
          f"by steps), {len(stopped)} stopped by the measured budget; chose {result.chosen.label}")
    print(f"  {c.steps} steps, {c.validation_passes} passes, {c.builds} builds; CPU s: training {c.train_s:.2f}, "
          f"validation {c.validation_s:.2f}, builds {c.build_s:.2f}; unit {c.unit_s:.3f}")
    print(f"  runs (what max_cost bounds) {c.runs:.2f}; all CPU {c.cpu_s:.2f} s = {c.total_runs:.2f} runs "
          f"(Optuna and the process's one-off imports included); wall {wall:.2f} s; "
          f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
