"""Profile one training step of the hand-written-hook variant and the autoprobe variant, side by side.

What it reports: for each variant of ``handhook.py`` (``hand``, ``autoprobe``; ``plain`` with
``--variants``), one step under ``torch.profiler`` (CPU activities, ``record_shapes``,
``profile_memory``, ``with_stack``) after ``--warmup`` unprofiled steps, then a table of the
operators whose call count, self CPU time or allocated bytes differ most between two variants.
Counts and bytes do not depend on the machine's load; self CPU times do, so on a shared machine
read them as a hint only.

With ``--breakdown``, where the autoprobe step's time goes instead: one profiled step with a
``record_function`` range per phase (forward, loss, backward, optimizer), every event's self time
attributed to a part of the step (``breakdown``): the backbone forward, each adapter, each loss term,
the backward of each of those down to the gradient it adds into the backbone at its point, the
backbone's own backward, the optimizer.

Usage:
    python benchmarks/profile_step.py --models resnet50 vit_small_patch16_224 --threads 1
    python benchmarks/profile_step.py --models resnet18 --batch 4 --top 15
    python benchmarks/profile_step.py --breakdown --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script: handhook.py is a sibling
from handhook import build, setup  # noqa: E402

__all__ = ["OpStats", "profile_step", "diff_table", "phased_step", "breakdown", "breakdown_table", "main"]


@dataclass(frozen=True)
class OpStats:
    """One operator's totals over a profiled step.

    Attributes:
        calls: how many times it ran.
        self_cpu_ms: CPU time in the op itself, children excluded.
        alloc_mb: bytes it allocated (``self_cpu_memory_usage`` counts frees as negative; this
            sums the positive part per event), in MiB.
    """

    calls: int
    self_cpu_ms: float
    alloc_mb: float


def profile_step(step: Callable[[], None], warmup: int) -> dict[str, OpStats]:
    """Profile one call of ``step`` after ``warmup`` unprofiled calls.

    Returns:
        Operator name -> its ``OpStats``.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True, with_stack=True) as prof:
        step()
    calls: dict[str, int] = {}
    cpu: dict[str, float] = {}
    alloc: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        name = event.name
        if name.startswith(("<", "nn.Module: ")) or ".py(" in name:  # Python frames and module scopes: the ops are what differ
            continue
        calls[name] = calls.get(name, 0) + 1
        cpu[name] = cpu.get(name, 0.0) + event.self_cpu_time_total / 1e3
        alloc[name] = alloc.get(name, 0.0) + max(event.self_cpu_memory_usage, 0) / 2**20
    return {n: OpStats(calls[n], cpu[n], alloc[n]) for n in calls}


def diff_table(a: Mapping[str, OpStats], b: Mapping[str, OpStats], names: tuple[str, str], top: int) -> str:
    """A markdown table of the ``top`` operators differing most between ``a`` and ``b``.

    Rows are ranked by the absolute difference in allocated MiB, then in calls, then in self CPU
    time; an operator equal in all three is left out.
    """
    zero = OpStats(0, 0.0, 0.0)
    rows = []
    for op in set(a) | set(b):
        x, y = a.get(op, zero), b.get(op, zero)
        key = (abs(y.alloc_mb - x.alloc_mb) >= 1, abs(y.alloc_mb - x.alloc_mb), abs(y.calls - x.calls),
               abs(y.self_cpu_ms - x.self_cpu_ms))
        if x.calls == y.calls and round(x.alloc_mb) == round(y.alloc_mb) and abs(x.self_cpu_ms - y.self_cpu_ms) < 1:
            continue
        rows.append((key, op, x, y))
    rows.sort(key=lambda r: r[0], reverse=True)
    p, q = names
    lines = [f"| op | calls {p} / {q} | self CPU ms {p} / {q} | allocated MiB {p} / {q} |", "|---|---|---|---|"]
    for _, op, x, y in rows[:top]:
        lines.append(f"| `{op}` | {x.calls} / {y.calls} | {x.self_cpu_ms:.0f} / {y.self_cpu_ms:.0f} "
                     f"| {x.alloc_mb:.0f} / {y.alloc_mb:.0f} |")
    tot = {k: (sum(s.calls for s in v.values()), sum(s.self_cpu_ms for s in v.values()),
               sum(s.alloc_mb for s in v.values())) for k, v in ((p, a), (q, b))}
    lines.append(f"| **all ops** | {tot[p][0]} / {tot[q][0]} | {tot[p][1]:.0f} / {tot[q][1]:.0f} "
                 f"| {tot[p][2]:.0f} / {tot[q][2]:.0f} |")
    return "\n".join(lines)


_PHASES = ("forward", "loss", "backward", "optimizer")


def phased_step(probed, optimizer, x, y) -> Callable[[], None]:  # noqa: ANN001
    """The autoprobe step of ``handhook.py`` with one ``record_function`` range per phase."""
    from torch.profiler import record_function

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with record_function("phase:forward"):
            out = probed(x)
        with record_function("phase:loss"):
            total, _ = probed.loss(out, y)
        with record_function("phase:backward"):
            total.backward()
        with record_function("phase:optimizer"):
            optimizer.step()

    return step


def _forward_category(event, adapters: dict[int, str], calls: dict[int, str]) -> str:  # noqa: ANN001
    """What a forward or loss event belongs to, from its nearest enclosing adapter or loss-term frame."""
    node = event
    while node is not None:
        if id(node) in adapters:
            return f"adapter {adapters[id(node)]}"
        if id(node) in calls:
            return calls[id(node)]
        if node.name.startswith("phase:"):
            return "backbone forward" if node.name == "phase:forward" else "loss: checks, target matching, sums"
        node = node.cpu_parent
    return "outside the phases"


def breakdown(probed, events, points: Sequence[str]) -> dict[str, float]:  # noqa: ANN001
    """Self time (ms) of every event of one profiled ``phased_step``, summed by part of the step.

    Forward and loss events are attributed by their nearest enclosing frame: an adapter module
    (the N-th adapter called is the N-th point), ``_math.negative_entropy`` / ``heterogeneous``
    (the N-th call is the N-th point's NE / MI) or ``homogeneous`` (the output loss). A backward
    event belongs to the forward op that created its autograd node (same sequence number; an
    autograd node of a Python ``Function`` takes the category of the op just before it), so
    "backward: NE act1" is the backward of the NE term at act1 down to the gradient it adds into
    the backbone at act1. The optimizer phase is the optimizer's.
    """
    import bisect

    adapter_events = sorted((e for e in events if e.name.startswith("nn.Module: ") and "Adapter" in e.name),
                            key=lambda e: e.time_range.start)
    # Python frames all have id 0 in the profiler: key them by object.
    adapters = {id(e): points[i] for i, e in enumerate(adapter_events)}
    calls: dict[int, str] = {}
    for frame, label in (("negative_entropy", "loss: NE"), ("heterogeneous", "loss: MI"),
                         ("homogeneous", "loss: output CE")):
        found = sorted((e for e in events if e.name.endswith(f"): {frame}") and "_math.py" in e.name),
                       key=lambda e: e.time_range.start)
        for i, e in enumerate(found):
            calls[id(e)] = label if frame == "homogeneous" else f"{label} {points[i]}"
    phase_of: dict[int, str] = {}
    for e in events:
        node = e
        while node is not None and not node.name.startswith("phase:"):
            node = node.cpu_parent
        phase_of[id(e)] = node.name.removeprefix("phase:") if node is not None else ""
    # Sequence number -> category of the forward op that recorded it.
    by_seq: dict[int, str] = {}
    for e in events:
        if phase_of[id(e)] in ("forward", "loss") and e.sequence_nr >= 0:
            by_seq.setdefault(e.sequence_nr, _forward_category(e, adapters, calls))
    seqs = sorted(by_seq)
    totals: dict[str, float] = {}
    for e in events:
        phase = phase_of[id(e)]
        if phase in ("forward", "loss"):
            cat = _forward_category(e, adapters, calls)
        elif phase == "backward":
            node = e
            while node is not None and not node.name.startswith("autograd::engine::evaluate_function: "):
                node = node.cpu_parent
            if node is None:
                cat = "backward: engine (gradient sums, scheduling)"
            elif node.name.endswith("AccumulateGrad"):
                cat = "backward: parameter .grad accumulation"
            else:
                i = bisect.bisect_right(seqs, node.sequence_nr) - 1
                source = by_seq.get(node.sequence_nr, by_seq[seqs[i]] if i >= 0 else "backbone forward")
                cat = "backward: " + source.removeprefix("loss: ").replace("backbone forward", "backbone")
        elif phase == "optimizer":
            cat = "optimizer (SGD momentum)"
        else:
            continue
        totals[cat] = totals.get(cat, 0.0) + e.self_cpu_time_total / 1e3
    return totals


def breakdown_table(totals: dict[str, float], points: Sequence[str]) -> str:
    """A markdown table of ``breakdown``'s parts in step order, with each part's share of the step."""
    step = sum(totals.values())
    order = ["backbone forward", *(f"adapter {p}" for p in points), "loss: output CE",
             *(f"loss: {t} {p}" for p in points for t in ("MI", "NE")), "loss: checks, target matching, sums",
             "backward: backbone", *(f"backward: {k} {p}" for p in points for k in ("adapter", "MI", "NE")),
             "backward: output CE", "backward: checks, target matching, sums",
             "backward: parameter .grad accumulation", "backward: engine (gradient sums, scheduling)",
             "optimizer (SGD momentum)"]
    order += sorted(set(totals) - set(order))
    lines = ["| part of the step | ms (profiled) | share of the step |", "|---|---|---|"]
    for part in order:
        if part in totals:
            lines.append(f"| {part} | {totals[part]:.0f} | {100 * totals[part] / step:.1f}% |")
    lines.append(f"| **step** | {step:.0f} | 100% |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--loss", default="imachsr")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--variants", nargs=2, default=["hand", "autoprobe"])
    parser.add_argument("--breakdown", action="store_true",
                        help="instead of the diff, where the autoprobe step's time goes, by part")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, loss={args.loss}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    for name in args.models:
        if args.breakdown:
            bench = setup(name, args.batch, args.loss)
            optimizer = torch.optim.SGD(bench.probed.parameters(), lr=1e-3, momentum=0.9)
            step = phased_step(bench.probed, optimizer, bench.x, bench.y)
            for _ in range(args.warmup):
                step()
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                step()
            points = bench.probed.selection.names
            print(f"\n### {name}\n\n{breakdown_table(breakdown(bench.probed, prof.events(), points), points)}",
                  flush=True)
            del bench, step, optimizer, prof
            continue
        steps, note = build(name, args.batch, args.loss)
        print(f"\n### {name}\n\n{note}\n")
        stats = {v: profile_step(steps[v], args.warmup) for v in args.variants}
        print(diff_table(stats[args.variants[0]], stats[args.variants[1]], tuple(args.variants), args.top), flush=True)
        del steps
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
