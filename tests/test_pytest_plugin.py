"""The pytest plugin: the snapshot workflow users know from pytest-regressions, for supervision points.

Each scenario runs a small user test suite in a temporary folder with pytester
(in process, so torch is imported once): first run writes the baseline and
fails, the next passes, an edited baseline fails with a diff naming the model
and the point, ``--autoprobe-update`` rewrites and fails once, then passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
import torch
from torch import nn


def tiny():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def test_points(autoprobe_snapshot):
    autoprobe_snapshot.check("resnet18")
    autoprobe_snapshot(tiny(), name="tiny", input_size=(3, 16, 16))
"""


@pytest.fixture(scope="module", autouse=True)
def _warm_imports() -> None:
    """Import everything an analysis imports lazily before pytester snapshots ``sys.modules``.

    pytester's in-process runs drop modules imported during a run; torch registers native
    operator libraries on import and cannot do it twice, so they must be loaded up front.
    """
    from torch import nn

    from autoprobe.lock import LockSettings, lock_entry

    for mode in ("eval", "train"):
        lock_entry("resnet18", LockSettings(mode=mode))
        lock_entry(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), LockSettings((3, 16, 16), mode=mode))


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run the user's suite in process with only our plugin (other installed plugins would slow every run).

    The entry point itself is covered by ``test_plugin_is_registered_as_a_pytest11_entry_point``.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
        return pytester.runpytest("-p", "autoprobe.pytest_plugin", *args)


def _baseline(pytester: pytest.Pytester) -> Path:
    return pytester.path / "test_user" / "test_points.autoprobe.json"


def test_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    found = {e.name: e.value for e in entry_points(group="pytest11")}
    assert found.get("autoprobe") == "autoprobe.pytest_plugin"


def test_plugin_import_does_not_import_torch() -> None:
    code = "import sys, autoprobe.pytest_plugin; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_snapshot_workflow(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    baseline = _baseline(pytester)

    first = _run(pytester)
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*no baseline for 'resnet18' yet; wrote it to test_user*test_points.autoprobe.json*",
                                "*autoprobe baselines written*"])
    assert sorted(json.loads(baseline.read_text())["models"]) == ["resnet18"]

    second = _run(pytester)  # resnet18 passes now; tiny is new in the same file
    second.assert_outcomes(failed=1)
    second.stdout.fnmatch_lines(["*no baseline for 'tiny' yet*"])
    assert sorted(json.loads(baseline.read_text())["models"]) == ["resnet18", "tiny"]

    _run(pytester).assert_outcomes(passed=1)
    written = baseline.read_bytes()

    data = json.loads(written)
    data["models"]["resnet18"]["points"][0]["name"] = "layer1.0.act2"
    baseline.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    changed = _run(pytester)
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines([
        "*the selection of 'resnet18' changed against test_user*test_points.autoprobe.json:",
        "*point moved: layer1.0.act2 (depth 5; downsampling, stage-boundary) -> layer1.1.act2*",
        "*rerun with --autoprobe-update*",
    ])

    update = _run(pytester, "--autoprobe-update")
    update.assert_outcomes(failed=1)
    update.stdout.fnmatch_lines(["*baseline of 'resnet18'*rewritten (--autoprobe-update)*", "*updated test_user*"])
    assert baseline.read_bytes() == written
    _run(pytester, "--autoprobe-update").assert_outcomes(passed=1)
    _run(pytester).assert_outcomes(passed=1)


def test_versions_alone_never_fail_a_snapshot(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="def test_points(autoprobe_snapshot):\n    autoprobe_snapshot.check('resnet18')\n")
    _run(pytester).assert_outcomes(failed=1)
    baseline = _baseline(pytester)
    data = json.loads(baseline.read_text())
    data["versions"]["torch"] = "2.4.0"
    data["models"]["resnet18"]["rule_pack"]["sha256"] = "0" * 64
    baseline.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _run(pytester).assert_outcomes(passed=1)


def test_baselines_are_per_test_and_per_parameter(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="""
import pytest

@pytest.mark.parametrize("size", [160, 192])
def test_sizes(autoprobe_snapshot, size):
    autoprobe_snapshot.check("resnet18", input_size=(3, size, size))

class TestGroup:
    def test_points(self, autoprobe_snapshot):
        autoprobe_snapshot.check("resnet18", mode="train")
""")
    _run(pytester).assert_outcomes(failed=3)
    folder = pytester.path / "test_user"
    assert sorted(p.name for p in folder.iterdir()) == [
        "TestGroup.test_points.autoprobe.json", "test_sizes_160_.autoprobe.json", "test_sizes_192_.autoprobe.json",
    ]
    _run(pytester).assert_outcomes(passed=3)


def test_a_broken_baseline_fails_with_a_way_out(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="def test_points(autoprobe_snapshot):\n    autoprobe_snapshot.check('resnet18')\n")
    baseline = _baseline(pytester)
    baseline.parent.mkdir()
    baseline.write_text("{ not json")
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*baseline test_user*test_points.autoprobe.json cannot be read*",
                                 "*Delete it and rerun*"])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "both"}, "autoprobe_snapshot.check: mode must be 'eval' or 'train', not 'both'."),
    ({"points": 0}, "autoprobe_snapshot.check: points must be null or a positive integer, not 0."),
    ({"input_size": (3, -1, 8)}, "autoprobe_snapshot.check: input_size (3, -1, 8) is not an input size"),
    ({"input_name": "pixel values"}, "autoprobe_snapshot.check: input_name must be null or a forward parameter's name"),
    ({"model_args": {"weights": object}}, "autoprobe_snapshot.check: model_args['weights'] is a type"),
])
def test_a_bad_argument_raises_a_lock_error_naming_it(tmp_path: Path, kwargs: dict, message: str) -> None:
    from autoprobe.errors import LockError
    from autoprobe.pytest_plugin import AutoprobeSnapshot

    snapshot = AutoprobeSnapshot(tmp_path / "t.autoprobe.json", False, [], tmp_path)
    with pytest.raises(LockError) as caught:
        snapshot.check("resnet18", **kwargs)
    assert message in str(caught.value) and "Hint: fix the argument in the test." in str(caught.value)
    assert not snapshot.path.exists()


def test_model_arguments_are_part_of_the_snapshot(tmp_path: Path) -> None:
    from autoprobe.pytest_plugin import AutoprobeSnapshot

    snapshot = AutoprobeSnapshot(tmp_path / "t.autoprobe.json", False, [], tmp_path)
    settings = {"input_size": (3, 64, 64), "model_args": {"num_classes": 7}}
    with pytest.raises(pytest.fail.Exception, match="no baseline for 'tv:resnet18' yet"):
        snapshot.check("tv:resnet18", **settings)
    stored = json.loads(snapshot.path.read_text())["models"]["tv:resnet18"]["settings"]
    assert stored["model_args"] == {"num_classes": 7}
    assert snapshot.check("tv:resnet18", **settings).settings.model_args == {"num_classes": 7}
    # Other arguments are another selection setting: the snapshot fails, naming them.
    with pytest.raises(pytest.fail.Exception, match="'model_args': {'num_classes': 7}} -> .*'num_classes': 3"):
        snapshot.check("tv:resnet18", input_size=(3, 64, 64), model_args={"num_classes": 3})
