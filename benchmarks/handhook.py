"""The instrumented training step against the same thing written by hand with forward hooks.

What a person writes without autoprobe: forward hooks on the modules at the supervision points
store the features, the same adapters map them to logits, the same objective
(``probed.objective``, iMacHSR by default: CE + MI + NE per point) gives the loss. The heads are
deep copies of the probed model's adapters (same weights, same architecture) and the points are
the probed model's, so the two variants compute the same loss on the same tensors; the only
difference is the plumbing (autoprobe's tapped fx graph, or its hook taps on a fallback backend,
against plain ``register_forward_hook``). A third variant, the plain step (CE on the output
only), gives the total cost of deep supervision.

A point that is not a module's own output (``blocks.3.add``: the residual sum after attention) is
hooked the way a person would: with a forward hook on the enclosing module when it is that module's
last node, otherwise with a forward *pre*-hook on the module that consumes it (``blocks.3.norm2``).
The script checks once that the hand-written features and the probed ones are equal.

With ``--compile``, a fourth variant, ``compiled``: the autoprobe step with forward and loss compiled
as one graph (``torch.compile(fullgraph=True)``, inductor), its backward AOTAutograd's compiled graph,
the SGD step eager; the first call (the compile) is timed apart.

Timing is ``overhead.py``'s: variants interleaved in one process on the same batch, order rotated
and reversed every repeat, one ratio per repeat, median over repeats (wall and CPU time). CPU time is
also split into user time (the step's own work) and system time with the minor page faults behind
it: with glibc's default malloc, a step's system time swings from 0.1 s to 1.5 s on resnet50 as the
allocator returns freed blocks to the kernel and faults fresh zeroed pages back in, whatever the
step's code. ``--steady-malloc`` reruns the script with glibc's mmap and trim thresholds fixed
(``MALLOC_MMAP_THRESHOLD_`` 32 MiB, the largest glibc takes; ``MALLOC_TRIM_THRESHOLD_`` 64 GiB), so
freed blocks below 32 MiB are reused instead of faulted in again, and the variants are compared on
their own work.

Usage:
    python benchmarks/handhook.py                                  # resnet50, vit_small_patch16_224, batch 32
    python benchmarks/handhook.py --models resnet18 --batch 8 --repeats 3
    python benchmarks/handhook.py --models resnet50 --compile                 # adds the compiled step
    python benchmarks/handhook.py --steady-malloc                             # allocator page faults out
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script: overhead.py is a sibling
from overhead import time_interleaved  # noqa: E402

__all__ = ["Setup", "setup", "hand_step", "compiled_step", "build", "main", "STEADY_MALLOC"]

# glibc's largest mmap threshold (fixed, so it no longer adapts) and a trim threshold no step reaches.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


def _hook_plan(probed, analysis_graph) -> list[tuple[str, str, str]]:  # noqa: ANN001
    """(point, module path, "post" | "pre") for each point."""
    model = probed.strip()
    modules = dict(model.named_modules())
    plan = []
    for p in probed.selection.points:
        if p.name in modules:
            plan.append((p.name, p.name, "post"))
            continue
        inside = [i for i in analysis_graph.ordered if i.module_path == p.module_path or
                  i.module_path.startswith(p.module_path + ".")]
        if inside and max(inside, key=lambda i: i.order).name == p.name and p.module_path in modules:
            plan.append((p.name, p.module_path, "post"))
            continue
        # A submodule that reads this tensor as its input (fx may have traced into it: blocks.3.norm2.layer_norm).
        consumers = [s.target if s.op == "call_module" else s.module_path for s in analysis_graph.successors(p.name)]
        consumers = [c for c in consumers if c in modules and c != p.module_path and c.startswith(p.module_path)]
        if not consumers:
            raise SystemExit(f"point {p.name}: no module output or consuming module to hook")
        plan.append((p.name, consumers[0], "pre"))
    return plan


def hand_step(model, adapters, keys, plan, objective, optimizer, x, y) -> Callable[[], None]:  # noqa: ANN001
    """The hand-written step: hooks on, forward, heads, objective, backward, update, hooks off."""
    modules = dict(model.named_modules())

    def step() -> None:
        feats = {}
        handles = []
        for point, path, kind in plan:
            if kind == "post":
                handles.append(modules[path].register_forward_hook(
                    lambda m, i, o, point=point: feats.__setitem__(point, o)))
            else:
                handles.append(modules[path].register_forward_pre_hook(
                    lambda m, i, point=point: feats.__setitem__(point, i[0])))
        try:
            out = model(x)
        finally:
            for h in handles:
                h.remove()
        heads = {point: adapters[keys[point]](feats[point]) for point, _, _ in plan}
        total, _ = objective(out, heads, feats, y)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    return step


class Setup(NamedTuple):
    """One model, its probed form and a batch, shared by every variant.

    Attributes:
        model: the timm model (``pretrained=False``), trained in place by every variant.
        probed: ``autoprobe.instrument(model)`` with the given loss.
        x: the input batch.
        y: its class ids.
        plan: (point, module path, ``"post"`` | ``"pre"``) for the hand-written hooks.
    """

    model: Any
    probed: Any
    x: Any
    y: Any
    plan: list[tuple[str, str, str]]


def setup(name: str, batch: int, loss: str) -> Setup:
    """Build the model, instrument it, draw the batch (seed 0) and plan the hand-written hooks."""
    import timm
    import torch

    import autoprobe
    from autoprobe.api import analyze

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    size = tuple(model.pretrained_cfg["input_size"])
    x = torch.randn(batch, *size)
    y = torch.randint(0, model.num_classes, (batch,))
    probed = autoprobe.instrument(model, input_size=size, loss=loss)
    plan = _hook_plan(probed, analyze(model, input_size=size).graph)
    return Setup(model, probed, x, y, plan)


def compiled_step(probed, optimizer, x, y) -> Callable[[], None]:  # noqa: ANN001
    """The autoprobe step with forward and loss compiled as one graph (``torch.compile(fullgraph=True)``).

    The backward is AOTAutograd's compiled backward graph of that same graph; the optimizer step
    (SGD, foreach) runs eagerly: compiling it gains nothing measurable on CPU, and it costs compile time.
    """
    import torch

    def forward_and_loss(x, y):  # noqa: ANN001, ANN202
        return probed.loss(probed(x), y).total

    compiled = torch.compile(forward_and_loss, fullgraph=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        compiled(x, y).backward()
        optimizer.step()

    return step


def build(name: str, batch: int, loss: str, compile_variant: bool = False) -> tuple[dict[str, Callable[[], None]], str]:
    """plain / hand / autoprobe (and ``compiled``) step functions on one timm model and batch."""
    import torch
    import torch.nn.functional as F

    model, probed, x, y, plan = setup(name, batch, loss)
    # Same heads, same weights; keyed like the probed model's ModuleDict.
    keys = dict(zip(probed.selection.names, probed.autoprobe_adapters.keys()))
    adapters = copy.deepcopy(probed.autoprobe_adapters)
    objective = probed.objective

    plain_opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    probed_opt = torch.optim.SGD(probed.parameters(), lr=1e-3, momentum=0.9)
    hand_opt = torch.optim.SGD(list(model.parameters()) + list(adapters.parameters()), lr=1e-3, momentum=0.9)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        plain_opt.step()

    def auto() -> None:
        probed_opt.zero_grad(set_to_none=True)
        total, _ = probed.loss(probed(x), y)
        total.backward()
        probed_opt.step()

    # Check once that the hand-written hooks read the same tensors as autoprobe's taps.
    model.eval()
    probed.eval()
    with torch.no_grad():
        ref = probed(x[:2]).features
        feats = {}
        modules = dict(model.named_modules())
        hs = [modules[path].register_forward_hook(lambda m, i, o, p=p: feats.__setitem__(p, o)) if kind == "post" else
              modules[path].register_forward_pre_hook(lambda m, i, p=p: feats.__setitem__(p, i[0]))
              for p, path, kind in plan]
        model(x[:2])
        for h in hs:
            h.remove()
    for p in ref:
        if not torch.equal(ref[p], feats[p]):
            raise SystemExit(f"{name}: the hand-written hook at {p} does not read autoprobe's feature")
    model.train()
    probed.train()
    where = ", ".join(f"{p} ({'pre-hook on ' if k == 'pre' else 'hook on '}{m})" for p, m, k in plan)
    steps = {"plain": plain, "hand": hand_step(model, adapters, keys, plan, objective, hand_opt, x, y), "autoprobe": auto}
    if compile_variant:
        compiled_opt = torch.optim.SGD(probed.parameters(), lr=1e-3, momentum=0.9)
        steps["compiled"] = compiled_step(probed, compiled_opt, x, y)
    return steps, f"{name}: backend {probed.selection.backend}, {len(plan)} points: {where}"


def _median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--loss", default="imachsr")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steady-malloc", action="store_true",
                        help="rerun with glibc's mmap/trim thresholds fixed (see the module docstring)")
    parser.add_argument("--compile", action="store_true",
                        help="add the variant `compiled`: torch.compile of forward + loss (fullgraph), compiled backward")
    args = parser.parse_args(argv)
    if args.steady_malloc and any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        # glibc reads these once, when the process starts: only a fresh process gets them.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})

    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}, loss={args.loss}, "
          f"repeats={args.repeats}, warmup={args.warmup}, load average at start {os.getloadavg()[0]:.1f}, "
          f"malloc env {({k: v for k, v in os.environ.items() if k.startswith('MALLOC_')}) or 'default'}", flush=True)
    header = ("| model | autoprobe / hand (wall) | autoprobe / hand (CPU) | autoprobe / hand (user CPU) "
              "| autoprobe / plain (wall) | autoprobe / plain (CPU) | hand / plain (CPU) "
              "| step s: plain / hand / autoprobe (median wall) | system s: plain / hand / autoprobe (median) "
              "| page faults, thousands: plain / hand / autoprobe (median) |")
    if args.compile:
        header += " compiled / autoprobe (wall, CPU) | compiled / hand (wall, CPU) | compiled step s | first call s, wall / CPU (compiles) |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    notes = []
    raw = []
    for name in args.models:
        steps, note = build(name, args.batch, args.loss, compile_variant=args.compile)
        notes.append(note)
        compile_s = compile_cpu = 0.0
        if args.compile:
            start, start_cpu = time.perf_counter(), time.process_time()
            steps["compiled"]()  # the first call compiles
            compile_s, compile_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        t = time_interleaved(steps, args.repeats, args.warmup)
        med = {k: statistics.median(v.wall) for k, v in t.items()}
        trio = ("plain", "hand", "autoprobe")
        row = (f"| {name} | {_median_ratio(t['autoprobe'].wall, t['hand'].wall):.3f} "
               f"| {_median_ratio(t['autoprobe'].cpu, t['hand'].cpu):.3f} "
               f"| {_median_ratio(t['autoprobe'].user, t['hand'].user):.3f} "
               f"| {_median_ratio(t['autoprobe'].wall, t['plain'].wall):.3f} "
               f"| {_median_ratio(t['autoprobe'].cpu, t['plain'].cpu):.3f} "
               f"| {_median_ratio(t['hand'].cpu, t['plain'].cpu):.3f} "
               f"| {med['plain']:.2f} / {med['hand']:.2f} / {med['autoprobe']:.2f} "
               f"| {' / '.join(f'{statistics.median(t[k].system):.2f}' for k in trio)} "
               f"| {' / '.join(f'{statistics.median(t[k].faults) / 1000:.0f}' for k in trio)} |")
        if args.compile:
            row += (f" {_median_ratio(t['compiled'].wall, t['autoprobe'].wall):.3f}, "
                    f"{_median_ratio(t['compiled'].cpu, t['autoprobe'].cpu):.3f} "
                    f"| {_median_ratio(t['compiled'].wall, t['hand'].wall):.3f}, "
                    f"{_median_ratio(t['compiled'].cpu, t['hand'].cpu):.3f} "
                    f"| {med['compiled']:.2f} | {compile_s:.0f} / {compile_cpu:.0f} |")
        print(row, flush=True)
        raw.append({"model": name, "threads": args.threads,
                    **{f"{k}_{kind}": [round(v, 3) for v in getattr(times, kind)]
                       for k, times in t.items() for kind in ("wall", "cpu", "user", "system", "faults")}})
        del steps
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    for n in notes:
        print(n)
    for r in raw:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
