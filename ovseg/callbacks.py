"""Callbacks for long, interruptible runs.

- :class:`ReseedEveryEpoch`: reseeds the global random generators at the start of every training
  epoch from (seed, epoch), so that a run resumed from a checkpoint taken at an epoch boundary
  draws the same random numbers (data order, random captions, augmentations) as a run that was
  never interrupted. Lightning stores neither the global RNG states nor the samplers' states in
  checkpoints; without this, ``--ckpt_path last`` continues correctly but not bit-for-bit.
- :class:`AtomicCheckpointIO`: writes a local checkpoint to a temporary file *in the same
  folder*, fsyncs it and renames it over the target, so that a crash (SIGKILL, node failure,
  full disk) while saving never leaves a half-written ``last.ckpt``. Lightning's own
  ``_atomic_save`` goes through an fsspec transaction whose temporary file lies in the system
  temp folder (``/tmp``): when that is another filesystem than the checkpoint folder, which is
  the rule on clusters, the final move is a copy into the target, not atomic, and a killed save
  leaves a full-size orphan in ``/tmp``. Remote paths (``s3://`` ...) keep Lightning's behaviour.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ovseg.io import atomic_torch_save


class ReseedEveryEpoch(L.Callback):
    """Reseed torch (CPU and CUDA), numpy and ``random`` at every ``on_train_epoch_start``.

    Args:
        seed: base seed; default the one given to ``seed_everything`` (``PL_GLOBAL_SEED``), else 0.

    Exact resumption holds for checkpoints at epoch boundaries with ``num_workers=0`` (worker seeds
    are drawn when the dataloader iterator is created, which Lightning does before this hook on the
    first epoch of a run); mid-epoch checkpoints resume correctly but replay the epoch's data.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._seeded_epoch: int | None = None

    def epoch_seed(self, epoch: int) -> int:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        return (base * 1_000_003 + epoch) % (2**32)

    def _reseed(self, epoch: int) -> None:
        seed = self.epoch_seed(epoch)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self._seeded_epoch = epoch

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed at an epoch boundary does not call on_train_epoch_start for that epoch;
        # the first batch is drawn after this hook (the samplers are lazy).
        self._reseed(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._seeded_epoch != trainer.current_epoch:
            self._reseed(trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seeded_epoch = None


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`ovseg.io.atomic_torch_save` for local paths
    (fsynced, and leftovers of killed saves removed).

    In a config: ``trainer: {plugins: [ovseg.callbacks.AtomicCheckpointIO]}``; in Python:
    ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        get_filesystem(path).makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        local = os.fspath(path)
        atomic_torch_save(checkpoint, local.removeprefix("file://"), fsync=True, remove_stale=True)
