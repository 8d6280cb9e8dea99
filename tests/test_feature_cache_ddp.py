"""The feature-store DataModule under DDP: 2 CPU processes (gloo), a real Lightning ``Trainer`` and
``CachedFeaturesDataModule``. In every epoch each rank reads its own samples (no sample on both
ranks), together they read the whole store once, every sample's features come from its own row
(across shard boundaries), and the split is reshuffled between epochs."""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import pytest
import torch
from spawn_ranks import become_rank, free_port, run_ranks  # tests/spawn_ranks.py

WORLD = 2
NUM_IMAGES = 12  # 6 per rank, 2 batches of 3: no padding, nothing dropped
BATCH = 3
EPOCHS = 2
DIM = 16
TIMEOUT_S = 90


def _write_store(path) -> None:
    """Image i: pooled feature = the i-th unit vector, caption "image i"; 3 shards of <= 5 images,
    2 views (the DataModule draws one per visit)."""
    from ovseg.prepare.feature_cache import FeatureStoreWriter

    writer = FeatureStoreWriter(
        path,
        NUM_IMAGES,
        num_views=2,
        num_patches=4,
        dim=DIM,
        grid=(2, 2),
        shard_size=5,
        meta={"encoder": "test", "views": {"mode": "rrc"}},
    )
    pooled = np.zeros((NUM_IMAGES, 2, DIM), dtype=np.float16)
    pooled[np.arange(NUM_IMAGES), :, np.arange(NUM_IMAGES)] = 1
    patches = np.repeat(pooled[:, :, None, :], 4, axis=2)
    writer.append(patches, pooled, [[f"image {i}"] for i in range(NUM_IMAGES)])


def _worker(rank: int, port: int, out_dir: str, store: str) -> None:
    become_rank(rank, port, WORLD)
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    from ovseg.datamodules.feature_store import CachedFeaturesDataModule

    class Reader(L.LightningModule):
        """Records which images each training batch holds, and checks their features."""

        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(DIM, 1)
            self.seen: dict[int, list[int]] = {}
            self.rows_match = True

        def training_step(self, batch, batch_idx):
            images = [int(caption.split()[1]) for caption in batch["caption"]]
            self.rows_match &= images == batch["pooled"].float().argmax(-1).tolist()
            self.rows_match &= images == batch["patches"].float().sum(1).argmax(-1).tolist()
            self.seen.setdefault(self.current_epoch, []).extend(images)
            return self.layer(batch["pooled"].float()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(0)
    model = Reader()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        max_epochs=EPOCHS,
        logger=False,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, CachedFeaturesDataModule(store, batch_size=BATCH, num_workers=0))
    result = {
        "seen": model.seen,
        "rows_match": model.rows_match,
        "world": dist.get_world_size(),
        "sampler": type(trainer.train_dataloader.sampler).__name__,
        "steps": trainer.global_step,
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    _write_store(store)
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    return run_ranks(_worker, (free_port(), out_dir, str(store)), WORLD, TIMEOUT_S, out_dir)


def test_ranks_read_disjoint_samples_that_cover_the_store_every_epoch(ranks):
    assert [r["world"] for r in ranks] == [WORLD, WORLD]
    assert {r["sampler"] for r in ranks} == {"DistributedSampler"}
    assert all(r["rows_match"] for r in ranks)  # features of the captioned image, across shards
    assert [r["steps"] for r in ranks] == [EPOCHS * NUM_IMAGES // (WORLD * BATCH)] * WORLD
    for epoch in range(EPOCHS):
        per_rank = [r["seen"][epoch] for r in ranks]
        assert [len(s) for s in per_rank] == [NUM_IMAGES // WORLD] * WORLD
        assert not set(per_rank[0]) & set(per_rank[1]), per_rank  # no sample on both ranks
        assert sorted(per_rank[0] + per_rank[1]) == list(range(NUM_IMAGES))  # the whole store


def test_split_is_reshuffled_between_epochs(ranks):
    assert any(r["seen"][0] != r["seen"][1] for r in ranks)
