"""The long fuzz run of issue 12: thousands of random small models through the whole pipeline.

    python benchmarks/fuzz.py --models 2400            # 200 seeds x 12 families, one thread
    python benchmarks/fuzz.py --models 120 --start 5000 # another slice of seeds
    python benchmarks/fuzz.py --models 200 --start 100 --families control  # one family

Prints, per family, how many models kept every guarantee (``ok``), were refused with an
``AutoprobeError`` (``refused``), broke a guarantee (``BROKEN``) or crashed with another exception
(``CRASH``), then every failure with its family and seed (``fuzz_models.build(family, seed)``
rebuilds it). Exits 1 when anything broke or crashed. The guarantees are those of
``tests/fuzz_models.check``; ``tests/test_fuzz.py`` runs a fixed 100-model slice in CI.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzz_models import FAMILIES, Broken, build, check  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=2400, help="number of models (spread over the families)")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES, help="families to build")
    args = parser.parse_args(argv)
    families = tuple(args.families)
    torch.set_num_threads(1)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    failures: list[str] = []
    started = time.time()
    for i in range(args.models):
        family = families[i % len(families)]
        seed = args.start + i // len(families)
        try:
            outcome = check(build(family, seed)).split(":")[0]
        except Broken as exc:
            outcome = "BROKEN"
            failures.append(f"{family} seed {seed}: BROKEN {exc}")
        except Exception as exc:  # a crash: anything but an AutoprobeError
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            outcome = "CRASH"
            failures.append(f"{family} seed {seed}: CRASH {type(exc).__name__}: {str(exc)[:300]} "
                            f"({Path(frame.filename).name}:{frame.lineno})")
        counts[(family, outcome)] += 1
        if (i + 1) % 100 == 0:
            print(f"{i + 1} models, {time.time() - started:.0f} s, {len(failures)} failures", flush=True)
    print(f"\n{args.models} models in {time.time() - started:.0f} s")
    print(f"{'family':<12} {'ok':>5} {'refused':>8} {'BROKEN':>7} {'CRASH':>6}")
    for family in families:
        row = [counts[(family, k)] for k in ("ok", "refused", "BROKEN", "CRASH")]
        print(f"{family:<12} {row[0]:>5} {row[1]:>8} {row[2]:>7} {row[3]:>6}")
    for line in failures:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
