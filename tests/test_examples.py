"""The examples cannot rot: compare.py's --quick path trains every method on both tasks, skips
finished runs on a rerun, and --render turns results into tables and PNGs; the Fashion-MNIST
example trains, strips and scores in its --quick mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "examples" / "compare.py"
DATA = Path("/usr/share/datasets/fashion-mnist")

pytest.importorskip("segmentation_models_pytorch")
pytestmark = pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").exists() and
                                not (DATA / "train-images-idx3-ubyte").exists(),
                                reason="needs `apt-get install -y dataset-fashion-mnist`")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(COMPARE), *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_quick_trains_every_method_on_both_tasks_then_skips_them(tmp_path):
    results = tmp_path / "runs.jsonl"
    first = _run("--quick", "--threads", "1", "--results", str(results))
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted((r["task"], r["method"]) for r in records) == sorted(
        (t, m) for t in ("seg", "cls") for m in ("baseline", "dsn", "imachsr", "dks"))
    for r in records:
        assert r["quick"] and r["steps"] == 3 and r["seed"] == 0
        assert {"wall_s", "cpu_s", "step_wall_s"} <= set(r["times"])
        assert {"commit", "source_sha256"} <= set(r["autoprobe"]) and "torch" in r["versions"]
        if r["task"] == "seg":
            assert {"mIoU", "mF1", "mPrecision", "mRecall"} <= set(r["metrics"])
        else:
            assert 0.0 <= r["metrics"]["accuracy"] <= 1.0
        # the baseline has no points; every deep-supervision method trained at the same automatic ones
        assert (r["points"] == []) == (r["method"] == "baseline")
    seg_points = {tuple(r["points"]) for r in records if r["task"] == "seg" and r["method"] != "baseline"}
    assert len(seg_points) == 1

    again = _run("--quick", "--task", "cls", "--threads", "1", "--results", str(results))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 runs in the grid, 4 already in" in again.stdout and "0 to do" in again.stdout
    assert len(results.read_text().splitlines()) == 8

    # --render reads the results (quick runs are marked and left out of evidence, so unmark a copy)
    full = tmp_path / "full.jsonl"
    full.write_text("".join(json.dumps({**r, "quick": False}) + "\n" for r in records))
    out = tmp_path / "evidence"
    rendered = _run("--render", "--results", str(full), "--out", str(out))
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    tables = (out / "tables.md").read_text()
    assert "## seg / deeplabv3plus" in tables and "## cls / resnet18n" in tables
    # summary.json: the schema other tools read (issue 15 section 5), deltas paired against the baseline
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("seg", "cls")
                                                        for m in ("baseline", "dsn", "imachsr", "dks")}
    for row in rows:
        assert set(row) == {"task", "model", "method", "seeds", "metric", "mean", "sd", "delta", "ci95",
                            "pixel_accuracy", "trivial_pixel_accuracy", "steps", "batch"}
        assert row["metric"] == ("miou" if row["task"] == "seg" else "accuracy") and 0 <= row["mean"] <= 1
        assert (row["delta"] is None) == (row["method"] == "baseline") and row["ci95"] is None  # one seed
        assert (row["trivial_pixel_accuracy"] is None) == (row["task"] == "cls")
    seg = {r["method"]: r for r in rows if r["task"] == "seg"}
    assert seg["imachsr"]["delta"] == pytest.approx(seg["imachsr"]["mean"] - seg["baseline"]["mean"])
    assert 0.5 < seg["baseline"]["trivial_pixel_accuracy"] < 1

    # a validation pilot is listed as a pilot and kept out of the results
    pilot = {**records[0], "quick": False, "pilot": True, "method": "imachsr", "setting": "auto"}
    full.write_text(full.read_text() + json.dumps(pilot) + "\n")
    again = _run("--render", "--results", str(full), "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 validation pilots" in (out / "tables.md").read_text()
    assert json.loads((out / "summary.json").read_text())["rows"] == rows
    assert {p.name for p in out.glob("*.png")} >= {"curves_deeplabv3plus.png", "bars_deeplabv3plus.png",
                                                   "qualitative_seg.png"}


def test_a_missing_data_set_says_which_package_to_install(tmp_path):
    result = _run("--quick", "--task", "cls", "--data", str(tmp_path), "--results", str(tmp_path / "r.jsonl"))
    assert result.returncode == 2
    assert "apt-get install -y dataset-fashion-mnist" in result.stderr


def test_fashion_mnist_example_quick_trains_strips_and_scores():
    script = ROOT / "examples" / "train_fashion_mnist.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1"], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained on 512 images" in done.stdout
    assert "1 tap" in done.stdout or " taps," in done.stdout  # the report summary: it trained instrumented
    assert "dsn/" in done.stdout  # and logged the default objective's terms (DSN: CE at the output and the head)
    accuracy = float(done.stdout.rsplit("test accuracy of the stripped model:", 1)[1])
    assert 0.10 < accuracy <= 1.0  # above chance (0.10) after 8 steps
    missing = subprocess.run([sys.executable, str(script), "--quick", "--data", "/no/such/dir"], capture_output=True,
                             text=True, env=env, timeout=120, check=False)
    assert missing.returncode == 2 and "apt-get install -y dataset-fashion-mnist" in missing.stderr
