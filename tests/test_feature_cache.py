"""Frozen-feature caching (SimZSS trains from stored backbone features) and inference switches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovseg.cli import run
from ovseg.datamodules.base import collate_samples
from ovseg.datamodules.feature_store import CachedFeaturesDataModule, CachedFeaturesDataset, read_index
from ovseg.encoders import CLIPTextTransformer, TimmViT
from ovseg.methods.simzss import SimZSS
from ovseg.prepare.feature_cache import CacheViews, build_feature_cache
from ovseg.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[1]
WIDTH = 64
CAPTIONS = [
    "a dog sitting next to a red car",
    "two traffic lights above a busy street",
    "a cat sleeping on a bed",
    "a dog chasing a cat",
    "a red car on a street",
    "a bed and a cat",
]


class Images(torch.utils.data.Dataset):
    """Random uint8 images of mixed sizes with captions."""

    def __init__(self, count: int = 6) -> None:
        g = torch.Generator().manual_seed(3)
        self.images = [
            torch.randint(0, 256, (3, 60 + 4 * i, 56 + 2 * i), generator=g, dtype=torch.uint8) for i in range(count)
        ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": CAPTIONS[i % len(CAPTIONS)]}


def make_module(**kwargs) -> SimZSS:
    torch.manual_seed(0)
    image_encoder = TimmViT.tiny(model_kwargs={"depth": 2, "embed_dim": WIDTH, "num_heads": 2, "img_size": 56})
    return SimZSS(image_encoder, CLIPTextTransformer.tiny(output_dim=WIDTH), lambda_local=1.0, **kwargs)


def _text_grads(module: SimZSS, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    module.zero_grad()
    loss = module.training_loss(batch)["loss"]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.model.text_encoder.parameters() if p.grad is not None]


@pytest.mark.parametrize("mode", ["center", "rrc"])
def test_cached_path_gives_the_image_paths_loss_and_gradients(tmp_path, mode):
    module = make_module()
    dataset = Images()
    views = CacheViews(mode, size=56, num_views=2, seed=5)
    build_feature_cache(module.model.image_encoder, dataset, tmp_path, views, batch_size=4, progress=False)
    cached = CachedFeaturesDataset(tmp_path, view=1 if mode == "rrc" else 0, random_caption=False)
    batch_cached = collate_samples([cached[i] for i in range(len(cached))])
    assert batch_cached["patches"].dtype == torch.float16 and "image" not in batch_cached
    view = 1 if mode == "rrc" else 0
    batch_images = {
        "image": torch.stack([views.view(dataset[i]["image"], i, view) for i in range(len(dataset))]),
        "caption": [dataset[i]["caption"] for i in range(len(dataset))],
    }
    assert batch_cached["caption"] == batch_images["caption"]
    loss_images, grads_images = _text_grads(module, batch_images)
    loss_cached, grads_cached = _text_grads(module, batch_cached)
    assert grads_images and len(grads_images) == len(grads_cached)
    torch.testing.assert_close(loss_cached, loss_images, rtol=2e-3, atol=2e-3)
    for cached_grad, image_grad in zip(grads_cached, grads_images):
        torch.testing.assert_close(cached_grad, image_grad, rtol=2e-2, atol=2e-3)


def test_rrc_views_are_reproducible_and_distinct():
    views = CacheViews("rrc", size=32, num_views=2, seed=1)
    image = Images()[0]["image"]
    assert torch.equal(views.view(image, 0, 0), views.view(image, 0, 0))
    assert not torch.equal(views.view(image, 0, 0), views.view(image, 0, 1))


def test_build_resumes_where_it_stopped_and_checks_the_encoder(tmp_path):
    module = make_module()
    dataset = Images()
    views = CacheViews("center", size=56)
    options = dict(batch_size=2, shard_size=4, progress=False)
    build_feature_cache(module.model.image_encoder, dataset, tmp_path / "full", views, **options)
    build_feature_cache(module.model.image_encoder, dataset, tmp_path / "part", views, max_batches=1, **options)
    assert read_index(tmp_path / "part")["num_done"] == 2
    # a crash after the captions were appended but before the index was updated
    with open(tmp_path / "part" / "captions.jsonl", "a") as file:
        file.write(json.dumps(["half-written"]) + "\n")
    build_feature_cache(module.model.image_encoder, dataset, tmp_path / "part", views, **options)
    full, part = read_index(tmp_path / "full"), read_index(tmp_path / "part")
    assert part == full and part["num_done"] == len(dataset) and len(part["shards"]) == 2
    for name in ("patches_00000.npy", "patches_00001.npy", "pooled_00001.npy"):
        assert np.array_equal(np.load(tmp_path / "full" / name), np.load(tmp_path / "part" / name))
    assert (tmp_path / "full" / "captions.jsonl").read_text() == (tmp_path / "part" / "captions.jsonl").read_text()
    other = make_module().model.image_encoder
    with torch.no_grad():
        next(other.parameters()).add_(1)
    with pytest.raises(ValueError, match="fingerprint"):
        build_feature_cache(other, dataset, tmp_path / "full", views, **options)


def test_reading_is_memory_mapped_and_trains_without_images(tmp_path):
    module = make_module()
    build_feature_cache(
        module.model.image_encoder,
        Images(),
        tmp_path,
        CacheViews("rrc", 56, 3),
        batch_size=3,
        shard_size=4,
        progress=False,
    )
    data = CachedFeaturesDataModule(str(tmp_path), batch_size=3)
    data.setup("fit")
    arrays = data.train_set.arrays
    assert len(arrays) == 2 and all(isinstance(a, np.memmap) for pair in arrays for a in pair)
    assert arrays[0][0].shape == (4, 3, 16, WIDTH)
    data.train_set.release()  # dropping the mapped pages keeps the data readable
    batch = next(iter(data.train_dataloader()))
    assert batch["patches"].shape == (3, 16, WIDTH) and batch["pooled"].shape == (3, WIDTH)
    loss = module.training_loss(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)


def test_cache_features_command(tmp_path, capsys):
    args = [
        "data",
        "cache-features",
        "--config",
        str(REPO / "configs/experiment/smoke.yaml"),
        "--out",
        str(tmp_path),
        "--size",
        "56",
        "--num-images",
        "4",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    run(args)
    assert "cached 4/4 images" in capsys.readouterr().out
    index = read_index(tmp_path)
    assert index["encoder_name"] == "vit_small_patch14_dinov2" and index["dim"] == 64
    run(args)  # already complete: nothing to do
    with pytest.raises(SystemExit):
        run(["data", "cache-features", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)])


# ------------------------------------------------------------------ inference switches
def test_inference_precision_bf16_is_close_to_fp32():
    module = make_module().eval()
    vocabulary = Vocabulary.from_names(["dog", "cat", "car"])
    images = Images()[0]["image"][None, :, :56, :56]
    reference = module.class_probabilities(images, vocabulary)
    module.inference_precision = "bf16"
    low = module.class_probabilities(images, vocabulary)
    assert low.dtype == torch.float32
    assert (low - reference).abs().max() < 0.05
    with pytest.raises(ValueError, match="inference_precision"):
        make_module(inference_precision="8")


def test_compile_flag_is_off_by_default_and_builds():
    assert make_module().inference_predict_scores().__func__ is SimZSS.predict_scores
    module = make_module(compile=True)
    assert module.compile_inference and module.inference_predict_scores() is module.inference_predict_scores()


@pytest.mark.slow
def test_compiled_inference_gives_the_same_output():
    module = make_module().eval()
    vocabulary = Vocabulary.from_names(["dog", "cat", "car"])
    images = Images()[0]["image"][None, :, :56, :56]
    reference = module.class_probabilities(images, vocabulary)
    module.compile_inference = True
    torch.testing.assert_close(module.class_probabilities(images, vocabulary), reference, rtol=1e-4, atol=1e-5)


def test_trainer_fits_from_the_store_and_validates_on_images(tmp_path):
    import lightning as L

    from ovseg.datamodules.synthetic import SyntheticDataModule

    module = make_module()
    build_feature_cache(
        module.model.image_encoder, Images(), tmp_path / "store", CacheViews("center", 56), batch_size=6, progress=False
    )
    data = CachedFeaturesDataModule(
        str(tmp_path / "store"),
        batch_size=3,
        eval_data=SyntheticDataModule(num_val=2, image_size=56, eval_batch_size=2),
    )
    assert [b.name for b in data.benchmarks] == ["synthetic"]
    module.print_metrics = False
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 2 and "val/synthetic/mIoU" in trainer.callback_metrics
