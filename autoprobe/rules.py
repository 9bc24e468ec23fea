"""Rule packs: declarative TOML files that switch detectors on, weight them and set the policy.

A pack looks like this (``rules/default.toml`` is the reference)::

    [pack]
    description = "what this pack is for"
    extends = "default"            # optional: a built-in pack name or a path relative to this file

    [detectors.downsampling]       # one table per detector ID; a detector not listed is off
    weight = 1.0                   # every detector takes `enabled` and `weight`
    position = "before"            # ... plus its own options (`autoprobe rules` lists them)

    [selection]
    points = "auto"                # round(ln D) clamped to [min_points, max_points], or an integer
    min_distance = "auto"          # depth units between adjacent points, or an integer

Loading resolves ``extends`` (child tables override parent keys), then
validates everything: an unknown table, key, detector or option, or a value of
the wrong type is a ``RuleError`` naming the file and the key. The content hash
is taken over the resolved pack, so a lockfile notices a change in a parent.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .detectors import DETECTORS, Option
from .errors import RuleError

__all__ = ["DetectorRule", "Policy", "RulePack", "load_rules", "builtin_packs"]

_POSITIONS = ("input", "centre", "output", "none")
_SPREADS = ("greedy", "strata")
_HEADS = ("fraction", "last-merge")


@dataclass(frozen=True)
class DetectorRule:
    """A detector switched on by a pack: its weight and its fully defaulted options."""

    weight: float
    options: dict[str, Any]


@dataclass(frozen=True)
class Policy:
    """How many points to pick and where (the knobs the paper ablates).

    Attributes:
        points: a fixed M, or ``None`` for round(ln D).
        min_points, max_points: the clamp for the automatic M.
        min_distance: minimum depth between adjacent points, or ``None`` for
            ``0.6 * usable depth / M`` (points spread over the network).
        position: bias towards ``input``, ``centre``, ``output`` or ``none``.
        position_strength: how strongly the bias scales a score, in [0, 1].
        exclude_output: fraction of D next to the output where no point goes (the head's zone).
        min_score: candidates scoring below this are never picked.
        spread: ``greedy`` picks the best-scoring candidates that keep ``min_distance``; ``strata`` cuts the
            usable depth into M equal strata and takes the best candidate of each first (an encoder-decoder's
            points then reach its decoder), then fills empty strata greedily.
        head: what the head's zone is: ``fraction``, the last ``exclude_output * D``; ``last-merge``, no more
            than what follows the last merge of feature maps before the output (a short decoder such as
            DeepLabV3+'s, whose skip concat lies within that fraction, stays eligible).
        balance: in an encoder-decoder (a decoder comes back up from the encoder's lowest resolution), the
            encoder and the decoder each get ``M // 2`` points where their candidates allow, the weakest points
            of the other side giving way.
    """

    points: int | None = None
    min_points: int = 1
    max_points: int = 8
    min_distance: int | None = None
    position: str = "input"
    position_strength: float = 0.25
    exclude_output: float = 0.1
    min_score: float = 0.0
    spread: str = "greedy"
    head: str = "fraction"
    balance: bool = False


_DEFAULT_POLICY = Policy()


def _policy_default(key: str) -> Any:
    """A policy default as a pack writes it: ``None`` is ``"auto"``. The dataclass is the one source."""
    value = getattr(_DEFAULT_POLICY, key)
    return "auto" if value is None else value


_POLICY_SCHEMA: dict[str, Option] = {
    "points": Option(int, _policy_default("points"), "number of points M, or \"auto\" for round(ln D)"),
    "min_points": Option(int, _policy_default("min_points"), "lower clamp of the automatic M"),
    "max_points": Option(int, _policy_default("max_points"), "upper clamp of the automatic M"),
    "min_distance": Option(int, _policy_default("min_distance"), "minimum depth between adjacent points, or \"auto\""),
    "position": Option(str, _policy_default("position"), "position bias", _POSITIONS),
    "position_strength": Option(float, _policy_default("position_strength"), "strength of the position bias, 0..1"),
    "exclude_output": Option(float, _policy_default("exclude_output"), "fraction of D next to the output kept free of points"),
    "min_score": Option(float, _policy_default("min_score"), "candidates below this score are never picked"),
    "spread": Option(str, _policy_default("spread"), "greedy by score, or the best of each of M depth strata first",
                     _SPREADS),
    "head": Option(str, _policy_default("head"), "the head's zone: the last exclude_output of D, or no more than "
                   "what follows the last merge of feature maps", _HEADS),
    "balance": Option(bool, _policy_default("balance"), "an encoder-decoder's encoder and decoder each get M // 2 "
                      "points where their candidates allow"),
}
_AUTO_KEYS = frozenset({"points", "min_distance"})


@dataclass(frozen=True)
class RulePack:
    """A resolved, validated rule pack.

    Attributes:
        name: the pack's name (file stem).
        source: where it came from (``builtin:default`` or a path).
        description: the pack's own one-line description.
        detectors: detector ID -> rule, for enabled detectors only, in registry order.
        policy: the selection policy.
        sha256: content hash of the resolved pack (canonical JSON).
    """

    name: str
    source: str
    description: str
    detectors: dict[str, DetectorRule]
    policy: Policy
    sha256: str

    def canonical(self) -> dict[str, Any]:
        """The resolved pack as plain data, the input of ``sha256``."""
        return {
            "detectors": {k: {"weight": v.weight, "options": v.options} for k, v in self.detectors.items()},
            "policy": asdict(self.policy),
        }


def builtin_packs() -> dict[str, str]:
    """Built-in pack name -> its description, sorted by name."""
    packs = {}
    for entry in sorted(resources.files("autoprobe.packs").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            packs[entry.name.removesuffix(".toml")] = str(data.get("pack", {}).get("description", ""))
    return packs


def _read(spec: str, relative_to: Path | None, extended_by: str = "") -> tuple[str, str, dict[str, Any]]:
    """(name, source, parsed TOML) of a built-in name or a file path.

    ``extended_by`` is the pack whose ``pack.extends`` names ``spec``; a missing pack is blamed on it.
    """
    where = f"{extended_by}: key 'pack.extends': " if extended_by else ""
    looks_like_path = spec.endswith(".toml") or "/" in spec or "\\" in spec
    if not looks_like_path:
        entry = resources.files("autoprobe.packs").joinpath(f"{spec}.toml")
        if not entry.is_file():
            raise RuleError(
                f"{where}no built-in rule pack {spec!r}. Built-in packs: {', '.join(builtin_packs())}. "
                "Hint: pass a path ending in .toml to use your own file."
            )
        text, source = entry.read_text(encoding="utf-8"), f"builtin:{spec}"
    else:
        path = Path(spec) if relative_to is None or Path(spec).is_absolute() else relative_to / spec
        if not path.is_file():
            raise RuleError(
                f"{where}rules file {str(path)!r} does not exist. Hint: check the path"
                f"{' (relative to the extending pack)' if extended_by else ''}, or use a built-in pack name."
            )
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{source}: not valid TOML: {exc}. Hint: fix the syntax at that line.") from exc
    return Path(spec).stem, source, data


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(parent)
    for key, value in child.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _resolve(spec: str, relative_to: Path | None, chain: tuple[str, ...]) -> tuple[str, str, dict[str, Any]]:
    name, source, data = _read(spec, relative_to, chain[-1] if chain else "")
    if source in chain:
        raise RuleError(f"{source}: `extends` forms a cycle: {' -> '.join((*chain, source))}. Hint: remove one link.")
    pack = data.get("pack", {})
    parent_spec = pack.get("extends") if isinstance(pack, dict) else None
    if parent_spec is None:
        return name, source, data
    if not isinstance(parent_spec, str):
        raise RuleError(f"{source}: key 'pack.extends' must be a string (a pack name or a path), not {parent_spec!r}.")
    base = Path(source).parent if not source.startswith("builtin:") else None
    _, _, parent = _resolve(parent_spec, base, (*chain, source))
    child = {**data, "pack": {k: v for k, v in pack.items() if k != "extends"}}
    return name, source, _merge(parent, child)


def _check(value: Any, option: Option, where: str, source: str, auto_ok: bool = False) -> Any:
    if auto_ok and value == "auto":
        return None
    expected = option.type
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        allowed = expected.__name__ + (' or "auto"' if auto_ok else "")
        raise RuleError(f"{source}: key {where!r} must be {allowed}, not {value!r}. Hint: {option.help}.")
    if option.choices and value not in option.choices:
        raise RuleError(f"{source}: key {where!r} must be one of {', '.join(map(repr, option.choices))}, not {value!r}.")
    return value


def _unknown(keys: set[str], known: set[str], where: str, source: str) -> None:
    extra = sorted(keys - known)
    if extra:
        raise RuleError(
            f"{source}: unknown key {where + extra[0]!r}. Known keys there: {', '.join(sorted(known))}. "
            "Hint: `autoprobe rules` lists every detector and option."
        )


def load_rules(spec: str = "default") -> RulePack:
    """Load, resolve and validate a rule pack.

    Args:
        spec: a built-in pack name (``default``, ``dense``) or a path to a ``.toml`` file.

    Returns:
        The resolved ``RulePack``.

    Raises:
        RuleError: the pack is missing, not TOML, or has an unknown or mistyped key.

    Example:
        >>> pack = load_rules("default")
        >>> sorted(pack.detectors)[:2], pack.policy.max_points
        (['attention', 'bottleneck'], 8)
    """
    name, source, data = _resolve(spec, None, ())
    _unknown(set(data), {"pack", "detectors", "selection"}, "", source)
    for key in ("pack", "detectors", "selection"):
        if not isinstance(data.get(key, {}), dict):
            raise RuleError(f"{source}: key {key!r} must be a table ([{key}]), not {data[key]!r}.")
    pack = data.get("pack", {})
    _unknown(set(pack), {"description", "extends"}, "pack.", source)
    tables = data.get("detectors", {})
    known_ids = {d.ID for d in DETECTORS}
    _unknown(set(tables), known_ids, "detectors.", source)

    rules: dict[str, DetectorRule] = {}
    for module in DETECTORS:
        table = tables.get(module.ID)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise RuleError(f"{source}: 'detectors.{module.ID}' must be a table.")
        schema = {"enabled": Option(bool, True, "switch the detector on or off"),
                  "weight": Option(float, 1.0, "score this detector adds to a node"), **module.OPTIONS}
        _unknown(set(table), set(schema), f"detectors.{module.ID}.", source)
        values = {k: _check(table.get(k, o.default), o, f"detectors.{module.ID}.{k}", source) for k, o in schema.items()}
        if values.pop("enabled"):
            rules[module.ID] = DetectorRule(weight=values.pop("weight"), options=values)

    selection = data.get("selection", {})
    _unknown(set(selection), set(_POLICY_SCHEMA), "selection.", source)
    policy_values = {
        k: _check(selection.get(k, o.default), o, f"selection.{k}", source, auto_ok=k in _AUTO_KEYS)
        for k, o in _POLICY_SCHEMA.items()
    }
    policy = Policy(**policy_values)
    for key in ("points", "min_points", "max_points"):
        value = getattr(policy, key)
        if value is not None and not 1 <= value <= 64:
            raise RuleError(f"{source}: key 'selection.{key}' must be between 1 and 64, not {value}.")
    if policy.min_points > policy.max_points:
        raise RuleError(f"{source}: 'selection.min_points' ({policy.min_points}) exceeds 'selection.max_points'.")
    if not 0 <= policy.position_strength <= 1 or not 0 <= policy.exclude_output < 1:
        raise RuleError(f"{source}: 'selection.position_strength' must lie in [0, 1] and 'exclude_output' in [0, 1).")
    if not rules:
        raise RuleError(
            f"{source}: the pack enables no detector: every 'detectors.<ID>' table is missing or has "
            "enabled = false. Hint: add a [detectors.<ID>] table (`autoprobe rules` lists the IDs)."
        )

    resolved = RulePack(name, source, str(pack.get("description", "")), rules, policy, "")
    digest = hashlib.sha256(json.dumps(resolved.canonical(), sort_keys=True).encode()).hexdigest()
    return RulePack(name, source, resolved.description, rules, policy, digest)


def detector_summary() -> list[tuple[str, str, dict[str, Option]]]:
    """(ID, summary, options) of every detector, in registry order; for ``autoprobe rules``."""
    return [(d.ID, d.SUMMARY, dict(d.OPTIONS)) for d in DETECTORS]

