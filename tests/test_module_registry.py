"""Module classes in the registry (issue 27): one ``ops.ModuleClass`` per class, read for the kind, the axis labels,
windowed, view and leaf; a subclass has its base's entry, and an unregistered third-party class falls back as before."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from types import MappingProxyType

import pytest
import torch
from torch import nn

from autoprobe import ops
from autoprobe.axes import AxisEnv, module_axes


class Squash(nn.Module):
    """A toy library's layer: a 2x2 max pool (its name says nothing, it owns no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(x, 2)


class Passthrough(nn.Module):
    """A toy library's identity (a view of its input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MySquash(Squash):
    """A model's own subclass of the toy library's layer: it has its base's entry."""


@pytest.fixture
def toylib(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """A toy library, imported, whose two classes the registry knows; the registry's table is rebuilt for it and
    again after (monkeypatch restores ``sys.modules`` and ``_LIBRARY_CLASSES``)."""
    lib = types.ModuleType("toylib")
    lib.Squash, lib.Passthrough = Squash, Passthrough
    monkeypatch.setitem(sys.modules, "toylib", lib)
    monkeypatch.setattr(ops, "_LIBRARY_CLASSES", MappingProxyType({**ops._LIBRARY_CLASSES, "toylib": MappingProxyType({
        "Squash": ops.ModuleClass("pool", rule="channels_first", windowed=True),
        "Passthrough": ops.ModuleClass("identity", rule="elementwise", view=True),
    })}))
    ops._module_classes.cache_clear()
    yield lib
    ops._module_classes.cache_clear()


def _labels(module: nn.Module, out: tuple[int, ...]) -> object:
    return module_axes(module, ("NCSS",), {}, AxisEnv.simple({"NCSS": (2, 4, 8, 8)}, out=out))


def test_a_registered_class_and_its_subclass_read_their_entry(toylib: types.ModuleType) -> None:
    for module in (Squash(), MySquash()):
        assert ops.module_kind(module) == ops.ModuleKind("pool")
        assert _labels(module, (2, 4, 4, 4)) == "NCSS"  # the channels_first rule, though the size changed
        assert ops.is_windowed(module) and not ops.is_view(module)
    assert ops.module_kind(Passthrough()).kind == "identity"
    assert ops.is_view(Passthrough()) and not ops.is_windowed(Passthrough())
    assert _labels(Passthrough(), (2, 4, 8, 8)) == "NCSS"


def test_an_unregistered_third_party_class_falls_back_as_before() -> None:
    # Without the toy library's entries: no entry, so by its name and weights, and a block's axis fallback.
    assert ops.module_class(Squash()) is None and ops.module_class(MySquash) is None
    assert ops.module_kind(Squash()) == ops.ModuleKind("other")
    assert _labels(Squash(), (2, 4, 4, 4)) is None  # no same-shaped input, no conv inside: unknown
    assert _labels(Passthrough(), (2, 4, 8, 8)) == "NCSS"  # a same-shaped input's labels
    assert not ops.is_windowed(Squash()) and not ops.is_view(Passthrough()) and not ops.is_library_leaf(Squash())

    class MyConv(nn.Module):  # read by its name and the matrix it owns
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 4, 3, 3))

    assert ops.module_kind(MyConv()).kind == "conv" and not ops.is_windowed(MyConv())


def test_torch_classes_read_their_entries() -> None:
    assert ops.module_class(nn.Conv2d(1, 1, 3)) == ops.ModuleClass("conv", rule="channels_first", windowed=True)
    assert ops.is_view(nn.Flatten()) and ops.is_view(nn.Identity()) and not ops.is_view(nn.Dropout())
    assert ops.module_kind(nn.Flatten()).kind == "other"  # an entry with no kind: read as before, by its weights
    assert ops.module_kind(nn.Embedding(4, 2)).kind == "weight"
    assert module_axes(nn.ZeroPad2d(1), ("NCSS",), {}, AxisEnv.simple(out=(2, 4, 10, 10))) == "NCSS"
    assert ops.is_leaf_module(nn.ReLU()) and not ops.is_leaf_module(nn.Sequential())
    assert ops.is_mode_free(nn.Dropout()) and not ops.is_mode_free(MySquash())


def test_every_entry_names_a_module_rule() -> None:
    for cls, entry in ops._module_classes(frozenset()).items():
        assert not entry.rule or entry.rule in ops.MODULE_RULE_NAMES, cls
    with pytest.raises(ValueError, match="MODULE_RULE_NAMES"):
        ops._check({nn.ReLU: ops.ModuleClass("act", rule="permute")})
