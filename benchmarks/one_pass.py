"""``instrument`` against one ``analyze`` of the same live model, and the fx traces one ``instrument`` makes.

``instrument(model)`` selects the points (one ``analyze``: an eval-mode trace) and builds the probed
model: a train-mode fx trace, compared node for node with the selection's eval trace and, when the
model's Python is the same program in both modes, shared with it (no second shape propagation, one
tapped graph for both modes). Both run in one process on the same
CPU model, interleaved (order alternating every repeat); one ratio per repeat, median over repeats.
fx traces and ``GraphModule.recompile`` calls are counted on one extra ``instrument`` call.

Usage:
    python benchmarks/one_pass.py                          # resnet50, vit_small_patch16_224, convnext_tiny
    python benchmarks/one_pass.py --models resnet18 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["count_calls", "main"]

MODELS = ("resnet50", "vit_small_patch16_224", "convnext_tiny")


def count_calls(run: Callable[[], Any]) -> tuple[int, int]:
    """fx traces (autoprobe's tracer) and ``GraphModule.recompile`` calls made by ``run()``."""
    from unittest import mock

    from torch import fx

    from autoprobe import fx_tracer

    counts = {"trace": 0, "recompile": 0}
    tracer_trace, recompile = fx_tracer.QualnameTracer.trace, fx.GraphModule.recompile

    def counted_trace(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        counts["trace"] += 1
        return tracer_trace(self, *args, **kwargs)

    def counted_recompile(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        counts["recompile"] += 1
        return recompile(self, *args, **kwargs)

    # Patched for this one call only, in this benchmark's own process: counting needs the hook.
    with mock.patch.object(fx_tracer.QualnameTracer, "trace", counted_trace), \
            mock.patch.object(fx.GraphModule, "recompile", counted_recompile):
        run()
    return counts["trace"], counts["recompile"]


def _seconds(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    """Print, per model, the instrument/analyze ratio (median) and the fx traces per instrument call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import timm
    import torch

    import autoprobe

    torch.manual_seed(0)
    ratios = []
    print(f"{'model':28} {'analyze s':>10} {'instrument s':>13} {'ratio':>6} {'fx traces':>10} {'recompiles':>11}")
    for name in args.models:
        model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg["input_size"])
        analyze = lambda: autoprobe.analyze(model, input_size=size)  # noqa: E731
        instrument = lambda: autoprobe.instrument(model, input_size=size)  # noqa: E731
        instrument()  # warm-up: imports, caches
        pairs = []
        for repeat in range(args.repeats):
            order = (analyze, instrument) if repeat % 2 == 0 else (instrument, analyze)
            times = {fn: _seconds(fn) for fn in order}
            pairs.append((times[analyze], times[instrument]))
        ratio = statistics.median(i / a for a, i in pairs)
        traces, recompiles = count_calls(instrument)
        ratios.append(ratio)
        a_s = statistics.median(a for a, _ in pairs)
        i_s = statistics.median(i for _, i in pairs)
        print(f"{name:28} {a_s:10.3f} {i_s:13.3f} {ratio:6.2f} {traces:10d} {recompiles:11d}")
    print(f"median instrument/analyze over {len(ratios)} models: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
