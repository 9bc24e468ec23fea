"""One owner for tracing (issue 27): no module of the package traces but ``backends.py``, whose ``ModelTrace``
holds the fallback ladder, and the fx rung's own module ``trace.py``.

The check reads the package's source (calls only: docstrings and comments may name anything) and would catch
the calls ``rewrite.py`` and ``fx_engine.py`` made before, when each traced for itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import autoprobe

PACKAGE = Path(autoprobe.__file__).parent

RUNGS = frozenset({"trace_fx", "trace_export", "trace_hooks", "trace_with_fallbacks", "build_layer_graph", "_climb"})
"""The rungs and the ladder: asked of ``ModelTrace`` only, so they are called in ``backends.py`` alone."""

PRIMITIVES = frozenset({"symbolic_trace", "propagate_shapes", "trace"})
"""What the rungs call to trace (``fx.symbolic_trace``, a tracer's ``.trace``, shape propagation)."""

OWNERS = {"backends.py": RUNGS | PRIMITIVES, "trace.py": PRIMITIVES}
"""Which module may call what: the owner everything, the fx rung's module its own primitives."""


def tracing_calls(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every call of a rung or a tracing primitive, and of ``torch.export.export``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if isinstance(func, ast.Attribute) and name == "export" and isinstance(func.value, ast.Attribute) \
                and func.value.attr == "export":
            found.append((node.lineno, "torch.export.export"))
        elif name in RUNGS | PRIMITIVES:
            found.append((node.lineno, name))
    return found


def test_the_check_finds_what_rewrite_and_fx_engine_called_before() -> None:
    before = (
        "train_traced = trace_fx(module, size, opts, other_mode=eval_traced)\n"
        "rung = trace_with_fallbacks(module, size, options, backends=(selection.backend,))\n"
        "eval_graph = build_layer_graph(eval_traced)\n"
        "ep = torch.export.export(model, args, strict=False)\n"
        "graph = tracer.trace(model)\n"
        '"""trace_fx(model) in a docstring is no call"""\n'
    )
    assert [name for _, name in tracing_calls(before)] == [
        "trace_fx", "trace_with_fallbacks", "build_layer_graph", "torch.export.export", "trace"]


def test_nothing_outside_the_tracing_owner_traces() -> None:
    strays = []
    for path in sorted(PACKAGE.rglob("*.py")):
        allowed = OWNERS.get(path.name, frozenset()) if path.parent == PACKAGE else frozenset()
        for line, name in tracing_calls(path.read_text()):
            if name not in allowed and not (name == "torch.export.export" and path.name == "backends.py"):
                strays.append(f"{path.relative_to(PACKAGE)}:{line} calls {name}")
    assert not strays, "tracing outside backends.ModelTrace:\n" + "\n".join(strays)


# ------------------------------------------------------------------------------------------------ torch's private API, caches

NO_PUBLIC_SPELLING = {
    ("meta.py", "torch.utils._pytree"): "the pytree helpers have no public module in this torch",
    ("meta.py", "torch.utils._python_dispatch"): "TorchDispatchMode has no public import path",
}
"""Private torch modules a file imports because torch has no public name for what it needs, with the reason."""


def _private_torch_imports(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names if a.name.startswith("_"))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names
                         if a.name.split(".")[0] == "torch" and any(p.startswith("_") for p in a.name.split(".")))
    return found


def test_no_private_torch_import() -> None:
    assert _private_torch_imports("from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata\n") \
        == [(1, "torch.fx.passes.shape_prop._extract_tensor_metadata")]
    strays = [
        f"{path.relative_to(PACKAGE)}:{line} imports {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in _private_torch_imports(path.read_text())
        if (path.name, name) not in NO_PUBLIC_SPELLING
    ]
    assert not strays, "private torch imports:\n" + "\n".join(strays)


def _unbounded_caches(source: str) -> list[tuple[int, str]]:
    """``(line, decorator)`` of every cache without an explicit bound: ``functools.cache``, or ``lru_cache``
    without ``maxsize=`` or with ``maxsize=None``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        for deco in getattr(node, "decorator_list", []):
            name = ast.unparse(deco)
            call = name.split("(")[0]
            if call.endswith(".cache") or call == "cache" or (
                    call.endswith("lru_cache") and ("maxsize" not in name or "maxsize=None" in name)):
                found.append((node.lineno, name))
    return found


def test_every_cache_is_bounded() -> None:
    assert [n for _, n in _unbounded_caches(
        "@functools.lru_cache\ndef a(): ...\n@functools.cache\ndef b(): ...\n@lru_cache(maxsize=None)\ndef c(): ...\n"
        "@functools.lru_cache(maxsize=8)\ndef d(): ...\n@cached_property\ndef e(self): ...\n"
    )] == ["functools.lru_cache", "functools.cache", "lru_cache(maxsize=None)"]
    unbounded = [f"{path.relative_to(PACKAGE)}:{line} @{name}" for path in sorted(PACKAGE.rglob("*.py"))
                 for line, name in _unbounded_caches(path.read_text())]
    assert not unbounded, "caches without a bound:\n" + "\n".join(unbounded)
