"""What changed between a locked entry and its recomputation, in readable lines.

``diff_entries`` is a pure function of two ``LockEntry`` records. Its
``changes`` fail ``autoprobe check``: D, M, min_distance, backend, input shape,
settings, and the points (moved, added, removed; a point's depth, module path,
shape or layout; a rule that stopped or started firing). Its ``context`` is
printed but never fails by itself: the rule pack's hash (a pack edit that moves
no point is not a regression), a rule's reason reworded while the same rule
still fires on the same point (prose may improve between versions), and notes
(a relaxation or fallback also shows up as a change of min_distance or of the
rules, which do fail).

Example:
    >>> from dataclasses import replace
    >>> from autoprobe.lockfile import LockEntry, LockSettings, RulePackRef
    >>> a = LockEntry(LockSettings((3, 32, 32)), RulePackRef("default", "a" * 64), "fx", 18, 0, 3, (2, 3, 32, 32), (), ())
    >>> diff_entries(a, replace(a, depth=19, rule_pack=RulePackRef("default", "b" * 64)))
    EntryDiff(changes=('D (weight layers): 18 -> 19',), context=('rule pack default: sha256 aaaaaaaaaaaa (locked) -> bbbbbbbbbbbb (now)',))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from .lockfile import LockedPoint, LockEntry

__all__ = ["EntryDiff", "diff_entries", "version_changes"]

# Entry fields compared as a whole, with the label a user reads, in report order.
_LABELS = (
    ("depth", "D (weight layers)"),
    ("num_points", "M (points)"),
    ("min_distance", "min_distance"),
    ("backend", "backend"),
    ("input_shape", "input shape"),
    ("settings", "settings"),
)


class EntryDiff(NamedTuple):
    """The differences between two entries.

    Attributes:
        changes: selection changes, one line each; any line fails a check.
        context: differences that are printed but never fail a check.
    """

    changes: tuple[str, ...]
    context: tuple[str, ...]


def _short(point: LockedPoint) -> str:
    rules = ", ".join(sorted(point.detectors)) or "no rule"
    return f"{point.name} (depth {point.depth}; {rules})"


def _point_changes(old: LockedPoint, new: LockedPoint) -> tuple[list[str], list[str]]:
    """(changes, rewordings) of a point present before and after."""
    lines, reworded = [], []
    a, b = old.to_json(), new.to_json()  # compared and shown as stored, e.g. shape [2, 8, 4, 4]
    for key in ("depth", "module_path", "shape", "layout"):
        if a[key] != b[key]:
            lines.append(f"point {old.name}: {key} {a[key]!r} -> {b[key]!r}")
    before, after = old.detectors, new.detectors
    for detector in sorted(set(before) | set(after)):
        if detector not in after:
            lines.append(f"point {old.name}: rule {detector} no longer fires (was: {'; '.join(before[detector])})")
        elif detector not in before:
            lines.append(f"point {old.name}: rule {detector} now fires: {'; '.join(after[detector])}")
        elif before[detector] != after[detector]:
            reworded.append(
                f"point {old.name}: rule {detector} reason reworded: "
                f"{'; '.join(before[detector])!r} -> {'; '.join(after[detector])!r}"
            )
    return lines, reworded


def diff_entries(old: LockEntry, new: LockEntry) -> EntryDiff:
    """Compare a locked entry with a recomputed one.

    Points that disappear and appear are paired by nearest depth and reported as moved
    (that is what a user calls "moved"); a point present in both is compared field by field.

    Args:
        old: the locked entry.
        new: the recomputed entry.

    Returns:
        The ``EntryDiff``; both parts are empty when the entries are equal.

    Example:
        >>> from autoprobe.lockfile import LockEntry, LockSettings, RulePackRef
        >>> e = LockEntry(LockSettings((3, 32, 32)), RulePackRef("default", "a" * 64), "fx", 18, 0, 3, (2, 3, 32, 32), (), ())
        >>> diff_entries(e, e)
        EntryDiff(changes=(), context=())
    """
    lines: list[str] = []
    context: list[str] = []
    a, b = old.to_json(), new.to_json()
    for key, label in _LABELS:
        if a[key] != b[key]:
            lines.append(f"{label}: {a[key]!r} -> {b[key]!r}")
    old_points = {p.name: p for p in old.points}
    new_points = {p.name: p for p in new.points}
    gone = [p for n, p in old_points.items() if n not in new_points]
    came = [p for n, p in new_points.items() if n not in old_points]
    while gone and came:
        x, y = min(((x, y) for x in gone for y in came), key=lambda xy: (abs(xy[0].depth - xy[1].depth), xy[0].depth, xy[1].depth))
        lines.append(f"point moved: {_short(x)} -> {_short(y)}")
        gone.remove(x)
        came.remove(y)
    lines.extend(f"point removed: {_short(p)}" for p in gone)
    lines.extend(f"point added: {_short(p)}" for p in came)
    for name, point in old_points.items():
        if name in new_points:
            changed, reworded = _point_changes(point, new_points[name])
            lines.extend(changed)
            context.extend(reworded)
    if [p.name for p in old.points if p.name in new_points] != [p.name for p in new.points if p.name in old_points]:
        lines.append("points: execution order changed")

    pack_a, pack_b = old.rule_pack, new.rule_pack
    if pack_a.name != pack_b.name:
        context.append(f"rule pack: {pack_a.name!r} (locked) -> {pack_b.name!r} (now)")
    elif pack_a != pack_b:
        context.append(f"rule pack {pack_a.name}: sha256 {pack_a.sha256[:12]} (locked) -> {pack_b.sha256[:12]} (now)")
    context.extend(f"note gone: {n}" for n in old.notes if n not in new.notes)
    context.extend(f"note new: {n}" for n in new.notes if n not in old.notes)
    return EntryDiff(tuple(lines), tuple(context))


def version_changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
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
