"""Hugging Face ``transformers.Trainer``: each term of autoprobe's loss in the Trainer's logs.

The Trainer trains a ``Probed`` as it is: ``inspect.signature(probed.forward)`` is the
model's own forward's plus ``labels`` (so the column filter keeps the batch), and
``probed(**batch)`` with ``labels`` returns the model's ``ModelOutput`` with ``.loss`` set to
autoprobe's total, so ``train()`` and ``evaluate()`` (``eval_loss``) need no extra argument.
What the Trainer cannot see on its own is the terms: ``AutoprobeCallback`` adds their means
over the steps since the last log to every training log (``ce``, ``mi/<point>``, ...) and
evaluation log (``eval_ce``, ...), in ``trainer.state.log_history`` and in the ``logs`` the
callbacks after it receive.

Saving. The plain ``Trainer`` saves a model that is not a ``PreTrainedModel`` as its bare
state_dict: it would write the Probed's (``model.`` and ``autoprobe_adapters.`` keys) and no
``config.json``, and transformers 5's ``from_pretrained(dir)`` would then build a *default* config
and random weights, with only a load report. So the plain ``trainer.save_model(dir)`` of a Hugging
Face model's Probed raises a ``UsageError`` (``refuse_stock_save_model``; the only call of ours it
makes is ``Probed.state_dict``). Use ``AutoprobeTrainer``: its ``save_model(dir)`` writes the plain
model with its own ``save_pretrained`` (so ``from_pretrained(dir)`` gives it back, trained) and the
adapters beside it in ``autoprobe_adapters.safetensors``, and it resumes from such folders. With
the plain ``Trainer``, save with ``trainer.model.save_pretrained(dir)`` (``Probed.save_pretrained``
is the plain model's); its checkpoints, which it resumes from itself, are written as before, and
``autoprobe.plain_state_dict(checkpoint)`` reads the plain model's weights out of them.

Example:
    >>> import torch, autoprobe
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> vit = ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                                 intermediate_size=32, image_size=16, patch_size=8, num_labels=3))
    >>> probed = autoprobe.instrument(vit, input_size=(3, 16, 16),
    ...                               options=autoprobe.TraceOptions(input_name="pixel_values"))
    >>> callback = AutoprobeCallback(probed)     # Trainer(model=probed, ..., callbacks=[callback])
    >>> out = probed(pixel_values=torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 0]))
    >>> out.loss.ndim, out.logits.shape, sorted(out.autoprobe.parts)[0]
    (0, torch.Size([4, 3]), 'ce')
"""

from __future__ import annotations

import os
from types import FrameType
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .errors import UsageError
from .probed import Probed, ProbedLossOutput
from .taps import ADAPTERS, MODEL

__all__ = ["AutoprobeCallback", "AutoprobeTrainer", "ADAPTERS_FILE", "refuse_stock_save_model"]

ADAPTERS_FILE = "autoprobe_adapters.safetensors"
"""The file ``AutoprobeTrainer`` writes the adapters' weights to, beside the plain model's."""


class _RunningMeans:
    """Sums of detached parts over forwards, read and reset at each log (no host sync before)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, parts: dict[str, Tensor]) -> None:
        for name, value in parts.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.detach().clone()
        self.count += 1

    def pop_means(self, prefix: str) -> dict[str, float]:
        means = {f"{prefix}{name}": float(total) / self.count for name, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


class AutoprobeCallback(TrainerCallback):
    """Logs every term of a ``Probed``'s loss by name, beside the Trainer's ``loss`` / ``eval_loss``.

    Pass it with the Probed the Trainer trains: ``Trainer(model=probed, args=...,
    callbacks=[AutoprobeCallback(probed)])``. It collects the parts of every forward called
    with ``labels`` (a forward hook on the Probed, removed by ``close()``), and at each log
    adds their means since the previous log: ``ce``, ``mi/<point>`` (``ne/<point>`` with ``lam`` > 0), ... to
    training logs, ``eval_ce``, ... to evaluation logs. They are this process's means; the
    Trainer's ``loss`` is averaged over processes.

    Args:
        probed: the model given to the Trainer.

    Raises:
        UsageError: ``probed`` is not a ``Probed``.
    """

    def __init__(self, probed: Probed) -> None:
        if not isinstance(probed, Probed):
            raise UsageError(
                f"AutoprobeCallback takes the Probed the Trainer trains; got {type(probed).__name__}. "
                "Hint: `probed = autoprobe.instrument(model, ...)`, then `Trainer(model=probed, "
                "callbacks=[AutoprobeCallback(probed)])`."
            )
        self._train = _RunningMeans()
        self._eval = _RunningMeans()
        self._handle = probed.register_forward_hook(self._collect)

    def _collect(self, module: nn.Module, args: Any, output: Any) -> None:
        record = output if isinstance(output, ProbedLossOutput) else getattr(output, "autoprobe", None)
        if isinstance(record, ProbedLossOutput):
            (self._train if module.training else self._eval).add(record.parts)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Refuse the Trainer's own label smoothing: it takes ``labels`` away from the Probed, so no term would train."""
        if args.label_smoothing_factor:
            raise UsageError(
                f"TrainingArguments(label_smoothing_factor={args.label_smoothing_factor}) makes the Trainer compute "
                "its own loss on the logits, without autoprobe's terms. Hint: leave it at 0 and pass "
                f"`instrument(..., loss_options=LossOptions(label_smoothing={args.label_smoothing_factor}))`."
            )

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the means of the terms to a training (``loss``) or evaluation (``eval_loss``) log."""
        if logs is None:
            return
        if "loss" in logs and self._train.count:
            means = self._train.pop_means("")
        elif "eval_loss" in logs and self._eval.count:
            means = self._eval.pop_means("eval_")
        else:
            return
        logs.update(means)
        # The Trainer appended its record before calling the callbacks; it is that same log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(means)

    def close(self) -> None:
        """Remove the forward hook from the Probed."""
        self._handle.remove()


def refuse_stock_save_model(probed: Probed, caller: FrameType | None) -> None:
    """Refuse the stock ``Trainer.save_model(dir)`` of a Hugging Face model's Probed, which would lose it.

    ``Trainer._save`` saves a model that is not a ``PreTrainedModel`` as its bare state_dict and no
    ``config.json``; ``from_pretrained`` then builds a default config with random weights and only a
    load report. ``Probed.state_dict`` calls this with its caller's frame: the refusal fires only when
    that is the stock ``Trainer._save`` (not overridden, as ``AutoprobeTrainer`` does) called by
    ``save_model`` from user code (``_internal_call`` false). The Trainer's checkpoints, which it
    resumes from itself, are left alone, and so is a Probed of a plain PyTorch model.

    Args:
        probed: the Probed whose ``state_dict`` is asked for.
        caller: the frame that called ``state_dict``.

    Raises:
        UsageError: it is that save.
    """
    if caller is None or caller.f_code is not Trainer._save.__code__:
        return
    up = caller.f_back
    if up is None or up.f_code is not Trainer.save_model.__code__ or up.f_locals.get("_internal_call", True):
        return
    model = probed.strip()
    if not callable(getattr(model, "save_pretrained", None)):
        return  # a plain PyTorch model: its state_dict is what there is to save
    folder, cls = caller.f_locals.get("output_dir"), type(model).__name__
    raise UsageError(
        f"transformers.Trainer.save_model({folder!r}) would save this Probed's own state_dict (`model.` and "
        f"`{ADAPTERS}.` keys) and no config.json, so `{cls}.from_pretrained(...)` of that folder would build a default "
        "config with random weights: the trained model would be lost.\nHint: train with `autoprobe.AutoprobeTrainer` "
        "(the Trainer's arguments; its save_model writes the plain model with its config, and the adapters beside "
        "it), or save with `trainer.model.save_pretrained(dir)`."
    )


class AutoprobeTrainer(Trainer):
    """``transformers.Trainer`` for a ``Probed``: every term logged, and saved folders ``from_pretrained`` loads.

    It is the Trainer with two changes: an ``AutoprobeCallback`` is added, and a saved folder
    (``save_model``, every checkpoint) holds the plain model as its own ``save_pretrained``
    writes it, so ``ModelClass.from_pretrained(folder)`` is the trained model, plus the
    adapters in ``autoprobe_adapters.safetensors``; resuming and ``load_best_model_at_end``
    load both back. Everything else (arguments, DDP, evaluation) is the Trainer's.

    Args:
        model: the ``Probed`` of a Hugging Face model.
        *args: the Trainer's.
        callbacks: the Trainer's; the ``AutoprobeCallback`` is appended.
        **kwargs: the Trainer's.

    Raises:
        UsageError: ``model`` is not a ``Probed``, or its model has no ``save_pretrained``.
    """

    def __init__(self, model: Probed, *args: Any, callbacks: list[Any] | None = None, **kwargs: Any) -> None:
        if not isinstance(model, Probed) or not callable(getattr(model.strip(), "save_pretrained", None)):
            raise UsageError(
                f"AutoprobeTrainer trains the Probed of a Hugging Face model; got {type(model).__name__}"
                + (f" of {type(model.strip()).__name__}" if isinstance(model, Probed) else "")
                + ". Hint: `AutoprobeTrainer(model=autoprobe.instrument(hf_model, ...), ...)`; for other models use "
                "`Trainer(model=probed, callbacks=[AutoprobeCallback(probed)])` and save `probed.state_dict()`."
            )
        self.autoprobe_callback = AutoprobeCallback(model)
        super().__init__(model, *args, callbacks=[*(callbacks or []), self.autoprobe_callback], **kwargs)

    def _probed(self, model: nn.Module | None = None) -> Probed:
        model = self.model if model is None else model
        while not isinstance(model, Probed) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module  # DDP / DataParallel
        return model  # type: ignore[return-value]

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        if state_dict is not None:
            raise UsageError(
                "AutoprobeTrainer saves from the Probed itself; this run handed the Trainer a gathered state_dict "
                "(FSDP, DeepSpeed or SageMaker). Hint: use the plain Trainer there and save "
                "`trainer.model.save_pretrained(dir)` from the main process."
            )
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        super()._save(output_dir)  # the processing class and training arguments, as the Trainer writes them
        if not self.args.should_save:
            return
        probed = self._probed()
        probed.save_pretrained(output_dir)  # replaces the Trainer's model.safetensors by the plain model's
        adapters = {k: v.detach().contiguous() for k, v in getattr(probed, ADAPTERS).state_dict().items()}
        save_file(adapters, os.path.join(output_dir, ADAPTERS_FILE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        probed = self._probed(model)
        adapters_file = os.path.join(resume_from_checkpoint, ADAPTERS_FILE)
        if not os.path.isfile(adapters_file):
            raise UsageError(
                f"{resume_from_checkpoint} has no {ADAPTERS_FILE}, so AutoprobeTrainer did not save it. "
                "Hint: resume from a checkpoint this trainer wrote; a plain Trainer's folder holds the Probed's "
                "state_dict: `probed.load_state_dict(safetensors.torch.load_file(folder + '/model.safetensors'))`."
            )
        plain = type(probed.strip()).from_pretrained(resume_from_checkpoint).state_dict()
        getattr(probed, MODEL).load_state_dict(plain, strict=True)
        getattr(probed, ADAPTERS).load_state_dict(load_file(adapters_file), strict=True)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
