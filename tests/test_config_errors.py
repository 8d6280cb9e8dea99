"""Bad configuration and input through the real ``ovseg`` command, each stopping with a message
that names the key, class path or file: an unknown class_path, a misspelt option, a checkpoint of
another method, an empty or duplicated vocabulary, a benchmark root that does not exist and a
diverging (NaN) loss."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from ovseg.cli import run
from ovseg.errors import UserError
from ovseg.module import OVSegModule

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs/experiment/smoke.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
TINY_DATA = [
    "--data.init_args.num_train",
    "16",
    "--data.init_args.batch_size",
    "8",
    "--data.init_args.num_val",
    "2",
    "--data.init_args.eval_batch_size",
    "2",
]


class OtherMethod(OVSegModule):
    """Another method (a different architecture) whose class path a checkpoint may name."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 8)

    def encode_text(self, texts):
        return torch.nn.functional.normalize(torch.randn(len(texts), 8), dim=-1)

    def predict_scores(self, images, text_embeddings, vocabulary=None):
        features = self.head(images.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return torch.einsum("bdhw,qd->bqhw", features, text_embeddings)

    def training_loss(self, batch):
        return {"loss": self.head.weight.sum()}


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Runs write their config and logs under the working directory: keep them in tmp_path."""
    monkeypatch.chdir(tmp_path)


def cli_error(capsys, *args: str) -> str:
    """stderr of an ``ovseg`` call that must exit with a parser error."""
    with pytest.raises(SystemExit) as exit_info:
        run(list(args))
    assert exit_info.value.code != 0
    return capsys.readouterr().err


# ------------------------------------------------------------------ parser errors


def test_unknown_class_path_is_named(tmp_path, capsys):
    config = tmp_path / "bad_class.yaml"
    config.write_text("model:\n  class_path: ovseg.methods.simzss.SimZZS\n")
    err = cli_error(capsys, "fit", "-c", SMOKE, "-c", str(config))
    assert "ovseg.methods.simzss.SimZZS" in err and "has no attribute 'SimZZS'" in err
    err = cli_error(capsys, "fit", "-c", SMOKE, "--data", "ovseg.datamodules.nowhere.DataModule")
    assert "Problem with given class_path 'ovseg.datamodules.nowhere.DataModule'" in err


def test_misspelt_options_are_named(tmp_path, capsys):
    err = cli_error(capsys, "fit", "-c", SMOKE, "--model.init_args.lambda_locl", "0")
    assert "lambda_locl" in err and "not accepted" in err
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_step: 3\n")
    err = cli_error(capsys, "fit", "-c", SMOKE, "-c", str(config))
    assert "does not accept option 'trainer.max_step'" in err


def test_a_value_outside_a_choice_names_the_key_and_the_choices(capsys):
    config = str(REPO / "configs/cdt/synthetic.yaml")
    err = cli_error(capsys, "fit", "-c", config, "--data.init_args.unseen_in_training", "ignore")
    assert 'key "unseen_in_training"' in err and "'labelled', 'ignored', 'absent'" in err and "ignore" in err


# ------------------------------------------------------------------ checkpoints of another method


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory) -> tuple[Path, object]:
    """A 1-step checkpoint of the smoke SimZSS (with ovseg's method record) and its CLI object."""
    workdir = tmp_path_factory.mktemp("smoke")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cli = run(
            ["fit", "-c", SMOKE, *QUIET, *TINY_DATA, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
        )
    finally:
        os.chdir(cwd)
    path = workdir / "runs/smoke/checkpoints/last.ckpt"
    assert path.is_file()
    return path, cli


def _edited(
    source: Path, target: Path, method: str | None = None, hparams: bool = True, rename_keys: bool = False
) -> Path:
    checkpoint = torch.load(source, weights_only=False)
    if method is not None:
        checkpoint[OVSegModule.CHECKPOINT_METHOD_KEY] = method
        checkpoint["hyper_parameters"]["_class_path"] = method
    if not hparams:  # an older or foreign checkpoint: no record of its method at all
        checkpoint.pop("hyper_parameters")
        checkpoint.pop("hparams_name", None)
        checkpoint.pop(OVSegModule.CHECKPOINT_METHOD_KEY)
    if rename_keys:
        checkpoint["state_dict"] = {
            (f"other.{k}" if i % 2 else k): v for i, (k, v) in enumerate(checkpoint["state_dict"].items())
        }
    torch.save(checkpoint, target)
    return target


def test_checkpoints_record_their_method(smoke_checkpoint):
    path, _ = smoke_checkpoint
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint[OVSegModule.CHECKPOINT_METHOD_KEY] == "ovseg.methods.simzss.module.SimZSS"


@pytest.mark.parametrize("method", ["test_config_errors.OtherMethod", "ovseg.methods.retired.OldMethod"])
def test_validate_refuses_a_checkpoint_of_another_method(smoke_checkpoint, tmp_path, method):
    """LightningCLI would build the checkpoint's own method from its hyper-parameters; ovseg stops
    and names both methods (an importable unrelated method, and one that no longer exists)."""
    path, _ = smoke_checkpoint
    other = _edited(path, tmp_path / "other.ckpt", method=method)
    with pytest.raises(ValueError) as error:
        run(["validate", "-c", SMOKE, *QUIET, *TINY_DATA, "--ckpt_path", str(other)])
    message = str(error.value)
    assert str(other) in message and method in message and "ovseg.methods.simzss.SimZSS" in message


def test_trainer_refuses_a_checkpoint_of_another_method_without_the_cli(smoke_checkpoint, tmp_path):
    """The same check in OVSegModule.on_load_checkpoint (``Trainer.validate(ckpt_path=...)``, resume)."""
    path, cli = smoke_checkpoint
    other = _edited(path, tmp_path / "other.ckpt", method="test_config_errors.OtherMethod")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="saved by the method test_config_errors.OtherMethod"):
        trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=other, verbose=False)


def test_foreign_checkpoint_without_a_method_record_names_mismatched_keys(smoke_checkpoint, tmp_path):
    path, _ = smoke_checkpoint
    foreign = _edited(path, tmp_path / "foreign.ckpt", hparams=False, rename_keys=True)
    with pytest.raises(UserError) as error:
        run(["validate", "-c", SMOKE, *QUIET, *TINY_DATA, "--ckpt_path", str(foreign)])
    message = str(error.value)
    assert str(foreign) in message and "does not fit SimZSS" in message
    assert "missing (model." in message and "unknown to the model (other.model." in message
    assert len(message) < 1500  # a few names, not the whole state dict


def test_own_checkpoint_still_loads(smoke_checkpoint):
    path, _ = smoke_checkpoint
    cli = run(["validate", "-c", SMOKE, *QUIET, *TINY_DATA, "--ckpt_path", str(path)])
    assert "val/mIoU" in cli.trainer.callback_metrics


# ------------------------------------------------------------------ vocabularies and benchmark roots


def _eval_data(tmp_path: Path, class_names: Path) -> Path:
    config = tmp_path / "eval.yaml"
    config.write_text(
        "class_path: ovseg.datamodules.EvaluationDataModule\n"
        f"init_args:\n  root: {tmp_path}\n  benchmarks:\n"
        f"    - {{name: mine, data_root: ., class_names: {class_names}}}\n"
    )
    return config


@pytest.mark.parametrize(
    "content, expected",
    [
        ("\n\n", "the vocabulary is empty"),
        ("sky\ngrass\nsea\nsky, heaven\n", "duplicated class name 'sky' in classes 0 and 3"),
    ],
)
def test_empty_or_duplicated_vocabulary_names_the_file(tmp_path, content, expected):
    names = tmp_path / "names.txt"
    names.write_text(content)
    with pytest.raises(ValueError) as error:
        run(["validate", "-c", SMOKE, *QUIET, "--data", str(_eval_data(tmp_path, names))])
    assert expected in str(error.value) and f"benchmark 'mine', class names {names}" in str(error.value)


def test_missing_benchmark_root_names_the_path(tmp_path):
    missing = tmp_path / "no_such_root"
    # a preset with packaged class names: the folder listing fails, naming the data directory
    with pytest.raises(FileNotFoundError) as error:
        run(
            [
                "validate",
                "-c",
                SMOKE,
                *QUIET,
                "--data",
                str(REPO / "configs/data/eval_caption8.yaml"),
                "--data.init_args.root",
                str(missing),
                "--data.init_args.select",
                "[voc21]",
            ]
        )
    assert f"data directory {missing}/VOCdevkit/VOC2012 does not exist" in str(error.value)
    # class names read from the (missing) data folder: the error says the folder is missing
    with pytest.raises(ValueError) as error:
        run(
            [
                "validate",
                "-c",
                SMOKE,
                *QUIET,
                "--data",
                str(REPO / "configs/data/eval_synthetic.yaml"),
                "--data.init_args.root",
                str(missing),
            ]
        )
    assert f"the data directory {missing}/synthetic_mmseg does not exist" in str(error.value)


# ------------------------------------------------------------------ diverging training


def test_nan_loss_stops_with_the_step_and_the_loss_terms(tmp_path, monkeypatch):
    """A learning rate of 1e30 makes the tiny SimZSS diverge within two steps; the fit stops with
    the step and every loss term instead of training on garbage."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FloatingPointError) as error:
        run(
            [
                "fit",
                "-c",
                SMOKE,
                *QUIET,
                *TINY_DATA,
                "--trainer.max_steps",
                "4",
                "--trainer.limit_val_batches",
                "0",
                "--trainer.enable_checkpointing",
                "false",
                "--trainer.callbacks",
                "[]",
                "--model.init_args.optimizer.init_args.lr",
                "1e30",
            ]
        )
    message = str(error.value)
    assert message.startswith("non-finite loss at step ")
    assert int(message.split("step ")[1].split(":")[0]) >= 1
    for term in ("loss_global", "loss_local", "logit_scale", "'loss': nan"):
        assert term in message


# ------------------------------------------------------------------ command line over checkpoint


@pytest.mark.parametrize(
    "override", [[], ["--model.init_args.lambda_local", "0.5"], ["--model.init_args.lambda_local=0.5"]]
)
def test_command_line_model_options_win_over_checkpoint_hyper_parameters(smoke_checkpoint, tmp_path, override):
    """LightningCLI applies the checkpoint's hyper-parameters over the config (kept: a run trained
    with lambda_local 0.25 is rebuilt with it), but explicit ``--model.*`` options come last."""
    path, _ = smoke_checkpoint
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"]["lambda_local"] = 0.25
    edited = tmp_path / "trained_with_override.ckpt"
    torch.save(checkpoint, edited)
    cli = run(["validate", "-c", SMOKE, *QUIET, *TINY_DATA, "--ckpt_path", str(edited), *override])
    assert cli.model.lambda_local == (0.5 if override else 0.25)
    # the rest of the configuration (files and other options) is kept
    settings = cli.config["validate"]
    assert settings["data"]["init_args"]["num_val"] == 2 and settings["trainer"]["logger"] is False
    assert settings["model"]["init_args"]["class_embedding"] == "concept"  # from the smoke YAML
    assert str(settings["ckpt_path"]) == str(edited)
