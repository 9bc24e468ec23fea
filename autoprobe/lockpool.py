"""Computing many lock entries, in this process or in worker processes.

A failing model never stops the others: every failure comes back as data in
its ``Outcome`` (exceptions raised by a model's own code may not pickle).

Example:
    >>> from autoprobe.lockfile import LockSettings
    >>> outcomes = compute_entries([LockJob("resnet18", "resnet18", LockSettings())])
    >>> outcomes["resnet18"].error, outcomes["resnet18"].entry.depth
    ('', 18)
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .errors import AutoprobeError
from .lockentry import lock_entry
from .lockfile import LockEntry, LockSettings

__all__ = ["LockJob", "Outcome", "compute_entries"]


class LockJob(NamedTuple):
    """One entry to compute.

    Attributes:
        key: the model's key in the lock.
        spec: the model spec to build.
        settings: how to analyse it.
    """

    key: str
    spec: str
    settings: LockSettings


@dataclass(frozen=True)
class Outcome:
    """The result of computing one model's entry, in this process or a worker.

    Attributes:
        key: the model's key in the lock (its spec).
        entry: the entry, or ``None`` when it failed.
        error: the failure in one line (plus a hint for user errors); ``""`` on success.
        user_error: the failure was an ``AutoprobeError`` (bad spec, size, untraceable model).
        seconds: wall time spent on the model.
    """

    key: str
    entry: LockEntry | None
    error: str = ""
    user_error: bool = False
    seconds: float = 0.0


def _compute(job: LockJob, base_dir: Path | None) -> Outcome:
    """Worker body: one model, every failure turned into data."""
    start = time.perf_counter()
    try:
        entry = lock_entry(job.spec, job.settings, base_dir=base_dir)
    except AutoprobeError as exc:
        return Outcome(job.key, None, str(exc), True, time.perf_counter() - start)
    except Exception as exc:  # a model's own code can raise anything; report it, keep going
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" at {frame.filename}:{frame.lineno}" if frame else ""
        return Outcome(job.key, None, f"{type(exc).__name__}: {exc}{where} (an autoprobe bug? please report it)", False,
                       time.perf_counter() - start)
    return Outcome(job.key, entry, seconds=time.perf_counter() - start)


def _init_worker() -> None:
    """Each worker computes one model at a time on one thread: N workers use N cores, not N x cores."""
    import torch

    torch.set_num_threads(1)


def _context() -> multiprocessing.context.BaseContext:
    # Never fork a process that may hold torch threads; forkserver imports torch once and forks clean workers.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["autoprobe.lockpool", "autoprobe.api", "timm"])
        return ctx
    return multiprocessing.get_context("spawn")


def compute_entries(
    jobs: Sequence[LockJob],
    *,
    workers: int = 1,
    base_dir: Path | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> dict[str, Outcome]:
    """Compute many entries, optionally in worker processes.

    Args:
        jobs: one ``LockJob`` per model.
        workers: worker processes; 1 (or fewer) computes in this process.
        base_dir: the folder relative rules paths in the settings are relative to.
        on_done: called with each ``Outcome`` as it completes (drives a progress bar).

    Returns:
        key -> ``Outcome``, in the order of ``jobs``.
    """
    done: dict[str, Outcome] = {}

    def finish(outcome: Outcome) -> None:
        done[outcome.key] = outcome
        if on_done is not None:
            on_done(outcome)

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            finish(_compute(job, base_dir))
    else:
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=_context(), initializer=_init_worker) as pool:
            futures = {pool.submit(_compute, job, base_dir): job.key for job in jobs}
            for future in as_completed(futures):
                try:
                    finish(future.result())
                except BrokenProcessPool:
                    finish(Outcome(futures[future], None, "the worker process died (out of memory, or a crash in "
                                   "native code); rerun with --jobs 1 to see where"))
    return {job.key: done[job.key] for job in jobs}
