"""``benchmarks/run.py``: every method's table is measured from its shipped tiny config (small
sizes here), real-size configs are built without downloading weights, and the baseline window
loop computes what the batched sliding window computes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from ovseg.inference import InferenceSettings, infer_scores

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ovseg_bench", REPO / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["SimZSS", "ZegFormer", "CDT"])
def test_every_method_table_has_training_inference_and_memory_rows(bench, method):
    tiny, real = bench.METHOD_CONFIGS[method]
    assert (REPO / tiny).is_file() and (REPO / real).is_file()
    model = bench.config_model(tiny, torch.device("cpu"))
    rows = dict(bench.bench_method(model, torch.device("cpu"), repeats=1, sizes=(64, 2, 64, 32)))
    assert rows["training, batch 2 at 64 px (samples/s)"] > 0
    assert rows["inference, whole image 64x64 (images/s)"] > 0
    assert rows["inference, sliding window 32/16 (9 windows), batched (images/s)"] > 0
    assert rows["inference, sliding window 32/16 (9 windows), window-by-window loop (images/s)"] > 0
    speed_up = rows["batched sliding window speed-up over the loop (x)"]
    assert speed_up == pytest.approx(
        rows["inference, sliding window 32/16 (9 windows), batched (images/s)"]
        / rows["inference, sliding window 32/16 (9 windows), window-by-window loop (images/s)"]
    )
    assert any(name.startswith("peak ") and name.endswith("(MiB)") for name in rows)


def test_window_loop_baseline_equals_the_batched_sliding_window(bench):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 4, stride=4)
    image = torch.rand(1, 3, 70, 58)
    with torch.no_grad():
        batched = infer_scores(image, conv, InferenceSettings(window=32, stride=16))
        loop = bench.window_loop(image, conv, 32, 16)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-5)


def test_real_size_configs_lose_every_pretrained_weight_source(bench):
    config = {
        "class_path": "X",
        "init_args": {
            "pretrained": "laion2b_s29b_b131k_ft_soup",
            "backbone_pretrained": True,
            "backbone_checkpoint": "r101.pth",
            "clip_text": {"init_args": {"model_name": "ViT-B-16", "pretrained": "openai", "checkpoint_path": "a.pt"}},
            "image_encoder": {"init_args": {"pretrained": True}},
            "layers": [{"pretrained": True}],
        },
    }
    cleaned = bench.without_pretrained_weights(config)["init_args"]
    assert cleaned["pretrained"] is None and cleaned["backbone_pretrained"] is False
    assert cleaned["backbone_checkpoint"] is None
    assert cleaned["clip_text"]["init_args"] == {"model_name": "ViT-B-16", "pretrained": None, "checkpoint_path": None}
    assert cleaned["image_encoder"]["init_args"]["pretrained"] is False
    assert cleaned["layers"] == [{"pretrained": False}]


def test_real_size_configs_train_on_the_synthetic_label_space(bench):
    """The CDT paper configs name MAFT+'s 171 COCO-Stuff training names; the bench trains on the
    synthetic world's 13 classes, so they are dropped (the real-size CDT row failed without this)."""
    config = yaml.safe_load((REPO / bench.METHOD_CONFIGS["CDT"][1]).read_text())["model"]
    assert config["init_args"]["training_class_names"] == "packaged:coco_stuff_maftplus"
    cleaned = bench.for_synthetic_training(config)
    assert cleaned["init_args"]["training_class_names"] is None
    assert config["init_args"]["training_class_names"] == "packaged:coco_stuff_maftplus"  # a copy
    assert {k: v for k, v in cleaned["init_args"].items() if k != "training_class_names"} == {
        k: v for k, v in config["init_args"].items() if k != "training_class_names"
    }


def test_real_size_rows_skip_the_sliding_window(bench):
    model = bench.config_model(bench.METHOD_CONFIGS["ZegFormer"][0], torch.device("cpu"))
    rows = dict(bench.bench_method(model, torch.device("cpu"), repeats=1, sizes=(64, 2, 64, None)))
    assert rows["inference, whole image 64x64 (images/s)"] > 0
    assert not any("sliding" in name for name in rows)


def test_predict_rows_measure_the_folder_with_and_without_the_writer(bench, tmp_path):
    model = bench.config_model(bench.METHOD_CONFIGS["SimZSS"][0], torch.device("cpu"))
    rows = dict(bench.bench_predict(model, tmp_path, count=3, size=56, batch_size=2))
    off = "predict, folder of 3 JPEGs 56x56, batch 2, writer off (images/s)"
    on = "predict, folder of 3 JPEGs 56x56, batch 2, writer on: label PNG + overlay + JSON line (images/s)"
    assert rows[off] > 0 and rows[on] > 0
    assert len((tmp_path / "predictions" / "predictions.jsonl").read_text().splitlines()) == 3
    assert len(list((tmp_path / "predictions" / "overlays").glob("*.png"))) == 3
