"""The ``[tool.autoprobe]`` table of ``pyproject.toml``, and how its settings combine.

The table lists the models ``autoprobe lock`` writes when given no model, the
lockfile they go to, and project-wide settings. ``resolve_settings`` merges
the layers into the ``LockSettings`` of one model: command-line options, then
the model's own table, then the project-wide values, then the built-in
defaults (those of ``LockSettings``). Values are checked by the same
``lockfile.parse_setting`` that reads a lockfile, so a value the pyproject
accepts is one the lockfile accepts.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "pyproject.toml"
    >>> _ = path.write_text('[tool.autoprobe]\\nmodels = ["resnet18", {model = "vgg11", mode = "train"}]\\n')
    >>> config = load_config(path)
    >>> [resolve_settings(m, defaults=config.defaults, lock_dir=path.parent).mode for m in config.models]
    ['eval', 'train']
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

from .errors import LockError
from .kwargs import Kwargs
from .lockfile import DEFAULT_LOCKFILE, LockSettings, looks_like_path, parse_setting, rules_for_storage
from .trace import Mode

__all__ = ["ModelRequest", "ProjectConfig", "load_config", "resolve_settings", "is_given"]

_SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(LockSettings))
"""The settings a model can ask for: ``LockSettings``'s fields, in their order (a new one is added there only)."""
_TABLE_KEYS = ("models", "lockfile", "rules", "mode", "input_size")
_HINT = "Hint: fix the value in pyproject.toml."


def _check_request(self: Any) -> None:
    for name in _SETTINGS:
        value = getattr(self, name)
        if value is not None:
            hint = "Hint: fix that argument of ModelRequest(...)."
            object.__setattr__(self, name, parse_setting(name, value, f"ModelRequest({self.spec!r})", hint=hint))


# One field per LockSettings field, ``None`` when not given: the names are LockSettings', never listed here.
ModelRequest = make_dataclass(
    "ModelRequest",
    [("spec", str), *((name, f"{f.type} | None", field(default=None)) for f, name in zip(fields(LockSettings), _SETTINGS))],
    frozen=True,
    namespace={"__post_init__": _check_request},
)
ModelRequest.__module__ = __name__
ModelRequest.__doc__ = """One model to lock: its spec and the settings asked for (``None``, ``()`` or empty = not given).

    Attributes:
        spec: the model spec; also the key in the lock.
        one field per ``LockSettings`` field (``input_size``, ``mode``, ``rules``, ...), in its order, default
            ``None``: overrides, checked like ``LockSettings``.

    Example:
        >>> ModelRequest("resnet18", input_size=224).input_size
        (3, 224, 224)
        >>> ModelRequest("resnet18").leaf is None
        True
    """


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


def _request(data: Mapping[str, Any], where: str, spec: str, base: Path) -> ModelRequest:
    known = {"model", *_SETTINGS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LockError(f"{where}: unknown key {unknown[0]!r}. Known keys: {', '.join(sorted(known))}. {_HINT}")
    values = {k: parse_setting(k, data[k], where, hint=_HINT) for k in _SETTINGS if k in data}
    rules = values.get("rules")
    if rules is not None and looks_like_path(rules) and not Path(rules).is_absolute():
        values["rules"] = str(base / rules)  # written relative to the pyproject's folder
    return ModelRequest(spec, **values)


def load_config(path: str | Path = "pyproject.toml") -> ProjectConfig | None:
    """Read ``[tool.autoprobe]`` from a pyproject file.

    Recognised keys: ``models`` (a list of specs, or inline tables
    ``{model = "tv:fcn_resnet50", rules = "dense", input_size = [3, 256, 256], mode = "eval",
    points = 4, leaf = ["blocks.0"], model_args = ["encoder_weights=None"], input_name = "pixel_values",
    forward_kwargs = ["return_dict=False"]}``; ``model_args`` and ``forward_kwargs`` are ``KEY=VALUE``
    strings as on the command line, since TOML has no ``None``), ``lockfile`` (default ``autoprobe.lock``) and the
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
        raise LockError(f"{where} must be a table. {_HINT}")
    unknown = sorted(set(table) - set(_TABLE_KEYS))
    if unknown:
        raise LockError(f"{where}: unknown key {unknown[0]!r}. Known keys: {', '.join(sorted(_TABLE_KEYS))}. {_HINT}")
    base = path.parent
    defaults = _request({k: v for k, v in table.items() if k in ("rules", "mode", "input_size")}, where, "", base)
    raw = table.get("models", [])
    if not isinstance(raw, list):
        raise LockError(f"{where}: models must be a list of model specs. Hint: models = [\"resnet50\", \"vit_tiny_patch16_224\"].")
    models: list[ModelRequest] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item.strip():
            models.append(ModelRequest(item.strip()))
        elif isinstance(item, dict) and isinstance(item.get("model"), str) and item["model"].strip():
            models.append(_request(item, f"{where} models[{i}]", item["model"].strip(), base))
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
        raise LockError(f"{where}: lockfile must be a path string, not {lockfile!r}. {_HINT}")
    return ProjectConfig(path, tuple(models), base / lockfile, defaults)


def is_given(value: Any) -> bool:
    """Whether a ``ModelRequest`` setting was given: not ``None``, ``()`` or an empty ``Kwargs``.

    Example:
        >>> is_given(None), is_given(()), is_given(Kwargs()), is_given("train")
        (False, False, False, True)
    """
    return value is not None and value != () and not (isinstance(value, Kwargs) and not value)


def resolve_settings(
    request: ModelRequest,
    *,
    cli: ModelRequest | None = None,
    defaults: ModelRequest | None = None,
    lock_dir: Path,
) -> LockSettings:
    """The settings a model is locked with.

    Precedence: command-line options, then the model's own table in ``[tool.autoprobe]``,
    then the table's project-wide defaults, then the defaults of ``LockSettings``.

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
    given: dict[str, Any] = {}
    for f in fields(LockSettings):
        value = next((getattr(r, f.name) for r in order if is_given(getattr(r, f.name))), None)
        if value is not None:
            given[f.name] = value
    settings = LockSettings(**given)
    return replace(settings, rules=rules_for_storage(settings.rules, lock_dir))
