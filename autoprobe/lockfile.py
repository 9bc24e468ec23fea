"""The lockfile format: typed records and their canonical JSON.

A lockfile holds, per model, the selection ``autoprobe lock`` computed, as a
``LockEntry`` of ``LockedPoint`` records, with the ``LockSettings`` that
``autoprobe check`` replays. This module only converts between those records
and bytes; computing entries is ``lockentry``, comparing them ``lockdiff``,
the pyproject table ``lockconfig``, the commands ``lock``.

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

Three settings are written only when set, so entries without them keep their bytes:
``model_args`` (the keyword arguments of the model's builder, ``{"encoder_weights": null}``),
``input_name`` (the forward parameter the input is passed as, ``"pixel_values"``) and
``forward_kwargs`` (further forward arguments, fixed while tracing). Their values are JSON
literals (``kwargs.Kwargs``), so replaying an entry needs nothing but the file.

The text is canonical JSON (sorted keys, two-space indent, trailing newline)
with no floats (except where a model or forward argument is one), so the same records write the same bytes in every process,
under every ``PYTHONHASHSEED``. Scores and the candidate list are left out on
purpose: scores follow the pack's weights (already covered by its hash) and the
candidate list changes with every harmless detector tweak. Rules are listed by
detector ID, so their order does not depend on weights.

Example:
    >>> settings = LockSettings((3, 32, 32))
    >>> entry = LockEntry(settings, RulePackRef("default", "0" * 64), "fx", 2, 1, 1, (2, 3, 32, 32), (),
    ...                   (LockedPoint("conv", "conv", 1, (2, 8, 32, 32), "NCHW", (FiredRule("skip", "r"),)),))
    >>> lock = Lock({"tiny": entry}, {"torch": "2.14.1"})
    >>> loads_lock(dumps_lock(lock), "tiny.lock") == lock
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args

from .errors import InputSizeError, LockError
from .kwargs import Kwargs, parse_kwarg
from .sizes import parse_input_size
from .trace import Mode

__all__ = [
    "LOCK_VERSION",
    "DEFAULT_LOCKFILE",
    "MODES",
    "LockSettings",
    "FiredRule",
    "LockedPoint",
    "RulePackRef",
    "LockEntry",
    "Lock",
    "parse_setting",
    "dumps_lock",
    "loads_lock",
    "save_lock",
    "read_lock",
    "resolve_rules",
    "rules_for_storage",
    "looks_like_path",
]

LOCK_VERSION = 1
DEFAULT_LOCKFILE = "autoprobe.lock"
MODES: tuple[Mode, ...] = get_args(Mode)
_COMMENT = (
    "autoprobe lockfile: the deep-supervision points chosen for each model. "
    "Written by `autoprobe lock`, verified by `autoprobe check`; review changes like code."
)
_REGENERATE = "Hint: fix the value, or regenerate the entry with `autoprobe lock`."


# ------------------------------------------------------------------------------------------ settings


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def parse_setting(name: str, value: Any, where: str, *, prefix: str = "", hint: str = "") -> Any:
    """The one validator of a lock setting, for the lockfile, ``[tool.autoprobe]`` and the Python API.

    Args:
        name: ``input_size``, ``mode``, ``rules``, ``points``, ``leaf``, ``model_args``, ``input_name``
            or ``forward_kwargs``.
        value: the value as given (JSON, TOML or Python); ``None`` is valid for ``input_size``
            (the model's own), ``points`` (the pack's automatic M) and ``input_name`` (the first
            parameter). ``model_args`` and ``forward_kwargs`` take a mapping, or a list of
            ``"KEY=VALUE"`` strings as typed on the command line (TOML has no ``None``).
        where: names the file and model (or the function) in a message, e.g. ``"x.lock model 'resnet18'"``.
        prefix: put before ``name`` in a message (``"settings."`` in a lockfile).
        hint: appended to the message (what to do).

    Returns:
        The typed value: ``input_size`` a tuple (read by ``sizes.parse_input_size``: one integer
        ``s`` means ``(3, s, s)``), ``leaf`` a tuple of module paths, ``model_args`` and
        ``forward_kwargs`` a ``Kwargs``, the others unchanged.

    Raises:
        LockError: the value has the wrong type or range; the message names ``where`` and the setting.

    Example:
        >>> parse_setting("input_size", [3, 64, 64], "x"), parse_setting("input_size", 64, "x")
        ((3, 64, 64), (3, 64, 64))
        >>> parse_setting("mode", "both", "x.lock model 'm'", prefix="settings.")
        Traceback (most recent call last):
        ...
        autoprobe.errors.LockError: x.lock model 'm': settings.mode must be 'eval' or 'train', not 'both'.
    """
    label, tail = f"{where}: {prefix}{name}", f" {hint}" if hint else ""
    if name == "input_size":
        if value is None:
            return None
        try:
            return parse_input_size(value, argument=f"{prefix}{name}")
        except InputSizeError as exc:
            # The caller's hint says what to do in this context (the file); the parser's is for Python calls.
            raise LockError(f"{where}: {str(exc).splitlines()[0]}{tail}" if hint else f"{where}: {exc}") from exc
    if name == "mode":
        if value in MODES:
            return value
        raise LockError(f"{label} must be 'eval' or 'train', not {value!r}.{tail}")
    if name == "rules":
        if isinstance(value, str) and value:
            return value
        raise LockError(f"{label} must be a pack name or a .toml path, not {value!r}.{tail}")
    if name == "points":
        if value is None or _positive_int(value):
            return value
        raise LockError(f"{label} must be null or a positive integer, not {value!r}.{tail}")
    if name == "leaf":
        if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
            return tuple(value)
        raise LockError(f"{label} must be a list of module paths, not {value!r}.{tail}")
    if name == "input_name":
        if value is None or (isinstance(value, str) and value.isidentifier()):
            return value
        raise LockError(f"{label} must be null or a forward parameter's name, not {value!r}.{tail}")
    if name in _KWARG_SETTINGS:
        return _kwargs(value, label, tail)
    raise LockError(f"{where}: unknown setting {prefix}{name}. Known settings: {', '.join(_SETTING_NAMES)}.{tail}")


def _kwargs(value: Any, label: str, tail: str) -> Kwargs:
    """``model_args`` / ``forward_kwargs``: a mapping, or ``"KEY=VALUE"`` strings (the CLI's form)."""
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        value = dict(parse_kwarg(item, label, error=LockError, hint=tail) for item in value)
    return Kwargs(value, where=label, error=LockError, hint=tail)


# Settings written only when set, so that entries without them keep their bytes.
_KWARG_SETTINGS = ("model_args", "forward_kwargs")


@dataclass(frozen=True)
class LockSettings:
    """The inputs of one locked selection; ``check`` replays exactly these.

    Every field is checked by ``parse_setting`` on construction, so an invalid
    ``LockSettings`` cannot exist.

    Attributes:
        input_size: input without batch, e.g. ``(3, 224, 224)``; ``None`` means the model's own
            (resolved and recorded explicitly in the entry).
        mode: ``"eval"`` or ``"train"``: which graph is traced.
        rules: a built-in pack name or a ``.toml`` path (relative paths are relative to the
            lockfile's folder once stored).
        points: a forced M, or ``None`` for the pack's automatic M.
        leaf: module paths kept as single nodes.
        model_args: keyword arguments of the model's builder (``Kwargs``; empty: none).
        input_name: the forward parameter the input is passed as; ``None`` is the first.
        forward_kwargs: further forward arguments, fixed while tracing (``Kwargs``; empty: none).

    Example:
        >>> LockSettings((3, 224, 224)).to_json()["input_size"]
        [3, 224, 224]
        >>> LockSettings(mode="both")
        Traceback (most recent call last):
        ...
        autoprobe.errors.LockError: LockSettings: mode must be 'eval' or 'train', not 'both'. Hint: fix that argument of LockSettings(...).
    """

    input_size: tuple[int, ...] | None = None
    mode: Mode = "eval"
    rules: str = "default"
    points: int | None = None
    leaf: tuple[str, ...] = ()
    # Recorded only when given (``to_json``), so older locks read and write the same.
    model_args: Kwargs = field(default=Kwargs(), metadata={"only_when_given": True})
    input_name: str | None = field(default=None, metadata={"only_when_given": True})
    forward_kwargs: Kwargs = field(default=Kwargs(where="forward_kwargs"), metadata={"only_when_given": True})

    def __post_init__(self) -> None:
        for f in fields(self):
            # Normalizes lists to tuples, so equal settings compare (and pickle) equal.
            hint = "Hint: fix that argument of LockSettings(...)."
            object.__setattr__(self, f.name, parse_setting(f.name, getattr(self, f.name), "LockSettings", hint=hint))

    @classmethod
    def parse(cls, values: Mapping[str, Any], where: str, *, prefix: str = "", hint: str = "") -> LockSettings:
        """Settings from untyped values (JSON, TOML or keyword arguments), with messages naming ``where``.

        Args:
            values: setting name -> value; a missing name takes the field's default.
            where: the file and model (or the function) the values come from.
            prefix: put before a setting's name in messages (``"settings."`` in a lockfile).
            hint: what to do, appended to every message.

        Returns:
            The ``LockSettings``.

        Raises:
            LockError: an unknown name or an invalid value.

        Example:
            >>> LockSettings.parse({"input_size": [3, 64, 64], "mode": "train"}, "x").input_size
            (3, 64, 64)
        """
        if not isinstance(values, Mapping):
            raise LockError(f"{where}: '{prefix.rstrip('.') or 'settings'}' must be an object, not {values!r}. {hint}".rstrip())
        unknown = sorted(set(values) - set(_SETTING_NAMES))
        if unknown:
            raise LockError(
                f"{where}: unknown setting {prefix}{unknown[0]}. Known settings: {', '.join(_SETTING_NAMES)}. {hint}".rstrip()
            )
        return cls(**{k: parse_setting(k, v, where, prefix=prefix, hint=hint) for k, v in values.items()})

    def to_json(self) -> dict[str, Any]:
        """The settings as stored in a lock entry; ``model_args``, ``input_name`` and ``forward_kwargs`` only when set.

        Example:
            >>> LockSettings(model_args={"encoder_weights": None}).to_json()["model_args"]
            {'encoder_weights': None}
            >>> "input_name" in LockSettings().to_json()
            False
        """
        return {
            f.name: _json(getattr(self, f.name))
            for f in fields(self)
            if not (f.metadata.get("only_when_given") and getattr(self, f.name) == f.default)
        }


_SETTING_NAMES: tuple[str, ...] = tuple(sorted(f.name for f in fields(LockSettings)))
"""The setting names, from ``LockSettings``'s fields (sorted, as messages list them)."""


def _json(value: Any) -> Any:
    """A setting's value as JSON data: a tuple as a list, ``Kwargs`` as an object."""
    if isinstance(value, Kwargs):
        return value.to_json()
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class FiredRule:
    """A rule that fired on a locked point: the detector ID and its reason (prose, context only)."""

    detector: str
    reason: str


@dataclass(frozen=True)
class LockedPoint:
    """One chosen supervision point as the lock records it.

    Attributes:
        name: the layer-graph node name.
        module_path: the module the node belongs to.
        depth: weight layers from the input.
        shape: the feature's shape, batch included.
        layout: ``"NCHW"``, ``"NLC"``, ... (``None`` when unknown).
        rules: the rules that fired, sorted by detector ID, then reason.
    """

    name: str
    module_path: str
    depth: int
    shape: tuple[int, ...]
    layout: str | None
    rules: tuple[FiredRule, ...]

    @property
    def detectors(self) -> dict[str, list[str]]:
        """Detector ID -> its sorted reasons."""
        out: dict[str, list[str]] = {}
        for rule in self.rules:
            out.setdefault(rule.detector, []).append(rule.reason)
        return {k: sorted(v) for k, v in out.items()}

    def to_json(self) -> dict[str, Any]:
        """The point as stored in the lock."""
        return {
            "name": self.name,
            "module_path": self.module_path,
            "depth": self.depth,
            "shape": list(self.shape),
            "layout": self.layout,
            "rules": [{"detector": r.detector, "reason": r.reason} for r in self.rules],
        }


@dataclass(frozen=True)
class RulePackRef:
    """The rule pack an entry was computed with: its name and content hash (context only)."""

    name: str
    sha256: str


@dataclass(frozen=True)
class LockEntry:
    """One model's locked selection.

    Attributes:
        settings: what ``check`` replays (the input size always resolved).
        rule_pack: the pack's name and hash.
        backend: the tracing backend that produced the graph.
        depth: D, the weight layers of the model.
        num_points: M.
        min_distance: the distance between points actually used.
        input_shape: the traced input, batch included.
        notes: relaxations and fallbacks, in plain words (context only).
        points: the chosen points in execution order.
    """

    settings: LockSettings
    rule_pack: RulePackRef
    backend: str
    depth: int
    num_points: int
    min_distance: int
    input_shape: tuple[int, ...]
    notes: tuple[str, ...]
    points: tuple[LockedPoint, ...]

    def to_json(self) -> dict[str, Any]:
        """The entry as plain JSON data (no floats)."""
        return {
            "settings": self.settings.to_json(),
            "rule_pack": {"name": self.rule_pack.name, "sha256": self.rule_pack.sha256},
            "backend": self.backend,
            "depth": self.depth,
            "num_points": self.num_points,
            "min_distance": self.min_distance,
            "input_shape": list(self.input_shape),
            "notes": list(self.notes),
            "points": [p.to_json() for p in self.points],
        }


@dataclass(frozen=True)
class Lock:
    """A lock document: entries by model key, and the library versions they were computed with.

    Attributes:
        entries: model key (its spec) -> entry.
        versions: distribution name -> version (context only).
    """

    entries: Mapping[str, LockEntry]
    versions: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        """The document as plain JSON data."""
        return {
            "_comment": _COMMENT,
            "lock_version": LOCK_VERSION,
            "versions": dict(self.versions),
            "models": {k: self.entries[k].to_json() for k in sorted(self.entries)},
        }


# --------------------------------------------------------------------------------------- JSON -> records


def _get(data: Mapping[str, Any], key: str, kind: str, where: str) -> Any:
    """``data[key]`` checked against ``kind`` (``int``, ``str``, ``str?``, ``ints``, ``strs``, ``list``, ``object``)."""
    hint = "Hint: regenerate the entry with `autoprobe lock`."
    if key not in data:
        raise LockError(f"{where}: the entry has no {key!r}. {hint}")
    value = data[key]
    ok = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "str?": lambda v: v is None or isinstance(v, str),
        "ints": lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
        "strs": lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
        "list": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }[kind](value)
    if not ok:
        raise LockError(f"{where}: {key!r} has the wrong type ({value!r}). {hint}")
    return tuple(value) if kind in ("ints", "strs") else value


def _known(data: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise LockError(
            f"{where}: unknown key {unknown[0]!r}. Hint: this autoprobe writes only {', '.join(sorted(keys))}; "
            "regenerate the entry with `autoprobe lock`."
        )


def _point(data: Any, where: str) -> LockedPoint:
    if not isinstance(data, dict):
        raise LockError(f"{where}: a point must be an object, not {data!r}. Hint: regenerate the entry with `autoprobe lock`.")
    _known(data, ("name", "module_path", "depth", "shape", "layout", "rules"), where)
    rules = []
    for rule in _get(data, "rules", "list", where):
        if not isinstance(rule, dict) or set(rule) != {"detector", "reason"} or not all(isinstance(v, str) for v in rule.values()):
            raise LockError(f"{where}: a rule must be {{\"detector\": ..., \"reason\": ...}}, not {rule!r}. "
                            "Hint: regenerate the entry with `autoprobe lock`.")
        rules.append(FiredRule(rule["detector"], rule["reason"]))
    return LockedPoint(
        _get(data, "name", "str", where),
        _get(data, "module_path", "str", where),
        _get(data, "depth", "int", where),
        _get(data, "shape", "ints", where),
        _get(data, "layout", "str?", where),
        tuple(rules),
    )


def _entry(data: Any, where: str) -> LockEntry:
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise LockError(f"{where}: the entry has no 'points' list. Hint: regenerate it with `autoprobe lock`.")
    settings = LockSettings.parse(data.get("settings"), where, prefix="settings.", hint=_REGENERATE)
    _known(data, ("settings", "rule_pack", "backend", "depth", "num_points", "min_distance", "input_shape", "notes",
                  "points"), where)
    pack = _get(data, "rule_pack", "object", where)
    pack_where = f"{where} rule_pack"
    _known(pack, ("name", "sha256"), pack_where)
    points = tuple(_point(p, f"{where} point {i}") for i, p in enumerate(data["points"]))
    return LockEntry(
        settings,
        RulePackRef(_get(pack, "name", "str", pack_where), _get(pack, "sha256", "str", pack_where)),
        _get(data, "backend", "str", where),
        _get(data, "depth", "int", where),
        _get(data, "num_points", "int", where),
        _get(data, "min_distance", "int", where),
        _get(data, "input_shape", "ints", where),
        _get(data, "notes", "strs", where),
        points,
    )


def loads_lock(text: str, path: str | Path) -> Lock:
    """Parse a lock document.

    Args:
        text: the file's content.
        path: the file, for messages.

    Returns:
        The ``Lock``.

    Raises:
        LockError: not JSON, another ``lock_version``, no models, or a malformed entry (named).

    Example:
        >>> loads_lock('{"lock_version": 1, "models": {}}', "x.lock")
        Traceback (most recent call last):
        ...
        autoprobe.errors.LockError: lockfile 'x.lock' lists no models. ...
    """
    shown = str(path)
    hint = (f"Hint: create it with `autoprobe lock MODEL... -o {shown}`, or list the models in [tool.autoprobe] of "
            "pyproject.toml and run `autoprobe lock`.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LockError(
            f"lockfile {shown!r} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}). "
            "Hint: fix the merge conflict or edit by hand, or regenerate it with `autoprobe lock`."
        ) from exc
    if not isinstance(data, dict) or "lock_version" not in data:
        raise LockError(f"{shown!r} is not an autoprobe lockfile (no 'lock_version'). {hint}")
    if data["lock_version"] != LOCK_VERSION:
        raise LockError(
            f"lockfile {shown!r} has lock_version {data['lock_version']!r}; this autoprobe reads version {LOCK_VERSION}. "
            "Hint: regenerate it with `autoprobe lock` using this autoprobe version."
        )
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise LockError(f"lockfile {shown!r} lists no models. {hint}")
    entries = {key: _entry(entry, f"{shown} model {key!r}") for key, entry in models.items()}
    found = data.get("versions", {})
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        raise LockError(f"{shown}: 'versions' must be an object of strings. Hint: regenerate the file with `autoprobe lock`.")
    return Lock(entries, found)


def dumps_lock(lock: Lock) -> str:
    """The canonical text of a lock: sorted keys, two-space indent, trailing newline.

    Example:
        >>> dumps_lock(Lock({}, {})).splitlines()[:3]
        ['{', '  "_comment": "autoprobe lockfile: the deep-supervision points chosen for each model. Written by `autoprobe lock`, verified by `autoprobe check`; review changes like code.",', '  "lock_version": 1,']
    """
    return json.dumps(lock.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def save_lock(path: str | Path, lock: Lock) -> None:
    """Write a lock atomically (a temporary file renamed over the target).

    Args:
        path: the lockfile.
        lock: the document.

    Raises:
        LockError: the file cannot be written.

    Example:
        >>> import tempfile, os
        >>> save_lock(os.path.join(tempfile.mkdtemp(), "x.lock"), Lock({}, {}))
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


def read_lock(path: str | Path) -> Lock:
    """Read and validate a lockfile.

    Args:
        path: the lockfile.

    Returns:
        The ``Lock``.

    Raises:
        LockError: the file is missing, unreadable, or malformed (see ``loads_lock``).

    Example:
        >>> read_lock("no-such.lock")
        Traceback (most recent call last):
        ...
        autoprobe.errors.LockError: lockfile 'no-such.lock' does not exist. ...
    """
    path = Path(path)
    hint = (f"Hint: create it with `autoprobe lock MODEL... -o {path}`, or list the models in [tool.autoprobe] of "
            "pyproject.toml and run `autoprobe lock`.")
    if not path.is_file():
        raise LockError(f"lockfile {str(path)!r} does not exist. {hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LockError(f"cannot read lockfile {str(path)!r}: {exc}. {hint}") from exc
    return loads_lock(text, path)


# ------------------------------------------------------------------------------------- rules paths


def looks_like_path(rules: str) -> bool:
    """The test ``rules.load_rules`` uses to tell a ``.toml`` file from a built-in pack name.

    Example:
        >>> looks_like_path("dense"), looks_like_path("packs/mine.toml")
        (False, True)
    """
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
    if base_dir is None or not looks_like_path(rules) or Path(rules).is_absolute():
        return rules
    return str(base_dir / rules)


def rules_for_storage(rules: str, lock_dir: Path) -> str:
    """A rules path given relative to the current directory, made relative to the lockfile's folder.

    Example:
        >>> rules_for_storage("dense", Path("ci"))
        'dense'
    """
    if not looks_like_path(rules):
        return rules
    return Path(os.path.relpath(Path(rules).resolve(), lock_dir.resolve())).as_posix()
