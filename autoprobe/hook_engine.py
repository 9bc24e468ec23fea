"""The hook tapping engine, for selections from the ``export`` and ``hooks`` backends.

A model fx cannot trace has no fx graph to rewrite. Its selection comes from
``torch.export`` or forward hooks (``backends.py``), whose nodes are ATen ops or module
calls. This engine runs the model's own forward with forward hooks that exist only for
that call (registered on entry, removed on exit, also on error), so they never survive
into ``strip()`` or ``torch.save``.

Which module call a point is: read from the trace, never from its name. A point is the
output of a module call the tracer recorded (``Traced.module_calls``: module path and call
index), and is tapped at exactly that call. A function inside a module (export's
``blocks.0.add``) is no point on this engine: a hook sees only the module's output, another
value, and autoprobe taps every point exactly where it is named (``select.can_be_point``
keeps such nodes out of every selection; this engine refuses one made by hand).

Every caught tensor is checked against what the selection recorded (its shape without the
batch, and the rank of its layout) on every forward: a hook that catches another call's
output raises instead of training the adapter on the wrong feature. Each tapped output is
copied: with no graph to inspect, a later in-place op of the model cannot be ruled out.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .errors import InstrumentError
from .graph import LayerGraph, LayerInfo
from .layout import Layout
from .outputs import describe_output
from .taps import ADAPTERS, EngineResult, TapSite
from .trace import Traced

__all__ = ["HookTarget", "HookRecipe", "HookEngine", "hook_targets"]


@dataclass(frozen=True)
class HookTarget:
    """The module call whose output a forward hook taps for one point.

    Attributes:
        module: the module's path.
        call: which of its calls in one forward (0 for the first).

    Example:
        >>> HookTarget("block", 1).label
        'block#1'
    """

    module: str
    call: int

    @property
    def label(self) -> str:
        """``path`` for a first call, ``path#N`` for the N-th later one."""
        return self.module if self.call == 0 else f"{self.module}#{self.call}"


def hook_targets(
    model: nn.Module, traced: Traced, graph: LayerGraph, infos: Sequence[LayerInfo]
) -> list[tuple[HookTarget, LayerInfo]]:
    """For each point, the module call a hook taps and what that call's output is.

    Args:
        model: the user's model.
        traced: the ``export`` or ``hooks`` trace the selection came from.
        graph: its layer graph.
        infos: the points' layer info, in order.

    Returns:
        (target, the point's info) per point: the hook catches exactly the point's value.

    Raises:
        InstrumentError: a point is not a module call's output (a function inside a module or at the
            top level of the forward), so no forward hook sees its value.
    """
    result: list[tuple[HookTarget, LayerInfo]] = []
    for info in infos:
        if info.fx_name not in traced.module_calls:
            where = f"inside module {info.module_path}" if info.module_path else "at the top level of the forward"
            raise InstrumentError(
                f"point {info.name!r} (op kind {info.kind!r}) is computed {where} of {type(model).__name__}, not as a "
                f"module's output, in a {traced.backend!r} graph: forward hooks can only tap module outputs, and "
                "autoprobe taps a point exactly where it is named.\nHint: choose points that are module outputs with "
                "`autoprobe.analyze(model, input_size=...).choose(name, ...)`, or make fx trace the model "
                "(options=TraceOptions(leaf_modules=[...] or leaf_paths=[...]) around the part it cannot trace)."
            )
        # The tracer recorded this node as the output of one module call: hook exactly that call.
        path, call = traced.module_calls[info.fx_name]
        result.append((HookTarget(path, call), info))
    return result


@dataclass(frozen=True)
class HookRecipe:
    """What (re)builds the hook engine: where to tap, call by call.

    Attributes:
        sites: the points, in execution order.
        targets: the module call tapped for each site.
        backend: the backend the selection came from (``export`` or ``hooks``).
    """

    sites: tuple[TapSite, ...]
    targets: tuple[HookTarget, ...]
    backend: str

    def build(self, model: nn.Module, adapters: nn.ModuleDict) -> HookEngine:
        """The engine over ``model`` and ``adapters`` (nothing to re-trace)."""
        return HookEngine(model, adapters, self.sites, self.targets)


class HookEngine:
    """Runs the user's model with forward hooks that tap the points, for one forward only.

    The model's own Python follows its ``training`` flag, so one engine serves both modes.
    """

    def __init__(
        self, model: nn.Module, adapters: nn.ModuleDict, sites: Sequence[TapSite], targets: Sequence[HookTarget]
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.sites = tuple(sites)
        self.targets = tuple(targets)

    def cloned(self, point: str) -> bool:
        """Always: every tapped output is copied."""
        return True

    def fx_names(self, point: str) -> None:
        """None: hooks tap module calls, not graph nodes."""
        return None

    def code(self, training: bool) -> str:
        """The hooks each forward registers."""
        return "# forward hooks, registered for each forward:\n" + "\n".join(
            f"#   {t.module} (call {t.call}) -> {ADAPTERS}.{s.key}" for s, t in zip(self.sites, self.targets)
        )

    def run(self, training: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> EngineResult:
        """Run the model once with the tapping hooks registered.

        Raises:
            InstrumentError: a hooked module returned a non-tensor, a caught tensor is not the
                shape the selection recorded, or a point's module call did not happen.
        """
        heads: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {}
        calls: Counter[str] = Counter()
        by_module: dict[str, list[tuple[TapSite, HookTarget]]] = {}
        for site, target in zip(self.sites, self.targets):
            by_module.setdefault(target.module, []).append((site, target))

        def hook(path: str, _module: nn.Module, _args: Any, output: Any) -> None:
            call = calls[path]
            calls[path] += 1
            for site, target in by_module[path]:
                if target.call == call:
                    features[site.point] = _checked(site, target, output).clone()
                    heads[site.point] = self.adapters[site.key](features[site.point])

        handles = [
            self.model.get_submodule(path).register_forward_hook(functools.partial(hook, path)) for path in by_module
        ]
        try:
            output = self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        missing = [(s, t) for s, t in zip(self.sites, self.targets) if s.point not in heads]
        if missing:
            seen = ", ".join(f"{t.module} ran {calls[t.module]}x, call {t.call} was tapped" for _, t in missing)
            raise InstrumentError(
                f"points {[s.point for s, _ in missing]} were not reached in this forward ({seen}): the model "
                "ran fewer calls of these modules than when it was instrumented (a data-dependent branch, or "
                "another input size). Hint: instrument it on inputs like the ones you train on."
            )
        order = [s.point for s in self.sites]
        return EngineResult(output, {p: heads[p] for p in order}, {p: features[p] for p in order})


def _checked(site: TapSite, target: HookTarget, output: Any) -> Tensor:
    """The caught output, if it is the tensor the selection recorded for this point."""
    if not isinstance(output, Tensor):
        raise InstrumentError(
            f"point {site.point!r}: module {target.label} returned {describe_output(output)}, not a tensor, so its "
            "output cannot be tapped. Hint: choose another point."
        )
    rank = Layout.parse(site.layout).rank
    if output.dim() != rank or tuple(output.shape[1:]) != site.feature_shape:
        raise InstrumentError(
            f"point {site.point!r}: the hook on module {target.label} caught a tensor of shape "
            f"{tuple(output.shape[1:])} (batch aside), but the selection recorded a {site.layout} feature of shape "
            f"{site.feature_shape} there: the hook is on another call than the point. Refusing to supervise the "
            "wrong feature.\nHint: train at the input size given to instrument; if you do, choose points that "
            "are module outputs, or make fx trace the model (TraceOptions(leaf_paths=[...]) around what it cannot trace)."
        )
    return output
