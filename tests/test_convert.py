"""``ovseg convert``'s shared machinery: reading official files safely, accounting for every key,
strict loading, and a written checkpoint that ``load_from_checkpoint`` and ``ovseg validate`` accept.

The method-specific key mappings have their own golden tests (tests/test_*_official.py); here a
test-only mapping renames ``official.X`` to ``X`` so the machinery is checked on its own.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ovseg import convert as convert_module
from ovseg.cli import run
from ovseg.convert import ConversionError, KeyReport, build_model, build_model_from_section, load_official_weights
from ovseg.methods.simzss import SimZSS

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "experiment" / "smoke.yaml"


def rename_official(official: dict[str, torch.Tensor], model) -> tuple[dict[str, torch.Tensor], KeyReport]:
    """Test mapping: ``official.X`` -> ``X``; ``ema.*`` dropped as unused at inference."""
    report = KeyReport()
    state = {}
    for key, value in official.items():
        if key.startswith("ema."):
            report.drop(key, "EMA copy, unused at inference")
        elif key.startswith("official."):
            state[key.removeprefix("official.")] = value
            report.map(key, key.removeprefix("official."))
    report.hparams_updates["lambda_local"] = 0.25
    return state, report


@pytest.fixture
def official_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random SimZSS of the smoke size saved in a made-up 'official' layout, with the test mapping."""
    monkeypatch.setitem(convert_module.CONVERTERS, "simzss", f"{__name__}:rename_official")
    torch.manual_seed(1)
    model = build_model(SMOKE)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    weights = {f"official.{key}": value.clone() for key, value in model.state_dict().items()}
    weights["ema.step"] = torch.tensor(3)
    path = tmp_path / "official.pth"
    torch.save({"model": weights, "iteration": 10}, path)
    return path, model.state_dict()


def test_build_model_records_the_hyper_parameters_lightning_cli_records() -> None:
    model = build_model(SMOKE, ["--model.init_args.lambda_local", "0.5"])
    assert isinstance(model, SimZSS)
    assert model.hparams["_class_path"] == "ovseg.methods.simzss.SimZSS"
    assert model.hparams["lambda_local"] == 0.5
    assert model.hparams["text_encoder"]["init_args"]["width"] == 64


def test_converted_checkpoint_loads_with_the_same_weights_and_predictions(official_file, tmp_path: Path) -> None:
    source, expected = official_file
    destination = tmp_path / "converted.ckpt"
    report = convert_module.convert("simzss", source, destination, SMOKE)
    assert len(report.mapped) == len(expected) and list(report.dropped) == ["ema.step"]
    loaded = SimZSS.load_from_checkpoint(destination, map_location="cpu")
    assert loaded.lambda_local == 0.25  # built from the hyper-parameters the mapping recorded
    for key, value in expected.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    checkpoint = torch.load(destination, weights_only=True)
    assert checkpoint["ovseg_method"] == "ovseg.methods.simzss.module.SimZSS"
    assert checkpoint["ovseg_converted_from"]["dropped"] == {"EMA copy, unused at inference": 1}


def test_converted_checkpoint_validates_through_the_cli(official_file, tmp_path: Path) -> None:
    source, _ = official_file
    destination = tmp_path / "converted.ckpt"
    run(["convert", "simzss", str(source), str(destination), "-c", str(SMOKE)])
    cli = run(
        [
            "validate",
            "-c",
            str(SMOKE),
            "--ckpt_path",
            str(destination),
            "--data.init_args.num_val",
            "4",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--model.init_args.print_metrics",
            "false",
        ]
    )
    assert 0.0 <= float(cli.trainer.callback_metrics["val/mIoU"]) <= 100.0


def test_detectron2_pickles_of_numpy_arrays_are_read(tmp_path: Path) -> None:
    path = tmp_path / "model_final.pkl"
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    with path.open("wb") as handle:
        pickle.dump({"model": {"module.backbone.w": array}, "__author__": "d2"}, handle)
    weights = load_official_weights(path)
    assert list(weights) == ["backbone.w"]
    torch.testing.assert_close(weights["backbone.w"], torch.from_numpy(array))


class NotAWeight:
    pass


def test_files_that_need_arbitrary_unpickling_are_refused_with_the_option_to_give(tmp_path: Path) -> None:
    path = tmp_path / "objects.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": NotAWeight()}, path)
    with pytest.raises(ConversionError, match="weights_only=True.*--trust-pickle"):
        load_official_weights(path)
    assert list(load_official_weights(path, trust_pickle=True)) == ["w"]
    pkl = tmp_path / "objects.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"w": NotAWeight()}}))
    with pytest.raises(ConversionError, match="not a detectron2 weight pickle"):
        load_official_weights(pkl)


def test_random_bytes_and_missing_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConversionError, match="broken.pth"):
        load_official_weights(path)
    with pytest.raises(ConversionError, match="no such file"):
        load_official_weights(tmp_path / "absent.pth")


def test_unknown_keys_and_wrong_shapes_stop_the_conversion(official_file, tmp_path: Path) -> None:
    source, _ = official_file
    weights = torch.load(source, weights_only=True)["model"]
    weights["surprise.weight"] = torch.zeros(2)
    torch.save(weights, source)
    with pytest.raises(ConversionError, match="1 key.*surprise.weight"):
        convert_module.convert("simzss", source, tmp_path / "x.ckpt", SMOKE)
    del weights["surprise.weight"]
    torch.save(weights, source)
    with pytest.raises(ConversionError, match=r"shape \(file vs config\)"):
        convert_module.convert(
            "simzss", source, tmp_path / "x.ckpt", SMOKE, ["--model.init_args.text_encoder.init_args.width", "32"]
        )
    assert not (tmp_path / "x.ckpt").exists()


def test_cli_errors_are_one_line(official_file, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run(["convert", "simzss", str(tmp_path / "absent.pth"), str(tmp_path / "x.ckpt"), "-c", str(SMOKE)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_mask_methods_record_the_training_classes_of_the_config(tmp_path: Path) -> None:
    """A converted ZegFormer knows its seen classes as a trained one does (fusion, calibration)."""
    from ovseg.convert import save_converted, training_classes_of
    from ovseg.methods.zegformer import ZegFormer

    config = REPO / "configs" / "zegformer" / "synthetic.yaml"
    classes = training_classes_of(config)
    assert classes is not None and 0 < len(classes.seen_indices) < len(classes.vocabulary)
    # the config's CLIP file is made by configs/clip/synthetic.yaml: here the random-CLIP overlay's model
    section = yaml.safe_load(config.read_text())["model"]
    for tower in ("clip_text", "clip_image"):
        section["init_args"][tower]["init_args"]["checkpoint_path"] = None
    model = build_model_from_section(section)
    assert model.hparams["clip_text"]["init_args"]["checkpoint_path"] is None
    model.set_training_classes(classes)
    destination = save_converted(model, tmp_path / "z.ckpt", "official.pth", KeyReport())
    loaded = ZegFormer.load_from_checkpoint(destination, map_location="cpu")
    assert loaded.training_classes.seen_names == classes.seen_names
