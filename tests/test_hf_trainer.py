"""A Probed Hugging Face model trained by ``transformers.Trainer`` with default arguments:
the batch survives the column filter, the loss is autoprobe's, each term is logged, evaluation
gives ``eval_loss``; ``AutoprobeTrainer`` saves folders ``from_pretrained`` loads trained, and resumes;
the stock ``Trainer.save_model``, which would lose a Hugging Face model, refuses it loudly."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")  # the Trainer needs it
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification  # noqa: E402

import autoprobe  # noqa: E402
from autoprobe import AutoprobeCallback, AutoprobeTrainer, plain_state_dict  # noqa: E402
from autoprobe.errors import UsageError  # noqa: E402

torch.set_num_threads(1)
IMAGE = (3, 16, 16)


def _vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=16, patch_size=8, num_labels=3)
    return ViTForImageClassification(config)


class _Images(torch.utils.data.Dataset):
    """Tiny in-memory data with a column the model does not take (the column filter drops it)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, *IMAGE, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"pixel_values": self.x[i], "labels": int(self.y[i]), "file_name": f"img{i}.png"}


def _trainer(probed: autoprobe.Probed, out_dir: Path, callback: AutoprobeCallback) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=4,
        logging_steps=2, learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    return Trainer(model=probed, args=args, train_dataset=_Images(16, 0), eval_dataset=_Images(8, 1),
                   callbacks=[callback])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[autoprobe.Probed, Trainer, dict[str, float]]:
    probed = autoprobe.instrument(_vit(), input_size=IMAGE, options=autoprobe.TraceOptions(input_name="pixel_values"))
    trainer = _trainer(probed, tmp_path_factory.mktemp("trainer"), AutoprobeCallback(probed))
    before = {k: v.clone() for k, v in probed.strip().state_dict().items()}
    trainer.train()
    metrics = trainer.evaluate()
    assert any(not torch.equal(before[k], v) for k, v in probed.strip().state_dict().items()), "nothing trained"
    return probed, trainer, metrics


def test_the_column_filter_sees_the_models_inputs_and_labels(trained: tuple) -> None:
    probed, trainer, _ = trained
    parameters = inspect.signature(probed.forward).parameters
    assert "pixel_values" in parameters and "labels" in parameters
    assert trainer.label_names == ["labels"]
    assert "file_name" not in trainer._signature_columns  # the filter ran, on the model's names


def test_called_with_labels_it_returns_the_models_fields_and_autoprobes_loss(trained: tuple) -> None:
    probed, _, _ = trained
    probed.eval()
    x, y = torch.randn(4, *IMAGE), torch.tensor([0, 1, 2, 0])
    out = probed(pixel_values=x, labels=y)
    plain = probed(pixel_values=x)
    assert torch.equal(out.logits, probed.logits(plain))
    assert torch.equal(out.loss, probed.loss(plain, y).total)
    assert list(out.keys())[0] == "loss" and out["loss"] is out.loss
    assert set(out.autoprobe.parts) == set(probed.loss(plain, y).parts)


def test_every_term_reaches_the_log_history_by_name(trained: tuple) -> None:
    probed, trainer, metrics = trained
    terms = set(probed.loss(probed(pixel_values=torch.randn(2, *IMAGE)), torch.tensor([0, 1])).parts)
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 2  # max_steps=4, logging_steps=2
    for log in train_logs:
        assert terms <= set(log), sorted(log)
    assert "eval_loss" in metrics and {f"eval_{t}" for t in terms} <= set(metrics)
    eval_log = next(log for log in trainer.state.log_history if "eval_loss" in log)
    assert {f"eval_{t}" for t in terms} <= set(eval_log)


def test_the_stock_trainers_save_model_fails_loudly_and_its_checkpoints_and_save_pretrained_give_the_weights(
    trained: tuple, tmp_path: Path
) -> None:
    probed, trainer, _ = trained
    trained_weights = probed.strip().state_dict()
    # The stock save would write the Probed's keys and no config.json: from_pretrained would build a default
    # config with random weights. It is refused, naming what to use instead.
    with pytest.raises(UsageError, match=r"Trainer.save_model\(.*no config.json.*ViTForImageClassification"
                                         r".*random weights.*\nHint: train with `autoprobe.AutoprobeTrainer`"):
        trainer.save_model(str(tmp_path / "probed"))
    assert not (tmp_path / "probed" / "model.safetensors").exists()
    # The Trainer's own checkpoints (an internal save) are written as before, and give the weights back.
    trainer.save_model(str(tmp_path / "checkpoint"), _internal_call=True)
    fresh = _vit()
    fresh.load_state_dict(plain_state_dict(tmp_path / "checkpoint"), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained_weights.items())
    assert set(probed.state_dict()) == {f"model.{k}" for k in trained_weights} | {
        k for k in probed.state_dict() if k.startswith("autoprobe_adapters.")}
    # save_pretrained and config are the plain model's: from_pretrained gives it back, trained.
    assert trainer.model.config is probed.strip().config
    trainer.model.save_pretrained(str(tmp_path / "plain"))
    loaded = ViTForImageClassification.from_pretrained(str(tmp_path / "plain"))
    assert loaded.state_dict().keys() == trained_weights.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained_weights.items())


def test_autoprobe_trainer_saves_a_folder_from_pretrained_loads_trained_and_resumes_from_it(tmp_path: Path) -> None:
    probed = autoprobe.instrument(_vit(), input_size=IMAGE, options=autoprobe.TraceOptions(input_name="pixel_values"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
        learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = AutoprobeTrainer(model=probed, args=args, train_dataset=_Images(8, 0))
    trainer.train()
    assert "ce" in trainer.state.log_history[0]  # its AutoprobeCallback logs the terms
    trainer.save_model(str(tmp_path / "saved"))
    trained_weights = probed.strip().state_dict()
    loaded = ViTForImageClassification.from_pretrained(str(tmp_path / "saved"))
    assert loaded.config.num_hidden_layers == 2  # its own config, not a default one
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained_weights.items())
    # Resuming loads the plain model and the adapters back into a fresh Probed.
    other = autoprobe.instrument(_vit(), input_size=IMAGE, options=autoprobe.TraceOptions(input_name="pixel_values"))
    AutoprobeTrainer(model=other, args=args)._load_from_checkpoint(str(tmp_path / "saved"))
    for key, value in probed.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    with pytest.raises(UsageError, match=r"has no autoprobe_adapters.safetensors.*Hint"):
        AutoprobeTrainer(model=other, args=args)._load_from_checkpoint(str(tmp_path / "run"))


def test_save_pretrained_and_the_callback_refuse_what_they_cannot_serve() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(64, 3))
    probed = autoprobe.instrument(net, input_size=(3, 8, 8))
    with pytest.raises(UsageError, match=r"not a Hugging Face model.*Hint"):
        probed.save_pretrained("unused")
    with pytest.raises(AttributeError):
        _ = probed.config
    with pytest.raises(UsageError, match=r"takes the Probed the Trainer trains.*Hint"):
        AutoprobeCallback(net)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"trains the Probed of a Hugging Face model; got Probed of Sequential.*Hint"):
        AutoprobeTrainer(model=probed)
    # A model whose output is a tensor: the loss comes first in a ProbedLossOutput.
    out = probed(torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 2]))
    assert isinstance(out, autoprobe.probed.ProbedLossOutput) and out[0] is out.loss and out.loss.ndim == 0


def test_the_readme_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from _readme import python_block

    monkeypatch.chdir(tmp_path)  # it writes runs/vit
    scope: dict[str, object] = {}
    exec(compile(python_block("### Hugging Face Trainer"), "README.md", "exec"), scope)
    assert "ce" in scope["trainer"].state.log_history[0]  # type: ignore[union-attr]
    loaded = ViTForImageClassification.from_pretrained(str(tmp_path / "runs" / "vit" / "final"))
    trained = scope["probed"].strip().state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())


def test_a_plain_pytorch_model_trains_and_evaluates_with_the_plain_trainer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    probed = autoprobe.instrument(net, input_size=(3, 8, 8))
    data = [{"input": torch.randn(3, 8, 8), "labels": i % 4} for i in range(16)]  # nn.Sequential's input is `input`
    args = TrainingArguments(str(tmp_path), max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                             per_device_train_batch_size=4, per_device_eval_batch_size=4, disable_tqdm=True)
    trainer = Trainer(model=probed, args=args, train_dataset=data, eval_dataset=data[:8],
                      callbacks=[AutoprobeCallback(probed)])
    trainer.train()
    metrics = trainer.evaluate()
    point = probed.selection.names[0]
    assert {"eval_loss", "eval_ce", f"eval_dsn/{point}"} <= set(metrics)
    assert {"loss", "ce", f"dsn/{point}"} <= set(trainer.state.log_history[0])
    # Not a Hugging Face model: the stock save_model writes its state_dict, all there is to save, unrefused.
    trainer.save_model(str(tmp_path / "saved"))
    saved = plain_state_dict(tmp_path / "saved")
    assert saved.keys() == net.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())


def test_the_trainers_own_label_smoothing_is_refused_with_the_instrument_option(tmp_path: Path) -> None:
    probed = autoprobe.instrument(_vit(), input_size=IMAGE, options=autoprobe.TraceOptions(input_name="pixel_values"))
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to="none", use_cpu=True, label_smoothing_factor=0.1,
                             disable_tqdm=True)
    trainer = Trainer(model=probed, args=args, train_dataset=_Images(4, 0), callbacks=[AutoprobeCallback(probed)])
    with pytest.raises(UsageError, match=r"label_smoothing_factor=0.1.*Hint.*loss_options=LossOptions\(label_smoothing=0.1\)"):
        trainer.train()
