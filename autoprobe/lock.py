"""Lockfiles: the chosen supervision points as a reviewed, committed artifact.

Deep supervision changes what a model learns, so the points it is attached to
must not move silently when torch, timm, a rule pack or autoprobe itself is
upgraded. ``lock_models`` (``autoprobe lock``) writes the selection of each
model into a canonical JSON file that goes into version control;
``check_lock`` (``autoprobe check``) recomputes every entry with the settings
recorded in it and reports what moved. The CLI and the pytest plugin are thin
layers over these two functions.

The jobs live in one module each: ``lockfile`` (the typed records and their
canonical JSON), ``lockentry`` (one model analysed into an entry),
``lockdiff`` (what changed between two entries), ``lockconfig`` (the
``[tool.autoprobe]`` table and the settings precedence) and ``lockpool``
(computing many entries in worker processes). This module plans, writes and
checks whole locks.

``check`` fails when a selection differs; context is printed but never fails
by itself: library ``versions``, the rule pack's hash, a rule's reworded
reason and ``notes`` (see ``lockdiff``).

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "models.lock")
    >>> run = lock_models(["resnet18"], output=path, pyproject=None)
    >>> run.written, [o.key for o in run.failed]
    (True, [])
    >>> check_lock(path).failed
    ()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LockError
from .lockconfig import ModelRequest, ProjectConfig, is_given, load_config, resolve_settings
from .lockdiff import diff_entries, version_changes
from .lockentry import entry_from_analysis, lock_entry, versions
from .lockfile import DEFAULT_LOCKFILE, Lock, LockEntry, LockSettings, read_lock, resolve_rules, save_lock
from .lockpool import LockJob, Outcome, compute_entries

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "LockPlan",
    "LockRun",
    "plan_lock",
    "run_lock",
    "lock_models",
    "ModelReport",
    "CheckResult",
    "lockfile_path",
    "check_lock",
    "stale_models",
    "mode_diff",
    # The records and the one-model call, so that `from autoprobe.lock import ...` is the only import needed.
    "LockSettings",
    "LockEntry",
    "Lock",
    "lock_entry",
    "entry_from_analysis",
]

PathLike = str | Path


def lockfile_path(path: PathLike | None, config: ProjectConfig | None) -> Path:
    """The lockfile a command works on: the one given, else ``[tool.autoprobe] lockfile``, else ``autoprobe.lock``.

    Example:
        >>> lockfile_path(None, None)
        PosixPath('autoprobe.lock')
    """
    if path is not None:
        return Path(path)
    return config.lockfile if config is not None else Path(DEFAULT_LOCKFILE)


def _config(pyproject: PathLike | ProjectConfig | None) -> ProjectConfig | None:
    if pyproject is None or isinstance(pyproject, ProjectConfig):
        return pyproject
    return load_config(pyproject)


# -------------------------------------------------------------------------------------------- lock


@dataclass(frozen=True)
class LockPlan:
    """What ``run_lock`` computes and where it writes.

    Attributes:
        path: the lockfile.
        jobs: one ``LockJob`` per model, settings resolved and rules paths stored relative to ``path``.
    """

    path: Path
    jobs: tuple[LockJob, ...]


@dataclass(frozen=True)
class LockRun:
    """The result of writing a lock.

    Attributes:
        path: the lockfile.
        outcomes: key -> ``Outcome``, in the order of the plan.
        written: the file was written (at least one model succeeded).
    """

    path: Path
    outcomes: Mapping[str, Outcome]
    written: bool

    @property
    def entries(self) -> dict[str, LockEntry]:
        """The entries that were locked."""
        return {k: o.entry for k, o in self.outcomes.items() if o.entry is not None}

    @property
    def failed(self) -> list[Outcome]:
        """The models that could not be locked (they are not in the file)."""
        return [o for o in self.outcomes.values() if o.entry is None]


def plan_lock(
    models: Sequence[str | ModelRequest] = (),
    *,
    output: PathLike | None = None,
    overrides: ModelRequest | None = None,
    pyproject: PathLike | ProjectConfig | None = "pyproject.toml",
) -> LockPlan:
    """Decide which models to lock, with which settings, into which file.

    Args:
        models: model specs (or requests with their own settings); empty means the models of
            ``[tool.autoprobe]``. A spec that the pyproject lists keeps its table's settings.
        output: the lockfile; defaults to ``[tool.autoprobe] lockfile``, else ``autoprobe.lock``.
        overrides: settings that win over everything else (the command-line options), for every model.
        pyproject: the pyproject file (or a loaded config) to read ``[tool.autoprobe]`` from;
            ``None`` reads none.

    Returns:
        The ``LockPlan``; nothing is computed yet.

    Raises:
        LockError: no model given nor configured, the lockfile's folder does not exist, or the
            pyproject table is malformed.
        RuleError: a rule pack named by a setting cannot be loaded (checked once, before any model).

    Example:
        >>> plan = plan_lock(["resnet18"], output="x.lock", overrides=ModelRequest("", mode="train"), pyproject=None)
        >>> plan.path, plan.jobs[0].settings.mode
        (PosixPath('x.lock'), 'train')
    """
    from .rules import load_rules

    config = _config(pyproject)
    configured = {m.spec: m for m in config.models} if config is not None else {}
    if models:
        requests = []
        for model in models:
            request = model if isinstance(model, ModelRequest) else configured.get(model.strip(), ModelRequest(model.strip()))
            if request.spec not in {r.spec for r in requests}:
                requests.append(request)
    elif config is not None and config.models:
        requests = list(config.models)
    else:
        where = str(config.path) if config is not None else "./pyproject.toml"
        raise LockError(
            f"no MODEL given and {where} has no [tool.autoprobe] models. "
            "Hint: `autoprobe lock resnet50 vit_tiny_patch16_224 -o autoprobe.lock`, or add "
            "`models = [\"resnet50\"]` under [tool.autoprobe] in pyproject.toml."
        )
    path = lockfile_path(output, config)
    lock_dir = path.parent
    if not lock_dir.resolve().is_dir():
        raise LockError(f"cannot write lockfile {str(path)!r}: folder {str(lock_dir)!r} does not exist. Hint: create it first.")
    defaults = config.defaults if config is not None else None
    jobs = tuple(
        LockJob(r.spec, r.spec, resolve_settings(r, cli=overrides, defaults=defaults, lock_dir=lock_dir)) for r in requests
    )
    for rules in sorted({job.settings.rules for job in jobs}):
        load_rules(resolve_rules(rules, lock_dir))  # a bad pack fails once, before any model is computed
    return LockPlan(path, jobs)


def run_lock(plan: LockPlan, *, workers: int = 1, on_done: Callable[[Outcome], None] | None = None) -> LockRun:
    """Compute every entry of a plan and write the lockfile (when at least one model succeeded).

    Args:
        plan: from ``plan_lock``.
        workers: worker processes, one thread each; 1 computes in this process.
        on_done: called with each ``Outcome`` as it completes.

    Returns:
        The ``LockRun``. Failed models are left out of the file; the others are written either way.

    Raises:
        LockError: the file cannot be written.
    """
    outcomes = compute_entries(plan.jobs, workers=workers, base_dir=plan.path.parent, on_done=on_done)
    entries = {k: o.entry for k, o in outcomes.items() if o.entry is not None}
    if entries:
        save_lock(plan.path, Lock(entries, versions()))
    return LockRun(plan.path, outcomes, bool(entries))


def lock_models(
    models: Sequence[str | ModelRequest] = (),
    *,
    output: PathLike | None = None,
    overrides: ModelRequest | None = None,
    pyproject: PathLike | ProjectConfig | None = "pyproject.toml",
    workers: int = 1,
    on_done: Callable[[Outcome], None] | None = None,
) -> LockRun:
    """Lock models: ``plan_lock`` then ``run_lock`` (what ``autoprobe lock`` does).

    Args:
        models, output, overrides, pyproject: see ``plan_lock``.
        workers, on_done: see ``run_lock``.

    Returns:
        The ``LockRun``.

    Example:
        >>> import tempfile, os
        >>> run = lock_models(["resnet18"], output=os.path.join(tempfile.mkdtemp(), "x.lock"), pyproject=None)
        >>> run.entries["resnet18"].depth
        18
    """
    plan = plan_lock(models, output=output, overrides=overrides, pyproject=pyproject)
    return run_lock(plan, workers=workers, on_done=on_done)


# ------------------------------------------------------------------------------------------- check


@dataclass(frozen=True)
class ModelReport:
    """How one locked model compares with its recomputation (``autoprobe check``).

    Attributes:
        key: the model's key.
        changes: selection changes (a failure); empty when identical.
        context: rule-pack differences, reworded reasons, notes (never a failure).
        error: why the model could not be recomputed (a failure); ``""`` otherwise.
    """

    key: str
    changes: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    error: str = ""

    @property
    def failed(self) -> bool:
        """The model's selection changed or could not be recomputed."""
        return bool(self.changes or self.error)


@dataclass(frozen=True)
class CheckResult:
    """Everything ``autoprobe check`` found.

    Attributes:
        path: the lockfile.
        reports: one ``ModelReport`` per locked model, in key order.
        versions: library version differences (context).
        updated: the lock as ``--update`` rewrites it (failed models keep their entry).
        stale: models ``[tool.autoprobe]`` asks for that the lock lacks or records with other
            settings (only when the config's lockfile was checked).
    """

    path: Path
    reports: tuple[ModelReport, ...]
    versions: tuple[str, ...]
    updated: Lock
    stale: tuple[str, ...] = ()

    @property
    def failed(self) -> tuple[ModelReport, ...]:
        """The models whose selection changed or could not be recomputed."""
        return tuple(r for r in self.reports if r.failed)


def check_lock(
    path: PathLike | None = None,
    *,
    pyproject: PathLike | ProjectConfig | None = None,
    workers: int = 1,
    on_done: Callable[[Outcome], None] | None = None,
) -> CheckResult:
    """Recompute every model of a lockfile with its recorded settings and compare.

    Args:
        path: the lockfile; defaults to ``[tool.autoprobe] lockfile`` of ``pyproject``, else ``autoprobe.lock``.
        pyproject: a pyproject file (or a loaded config); when its lockfile is the one checked,
            models it lists with other settings, or not at all, are reported as ``stale``.
        workers: worker processes (1 computes in this process).
        on_done: progress callback, called once per model.

    Returns:
        The ``CheckResult``; nothing is written (``save_lock(result.path, result.updated)`` updates).

    Raises:
        LockError: the lockfile is missing or malformed.
    """
    config = _config(pyproject)
    path = lockfile_path(path, config)
    lock = read_lock(path)
    jobs = [LockJob(key, key, entry.settings) for key, entry in lock.entries.items()]
    outcomes = compute_entries(jobs, workers=workers, base_dir=path.parent, on_done=on_done)
    reports, entries = [], {}
    for key in sorted(lock.entries):
        old, outcome = lock.entries[key], outcomes[key]
        if outcome.entry is None:
            reports.append(ModelReport(key, error=outcome.error))
            entries[key] = old
            continue
        diff = diff_entries(old, outcome.entry)
        reports.append(ModelReport(key, diff.changes, diff.context))
        entries[key] = outcome.entry
    now = versions()
    stale: tuple[str, ...] = ()
    if config is not None and path.resolve() == config.lockfile.resolve():
        stale = tuple(stale_models(config, lock, path.parent))
    return CheckResult(path, tuple(reports), tuple(version_changes(lock.versions, now)), Lock(entries, now), stale)


def stale_models(config: ProjectConfig, lock: Lock, lock_dir: Path) -> list[str]:
    """Models ``[tool.autoprobe]`` asks for that the lock lacks or records with other settings.

    Only settings the pyproject states are compared (an input size left to the model's
    default is not), so a lock made from the pyproject is never stale.

    Args:
        config: the project config.
        lock: the lock.
        lock_dir: the lockfile's folder.

    Returns:
        One line per stale setting, naming the model and what differs.

    Example:
        >>> cfg = ProjectConfig(Path("pyproject.toml"), (ModelRequest("resnet18"),), Path("autoprobe.lock"))
        >>> stale_models(cfg, Lock({}, {}), Path("."))
        ['resnet18: listed in pyproject.toml but not in the lock; run `autoprobe lock`']
    """
    lines = []
    for request in config.models:
        entry = lock.entries.get(request.spec)
        if entry is None:
            lines.append(f"{request.spec}: listed in {config.path.name} but not in the lock; run `autoprobe lock`")
            continue
        stored = entry.settings.to_json()
        wanted = resolve_settings(request, defaults=config.defaults, lock_dir=lock_dir).to_json()
        for f in fields(LockSettings):
            name = f.name
            explicit = any(is_given(getattr(r, name)) for r in (request, config.defaults))
            if explicit and stored.get(name) != wanted.get(name):
                lines.append(
                    f"{request.spec}: {config.path.name} asks for {name} {wanted.get(name)!r}, the lock has "
                    f"{stored.get(name)!r}; run `autoprobe lock`"
                )
    return lines


def mode_diff(model: str | nn.Module, settings: LockSettings | None = None) -> list[str]:
    """How the train-mode selection differs from the eval-mode one; empty when they agree.

    Dropout, drop-path and BatchNorm change the traced graph between modes; a user who
    trains with deep supervision and locks the eval graph should know when that matters.

    Args:
        model: a spec or an ``nn.Module``.
        settings: every other setting (its ``mode`` is ignored).

    Returns:
        The selection changes from the eval entry to the train entry, the mode itself left out.

    Example:
        >>> mode_diff("resnet18")
        []
    """
    base = settings if settings is not None else LockSettings()
    evaluated, trained = (lock_entry(model, replace(base, mode=mode)) for mode in ("eval", "train"))
    trained = replace(trained, settings=replace(trained.settings, mode=evaluated.settings.mode))
    return list(diff_entries(evaluated, trained).changes)
