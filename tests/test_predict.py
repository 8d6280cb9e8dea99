"""Segmenting your own images: ``segment`` reads what users hold and refuses what is ambiguous,
``ImageFolderDataModule`` lists any image files with any vocabulary, and ``ovseg predict`` writes one
label PNG, one overlay and one JSON line per image (once each under 2-process DDP)."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from spawn_ranks import become_rank, free_port, run_ranks  # tests/spawn_ranks.py

from ovseg.cli import run
from ovseg.datamodules.image_folder import (
    ImageFolderDataModule,
    find_images,
    image_names,
    parse_classes,
)
from ovseg.images import as_image_tensor
from ovseg.module import OVSegModule
from ovseg.visualize import overlay, palette

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs/experiment/smoke.yaml"
CLASSES = "square, circle|disc, a red triangle"


def tiny_model():
    from ovseg.encoders.text_transformer import CLIPTextTransformer
    from ovseg.encoders.timm_vit import TimmViT
    from ovseg.methods.simzss import SimZSS

    torch.manual_seed(0)
    return SimZSS(TimmViT.tiny(), CLIPTextTransformer.tiny(output_dim=64), print_metrics=False).eval()


def write_mixed_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of mixed sizes and formats; returns name -> upright (H, W)."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(folder / "plain.jpg", quality=95)
    rotated = Image.fromarray(rng.integers(0, 256, (30, 52, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored 30x52, shown rotated 90 degrees clockwise: 52 high, 30 wide
    rotated.save(folder / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(rng.integers(0, 256, (36, 36, 4), dtype=np.uint8), "RGBA").save(folder / "sub" / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (25, 47), dtype=np.uint8), "L").save(folder / "gray.png")
    (folder / "notes.txt").write_text("not an image")
    return {"plain": (40, 64), "rotated": (52, 30), "sub/alpha": (36, 36), "gray": (25, 47)}


# ------------------------------------------------------------------ segment() input


def test_segment_reads_paths_pil_numpy_and_tensors_alike(tmp_path):
    model = tiny_model()
    write_mixed_images(tmp_path)
    path = tmp_path / "rotated.jpg"
    upright = as_image_tensor(path)
    assert upright.shape == (3, 52, 30)  # EXIF applied
    names = ["square", "circle"]
    expected = model.segment(upright, names)[0]
    assert expected.shape == (52, 30)
    pil = Image.open(path)  # stored sideways: segment applies the EXIF orientation as the decoder does
    hwc = upright.permute(1, 2, 0).numpy()
    for image in (str(path), path, pil, hwc, upright.float() / 255, upright[None]):
        assert torch.equal(model.segment(image, names)[0], expected), type(image)
    gray = np.asarray(Image.open(tmp_path / "gray.png"))
    assert torch.equal(model.segment(gray, names)[0], model.segment(tmp_path / "gray.png", names)[0])
    several = model.segment([path, hwc, tmp_path / "plain.jpg"], names)
    assert [tuple(s.shape) for s in several] == [(52, 30), (52, 30), (40, 64)]


@pytest.mark.parametrize(
    "image, error, words",
    [
        (torch.full((3, 8, 8), 200.0), ValueError, "divide by 255"),
        (torch.full((3, 8, 8), -1.5), ValueError, "normalised"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), ValueError, "permute"),
        (torch.zeros(4, 8, 8, dtype=torch.uint8), ValueError, "(3, H, W)"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), TypeError, "uint8"),
        (np.zeros((8, 8, 3), dtype=np.float32), TypeError, "uint8"),
        (np.zeros((8, 8, 4), dtype=np.uint8), ValueError, "alpha"),
        (12, TypeError, "file path"),
    ],
)
def test_segment_refuses_ambiguous_images(image, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        tiny_model().segment(image, ["a", "b"])


# ------------------------------------------------------------------ ImageFolderDataModule


def test_image_folder_lists_images_by_folder_glob_and_list(tmp_path):
    write_mixed_images(tmp_path)
    found = find_images(tmp_path)
    assert [p.name for p in found] == ["gray.png", "plain.jpg", "rotated.jpg", "alpha.png"]
    assert find_images(str(tmp_path / "*.jpg")) == [tmp_path / "plain.jpg", tmp_path / "rotated.jpg"]
    assert find_images([tmp_path / "gray.png", str(tmp_path / "*.png")]) == [tmp_path / "gray.png"]
    assert image_names(found) == ["gray", "plain", "rotated", "sub/alpha"]
    (tmp_path / "plain.png").write_bytes((tmp_path / "gray.png").read_bytes())
    assert image_names([tmp_path / "plain.jpg", tmp_path / "plain.png"]) == ["plain_jpg", "plain_png"]
    with pytest.raises(FileNotFoundError, match="missing"):
        find_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        find_images(str(tmp_path / "*.webp"))


def test_image_folder_vocabulary_from_string_file_and_list(tmp_path):
    write_mixed_images(tmp_path)
    assert parse_classes("sky, tv|monitor ,a red car") == [("sky",), ("tv", "monitor"), ("a red car",)]
    names = tmp_path / "names.txt"
    names.write_text("sky\ntv, monitor\n")
    assert parse_classes(str(names)) == [("sky",), ("tv", "monitor")]
    assert len(parse_classes("packaged:voc21")) == 21
    module = ImageFolderDataModule(
        tmp_path, ["sky", "tv, monitor"], templates="imagenet80", background_threshold=0.3, short_side=32
    )
    (benchmark,) = module.benchmarks
    assert benchmark.vocabulary.classes == (("sky",), ("tv", "monitor"))
    assert len(benchmark.vocabulary.templates) == 80 and benchmark.vocabulary.background_threshold == 0.3
    assert benchmark.inference.short_side == 32
    item = module.dataset[2]
    assert item["name"] == "rotated" and item["image"].shape == (3, 52, 30)


# ------------------------------------------------------------------ overlay


def test_overlay_tints_by_class_colour_and_adds_a_legend_of_present_classes():
    image = torch.full((3, 20, 30), 100, dtype=torch.uint8)
    labels = torch.zeros(20, 30, dtype=torch.long)
    labels[:, 10:] = 2
    names = ["sky", "unused", "a red car"]
    colours = palette(3)
    out = np.asarray(overlay(image, labels, names, colours, alpha=0.5))
    assert out.shape[0] >= 20 and out.shape[1] > 30  # legend panel on the right
    expected = np.rint(0.5 * 100 + 0.5 * colours[labels.numpy()].astype(np.float32)).astype(np.uint8)
    assert np.array_equal(out[:20, :30], expected)
    legend = out[:, 30:]
    # a swatch of each present class colour, none of the absent one
    for k, present in ((0, True), (1, False), (2, True)):
        assert (legend == colours[k]).all(-1).any() == present


# ------------------------------------------------------------------ ovseg predict


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    """A smoke-config SimZSS checkpoint after one training step (about 5 s)."""
    folder = tmp_path_factory.mktemp("smoke")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        run(
            [
                "fit",
                "-c",
                str(SMOKE),
                "--trainer.max_steps",
                "1",
                "--trainer.limit_val_batches",
                "0",
                "--data.init_args.num_train",
                "4",
                "--data.init_args.batch_size",
                "4",
                "--data.init_args.num_val",
                "2",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.logger",
                "false",
            ]
        )
    finally:
        os.chdir(cwd)
    return folder / "runs/smoke/checkpoints/last.ckpt"


def predict_folder(checkpoint: Path, images: Path, out: Path, *extra: str) -> None:
    run(
        [
            "predict",
            "-c",
            str(SMOKE),
            "--ckpt_path",
            str(checkpoint),
            "--trainer.logger",
            "false",
            "--data",
            "ovseg.datamodules.ImageFolderDataModule",
            "--data.init_args.images",
            str(images),
            "--data.init_args.classes",
            CLASSES,
            "--data.init_args.batch_size",
            "2",
            "--writer.output_dir",
            str(out),
            *extra,
        ]
    )


def test_predict_writes_label_overlay_and_json_line_per_image(tmp_path, smoke_checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sizes = write_mixed_images(tmp_path / "images")
    out = tmp_path / "out"
    predict_folder(smoke_checkpoint, tmp_path / "images", out, "--writer.scores", "true")
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in records) == sorted(sizes)
    assert [r["index"] for r in records] == list(range(len(sizes)))
    assert not list(out.glob("predictions.rank*.jsonl"))
    assert len(list((out / "labels").rglob("*.png"))) == len(sizes) == len(list((out / "overlays").rglob("*.png")))
    vocabulary = json.loads((out / "vocabulary.json").read_text())
    assert vocabulary["names"] == ["square", "circle", "a red triangle"]
    assert vocabulary["synonyms"][1] == ["circle", "disc"] and len(vocabulary["palette"]) == 3
    model = OVSegModule.from_pretrained(str(smoke_checkpoint)).eval()
    names = parse_classes(CLASSES)
    for record in records:
        label_png = Image.open(out / record["label"])
        assert label_png.mode == "P"
        labels = np.asarray(label_png)
        assert labels.shape == sizes[record["name"]] == (record["height"], record["width"])
        assert labels.max() < 3
        expected = model.segment(record["path"], names)[0].numpy()
        assert np.array_equal(labels, expected), record["name"]
        overlay_png = Image.open(out / record["overlay"])
        assert overlay_png.height >= labels.shape[0] and overlay_png.width > labels.shape[1]
        counts = np.bincount(labels.reshape(-1), minlength=3)
        assert {c["index"]: c["fraction"] for c in record["classes"]} == pytest.approx(
            {k: counts[k] / labels.size for k in range(3) if counts[k]}, abs=1e-6
        )
        assert all(0 < c["confidence"] <= 1 for c in record["classes"])
        scores = np.load(out / record["scores"])
        assert scores.dtype == np.float16 and scores.shape == (3, *labels.shape)
        assert (scores.astype(np.float32).argmax(0) == labels).mean() > 0.99  # fp16 rounding may break ties


def test_predict_by_default_writes_under_the_run_folder(tmp_path, smoke_checkpoint, monkeypatch):
    write_mixed_images(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    run(
        [
            "predict",
            "-c",
            str(SMOKE),
            "--ckpt_path",
            str(smoke_checkpoint),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.num_val",
            "3",
            "--writer.overlays",
            "false",
        ]
    )
    out = tmp_path / "runs/smoke/predictions"  # smoke.yaml's default_root_dir; the synthetic benchmark
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    assert len(list((out / "labels").glob("*.png"))) == 3 and not (out / "overlays").exists()


# ------------------------------------------------------------------ 2-process DDP

WORLD = 2
NUM_IMAGES = 5


def _ddp_worker(rank: int, port: int, out_dir: str, images: str) -> None:
    become_rank(rank, port, WORLD)
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    from ovseg.writer import PredictionWriter

    writer = PredictionWriter(output_dir=os.path.join(out_dir, "predictions"))
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        logger=False,
        callbacks=[writer],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    datamodule = ImageFolderDataModule(images, "square, circle", batch_size=2)
    trainer.predict(tiny_model(), datamodule=datamodule, return_predictions=False)
    torch.save({"written": writer.written, "world": dist.get_world_size()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_predict_writes_each_image_once(tmp_path):
    rng = np.random.default_rng(1)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(NUM_IMAGES):
        Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 32, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    ranks = run_ranks(_ddp_worker, (free_port(), str(tmp_path), str(images)), WORLD, 120, str(tmp_path))
    assert [r["world"] for r in ranks] == [WORLD, WORLD]
    assert sorted(r["written"] for r in ranks) == [2, 3]  # disjoint shards: 5 writes in all
    out = tmp_path / "predictions"
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == [f"img{i}" for i in range(NUM_IMAGES)]
    assert sorted(p.stem for p in (out / "labels").glob("*.png")) == [f"img{i}" for i in range(NUM_IMAGES)]
    assert not list(out.glob("predictions.rank*.jsonl"))


# ------------------------------------------------------------------ inference without NLTK


def test_simzss_checkpoint_loads_segments_and_validates_without_the_tagger(smoke_checkpoint, monkeypatch, tmp_path):
    from ovseg import concepts

    def no_tagger():
        raise AssertionError("inference must not load NLTK's tagger")

    monkeypatch.setattr(concepts, "_get_tagger", no_tagger)
    monkeypatch.chdir(tmp_path)
    model = OVSegModule.from_pretrained(str(smoke_checkpoint)).eval()
    assert model.segment(torch.zeros(3, 28, 28, dtype=torch.uint8), ["sky", "grass"])[0].shape == (28, 28)
    validated = run(
        [
            "validate",
            "-c",
            str(SMOKE),
            "--ckpt_path",
            str(smoke_checkpoint),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.num_val",
            "2",
        ]
    )
    assert "val/synthetic/mIoU" in validated.trainer.callback_metrics
    with pytest.raises(AssertionError, match="must not load"):
        _ = model.concepts  # training does need it
