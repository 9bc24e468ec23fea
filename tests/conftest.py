"""Shared helpers: trace a toy model into a layer graph, run one detector or the policy, run the CLI.

Real models are built on the meta device (never with weights) and each one is
analysed at most once per test session (the ``analysed`` fixture).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import autoprobe.select as select_module
from autoprobe.api import Analysis, analyze
from autoprobe.cli import main
from autoprobe.detectors import Candidate, detector
from autoprobe.graph import LayerGraph, build_layer_graph
from autoprobe.rules import load_rules
from autoprobe.select import Selection, select_points
from autoprobe.trace import TraceOptions, trace_fx

torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# The timm models the issue names; built on meta, never with weights.
REFERENCE_MODELS = (
    "resnet50",
    "convnext_tiny",
    "vit_base_patch16_224",
    "efficientnet_b0",
    "swin_tiny_patch4_window7_224",
)


# ----------------------------------------------------------------------------- graphs and detectors


def graph_of(model: nn.Module, input_size: Sequence[int] = (3, 16, 16), **trace_options: Any) -> LayerGraph:
    """The layer graph of ``model`` for one input of ``input_size`` (batch excluded); keywords are ``TraceOptions`` fields."""
    return build_layer_graph(trace_fx(model, input_size, TraceOptions(**trace_options)))


def detect(graph: LayerGraph, detector_id: str, **options: Any) -> tuple[Candidate, ...]:
    """Run one detector with the options the built-in default pack gives it (what users get), overridden by ``options``."""
    module = detector(detector_id)
    unknown = set(options) - set(module.OPTIONS)
    assert not unknown, f"{detector_id} has no option {unknown}"
    return module.detect(graph, load_rules("default").detectors[detector_id].options | options)


def fired(graph: LayerGraph, detector_id: str, **options: Any) -> tuple[str, ...]:
    """The nodes one detector flags, in execution order, each once."""
    nodes = {c.node for c in detect(graph, detector_id, **options)}
    return tuple(sorted(nodes, key=lambda n: graph[n].order))


def snapshot(model: nn.Module) -> tuple[dict[str, bytes], dict[str, bool]]:
    """Every state tensor's bytes and every submodule's training flag."""
    state = {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}
    return state, {name: m.training for name, m in model.named_modules()}


# ----------------------------------------------------------------------------- selection policy


def select_with_candidates(
    graph: LayerGraph,
    monkeypatch: pytest.MonkeyPatch,
    strengths: dict[str, float],
    points: int | None = None,
    **policy: Any,
) -> Selection:
    """Select on ``graph`` as if the detectors had flagged exactly these nodes (node -> strength).

    The default pack's weights apply (stage-boundary: 1.0); ``policy`` overrides the
    default policy, with the position bias off unless given.
    """
    candidates = tuple(Candidate(n, "stage-boundary", f"hand-made at {n}", s) for n, s in strengths.items())
    monkeypatch.setattr(select_module, "run_detectors", lambda _graph, _options: candidates)
    default = load_rules("default")
    pack = dataclasses.replace(default, policy=dataclasses.replace(default.policy, **({"position": "none"} | policy)))
    return select_points(graph, pack, points=points)


# ----------------------------------------------------------------------------- real models


Analysed = Callable[[str], Analysis]
_ANALYSES: dict[str, Analysis] = {}


@pytest.fixture(scope="session")
def analysed() -> Analysed:
    """``analysed("resnet50")``: the model built on meta and analysed with the default pack, cached."""

    def get(spec: str) -> Analysis:
        if spec not in _ANALYSES:
            _ANALYSES[spec] = analyze(spec)
        return _ANALYSES[spec]

    return get


# ----------------------------------------------------------------------------- CLI


def inspect_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``autoprobe inspect ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main(["inspect", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2, one short ``autoprobe: error:`` message containing every fragment, no traceback.

    Short: at most a line per tracing backend tried, plus a summary and a hint.
    """
    assert code == 2
    assert err.startswith("autoprobe: error: ")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 6, err
    for fragment in fragments:
        assert fragment in err, err


def write_module(folder: Path, name: str, source: str) -> Path:
    """Write ``source`` to ``folder/name.py``, for a ``name:factory`` model spec."""
    path = folder / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    return path


def run_autoprobe(
    args: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m autoprobe.cli ARGS`` in a fresh process; ``env`` entries extend the current environment."""
    return subprocess.run(
        [sys.executable, "-m", "autoprobe.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        timeout=180,
        check=False,
    )
