"""A store of frozen backbone features (SimZSS): reading it, and training from it instead of images.

SimZSS never updates its vision backbone, so its patch tokens and global feature of a given view of
an image never change. ``ovseg data cache-features`` (:mod:`ovseg.prepare.feature_cache`) runs the
backbone once over the training images for a fixed set of views per image and writes the
L2-normalised outputs to a memory-mapped store::

    STORE/index.json              shapes, dtype, encoder name + fingerprint, views, images done
    STORE/patches_00000.npy ...   float16 (shard_size, V, N, D) normalised patch tokens
    STORE/pooled_00000.npy ...    float16 (shard_size, V, D) normalised global features
    STORE/captions.jsonl          one JSON list of captions per image, in store order

:class:`CachedFeaturesDataModule` then yields ``patches``, ``pooled`` and ``caption`` per sample,
read through ``np.memmap`` (pages are released from the process every few hundred reads, so the
resident memory does not grow with the store), and :class:`~ovseg.methods.simzss.SimZSS` trains
from them without an image.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ovseg.datamodules.base import collate_samples
from ovseg.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["CAPTIONS", "INDEX", "CachedFeaturesDataModule", "CachedFeaturesDataset", "iter_store", "read_index"]

INDEX = "index.json"
CAPTIONS = "captions.jsonl"
FORMAT_VERSION = 1


def read_index(store: str | os.PathLike) -> dict[str, Any]:
    """The store's ``index.json``; a :class:`UserError` naming the file if it is not readable JSON."""
    path = Path(store) / INDEX
    if not path.exists():
        raise FileNotFoundError(
            f"no feature store at {store} ({INDEX} missing): build it with "
            "`ovseg data cache-features --config CONFIG --out STORE`"
        )
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"feature store index {path} is corrupt ({error}); rebuild the store with "
            "`ovseg data cache-features` into a new --out"
        ) from None
    missing = [key for key in ("num_done", "num_images", "shard_size", "shards") if key not in index]
    if missing:
        raise UserError(f"feature store index {path} lacks {missing}: not a store written by ovseg data cache-features")
    return index


def unfinished_store_message(store: str | os.PathLike, index: Mapping[str, Any]) -> str:
    """What is wrong with a store whose building stopped early, and the two ways on."""
    views = index.get("views") or {}
    return (
        f"feature store {store} is unfinished: {index['num_done']} of {index['num_images']} images cached "
        f"(its `ovseg data cache-features` run stopped early). Finish it by running that command again with "
        f"the same --config, --views {views.get('mode', '...')} and --size {views.get('size', '...')} and "
        f"--out {store} (it continues where it stopped), or train on the finished part with "
        "--data.init_args.allow_partial true"
    )


class CachedFeaturesDataset(Dataset):
    """Samples of a feature store: ``patches`` (N, D) and ``pooled`` (D) float16, ``caption``.

    Arrays are ``np.memmap`` views opened lazily (once per worker). After each read the pages
    mapped around the sample are dropped from the process (``MADV_DONTNEED``; they stay in the
    page cache), and every ``release_every`` reads the whole mapping, so the resident memory stays
    flat whatever the store size.

    Args:
        store: the store directory.
        view: always this view; None draws one of the cached views per visit (torch RNG).
        random_caption: draw one of the image's captions per visit (else the first).
        release_every: reads between releases of the whole mapping (0: never release pages).
    """

    def __init__(
        self,
        store: str | os.PathLike,
        view: int | None = None,
        random_caption: bool = True,
        release_every: int = 64,
        allow_partial: bool = False,
    ) -> None:
        self.root = Path(store)
        self.index = read_index(self.root)
        if self.index["num_done"] < self.index["num_images"] and not allow_partial:
            raise UserError(unfinished_store_message(self.root, self.index))
        written = -(-int(self.index["num_done"]) // int(self.index["shard_size"]))  # shards holding samples
        self.shards = list(self.index["shards"][:written])
        absent = [
            str(self.root / name.format(kind))
            for name in self.shards
            for kind in ("patches", "pooled")
            if not (self.root / name.format(kind)).is_file()
        ]
        if absent:
            raise UserError(
                f"feature store {self.root} is damaged: {len(absent)} shard file(s) listed in its "
                f"{INDEX} are missing, e.g. {absent[0]}; rebuild it into a new --out"
            )
        if view is not None and not 0 <= view < self.index["num_views"]:
            raise ValueError(f"view {view} out of range: the store has {self.index['num_views']} views")
        self.view = view
        self.random_caption = random_caption
        self.release_every = release_every
        with open(self.root / CAPTIONS) as file:
            self.captions = [json.loads(line) for _, line in zip(range(self.index["num_done"]), file)]
        self._arrays: list[tuple[np.memmap, np.memmap]] | None = None
        self._reads = 0

    def __len__(self) -> int:
        return int(self.index["num_done"])

    @property
    def arrays(self) -> list[tuple[np.memmap, np.memmap]]:
        """Per shard: (patches, pooled) memmaps, opened on first use."""
        if self._arrays is None:
            self._arrays = [
                tuple(
                    np.load(self.root / name.format(kind), mmap_mode="r")  # type: ignore[misc]
                    for kind in ("patches", "pooled")
                )
                for name in self.shards
            ]
            for pair in self._arrays:  # shuffled reads: no read-around of neighbouring samples
                for array in pair:
                    handle = getattr(array, "_mmap", None)
                    if handle is not None and hasattr(mmap, "MADV_RANDOM"):
                        handle.madvise(mmap.MADV_RANDOM)
        return self._arrays

    def release(self) -> None:
        """Drop the mapped pages from this process's resident set."""
        for pair in self._arrays or []:
            for array in pair:
                handle = getattr(array, "_mmap", None)
                if handle is not None and hasattr(handle, "madvise"):
                    handle.madvise(mmap.MADV_DONTNEED)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        number, row = divmod(index, self.index["shard_size"])
        patches, pooled = self.arrays[number]
        view = (
            self.view
            if self.view is not None
            else (int(torch.randint(self.index["num_views"], ())) if self.index["num_views"] > 1 else 0)
        )
        captions = self.captions[index]
        k = int(torch.randint(len(captions), ())) if self.random_caption and len(captions) > 1 else 0
        sample = {
            "patches": torch.from_numpy(np.array(patches[row, view])),
            "pooled": torch.from_numpy(np.array(pooled[row, view])),
            "caption": captions[k],
        }
        if self.release_every:
            _release_rows(patches, row)
            self._reads += 1
            if self._reads % self.release_every == 0:
                self.release()
        return sample

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # workers open their own maps
        return state


_SPAN = 2 << 20  # the page cache maps large folios (up to 2 MiB) around a faulting read


def _release_rows(array: np.memmap, row: int) -> None:
    """Drop the pages mapped around ``array[row]`` (plus the kernel's read-around) from the RSS."""
    handle = getattr(array, "_mmap", None)
    if handle is None or not hasattr(handle, "madvise"):
        return
    row_bytes = array.strides[0]
    start = array.offset % mmap.ALLOCATIONGRANULARITY + row * row_bytes
    low = max(0, (start - _SPAN) // mmap.PAGESIZE * mmap.PAGESIZE)
    high = min(len(handle), start + row_bytes + _SPAN)
    handle.madvise(mmap.MADV_DONTNEED, low, high - low)


class CachedFeaturesDataModule(L.LightningDataModule):
    """Training from a feature store (:func:`build_feature_cache`) instead of images.

    Batches hold ``patches`` (B, N, D), ``pooled`` (B, D) (float16, normalised) and ``caption``;
    SimZSS extracts concepts on the fly (cached per caption). Evaluation comes from ``eval_data``.

    Args:
        store: the store directory.
        batch_size: per process.
        num_workers: DataLoader workers.
        view: a fixed cached view, or None for a random one per visit.
        random_caption: a random caption of the image per visit.
        eval_data: DataModule providing ``benchmarks`` and the evaluation loaders.
        allow_partial: train on the finished part of a store whose building stopped early (default:
            such a store is refused before the first step, with the count done and how to finish it).
    """

    def __init__(
        self,
        store: str,
        batch_size: int = 32,
        num_workers: int = 0,
        view: int | None = None,
        random_caption: bool = True,
        eval_data: L.LightningDataModule | None = None,
        allow_partial: bool = False,
    ) -> None:
        super().__init__()
        self.store = store
        self.allow_partial = allow_partial
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.view = view
        self.random_caption = random_caption
        self.eval_data = eval_data
        self.train_set: CachedFeaturesDataset | None = None

    @property
    def benchmarks(self) -> list:
        return list(getattr(self.eval_data, "benchmarks", []))

    def setup(self, stage: str) -> None:
        if self.eval_data is not None:
            self.eval_data.trainer = self.trainer
            self.eval_data.setup(stage)
        if stage == "fit" and self.train_set is None:
            trainer = getattr(self, "trainer", None)
            module = getattr(trainer, "lightning_module", None) if trainer is not None else None
            encoder = getattr(getattr(module, "model", None), "image_encoder", None)
            if encoder is not None:
                self.check_encoder(encoder)
            self.train_set = CachedFeaturesDataset(
                self.store, self.view, self.random_caption, allow_partial=self.allow_partial
            )
            if len(self.train_set) < self.train_set.index["num_images"]:
                log.warning(
                    "training on the finished part of the unfinished feature store %s: %d of %d images",
                    self.store,
                    len(self.train_set),
                    self.train_set.index["num_images"],
                )

    def check_encoder(self, encoder: torch.nn.Module) -> None:
        """Raise unless the store was built with ``encoder`` (class and weights, e.g. with or without the
        DVT denoiser): the features the model would train on must be its own encoder's."""
        from ovseg.prepare.feature_cache import encoder_fingerprint

        index = read_index(self.store)
        stored = index.get("fingerprint")
        if stored is not None and stored != encoder_fingerprint(encoder):
            raise UserError(
                f"feature store {self.store} was built with another image encoder ({index.get('encoder_name')}) "
                f"than the model's ({getattr(encoder, 'model_name', type(encoder).__name__)}): rebuild it with "
                "`ovseg data cache-features --config` of this model's config"
            )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
        )

    def val_dataloader(self) -> Any:
        return self.eval_data.val_dataloader() if self.eval_data is not None else []

    def test_dataloader(self) -> Any:
        return self.eval_data.test_dataloader() if self.eval_data is not None else []


def iter_store(store: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(patches (V, N, D), pooled (V, D)) memmap views of each image, in order."""
    dataset = CachedFeaturesDataset(store)
    for index in range(len(dataset)):
        number, row = divmod(index, dataset.index["shard_size"])
        patches, pooled = dataset.arrays[number]
        yield patches[row], pooled[row]
