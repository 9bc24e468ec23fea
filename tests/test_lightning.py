"""The Lightning recipe (examples/lightning_probed.py) under DDP on 2 CPU processes, and
``autoprobe.plain_state_dict`` on the checkpoints people have."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoprobe
from autoprobe import plain_state_dict
from autoprobe.errors import UsageError

pytest.importorskip("lightning")

ROOT = Path(__file__).resolve().parent.parent
# The recipe is a script in examples/ (not a package): load it from its file, sys.path untouched.
_spec = importlib.util.spec_from_file_location("lightning_probed", ROOT / "examples" / "lightning_probed.py")
assert _spec is not None and _spec.loader is not None
lightning_probed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lightning_probed)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lightning")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lightning_probed.py"), "--devices", "2", "--steps", "4",
         "--out", str(out)],
        cwd=out, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return out


def test_the_recipe_runs_ddp_on_two_processes_and_logs_every_term(ddp_run: Path) -> None:
    run = json.loads((ddp_run / "run.json").read_text())
    assert run == {"world_size": 2, "strategy": "DDPStrategy"}
    with open(ddp_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    point = autoprobe.inspect(lightning_probed.make_model(), input_size=lightning_probed.IMAGE).names[0]
    for stage in ("train", "val"):
        assert {f"{stage}/loss", f"{stage}/ce", f"{stage}/dsn/{point}"} <= columns  # the default objective, DSN
    train = [r for r in rows if r["train/ce"]]
    assert len(train) == 4 and all(float(r[f"train/dsn/{point}"]) > 0 for r in train)  # a head's cross entropy
    assert any(r["val/loss"] for r in rows)


def test_the_summary_lists_the_adapters_as_their_own_row(ddp_run: Path) -> None:
    summary = (ddp_run / "summary.txt").read_text()
    probed = autoprobe.instrument(lightning_probed.make_model(), input_size=lightning_probed.IMAGE)
    adapters = next(line for line in summary.splitlines() if "probed.autoprobe_adapters" in line)
    assert f"| {probed.report.adapter_parameters} " in adapters, adapters
    assert any("probed.model " in line for line in summary.splitlines())


def test_the_lightning_checkpoint_gives_the_plain_model_strictly(ddp_run: Path) -> None:
    checkpoint = torch.load(ddp_run / "last.ckpt", map_location="cpu", weights_only=True)
    plain = plain_state_dict(ddp_run / "last.ckpt")
    expected = {k[len("probed.model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("probed.model.")}
    assert plain.keys() == expected.keys() and all(torch.equal(plain[k], v) for k, v in expected.items())
    model = lightning_probed.make_model()
    assert not model.load_state_dict(plain, strict=True).missing_keys
    shipped = torch.load(ddp_run / "plain.pt", weights_only=True)  # what the recipe loaded the same way
    assert all(torch.equal(shipped[k], v) for k, v in plain.items())


# --------------------------------------------------------------------------- plain_state_dict


def _probed() -> autoprobe.Probed:
    torch.manual_seed(0)
    return autoprobe.instrument(lightning_probed.make_model(), input_size=lightning_probed.IMAGE)


def test_plain_state_dict_reads_torch_save_files_with_any_wrapper_prefix(tmp_path: Path) -> None:
    probed = _probed()
    plain = probed.strip().state_dict()
    for prefix in ("", "module.", "_orig_mod.", "net.module."):
        path = tmp_path / "state.pt"
        torch.save({f"{prefix}{k}": v for k, v in probed.state_dict().items()}, path)
        got = plain_state_dict(path)
        assert got.keys() == plain.keys() and all(torch.equal(got[k], v) for k, v in plain.items()), prefix
    torch.save({"state_dict": probed.state_dict(), "epoch": 2}, tmp_path / "wrapped.pt")
    assert plain_state_dict(tmp_path / "wrapped.pt").keys() == plain.keys()
    assert plain_state_dict(probed).keys() == plain.keys()


def test_plain_state_dict_refuses_what_is_not_one_probed(tmp_path: Path) -> None:
    probed = _probed()
    with pytest.raises(UsageError, match=r"holds no autoprobe adapters.*Hint"):
        plain_state_dict(probed.strip().state_dict())
    both = {**{f"a.{k}": v for k, v in probed.state_dict().items()}, **{f"ema.{k}": v for k, v in probed.state_dict().items()}}
    with pytest.raises(UsageError, match=r"holds 2 Probeds, under the prefixes \['a\.', 'ema\.'\].*prefix="):
        plain_state_dict(both)
    assert plain_state_dict(both, prefix="ema.").keys() == probed.strip().state_dict().keys()
    with pytest.raises(UsageError, match=r"prefix='b\.' is not the prefix of a Probed.*\['a\.', 'ema\.'\]"):
        plain_state_dict(both, prefix="b.")
    with pytest.raises(UsageError, match=r"does not exist"):
        plain_state_dict(tmp_path / "missing.ckpt")
    torch.save(probed, tmp_path / "pickled.pt")
    with pytest.raises(UsageError, match=r"weights-only.*pickled Probed.*weights_only=False"):
        plain_state_dict(tmp_path / "pickled.pt")
    with pytest.raises(UsageError, match=r"holds no tensors"):
        plain_state_dict({"epoch": 1})


def test_the_readme_block_is_the_recipes_code() -> None:
    from _readme import python_block

    recipe = [line.strip() for line in (ROOT / "examples" / "lightning_probed.py").read_text().splitlines()]
    position = 0
    for line in python_block("### Lightning").splitlines():
        if line.strip():
            position = recipe.index(line.strip(), position) + 1  # in order, each line as the recipe has it
