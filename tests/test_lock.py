"""Lockfiles, `autoprobe lock` / `autoprobe check`, and the stability guarantees they rest on.

A lock is only worth committing if the same selection always writes the same
bytes, so the guarantees of issue 3 are tested here: byte-identical across
processes, hash seeds and worker counts; the same for a model built on meta or
on CPU; train and eval graphs agree or the difference is reported; the
selection does not depend on batch size nor, where the architecture allows, on
input resolution. The committed reference lock is checked for coverage here and
recomputed by `.ci/run` (and by the slow tests).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from autoprobe import lockpool
from autoprobe.cli import main
from autoprobe.errors import LockError
from autoprobe.graph import build_layer_graph
from autoprobe.lock import check_lock, lock_entry, mode_diff
from autoprobe.lockconfig import load_config
from autoprobe.lockdiff import diff_entries
from autoprobe.lockentry import versions
from autoprobe.lockfile import (
    FiredRule,
    Lock,
    LockedPoint,
    LockEntry,
    LockSettings,
    RulePackRef,
    dumps_lock,
    read_lock,
    save_lock,
)
from autoprobe.models import resolve_model
from autoprobe.report import to_json
from autoprobe.rules import load_rules
from autoprobe.select import select_points
from autoprobe.trace import TraceOptions, trace_fx

REPO = Path(__file__).resolve().parent.parent
REFERENCE_LOCK = REPO / "autoprobe.lock"

# Every family issue 3 names -> a prefix one of its reference models starts with.
FAMILIES = {
    "ResNet": "resnet", "ResNeXt": "resnext", "RegNet": "regnet", "EfficientNet": "efficientnet_",
    "MobileNetV3": "mobilenetv3", "ConvNeXt": "convnext", "ViT": "vit_", "DeiT": "deit", "Swin": "swin",
    "BEiT": "beit", "MaxViT": "maxvit", "CoAtNet": "coatnet", "EfficientFormer": "efficientformer",
    "PoolFormer": "poolformer", "MLP-Mixer": "mixer", "HRNet": "hrnet", "Inception": "inception",
    "DenseNet": "densenet", "DLA": "dla", "CSPNet": "csp", "NFNet": "dm_nfnet", "Xception": "xception",
    "VGG": "vgg", "GhostNet": "ghostnet", "RepVGG": "repvgg", "LeViT": "levit", "PVT-v2": "pvt_v2",
    "CaiT": "cait", "XCiT": "xcit", "U-Net / feature pyramid": "tv:lraspp",
}


@pytest.fixture(scope="module")
def resnet18_entry() -> LockEntry:
    return lock_entry("resnet18")


@pytest.fixture
def locked(tmp_path: Path, resnet18_entry: LockEntry, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A lockfile holding resnet18, in a folder without a pyproject (the CLI reads ./pyproject.toml)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "models.lock"
    save_lock(path, Lock({"resnet18": resnet18_entry}, versions()))
    return path


def _edit(path: Path, change: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(to_json(data), encoding="utf-8")


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _floats(v)]
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return []


# ------------------------------------------------------------------------------------------ format


def test_lock_is_canonical_json_without_floats(resnet18_entry: LockEntry) -> None:
    text = dumps_lock(Lock({"resnet18": resnet18_entry}, versions()))
    lock = json.loads(text)
    assert text.endswith("}\n") and text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert _floats(lock) == []
    assert lock["lock_version"] == 1 and set(lock["versions"]) == {"autoprobe", "timm", "torch", "torchvision"}
    entry = lock["models"]["resnet18"]
    assert entry["settings"] == {"input_size": [3, 224, 224], "leaf": [], "mode": "eval", "points": None, "rules": "default"}
    assert entry["rule_pack"]["name"] == "default" and len(entry["rule_pack"]["sha256"]) == 64
    assert entry["num_points"] == len(entry["points"]) and entry["depth"] == 18 and entry["backend"] == "fx"
    point = entry["points"][0]
    assert set(point) == {"name", "module_path", "depth", "shape", "layout", "rules"}
    assert point["rules"] == sorted(point["rules"], key=lambda r: (r["detector"], r["reason"]))
    assert "candidates" not in entry


def test_lock_bytes_are_identical_across_processes_hash_seeds_and_workers(tmp_path: Path) -> None:
    models = ["resnet18", "vit_tiny_patch16_224", "tv:lraspp_mobilenet_v3_large"]
    runs = []
    for seed, jobs in (("0", "1"), ("4242", "2")):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = tmp_path / f"seed{seed}.lock"
        cmd = [sys.executable, "-m", "autoprobe.cli", "lock", *models, "-o", str(out), "--jobs", jobs]
        runs.append((out, subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for out, proc in runs:
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log
    first, second = (out.read_bytes() for out, _ in runs)
    assert first == second
    assert sorted(json.loads(first)["models"]) == sorted(models)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100", "vit_tiny_patch16_224"])
def test_meta_and_cpu_built_models_give_identical_entries(name: str) -> None:
    import timm

    cpu = timm.create_model(name, pretrained=False)
    assert next(cpu.parameters()).device.type == "cpu"
    assert lock_entry(cpu) == lock_entry(name)


# ------------------------------------------------------------------------------- train / eval mode


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_train_and_eval_graphs_give_the_same_selection(name: str) -> None:
    assert mode_diff(name) == []


class _AuxInTraining(nn.Module):
    """A model whose training graph has an extra branch (like an auxiliary head)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.aux = nn.Sequential(*(m for _ in range(4) for m in (nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())))
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.training:
            x = x + self.aux(x)
        return self.head(self.body(x))


def test_train_eval_difference_is_reported() -> None:
    changes = mode_diff(_AuxInTraining(), LockSettings(input_size=(3, 32, 32)))
    assert any(line.startswith("D (weight layers): ") for line in changes), changes
    assert all("->" in line or line.startswith(("point added", "point removed", "note")) for line in changes)


def test_lock_records_the_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["lock", "resnet18", "--mode", "train", "-o", "train.lock"]) == 0
    assert read_lock(tmp_path / "train.lock").entries["resnet18"].settings.mode == "train"
    assert main(["check", "train.lock"]) == 0


# ---------------------------------------------------------------------- batch size and resolution


def _verdicts(selection: Any) -> list[tuple[str, int, list[str]]]:
    return [(p.name, p.depth, sorted({f.detector for f in p.fired})) for p in selection.points]


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_selection_does_not_depend_on_batch_size(name: str) -> None:
    model, pack = resolve_model(name).module, load_rules()
    seen = []
    for batch in (1, 2, 5):
        traced = trace_fx(model, (3, 224, 224), TraceOptions(batch_size=batch))
        selection = select_points(build_layer_graph(traced), pack)
        assert all(p.shape[0] == batch for p in selection.points)
        seen.append((_verdicts(selection), [p.shape[1:] for p in selection.points], selection.depth))
    assert seen[0] == seen[1] == seen[2]


@pytest.mark.parametrize(("name", "sizes"), [("resnet18", (224, 256, 320)), ("convnext_atto", (224, 288))])
def test_selection_does_not_depend_on_resolution(name: str, sizes: tuple[int, ...]) -> None:
    entries = [lock_entry(name, LockSettings(input_size=(3, s, s))) for s in sizes]
    names = [[(p.name, p.depth, sorted(p.detectors)) for p in e.points] for e in entries]
    assert all(n == names[0] for n in names), names
    assert len({e.depth for e in entries}) == 1


# --------------------------------------------------------------------------------------- diff


def _point(name: str, depth: int, *detectors: str) -> LockedPoint:
    return LockedPoint(name, name, depth, (2, 8, 4, 4), "NCHW", tuple(FiredRule(d, f"{d} at {name}") for d in detectors))


def _entry(*points: LockedPoint, depth: int = 20) -> LockEntry:
    return LockEntry(LockSettings((3, 16, 16)), RulePackRef("default", "a" * 64), "fx", depth, len(points), 3,
                     (2, 3, 16, 16), (), points)


def _changes(old: LockEntry, new: LockEntry) -> list[str]:
    return list(diff_entries(old, new).changes)


def test_diff_names_moved_added_removed_points_and_rule_verdicts() -> None:
    old = _entry(_point("a", 2, "skip"), _point("b", 8, "fusion"), _point("c", 14, "skip"))
    new = _entry(_point("a", 3, "skip", "fusion"), _point("b2", 9, "fusion"), _point("d", 17, "attention"))
    lines = _changes(old, new)
    assert "point moved: b (depth 8; fusion) -> b2 (depth 9; fusion)" in lines
    assert "point moved: c (depth 14; skip) -> d (depth 17; attention)" in lines
    assert "point a: depth 2 -> 3" in lines
    assert "point a: rule fusion now fires: fusion at a" in lines
    assert diff_entries(old, copy.deepcopy(old)) == ((), ())
    fewer = _entry(*old.points[:2])
    assert _changes(old, fewer) == ["M (points): 3 -> 2", "point removed: c (depth 14; skip)"]
    assert _changes(fewer, old) == ["M (points): 2 -> 3", "point added: c (depth 14; skip)"]
    quiet = _entry(*old.points[:2], replace(old.points[2], rules=()))
    assert _changes(old, quiet) == ["point c: rule skip no longer fires (was: skip at c)"]
    reordered = _entry(old.points[1], old.points[0], old.points[2])
    assert _changes(old, reordered) == ["points: execution order changed"]
    shapes = _entry(replace(old.points[0], shape=(2, 8, 2, 2), layout="NHWC"), *old.points[1:])
    assert _changes(old, shapes) == ["point a: shape [2, 8, 4, 4] -> [2, 8, 2, 2]", "point a: layout 'NCHW' -> 'NHWC'"]


def test_diff_keeps_context_apart_from_changes() -> None:
    old = _entry(_point("a", 2, "skip"))
    reworded = replace(old, points=(replace(old.points[0], rules=(FiredRule("skip", "better words"),)),),
                       rule_pack=RulePackRef("default", "b" * 64), notes=("min_distance relaxed",))
    diff = diff_entries(old, reworded)
    assert diff.changes == ()
    assert diff.context == (
        "point a: rule skip reason reworded: 'skip at a' -> 'better words'",
        "rule pack default: sha256 aaaaaaaaaaaa (locked) -> bbbbbbbbbbbb (now)",
        "note new: min_distance relaxed",
    )
    other = replace(old, settings=replace(old.settings, mode="train"))
    assert diff_entries(old, other).changes == (
        "settings: {'input_size': [3, 16, 16], 'mode': 'eval', 'rules': 'default', 'points': None, 'leaf': []} -> "
        "{'input_size': [3, 16, 16], 'mode': 'train', 'rules': 'default', 'points': None, 'leaf': []}",
    )


# -------------------------------------------------------------------------------------- check CLI


def test_check_passes_on_an_unchanged_lock(locked: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(locked)]) == 0
    assert "1 unchanged, 0 changed" in capsys.readouterr().out


def test_check_without_a_terminal_prints_a_line_per_model_as_it_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a CI log there is no progress bar: each model says it is done, before the summary."""
    monkeypatch.chdir(tmp_path)
    assert main(["lock", "resnet18", "vgg11", "-o", "two.lock"]) == 0
    _edit(tmp_path / "two.lock", lambda data: data["models"]["vgg11"].update(depth=3))
    capsys.readouterr()
    assert main(["check", "two.lock"]) == 1
    lines = capsys.readouterr().out.splitlines()
    done = [line.rsplit(" (", 1)[0] for line in lines if line.startswith("checked ") and " in " not in line]
    assert done == ["checked resnet18: unchanged", "checked vgg11: changed (1 difference)"]
    assert lines.index(next(line for line in lines if line.startswith("checked vgg11:"))) < lines.index(
        next(line for line in lines if line.startswith("checked 2 models")))


def test_changing_one_entry_fails_check_with_a_diff_naming_model_and_point(
    locked: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def rename(data: dict[str, Any]) -> None:
        data["models"]["resnet18"]["points"][1]["name"] = "layer2.0.act2"

    _edit(locked, rename)
    assert main(["check", str(locked)]) == 1
    out = capsys.readouterr().out
    assert "resnet18: selection changed:" in out
    assert "point moved: layer2.0.act2 (depth 9; downsampling, stage-boundary) -> layer2.1.act2" in out
    assert "--update" in out


def test_check_reports_a_rule_that_stopped_firing(locked: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def add_rule(data: dict[str, Any]) -> None:
        data["models"]["resnet18"]["points"][0]["rules"].append({"detector": "skip", "reason": "long skip"})

    _edit(locked, add_rule)
    assert main(["check", str(locked)]) == 1
    assert "point layer1.1.act2: rule skip no longer fires (was: long skip)" in capsys.readouterr().out


def test_versions_and_pack_hash_are_context_not_failures(locked: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def age(data: dict[str, Any]) -> None:
        data["versions"]["torch"] = "2.4.0"
        data["models"]["resnet18"]["rule_pack"]["sha256"] = "0" * 64

    _edit(locked, age)
    assert main(["check", str(locked)]) == 0
    out = capsys.readouterr().out
    assert "torch 2.4.0 (locked) ->" in out and "sha256 000000000000 (locked) ->" in out


def test_check_update_rewrites_the_lock_and_says_what_changed(
    locked: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = locked.read_bytes()
    _edit(locked, lambda d: d["models"]["resnet18"].update(depth=17))
    assert main(["check", str(locked), "--update"]) == 0
    out = capsys.readouterr().out
    assert "D (weight layers): 17 -> 18" in out and f"updated {locked}" in out
    assert locked.read_bytes() == original
    assert main(["check", str(locked), "--update"]) == 0
    assert "is up to date" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{\n  \"lock_version\": 1,\n<<<<<<< HEAD\n", "not valid JSON"),
        ('{"lock_version": 99, "models": {}}', "lock_version 99"),
        ('{"lock_version": 1, "models": {}}', "lists no models"),
        ('{"lock_version": 1, "models": {"resnet18": {"points": [], "settings": {"mode": "both"}}}}', "settings.mode"),
        ("[1, 2]", "not an autoprobe lockfile"),
    ],
)
def test_missing_or_malformed_lock_is_an_error_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / "autoprobe.lock").write_text(content, encoding="utf-8")
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert message in err and "autoprobe.lock" in err and ("Hint" in err or "autoprobe lock" in err)


# --------------------------------------------------------------------------------------- lock CLI


def test_a_failing_model_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["lock", "resnet18", "resnet_nonexistent", "-o", "x.lock"]) == 2
    out = capsys.readouterr().out
    assert "1 of 2 models failed" in out and "resnet_nonexistent: unknown model" in out
    assert list(read_lock(tmp_path / "x.lock").entries) == ["resnet18"]


def test_an_unexpected_failure_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    real = lockpool.lock_entry

    def flaky(model: Any, *args: Any, **kwargs: Any) -> LockEntry:
        if model == "vgg11":
            raise RuntimeError("boom")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(lockpool, "lock_entry", flaky)
    assert main(["lock", "vgg11", "resnet_nonexistent", "resnet18", "-o", "x.lock"]) == 1
    out = capsys.readouterr().out
    assert "vgg11: RuntimeError: boom" in out and "2 of 3 models failed" in out


def test_lock_without_models_or_config_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    def error(*args: str) -> str:
        code = main(["lock", *args])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.startswith("autoprobe: error: ") and "Traceback" not in err, err
        return err

    err = error()
    assert "no MODEL given" in err and "[tool.autoprobe]" in err and "Hint: `autoprobe lock resnet50" in err
    err = error("resnet18", "-o", "no/such/dir/x.lock")
    assert "'no/such/dir/x.lock'" in err and "folder 'no/such/dir' does not exist" in err and "Hint: create it first" in err
    err = error("resnet18", "--rules", "no_such_pack")
    assert "'no_such_pack'" in err and "default" in err  # names the pack, lists the ones that exist
    err = error("resnet18", "--jobs", "-1")
    assert "--jobs -1" in err and "Hint: give N >= 1, or 0 for one per CPU" in err
    err = error("resnet18", "--points", "0")
    assert "--points 0" in err and "Hint:" in err
    assert not (tmp_path / "autoprobe.lock").exists()


def test_pyproject_lists_the_models_and_check_flags_stale_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "packs").mkdir()
    (tmp_path / "packs" / "mine.toml").write_text('[pack]\nextends = "default"\n[selection]\npoints = 2\n')
    (tmp_path / "locks").mkdir()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[tool.autoprobe]\nlockfile = "locks/ref.lock"\nrules = "packs/mine.toml"\n'
        'models = ["resnet18", {model = "mobilenetv3_small_100", input_size = [3, 160, 160], rules = "default"}]\n'
    )
    monkeypatch.chdir(tmp_path)
    assert main(["lock"]) == 0
    entries = read_lock(tmp_path / "locks" / "ref.lock").entries
    assert entries["resnet18"].settings.rules == "../packs/mine.toml"
    assert entries["resnet18"].num_points == 2
    assert entries["mobilenetv3_small_100"].settings.input_size == (3, 160, 160)
    assert entries["mobilenetv3_small_100"].settings.rules == "default"
    assert main(["check"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a relative rules path is resolved against the lockfile's folder
    assert main(["check", str(tmp_path / "locks" / "ref.lock")]) == 0
    monkeypatch.chdir(tmp_path)
    pyproject.write_text(pyproject.read_text().replace('models = ["resnet18",', 'models = ["resnet18", "vgg11",'))
    capsys.readouterr()
    assert main(["check"]) == 1
    assert "stale: vgg11: listed in pyproject.toml but not in the lock" in capsys.readouterr().out


def test_malformed_pyproject_table_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool.autoprobe]\nmodels = ["resnet18", 3]\n')
    with pytest.raises(LockError, match=r"models\[1\]"):
        load_config(path)
    path.write_text('[tool.autoprobe]\nmodel = ["resnet18"]\n')
    with pytest.raises(LockError, match="unknown key 'model'"):
        load_config(path)


# ---------------------------------------------------------------------------------- reference set


def test_reference_lock_covers_every_family_and_matches_pyproject() -> None:
    lock = read_lock(REFERENCE_LOCK)
    keys = list(lock.entries)
    assert len(keys) >= 30
    missing = [family for family, prefix in FAMILIES.items() if not any(k.startswith(prefix) for k in keys)]
    assert not missing, f"no reference model for {missing}"
    configured = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["autoprobe"]["models"]
    assert sorted(m if isinstance(m, str) else m["model"] for m in configured) == sorted(keys)
    assert REFERENCE_LOCK.read_text(encoding="utf-8") == dumps_lock(lock)


@pytest.mark.slow
def test_reference_lock_is_current() -> None:
    result = check_lock(REFERENCE_LOCK, workers=2)
    assert not result.failed, "\n".join(f"{r.key}: {r.error or r.changes}" for r in result.failed)


@pytest.mark.slow
def test_reference_set_meta_and_cpu_agree_and_train_eval_agree() -> None:
    lock = read_lock(REFERENCE_LOCK)
    differences = []
    for key, entry in lock.entries.items():
        settings = entry.settings
        if mode_diff(key, settings):
            differences.append(f"{key}: train differs from eval: {mode_diff(key, settings)}")
        if key.startswith("tv:"):
            continue  # torchvision's segmentation models are slow to initialize on CPU
        params = sum(p.numel() for p in resolve_model(key).module.parameters())
        if params > 40_000_000:
            continue  # too big to build on CPU in a test
        cpu = resolve_model(key, device="cpu").module
        if lock_entry(cpu, settings) != lock_entry(key, settings):
            differences.append(f"{key}: CPU-built entry differs from the meta-built one")
    assert not differences, "\n".join(differences)


def test_a_reworded_reason_is_context_not_a_failure(locked: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def reword(data: dict[str, Any]) -> None:
        data["models"]["resnet18"]["points"][0]["rules"][0]["reason"] = "old wording"

    _edit(locked, reword)
    assert main(["check", str(locked)]) == 0
    assert "point layer1.1.act2: rule downsampling reason reworded: 'old wording' -> " in capsys.readouterr().out
