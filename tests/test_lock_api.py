"""The typed lock: records and their canonical JSON, one settings validator, and the Python API that writes a lock."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from autoprobe.errors import LockError
from autoprobe.lock import check_lock, lock_models, plan_lock
from autoprobe.lockconfig import ModelRequest, load_config
from autoprobe.lockfile import LockedPoint, LockEntry, LockSettings, dumps_lock, loads_lock, read_lock

REPO = Path(__file__).resolve().parent.parent
REFERENCE_LOCK = REPO / "autoprobe.lock"


# ------------------------------------------------------------------------------------ records and bytes


def test_reference_lock_reads_into_typed_records_and_writes_the_same_bytes() -> None:
    text = REFERENCE_LOCK.read_text(encoding="utf-8")
    lock = read_lock(REFERENCE_LOCK)
    entry = lock.entries["resnet18"]
    assert isinstance(entry, LockEntry) and all(isinstance(p, LockedPoint) for p in entry.points)
    assert entry.settings == LockSettings((3, 224, 224))
    assert entry.input_shape == (2, 3, 224, 224) and isinstance(entry.points[0].shape, tuple)
    assert entry.num_points == len(entry.points) == 3
    assert dumps_lock(lock) == text
    assert loads_lock(dumps_lock(lock), "again.lock") == lock


def _one_entry_lock(entry: dict) -> str:
    return json.dumps({"lock_version": 1, "versions": {}, "models": {"m": entry}})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e.update(depth="18"), "'depth' has the wrong type ('18')"),
        (lambda e: e.update(depth=True), "'depth' has the wrong type (True)"),
        (lambda e: e.pop("backend"), "the entry has no 'backend'"),
        (lambda e: e.update(scores=[1]), "unknown key 'scores'"),
        (lambda e: e["points"][0].update(shape=[2, 8.0]), "x.lock model 'm' point 0: 'shape' has the wrong type"),
        (lambda e: e["points"][0]["rules"].append({"detector": "skip"}), "a rule must be"),
        (lambda e: e["settings"].update(input_size=[3, 0, 0]), "settings.input_size [3, 0, 0] is not an input size"),
        (lambda e: e["settings"].update(size=[3, 8, 8]), "unknown setting settings.size"),
    ],
)
def test_a_malformed_entry_names_the_field_and_says_what_to_do(edit, message: str) -> None:  # noqa: ANN001
    entry = json.loads(dumps_lock(read_lock(REFERENCE_LOCK)))["models"]["resnet18"]
    edit(entry)
    with pytest.raises(LockError, match="autoprobe lock") as caught:
        loads_lock(_one_entry_lock(entry), "x.lock")
    assert message in str(caught.value) and "x.lock model 'm'" in str(caught.value)


# ------------------------------------------------------------------------------ one settings validator


def test_every_entry_point_rejects_a_boolean_input_size_alike(tmp_path: Path) -> None:
    """The pyproject table used to accept ``input_size = [true, 224, 224]`` that the lockfile rejected."""
    expected = "input_size [True, 224, 224] is not an input size: every entry must be a positive integer."
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.autoprobe]\nmodels = [{model = "resnet18", input_size = [true, 224, 224]}]\n')
    with pytest.raises(LockError) as from_pyproject:
        load_config(pyproject)
    assert f"{pyproject} [tool.autoprobe] models[0]: {expected}" in str(from_pyproject.value)

    entry = json.loads(dumps_lock(read_lock(REFERENCE_LOCK)))["models"]["resnet18"]
    entry["settings"]["input_size"] = [True, 224, 224]
    with pytest.raises(LockError) as from_lockfile:
        loads_lock(_one_entry_lock(entry), "x.lock")
    assert f"x.lock model 'm': settings.{expected}" in str(from_lockfile.value)

    with pytest.raises(LockError, match=r"LockSettings: input_size \(True, 224, 224\) is not an input size"):
        LockSettings((True, 224, 224))
    with pytest.raises(LockError, match=r"ModelRequest\('resnet18'\): input_size \(True, 224, 224\) is not an input size"):
        ModelRequest("resnet18", input_size=(True, 224, 224))
    # The same values are accepted everywhere, too: one integer is a square RGB input.
    pyproject.write_text('[tool.autoprobe]\nmodels = [{model = "resnet18", input_size = 160}]\n')
    assert load_config(pyproject).models[0].input_size == (3, 160, 160) == LockSettings(160).input_size


# ------------------------------------------------------------------------------------ writing a lock


def test_lock_models_applies_overrides_then_the_model_table_then_project_defaults(tmp_path: Path) -> None:
    (tmp_path / "locks").mkdir()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[tool.autoprobe]\nlockfile = "locks/ref.lock"\nmode = "train"\ninput_size = [3, 128, 128]\n'
        'models = ["resnet18", {model = "vgg11", input_size = [3, 96, 96], mode = "eval"}]\n'
    )
    run = lock_models(pyproject=pyproject, overrides=ModelRequest("", points=2))
    assert run.path == tmp_path / "locks" / "ref.lock" and run.written and not run.failed
    entries = read_lock(run.path).entries
    assert entries == run.entries
    assert entries["resnet18"].settings == LockSettings((3, 128, 128), "train", "default", 2)
    assert entries["vgg11"].settings == LockSettings((3, 96, 96), "eval", "default", 2)
    assert [e.num_points for e in entries.values()] == [2, 2]
    result = check_lock(pyproject=pyproject)  # the config's lockfile, nothing stale
    assert result.path == run.path and not result.failed and result.stale == ()


def test_plan_lock_takes_a_listed_models_table_and_refuses_nothing_to_lock(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.autoprobe]\nmodels = [{model = "resnet18", mode = "train"}]\n')
    plan = plan_lock(["resnet18", "vgg11", "resnet18"], output=tmp_path / "x.lock", pyproject=pyproject)
    assert [(j.key, j.settings.mode) for j in plan.jobs] == [("resnet18", "train"), ("vgg11", "eval")]
    with pytest.raises(LockError, match=r"no MODEL given .* Hint: `autoprobe lock resnet50"):
        plan_lock(pyproject=None)


def test_check_lock_reports_a_change_and_keeps_failed_entries(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    run = lock_models(["resnet18"], output=path, pyproject=None)
    entry = run.entries["resnet18"]
    text = dumps_lock(replace(read_lock(path), entries={"resnet18": replace(entry, depth=17)}))
    path.write_text(text, encoding="utf-8")
    result = check_lock(path)
    assert [r.changes for r in result.failed] == [("D (weight layers): 17 -> 18",)]
    assert result.updated.entries["resnet18"] == entry


def test_the_cli_writes_what_the_python_api_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprobe.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["lock", "resnet18", "--mode", "train", "--points", "2", "-o", "cli.lock"]) == 0
    lock_models(["resnet18"], output="api.lock", overrides=ModelRequest("", mode="train", points=2), pyproject=None)
    assert (tmp_path / "cli.lock").read_bytes() == (tmp_path / "api.lock").read_bytes()


# ----------------------------------------------------------------- model and forward arguments (issues 17, 18.6)

# A factory with keyword arguments, and a model called as model(pixel_values=x): its first forward parameter is
# not the input. Written to tmp_path and imported from the current directory, as a user's module would be.
FACTORY_SOURCE = """\
from torch import nn


class Net(nn.Module):
    def __init__(self, width, blocks, head):
        super().__init__()
        layers, channels = [], 3
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, head["classes"]))

    def forward(self, scale=None, pixel_values=None):
        return self.head(self.body(pixel_values))


def build(width=8, blocks=2, head=None, weights="download-me"):
    if weights is not None:
        raise RuntimeError("this factory would download weights; pass weights=None")
    return Net(width, blocks, head or {"classes": 4})


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=64, num_labels=5)
    return ViTForImageClassification(config)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "user_models.py").write_text(FACTORY_SOURCE, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_model_args_and_input_name_are_locked_and_replayed(user_module: Path) -> None:
    request = ModelRequest("user_models:build", input_size=(3, 32, 32), input_name="pixel_values",
                           model_args={"weights": None, "blocks": 3, "head": {"classes": 6}})
    run = lock_models([request, "resnet18"], output="x.lock", pyproject=None)
    assert not run.failed
    stored = json.loads((user_module / "x.lock").read_text())["models"]
    assert stored["user_models:build"]["settings"]["model_args"] == {"blocks": 3, "head": {"classes": 6}, "weights": None}
    assert stored["user_models:build"]["settings"]["input_name"] == "pixel_values"
    assert run.entries["user_models:build"].depth == 4  # three convs and the head: blocks=3 reached the factory
    # Recorded only when set: an entry without them keeps the bytes it always had.
    assert set(stored["resnet18"]["settings"]) == {"input_size", "leaf", "mode", "points", "rules"}
    assert check_lock("x.lock", workers=2).failed == ()  # replayed in worker processes too

    # The replay uses what is recorded: without the input name the input goes to `scale`.
    lock = read_lock("x.lock")
    entry = lock.entries["user_models:build"]
    edited = replace(entry, settings=replace(entry.settings, input_name=None))
    (user_module / "x.lock").write_text(dumps_lock(replace(lock, entries={**lock.entries, "user_models:build": edited})))
    (report,) = check_lock("x.lock").failed
    assert report.key == "user_models:build" and report.error


def test_pyproject_model_args_use_the_command_line_form(user_module: Path) -> None:
    pyproject = user_module / "pyproject.toml"
    pyproject.write_text(
        '[tool.autoprobe]\nmodels = [{model = "user_models:build", input_size = 32, input_name = "pixel_values", '
        'model_args = ["weights=None", "head={\'classes\': 6}"], forward_kwargs = ["scale=2"]}]\n'
    )
    (request,) = load_config(pyproject).models
    assert request.model_args == {"weights": None, "head": {"classes": 6}} and request.forward_kwargs == {"scale": 2}
    run = lock_models(pyproject=pyproject)
    assert not run.failed and check_lock(pyproject=pyproject).failed == ()
    # Asking for other arguments makes the lock stale, naming the setting.
    pyproject.write_text(pyproject.read_text().replace("weights=None", "weights=None\", \"blocks=3"))
    (line,) = check_lock(pyproject=pyproject).stale
    assert line.startswith("user_models:build: pyproject.toml asks for model_args")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('model_args = ["weights"]', "expected KEY=VALUE"),
        ('model_args = ["weights=none"]', "'none' is not a Python literal"),
        ('model_args = {"not a name" = 1}', "key 'not a name' is not a Python identifier"),
        ('input_name = "pixel values"', "input_name must be null or a forward parameter's name"),
        ('forward_kwargs = 3', "forward_kwargs must be a mapping"),
    ],
)
def test_bad_model_or_forward_arguments_in_pyproject_name_the_key(user_module: Path, table: str, message: str) -> None:
    pyproject = user_module / "pyproject.toml"
    pyproject.write_text(f'[tool.autoprobe]\nmodels = [{{model = "user_models:build", {table}}}]\n')
    with pytest.raises(LockError) as caught:
        load_config(pyproject)
    assert message in str(caught.value) and "models[0]" in str(caught.value) and "Hint: fix the value" in str(caught.value)


def test_a_tiny_hugging_face_model_called_by_keyword_is_locked(user_module: Path) -> None:
    request = ModelRequest("user_models:tiny_vit", input_size=(3, 32, 32), input_name="pixel_values",
                           forward_kwargs={"return_dict": False})
    run = lock_models([request], output="hf.lock", pyproject=None)
    assert not run.failed, run.failed
    settings = json.loads((user_module / "hf.lock").read_text())["models"]["user_models:tiny_vit"]["settings"]
    assert (settings["input_name"], settings["forward_kwargs"]) == ("pixel_values", {"return_dict": False})
    assert run.entries["user_models:tiny_vit"].num_points >= 1
    assert check_lock("hf.lock").failed == ()
