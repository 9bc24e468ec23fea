"""The probed model ``instrument`` returns, and the records describing what it inserted.

Why the user's model is a submodule: ``Probed.model`` *is* the object the user passed,
so training the probed model trains the user's weights in place, ``strip()`` hands back
that same object (its state_dict has exactly the original keys and no trace of
autoprobe), and the probed state_dict reads ``model.<original key>`` and
``autoprobe_adapters.<point>.<param>``. The tapping engine (``taps.TapEngine``: the fx
graph rewrite or the hook runner) reaches the weights through that same object and is
kept out of the module tree, so each tensor appears once in ``state_dict`` and
``parameters()``. Nothing is added to, removed from or switched on the user's modules.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn

from .errors import InstrumentError, UsageError
from .losses import LossResult, Objective
from .losses.gate import unsharded_while_measuring
from .outputs import OutputSpec
from .select import Selection
from .taps import ADAPTERS, MODEL, Recipe, TapEngine

__all__ = ["Probed", "ProbedOutput", "ProbedLossOutput", "LabeledOutput", "RewriteReport", "Tap"]


class ProbedOutput(NamedTuple):
    """What ``Probed.forward`` returns.

    A NamedTuple (not a dataclass) so DDP, torch.compile and pytree utilities
    see plain containers of tensors.

    Attributes:
        output: the model's own output, unchanged: a tensor, or its dict / tuple /
            dataclass / Hugging Face ``ModelOutput`` (``Probed.logits(out)`` is the selected tensor).
        heads: point name -> adapter output q_m(z_m), shaped like the selected output
            (or at the point's own resolution with ``label_resolution="downsample"``).
        features: point name -> the raw feature z_m at that point (its own layout,
            e.g. (B, C, H, W) or (B, N, C)); a copy when a later in-place op of the
            model would overwrite it (``Tap.cloned``).
    """

    output: Any
    heads: dict[str, Tensor]
    features: dict[str, Tensor]


class LabeledOutput(dict):  # type: ignore[type-arg]
    """A dict output returned with ``labels=``: ``loss`` first, then the model's entries, each
    also readable as an attribute (``out.loss``, ``out.logits``), as a Hugging Face ``ModelOutput``.

    Example:
        >>> out = LabeledOutput({"loss": 1.0, "logits": 2.0})
        >>> out.loss, out["logits"], list(out)
        (1.0, 2.0, ['loss', 'logits'])
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the output has no entry {name!r}; it has {list(self)}") from None


class ProbedLossOutput(NamedTuple):
    """What ``Probed.forward`` returns when called with ``labels=`` on a model whose output is not a dict.

    The loss comes first, so code that takes ``outputs[0]`` as the loss (the Hugging Face
    Trainer does for tuples) finds it. A Hugging Face ``ModelOutput`` (a dataclass with a
    ``loss`` field) is returned as its own class instead, with ``loss`` set, and this record
    as its ``autoprobe`` attribute.

    Attributes:
        loss: ``Probed.loss``'s total.
        parts: its parts, detached, by name.
        output: the ``ProbedOutput`` of the forward.
    """

    loss: Tensor
    parts: dict[str, Tensor]
    output: ProbedOutput


@dataclass(frozen=True)
class Tap:
    """One inserted adapter and loss tap.

    Attributes:
        point: the point's name (module-qualified, as in ``inspect``); the key in
            ``ProbedOutput.heads``/``features`` and in the loss parts.
        adapter: the adapter's submodule path (``autoprobe_adapters.layer1_1_act2``),
            the prefix of its state_dict keys.
        feature_shape: z_m's shape at the traced input size, batch included.
        layout: z_m's layout (``NCHW``, ``NHWC``, ``NLC``, ...).
        head_shape: the adapter output's shape at the traced input size.
        adapter_type: the adapter's class name.
        parameters: the adapter's parameter count.
        cloned: whether z_m is copied before the model continues (a later in-place op
            would overwrite it; always on the hook engine).
        fx_names: on the fx engine, the tapped node's name in the train-mode and eval-mode
            graphs; ``None`` on the hook engine.
        hooked: on the hook engine, the module call a forward hook taps (``path``, or
            ``path#N`` for its N-th later call), whose output is the point itself; ``None`` on
            the fx engine.
    """

    point: str
    adapter: str
    feature_shape: tuple[int, ...]
    layout: str
    head_shape: tuple[int, ...]
    adapter_type: str
    parameters: int
    cloned: bool
    fx_names: tuple[str, str] | None = None
    hooked: str | None = None


@dataclass(frozen=True)
class RewriteReport:
    """What ``instrument`` inserted, for logs and reviews.

    Attributes:
        model: the model's label (spec or class name).
        task: ``classification``, ``dense``, ``binary``, ``multilabel`` or ``regression``.
        task_source: ``inferred`` (from the output's shape) or ``given``.
        num_classes: K, the selected output's channel axis (the target width for regression).
        input_shape: the traced input shape, batch included.
        output_shape: the selected output's shape at that input.
        objective: the objective's repr (name, points, weights, schedule).
        taps: one ``Tap`` per point, in execution order.
        model_parameters: the user model's parameter count.
        backend: how the taps are placed: ``fx`` (graph rewrite) or the fallback backend
            the selection came from (``export``, ``hooks``), tapped with forward hooks.
        output: how the prediction is read from the model's output (``output``,
            ``output['out']``, ``output.logits``), and whether that was ``given`` or the default.
        label_resolution: ``upsample`` or ``downsample`` (dense outputs).
    """

    model: str
    task: str
    task_source: str
    num_classes: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    objective: str
    taps: tuple[Tap, ...]
    model_parameters: int
    backend: str = "fx"
    output: str = "output"
    label_resolution: str = "upsample"

    @property
    def adapter_parameters(self) -> int:
        """Parameters added by all adapters together."""
        return sum(t.parameters for t in self.taps)

    def summary(self) -> str:
        """A few plain lines: the task, then one line per tap.

        Returns:
            The text, without a trailing newline.

        Example:
            >>> import torch
            >>> from autoprobe import instrument
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            ...                           torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
            ...                           torch.nn.Linear(512, 10))
            >>> print(instrument(net, input_size=(3, 16, 16)).report.summary())
            Sequential: classification (inferred), K=10, input (3, 16, 16), 1 tap, 178 adapter params (+3.00%)
              1: NCHW (8, 16, 16) -> ConvClassificationAdapter (10,), 178 params
        """
        share = self.adapter_parameters / max(self.model_parameters, 1)
        taps = f"{len(self.taps)} tap{'' if len(self.taps) == 1 else 's'}"
        via = "" if self.backend == "fx" else f", forward hooks ({self.backend} selection)"
        reads = "" if self.output == "output" else f", logits = {self.output}"
        resolution = (
            ", labels downsampled to each point" if self.label_resolution == "downsample" and len(self.output_shape) > 2
            else ""
        )
        lines = [
            f"{self.model}: {self.task} ({self.task_source}), K={self.num_classes}, input {self.input_shape[1:]}, "
            f"{taps}, {self.adapter_parameters:,} adapter params (+{share:.2%}){via}{reads}{resolution}"
        ]
        for tap in self.taps:
            copy = ", copied (in-place op follows)" if tap.cloned and tap.hooked is None else ""
            lines.append(
                f"  {tap.point}: {tap.layout} {tap.feature_shape[1:]} -> {tap.adapter_type} "
                f"{tap.head_shape[1:]}, {tap.parameters:,} params{copy}"
            )
        return "\n".join(lines)


class Probed(nn.Module):
    """A model with adapters and loss taps at its supervision points.

    Build it with ``instrument``. ``forward(*args, **kwargs)`` takes what the model takes
    and returns a ``ProbedOutput``; ``loss(out, target)`` computes the configured
    objective on the selected logits; ``strip()`` returns the user's model, trained in
    place, without anything autoprobe added.

    ``train()``/``eval()`` pick the graph traced in that mode (and set the user's
    modules' flags, as they would on the model itself). The eval graph keeps the
    taps, so validation losses are comparable; ship ``strip()`` for inference.
    On the fx engine the forward runs fx-generated code over the user's modules; hooks on
    modules it calls whole fire as usual, and the hooks of modules it traced through are
    called around their inlined code (that is what lets FSDP2 shard them). For a selection
    from a fallback backend (``report.backend`` is ``export`` or ``hooks``) the forward runs
    the model itself, with tapping hooks registered for that call only.

    Called with ``labels=`` (the Hugging Face convention, so ``transformers.Trainer`` trains it
    as it is), the forward also computes ``loss(out, labels)``: a ``ModelOutput`` comes back
    as its own class with ``.loss`` set to the total (its other fields as the model returned
    them, the ``ProbedLossOutput`` as ``.autoprobe``), a dict as a ``LabeledOutput`` (``loss``
    first, then its entries, also as attributes); any other output comes back as a
    ``ProbedLossOutput``. ``labels`` is never passed to the user's model. For the Trainer,
    ``inspect.signature(probed.forward)`` is the model's own forward's, plus ``labels``, and
    ``config`` and ``save_pretrained`` are the plain model's (``autoprobe.hf``).

    Distributed training: wrap the probed model, after ``instrument``. DDP:
    ``DDP(probed)``. FSDP2: ``fully_shard`` each block of ``probed.model`` (e.g.
    ``for b in probed.model.blocks: fully_shard(b)``), then ``fully_shard(probed)`` as the
    root, so the adapters are sharded and reduced with the rest.

    Attributes:
        model: the user's model (the very object passed to ``instrument``).
        autoprobe_adapters: ``nn.ModuleDict`` of adapters, keyed by sanitized point name.
        objective: the loss (``IMacHSR``, ``DSN``, ``DKS`` or a given ``Objective``).
        selection: the ``Selection`` the taps were placed from.
        report: the ``RewriteReport`` of what was inserted.
        task: the report's task.

    Example:
        >>> import torch
        >>> from autoprobe import instrument
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        ...                           torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(512, 10))
        >>> probed = instrument(net, input_size=(3, 16, 16))
        >>> out = probed(torch.randn(4, 3, 16, 16))
        >>> out.output.shape, list(out.heads)
        (torch.Size([4, 10]), ['1'])
        >>> total, parts = probed.loss(out, torch.tensor([0, 1, 2, 3]))
        >>> sorted(parts)  # the default objective, DSN: CE at the output and at the point's head
        ['ce', 'dsn/1']
        >>> probed.strip() is net
        True
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: nn.ModuleDict,
        objective: Objective,
        selection: Selection,
        report: RewriteReport,
        recipe: Recipe,
        engine: TapEngine,
        output: OutputSpec,
    ) -> None:
        """Assemble a probed model; use ``instrument`` rather than calling this directly.

        Args:
            model: the user's model.
            adapters: the adapters, keyed as in the recipe's sites.
            objective: the loss.
            selection: the selection the points came from.
            report: what was inserted.
            recipe: how to rebuild the engine (on unpickling).
            engine: the tapping engine, built on ``model`` and ``adapters``.
            output: how the logits are read from the model's output.
        """
        super().__init__()
        setattr(self, MODEL, model)
        setattr(self, ADAPTERS, adapters)
        self.objective = objective
        self.selection = selection
        self.report = report
        self.task: str = report.task
        self._recipe = recipe
        self._engine = engine
        self._output = output
        # Start in the user's mode; nn.Module would say train, and switching would touch the user's flags.
        self.training = model.training
        self._expose_signature()

    # The Hugging Face Trainer reads this before `model(**batch)`: autoprobe's loss is a plain mean
    # over the batch, so the Trainer must not pass `num_items_in_batch` (the traced model cannot take it).
    accepts_loss_kwargs = False

    def _expose_signature(self) -> None:
        """Give this instance a ``forward`` whose signature is the model's, plus ``labels``.

        Libraries that filter a batch by the forward's parameters (the Hugging Face Trainer's
        column filter) read ``inspect.signature(probed.forward)``; the class's
        ``(*args, labels=None, **kwargs)`` would make them drop every input. An instance
        attribute, so each Probed carries its own model's signature; rebuilt on unpickling.
        """
        call = Probed.forward.__get__(self)

        def forward(*args: Any, **kwargs: Any) -> Any:
            return call(*args, **kwargs)

        forward.__signature__ = _call_signature(getattr(self, MODEL))  # type: ignore[attr-defined]
        forward.__doc__ = Probed.forward.__doc__
        object.__setattr__(self, "forward", forward)

    def forward(self, *args: Any, labels: Tensor | None = None, **kwargs: Any) -> Any:
        """Run the model in the current mode with its taps.

        Args:
            *args: the model's inputs, as the model takes them (at the size given to
                ``instrument`` for dense tasks and token grids).
            labels: the target; when given, the loss is computed too (see the class).
            **kwargs: keyword inputs, as the model takes them (``pixel_values=x``).

        Returns:
            ``ProbedOutput(output, heads, features)``; with ``labels``, the model's
            ``ModelOutput`` with ``loss`` set, or a ``ProbedLossOutput``.

        Example:
            >>> import torch
            >>> from autoprobe import instrument
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            ...                           torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
            ...                           torch.nn.Linear(512, 10))
            >>> out = instrument(net, input_size=(3, 16, 16))(torch.randn(2, 3, 16, 16))
            >>> out.heads["1"].shape, out.features["1"].shape
            (torch.Size([2, 10]), torch.Size([2, 8, 16, 16]))
        """
        output, heads, features = self._engine.run(self.training, args, kwargs)
        out = ProbedOutput(output, heads, features)
        if labels is None:
            return out
        total, parts = self.loss(out, labels)
        record = ProbedLossOutput(total, parts, out)
        if _has_loss_field(output):
            # A Hugging Face ModelOutput: its own class, loss first (its field order), other fields as returned.
            labeled = dataclasses.replace(output, loss=total)
        elif isinstance(output, Mapping):
            labeled = LabeledOutput({"loss": total, **{k: v for k, v in output.items() if k != "loss"}})
        else:
            return record
        object.__setattr__(labeled, "autoprobe", record)
        return labeled

    @property
    def config(self) -> Any:
        """The plain model's ``config`` (Hugging Face models), so code that reads ``model.config`` works."""
        model = getattr(self, MODEL)
        if not hasattr(model, "config"):
            raise AttributeError(f"{type(model).__name__} has no config; it is not a Hugging Face model")
        return model.config

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """``model.<key>`` and ``autoprobe_adapters.<point>.<param>``, as ``nn.Module`` makes them.

        One caller is refused: the stock ``transformers.Trainer.save_model(dir)`` of a Hugging Face
        model's Probed. It would save these keys with no ``config.json``, and ``from_pretrained(dir)``
        would quietly build a default config with random weights; it raises a ``UsageError`` that
        names ``AutoprobeTrainer`` and ``save_pretrained`` instead (``autoprobe.hf``). The Trainer's
        own checkpoints (resumable by it) and every other caller get the state_dict as usual.

        Raises:
            UsageError: called by the stock ``Trainer.save_model`` for a Hugging Face model.
        """
        # Only the top-level call of the stock Trainer can be that save; transformers is then imported.
        if not args and not kwargs and "transformers.trainer" in sys.modules:
            from .hf import refuse_stock_save_model

            refuse_stock_save_model(self, sys._getframe(1))
        return super().state_dict(*args, **kwargs)

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any:
        """Save the plain model with its own ``save_pretrained``: ``from_pretrained`` gives it back, trained.

        The adapters are not saved: they exist for training. To keep them (to resume), save
        ``probed.state_dict()``; ``autoprobe.plain_state_dict`` reads the plain model's
        weights back out of such a checkpoint.

        Args:
            save_directory: as the model's ``save_pretrained`` takes it.
            **kwargs: passed on (``safe_serialization``, ``state_dict`` of the *plain* model, ...).

        Returns:
            What the model's ``save_pretrained`` returns.

        Raises:
            UsageError: the model has no ``save_pretrained`` (it is not a Hugging Face model).
        """
        model = getattr(self, MODEL)
        if not callable(getattr(model, "save_pretrained", None)):
            raise UsageError(
                f"{type(model).__name__} has no save_pretrained; it is not a Hugging Face model. "
                "Hint: `torch.save(probed.strip().state_dict(), path)` saves the plain model's weights."
            )
        return model.save_pretrained(save_directory, **kwargs)

    def logits(self, out: ProbedOutput) -> Tensor:
        """The selected prediction tensor of ``out.output`` (``report.output`` says which).

        Example:
            >>> import torch
            >>> from autoprobe import instrument
            >>> class Seg(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.body = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Conv2d(3 if i == 0 else 8, 8, 3,
            ...                                         padding=1), torch.nn.ReLU()) for i in range(4)))
            ...         self.c = torch.nn.Conv2d(8, 3, 1)
            ...     def forward(self, x):
            ...         z = self.body(x)
            ...         return {"out": self.c(z), "aux": z.mean(1)}
            >>> probed = instrument(Seg(), input_size=(3, 8, 8), rules="dense")
            >>> out = probed(torch.randn(2, 3, 8, 8))
            >>> sorted(out.output), probed.logits(out).shape, probed.report.output
            (['aux', 'out'], torch.Size([2, 3, 8, 8]), "output['out']")
        """
        return self._output.select(out.output)

    def loss(self, out: ProbedOutput, target: Tensor, progress: float | None = None) -> LossResult:
        """The configured objective on one batch, e.g. Eq. 3 for iMacHSR.

        Args:
            out: what ``forward`` returned for the batch.
            target: class ids (B,) / (B, *S) (``ignore_index`` allowed) or soft class targets
                (B, K, *S) whose rows are distributions (Mixup / CutMix), 0/1 masks for
                binary and multi-label tasks, float targets (B, K, *S) for regression. Dense
                targets may be at another resolution than the logits (the objective resizes).
            progress: fraction of training done in [0, 1]; needed by decaying schedules.

        Returns:
            ``LossResult(total, parts)``: the scalar to back-propagate and the unweighted,
            detached terms by name (``ce``, ``mi/<point>``, ``ne/<point>`` where lam > 0, ...). Unpacks as
            ``total, parts = probed.loss(out, y)``.

        Raises:
            InstrumentError: ``out`` is not a ``ProbedOutput``, or the target does not fit the task.

        Example:
            >>> import torch
            >>> from autoprobe import instrument
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
            ...                           torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            ...                           torch.nn.Linear(8, 3))
            >>> probed = instrument(net, input_size=(3, 12, 12), loss="dsn")
            >>> total, parts = probed.loss(probed(torch.randn(2, 3, 12, 12)), torch.tensor([0, 2]))
            >>> total.ndim, sorted(parts)[0]
            (0, 'ce')
        """
        if not isinstance(out, tuple) or len(out) != 3:
            raise InstrumentError(
                f"Probed.loss needs the ProbedOutput the probed model returned; got {type(out).__name__}. "
                "Hint: `out = probed(x); total, parts = probed.loss(out, y)`."
            )
        if not isinstance(target, Tensor):
            raise InstrumentError(
                f"the target must be a tensor; got {type(target).__name__}. Hint: `torch.as_tensor(labels)`."
            )
        _, heads, features = out
        with unsharded_while_measuring(self, getattr(self.objective, "gate", None)):
            return self.objective(self.logits(out), heads, features, target, progress=progress)

    def strip(self) -> nn.Module:
        """The user's model without adapters and taps, for inference and export.

        It is the object that was passed to ``instrument`` (or built from its spec),
        trained in place: its state_dict has exactly its original keys, its forward
        is its own, so it has no autoprobe overhead. Its train/eval mode is this
        module's.

        Returns:
            The plain model.

        Example:
            >>> import torch
            >>> from autoprobe import instrument
            >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
            ...                           torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            ...                           torch.nn.Linear(8, 3))
            >>> probed = instrument(net, input_size=(3, 12, 12)).eval()
            >>> x = torch.randn(2, 3, 12, 12)
            >>> torch.equal(probed.strip()(x), probed(x).output)
            True
        """
        return getattr(self, MODEL)

    @property
    def code(self) -> str:
        """What the current mode runs (generated Python, or the hooks it registers), for debugging."""
        return self._engine.code(self.training)

    def __getstate__(self) -> dict[str, Any]:
        # Generated GraphModule code pickles by re-tracing into a fresh module tree, which
        # would lose the sharing with ``self.model``; keep the recipe and rebuild instead.
        state = self.__dict__.copy()
        state.pop("_engine", None)
        state.pop("forward", None)  # a closure over this instance; rebuilt
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._engine = self._recipe.build(getattr(self, MODEL), getattr(self, ADAPTERS))
        self._expose_signature()


def _has_loss_field(output: Any) -> bool:
    return dataclasses.is_dataclass(output) and any(f.name == "loss" for f in dataclasses.fields(output))


def _call_signature(model: nn.Module) -> inspect.Signature:
    """The model's forward's signature, with a keyword ``labels`` added where it has none."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C forward: no names to expose
        signature = inspect.signature(_any_call)
    parameters = list(signature.parameters.values())
    if "labels" not in signature.parameters:
        labels = inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default=None)
        tail = len(parameters) - (parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD)
        parameters.insert(tail, labels)
    return signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty)


def _any_call(*args: Any, **kwargs: Any) -> None:
    """Stands in for a forward whose signature cannot be read."""


