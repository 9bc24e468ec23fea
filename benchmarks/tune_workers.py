"""``autoprobe.tune`` search wall time at 1 and 2 worker processes, side by side in one run.

The same search (a small CNN on a synthetic 4-class task, output-only and four DSN / iMacHSR
settings, ``steps`` training steps per full run, successive halving with eta=3) run with
``workers=1`` (in this process) and ``workers=2`` (two spawned processes sharing a journal), the
order alternating every repeat, one intra-op thread per process (``torch.set_num_threads(1)``), so
two workers use two cores where one uses one. The 2-worker time includes spawning both workers
(a fresh interpreter importing torch and autoprobe each). It also checks that both choose the same
setting with the same table, and prints each run's CPU seconds (every process: ``result.cost.cpu_s``)
beside its wall time. ``max_cost=math.inf``: the measured budget would stop candidates by timings
that differ between runs, and this compares the same search. Prints the machine's load average,
which matters on a shared machine.

Usage:
    python benchmarks/tune_workers.py                  # steps=90, 2 repeats
    python benchmarks/tune_workers.py --steps 180 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

__all__ = ["factory", "main"]


def factory():  # noqa: ANN201
    """The model searched (module level, so worker processes can import it)."""
    from torch import nn

    conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
    return nn.Sequential(*conv(1, 16), *conv(16, 16), *conv(16, 32), *conv(32, 32), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 4))


def _data():  # noqa: ANN202
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1280, 1, 16, 16, generator=gen)
    y = (x[:, 0, :8, :8].mean((1, 2)) > 0).long() * 2 + (x[:, 0, 8:, 8:].mean((1, 2)) > 0).long()
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 1024, 64)], [(x[1024:], y[1024:])]


SEARCH = {"objective": ["dsn", "imachsr"], "alpha": [0.1, 0.5], "lam": [0.0], "points": [None],
          "position": ["auto"], "schedule": ["constant"]}


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print one line per run and the median ratio."""
    import torch

    from autoprobe import tune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, val = _data()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average before: {os.getloadavg()}")
    times: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    results = {}
    for repeat in range(args.repeats):
        for workers in ((1, 2) if repeat % 2 == 0 else (2, 1)):
            t0 = time.perf_counter()
            result = tune(factory, train, val, task="classification", steps=args.steps, lr=3e-3, search=SEARCH,
                          workers=workers, progress=False, max_cost=math.inf)
            wall = time.perf_counter() - t0
            times[workers].append(wall)
            cpu[workers].append(result.cost.cpu_s)
            results[workers] = result
            c = result.cost
            print(f"repeat {repeat}: workers={workers} wall {wall:.2f} s, CPU {c.cpu_s:.2f} s "
                  f"(training, validation, builds {c.train_s + c.validation_s + c.build_s:.2f} s), "
                  f"chose {result.chosen.label}, cost {result.cost_steps} steps, load {os.getloadavg()[0]:.2f}")
    # The fixed cost of worker processes: the same search at 3 steps, where training is nothing.
    fixed = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        tune(factory, train, val, task="classification", steps=3, lr=3e-3, search=SEARCH, workers=workers,
             progress=False, max_cost=math.inf)
        fixed[workers] = time.perf_counter() - t0
    print(f"fixed cost (steps=3): workers=1 {fixed[1]:.2f} s, workers=2 {fixed[2]:.2f} s")
    same = results[1] == results[2]
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"median wall: 1 worker {one:.2f} s, 2 workers {two:.2f} s, ratio (1 / 2) {one / two:.2f}x; "
          f"median CPU: {statistics.median(cpu[1]):.2f} s, {statistics.median(cpu[2]):.2f} s; "
          f"same choice and table: {same}; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
