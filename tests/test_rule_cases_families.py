"""Rule cases per model family (issue 25, problems 6-8), data-driven like ``test_smp_models.py``.

Each ``rule_cases/families/*.toml`` is a pack (it extends ``default`` or ``dense``) whose ``#>`` lines name a real
model and what an engineer checks on its selection:

* ``model``: ``{corpus = ID}`` (``corpus_models.CORPUS``), ``{smp = [architecture, encoder]}``,
  ``{torchvision = NAME}`` (a classifier), ``{timm = NAME}`` or ``{hf = "mobilevitv2"}`` (its default config), with
  ``input_size``;
* ``never``: regexes no candidate's ``detector: reason`` may match (a reason that is not true);
* ``sides``: module-path prefixes and how many points at least lie under each (encoder and decoder);
* ``lowest``: a point at the graph's lowest resolution of maps; ``no_raw_conv``: no point is a conv output read only by its
  norm; ``min_spread``: deepest minus shallowest point, as a fraction of D; ``min_channels``: every point's width;
* ``backend`` and ``tapped = {pattern, count}``: the backend, and how many points match (block outputs, not inner
  LayerNorms).

Cases marked ``slow`` run with ``-m slow``.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprobe.api import analyze
from autoprobe.rules import load_rules
from conftest import TESTS
from corpus_models import CORPUS

CASES = sorted((TESTS / "rule_cases" / "families").glob("*.toml"))


def expectation(path: Path) -> dict:
    return tomllib.loads("\n".join(line[2:] for line in path.read_text(encoding="utf-8").splitlines()
                                   if line.startswith("#>")))


def build(spec: dict) -> nn.Module:
    torch.manual_seed(0)
    if "corpus" in spec:
        case = next(c for c in CORPUS if c.id == spec["corpus"])
        pytest.importorskip(case.library)
        return case.build()
    if "smp" in spec:
        smp = pytest.importorskip("segmentation_models_pytorch")
        architecture, encoder = spec["smp"]
        return getattr(smp, architecture)(encoder_name=encoder, encoder_weights=None, classes=2)
    if "torchvision" in spec:
        import torchvision

        return getattr(torchvision.models, spec["torchvision"])(weights=None)
    if "timm" in spec:
        timm = pytest.importorskip("timm")
        return timm.create_model(spec["timm"], pretrained=False)
    if spec.get("hf") == "mobilevitv2":
        transformers = pytest.importorskip("transformers")
        return transformers.MobileViTV2ForSemanticSegmentation(transformers.MobileViTV2Config(num_labels=3))
    raise AssertionError(f"unknown model spec {spec}")


def _params(paths: list[Path]) -> list:
    return [pytest.param(p, id=p.stem, marks=pytest.mark.slow if expectation(p).get("slow") else ())
            for p in paths]


@pytest.mark.parametrize("path", _params(CASES))
def test_family_rule_case(path: Path) -> None:
    expected = expectation(path)
    model = build(expected["model"])
    analysis = analyze(model, input_size=tuple(expected["model"]["input_size"]), rules=load_rules(str(path)))
    graph, selection = analysis.graph, analysis.selection
    reasons = [f"{f.detector}: {f.reason}" for c in selection.candidates for f in c.fired]
    for pattern in expected.get("never", ()):
        assert not [r for r in reasons if re.search(pattern, r)], pattern
    for prefix, count in expected.get("sides", {}).items():
        assert sum(n.startswith(prefix) for n in selection.names) >= count, (prefix, selection.names)
    if expected.get("lowest"):
        rank = len(graph.input_shape) - 2  # maps of the image's rank (not im2col's patch sequences)
        lowest = min(i.positions for i in graph
                     if i.channels is not None and i.spatial is not None and len(i.spatial) == rank and i.positions > 1)
        assert any(math.prod(p.shape[2:]) == lowest for p in selection.points), selection.names
    if expected.get("no_raw_conv"):
        for name in selection.names:
            readers = graph.successors(name)
            assert not (graph[name].kind == "conv" and len(readers) == 1 and readers[0].kind == "norm"), name
    if "min_spread" in expected:
        depths = [p.depth for p in selection.points]
        assert max(depths) - min(depths) >= expected["min_spread"] * selection.depth, (selection.names, depths)
    if "min_channels" in expected:
        assert all(graph[n].channels >= expected["min_channels"] for n in selection.names), selection.names
    if "backend" in expected:
        assert selection.backend == expected["backend"], selection.notes
    if "tapped" in expected:
        pattern, count = expected["tapped"]["pattern"], expected["tapped"]["count"]
        assert sum(bool(re.search(pattern, n)) for n in selection.names) >= count, selection.names
