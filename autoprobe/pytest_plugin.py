"""pytest plugin: a one-line snapshot test that a model's supervision points did not move.

Users who train with deep supervision want the same guard as ``autoprobe check``
inside the test suite they already run, with the workflow they know from
pytest-regressions and syrupy::

    def test_points(autoprobe_snapshot):
        autoprobe_snapshot.check("resnet50")        # or an nn.Module: autoprobe_snapshot(my_model, name="mine")

The baseline lives next to the test file, in ``<test_file_stem>/<test_name>.autoprobe.json``
(a lockfile holding the models that test checks), and is meant to be committed.

- No baseline yet: it is written and the test fails saying so; review it, commit it,
  and the next run passes as long as nothing moves.
- A different selection: the test fails with the same per-point diff ``autoprobe check``
  prints (moved, added, removed points; depth changes; rules that stopped or started firing).
  Library versions and the rule pack's hash are context: they never fail a test by themselves.
- ``pytest --autoprobe-update``: changed or missing baselines are rewritten and those tests
  fail once, naming the files, like pytest-regressions' ``--force-regen``; a regeneration run
  therefore never looks green by accident, and the next plain run confirms it. Tests whose
  selection is unchanged pass; their file is refreshed only if its context (reason texts,
  notes, pack hash) is out of date, and the session summary lists every file written.

The plugin is registered through the ``pytest11`` entry point and imports torch only
when the fixture is used, so it costs nothing in test suites that do not use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from torch import nn

    from .lockfile import Lock, LockEntry

__all__ = ["AutoprobeSnapshot", "autoprobe_snapshot", "pytest_addoption", "pytest_terminal_summary"]

_WRITTEN = pytest.StashKey[list[str]]()
_SUFFIX = ".autoprobe.json"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--autoprobe-update``."""
    group = parser.getgroup("autoprobe", "autoprobe snapshots of deep-supervision points")
    group.addoption(
        "--autoprobe-update",
        action="store_true",
        default=False,
        help="rewrite changed or missing autoprobe_snapshot baselines; those tests fail once, naming the files",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Start the list of baselines written during the session."""
    config.stash[_WRITTEN] = []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """List every baseline file the session wrote, so none goes uncommitted unnoticed."""
    written = config.stash.get(_WRITTEN, [])
    if written:
        terminalreporter.section("autoprobe baselines written")
        for line in written:
            terminalreporter.write_line(line)
        terminalreporter.write_line("review and commit them; the next run compares against them")


class AutoprobeSnapshot:
    """Compares a model's selection with the baseline stored for the current test.

    Attributes:
        path: the baseline file of this test.
        update: ``--autoprobe-update`` was given.

    Example:
        >>> def test_points(autoprobe_snapshot):  # doctest: +SKIP
        ...     autoprobe_snapshot.check("resnet18")
    """

    def __init__(self, path: Path, update: bool, written: list[str], rootdir: Path) -> None:
        self.path = path
        self.update = update
        self._written = written
        self._rootdir = rootdir

    def _shown(self) -> str:
        try:
            return str(self.path.relative_to(self._rootdir))
        except ValueError:
            return str(self.path)

    def _read(self) -> Lock | None:
        from .errors import LockError
        from .lockfile import read_lock

        if not self.path.exists():
            return None
        try:
            return read_lock(self.path)
        except LockError as exc:  # say which baseline, and how to recover
            pytest.fail(
                f"autoprobe: baseline {self._shown()} cannot be read: {exc}\n"
                "Delete it and rerun (it is written afresh), or rerun with --autoprobe-update.",
                pytrace=False,
            )

    def _write(self, key: str, entry: LockEntry, baseline: Lock | None, how: str) -> None:
        from .lockentry import versions
        from .lockfile import Lock, save_lock

        entries = dict(baseline.entries) if baseline else {}
        entries[key] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_lock(self.path, Lock(entries, versions()))
        self._written.append(f"{how} {self._shown()} ({key})")

    def check(
        self,
        model: str | nn.Module,
        *,
        name: str | None = None,
        input_size: Sequence[int] | None = None,
        mode: str = "eval",
        rules: str = "default",
        points: int | None = None,
        leaf: Sequence[str] = (),
        model_args: Mapping[str, Any] | None = None,
        input_name: str | None = None,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> LockEntry:
        """Fail the test unless ``model``'s selection equals its baseline.

        Args:
            model: a model spec (timm name, ``tv:NAME``, ``package.module:factory``) or an ``nn.Module``
                (it is never run or mutated).
            name: the key in the baseline file; defaults to the spec, or the module's class name.
            input_size: input without batch; defaults to the model's own.
            mode: ``"eval"`` or ``"train"``.
            rules: a built-in pack name or a ``.toml`` path (relative to the current directory).
            points: force M.
            leaf: module paths to keep as single nodes.
            model_args: keyword arguments of a spec's builder (``{"encoder_weights": None}``).
            input_name: the forward parameter the input is passed as (``"pixel_values"``).
            forward_kwargs: further forward arguments, fixed while tracing (JSON-able values).

        Returns:
            The recomputed ``LockEntry`` (what ``autoprobe lock`` writes), when it matches.

        Raises:
            LockError: a setting has the wrong type or value (``mode="both"``, ``points=0``).

        Example:
            >>> autoprobe_snapshot.check("resnet18", input_size=(3, 160, 160))  # doctest: +SKIP
        """
        from .lockdiff import diff_entries
        from .lockentry import lock_entry
        from .lockfile import LockSettings

        settings = LockSettings.parse(
            {"input_size": input_size or None, "mode": mode, "rules": rules, "points": points, "leaf": leaf,
             "model_args": model_args or {}, "input_name": input_name, "forward_kwargs": forward_kwargs or {}},
            "autoprobe_snapshot.check", hint="Hint: fix the argument in the test.",
        )
        key = name or (model.strip() if isinstance(model, str) else type(model).__name__)
        entry = lock_entry(model, settings)
        baseline = self._read()
        old = baseline.entries.get(key) if baseline else None
        if old is None:
            self._write(key, entry, baseline, "wrote")
            pytest.fail(
                f"autoprobe: no baseline for {key!r} yet; wrote it to {self._shown()}.\n"
                "Review it and commit it: the test passes from the next run on while the selection stays the same.",
                pytrace=False,
            )
        changes, context = diff_entries(old, entry)
        if not changes:
            if self.update and context:
                self._write(key, entry, baseline, "refreshed (context only)")
            return entry
        listed = "\n".join(f"  {line}" for line in changes)
        if self.update:
            self._write(key, entry, baseline, "updated")
            pytest.fail(
                f"autoprobe: baseline of {key!r} in {self._shown()} rewritten (--autoprobe-update); it changed:\n"
                f"{listed}\nRerun without --autoprobe-update to confirm, then commit the file.",
                pytrace=False,
            )
        pytest.fail(
            f"autoprobe: the selection of {key!r} changed against {self._shown()}:\n{listed}\n"
            "If the change is intended, rerun with --autoprobe-update and commit the file.",
            pytrace=False,
        )

    __call__ = check


def _baseline_path(request: pytest.FixtureRequest) -> Path:
    test_file = Path(request.node.path)
    name = request.node.name if request.cls is None else f"{request.cls.__name__}.{request.node.name}"
    return test_file.parent / test_file.stem / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}{_SUFFIX}"


@pytest.fixture
def autoprobe_snapshot(request: pytest.FixtureRequest) -> AutoprobeSnapshot:
    """Snapshot the supervision points of models in one line: ``autoprobe_snapshot.check("resnet50")``.

    Returns:
        An ``AutoprobeSnapshot`` bound to this test's baseline file,
        ``<test_file_stem>/<test_name>.autoprobe.json`` next to the test file.

    Example:
        >>> def test_points(autoprobe_snapshot):  # doctest: +SKIP
        ...     autoprobe_snapshot.check("vit_tiny_patch16_224")
    """
    config = request.config
    return AutoprobeSnapshot(
        _baseline_path(request),
        bool(config.getoption("autoprobe_update")),
        config.stash.get(_WRITTEN, []),
        Path(str(config.rootpath)),
    )

