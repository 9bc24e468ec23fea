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
over two workers, output-only filling the barriers, so the gap left to 2x is split into the
schedule's share and the processes'; and beside it what the engine allowed before output-only
filled the barriers (and, with a finite ``max_cost``, before the unit's early measure). Last, what
the machine itself allows (``machine_ceiling``): one output-only training alone in a process, then
two at once in two processes that share nothing; on two cores that share their caches and memory
bus, two processes do less than twice the work of one, whatever the schedule.

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

__all__ = ["factory", "machine_ceiling", "main"]


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


def schedule_steps(table, rung_steps, workers: int, unit: str | None = "probe", filler: bool = True) -> int:
    """The wall time, in training steps, that tune's synchronous halving allows ``workers`` processes
    for the search ``table`` recorded, if every step cost the same and nothing else took time.

    It replays the engine's rule (``tuneengine.work``), the free worker with the lowest number first:
    the first rung dealt round-robin in search order (output-only first, to worker 0), a worker done
    with its own taking any still waiting, the other candidates' first rungs waiting for the unit
    (``unit``); then at each later rung, once every candidate other than output-only has reported the
    one before, the kept ones dealt round-robin again, a worker done with its own taking any still
    untaken; and a worker with no job training output-only's next rung once its rung before is done
    (``filler``). So a measured ratio can be read against what the schedule itself permits, apart
    from the processes' start, the unit's validation pass and the study's bookkeeping.

    Args:
        table: ``TuneResult.table`` rows (``candidate``, ``steps``: the last rung each reached), output-only first.
        rung_steps: the rungs' ends (``tunespace.rungs``).
        workers: the processes.
        unit: what the other candidates' first rungs wait for: None (``max_cost=math.inf``), ``"probe"``
            (output-only's warm-up step and ``tuneengine.probe_steps``: a finite ``max_cost``) or
            ``"rung"`` (output-only's whole first rung, as before the early measure).
        filler: False replays the engine before output-only filled the barriers: output-only dealt with
            the others at every rung (to worker 0) and waited for at each barrier, and no job taken
            from another worker after the first rung.

    Returns:
        The last worker's finishing time, in steps.

    Example:
        >>> from types import SimpleNamespace as Row
        >>> table = [Row(steps=720)] + [Row(steps=s) for s in (720, 240, 80, 80)]  # output-only first
        >>> rungs = (80, 240, 720)
        >>> schedule_steps(table, rungs, 1), schedule_steps(table, rungs, 2, unit=None)
        (1840, 960)
        >>> schedule_steps(table, rungs, 2), schedule_steps(table, rungs, 2, unit="rung")
        (971, 1040)
        >>> schedule_steps(table, rungs, 2, unit=None, filler=False)  # the barriers with output-only in them
        1040
    """
    from autoprobe.tuneengine import probe_steps

    first, last = rung_steps[0], len(rung_steps) - 1
    entered = [row for row in table if row.steps >= first]
    length = [b - a for a, b in zip((0, *rung_steps), rung_steps)]
    probe = probe_steps(first)  # timed after one warm-up step
    wait = {None: 0, "rung": first, "probe": first if probe is None else 1 + probe}[unit]
    # pending[r]: rung r's untaken jobs, by their place in the deal (None: not dealt yet); ends[r]: when
    # its taken jobs end, those its barrier waits for; opens[r]: when its jobs may start.
    pending: list[list[int] | None] = [list(range(len(entered)))] + [None] * last
    ends: list[list[int]] = [[] for _ in rung_steps]
    opens = [0] * len(rung_steps)
    free = [0] * workers  # when each worker is next free
    finish, unit_at, out_next, out_ready = 0, 0, 1, math.inf  # output-only's next rung, when it may start
    while any(p is None or p for p in pending) or (filler and out_next <= last):
        r = next((k for k, p in enumerate(pending) if p is None or p), None)
        if r is not None and pending[r] is None:  # the rung before is all taken: deal this one at its barrier
            dealt = entered[1:] if filler else entered  # output-only (first) is dealt only without the filler
            kept = [row for row in dealt if row.steps >= rung_steps[r]]
            pending[r] = list(range(len(kept)))
            opens[r] = max(ends[r - 1], default=opens[r - 1])
            continue
        w = min(range(workers), key=lambda k: (free[k], k))
        now = free[w]
        ready = pending[r] if r is not None and opens[r] <= now else []
        own = [j for j in ready if j % workers == w]
        # Without the filler a later rung's jobs stayed with the worker they were dealt to.
        if own or (ready and (r == 0 or filler)):
            j = (own or ready)[0]
            ready.remove(j)
            start = max(now, unit_at) if r == 0 and j else now
            free[w] = start + length[r]
            finish = max(finish, free[w])
            if r == 0 and j == 0:  # output-only's first rung: the unit's measure
                unit_at, out_ready = start + wait, free[w]
            if not (filler and r == 0 and j == 0):
                ends[r].append(free[w])
        elif filler and out_next <= last and out_ready <= now:
            free[w] = out_ready = now + length[out_next]
            finish = max(finish, free[w])
            out_next += 1
        else:  # idle until something changes
            free[w] = min((t for t in [*free, opens[r] if r is not None else 0, out_ready] if t > now),
                          default=math.inf)
    return finish


def _timed_training(steps: int, start, results) -> None:  # noqa: ANN001
    """A process's entry: one output-only training of ``steps`` steps (its rungs' validation included), timed from
    when every process of the measurement is ready (``start``, a barrier), so no process's start is in it."""
    import torch

    from autoprobe import TrainOptions
    from autoprobe.tunespace import OUTPUT
    from autoprobe.tuning import train_candidate

    torch.set_num_threads(1)
    train, val = _data()
    start.wait()
    t0 = time.perf_counter()
    train_candidate(OUTPUT, factory, train, val, task="classification", steps=steps, options=TrainOptions(lr=3e-3))
    results.put(time.perf_counter() - t0)


def machine_ceiling(steps: int) -> tuple[float, list[float]]:
    """The same training alone in one process, then in two processes at once (spawned, one thread each): what this
    machine gives two processes that share nothing, the most two workers could get from any schedule.

    Returns:
        The wall seconds alone, and of each of the two at once.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    timings = []
    for n in (1, 2):
        start, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_timed_training, args=(steps, start, results)) for _ in range(n)]
        for p in procs:
            p.start()
        timings.append([results.get() for _ in procs])
        for p in procs:
            p.join()
    return timings[0][0], timings[1]


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print one line per run and the median ratio."""
    import torch

    from autoprobe import TrainOptions, tune
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
            result = tune(factory, train, val, task="classification", steps=args.steps,
                          options=TrainOptions(lr=3e-3), search=search,
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
                unit = "probe" if math.isfinite(max_cost) else None
                bound = schedule_steps(result.table, rungs(args.steps, 3), 2, unit=unit)
                before = schedule_steps(result.table, rungs(args.steps, 3), 2, unit=unit and "rung", filler=False)
                print(f"  the schedule allows {result.cost_steps} / {bound} steps = {result.cost_steps / bound:.2f}x "
                      f"at 2 workers ({len(result.table)} candidates, output-only included; without the filler "
                      f"{'and the probe ' if unit else ''}{result.cost_steps / before:.2f}x)")
    # The fixed cost of worker processes: the same search at 3 steps, where training is nothing.
    fixed = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        tune(factory, train, val, task="classification", steps=3, options=TrainOptions(lr=3e-3), search=SEARCH,
             workers=workers, progress=False, max_cost=math.inf)  # the small search: the fixed cost, not the training
        fixed[workers] = time.perf_counter() - t0
    print(f"fixed cost (steps=3): workers=1 {fixed[1]:.2f} s, workers=2 {fixed[2]:.2f} s")
    # Two processes on this machine's two cores each run slower than one alone (they share the caches and
    # the memory bus): that, not the schedule, caps what any number of workers can give here.
    alone, together = machine_ceiling(args.steps)
    ceiling = 2 * alone / max(together)
    print(f"machine: one output-only training of {args.steps} steps alone {alone:.2f} s, two at once "
          f"{' and '.join(f'{t:.2f}' for t in together)} s: two processes do {ceiling:.2f}x the work of one")
    same = results[1] == results[2]
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(f"median wall: 1 worker {one:.2f} s, 2 workers {two:.2f} s, ratio (1 / 2) {one / two:.2f}x; "
          f"median CPU: {statistics.median(cpu[1]):.2f} s, {statistics.median(cpu[2]):.2f} s; "
          f"same choice and table: {same}; load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
