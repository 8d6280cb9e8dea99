"""What every DataModule shares: the training DataModule base, batching, evaluation sampling, paths.

* :class:`TrainDataModule`: the base of the training DataModules (COCO Captions, COCO-Stuff,
  WebDataset): evaluation forwarded from an ``eval_data`` DataModule, skipped-sample logging,
  the attached model's concept extractor.
* :func:`collate_samples`, :func:`evaluation_sampler` (:class:`UnpaddedDistributedSampler`):
  how every loader batches and how evaluation loaders shard across ranks.
* :func:`default_pin_memory`, :func:`check_files_exist`, :func:`resolve_path`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from ovseg.benchmark import Benchmark
from ovseg.datamodules.decode import SkipCounter


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch dict samples: tensors of one shape are stacked, anything else stays a list.

    Images of different sizes (evaluation at native resolution) therefore arrive as a list of
    (3, H_i, W_i) tensors, which :meth:`ovseg.module.OVSegModule.segment` accepts.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = samples[0].keys()
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            batch[key] = torch.stack(values)
        elif all(isinstance(v, int) for v in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class UnpaddedDistributedSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` that neither pads nor drops: rank ``r`` of
    ``n`` gets indices ``r, r + n, r + 2n, ...``, so every sample is evaluated exactly once.

    torch's sampler (which Lightning injects by default) pads the last round by repeating samples
    so that all ranks run the same number of batches; in evaluation the repeats would be counted
    twice by the metrics. Here ranks may run one batch fewer (or none) than others, which is safe
    in evaluation: no collective runs per batch, and the metric states are summed across ranks
    once, at ``compute``.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)  # type: ignore[arg-type]
        self.total_size = len(dataset)
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _world(trainer: Any = None) -> tuple[int, int]:
    """(world size, global rank) from the trainer, else from torch.distributed, else (1, 0)."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def evaluation_sampler(dataset: Sized, trainer: Any = None) -> UnpaddedDistributedSampler | None:
    """The sampler of a val/test/predict DataLoader: unpadded and sharded by rank when running
    distributed (Lightning keeps a DataLoader's own ``DistributedSampler``), else None (sequential)."""
    world, rank = _world(trainer)
    if world <= 1:
        return None
    return UnpaddedDistributedSampler(dataset, num_replicas=world, rank=rank)


def default_pin_memory(pin_memory: bool | None) -> bool:
    """``pin_memory`` as given, or (None) whether CUDA is available."""
    return torch.cuda.is_available() if pin_memory is None else bool(pin_memory)


def resolve_path(root: Path, path: str | os.PathLike) -> Path:
    """``path`` if absolute, else ``root / path``."""
    path = Path(path)
    return path if path.is_absolute() else root / path


def check_files_exist(directory: Path, names: Sequence[str], what: str, listed_in: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming the first missing files (one directory listing, fast)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory {directory} does not exist (needed by {listed_in})")
    present = set(os.listdir(directory))
    missing = [n for n in names if n not in present and not (os.sep in n and (directory / n).is_file())]
    if missing:
        examples = ", ".join(str(directory / n) for n in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(names)} {what} listed in {listed_in} are missing, e.g. {examples}"
        )


class TrainDataModule(L.LightningDataModule):
    """Shared plumbing of the training DataModules: forwarded evaluation data and skip logging.

    ``benchmarks``, ``val_dataloader``, ``test_dataloader`` and ``predict_dataloader`` come from
    ``eval_data`` when given, else from :meth:`own_benchmarks` / :meth:`own_eval_dataloader`
    (nothing by default: ``benchmarks == []`` and an empty list of validation loaders).
    The number of skipped bad samples (:attr:`skipped`) is logged as ``data/skipped_samples`` to
    the trainer's loggers whenever it changes.
    """

    def __init__(self, eval_data: L.LightningDataModule | None = None, samples_per_epoch: int | None = None) -> None:
        super().__init__()
        if eval_data is not None and not hasattr(eval_data, "benchmarks"):
            raise TypeError(f"eval_data must be a DataModule with a `benchmarks` list, got {type(eval_data).__name__}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        self.eval_data = eval_data
        self.samples_per_epoch = samples_per_epoch
        self.skips: SkipCounter | None = None
        self._logged_skips = 0

    # ---------------------------------------------------------------- evaluation
    def own_benchmarks(self) -> list[Benchmark]:
        """Benchmarks of this DataModule itself (used when no ``eval_data`` is given)."""
        return []

    def own_eval_dataloader(self) -> list[DataLoader]:
        """Evaluation loaders matching :meth:`own_benchmarks`."""
        return []

    @property
    def benchmarks(self) -> list[Benchmark]:
        if self.eval_data is not None:
            return list(self.eval_data.benchmarks)  # type: ignore[attr-defined]
        return self.own_benchmarks()

    def prepare_data(self) -> None:
        if self.eval_data is not None:
            self.eval_data.prepare_data()

    def setup_eval(self, stage: str) -> None:
        """Set up ``eval_data`` (shares this DataModule's trainer)."""
        if self.eval_data is not None:
            self.eval_data.trainer = self.trainer
            self.eval_data.setup(stage)

    def setup(self, stage: str) -> None:
        self.setup_eval(stage)

    def teardown(self, stage: str) -> None:
        if self.eval_data is not None:
            self.eval_data.teardown(stage)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of ``self.train_set`` (a map-style dataset built by ``setup``): one pass per
        epoch, or ``samples_per_epoch`` samples over all ranks (successive random permutations of the
        dataset, as the official SimZSS release's ``--train-num-samples``; Lightning splits them
        across ranks)."""
        if getattr(self, "train_set", None) is None:
            self.setup("fit")
        sampler = (
            None
            if self.samples_per_epoch is None
            else RandomSampler(self.train_set, num_samples=self.samples_per_epoch)
        )
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
        )

    def val_dataloader(self) -> Any:
        if self.eval_data is not None:
            return self.eval_data.val_dataloader()
        return self.own_eval_dataloader()

    def test_dataloader(self) -> Any:
        if self.eval_data is not None:
            return self.eval_data.test_dataloader()
        return self.own_eval_dataloader()

    def predict_dataloader(self) -> Any:
        if self.eval_data is not None:
            return self.eval_data.predict_dataloader()
        return self.own_eval_dataloader()

    # ---------------------------------------------------------------- bad samples
    @property
    def skipped(self) -> int:
        """Bad samples skipped so far by the training loader, summed over its workers."""
        return self.skips.value if self.skips is not None else 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.skips is not None and trainer is not None and trainer.training:
            count = self.skips.value
            if count != self._logged_skips:
                self._logged_skips = count
                if trainer.is_global_zero:
                    for lg in trainer.loggers:
                        lg.log_metrics({"data/skipped_samples": float(count)}, step=trainer.global_step)
        return batch

    # ---------------------------------------------------------------- concepts
    def model_concept_extractor(self) -> Any | None:
        """The attached model's ``concepts`` extractor (SimZSS), if any."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        extractor = getattr(module, "concepts", None)
        if extractor is not None and all(
            hasattr(extractor, a) for a in ("bank", "context_length", "max_concepts", "max_tokens_per_concept")
        ):
            return extractor
        return None
