"""The gradient-similarity gate: each point's terms weighted by how well their gradient agrees with the output's.

Du, Czarnecki, Jayakumar, Farajtabar, Pascanu, Lakshminarayanan, *Adapting Auxiliary Losses Using
Gradient Similarity* (2018, arXiv:1812.02224): scaling an auxiliary loss by
max(0, cos(g_aux, g_main)) keeps gradient descent converging to critical points of the main loss,
and switches the auxiliary loss off where it would pull against it (negative transfer). Here the
main loss is the output's and each point's auxiliary loss is the sum of its weighted terms (DSN's
CE, iMacHSR's MI and NE, DKS's CE at that head). DKS's synergy couples every head, so it belongs to
no point and is never gated.

Every ``every`` training calls (grad enabled, eager), the gate measures one cosine per point on the
batch at hand and holds the resulting multiplier, in [0, 1], until the next measurement:

- ``kind="cosine"``: max(0, cos), Du et al.'s weighting;
- ``kind="binary"``: 1 where cos > 0, else 0 (their "unweighted" variant).

Where the gradients are taken (``wrt``):

- ``"parameters"`` (the default): with respect to the model parameters both losses reach
  (everything upstream of the point; the adapter's own parameters are left out, since the output
  loss does not reach them). Du et al.'s form: one backward of the output loss and one of each
  point's terms through the trunk, per measurement.
- ``"feature"``: with respect to the point's feature z_m. Both gradients live on the same tensor,
  so a measurement costs one backward of the output loss down to the earliest point and a backward
  of each point's terms through its adapter only. A feature that autoprobe copied (a later in-place
  op would overwrite it) is measured at the tensor it copied.

The cheap form is not the default because it does not agree with the exact one: on the evidence
models its cosines are an order of magnitude smaller (EVIDENCE.md, the mechanism table). A
gradient at z_m is the parameters' gradient before the trunk's Jacobian mixes it, and the head's
K-channel projection and the decoder's are close to orthogonal in a feature of C x H x W values.

Distributed training: the dot products and squared norms are summed over the ranks of the default
process group before the cosine is taken, so every rank holds the same weights (the cosine of the
combined batch's gradients). FSDP2: a measuring call keeps the parameters unsharded through its
extra backward passes (``unsharded_while_measuring``). Mixed precision: the sums are taken in float32. ``torch.compile``:
a compiled call never measures (a backward inside the graph would break it); it reads the weights
in force, so the compiled step stays one graph. Measure with an eager call every ``every`` steps
(README, "Gating the terms").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ..errors import InstrumentError

__all__ = ["GateKind", "GateInputs", "Gate", "Agreement", "GradientGate", "gradient_agreement", "unsharded_while_measuring"]

GateKind = Literal["cosine", "binary"]
GateInputs = Literal["feature", "parameters"]

# An input of the cosine: a tensor (a parameter) or the edge of a feature inside the autograd graph.
_Input = Tensor | GradientEdge


@dataclass(frozen=True)
class Gate:
    """How the gate weights each point: ``instrument(gate=Gate("cosine", every=5))``; ``gate="cosine"`` is ``Gate()``.

    Attributes:
        kind: ``"cosine"`` (weight alpha * max(0, cos)) or ``"binary"`` (alpha where cos > 0, else 0).
        every: measure the cosines every this many training calls (the first call measures).
        wrt: take the gradients with respect to each point's ``"feature"`` or the shared ``"parameters"``.

    Example:
        >>> Gate.parse("binary")
        Gate(kind='binary', every=25, wrt='parameters')
        >>> Gate(every=0)
        Traceback (most recent call last):
          ...
        autoprobe.errors.InstrumentError: gate every=0: it must be an int >= 1 (training calls between two measurements). Hint: Gate('cosine', every=25).
    """

    kind: GateKind = "cosine"
    every: int = 25
    wrt: GateInputs = "parameters"

    def __post_init__(self) -> None:
        if self.kind not in get_args(GateKind):
            raise InstrumentError(
                f"unknown gate kind {self.kind!r}; expected one of {list(get_args(GateKind))}. "
                "Hint: gate='cosine' (Du et al. 2018), gate='binary', or gate=None for no gate."
            )
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise InstrumentError(
                f"gate every={self.every!r}: it must be an int >= 1 (training calls between two measurements). "
                "Hint: Gate('cosine', every=25)."
            )
        if self.wrt not in get_args(GateInputs):
            raise InstrumentError(
                f"gate wrt={self.wrt!r}; expected one of {list(get_args(GateInputs))}. Hint: leave it at 'parameters'."
            )

    @classmethod
    def parse(cls, value: Gate | str | None) -> Gate | None:
        """A ``Gate`` from what ``instrument(gate=)`` takes: a ``Gate``, a kind name, or ``None`` (no gate).

        Raises:
            InstrumentError: anything else, or an unknown kind.
        """
        if value is None or isinstance(value, Gate):
            return value
        if isinstance(value, str):
            return cls(value)  # type: ignore[arg-type]  # checked in __post_init__
        raise InstrumentError(
            f"gate must be 'cosine', 'binary', a Gate or None; got {type(value).__name__} {value!r}. "
            "Hint: gate='cosine', or gate=autoprobe.losses.Gate('cosine', every=5)."
        )


class Agreement(NamedTuple):
    """How one point's auxiliary gradient relates to the output loss's, on the inputs both reach."""

    cosine: float
    """cos(g_aux, g_main) in [-1, 1]; 0 where either gradient is zero or unreached."""
    norm_ratio: float
    """|g_aux| / |g_main| (0 where g_main is zero): how hard the term pushes, against the task."""


def gradient_agreement(
    main: Tensor, terms: Mapping[str, Tensor], inputs: Mapping[str, Sequence[_Input]]
) -> dict[str, Agreement]:
    """cos(d main / d inputs[m], d terms[m] / d inputs[m]) and the norm ratio per point m.

    An input one of the two losses does not reach is left out of that point's sums; a point whose
    gradients are all zero or unreached gets cosine 0. Under ``torch.distributed`` the dot products and
    squared norms are summed over the ranks first, so each rank returns the same numbers.

    Args:
        main: the output loss (scalar, its graph kept: ``retain_graph`` is used throughout).
        terms: point name -> that point's weighted auxiliary loss (scalar).
        inputs: point name -> the tensors or ``GradientEdge``s to differentiate with respect to.

    Returns:
        Point name -> its ``Agreement``.

    Example:
        >>> import torch
        >>> z = torch.randn(5, requires_grad=True)
        >>> main = (z ** 2).sum()
        >>> found = gradient_agreement(main, {"same": 3 * (z ** 2).sum(), "opposite": -(z ** 2).sum()},
        ...                            {"same": [z], "opposite": [z]})
        >>> [(round(a.cosine, 4), round(a.norm_ratio, 4)) for a in found.values()]
        [(1.0, 3.0), (-1.0, 1.0)]
    """
    names = list(terms)
    unique: dict[int, _Input] = {}
    for name in names:
        for item in inputs[name]:
            unique.setdefault(_key(item), item)
    flat = list(unique.values())
    grads_main = dict(zip(unique, _grad(main, flat)))
    stats = torch.zeros(len(names), 3, dtype=torch.float32, device=main.device)
    for i, name in enumerate(names):
        for item, g_aux in zip(inputs[name], _grad(terms[name], list(inputs[name]))):
            g_main = grads_main[_key(item)]
            if g_main is None or g_aux is None:
                continue
            a, b = g_main.detach().float(), g_aux.detach().float()
            stats[i, 0] += (a * b).sum()
            stats[i, 1] += (a * a).sum()
            stats[i, 2] += (b * b).sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    tiny = torch.finfo(torch.float32).tiny
    norms = (stats[:, 1] * stats[:, 2]).sqrt()
    cos = torch.where(norms > 0, stats[:, 0] / norms.clamp(min=tiny), 0.0).clamp(-1.0, 1.0)
    ratio = torch.where(stats[:, 1] > 0, (stats[:, 2] / stats[:, 1].clamp(min=tiny)).sqrt(), 0.0)
    return {name: Agreement(float(c), float(r)) for name, c, r in zip(names, cos.tolist(), ratio.tolist())}


def _key(item: _Input) -> int:
    if isinstance(item, GradientEdge):
        return hash((id(item.node), item.output_nr))
    return id(item)


def _grad(loss: Tensor, inputs: list[_Input]) -> tuple[Tensor | None, ...]:
    if not inputs or not loss.requires_grad:
        return (None,) * len(inputs)
    return torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)


class GradientGate(nn.Module):
    """The gate of one objective: per point, a multiplier in [0, 1] on that point's terms.

    ``Objective`` builds one from ``gate=`` and calls it once per batch; the multipliers live in a
    non-persistent buffer (they follow ``.to(device)``, and no checkpoint key is added), measured
    every ``gate.every`` training calls and held in between.

    Args:
        points: the objective's point names, in order.
        gate: the ``Gate``.

    Example:
        >>> import torch
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> gate = GradientGate(["p"], Gate("cosine"))
        >>> main = z.sum()
        >>> gate(main, {"p": -z.sum()}, {"p": z}).tolist()  # an opposing term is switched off
        [0.0]
        >>> gate.weights.tolist()  # held until the next measurement
        [0.0]
    """

    weights: Tensor

    def __init__(self, points: Sequence[str], gate: Gate) -> None:
        super().__init__()
        self.points: tuple[str, ...] = tuple(points)
        self.gate = gate
        self.register_buffer("weights", torch.ones(len(self.points)), persistent=False)
        # Eager training calls seen, so a measurement falls on calls 0, every, 2 * every, ...
        self.calls = 0
        self.last: dict[str, Agreement] = {}
        """The last measurement: point -> ``Agreement``."""

    @property
    def due(self) -> bool:
        """Whether the next eager training call measures (for a loop that alternates with a compiled step)."""
        return self.calls % self.gate.every == 0

    @staticmethod
    def _counts(main: Tensor) -> bool:
        """Whether a call on ``main`` is a training call: eager, with a graph to differentiate."""
        return torch.is_grad_enabled() and main.requires_grad and not torch.compiler.is_compiling()

    def measures(self, main: Tensor) -> bool:
        """Whether ``forward`` on this ``main`` will measure (so the caller builds ``terms`` only then)."""
        return self._counts(main) and self.due

    def forward(self, main: Tensor, terms: Mapping[str, Tensor], features: Mapping[str, Tensor]) -> Tensor:
        """The multipliers in force for this batch, (M,) in the points' order; measured first when due.

        Args:
            main: the output loss of the batch.
            terms: point name -> the point's weighted auxiliary loss (read only when this call measures).
            features: point name -> z_m, as the probed forward returned it.

        Returns:
            The multipliers, detached.
        """
        if self._counts(main):
            if self.due:
                self._measure(main, terms, features)
            self.calls += 1
        return self.weights

    def _measure(self, main: Tensor, terms: Mapping[str, Tensor], features: Mapping[str, Tensor]) -> None:
        gated = [name for name in self.points if name in terms]
        wanted = {name: terms[name] for name in gated}
        if self.gate.wrt == "parameters":
            inputs = _shared_parameters(main, wanted)
        else:
            inputs = {name: [_feature_edge(main, features[name], name)] for name in gated}
        self.last = gradient_agreement(main, wanted, inputs)
        values = []
        for name in self.points:
            cos = self.last[name].cosine if name in self.last else 0.0
            values.append(max(0.0, cos) if self.gate.kind == "cosine" else float(cos > 0))
        self.weights.copy_(torch.tensor(values, dtype=self.weights.dtype))

    def extra_repr(self) -> str:
        return f"kind={self.gate.kind!r}, every={self.gate.every}, wrt={self.gate.wrt!r}"


@contextlib.contextmanager
def unsharded_while_measuring(model: nn.Module, gate: GradientGate | None) -> Iterator[None]:
    """Around a loss call: keep FSDP2's parameters unsharded while the gate measures.

    FSDP2 reshards a module's parameters after its backward, so the gate's second backward through
    the same graph would find them freed. A measuring call therefore sets
    ``set_reshard_after_backward(False)`` on the FSDP2 modules of ``model`` and sets it back to
    ``True``, FSDP2's default, after the call (FSDP2 has no public getter of the setting: a loop
    that keeps it off for gradient accumulation sets it again after a measuring step). Anything
    else, a call that does not measure or a model without FSDP2 modules, passes through untouched.

    Args:
        model: the probed model (its modules are searched for ``FSDPModule``).
        gate: the objective's gate, or ``None``.

    Example:
        >>> import torch
        >>> with unsharded_while_measuring(torch.nn.Linear(2, 2), None):
        ...     pass
    """
    sharded: list[nn.Module] = []
    if (gate is not None and gate.due and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and dist.is_available()):
        from torch.distributed.fsdp import FSDPModule

        sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.set_reshard_after_backward(False, recurse=False)  # type: ignore[operator]
    try:
        yield
    finally:
        for module in sharded:
            module.set_reshard_after_backward(True, recurse=False)  # type: ignore[operator]


def _feature_edge(main: Tensor, feature: Tensor, name: str) -> GradientEdge:
    """Where the output loss meets the point's feature in the autograd graph.

    The engines hand back a *copy* of a feature a later in-place op would overwrite (and the hook
    engine always copies): the output loss does not reach that copy, so the cosine is taken at the
    tensor it was copied from, where both gradients are the same (a copy is the identity).
    """
    if not feature.requires_grad:
        raise InstrumentError(
            f"the gate needs the gradient at point {name!r}, but its feature does not require grad. "
            "Hint: train with gradients enabled, or pass gate=None."
        )
    edge = get_gradient_edge(feature)
    node = feature.grad_fn
    if node is not None and type(node).__name__ == "CloneBackward0" and _grad(main, [edge])[0] is None:
        source, output_nr = node.next_functions[0]
        if source is not None:
            return GradientEdge(source, output_nr)
    return edge


def _shared_parameters(main: Tensor, terms: Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
    """Point -> the leaves (parameters) that both the output loss and the point's terms reach."""
    reached = _leaves(main)
    return {name: [leaf for key, leaf in _leaves(term).items() if key in reached] for name, term in terms.items()}


def _leaves(loss: Tensor) -> dict[int, Tensor]:
    """The leaf tensors that require grad reached from ``loss``'s graph, by id, in a fixed order."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if isinstance(variable, Tensor):
            found.setdefault(id(variable), variable)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return found
