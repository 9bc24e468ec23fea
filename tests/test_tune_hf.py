"""autoprobe.tuning.hp_space drives Hugging Face's Trainer.hyperparameter_search (backend optuna): each
trial's model_init builds the sampled setting, output-only or a Probed, on a tiny ViT from a config."""

from __future__ import annotations

import functools

import optuna
import pytest
import torch

import autoprobe
from autoprobe.tuning import candidate, hp_space

transformers = pytest.importorskip("transformers")

# Every key but the objective fixed: a grid of two trials, output-only and one DSN setting.
_SEARCH = {"objective": ["dsn"], "alpha": [0.3], "lam": [0.0], "points": [1], "position": ["auto"],
           "schedule": ["constant"], "gate": [None]}


def test_hp_space_runs_a_trainer_hyperparameter_search_over_output_only_and_dsn(tmp_path):
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    built: list[str] = []
    space = functools.partial(hp_space, search=_SEARCH)

    def model_init(trial):
        torch.manual_seed(0)
        vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=4))
        if trial is None:  # the Trainer's own first call, before any trial
            return vit
        # hp_space, not trial.params: this transformers builds the model before it samples hp_space
        # (Trainer.train calls model_init first); Optuna returns the same value for the same key twice.
        setting = candidate(space(trial))
        built.append(setting.label)
        if setting.objective == "output":
            return vit
        kwargs = setting.instrument_kwargs(input_size=(3, 16, 16))
        return autoprobe.instrument(vit, **kwargs, options=autoprobe.TraceOptions(input_name="pixel_values"))

    gen = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=gen), "labels": i % 4} for i in range(16)]

    def accuracy(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return {"accuracy": float((logits.argmax(-1) == pred.label_ids).mean())}

    trainer = Trainer(model_init=model_init, train_dataset=data, eval_dataset=data[:8], compute_metrics=accuracy,
                      args=TrainingArguments(str(tmp_path), max_steps=2, report_to="none", use_cpu=True,
                                             per_device_train_batch_size=4, save_strategy="no"))
    grid = {k: (["output", "dsn"] if k == "objective" else list(v)) for k, v in _SEARCH.items()}
    best = trainer.hyperparameter_search(
        hp_space=space, backend="optuna", n_trials=2, direction="maximize",
        # the task metric, not eval_loss: a Probed's loss includes the auxiliary terms
        compute_objective=lambda metrics: metrics["eval_accuracy"],
        sampler=optuna.samplers.GridSampler(grid, seed=0))
    assert sorted(built) == ["dsn/alpha=0.3/M=1/auto", "output"]
    assert set(best.hyperparameters) == set(autoprobe.tuning.SEARCH_KEYS)
    assert candidate(best.hyperparameters).label in built

