"""``autoprobe.inspect`` analysis time against a bare fx trace plus ShapeProp of the same model.

The reference is the least a tool that reads shapes from a graph must do: ``torch.fx`` symbolic
trace with timm's leaf modules and autowrap functions (without them timm models do not trace),
then ``torch.fx.passes.shape_prop.ShapeProp`` on a meta tensor, on the same meta-device model.
``inspect`` does that and builds the layer graph, runs the seven detectors and selects the points.
Both run in one process, interleaved (order alternating every repeat) on the same model object;
one ratio per repeat, median over repeats, wall and CPU time.

Usage:
    python benchmarks/analysis_ratio.py                         # resnet50, vit_small_patch16_224, convnext_tiny, efficientnet_b0
    python benchmarks/analysis_ratio.py --models resnet18 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

__all__ = ["bare_trace", "main"]


def bare_trace(model, size: tuple[int, ...]) -> int:  # noqa: ANN001
    """fx trace (timm's leaves and autowrap functions) + ShapeProp on meta; returns the node count."""
    import torch
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torch import fx
    from torch.fx.passes.shape_prop import ShapeProp

    leaves = tuple(get_notrace_modules())

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):  # noqa: ANN001, ANN201
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    tracer = Tracer(autowrap_functions=tuple(get_notrace_functions()))
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    ShapeProp(gm).propagate(torch.empty(2, *size, device="meta"))
    return len(graph.nodes)


def _time(fn: Callable[[], object]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+",
                        default=["resnet50", "vit_small_patch16_224", "convnext_tiny", "efficientnet_b0"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import timm
    import torch

    import autoprobe

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, timm {timm.__version__}, threads={torch.get_num_threads()}, "
          f"repeats={args.repeats}, load average at start {os.getloadavg()[0]:.1f}")
    print("| model | inspect / (fx trace + ShapeProp), wall | same, CPU | inspect s (median wall) | trace+ShapeProp s |")
    print("|---|---|---|---|---|")
    for name in args.models:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        size = tuple(model.pretrained_cfg["input_size"])
        variants = {"inspect": lambda: autoprobe.inspect(model, input_size=size),
                    "bare": lambda: bare_trace(model, size)}
        for fn in variants.values():  # warm-up: imports, first-call caches
            fn()
        times = {k: ([], []) for k in variants}
        for i in range(args.repeats):
            for k in (list(variants) if i % 2 == 0 else list(reversed(variants))):
                w, c = _time(variants[k])
                times[k][0].append(w)
                times[k][1].append(c)
        ratio = [statistics.median(a / b for a, b in zip(times["inspect"][j], times["bare"][j])) for j in (0, 1)]
        print(f"| {name} | {ratio[0]:.2f} | {ratio[1]:.2f} | {statistics.median(times['inspect'][0]):.2f} "
              f"| {statistics.median(times['bare'][0]):.2f} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
