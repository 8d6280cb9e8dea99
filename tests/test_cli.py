"""The ``ovseg`` command: every shipped config runs through the real CLI in fast mode; smoke run;
checkpoint round trip; clear errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from ovseg.cli import run
from ovseg.methods import METHODS
from ovseg.methods.simzss import SimZSS

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
FAST = REPO / "tests" / "fast"


def synthetic_data_args(tmp_path: Path) -> list[str]:
    return [
        "--data.init_args.num_train",
        "8",
        "--data.init_args.num_val",
        "2",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.eval_batch_size",
        "2",
    ]


def _synthetic_eval_args() -> list[str]:
    """Training DataModules evaluate on a tiny synthetic benchmark (their ``eval_data``)."""
    return [
        "--data.init_args.eval_data",
        "ovseg.datamodules.SyntheticDataModule",
        "--data.init_args.eval_data.init_args.num_train",
        "0",
        "--data.init_args.eval_data.init_args.num_val",
        "2",
        "--data.init_args.eval_data.init_args.eval_batch_size",
        "2",
    ]


def _small_crop_args(size: int = 56) -> list[str]:
    return [
        "--data.init_args.transform",
        "ovseg.datamodules.transforms.RandomResizedCrop",
        "--data.init_args.transform.init_args.size",
        str(size),
    ]


def coco_captions_data_args(tmp_path: Path) -> list[str]:
    from ovseg.prepare.synthetic import make_synthetic

    root = make_synthetic("coco", tmp_path / "coco", num_images=8, image_size=56, progress=False)
    return [
        "--data.init_args.root",
        str(root),
        "--data.init_args.train_annotations",
        str(root / "annotations/captions_train2017.json"),
        "--data.init_args.train_images",
        str(root / "train2017"),
        "--data.init_args.concepts",
        "null",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        *_small_crop_args(),
        *_synthetic_eval_args(),
    ]


def coco_stuff_data_args(tmp_path: Path) -> list[str]:
    from ovseg.prepare.synthetic import make_synthetic

    root = make_synthetic("coco-stuff", tmp_path / "coco_stuff", num_images=4, image_size=56, progress=False)
    make_synthetic("coco-stuff", root, num_images=2, split="val2017", image_size=56, progress=False)
    return [
        "--data.init_args.root",
        str(root),
        "--data.init_args.train_split",
        "train2017",
        "--data.init_args.val_split",
        "val2017",
        "--data.init_args.class_names",
        str(root / "class_names.txt"),
        "--data.init_args.unseen_classes",
        "null",
        "--data.init_args.eval_data",
        "null",
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.eval_batch_size",
        "2",
        "--data.init_args.num_workers",
        "0",
        *_small_crop_args(),
    ]


def webdataset_data_args(tmp_path: Path) -> list[str]:
    from ovseg.prepare.synthetic import make_synthetic

    root = make_synthetic("wds", tmp_path / "wds", num_images=8, image_size=56, progress=False)
    return [
        "--data.init_args.urls",
        str(root / "00000.tar"),
        "--data.init_args.epoch_length",
        "8",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.resampled",
        "false",
        *_small_crop_args(),
        *_synthetic_eval_args(),
    ]


def cached_features_data_args(tmp_path: Path) -> list[str]:
    """A tiny feature store built by the fast-mode SimZSS backbone (tests/fast/simzss.yaml) over 8
    synthetic scenes, so the cached config trains on features of the model's own shapes."""
    from ovseg.datamodules.synthetic import SyntheticDataModule
    from ovseg.encoders import TimmViT
    from ovseg.prepare.feature_cache import CacheViews, build_feature_cache

    fast = yaml.safe_load((FAST / "simzss.yaml").read_text())["model"]["init_args"]["image_encoder"]
    encoder = TimmViT(**fast["init_args"])
    dataset = SyntheticDataModule(num_train=8, image_size=56).train_dataset()
    store = build_feature_cache(
        encoder, dataset, tmp_path / "store", CacheViews("center", 56), batch_size=8, device="cpu", progress=False
    )
    return [
        "--data.init_args.store",
        str(store),
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        *_synthetic_eval_args(),
    ]


# Fast-mode data settings per DataModule class: a new DataModule needs an entry here, so no
# shipped config can escape this test.
DATA_OVERLAYS: dict[str, Callable[[Path], list[str]]] = {
    "ovseg.datamodules.SyntheticDataModule": synthetic_data_args,
    "ovseg.datamodules.CocoCaptionsDataModule": coco_captions_data_args,
    "ovseg.datamodules.CocoStuffDataModule": coco_stuff_data_args,
    "ovseg.datamodules.WebDatasetDataModule": webdataset_data_args,
    "ovseg.datamodules.CachedFeaturesDataModule": cached_features_data_args,
}


def method_key(class_path: str) -> str:
    for key, path in METHODS.items():
        if path == class_path:
            return key
    raise AssertionError(f"{class_path} is not listed in ovseg.methods.METHODS")


def fast_args(config: Path, tmp_path: Path) -> list[str]:
    """Arguments that run ``config`` for 2 steps with tiny encoders on small data."""
    content = yaml.safe_load(config.read_text())
    model_path = content["model"]["class_path"]
    data_path = content["data"]["class_path"]
    assert data_path in DATA_OVERLAYS, f"no fast-mode data overlay for {data_path} ({config})"
    return [
        "-c",
        str(config),
        "-c",
        str(FAST / f"{method_key(model_path)}.yaml"),
        "--trainer.fast_dev_run",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.enable_progress_bar",
        "false",
        *DATA_OVERLAYS[data_path](tmp_path),
    ]


EXPERIMENTS = [c for c in CONFIGS if "class_path" in yaml.safe_load(c.read_text()).get("model", {})]
#: overlays of a method's synthetic config (a model section without class_path), e.g. random_clip.yaml
OVERLAYS = [c for c in CONFIGS if "model" in yaml.safe_load(c.read_text()) and c not in EXPERIMENTS]


def test_every_config_is_covered():
    """Every YAML under configs/ is a full experiment (run below), an overlay of its folder's
    synthetic.yaml (tested below) or parses as YAML."""
    assert EXPERIMENTS, "no experiment config found"
    for config in CONFIGS:
        assert isinstance(yaml.safe_load(config.read_text()), dict), config
    for overlay in OVERLAYS:
        assert (overlay.parent / "synthetic.yaml").is_file(), f"{overlay} overlays no synthetic.yaml"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[str(c.relative_to(REPO / "configs")) for c in OVERLAYS])
def test_random_clip_overlays_leave_no_checkpoint(overlay, capsys):
    """The random-CLIP controls: the synthetic config (pretrained CLIP file) with the overlay
    resolves to a model without any CLIP checkpoint_path, everything else unchanged."""
    base = overlay.parent / "synthetic.yaml"
    configs = {}
    for files in ((base,), (base, overlay)):
        with pytest.raises(SystemExit):
            run(["fit", *[arg for path in files for arg in ("-c", str(path))], "--print_config"])
        configs[len(files)] = yaml.safe_load(capsys.readouterr().out)

    def checkpoints(node, path=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from checkpoints(value, f"{path}.{key}")
                if key == "checkpoint_path":
                    yield path, value

    before, after = dict(checkpoints(configs[1]["model"])), dict(checkpoints(configs[2]["model"]))
    assert before.keys() == after.keys() and before
    assert all(str(value).endswith("open_clip.pt") for value in before.values())
    assert all(value is None for value in after.values())
    assert configs[1]["data"] == configs[2]["data"] and configs[1]["trainer"] == configs[2]["trainer"]


@pytest.mark.parametrize("config", EXPERIMENTS, ids=[str(c.relative_to(REPO / "configs")) for c in EXPERIMENTS])
def test_config_runs_in_fast_mode(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", *fast_args(config, tmp_path)])
    assert cli.trainer.global_step == 2
    assert "val/mIoU" in cli.trainer.callback_metrics


def smoke(tmp_path: Path, *extra: str):
    return run(
        [
            "fit",
            "-c",
            str(REPO / "configs/experiment/smoke.yaml"),
            "--trainer.max_steps",
            "4",
            "--trainer.val_check_interval",
            "4",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.num_train",
            "64",
            "--data.init_args.batch_size",
            "16",
            "--data.init_args.num_val",
            "8",
            *extra,
        ]
    )


def test_smoke_fit_prints_table_and_validate_reproduces_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fitted = smoke(tmp_path)
    out = capsys.readouterr().out
    assert "mIoU" in out and "synthetic" in out
    fit_miou = float(fitted.trainer.callback_metrics["val/synthetic/mIoU"])
    checkpoint = tmp_path / "runs/smoke/checkpoints/last.ckpt"
    assert checkpoint.is_file()
    # The resolved config was saved in the run directory.
    assert list((tmp_path / "runs/smoke").rglob("config.yaml"))

    validated = run(
        [
            "validate",
            "-c",
            str(REPO / "configs/experiment/smoke.yaml"),
            "--data.init_args.num_val",
            "8",
            "--trainer.enable_progress_bar",
            "false",
            "--ckpt_path",
            str(checkpoint),
        ]
    )
    assert float(validated.trainer.callback_metrics["val/synthetic/mIoU"]) == pytest.approx(fit_miou, abs=1e-6)
    assert "hyper-parameters replace" not in capsys.readouterr().err  # the config agrees with the checkpoint
    # A -c file's model section loses to the checkpoint (as in LightningCLI), and ovseg says so;
    # a --model.* option wins.
    overlay = tmp_path / "eot.yaml"
    overlay.write_text("model:\n  init_args:\n    class_embedding: eot\n")
    validate = ["validate", "-c", str(REPO / "configs/experiment/smoke.yaml"), "--data.init_args.num_val", "8"]
    validate += ["--trainer.enable_progress_bar", "false", "--ckpt_path", str(checkpoint)]
    assert run([*validate, "-c", str(overlay)]).model.class_embedding == "concept"
    assert "the configured model.init_args class_embedding (" in capsys.readouterr().err
    assert run([*validate, "--model.init_args.class_embedding", "eot"]).model.class_embedding == "eot"
    assert "hyper-parameters replace" not in capsys.readouterr().err
    tested = run(
        [
            "test",
            "-c",
            str(REPO / "configs/experiment/smoke.yaml"),
            "--data.init_args.num_val",
            "8",
            "--trainer.enable_progress_bar",
            "false",
            "--ckpt_path",
            str(checkpoint),
        ]
    )
    assert float(tested.trainer.callback_metrics["test/synthetic/mIoU"]) == pytest.approx(fit_miou, abs=1e-6)
    run(
        [
            "predict",
            "-c",
            str(REPO / "configs/experiment/smoke.yaml"),
            "--data.init_args.num_val",
            "4",
            "--trainer.enable_progress_bar",
            "false",
            "--ckpt_path",
            str(checkpoint),
        ]
    )
    # The checkpoint rebuilds the model from Python alone and segments the same way.
    loaded = SimZSS.load_from_checkpoint(checkpoint)
    image = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8)
    names = ["sky", "grass", "ball"]
    assert torch.equal(loaded.segment(image, names)[0], fitted.model.segment(image, names)[0])
    # A second run in the same place does not fail.
    smoke(tmp_path)


def test_swap_model_and_override_options_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = smoke(
        tmp_path, "--model.init_args.lambda_local", "0", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"
    )
    assert cli.model.lambda_local == 0
    assert cli.trainer.global_step == 2


def ovseg_subprocess(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ovseg", *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_help_and_bad_configs_give_clear_messages(tmp_path):
    help_run = ovseg_subprocess("--help")
    assert help_run.returncode == 0
    assert "fit" in help_run.stdout and "ovseg data" in help_run.stdout

    bad_class = tmp_path / "bad_class.yaml"
    bad_class.write_text("model:\n  class_path: ovseg.methods.simzss.SimZZS\n")
    run = ovseg_subprocess("fit", "-c", str(bad_class))
    assert run.returncode != 0 and "SimZZS" in run.stderr

    run = ovseg_subprocess(
        "fit", "-c", str(REPO / "configs/experiment/smoke.yaml"), "--model.init_args.lamda_local", "0"
    )
    assert run.returncode != 0 and "lamda_local" in run.stderr


def test_data_make_synthetic_command(tmp_path):
    run(["data", "make-synthetic", "--format", "mmseg", "--out", str(tmp_path / "mmseg"), "--num-images", "3"])
    assert len(list((tmp_path / "mmseg").rglob("*.png"))) == 3
    with pytest.raises(SystemExit):
        run(["data", "make-synthetic", "--format", "parquet", "--out", str(tmp_path)])


def test_synthetic_configs_of_all_methods_validate_on_the_same_scenes():
    """Moving between methods on the synthetic world is a change of ``-c`` file only: the three
    demo configs read the same DataModule with the same validation scenes and vocabulary (the mask
    methods additionally ignore unseen pixels in training, which is their zero-shot protocol)."""
    configs = {
        name: yaml.safe_load((REPO / f"configs/{name}/synthetic.yaml").read_text())["data"]
        for name in ("simzss", "zegformer", "cdt")
    }
    assert {c["class_path"] for c in configs.values()} == {"ovseg.datamodules.SyntheticDataModule"}
    validation_keys = ("num_val", "image_size", "seed", "use_synonyms")
    settings = {
        name: {key: config["init_args"].get(key) for key in validation_keys} for name, config in configs.items()
    }
    simzss = settings.pop("simzss")
    for name, setting in settings.items():
        differing = {k for k in validation_keys if setting[k] != simzss[k]}
        assert not differing, (name, differing)
        assert configs[name]["init_args"]["unseen_in_training"] in ("ignored", "absent")


@pytest.mark.parametrize("method", ["zegformer", "cdt"])
def test_mask_method_checkpoint_validates_the_same_and_on_the_evaluation_datamodule(method, tmp_path, monkeypatch):
    """A mask method's checkpoint carries its training classes: ``validate --ckpt_path`` on the
    training DataModule reproduces the fit's metrics (the seen/unseen split included), and the
    same checkpoint evaluates on benchmark folders through EvaluationDataModule (cross-dataset use)."""
    from ovseg.datamodules.synthetic import SyntheticWorld
    from ovseg.prepare.synthetic import write_mmseg

    monkeypatch.chdir(tmp_path)
    config = REPO / f"configs/{method}/synthetic.yaml"
    common = [
        "-c",
        str(config),
        "-c",
        str(FAST / f"{method}.yaml"),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.num_val",
        "2",
        "--data.init_args.eval_batch_size",
        "2",
    ]
    fitted = run(
        [
            "fit",
            *common,
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
            "--data.init_args.num_train",
            "8",
            "--data.init_args.batch_size",
            "4",
        ]
    )
    checkpoint = tmp_path / f"runs/{method}_synthetic/checkpoints/last.ckpt"
    assert checkpoint.is_file()
    validated = run(["validate", *common, "--ckpt_path", str(checkpoint)])
    for key in ("val/synthetic/mIoU_seen", "val/synthetic/mIoU_unseen", "val/synthetic/hIoU"):
        assert float(validated.trainer.callback_metrics[key]) == pytest.approx(
            float(fitted.trainer.callback_metrics[key]), abs=1e-6
        ), key

    write_mmseg(
        # 3 scenes: the third shows unseen classes (sand, umbrella), so the unseen mIoU is a number
        SyntheticWorld(image_size=(64, 80), seed=4),
        tmp_path / "data/synthetic_mmseg",
        num_images=3,
        progress=False,
    )
    evaluated = run(
        [
            "validate",
            *common[:4],
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--data",
            str(REPO / "configs/data/eval_synthetic.yaml"),
            "--data.init_args.root",
            str(tmp_path / "data"),
            "--ckpt_path",
            str(checkpoint),
        ]
    )
    assert 0.0 <= float(evaluated.trainer.callback_metrics["val/synthetic/hIoU"]) <= 100.0
