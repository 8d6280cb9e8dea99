"""Pieces every DataModule shares."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler


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
