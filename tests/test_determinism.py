"""The same model gives the same bytes, whatever the process's string-hash seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

import pytest

from conftest import REFERENCE_MODELS, REPO

# Runs `autoprobe inspect ARGS --format json` for each ARGS in argv[1:] (JSON lists), in one process,
# so torch and timm are imported once. The first stderr line is the process's hash of a fixed string:
# it proves the two processes really iterate sets and dicts of strings in different orders.
SCRIPT = """
import json, sys
print("hash", hash("autoprobe-node-name"), file=sys.stderr, flush=True)
from autoprobe.cli import main
sys.exit(max(main(["inspect", *json.loads(args), "--format", "json"]) for args in sys.argv[1:]))
"""


def inspect_in_fresh_processes(runs: Sequence[Sequence[str]], hash_seeds: Sequence[str]) -> list[str]:
    """One fresh process per seed, side by side, each inspecting every run in turn; their stdouts.

    Fails unless the processes' string hashes differ, so equal outputs mean "independent of the
    hash seed", never "both processes happened to get the same seed".
    """
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *(json.dumps(list(run)) for run in runs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        for seed in hash_seeds
    ]
    outputs, hashes = [], set()
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        hashes.add(err.splitlines()[0])
        outputs.append(out)
    assert len(hashes) == len(hash_seeds), f"the hash seeds {hash_seeds} did not take effect: {hashes}"
    return outputs


def documents(output: str) -> list[dict]:
    """The JSON documents printed one after another."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(output.rstrip()):
        document, at = decoder.raw_decode(output, at)
        found.append(document)
        at += 1  # the newline after each document
    return found


def test_json_is_byte_identical_across_hash_seeds() -> None:
    runs = [["resnet50"], ["swin_tiny_patch4_window7_224", "--rules", "dense"]]
    first, second = inspect_in_fresh_processes(runs, ["1", "2024"])
    assert first == second
    resnet, swin = documents(first)
    assert (resnet["model"], resnet["num_points"]) == ("resnet50", 4)
    assert (swin["model"], swin["rules"]["name"]) == ("swin_tiny_patch4_window7_224", "dense")
    assert len(resnet["candidates"]) > 4 and len(swin["candidates"]) > 4


@pytest.mark.slow
def test_every_reference_model_is_byte_identical_across_hash_seeds() -> None:
    runs = [[spec] for spec in REFERENCE_MODELS] + [["tv:deeplabv3_resnet50", "--rules", "dense"]]
    first, second = inspect_in_fresh_processes(runs, ["0", "31337"])
    assert first == second
    assert [d["model"] for d in documents(first)] == [*REFERENCE_MODELS, "tv:deeplabv3_resnet50"]
