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
- :class:`ThreadCountInvariance`: makes CPU training give the same numbers, bit for bit, whatever
  the number of intra-op threads (``torch.set_num_threads``, ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import glob
import os
import random
import signal
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from ovseg.io import atomic_torch_save
from ovseg.thread_invariance import (
    MKL_CBWR_STRICT_ENV,
    ModuleSwap,
    make_convolutions_thread_invariant,
    make_layer_norms_thread_invariant,
    strict_mkl_reproducibility,
)


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


class ThreadCountInvariance(L.Callback):
    """Make CPU training and evaluation independent of the number of intra-op threads.

    Some CPU kernels split a sum among the threads, so their results change in the last bits with
    the thread count, and training grows those differences into runs as different as two seeds
    (:mod:`ovseg.thread_invariance` lists them; ``scripts/diagnostics/thread_dependence.py`` finds
    them op by op). From ``setup`` to ``teardown`` this callback

    - turns the model's LayerNorms (torch's, open_clip's, timm's) into
      :class:`~ovseg.thread_invariance.ThreadInvariantLayerNorm` (same parameters and state dict;
      their own class again at ``teardown``, so the model leaves the run as it came);
    - keeps oneDNN's convolutions, whose results (the weight gradients above all) depend on the
      thread count, out of the run: by default it turns oneDNN off (``torch.backends.mkldnn.enabled
      = False``; restored at ``teardown``), so that convolutions use torch's own kernels; with
      ``onednn_convolutions=True`` it keeps oneDNN and turns the model's ``nn.Conv2d`` modules into
      :class:`~ovseg.thread_invariance.OneThreadConv2d` instead, which compute each convolution
      (forward and backward) with one intra-op thread (their own class again at ``teardown``);
    - puts Intel MKL in strict reproducibility mode
      (:func:`~ovseg.thread_invariance.strict_mkl_reproducibility`; for the rest of the process),
      whose matrix products then give the same bits with any thread count on Intel CPUs too. MKL
      takes its mode at its first call: where a matrix product already ran in the process (a
      notebook, say), it warns; start the process with ``MKL_CBWR=AUTO,STRICT`` then.

    The rest is in the methods' code, whatever the callback: SimZSS's concept pooling uses
    :func:`~ovseg.thread_invariance.softmax`, CDT's soft IoU sums its pixels in float64 on the CPU.
    GPU runs do not need it. ``tests/test_thread_invariance.py`` trains every synthetic config of
    the demo three steps with 1 and with 2 threads: identical weights with the callback, not without.

    Args:
        onednn_convolutions: oneDNN's convolutions with one thread each instead of torch's own
            kernels. About 1.3 times as fast with one thread on an Intel Xeon (a synthetic ZegFormer
            training step, docs/demo.md, "The thread count moves no figure"); the two kinds of kernel
            round differently, so a run reaches other figures than with the default, which the
            shipped synthetic configs and the README's demo figures use. With more than one thread
            the convolutions do not use them.
    """

    def __init__(self, onednn_convolutions: bool = False) -> None:
        self.onednn_convolutions = onednn_convolutions
        self._mkldnn_was_enabled: bool | None = None
        self._swaps: list[ModuleSwap] = []

    @staticmethod
    def prepare_process() -> None:
        """Strict MKL reproducibility before MKL's first call (``ovseg`` calls it before it builds
        the model and data of a config with this callback; ``setup`` is too late in a process where
        building the model already ran MKL)."""
        strict_mkl_reproducibility()

    def _swap(self, swap: ModuleSwap, what: str) -> None:
        """Keep ``swap`` for ``teardown``; warn about the modules of ``what`` kind it left alone."""
        self._swaps.append(swap)
        if swap.unknown:
            rank_zero_warn(
                f"ThreadCountInvariance: {len(swap.unknown)} {what} left as they are, their results may still "
                f"depend on the thread count: {', '.join(swap.unknown[:3])}"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._swap(make_layer_norms_thread_invariant(pl_module), "LayerNorm(s) of an unknown class")
        if self.onednn_convolutions:
            self._swap(make_convolutions_thread_invariant(pl_module), "convolution(s) other than nn.Conv2d")
        else:
            if self._mkldnn_was_enabled is None:
                self._mkldnn_was_enabled = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
        if strict_mkl_reproducibility() is False:
            rank_zero_warn(
                "ThreadCountInvariance: Intel MKL already ran in this process without strict reproducibility, so "
                "matrix products may still depend on the thread count; start the process with "
                f"MKL_CBWR={MKL_CBWR_STRICT_ENV} in its environment"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the model leaves the run as it came (a saved and reloaded copy computes the same, to the bit)
        while self._swaps:
            self._swaps.pop().restore()
        if self._mkldnn_was_enabled is not None:
            torch.backends.mkldnn.enabled = self._mkldnn_was_enabled
            self._mkldnn_was_enabled = None


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


def last_checkpoint_candidates(trainer: L.Trainer) -> tuple[list[str], list[str], list[str]]:
    """What ``--ckpt_path last`` can resume from: (``last*.ckpt`` files, SLURM ``hpc_ckpt_*.ckpt`` files,
    folders looked in).

    The ``last*.ckpt`` of each ``ModelCheckpoint`` are the files Lightning considers; it ignores the
    ``hpc_ckpt_*.ckpt`` in ``default_root_dir`` for ``last`` (it takes them only without a
    ``ckpt_path`` under SLURM), so that finding neither can be an error and finding only the latter
    can be resumed explicitly.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    found: set[str] = set()
    looked_in: list[str] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= callback._find_last_checkpoints(trainer)
            looked_in.append(str(callback.dirpath) if callback.dirpath else f"{trainer.default_root_dir} (logger)")
    hpc = glob.glob(os.path.join(glob.escape(str(trainer.default_root_dir)), "hpc_ckpt_*.ckpt"))
    looked_in.append(str(trainer.default_root_dir))
    return sorted(found), sorted(hpc), list(dict.fromkeys(looked_in))


class StopReport(L.Callback):
    """A fit stopped by SIGTERM or Ctrl-C saves ``last.ckpt`` and says where it stopped.

    Lightning ends a run that received SIGTERM with exit status 0, as if it had finished, and one
    stopped by Ctrl-C without a checkpoint. On those interruptions this callback saves a
    checkpoint where the run's ``ModelCheckpoint`` keeps ``last.ckpt`` (all ranks take part, as
    Lightning broadcasts SIGTERM) and records on the exception a message (the step reached, the
    checkpoint, the resume command) and the exit status 128 + the signal's number, which the
    ``ovseg`` command prints and exits with. SLURM's SIGUSR1 requeue is Lightning's and unchanged.
    """

    def __init__(self, command_line: list[str] | None = None) -> None:
        self.command_line = [arg for arg in (command_line or []) if arg]

    def resume_command(self) -> str:
        args = list(self.command_line)
        for index, arg in enumerate(args):  # drop an earlier --ckpt_path
            if arg.startswith("--ckpt_path"):
                del args[index : index + (1 if "=" in arg else 2)]
                break
        return "ovseg " + " ".join([*args, "--ckpt_path", "last"])

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            name, status = "SIGTERM", 128 + signal.SIGTERM
        elif isinstance(exception, KeyboardInterrupt):
            name, status = "Ctrl-C (SIGINT)", 128 + signal.SIGINT
        else:
            return
        if trainer.state.fn != "fit":
            exception.ovseg_stop = (f"{trainer.state.fn} stopped by {name}", status)  # type: ignore[attr-defined]
            return
        step, total = trainer.global_step, trainer.max_steps
        saved = None
        folders = [
            cb.dirpath
            for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath
        ]
        if folders and step > 0 and (name == "SIGTERM" or trainer.world_size == 1):  # Ctrl-C: one rank only
            saved = os.path.join(folders[0], ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)
            try:
                trainer.save_checkpoint(saved, weights_only=False)
            except Exception as error:  # report what happened rather than hide the stop behind it
                saved = f"none (saving {saved} failed: {error})"
        of_total = f" of {total}" if total and total > 0 else ""
        checkpoint = f"saved {saved}; resume with: {self.resume_command()}" if saved else "no checkpoint saved"
        exception.ovseg_stop = (
            f"training stopped by {name} at step {step}{of_total}, not finished; "  # type: ignore[attr-defined]
            f"{checkpoint}",
            status,
        )


class OVSegProgressBar(RichProgressBar):
    """Lightning's rich progress bar with a truthful epoch and batch count.

    Lightning titles the bar ``Epoch 0/-2`` when training is limited by ``max_steps`` (``max_epochs
    -1``), and after a mid-epoch resume counts the epoch's batches against the remaining steps only
    (``30/14``). Here the title is ``Epoch N`` (``/LAST`` only with a real epoch limit) and the total
    is the epoch's batch count, cut at the step limit.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs - 1}"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"
        return description

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        batches = trainer.num_training_batches
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            done_in_epoch = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            return min(batches, done_in_epoch + trainer.max_steps - trainer.global_step)
        return batches
