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

For each two-worker run it also prints what the synchronous halving schedule itself allows
(``schedule_steps``): the search's training steps over the wall time, in steps, of the rungs dealt
over two workers, so the gap left to 2x is split into the schedule's share and the processes'.

Usage:
    python benchmarks/tune_workers.py                  # steps=90, 2 repeats
    python benchmarks/tune_workers.py --steps 180 --repeats 3
    python benchmarks/tune_workers.py --search default --steps 720   # tune's default search and max_cost
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


def schedule_steps(table, rung_steps, workers: int, unit_wait: bool = True) -> int:
    """The wall time, in training steps, that tune's synchronous halving allows ``workers`` processes
    for the search ``table`` recorded, if every step cost the same and nothing else took time.

    It replays the engine's rule (``tuneengine.work``): the first rung dealt round-robin in search
    order (output-only first, to worker 0), a worker done with its own taking any still waiting, the
    other candidates' first rungs waiting for output-only's (``unit_wait``: the measure ``max_cost``
    needs); then at each later rung, once every candidate has reported the one before, the kept
    candidates dealt round-robin again. So a measured ratio can be read against what the schedule
    itself permits, apart from the processes' start and the study's bookkeeping.

    Args:
        table: ``TuneResult.table`` rows (``candidate``, ``steps``: the last rung each reached).
        rung_steps: the rungs' ends (``tunespace.rungs``).
        workers: the processes.
        unit_wait: whether the first rung waits for output-only's (a finite ``max_cost``).

    Returns:
        The last worker's finishing time, in steps.

    Example:
        >>> from types import SimpleNamespace as Row
        >>> table = [Row(steps=720)] + [Row(steps=s) for s in (720, 240, 80, 80)]  # output-only first
        >>> schedule_steps(table, (80, 240, 720), 1), schedule_steps(table, (80, 240, 720), 2)
        (1840, 1040)
    """
    first = rung_steps[0]
    entered = [row for row in table if row.steps >= first]
    free = [0] * workers  # when each worker is next free
    own = [[i for i in range(len(entered)) if i % workers == w] for w in range(workers)]
    waiting = list(range(len(entered)))
    unit_done = 0
    while waiting:
        w = min(range(workers), key=lambda k: (free[k], k))
        mine = [i for i in own[w] if i in waiting]
        i = mine[0] if mine else waiting[0]
        waiting.remove(i)
        start = free[w] if i == 0 or not unit_wait else max(free[w], unit_done)
        free[w] = start + first
        if i == 0:
            unit_done = free[w]
    end = max(free)
    for prev, step in zip(rung_steps, rung_steps[1:]):
        kept = [row for row in table if row.steps >= step]
        per = [len(kept[w::workers]) for w in range(workers)]
        end += max(per) * (step - prev)
    return end


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print one line per run and the median ratio."""
    import torch

    from autoprobe import tune
    from autoprobe.tunespace import rungs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--search", choices=("small", "default"), default="small",
                        help="small: output-only and four settings, no cost bound (the same search every run); "
                             "default: tune's default search at its default max_cost (measured admissions "
                             "may then differ between runs)")
    args = parser.parse_args(argv)
    search, max_cost = (SEARCH, math.inf) if args.search == "small" else (None, 3.5)
    torch.set_num_threads(1)
    train, val = _data()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average before: {os.getloadavg()}")
    times: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    results = {}
    for repeat in range(args.repeats):
        for workers in ((1, 2) if repeat % 2 == 0 else (2, 1)):
            t0 = time.perf_counter()
            result = tune(factory, train, val, task="classification", steps=args.steps, lr=3e-3, search=search,
                          workers=workers, progress=False, max_cost=max_cost)
            wall = time.perf_counter() - t0
            times[workers].append(wall)
            cpu[workers].append(result.cost.cpu_s)
            results[workers] = result
            c = result.cost
            print(f"repeat {repeat}: workers={workers} wall {wall:.2f} s, CPU {c.cpu_s:.2f} s "
                  f"(training, validation, builds {c.train_s + c.validation_s + c.build_s:.2f} s), "
                  f"chose {result.chosen.label}, cost {result.cost_steps} steps, load {os.getloadavg()[0]:.2f}")
            if workers == 2:
                # What synchronous halving itself permits for this table, at equal cost per step.
                bound = schedule_steps(result.table, rungs(args.steps, 3), 2, unit_wait=math.isfinite(max_cost))
                print(f"  the schedule allows {result.cost_steps} / {bound} steps = {result.cost_steps / bound:.2f}x "
                      f"at 2 workers ({len(result.table)} candidates, output-only included)")
    # The fixed cost of worker processes: the same search at 3 steps, where training is nothing.
    fixed = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        tune(factory, train, val, task="classification", steps=3, lr=3e-3, search=SEARCH, workers=workers,
             progress=False, max_cost=math.inf)  # the small search: the fixed cost, not the training
        fixed[workers] = time.perf_counter() - t0
    print(f"fixed cost (steps=3): workers=1 {fixed[1]:.2f} s, workers=2 {fixed[2]:.2f} s")
    same = results[1] == results[2]
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"median wall: 1 worker {one:.2f} s, 2 workers {two:.2f} s, ratio (1 / 2) {one / two:.2f}x; "
          f"median CPU: {statistics.median(cpu[1]):.2f} s, {statistics.median(cpu[2]):.2f} s; "
          f"same choice and table: {same}; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
