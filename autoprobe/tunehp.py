"""``tune``'s search keys for searches run by others: an Optuna ``hp_space`` and the setting a trial's values name.

Hugging Face's ``Trainer.hyperparameter_search``, a plain Optuna study or a Ray Tune search samples
the keys; ``candidate(params)`` is then the same ``Candidate`` ``tune`` would train for those values,
and ``Candidate.instrument_kwargs`` its ``instrument`` arguments, every option spelled out.

Example:
    >>> import optuna
    >>> from autoprobe.tunehp import candidate, hp_space
    >>> trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    >>> setting = candidate(hp_space(trial, search={"objective": ["dsn"]}))
    >>> setting.objective in ("output", "dsn")
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args

from .defaults import DEFAULT_HEAD
from .errors import UsageError
from .tunespace import OUTPUT, SEARCH_KEYS, Candidate, TuneObjective, check_values, search_values

__all__ = ["hp_space", "candidate"]


def hp_space(trial: Any, search: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """tune's search keys as an Optuna ``hp_space``, e.g. for Hugging Face's hyperparameter search.

    ``Trainer.hyperparameter_search(backend="optuna", hp_space=autoprobe.tuning.hp_space, ...)``
    samples one value per key (``SEARCH_KEYS``, each a ``CategoricalDistribution``); the Trainer's
    ``model_init(trial)`` then builds the setting with ``candidate(trial.params)`` (README, "Hugging
    Face": ``AutoprobeTrainer`` takes a built ``Probed``, so the search uses the plain ``Trainer``).

    Args:
        trial: an ``optuna.trial.Trial``.
        search: key -> values, as ``tune``'s ``search`` (missing keys: ``DEFAULT_SEARCH``); pass it
            with ``functools.partial`` to search other values.

    Returns:
        key -> the sampled value, for every key of ``SEARCH_KEYS``.

    Raises:
        UsageError: an unknown search key or value.

    Example:
        See the module docstring.
    """
    values = search_values(search)
    values["objective"] = ("output", *(v for v in values["objective"] if v != "output"))
    return {key: trial.suggest_categorical(key, list(vals)) for key, vals in values.items()}


def candidate(params: Mapping[str, Any]) -> Candidate:
    """The ``Candidate`` of sampled ``hp_space`` values (keys the key does not apply to are ignored:
    an output-only setting has no weights, DSN no ``lam``).

    Args:
        params: key -> value for the keys of ``SEARCH_KEYS`` (``trial.params``, a Ray Tune config);
            missing keys take the defaults of ``Candidate``.

    Returns:
        The setting, equal to the candidate ``tune`` would search for the same values.

    Raises:
        UsageError: an unknown key or objective.

    Example:
        >>> candidate({"objective": "dsn", "alpha": 0.3, "points": 1}).label
        'dsn/alpha=0.3/M=1/auto'
    """
    unknown = sorted(set(params) - set(SEARCH_KEYS))
    if unknown:
        raise UsageError(f"tune: unknown search key(s) {unknown}; the keys are {list(SEARCH_KEYS)}. "
                         "Hint: pass trial.params of a trial that sampled autoprobe.tuning.hp_space.")
    objective = params.get("objective", "output")
    check_values("objective", [objective], get_args(TuneObjective))
    if objective == "output":
        return OUTPUT
    lam = params.get("lam") if objective == "imachsr" else None
    alpha = params.get("alpha")
    return Candidate(objective, None if alpha is None else float(alpha), None if lam is None else float(lam),
                     params.get("points"), params.get("position", "auto"), params.get("schedule", "constant"),
                     params.get("gate"), params.get("head", DEFAULT_HEAD))
