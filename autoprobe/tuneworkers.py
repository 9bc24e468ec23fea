"""``tune(workers=N)``: N spawned processes on this machine, each running ``tuneengine.work`` on the shared study.

Example:
    >>> from autoprobe.tuneworkers import check_picklable
    >>> check_picklable(2, model=None, score=abs)  # module-level functions pickle; lambdas do not
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from .errors import UsageError
from .tuneengine import Plan, WorkerStats, open_storage, optuna_module, pruner, work
from .tunetrain import RunnerSetup

__all__ = ["check_picklable", "spawn"]

# How long a spawned worker waits for the others to start (import torch, load the study) before failing.
_START_TIMEOUT_S = 600.0


def check_picklable(workers: int, **things: Any) -> None:
    """A ``UsageError`` naming the first of ``things`` (not None) that cannot be sent to a worker process."""
    for name, thing in things.items():
        if thing is None:
            continue
        try:
            pickle.dumps(thing)
        except Exception as exc:  # pickling raises PicklingError, AttributeError or TypeError
            raise UsageError(
                f"tune: workers={workers} trains candidates in other processes, so {name} must be picklable, "
                f"and it is not ({type(exc).__name__}: {exc}). Hint: define it at module level (no lambda or local "
                "function, no open file), or pass workers=1."
            ) from exc


def spawn(workers: int, payload: dict[str, Any], spec: tuple[str, str], name: str,
          say: Callable[[str], None]) -> list[WorkerStats]:
    """Runs ``workers`` processes of ``work`` on the shared study; their progress lines come back here.

    Args:
        workers: how many processes.
        payload: ``model``, ``train``, ``val``, ``weights``, ``setup`` (the ``Runner``'s ``RunnerSetup``),
            ``plan`` and ``threads`` (intra-op threads per worker).
        spec: the study's storage (``tuneengine.open_storage``).
        name: the study's name.
        say: where progress lines go.

    Returns:
        Each worker's ``WorkerStats``.

    Raises:
        UsageError: a worker raised one (re-raised here).
        RuntimeError: a worker failed otherwise, or died.
    """
    # spawn: a fresh interpreter per worker, so no forked copy of this process's threads or CUDA state.
    ctx = multiprocessing.get_context("spawn")
    lines, results = ctx.Queue(), ctx.Queue()
    # Workers start claiming together: the first to import torch would otherwise take every candidate
    # of a short first rung, and keep them all for the later rungs.
    start = ctx.Barrier(workers)
    procs = [ctx.Process(target=_worker_main, args=(payload, spec, name, lines, results, start, rank, workers))
             for rank in range(workers)]
    stats: list[WorkerStats] = []
    failures: list[tuple[BaseException | None, str]] = []
    try:
        for p in procs:
            p.start()
        # Stops at the first failure: the other workers would wait for its candidates forever.
        while len(stats) < workers and not failures:
            _drain(lines, say)
            try:
                kind, *rest = results.get(timeout=0.1)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    failures.append((None, f"a worker exited with code {dead[0]} (killed, or out of memory)"))
                continue
            (stats.append(rest[0]) if kind == "ok" else failures.append((rest[0], rest[1])))
        if not failures:
            for p in procs:
                p.join()
        _drain(lines, say)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    if failures:
        exc, text = failures[0]
        if isinstance(exc, UsageError):
            raise exc
        raise RuntimeError(f"tune: a worker process failed:\n{text}")
    return stats


def _drain(lines: Any, say: Callable[[str], None]) -> None:
    while True:
        try:
            say(lines.get_nowait())
        except queue.Empty:
            return


def _worker_main(payload: dict[str, Any], spec: tuple[str, str], name: str, lines: Any, results: Any, start: Any,
                 rank: int, size: int) -> None:
    """A worker process's entry point (module level, so spawn can import it)."""
    try:
        # The parent's intra-op thread count: kernels then split their sums the same way, so a
        # candidate's scores are the same whichever process trains it.
        torch.set_num_threads(payload["threads"])
        optuna = optuna_module()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        plan: Plan = payload["plan"]
        store = open_storage(optuna, spec)
        study = optuna.load_study(study_name=name, storage=store,
                                  sampler=optuna.samplers.RandomSampler(seed=payload["setup"].seed),
                                  pruner=pruner(optuna, plan.rung_steps, plan.eta))
        setup: RunnerSetup = payload["setup"]
        run = setup.runner(payload["model"], payload["train"], payload["val"], payload["weights"])
        start.wait(timeout=_START_TIMEOUT_S)
        stats = work(optuna, study, store, run, plan, lines.put, rank, size)
        results.put(("ok", stats._replace(cpu_s=time.process_time())))
    except BaseException as exc:  # reported to the parent, which raises it
        try:
            pickle.dumps(exc)
        except Exception:
            exc = None
        results.put(("error", exc, traceback.format_exc()))
