"""Lockfiles: the chosen supervision points as a reviewed, committed artifact.

Deep supervision changes what a model learns, so the points it is attached to
must not move silently when torch, timm, a rule pack or autoprobe itself is
upgraded. ``autoprobe lock`` writes the selection of each model into a
canonical JSON file that goes into version control; ``autoprobe check``
recomputes every entry with the settings recorded in it and prints a readable
diff when anything moved. The pytest plugin stores the same entries as
snapshot baselines.

Format (``LOCK_VERSION`` 1)::

    {
      "_comment": "...",
      "lock_version": 1,
      "versions": {"autoprobe": "0.1.0", "timm": "1.0.31", "torch": "2.14.1", "torchvision": "0.29.1"},
      "models": {
        "resnet50": {
          "settings": {"input_size": [3, 224, 224], "leaf": [], "mode": "eval", "points": null, "rules": "default"},
          "rule_pack": {"name": "default", "sha256": "..."},
          "backend": "fx", "depth": 50, "num_points": 4, "min_distance": 6,
          "input_shape": [2, 3, 224, 224], "notes": [],
          "points": [{"name": "act1", "module_path": "act1", "depth": 1, "shape": [2, 64, 112, 112],
                      "layout": "NCHW", "rules": [{"detector": "downsampling", "reason": "..."}]}, ...]
        }
      }
    }

``settings`` are the inputs ``check`` replays (the input size is always
resolved, so a changed default in timm does not leak in); everything else is
the result. ``check`` fails when the result differs, except for context,
which is printed but never fails by itself: ``versions``,
``rule_pack.sha256`` (a pack edit that moves no point is not a regression), a
rule's ``reason`` text while the same rule still fires on the same point
(prose may improve between autoprobe versions) and ``notes``. Scores and the
full candidate list are left out on purpose: scores follow the pack's weights
(already covered by the hash) and the candidate list changes with every
harmless detector tweak; a lock should fail when a point, its depth or shape,
or a rule's verdict on it changes. Rules are listed by detector ID, so their
order does not depend on weights.

The file is canonical JSON (``report.to_json``: sorted keys, two-space
indent, trailing newline) with no floats, so the same selection writes the same
bytes in every process, under every ``PYTHONHASHSEED``, on meta or on CPU.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import tomllib
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import AutoprobeError, LockError
from .report import to_json

if TYPE_CHECKING:
    from torch import nn

    from .api import Analysis

__all__ = [
    "LOCK_VERSION",
    "DEFAULT_LOCKFILE",
    "LockSettings",
    "ModelRequest",
    "ProjectConfig",
    "Outcome",
    "ModelReport",
    "lock_entry",
    "entry_from_analysis",
    "make_lock",
    "dumps_lock",
    "write_lock",
    "read_lock",
    "diff_entry",
    "context_changes",
    "version_changes",
    "compute_entries",
    "resolve_settings",
    "resolve_rules",
    "stale_models",
    "CheckResult",
    "check_lock",
    "load_config",
    "mode_diff",
    "versions",
]

LOCK_VERSION = 1
DEFAULT_LOCKFILE = "autoprobe.lock"
_MODES = ("eval", "train")
_COMMENT = (
    "autoprobe lockfile: the deep-supervision points chosen for each model. "
    "Written by `autoprobe lock`, verified by `autoprobe check`; review changes like code."
)


@dataclass(frozen=True)
class LockSettings:
    """The inputs of one locked selection; ``check`` replays exactly these.

    Attributes:
        input_size: input without batch, e.g. ``(3, 224, 224)``; ``None`` means the model's own
            (resolved and recorded explicitly in the entry).
        mode: ``"eval"`` or ``"train"``: which graph is traced.
        rules: a built-in pack name or a ``.toml`` path (relative paths are relative to the
            lockfile's folder once stored).
        points: a forced M, or ``None`` for the pack's automatic M.
        leaf: module paths kept as single nodes.
    """

    input_size: tuple[int, ...] | None = None
    mode: str = "eval"
    rules: str = "default"
    points: int | None = None
    leaf: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The settings as stored in a lock entry.

        Example:
            >>> LockSettings((3, 224, 224)).to_dict()["input_size"]
            [3, 224, 224]
        """
        return {
            "input_size": list(self.input_size) if self.input_size is not None else None,
            "mode": self.mode,
            "rules": self.rules,
            "points": self.points,
            "leaf": list(self.leaf),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LockSettings:
        """Parse and validate stored settings.

        Args:
            data: the ``settings`` object of an entry.
            where: a label for messages (file and model).

        Returns:
            The ``LockSettings``.

        Raises:
            LockError: a missing or mistyped field.

        Example:
            >>> LockSettings.from_dict({"input_size": [3, 64, 64], "mode": "eval", "rules": "default",
            ...                         "points": None, "leaf": []}, "x").input_size
            (3, 64, 64)
        """
        hint = "Hint: fix the value, or regenerate the entry with `autoprobe lock`."
        if not isinstance(data, dict):
            raise LockError(f"{where}: 'settings' must be an object. {hint}")
        size = data.get("input_size")
        if size is not None and not (
            isinstance(size, list) and size and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise LockError(f"{where}: settings.input_size must be a list of positive integers, not {size!r}. {hint}")
        mode = data.get("mode", "eval")
        if mode not in _MODES:
            raise LockError(f"{where}: settings.mode must be 'eval' or 'train', not {mode!r}. {hint}")
        rules = data.get("rules", "default")
        if not isinstance(rules, str) or not rules:
            raise LockError(f"{where}: settings.rules must be a pack name or a .toml path, not {rules!r}. {hint}")
        points = data.get("points")
        if points is not None and (not isinstance(points, int) or isinstance(points, bool) or points < 1):
            raise LockError(f"{where}: settings.points must be null or a positive integer, not {points!r}. {hint}")
        leaf = data.get("leaf", [])
        if not isinstance(leaf, list) or not all(isinstance(p, str) for p in leaf):
            raise LockError(f"{where}: settings.leaf must be a list of module paths, not {leaf!r}. {hint}")
        return cls(tuple(size) if size is not None else None, mode, rules, points, tuple(leaf))


def _looks_like_path(rules: str) -> bool:
    """The same test ``rules.load_rules`` uses to tell a file from a built-in pack name."""
    return rules.endswith(".toml") or "/" in rules or "\\" in rules


def resolve_rules(rules: str, base_dir: Path | None) -> str:
    """A stored rules spec made usable from the current directory.

    Args:
        rules: a built-in pack name or a ``.toml`` path as stored in a lock entry.
        base_dir: the folder the path is relative to (the lockfile's); ``None`` keeps it as is.

    Returns:
        The pack name unchanged, or the path joined to ``base_dir``.

    Example:
        >>> resolve_rules("default", Path("ci")), resolve_rules("packs/mine.toml", Path("ci"))
        ('default', 'ci/packs/mine.toml')
    """
    if base_dir is None or not _looks_like_path(rules) or Path(rules).is_absolute():
        return rules
    return str(base_dir / rules)


def _rules_for_storage(rules: str, lock_dir: Path) -> str:
    """A rules spec given relative to the current directory, made relative to the lockfile's folder."""
    if not _looks_like_path(rules):
        return rules
    return Path(os.path.relpath(Path(rules).resolve(), lock_dir.resolve())).as_posix()


def _fired(fired: Iterable[Any]) -> list[dict[str, str]]:
    return sorted(({"detector": f.detector, "reason": f.reason} for f in fired), key=lambda r: (r["detector"], r["reason"]))


def entry_from_analysis(analysis: Analysis, settings: LockSettings) -> dict[str, Any]:
    """The lock entry of an analysed model.

    Args:
        analysis: the result of ``api.analyze``.
        settings: the settings it was computed with; ``input_size`` is replaced by the size
            actually traced, so replaying the entry never depends on a model's default.

    Returns:
        The entry as plain JSON-able data (no floats).

    Example:
        >>> from autoprobe.api import analyze
        >>> entry_from_analysis(analyze("resnet18"), LockSettings())["settings"]["input_size"]
        [3, 224, 224]
    """
    sel = analysis.selection
    resolved = LockSettings(tuple(sel.input_shape[1:]), settings.mode, settings.rules, settings.points, settings.leaf)
    return {
        "settings": resolved.to_dict(),
        "rule_pack": {"name": sel.rules, "sha256": sel.rules_sha256},
        "backend": sel.backend,
        "depth": sel.depth,
        "num_points": len(sel.points),
        "min_distance": sel.min_distance,
        "input_shape": list(sel.input_shape),
        "notes": list(sel.notes),
        "points": [
            {
                "name": p.name,
                "module_path": p.module_path,
                "depth": p.depth,
                "shape": list(p.shape),
                "layout": p.layout,
                "rules": _fired(p.fired),
            }
            for p in sel.points
        ],
    }


def lock_entry(
    model: str | nn.Module,
    settings: LockSettings | None = None,
    *,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Analyse a model and return its lock entry.

    Args:
        model: a model spec (timm name, ``tv:NAME``, ``package.module:factory``) or an ``nn.Module``
            (on meta or live; it is never run or mutated).
        settings: how to analyse it; defaults to ``LockSettings()``.
        base_dir: the folder a relative rules path in ``settings`` is relative to (the lockfile's);
            ``None`` takes it as given (relative to the current directory).

    Returns:
        The entry (see the module docstring).

    Raises:
        AutoprobeError: whatever the analysis reports (unknown model, bad input size, trace failure).

    Example:
        >>> [p["name"] for p in lock_entry("resnet18")["points"]]
        ['layer1.1.act2', 'layer2.1.act2', 'layer3.1.act2']
    """
    from .api import analyze

    settings = settings if settings is not None else LockSettings()
    analysis = analyze(
        model,
        input_size=settings.input_size,
        rules=resolve_rules(settings.rules, base_dir),
        points=settings.points,
        train=settings.mode == "train",
        leaf_paths=settings.leaf,
    )
    return entry_from_analysis(analysis, settings)


def versions() -> dict[str, str]:
    """Installed versions of autoprobe and the libraries that shape a selection (context only).

    Example:
        >>> sorted(versions())
        ['autoprobe', 'timm', 'torch', 'torchvision']
    """
    found = {}
    for dist in ("autoprobe", "timm", "torch", "torchvision"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def make_lock(entries: Mapping[str, dict[str, Any]], *, versions_: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Wrap entries into a lock document.

    Args:
        entries: model key (its spec) -> entry.
        versions_: the versions to record; defaults to ``versions()``.

    Returns:
        The lock as plain data; ``dumps_lock`` turns it into bytes.

    Example:
        >>> make_lock({})["lock_version"]
        1
    """
    return {
        "_comment": _COMMENT,
        "lock_version": LOCK_VERSION,
        "versions": dict(versions_ if versions_ is not None else versions()),
        "models": {k: entries[k] for k in sorted(entries)},
    }


def dumps_lock(lock: Mapping[str, Any]) -> str:
    """The canonical text of a lock: sorted keys, two-space indent, trailing newline.

    Example:
        >>> dumps_lock({"b": 1, "a": [1, 2]}).splitlines()[:2]
        ['{', '  "a": [']
    """
    return to_json(lock)


def write_lock(path: str | Path, lock: Mapping[str, Any]) -> None:
    """Write a lock atomically (a temporary file renamed over the target).

    Args:
        path: the lockfile.
        lock: the document from ``make_lock``.

    Raises:
        LockError: the file cannot be written.

    Example:
        >>> import tempfile, os
        >>> write_lock(os.path.join(tempfile.mkdtemp(), "x.lock"), make_lock({}))
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(dumps_lock(lock))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LockError(f"cannot write lockfile {str(path)!r}: {exc.strerror}. Hint: check the folder exists and is writable.") from exc


def read_lock(path: str | Path) -> dict[str, Any]:
    """Read and validate a lockfile.

    Args:
        path: the lockfile.

    Returns:
        The lock document; every entry's settings are known to parse.

    Raises:
        LockError: the file is missing, not JSON, of another ``lock_version``, or malformed.

    Example:
        >>> read_lock("no-such.lock")
        Traceback (most recent call last):
        ...
        autoprobe.errors.LockError: lockfile 'no-such.lock' does not exist. ...
    """
    path = Path(path)
    hint = f"Hint: create it with `autoprobe lock MODEL... -o {path}`, or list the models in [tool.autoprobe] of pyproject.toml and run `autoprobe lock`."
    if not path.is_file():
        raise LockError(f"lockfile {str(path)!r} does not exist. {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LockError(f"cannot read lockfile {str(path)!r}: {exc}. {hint}") from exc
    except json.JSONDecodeError as exc:
        raise LockError(
            f"lockfile {str(path)!r} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            "Hint: fix the merge conflict or edit by hand, or regenerate it with `autoprobe lock`."
        ) from exc
    if not isinstance(data, dict) or "lock_version" not in data:
        raise LockError(f"{str(path)!r} is not an autoprobe lockfile (no 'lock_version'). {hint}")
    if data["lock_version"] != LOCK_VERSION:
        raise LockError(
            f"lockfile {str(path)!r} has lock_version {data['lock_version']!r}; this autoprobe reads version {LOCK_VERSION}. "
            "Hint: regenerate it with `autoprobe lock` using this autoprobe version."
        )
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise LockError(f"lockfile {str(path)!r} lists no models. {hint}")
    for key, entry in models.items():
        where = f"{path} model {key!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("points"), list):
            raise LockError(f"{where}: the entry has no 'points' list. Hint: regenerate it with `autoprobe lock {key}`.")
        LockSettings.from_dict(entry.get("settings"), where)
    if not isinstance(data.get("versions", {}), dict):
        raise LockError(f"{path}: 'versions' must be an object. Hint: regenerate the file with `autoprobe lock`.")
    return data


# ---------------------------------------------------------------------------------------------- diff


def _detectors(point: Mapping[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rule in point.get("rules", []):
        out.setdefault(str(rule.get("detector")), []).append(str(rule.get("reason")))
    return {k: sorted(v) for k, v in out.items()}


def _short(point: Mapping[str, Any]) -> str:
    rules = ", ".join(sorted(_detectors(point))) or "no rule"
    return f"{point.get('name')} (depth {point.get('depth')}; {rules})"


def _point_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(changes, rewordings) of a point present before and after."""
    name, lines, reworded = old.get("name"), [], []
    for key in ("depth", "module_path", "shape", "layout"):
        if old.get(key) != new.get(key):
            lines.append(f"point {name}: {key} {old.get(key)!r} -> {new.get(key)!r}")
    before, after = _detectors(old), _detectors(new)
    for detector in sorted(set(before) | set(after)):
        if detector not in after:
            lines.append(f"point {name}: rule {detector} no longer fires (was: {'; '.join(before[detector])})")
        elif detector not in before:
            lines.append(f"point {name}: rule {detector} now fires: {'; '.join(after[detector])}")
        elif before[detector] != after[detector]:
            reworded.append(
                f"point {name}: rule {detector} reason reworded: "
                f"{'; '.join(before[detector])!r} -> {'; '.join(after[detector])!r}"
            )
    return lines, reworded


def _compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(selection changes, context changes) between a locked and a recomputed entry."""
    lines: list[str] = []
    context: list[str] = []
    labels = {"depth": "D (weight layers)", "num_points": "M (points)", "min_distance": "min_distance",
              "backend": "backend", "input_shape": "input shape", "settings": "settings"}
    for key, label in labels.items():
        if old.get(key) != new.get(key):
            lines.append(f"{label}: {old.get(key)!r} -> {new.get(key)!r}")
    old_points = {p.get("name"): p for p in old.get("points", [])}
    new_points = {p.get("name"): p for p in new.get("points", [])}
    gone = [p for n, p in old_points.items() if n not in new_points]
    came = [p for n, p in new_points.items() if n not in old_points]
    while gone and came:
        # Pair the closest removed/added points by depth: that is what a user calls "moved".
        a, b = min(((a, b) for a in gone for b in came),
                   key=lambda ab: (abs(ab[0].get("depth", 0) - ab[1].get("depth", 0)), ab[0].get("depth", 0), ab[1].get("depth", 0)))
        lines.append(f"point moved: {_short(a)} -> {_short(b)}")
        gone.remove(a)
        came.remove(b)
    lines.extend(f"point removed: {_short(p)}" for p in gone)
    lines.extend(f"point added: {_short(p)}" for p in came)
    for name, point in old_points.items():
        if name in new_points:
            changed, reworded = _point_changes(point, new_points[name])
            lines.extend(changed)
            context.extend(reworded)
    if [p.get("name") for p in old.get("points", []) if p.get("name") in new_points] != [
        p.get("name") for p in new.get("points", []) if p.get("name") in old_points
    ]:
        lines.append("points: execution order changed")
    known = set(labels) | {"points", "notes", "rule_pack"}
    for key in sorted((set(old) | set(new)) - known):
        if old.get(key) != new.get(key):
            lines.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")

    pack_a, pack_b = old.get("rule_pack") or {}, new.get("rule_pack") or {}
    if pack_a.get("name") != pack_b.get("name"):
        context.append(f"rule pack: {pack_a.get('name')!r} (locked) -> {pack_b.get('name')!r} (now)")
    elif pack_a != pack_b:
        context.append(
            f"rule pack {pack_a.get('name')}: sha256 {str(pack_a.get('sha256'))[:12]} (locked) -> "
            f"{str(pack_b.get('sha256'))[:12]} (now)"
        )
    before, after = list(old.get("notes", [])), list(new.get("notes", []))
    context.extend(f"note gone: {n}" for n in before if n not in after)
    context.extend(f"note new: {n}" for n in after if n not in before)
    return lines, context


def diff_entry(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What changed in a model's selection, one readable line per change; any line fails a check.

    Compared: D, M, min_distance, backend, input shape, settings, and the points. Points
    that disappear and appear are paired by nearest depth and reported as moved; for a point
    present in both, depth, module path, shape, layout and every rule's verdict (fired before
    and not now, or the reverse) are compared. What only explains the selection is context,
    not a change: see ``context_changes``.

    Args:
        old: the locked entry.
        new: the recomputed entry.

    Returns:
        The changes; empty when the selection is identical.

    Example:
        >>> a = {"depth": 18, "points": [{"name": "x", "depth": 3, "rules": [{"detector": "skip", "reason": "r"}]}]}
        >>> diff_entry(a, {**a, "depth": 19})
        ['D (weight layers): 18 -> 19']
    """
    return _compare(old, new)[0]


def context_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Differences that are printed but never fail a check.

    They are the rule pack's hash (a pack edit that moves no point is not a regression), a
    rule's reason reworded while the same rule still fires on the same point (autoprobe's
    prose may improve between versions), and notes (a relaxation or fallback also shows up
    as a change of min_distance or of the rules, which do fail).

    Example:
        >>> context_changes({"rule_pack": {"name": "default", "sha256": "a" * 64}},
        ...                 {"rule_pack": {"name": "default", "sha256": "b" * 64}})
        ['rule pack default: sha256 aaaaaaaaaaaa (locked) -> bbbbbbbbbbbb (now)']
    """
    return _compare(old, new)[1]


def version_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Library versions that differ between the lock and this environment (context only).

    Example:
        >>> version_changes({"torch": "2.4.0"}, {"torch": "2.5.1"})
        ['torch 2.4.0 (locked) -> 2.5.1 (now)']
    """
    return [
        f"{name} {old.get(name, 'absent')} (locked) -> {new.get(name, 'absent')} (now)"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]


def mode_diff(model: str | nn.Module, settings: LockSettings | None = None) -> list[str]:
    """How the train-mode selection differs from the eval-mode one; empty when they agree.

    Dropout, drop-path and BatchNorm change the traced graph between modes; a user who
    trains with deep supervision and locks the eval graph should know when that matters.

    Args:
        model: a spec or an ``nn.Module``.
        settings: every other setting (its ``mode`` is ignored).

    Returns:
        ``diff_entry(eval_entry, train_entry)`` without the mode itself.

    Example:
        >>> mode_diff("resnet18")
        []
    """
    base = settings if settings is not None else LockSettings()
    entries = []
    for mode in _MODES:
        entry = lock_entry(model, LockSettings(base.input_size, mode, base.rules, base.points, base.leaf))
        entry["settings"] = {k: v for k, v in entry["settings"].items() if k != "mode"}
        entries.append(entry)
    return diff_entry(entries[0], entries[1])


# ------------------------------------------------------------------------------------- many models


@dataclass(frozen=True)
class ModelRequest:
    """One model to lock: its spec and the settings asked for (``None`` = not given).

    Attributes:
        spec: the model spec; also the key in the lock.
        input_size, mode, rules, points, leaf: per-model overrides.
    """

    spec: str
    input_size: tuple[int, ...] | None = None
    mode: str | None = None
    rules: str | None = None
    points: int | None = None
    leaf: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProjectConfig:
    """``[tool.autoprobe]`` of a ``pyproject.toml``.

    Attributes:
        path: the pyproject file.
        models: the models to lock, in file order.
        lockfile: where the lock goes (relative paths resolved against the pyproject's folder).
        defaults: project-wide settings (``rules``, ``mode``, ``input_size``) as a ``ModelRequest``
            with an empty spec.
    """

    path: Path
    models: tuple[ModelRequest, ...]
    lockfile: Path
    defaults: ModelRequest = field(default_factory=lambda: ModelRequest(""))


def _request(data: Mapping[str, Any], where: str, spec: str) -> ModelRequest:
    known = {"model", "input_size", "mode", "rules", "points", "leaf"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LockError(f"{where}: unknown key {unknown[0]!r}. Known keys: {', '.join(sorted(known))}.")
    size = data.get("input_size")
    if size is not None:
        if isinstance(size, int) and not isinstance(size, bool):
            size = [3, size, size]
        if not isinstance(size, list) or not size or not all(isinstance(s, int) and s > 0 for s in size):
            raise LockError(f"{where}: input_size must be a list like [3, 224, 224] (or one integer), not {size!r}.")
    mode = data.get("mode")
    if mode is not None and mode not in _MODES:
        raise LockError(f"{where}: mode must be \"eval\" or \"train\", not {mode!r}.")
    rules = data.get("rules")
    if rules is not None and (not isinstance(rules, str) or not rules):
        raise LockError(f"{where}: rules must be a pack name or a .toml path, not {rules!r}.")
    points = data.get("points")
    if points is not None and (not isinstance(points, int) or isinstance(points, bool) or points < 1):
        raise LockError(f"{where}: points must be a positive integer, not {points!r}.")
    leaf = data.get("leaf", [])
    if not isinstance(leaf, list) or not all(isinstance(p, str) for p in leaf):
        raise LockError(f"{where}: leaf must be a list of module paths, not {leaf!r}.")
    return ModelRequest(spec, tuple(size) if size is not None else None, mode, rules, points, tuple(leaf))


def load_config(path: str | Path = "pyproject.toml") -> ProjectConfig | None:
    """Read ``[tool.autoprobe]`` from a pyproject file.

    Recognised keys: ``models`` (a list of specs, or inline tables
    ``{model = "tv:fcn_resnet50", rules = "dense", input_size = [3, 256, 256], mode = "eval",
    points = 4, leaf = ["blocks.0"]}``), ``lockfile`` (default ``autoprobe.lock``) and the
    project-wide defaults ``rules``, ``mode`` and ``input_size``. A rules path is relative
    to the pyproject's folder.

    Args:
        path: the pyproject file.

    Returns:
        The config, or ``None`` when the file or the table does not exist.

    Raises:
        LockError: the file is not TOML or the table is malformed (the key is named).

    Example:
        >>> load_config("no/such/pyproject.toml") is None
        True
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LockError(f"{path}: cannot read it as TOML: {exc}. Hint: fix the syntax at that line.") from exc
    table = data.get("tool", {}).get("autoprobe")
    if table is None:
        return None
    where = f"{path} [tool.autoprobe]"
    if not isinstance(table, dict):
        raise LockError(f"{where} must be a table.")
    unknown = sorted(set(table) - {"models", "lockfile", "rules", "mode", "input_size"})
    if unknown:
        raise LockError(f"{where}: unknown key {unknown[0]!r}. Known keys: input_size, lockfile, mode, models, rules.")
    base = path.parent
    defaults = _request({k: v for k, v in table.items() if k in ("rules", "mode", "input_size")}, where, "")
    if defaults.rules is not None:
        defaults = _with_rules(defaults, _from_config_dir(defaults.rules, base))
    raw = table.get("models", [])
    if not isinstance(raw, list):
        raise LockError(f"{where}: models must be a list of model specs. Hint: models = [\"resnet50\", \"vit_tiny_patch16_224\"].")
    models: list[ModelRequest] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item.strip():
            models.append(ModelRequest(item.strip()))
        elif isinstance(item, dict) and isinstance(item.get("model"), str) and item["model"].strip():
            request = _request(item, f"{where} models[{i}]", item["model"].strip())
            if request.rules is not None:
                request = _with_rules(request, _from_config_dir(request.rules, base))
            models.append(request)
        else:
            raise LockError(
                f"{where}: models[{i}] must be a model spec or a table with a `model` key, not {item!r}. "
                "Hint: models = [\"resnet50\", {model = \"tv:fcn_resnet50\", rules = \"dense\"}]."
            )
    specs = [m.spec for m in models]
    duplicates = sorted({s for s in specs if specs.count(s) > 1})
    if duplicates:
        raise LockError(f"{where}: model {duplicates[0]!r} is listed twice. Hint: a lock has one entry per model spec.")
    lockfile = table.get("lockfile", DEFAULT_LOCKFILE)
    if not isinstance(lockfile, str) or not lockfile:
        raise LockError(f"{where}: lockfile must be a path string, not {lockfile!r}.")
    return ProjectConfig(path, tuple(models), base / lockfile, defaults)


def _from_config_dir(rules: str, base: Path) -> str:
    if not _looks_like_path(rules) or Path(rules).is_absolute():
        return rules
    return str(base / rules)


def _with_rules(request: ModelRequest, rules: str) -> ModelRequest:
    return ModelRequest(request.spec, request.input_size, request.mode, rules, request.points, request.leaf)


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
    entry: dict[str, Any] | None
    error: str = ""
    user_error: bool = False
    seconds: float = 0.0


def _compute(job: tuple[str, str, dict[str, Any], str | None]) -> Outcome:
    """Worker body: one model, every failure turned into data (exceptions may not pickle)."""
    key, spec, settings, base_dir = job
    start = time.perf_counter()
    try:
        entry = lock_entry(spec, LockSettings.from_dict(settings, key), base_dir=Path(base_dir) if base_dir else None)
    except AutoprobeError as exc:
        return Outcome(key, None, str(exc), True, time.perf_counter() - start)
    except Exception as exc:  # a model's own code can raise anything; report it, keep going
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" at {frame.filename}:{frame.lineno}" if frame else ""
        return Outcome(key, None, f"{type(exc).__name__}: {exc}{where} (an autoprobe bug? please report it)", False,
                       time.perf_counter() - start)
    return Outcome(key, entry, seconds=time.perf_counter() - start)


def _init_worker() -> None:
    """Each worker computes one model at a time on one thread: N workers use N cores, not N x cores."""
    import torch

    torch.set_num_threads(1)


def _context() -> multiprocessing.context.BaseContext:
    # Never fork a process that may hold torch threads; forkserver imports torch once and forks clean workers.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["autoprobe.lock", "autoprobe.api", "timm"])
        return ctx
    return multiprocessing.get_context("spawn")


def compute_entries(
    jobs: Sequence[tuple[str, str, LockSettings]],
    *,
    workers: int = 1,
    base_dir: Path | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> dict[str, Outcome]:
    """Compute many entries, optionally in worker processes; a failing model never stops the others.

    Args:
        jobs: ``(key, spec, settings)`` per model.
        workers: worker processes; 1 computes in this process.
        base_dir: the folder relative rules paths in the settings are relative to.
        on_done: called with each ``Outcome`` as it completes (drives a progress bar).

    Returns:
        key -> ``Outcome``, in the order of ``jobs``.

    Example:
        >>> compute_entries([("resnet18", "resnet18", LockSettings())])["resnet18"].error
        ''
    """
    payload = [(key, spec, settings.to_dict(), str(base_dir) if base_dir else None) for key, spec, settings in jobs]
    done: dict[str, Outcome] = {}

    def finish(outcome: Outcome) -> None:
        done[outcome.key] = outcome
        if on_done is not None:
            on_done(outcome)

    if workers <= 1 or len(payload) <= 1:
        for job in payload:
            finish(_compute(job))
    else:
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(min(workers, len(payload)), mp_context=_context(), initializer=_init_worker) as pool:
            futures = {pool.submit(_compute, job): job[0] for job in payload}
            for future in as_completed(futures):
                try:
                    finish(future.result())
                except BrokenProcessPool:
                    finish(Outcome(futures[future], None, "the worker process died (out of memory, or a crash in "
                                   "native code); rerun with --jobs 1 to see where"))
    return {key: done[key] for key, _, _ in jobs}


@dataclass(frozen=True)
class ModelReport:
    """How one locked model compares with its recomputation (``autoprobe check``).

    Attributes:
        key: the model's key.
        changes: selection changes (a failure); empty when identical.
        context: rule-pack differences (never a failure).
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


def resolve_settings(
    request: ModelRequest,
    *,
    cli: ModelRequest | None = None,
    defaults: ModelRequest | None = None,
    lock_dir: Path,
) -> LockSettings:
    """The settings a model is locked with.

    Precedence: command-line options, then the model's own table in ``[tool.autoprobe]``,
    then the table's project-wide defaults, then the built-in defaults.

    Args:
        request: the model's own request (a pyproject table, a bare spec or a CLI argument).
        cli: values given on the command line (``--rules``, ``--mode``...), applied to every model.
        defaults: the project-wide ``[tool.autoprobe]`` values.
        lock_dir: the lockfile's folder; a rules path is stored relative to it.

    Returns:
        The ``LockSettings`` to compute and store.

    Example:
        >>> resolve_settings(ModelRequest("resnet18", mode="train"), lock_dir=Path(".")).mode
        'train'
    """
    order = [r for r in (cli, request, defaults) if r is not None]

    def first(name: str, default: Any) -> Any:
        for r in order:
            value = getattr(r, name)
            if value is not None and value != ():
                return value
        return default

    rules = first("rules", "default")
    return LockSettings(first("input_size", None), first("mode", "eval"), _rules_for_storage(rules, lock_dir),
                        first("points", None), tuple(first("leaf", ())))


def stale_models(config: ProjectConfig, lock: Mapping[str, Any], lock_dir: Path) -> list[str]:
    """Models ``[tool.autoprobe]`` asks for that the lock lacks or records with other settings.

    Only settings the pyproject states are compared (an input size left to the model's
    default is not), so a lock made from the pyproject is never stale.

    Args:
        config: the project config.
        lock: the lock document.
        lock_dir: the lockfile's folder.

    Returns:
        One line per stale model, naming it and what differs.

    Example:
        >>> cfg = ProjectConfig(Path("pyproject.toml"), (ModelRequest("resnet18"),), Path("autoprobe.lock"))
        >>> stale_models(cfg, {"models": {}}, Path("."))
        ['resnet18: listed in pyproject.toml but not in the lock; run `autoprobe lock`']
    """
    lines, models = [], lock.get("models", {})
    for request in config.models:
        entry = models.get(request.spec)
        if entry is None:
            lines.append(f"{request.spec}: listed in {config.path.name} but not in the lock; run `autoprobe lock`")
            continue
        stored = entry.get("settings", {})
        wanted = resolve_settings(request, defaults=config.defaults, lock_dir=lock_dir).to_dict()
        for name in ("input_size", "mode", "rules", "points", "leaf"):
            explicit = any(getattr(r, name) not in (None, ()) for r in (request, config.defaults))
            if explicit and stored.get(name) != wanted[name]:
                lines.append(
                    f"{request.spec}: {config.path.name} asks for {name} {wanted[name]!r}, the lock has "
                    f"{stored.get(name)!r}; run `autoprobe lock`"
                )
    return lines


@dataclass(frozen=True)
class CheckResult:
    """Everything ``autoprobe check`` found.

    Attributes:
        reports: one ``ModelReport`` per locked model, in key order.
        versions: library version differences (context).
        updated: the lock as it would be rewritten by ``--update`` (failed models keep their entry).
    """

    reports: tuple[ModelReport, ...]
    versions: tuple[str, ...]
    updated: dict[str, Any]

    @property
    def failed(self) -> tuple[ModelReport, ...]:
        """The models whose selection changed or could not be recomputed."""
        return tuple(r for r in self.reports if r.failed)


def check_lock(
    path: str | Path,
    *,
    workers: int = 1,
    on_done: Callable[[Outcome], None] | None = None,
) -> CheckResult:
    """Recompute every model of a lockfile with its recorded settings and compare.

    Args:
        path: the lockfile.
        workers: worker processes (1 computes in this process).
        on_done: progress callback, called once per model.

    Returns:
        The ``CheckResult``; nothing is written (``write_lock(path, result.updated)`` updates).

    Raises:
        LockError: the lockfile is missing or malformed.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.lock")
        >>> write_lock(p, make_lock({"resnet18": lock_entry("resnet18")}))
        >>> check_lock(p).failed
        ()
    """
    path = Path(path)
    lock = read_lock(path)
    models = lock["models"]
    jobs = [(key, key, LockSettings.from_dict(entry["settings"], f"{path} model {key!r}")) for key, entry in models.items()]
    outcomes = compute_entries(jobs, workers=workers, base_dir=path.parent, on_done=on_done)
    reports, entries = [], {}
    for key in sorted(models):
        old, outcome = models[key], outcomes[key]
        if outcome.entry is None:
            reports.append(ModelReport(key, error=outcome.error))
            entries[key] = old
            continue
        changes, context = _compare(old, outcome.entry)
        reports.append(ModelReport(key, tuple(changes), tuple(context)))
        entries[key] = outcome.entry
    now = versions()
    return CheckResult(tuple(reports), tuple(version_changes(lock.get("versions", {}), now)), make_lock(entries, versions_=now))
