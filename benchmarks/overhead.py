"""Cost of deep supervision: train-step time and peak memory, instrumented over plain.

Why this shape: on a shared CPU the wall time of one step drifts by tens of
percent from minute to minute, so a ratio of two separately measured means says
little. Here the plain and the instrumented steps run interleaved in one process
(the same model object, the same batch, the order rotated and reversed every
repeat so drift hits every variant alike), each ratio is taken within one repeat,
and the median over repeats is reported, next to the ratio of each variant's
fastest step (the one least slowed by other processes). CPU time (``time.process_time``, all
threads of the process) is reported beside wall time because it is much less
sensitive to other processes competing for the cores.

Peak memory on CPU has no allocator counter like ``torch.cuda.max_memory_allocated``,
so each variant runs in a fresh subprocess and reports ``VmHWM``, the kernel's
peak resident set of the process, over a few steps. The mark is reset through
``/proc/self/clear_refs`` just before the first step, so imports and model
construction do not count; "growth" is that peak minus the resident set at the
reset (model, adapters and Python already loaded), i.e. what training itself
holds: activations, gradients, optimizer state. Large tensors are mmap-allocated
by glibc and returned on free, so RSS follows live tensor memory closely.

Variants: ``plain`` is ``cross_entropy(model(x), y)``; ``imachsr`` (the target) is
``probed.loss(probed(x), y)`` with the default selection (M = round(ln D)) and the
default objective (CE + MI + NE at every point); ``dsn`` (diagnostic) is the same
taps with cross entropy at each adapter, so the difference to ``imachsr`` is the
cost of the MI and NE terms. Every step does backward and an SGD-momentum update.

Usage:
    python benchmarks/overhead.py                       # resnet50 and vit_small_patch16_224, batch 16
    python benchmarks/overhead.py --models resnet18 --batch 8 --repeats 3 --losses imachsr
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["StepTimes", "build_steps", "time_interleaved", "measure_memory", "main"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StepTimes:
    """Per-step costs of one variant, one entry per repeat.

    ``cpu`` is the process's CPU time (user + system); ``user`` and ``system`` split it, and
    ``faults`` counts minor page faults: on glibc a step's system time is mostly the kernel
    handing out fresh zeroed pages for large tensors, which depends on the allocator's state, not
    on the step's code.
    """

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    user: list[float] = field(default_factory=list)
    system: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)


def build_steps(name: str, batch: int, losses: Sequence[str]) -> tuple[dict[str, Callable[[], None]], str]:
    """One train-step function per variant, all on the same timm model and batch.

    Instrumenting twice is safe because ``instrument`` never mutates the model:
    each ``Probed`` shares its weights.

    Args:
        name: timm model name (built with ``pretrained=False``).
        batch: batch size; the input size is the model's own.
        losses: objectives to instrument with (``imachsr``, ``dsn``, ``dks``).

    Returns:
        ``{"plain": step, loss: step, ...}`` and the rewrite summary of the first loss.

    Example:
        >>> steps, _ = build_steps("resnet18", batch=2, losses=["dsn"])
        >>> sorted(steps)
        ['dsn', 'plain']
    """
    import timm
    import torch
    import torch.nn.functional as F

    import autoprobe

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    size = tuple(model.pretrained_cfg["input_size"])
    x = torch.randn(batch, *size)
    y = torch.randint(0, model.num_classes, (batch,))
    plain_opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        plain_opt.step()

    steps: dict[str, Callable[[], None]] = {"plain": plain_step}
    summaries = []
    for loss in losses:
        probed = autoprobe.instrument(model, input_size=size, loss=loss)
        summaries.append(probed.report.summary())
        steps[loss] = _probed_step(probed, torch.optim.SGD(probed.parameters(), lr=1e-3, momentum=0.9), x, y)
    return steps, (summaries[0] if summaries else "")


def _probed_step(probed, optimizer, x, y) -> Callable[[], None]:  # noqa: ANN001 - torch types, imported lazily
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        total, _ = probed.loss(probed(x), y)
        total.backward()
        optimizer.step()

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, StepTimes]:
    """Time every variant once per repeat, rotating and reversing the order each repeat.

    Args:
        steps: variant name -> step function.
        repeats: timed rounds.
        warmup: untimed steps of each variant first (allocator, oneDNN primitive caches).

    Returns:
        Variant name -> its ``StepTimes``.

    Example:
        >>> times = time_interleaved({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=0)
        >>> len(times["a"].wall), len(times["b"].cpu)
        (2, 2)
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    names = list(steps)
    times = {name: StepTimes() for name in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order if i % 2 == 0 else reversed(order):
            wall, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
            steps[name]()
            after = resource.getrusage(resource.RUSAGE_SELF)
            times[name].wall.append(time.perf_counter() - wall)
            times[name].cpu.append(time.process_time() - cpu)
            times[name].user.append(after.ru_utime - usage.ru_utime)
            times[name].system.append(after.ru_stime - usage.ru_stime)
            times[name].faults.append(after.ru_minflt - usage.ru_minflt)
    return times


def _rss_bytes() -> int:
    """Current resident set of this process (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """Peak resident set of this process's memory map (``VmHWM``).

    Not ``getrusage().ru_maxrss``: that also keeps the peak of the image replaced by
    ``exec``, i.e. the parent's memory at ``fork``, which would put the benchmark
    driver's own peak under every subprocess's number.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status; peak memory needs Linux")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so setup peaks (imports, model init) do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def memory_child(name: str, variant: str, batch: int, steps: int) -> None:
    """Subprocess entry: build one variant, run ``steps`` steps, print peak RSS as JSON."""
    built, _ = build_steps(name, batch, [] if variant == "plain" else [variant])
    step = built[variant]
    reset = _reset_peak_rss()
    before = _rss_bytes()
    for _ in range(steps):
        step()
    print(json.dumps({"peak": _peak_rss_bytes(), "before": before, "reset": reset}))


def measure_memory(name: str, variant: str, batch: int, steps: int, threads: int) -> dict[str, int]:
    """Run ``memory_child`` in a fresh interpreter and return its numbers.

    Args:
        name: timm model name.
        variant: ``plain`` or a loss name.
        batch: batch size.
        steps: train steps to run.
        threads: torch intra-op threads.

    Returns:
        ``{"peak": bytes, "before": bytes, "reset": bool}``.
    """
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, __file__, "--memory-child", name, variant, "--batch", str(batch), "--steps", str(steps),
         "--threads", str(threads)],
        capture_output=True, text=True, env=env, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory child {name}/{variant} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _pair(row: dict[str, object], clock: str, variant: str) -> str:
    """"median of paired ratios / ratio of the minima" for one clock and variant."""
    return f"{row[f'{clock}_ratio_{variant}']:.3f} / {row[f'{clock}_min_ratio_{variant}']:.3f}"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a Markdown summary.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--losses", nargs="+", default=["imachsr", "dsn"],
                        help="instrumented variants; the first is the one compared with the targets")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds per model (every variant once per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-repeats", type=int, default=2, help="subprocess runs per variant for peak memory")
    parser.add_argument("--steps", type=int, default=2, help="steps per memory subprocess")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], args.memory_child[1], args.batch, args.steps)
        return 0

    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, repeats={args.repeats}, "
          f"warmup={args.warmup}, memory: {args.memory_repeats} subprocesses/variant x {args.steps} steps, "
          f"cpus={os.cpu_count()}, load average at start {os.getloadavg()[0]:.1f}", flush=True)
    target = args.losses[0]
    rows = []
    for name in args.models:
        steps, summary = build_steps(name, args.batch, args.losses)
        print(summary, flush=True)
        times = time_interleaved(steps, args.repeats, args.warmup)
        del steps  # free the timing models before the memory subprocesses run
        mem: dict[str, list[dict[str, int]]] = {"plain": [], target: []}
        for _ in range(args.memory_repeats):
            for variant in mem:
                mem[variant].append(measure_memory(name, variant, args.batch, args.steps, args.threads))
        row: dict[str, object] = {"model": name, "load_average": os.getloadavg()[0]}
        for variant, t in times.items():
            row[f"wall_{variant}"] = statistics.median(t.wall)
            row[f"cpu_{variant}"] = statistics.median(t.cpu)
            if variant != "plain":
                row[f"wall_ratio_{variant}"] = statistics.median(
                    v / p for v, p in zip(t.wall, times["plain"].wall))
                row[f"cpu_ratio_{variant}"] = statistics.median(
                    v / p for v, p in zip(t.cpu, times["plain"].cpu))
                # The fastest step of each variant is the one least slowed by other processes.
                row[f"wall_min_ratio_{variant}"] = min(t.wall) / min(times["plain"].wall)
                row[f"cpu_min_ratio_{variant}"] = min(t.cpu) / min(times["plain"].cpu)
        for variant, runs in mem.items():
            row[f"peak_{variant}"] = statistics.median(r["peak"] for r in runs)
            row[f"growth_{variant}"] = statistics.median(r["peak"] - r["before"] for r in runs)
        row["peak_ratio"] = row[f"peak_{target}"] / row["peak_plain"]
        row["growth_ratio"] = row[f"growth_{target}"] / row["growth_plain"]
        row["raw"] = {v: {"wall": t.wall, "cpu": t.cpu} for v, t in times.items()} | {"memory": mem}
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    print("Time ratios: median of the per-round ratios / ratio of the fastest steps.")
    extra = list(args.losses[1:])
    head = (["model", f"step wall plain / {target} (s)", "wall ratio", f"step CPU plain / {target} (s)", "CPU ratio"]
            + [f"CPU ratio {v}" for v in extra]
            + ["peak RSS plain / probed (GiB)", "peak ratio", "training growth plain / probed (GiB)", "growth ratio"])
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
        cells = [r["model"], f"{r['wall_plain']:.2f} / {r[f'wall_{target}']:.2f}", _pair(r, "wall", target),
                 f"{r['cpu_plain']:.2f} / {r[f'cpu_{target}']:.2f}", _pair(r, "cpu", target)]
        cells += [_pair(r, "cpu", v) for v in extra]
        cells += [f"{_gib(r['peak_plain'])} / {_gib(r[f'peak_{target}'])}", f"{r['peak_ratio']:.3f}",
                  f"{_gib(r['growth_plain'])} / {_gib(r[f'growth_{target}'])}", f"{r['growth_ratio']:.3f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
