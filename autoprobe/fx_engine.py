"""The fx tapping engine: a graph rewrite of the model's fx trace.

Why a graph rewrite and not forward hooks: hooks can only see module boundaries, not
an ``add`` inside a block, and torch.compile and DDP handle them less predictably than a
plain forward. So after every chosen node the tapped graph calls the adapter
``autoprobe_adapters.<key>`` and returns the point's adapter output q_m(z_m) and raw
feature z_m alongside the model's own output (whatever object it is: a tensor, a dict,
a tuple).

Why two graphs: fx freezes Python control flow at trace time, including
``if self.training`` inside traced-through modules (timm's BatchNormAct, aux heads).
Like torchvision's ``DualGraphModule``, the engine holds the train-mode and the eval-mode
graph and runs the one matching the mode it is called in; both are compiled once, so a
mode change swaps graphs and nothing is recompiled. Most models record the same program in
both modes (their mode-dependent work is inside modules that read their own flag, such as
``nn.Dropout``): then the two traces are one (``backends.ModelTrace`` shares them), and one
tapped graph serves both modes.

Why module hooks are called by the graph: the generated code runs a traced-through
module's body inline, so its own ``__call__``, and with it the hooks on it, never runs.
FSDP2 (``fully_shard``) works through exactly such hooks: a sharded block unshards its
parameters in a forward pre-hook and reshards them in a forward hook. So each inlined
module call is bracketed by two calls that run that module's current forward pre-hooks
and forward hooks (a no-op while it has none); ``fully_shard`` applied after
``instrument`` is then honoured, and the block's parameters are full tensors while its
ops run. (What a pre-hook returns in place of the inputs is not substituted: FSDP's
mixed-precision input casting does not apply inside inlined blocks.)

The GraphModules reach the weights through the user's module tree (``model``) and are
kept out of ``Probed``'s module tree, so each tensor appears once in ``state_dict``.
"""

from __future__ import annotations

import dataclasses
import inspect as pyinspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import fx, nn

from .backends import ModelTrace
from .errors import SelectionError
from .graph import LayerGraph
from .ops import lookup, module_kind
from .taps import ADAPTERS, MODEL, EngineResult, TapSite
from .fx_tracer import INPLACE_META
from .trace import Traced, TraceOptions

__all__ = ["FxRecipe", "FxEngine"]


@dataclass(frozen=True)
class FxRecipe:
    """What rebuilds the fx engine from the model: how to trace it and where to tap.

    Attributes:
        input_size: the traced input, without batch.
        options: the tracing options' fields (a ``TraceOptions`` holds a mapping proxy, which
            does not pickle), as (name, value) pairs.
        sites: the points, in execution order.
        label: the model's label, for messages.
    """

    input_size: tuple[int, ...]
    options: tuple[tuple[str, Any], ...]
    sites: tuple[TapSite, ...]
    label: str
    backend: str = "fx"

    @classmethod
    def of(cls, input_size: Sequence[int], options: TraceOptions, sites: Sequence[TapSite], label: str) -> FxRecipe:
        """The recipe for tracing with ``options`` and tapping ``sites``."""
        fields = tuple(
            (f.name, dict(value) if isinstance(value := getattr(options, f.name), Mapping) else value)
            for f in dataclasses.fields(options)
        )
        return cls(tuple(input_size), fields, tuple(sites), label)

    def build(self, model: nn.Module, adapters: nn.ModuleDict) -> FxEngine:
        """Re-trace ``model`` (a ``ModelTrace``: each mode once, one program shared) and tap it again (after unpickling).

        Raises:
            SelectionError: a point no longer exists or changed shape (the model's code changed).
        """
        trace = ModelTrace(model, self.input_size, TraceOptions(**dict(self.options)))
        eval_ = trace.traced("eval", "fx")
        self._check_unchanged(trace.graph("train", "fx"))
        return FxEngine(model, adapters, self.sites, trace.traced("train", "fx"), eval_)

    def _check_unchanged(self, graph: LayerGraph) -> None:
        for site in self.sites:
            if site.point not in graph:
                raise SelectionError(
                    f"point {site.point!r} of the saved probed {self.label} no longer exists in the model's graph; "
                    "the model's code changed since it was saved. Hint: load the state_dict into a freshly "
                    "instrumented model instead."
                )
            have = tuple((graph[site.point].shape or ())[1:])
            if have != site.feature_shape:
                raise SelectionError(
                    f"point {site.point!r} of the saved probed {self.label} had shape {site.feature_shape}, now "
                    f"{have}; the model's code changed since it was saved. Hint: re-instrument the model."
                )


class FxEngine:
    """The train-mode and eval-mode tapped GraphModules over one model and its adapters.

    Args:
        model: the user's model (shared, not copied).
        adapters: the adapters, keyed by ``TapSite.key``.
        sites: the points, in execution order.
        train_traced: the train-mode trace.
        eval_traced: the eval-mode trace.

    Raises:
        SelectionError: a point is not a node of one of the graphs.

    Example:
        >>> import torch
        >>> from autoprobe import instrument
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
        ...                           torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        ...                           torch.nn.Linear(8, 3))
        >>> probed = instrument(net, input_size=(3, 12, 12))
        >>> type(probed._engine).__name__, "autoprobe_adapters" in probed.code
        ('FxEngine', True)
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: nn.ModuleDict,
        sites: Sequence[TapSite],
        train_traced: Traced,
        eval_traced: Traced,
    ) -> None:
        train = _tapped_graph_module(model, adapters, sites, train_traced)
        # One program in both modes (the traces share their graph): one tapped graph serves both.
        shared = train_traced.graph_module is eval_traced.graph_module
        eval_ = train if shared else _tapped_graph_module(model, adapters, sites, eval_traced)
        self._graphs = {True: train.graph_module, False: eval_.graph_module}
        self._cloned = {s.point: train.cloned[s.point] or eval_.cloned[s.point] for s in sites}
        self._fx_names = {s.point: (train.fx_names[s.point], eval_.fx_names[s.point]) for s in sites}

    def run(self, training: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> EngineResult:
        """Run the graph of the mode ``training``."""
        return EngineResult(*self._graphs[training](*args, **kwargs))

    def cloned(self, point: str) -> bool:
        """Whether the point's feature is copied because a later in-place op would overwrite it."""
        return self._cloned[point]

    def fx_names(self, point: str) -> tuple[str, str]:
        """The point's tapped node in the train-mode and eval-mode graphs."""
        return self._fx_names[point]

    def code(self, training: bool) -> str:
        """The generated Python of that mode's tapped graph."""
        return self._graphs[training].code


class _Tapped(NamedTuple):
    """One mode's tapped graph."""

    graph_module: fx.GraphModule
    """Returns ``(output, heads, features)``."""
    cloned: dict[str, bool]
    """Point -> whether its feature is copied (a later in-place op would overwrite it)."""
    fx_names: dict[str, str]
    """Point -> its fx node's name."""


def _tapped_graph_module(model: nn.Module, adapters: nn.ModuleDict, sites: Sequence[TapSite], traced: Traced) -> _Tapped:
    """Copy ``traced``'s graph onto ``model`` and ``adapters`` and tap it at ``sites``."""
    source = traced.graph_module.graph
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(source, copies)
    qualnames = {new: traced.qualnames[old.name] for old, new in copies.items()}
    # The holder's attribute tree is {model, autoprobe_adapters}: the user's own module tree sits one level down.
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = f"{MODEL}.{node.target}"
        elif INPLACE_META in node.meta:
            # The model's own `x += y`, traced out of place: run it in place, as the model does (no fresh
            # block-sized tensor per residual add). A tap on x is copied first (`_mutated_later`).
            node.target = node.meta[INPLACE_META]
    output = _bracket_inlined_modules(graph, model, qualnames, output)
    by_qualname = {name: node for node, name in qualnames.items()}
    order = {node: i for i, node in enumerate(graph.nodes)}

    heads: dict[str, fx.Node] = {}
    features: dict[str, fx.Node] = {}
    cloned: dict[str, bool] = {}
    fx_names: dict[str, str] = {}
    for site in sites:
        node = by_qualname.get(site.point)
        if node is None:
            raise SelectionError(
                f"point {site.point!r} is not a node of the {traced.mode}-mode graph. "
                "Hint: re-run `autoprobe.inspect(model)` and instrument with that selection."
            )
        fx_names[site.point] = node.name
        cloned[site.point] = _mutated_later(node, order, model)
        feature = node
        if cloned[site.point]:
            with graph.inserting_after(node):
                feature = graph.call_method("clone", (node,))
        with graph.inserting_after(feature):
            heads[site.point] = graph.call_module(f"{ADAPTERS}.{site.key}", (feature,))
        features[site.point] = feature
    if traced.output_type is not None:
        output = graph.call_function(traced.output_type, kwargs=output)  # the model's own ModelOutput
    graph.output((output, heads, features))

    holder = fx.GraphModule(nn.Module(), fx.Graph(), class_name=f"Probed{type(model).__name__}")
    setattr(holder, MODEL, model)
    setattr(holder, ADAPTERS, adapters)
    graph.lint()
    holder.graph = graph  # the setter compiles the code: once per graph
    return _Tapped(holder, cloned, fx_names)


# --------------------------------------------------------------------------- hooks of inlined modules


def _run_forward_pre_hooks(module: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Run ``module``'s forward pre-hooks as its ``__call__`` would (return values are not substituted)."""
    for hook_id, hook in tuple(module._forward_pre_hooks.items()):
        if hook_id in module._forward_pre_hooks_with_kwargs:
            hook(module, inputs, {})
        else:
            hook(module, inputs)


def _run_forward_hooks(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    """Run ``module``'s forward hooks as its ``__call__`` would; a hook may replace the output."""
    for hook_id, hook in tuple(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, inputs, {}, output)
        else:
            result = hook(module, inputs, output)
        if result is not None:
            output = result
    return output


def _bracket_inlined_modules(
    graph: fx.Graph, model: nn.Module, qualnames: Mapping[fx.Node, str], output: Any
) -> Any:
    """Call each inlined module's hooks around every contiguous run of its nodes.

    A run is one call of the module: the consecutive nodes whose qualified name lies inside
    it. Its inputs are the values from outside the run it reads; its output, the one value
    read after it. A run with several output values (a module returning a tuple that is
    unpacked) gets its pre-hooks only. Returns the graph's output value, rewritten where a
    bracketed run produced it.
    """
    modules = {path for path, _ in model.named_modules()}
    inlined = modules - {str(n.target).removeprefix(f"{MODEL}.") for n in graph.nodes if n.op == "call_module"}
    open_runs: dict[str, list[fx.Node]] = {}
    starts: dict[str, int] = {}
    runs: list[tuple[int, int, str, list[fx.Node]]] = []
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    for index, node in enumerate(body):
        parts = qualnames.get(node, node.name).split(".")
        # Every enclosing module of the node: "", "blocks", "blocks.0", ... (a called leaf is not enclosing).
        enclosing = {".".join(parts[:i]) for i in range(len(parts))} & inlined
        for path in [p for p in open_runs if p not in enclosing]:
            runs.append((starts.pop(path), path.count(".") + bool(path), path, open_runs.pop(path)))
        for path in enclosing:
            starts.setdefault(path, index)
            open_runs.setdefault(path, []).append(node)
    for path, run in open_runs.items():
        runs.append((starts[path], path.count(".") + bool(path), path, run))
    # Outer runs first: their pre-hook lands before an inner one's, their post-hook after it.
    position = {node: i for i, node in enumerate(graph.nodes)}
    for _, _, path, run in sorted(runs, key=lambda r: (r[0], r[1])):
        output = _bracket(graph, path, run, output, position)
    return output


def _bracket(graph: fx.Graph, path: str, run: list[fx.Node], output: Any, position: Mapping[fx.Node, int]) -> Any:
    inside = set(run)
    start = position[run[0]]
    inputs: list[fx.Node] = []
    for node in run:
        for arg in node.all_input_nodes:
            # Only values defined before the run (fx may append a placeholder late); a hook node
            # added for an earlier run sits right after that run, so it is defined before too.
            if arg not in inside and arg not in inputs and arg.op != "get_attr" and position.get(arg, -1) < start:
                inputs.append(arg)
    with graph.inserting_before(run[0]):
        module = graph.get_attr(f"{MODEL}.{path}" if path else MODEL)
        graph.call_function(_run_forward_pre_hooks, (module, tuple(inputs)))
    returned = set(_nodes_of(output))
    produced = [n for n in run if n in returned or any(u not in inside for u in n.users)]
    if len(produced) != 1:
        return output
    result = produced[0]
    with graph.inserting_after(run[-1]):
        hooked = graph.call_function(_run_forward_hooks, (module, tuple(inputs), result))
    for user in list(result.users):
        if user is not hooked and user not in inside:
            user.replace_input_with(result, hooked)
    return fx.node.map_arg(output, lambda n: hooked if n is result else n)


def _nodes_of(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


# --------------------------------------------------------------------------- alias analysis


def _mutated_later(node: fx.Node, order: Mapping[fx.Node, int], model: nn.Module) -> bool:
    """Whether an op after ``node`` writes in place into ``node``'s storage.

    The tapped value must be what ``node`` produced: the adapter (and the NE loss
    on z_m) would otherwise see the overwritten tensor, or autograd would fail on
    a saved tensor modified in place. Aliases are followed through view-like ops,
    identity/dropout modules and in-place ops (which return their input), in both
    directions; unknown ops are assumed to copy.
    """
    alias = {node}
    frontier = [node]
    while frontier:
        current = frontier.pop()
        linked = [u for u in current.users if _aliases_first_arg(u, model) and _aliased(u) is current]
        if _aliases_first_arg(current, model) and isinstance(_aliased(current), fx.Node):
            linked.append(_aliased(current))
        for other in linked:
            if other not in alias:
                alias.add(other)
                frontier.append(other)
    start = order[node]
    return any(
        order[user] > start and _writes_first_arg(user, model) and _first_arg(user) in alias
        for member in alias
        for user in member.users
    )


def _first_arg(node: fx.Node) -> object:
    return node.args[0] if node.args else None


def _aliased(node: fx.Node) -> object:
    """The value ``node``'s result may share storage with: its first argument, or a hooked module's output."""
    if node.op == "call_function" and node.target is _run_forward_hooks:
        return node.args[2]
    return _first_arg(node)


def _aliases_first_arg(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_function" and node.target is _run_forward_hooks:
        return True  # returns its output argument, unchanged unless a user hook replaces it
    if node.op in ("call_method", "call_function"):
        entry = lookup(node.target)  # the registry marks ops whose result may share its first argument's storage
        return (entry is not None and entry.view) or _writes_first_arg(node, model)
    if node.op == "call_module":
        return module_kind(_submodule(model, node)).kind == "identity" or _writes_first_arg(node, model)
    return False


def _writes_first_arg(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        entry = lookup(node.target)
        if entry is not None and entry.in_place:
            return True
        name = getattr(node.target, "__name__", "")
        return (name.endswith("_") and not name.endswith("__")) or _inplace_argument(node)
    if node.op == "call_module":
        return getattr(_submodule(model, node), "inplace", False) is True
    return False


def _inplace_argument(node: fx.Node) -> bool:
    """``F.relu(x, inplace=True)``, also given positionally."""
    if node.kwargs.get("inplace") is True:
        return True
    if not any(a is True for a in node.args[1:]):
        return False
    try:
        bound = pyinspect.signature(node.target).bind_partial(*node.args, **node.kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def _submodule(model: nn.Module, node: fx.Node) -> nn.Module:
    target = str(node.target).removeprefix(f"{MODEL}.")
    return model.get_submodule(target)
