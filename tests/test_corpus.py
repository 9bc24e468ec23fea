"""The real-models corpus (issue 25): models the other tests do not name, each end to end.

Every segmentation or classification model of ``corpus_models.CORPUS`` must: be inspected, be instrumented at the
points inspect chose, train one step with a gradient on every adapter, strip to the user's model whose outputs equal
those of an untouched copy given the trained weights, and leave every module's attributes as they were (``vars`` of
every module compared after ``analyze``, ``instrument``, the step and ``strip``; a deep copy reloads the state dict).
A detection model is inspected through its backbone and refused by ``instrument`` with what to pass. The fast subset
runs in the default suite; the rest is ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import autoprobe
from autoprobe.api import analyze
from autoprobe.errors import InstrumentError
from corpus_models import CORPUS, Case
from test_real_models import _assert_same_output
from test_side_effects import _shown, _state

torch.set_num_threads(2)


def _cases(fast: bool) -> list:
    return [pytest.param(c, id=c.id, marks=() if fast else pytest.mark.slow) for c in CORPUS if c.fast == fast]


def _target(logits: torch.Tensor) -> torch.Tensor:
    classes = logits.shape[1] if logits.shape[1] > 1 else 2
    return torch.randint(classes, (logits.shape[0], *logits.shape[2:]), generator=torch.Generator().manual_seed(1))


def check_case(case: Case) -> None:
    pytest.importorskip(case.library)
    torch.manual_seed(0)
    model = case.build()
    before, shown = _state(model), _shown(model)
    analysis = analyze(model, input_size=case.size, rules=case.rules)
    assert _state(model) == before and _shown(model) == shown, "analyze wrote to the model"
    selection = analysis.selection
    assert selection.points, selection.notes
    if case.detection:
        assert all(p.name.startswith("backbone.") for p in selection.points), selection.names
        with pytest.raises(InstrumentError, match="Hint: "):
            autoprobe.instrument(model, selection, input_size=case.size)
        assert _state(model) == before
        return
    assert selection.backend == case.backend, selection.notes
    untouched = copy.deepcopy(model)
    probed = autoprobe.instrument(model, selection, input_size=case.size)
    assert _state(model) == before and _shown(model) == shown, "instrument wrote to the model"
    assert [t.point for t in probed.report.taps] == list(selection.names)
    probed.train()
    x = torch.randn(2, *case.size, generator=torch.Generator().manual_seed(2))
    out = probed(x)
    result = probed.loss(out, _target(probed.logits(out)))
    total = result[0] if isinstance(result, tuple) else result.total
    optimizer = torch.optim.SGD(probed.parameters(), lr=0.01)
    optimizer.zero_grad(), total.backward()
    idle = [n for n, p in probed.autoprobe_adapters.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not idle, f"adapters without a gradient: {idle}"
    optimizer.step()
    plain = probed.strip()
    assert plain is model and _state(model) == before, "the step or strip wrote to the model"
    untouched.load_state_dict(plain.state_dict())
    plain.eval(), untouched.eval()
    with torch.no_grad():
        _assert_same_output(plain(x), untouched(x))
    copy.deepcopy(plain).load_state_dict(plain.state_dict())


def test_the_corpus_covers_what_issue_25_names() -> None:
    libraries = [c.library for c in CORPUS]
    smp = [c for c in CORPUS if c.library == "segmentation_models_pytorch"]
    assert len(smp) >= 8 and any("-tu-" in c.id for c in smp) and not any("resnet" in c.id for c in smp)
    hf = {c.id for c in CORPUS if c.library == "transformers"}
    assert len(hf) >= 6 and all(any(n in i for i in hf) for n in ("swin", "dpt", "upernet", "mobilevitv2", "beit",
                                                                    "segformer"))
    monai = [c for c in CORPUS if c.library == "monai"]
    assert len(monai) >= 5 and {len(c.size) for c in monai} == {3, 4}  # 2-D and 3-D
    assert "dynamic_network_architectures" in libraries
    assert any(c.detection for c in CORPUS) and any(c.library == "torchvision" and not c.detection for c in CORPUS)
    assert libraries.count("timm") >= 6


@pytest.mark.parametrize("case", _cases(fast=True))
def test_corpus_fast(case: Case) -> None:
    check_case(case)


@pytest.mark.parametrize("case", _cases(fast=False))
def test_corpus(case: Case) -> None:
    check_case(case)
