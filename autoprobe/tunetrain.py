"""``tune``'s training: builds a candidate once, trains it rung by rung, scores it on validation, measures each.

A candidate's model, optimizer and RNG state stay in memory between its rungs (built once: one
``instrument`` call per candidate), and each rung's weights are saved when a folder is given (a
state, or worker processes), so another process or a rerun continues from them. Every build,
training stretch and validation pass is timed in CPU seconds (``Spend``).

Rules defined once here:

* pairing: every candidate starts from the same initial weights (the seed) and its dropout draws
  are reseeded after ``instrument`` (``TRAIN_RNG_OFFSET``), so no candidate's masks depend on its
  adapters;
* continuation: a rung is the prefix of the full run, its learning-rate (``lr_factor(step)``) and
  weight schedules (``progress=step / steps``) those of the full run.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from autoprobe.tunespace import OUTPUT
    >>> from autoprobe.tunetrain import Runner, TrainOptions
    >>> batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    >>> run = Runner(lambda: nn.Linear(4, 2), batches, batches, task="classification", options=TrainOptions(),
    ...              seed=0, full_steps=4, weights=None)
    >>> run.advance(OUTPUT, 2); run.spend[OUTPUT].steps, run.spend[OUTPUT].passes
    (2, 1)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SelectionError, UsageError
from .legacy import moved_into
from .tunebudget import Spend
from .tunerecords import CandidateResult, TrainedCandidate
from .tunespace import Candidate, rungs

__all__ = ["Batch", "Scorer", "TrainOptions", "RunnerSetup", "Runner", "TRAIN_RNG_OFFSET", "SPACING", "reiterable",
           "accuracy", "miou_scorer", "slug", "train_candidate"]

Batch = tuple[Tensor, Tensor]
Scorer = Callable[[nn.Module, Iterable[Batch]], float]
# Offset of the seed the dropout generator is reset to after instrument (see the module docstring).
TRAIN_RNG_OFFSET = 7919
# Weight layers between spaced points (two ResNet basic blocks; the paper's best distance).
SPACING = 4


@dataclass(frozen=True)
class TrainOptions:
    """How every candidate of a search trains and is scored (``tune``, ``train_candidate``).

    Attributes:
        lr: AdamW's learning rate, constant (when ``optimizer`` is None).
        optimizer: a factory ``params -> Optimizer``, instead of AdamW(lr).
        lr_factor: ``step -> factor`` on each parameter group's initial learning rate at that step
            of the full run (warm-up, cosine decay); a function of the step, so a candidate that
            continues from a checkpoint follows the full run's schedule. None: constant.
        score: ``(model, val) -> float``, higher is better; default accuracy (classification)
            or mean IoU over the classes present in truth or prediction (dense).
        rules: the rule pack for automatic points; default ``"dense"`` for dense tasks.
        device: where to train, ``"cpu"`` or ``"cuda"``.
        ignore_index: target value the losses and the default score leave out.

    Example:
        >>> TrainOptions(lr=3e-3).lr, TrainOptions().device
        (0.003, 'cpu')
        >>> TrainOptions(lr=0)
        Traceback (most recent call last):
        ...
        autoprobe.errors.UsageError: tune: lr=0 must be a positive number, AdamW's learning rate. Hint: lr=1e-3.
    """

    lr: float = 1e-3
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None
    lr_factor: Callable[[int], float] | None = None
    score: Scorer | None = None
    rules: str | None = None
    device: str | torch.device = "cpu"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise UsageError(f"tune: lr={self.lr!r} must be a positive number, AdamW's learning rate. Hint: lr=1e-3.")
        for name in ("optimizer", "lr_factor", "score"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise UsageError(f"tune: {name}={value!r} must be a callable or None. Hint: see TrainOptions' "
                                 "docstring for what it is called with.")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise UsageError(f"tune: ignore_index={self.ignore_index!r} must be an integer. Hint: ignore_index=-100.")

    @staticmethod
    def of(options: TrainOptions | None, legacy: dict[str, Any], call: str) -> TrainOptions:
        """``options``, or a default record with the old loose keywords (``lr=``, ``score=``, ...) moved in
        (``legacy.moved_into``: each with a ``DeprecationWarning``)."""
        return moved_into(TrainOptions, options, legacy, call, "options", stacklevel=4)


@dataclass(frozen=True)
class RunnerSetup:
    """What a ``Runner`` needs besides the model and the data: the same in every worker process of a search.

    Attributes:
        task: ``"classification"`` or ``"dense"``.
        options: how candidates train and are scored.
        seed: every candidate's initial weights.
        full_steps: one full run's steps (the schedules' horizon).
    """

    task: str
    options: TrainOptions
    seed: int
    full_steps: int

    def runner(self, model: Any, train: Iterable[Batch], val: Iterable[Batch], weights: Path | None) -> Runner:
        """A ``Runner`` of this setup (``weights``: the folder of each rung's weights, or None)."""
        return Runner(model, train, val, task=self.task, options=self.options, seed=self.seed,
                      full_steps=self.full_steps, weights=weights)


@dataclass
class _Live:
    """A candidate between its rungs: the model it scores, what it trains, its optimizer and RNG."""

    model: nn.Module
    trainable: nn.Module
    probed: nn.Module | None
    opt: torch.optim.Optimizer
    rng: Tensor | None  # None until its first rung: then seeded


def reiterable(name: str, data: Iterable[Batch]) -> Iterable[Batch]:
    """``data``, refused when it is a one-shot iterator (every candidate reads it from the start)."""
    if iter(data) is data:
        raise UsageError(f"tune: {name} is a one-shot iterator; every candidate needs to read it from the start. "
                         "Hint: pass a list of batches or a DataLoader.")
    return data


def _cycle(data: Iterable[Batch], skip: int) -> Iterator[Batch]:
    done = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            if done >= skip:
                yield batch
            done += 1
        if empty:
            return


def slug(label: str) -> str:
    """``label`` as a file name."""
    return "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in label)


def _warm_up() -> None:
    """Pays this process's one-off costs before anything is measured: torch's optimizers import their
    compiler support on first use (about 1 CPU s) and ``instrument`` its modules. Not a candidate's
    cost (a plain training run pays it too); it is in ``TuneCost.cpu_s``, not in the unit."""
    from . import api, placement, rewrite  # noqa: F401

    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])


class Runner:
    """Builds and trains candidates rung by rung in this process, measuring what each costs.

    Attributes:
        scores: candidate -> its score at each rung this process knows of.
        steps: candidate -> the steps it has trained.
        errors: candidate -> why it could not be built.
        spend: candidate -> what its work in this process cost (``Spend``).
    """

    def __init__(self, model: Any, train: Iterable[Batch], val: Iterable[Batch], *, task: str, options: TrainOptions,
                 seed: int, full_steps: int, weights: Path | None) -> None:
        self.model, self.train, self.val, self.task = model, train, val, task
        self.options = options
        # The options' defaults that depend on the task, resolved once.
        default = accuracy if task == "classification" else miou_scorer(options.ignore_index)
        self.scorer = options.score if options.score is not None else default
        self.rules = options.rules if options.rules is not None else ("dense" if task == "dense" else "default")
        self.seed, self.device = seed, torch.device(options.device)
        self.weights = weights  # a folder for each rung's weights (a state, or shared by workers), or None
        self.scores: dict[Candidate, list[float]] = {}
        self.steps: dict[Candidate, int] = {}
        self.errors: dict[Candidate, str] = {}
        self.spend: dict[Candidate, Spend] = {}
        self.selections: dict[Candidate, Any] = {}
        self.full_steps = full_steps
        self._live: dict[Candidate, _Live] = {}
        self._input_size = tuple(next(iter(train))[0].shape[1:])
        _warm_up()


    def weights_file(self, c: Candidate, steps: int) -> Path | None:
        """Where ``c``'s weights after ``steps`` steps are saved (None: kept in memory only)."""
        # One file per rung: a crash between saving the weights and reporting the rung cannot leave
        # a later rung's weights under an earlier rung's score.
        return None if self.weights is None else self.weights / f"{slug(c.label)}@{steps}.pt"

    def resume(self, c: Candidate, done: list[tuple[int, float]]) -> None:
        """Rungs of ``c`` an earlier call finished (their weights are in the folder): not trained again."""
        self.scores[c] = [v for _, v in done]
        self.steps[c] = done[-1][0]

    def instrument_kwargs(self, c: Candidate) -> dict[str, Any]:
        """``c``'s ``instrument`` arguments for this search's input size, rules and ignore index."""
        return c.instrument_kwargs(self._input_size, rules=self.rules, ignore_index=self.options.ignore_index,
                                   selection=self.selections.get(c))

    def _charge(self, c: Candidate, spend: Spend) -> None:
        self.spend[c] = self.spend.get(c, Spend()) + spend

    def _fresh(self) -> nn.Module:
        torch.manual_seed(self.seed)
        if isinstance(self.model, nn.Module):
            return copy.deepcopy(self.model)
        built = self.model()
        if not isinstance(built, nn.Module):
            raise UsageError(f"tune: the model factory returned {type(built).__name__}, not an nn.Module. "
                             "Hint: pass a callable that builds the model, e.g. lambda: MyNet().")
        return built

    def build(self, c: Candidate) -> bool:
        """Builds ``c`` (the factory, then ``instrument``) unless it is built; its weights loaded when it
        continues from another process's or call's rung. Charged to ``spend``. False: it does not fit."""
        if c in self.errors:
            return False
        if c in self._live:
            return True
        import autoprobe
        from . import placement
        from .api import analyze

        cpu0 = time.process_time()
        model = self._fresh()
        probed = None
        if c.objective != "output":
            try:
                if c.position != "auto" and c not in self.selections:
                    analysis = analyze(model, input_size=self._input_size, rules=self.rules)
                    self.selections[c] = placement.spaced(analysis, c.points or 3, SPACING, c.position)
                probed = autoprobe.instrument(model, **self.instrument_kwargs(c))
            except SelectionError as exc:  # a placement that does not fit this model: reported in the table
                self.errors[c] = str(exc).splitlines()[0]
                self._charge(c, Spend(builds=1, build_s=time.process_time() - cpu0))
                return False
        trainable = probed if probed is not None else model
        trainable.to(self.device)
        opt = (self.options.optimizer or (lambda p: torch.optim.AdamW(p, lr=self.options.lr)))(trainable.parameters())
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        live = _Live(model, trainable, probed, opt, None)
        done = self.steps.get(c, 0)
        if done:
            path = self.weights_file(c, done)
            if path is None or not path.exists():
                raise UsageError(f"tune: {c.label} is to continue from {done} steps, but those weights are gone "
                                 f"({path}). Hint: rerun with a new state path.")
            blob = torch.load(path, map_location=self.device, weights_only=False)
            trainable.load_state_dict(blob["model"])
            opt.load_state_dict(blob["optimizer"])
            live.rng = blob["rng"]
        self._live[c] = live
        self._charge(c, Spend(builds=1, build_s=time.process_time() - cpu0))
        return True

    def holds(self, c: Candidate) -> bool:
        """Whether ``c`` is built in this process (continuing it needs no load)."""
        return c in self._live

    def drop(self, c: Candidate) -> None:
        """Frees ``c``'s model (pruned: it trains no further here)."""
        self._live.pop(c, None)

    def advance(self, c: Candidate, to_steps: int) -> None:
        """Trains ``c`` up to ``to_steps`` steps of the full run, scores it, saves its weights (given a folder)."""
        if not self.build(c):
            return
        live = self._live[c]
        done = self.steps.get(c, 0)
        train_s = self._train_to(c, to_steps)
        value, validation_s = self._validate(c)
        live.rng = torch.get_rng_state()  # after the pass, as a rung's saved weights hold it
        self.scores.setdefault(c, []).append(value)
        cpu0 = time.process_time()
        path = self.weights_file(c, to_steps)
        if path is not None:  # saved before the score is reported, so a reported rung has its weights
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": live.trainable.state_dict(), "optimizer": live.opt.state_dict(), "rng": live.rng},
                       path)
        # Saving the weights is the state's price, charged to training.
        self._charge(c, Spend(steps=to_steps - done, passes=1, train_s=train_s + time.process_time() - cpu0,
                              validation_s=validation_s))

    def measure(self, c: Candidate, warm: int, to_steps: int) -> Spend:
        """Trains ``c`` up to ``warm`` steps, then up to ``to_steps`` (a prefix of its rung), and times one
        validation pass whose score is not kept: an early measure of what a step and a pass cost
        (``tuneengine``: the unit). Everything is charged to ``spend``.

        The rung then continues bit-equal to one trained in one go: the pass runs in eval mode without
        gradients, and the RNG state training continues from is the one before it.

        Args:
            c: the candidate (built here unless it is).
            warm: steps trained before the measure: a process's first steps pay one-off costs (the
                optimizer's state, the allocator), which would inflate the step time extrapolated
                from a few.
            to_steps: where the measure stops, before the rung's end.

        Returns:
            The measure: the steps from ``warm`` to ``to_steps`` and the pass (no build).
        """
        if not self.build(c):
            return Spend()
        done = self.steps.get(c, 0)
        warm_s = self._train_to(c, warm) if warm > done else 0.0
        train_s = self._train_to(c, to_steps)
        _, validation_s = self._validate(c)  # training continues from the RNG state before it
        measured = Spend(steps=to_steps - max(warm, done), passes=1, train_s=train_s, validation_s=validation_s)
        self._charge(c, measured + Spend(steps=max(warm - done, 0), train_s=warm_s))
        return measured

    def _train_to(self, c: Candidate, to_steps: int) -> float:
        """Trains the built ``c`` from its steps up to ``to_steps``; its CPU seconds."""
        live = self._live[c]
        done = self.steps.get(c, 0)
        cpu0 = time.process_time()
        if live.rng is None:
            torch.manual_seed(self.seed + TRAIN_RNG_OFFSET)
        else:
            torch.set_rng_state(live.rng)
        opt, probed, model = live.opt, live.probed, live.model
        live.trainable.train()
        batches = _cycle(self.train, done)
        total = self.full_steps
        for step in range(done, to_steps):
            x, y = next(batches)
            x, y = x.to(self.device), y.to(self.device)
            if self.options.lr_factor is not None:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * self.options.lr_factor(step)
            if probed is None:
                loss = _output_loss(model(x), y, self.options.ignore_index)
            else:
                loss = probed.loss(probed(x), y, progress=min(1.0, step / total)).total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.steps[c] = to_steps
        live.rng = torch.get_rng_state()  # where the next stretch's dropout continues
        return time.process_time() - cpu0

    def _validate(self, c: Candidate) -> tuple[float, float]:
        """The built ``c``'s validation score and the pass's CPU seconds."""
        model = self._live[c].model
        cpu0 = time.process_time()
        model.eval()
        with torch.no_grad():
            value = float(self.scorer(model, _on(self.val, self.device)))
        return value, time.process_time() - cpu0

    def trained(self, c: Candidate, steps: int, say: Callable[[str], None]) -> nn.Module:
        """``c`` with its weights at ``steps``: the live model, the folder's (a resumed search, or another
        worker's), or, when another machine trained it, trained here once from scratch."""
        live = self._live.get(c)
        if live is None or self.steps.get(c) != steps:
            self._live.pop(c, None)
            path = self.weights_file(c, steps)
            if path is None or not path.exists():
                say(f"tune: {c.label} was trained elsewhere; training it here ({steps} steps, a fresh run of its "
                    "setting)")
                self.steps[c] = 0
                self.advance(c, steps)
            else:
                self.steps[c] = steps
                self.build(c)
            live = self._live[c]
        return live.trainable.eval()


def _on(val: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    for x, y in val:
        yield x.to(device), y.to(device)


def _output_loss(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    if logits.dim() > 2 and logits.shape[2:] != target.shape[1:]:
        logits = F.interpolate(logits, size=target.shape[1:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def accuracy(model: nn.Module, val: Iterable[Batch]) -> float:
    """The share of validation targets ``model``'s argmax gets right (classification's default score)."""
    correct = total = 0
    for x, y in val:
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    return correct / max(total, 1)


def miou_scorer(ignore_index: int) -> Scorer:
    """Mean IoU over the classes present in truth or prediction, ``ignore_index`` left out (dense's default)."""
    def miou(model: nn.Module, val: Iterable[Batch]) -> float:
        cm: Tensor | None = None
        for x, y in val:
            logits = model(x)
            if logits.shape[2:] != y.shape[1:]:
                logits = F.interpolate(logits, size=y.shape[1:], mode="bilinear", align_corners=False)
            k = logits.shape[1]
            valid = y != ignore_index
            pred, truth = logits.argmax(1)[valid], y[valid]
            counts = torch.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
            cm = counts if cm is None else cm + counts
        assert cm is not None  # tune checked that val is not empty
        tp = cm.diag().double()
        union = cm.sum(0) + cm.sum(1) - cm.diag()
        present = union > 0
        return float((tp[present] / union[present].double()).mean()) if bool(present.any()) else 0.0
    return miou


def train_candidate(setting: Candidate, model: Any, train: Iterable[Batch], val: Iterable[Batch], *, task: str,
                    steps: int, report: Callable[[int, float], None] | None = None, eta: int = 3, seed: int = 0,
                    options: TrainOptions | None = None, **deprecated: Any) -> TrainedCandidate:
    """``tune``'s objective for one setting: trained the full budget as ``tune`` trains it, scored at each rung.

    The function another search engine runs per trial (Ray Tune with ASHA, README "Ray Tune"): the
    same build, batches, seeds and schedules as a candidate of ``tune``, so its scores are those
    ``tune``'s table shows for that setting (bit-equal on the CPU) and ``report(step, score)`` is
    called where ``tune`` reports a rung; raising in ``report`` (a scheduler stopping the trial) stops it.

    Args:
        setting: the ``Candidate`` (``autoprobe.tuning.candidate(config)`` of sampled keys).
        model, train, val, task, steps, eta, seed, options: as ``autoprobe.tune``'s.
        report: called with ``(steps trained, validation score)`` at the end of each rung.
        **deprecated: ``lr``, ``optimizer``, ``lr_factor``, ``score``, ``rules``, ``device``, ``ignore_index``,
            the keywords before ``TrainOptions``: still accepted, with a ``DeprecationWarning``.

    Returns:
        A ``TrainedCandidate``: the trained model (the ``Probed`` or, for output-only, the plain
        model) and its ``CandidateResult`` row.

    Raises:
        SelectionError: the setting's points do not fit this model.
        UsageError: a one-shot iterator, or a factory that returns no module.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from autoprobe.tunespace import OUTPUT
        >>> data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> done = train_candidate(OUTPUT, lambda: nn.Linear(4, 2), data, data, task="classification", steps=9)
        >>> done.row.steps, len(done.row.scores)
        (9, 3)
    """
    options = TrainOptions.of(options, deprecated, "train_candidate")
    run = Runner(model, reiterable("train", train), reiterable("val", val), task=task, options=options, seed=seed,
                 full_steps=steps, weights=None)
    dev = torch.device(options.device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        for rung in rungs(steps, eta):
            run.advance(setting, rung)
            if setting in run.errors:
                raise SelectionError(f"tune: {setting.label} does not fit this model: {run.errors[setting]}")
            if report is not None:
                report(rung, run.scores[setting][-1])
        trained = run.trained(setting, steps, lambda line: None)
    scores = tuple(run.scores[setting])
    return TrainedCandidate(trained, CandidateResult(setting, steps, scores, steps))
