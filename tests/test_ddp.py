"""Evaluation under DDP: 2 CPU processes (gloo) see every validation sample exactly once (no
padding by repeated samples) and report the same metrics as 1 process on the same images, with
an uneven split (5 images on 2 ranks, ranks running different numbers of batches)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from spawn_ranks import become_rank, free_port, run_ranks  # tests/spawn_ranks.py

from ovseg.datamodules.base import UnpaddedDistributedSampler, evaluation_sampler

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
NUM_VAL = 5
TIMEOUT_S = 120  # a hang (e.g. a rank waiting in a collective) fails the test instead of blocking


# ------------------------------------------------------------------ the sampler alone


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 2, 5, 7])
def test_unpadded_sampler_partitions_the_dataset(world, size):
    dataset = list(range(size))
    shards = [list(UnpaddedDistributedSampler(dataset, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == dataset  # each index exactly once
    assert [len(UnpaddedDistributedSampler(dataset, world, r)) for r in range(world)] == [len(s) for s in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_evaluation_sampler_is_none_on_one_process():
    assert evaluation_sampler(list(range(5))) is None


# ------------------------------------------------------------------ 1 process vs 2 processes


def _model():
    from ovseg.encoders.text_transformer import CLIPTextTransformer
    from ovseg.encoders.timm_vit import TimmViT
    from ovseg.methods.simzss import SimZSS

    torch.manual_seed(0)
    return SimZSS(TimmViT.tiny(), CLIPTextTransformer.tiny(output_dim=64), print_metrics=False)


def _datamodules(data_root: str):
    """Two evaluation DataModules on 5 images: the synthetic world (batches of 2: 3 images in 2
    batches on rank 0, 2 images in 1 batch on rank 1) and the same scenes written as an mmseg
    folder, read by EvaluationDataModule (batches of 1)."""
    from ovseg.datamodules.benchmark_specs import BenchmarkSpec
    from ovseg.datamodules.benchmarks import EvaluationDataModule
    from ovseg.datamodules.synthetic import SyntheticDataModule

    spec = yaml.safe_load((REPO / "configs/data/eval_synthetic.yaml").read_text())["init_args"]["benchmarks"][0]
    return {
        "synthetic": SyntheticDataModule(num_train=0, num_val=NUM_VAL, image_size=56, eval_batch_size=2),
        "folder": EvaluationDataModule([BenchmarkSpec(**spec)], root=data_root, batch_size=1),
    }


def _validate(trainer_kwargs, data_root: str) -> dict:
    import lightning as L

    class Record(L.Callback):
        def __init__(self):
            self.indices: list[int] = []
            self.confmat = None

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.indices += [int(i) for i in batch["index"]]

        def on_validation_epoch_end(self, trainer, pl_module):
            (metric,) = pl_module._metrics.values()
            self.confmat = metric.confmat.clone()  # this rank's own (unsynced) counts

    results = {}
    for name, datamodule in _datamodules(data_root).items():
        record = Record()
        trainer = L.Trainer(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[record],
            **trainer_kwargs(),
        )
        model = _model()
        trainer.validate(model, datamodule=datamodule, verbose=False)
        (result,) = model.last_results.values()
        results[name] = {
            "indices": record.indices,
            "confmat": record.confmat,
            "metrics": {k: v.cpu() for k, v in result.items()},
            "mIoU": float(trainer.callback_metrics["val/mIoU"]),
        }
    return results


def _worker(rank: int, port: int, out_dir: str, data_root: str) -> None:
    become_rank(rank, port, WORLD)
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    def ddp():  # one strategy object per Trainer
        strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60))
        return {"accelerator": "cpu", "devices": WORLD, "strategy": strategy}

    results = _validate(ddp, data_root)
    results["world_size"] = dist.get_world_size()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _run_two_processes(out_dir: str, data_root: str) -> list[dict]:
    return run_ranks(_worker, (free_port(), out_dir, data_root), WORLD, TIMEOUT_S, out_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from ovseg.prepare.synthetic import make_synthetic

    data_root = tmp_path_factory.mktemp("eval_data")
    make_synthetic("mmseg", data_root / "synthetic_mmseg", num_images=NUM_VAL, image_size=56, progress=False)
    single = _validate(lambda: {"accelerator": "cpu", "devices": 1}, str(data_root))
    ranks = _run_two_processes(str(tmp_path_factory.mktemp("ddp_eval")), str(data_root))
    return single, ranks


@pytest.mark.parametrize("name", ["synthetic", "folder"])
def test_two_process_validation_sees_each_sample_once_and_matches_one_process(runs, name):
    single, ranks = runs
    assert all(r["world_size"] == WORLD for r in ranks)
    one = single[name]
    assert sorted(one["indices"]) == list(range(NUM_VAL))
    per_rank = [r[name]["indices"] for r in ranks]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(NUM_VAL)), per_rank  # no repeat, none missing
    assert sorted(map(len, per_rank)) == [2, 3]
    # the per-rank counts add up to the single-process counts ...
    assert torch.equal(ranks[0][name]["confmat"] + ranks[1][name]["confmat"], one["confmat"])
    assert int(one["confmat"].sum()) > 0
    # ... and every rank reports the single-process metrics (states summed across ranks)
    for rank in ranks:
        assert rank[name]["mIoU"] == pytest.approx(one["mIoU"], abs=1e-6)
        assert set(rank[name]["metrics"]) == set(one["metrics"])
        for key, value in one["metrics"].items():
            torch.testing.assert_close(rank[name]["metrics"][key], value, equal_nan=True)
