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
