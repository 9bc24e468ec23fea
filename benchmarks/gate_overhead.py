"""Cost of the gradient-similarity gate: the gated train step against the ungated one, side by side.

The gate measures its cosines once every ``every`` training calls, so one step says nothing: each
variant is timed over a block of ``BLOCK`` consecutive steps (a multiple of every ``every``
measured, so each block holds the same number of measurements), the blocks of all variants
interleaved in one process with the order rotated and reversed every repeat
(``overhead.time_interleaved``), and each ratio is taken within one repeat; the median over
repeats is reported. CPU time (``time.process_time``) is printed beside wall time because it is
much less sensitive to other processes on the cores.

Variants, all DSN at the automatic points of the evidence models (``examples/compare.py``), at their
evidence batch and input size: ``dsn`` (no gate) and ``gate/every=N`` with the exact form (the
default, ``wrt="parameters"``) for N in 1, 5, 25, plus ``feature/every=25``, the cheap form.
The target (issue 30): at most 1.10x at ``every=25``.

Usage:
    python benchmarks/gate_overhead.py --threads 1
    python benchmarks/gate_overhead.py --models unet --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["BLOCK", "build_variants", "main"]

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 25  # steps per timed block: every=1, 5 and 25 measure 25, 5 and 1 times in it
EVERY = (1, 5, 25)


def build_variants(model_name: str) -> dict[str, Callable[[], None]]:
    """One function per variant that runs ``BLOCK`` train steps of DSN on ``model_name`` (an evidence model).

    Args:
        model_name: ``unet``, ``deeplabv3plus``, ``resnet18n`` or ``vit``.

    Returns:
        Variant name -> a block of steps.

    Example:
        >>> sorted(build_variants("vit"))
        ['dsn', 'feature/every=25', 'gate/every=1', 'gate/every=25', 'gate/every=5']
    """
    import torch

    import autoprobe
    from autoprobe.losses import Gate

    compare = _compare()
    task = "seg" if model_name in ("unet", "deeplabv3plus") else "cls"
    size = compare.input_size(task, compare.SegConfig())
    batch = compare.SEG_BATCH if task == "seg" else compare.CLS_BATCH
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *size, generator=gen)
    classes = compare.NUM_SEG_CLASSES if task == "seg" else 10
    y = torch.randint(0, classes, (batch, *size[1:]) if task == "seg" else (batch,), generator=gen)
    rules = "dense" if task == "seg" else "default"
    gates: dict[str, Gate | None] = {"dsn": None}
    gates.update({f"gate/every={n}": Gate("cosine", every=n) for n in EVERY})
    gates["feature/every=25"] = Gate("cosine", every=25, wrt="feature")
    variants = {}
    for name, gate in gates.items():
        torch.manual_seed(0)
        # Linear heads, as BENCHMARKS.md's table was measured (instrument's default was linear then).
        probed = autoprobe.instrument(compare.build_model(model_name), input_size=size, loss="dsn", rules=rules,
                                      loss_options=autoprobe.LossOptions(gate=gate, head="linear"))
        probed.train()
        variants[name] = _block(probed, torch.optim.AdamW(probed.parameters(), lr=1e-3), x, y)
    return variants


def _block(probed, optimizer, x, y) -> Callable[[], None]:  # noqa: ANN001 - torch types, imported lazily
    def run() -> None:
        for _ in range(BLOCK):
            optimizer.zero_grad(set_to_none=True)
            total, _ = probed.loss(probed(x), y)
            total.backward()
            optimizer.step()

    return run


def _compare():
    """``examples/compare.py``, imported from its file (the evidence models and their sizes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_evidence_compare", ROOT / "examples" / "compare.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    examples = str(ROOT / "examples")
    added = examples not in sys.path
    if added:
        sys.path.insert(0, examples)  # compare imports its sibling segdata; removed again below
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        if added:
            sys.path.remove(examples)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["unet", "vit"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from overhead import time_interleaved  # the sibling benchmark's interleaved timer

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), blocks of {BLOCK} steps, {args.repeats} repeats")
    for model_name in args.models:
        variants = build_variants(model_name)
        times = time_interleaved(variants, repeats=args.repeats, warmup=1)
        base = times["dsn"]
        print(f"\n{model_name}: DSN block {statistics.median(base.wall):.2f} s wall, "
              f"{statistics.median(base.cpu):.2f} s cpu")
        print(f"  {'variant':<18} {'wall ratio':>10} {'cpu ratio':>10}")
        for name, t in times.items():
            if name == "dsn":
                continue
            wall = statistics.median(a / b for a, b in zip(t.wall, base.wall))
            cpu = statistics.median(a / b for a, b in zip(t.cpu, base.cpu))
            print(f"  {name:<18} {wall:>9.3f}x {cpu:>9.3f}x")
    return 0


if __name__ == "__main__":
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling overhead.py
    raise SystemExit(main())
