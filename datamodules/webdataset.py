"""WebDataset shards (img2dataset layout) for training: the shard reader and its DataModule.

A sample ``<key>`` of a shard holds ``<key>.jpg`` (or ``.jpeg`` / ``.png`` / ``.webp``), ``<key>.txt``
(caption), ``<key>.json`` (img2dataset metadata; optionally ``captions``, the stored SimZSS
concepts and ``concept_meta``) and, for segmentation data, ``<key>.seg.png`` (a single-channel
label map, read as raw values).

Stored concepts in ``<key>.json`` (written by ``ovseg data make-shards --concepts`` or
``ovseg data extract-concepts --shards``, see :mod:`ovseg.prepare`):

* ``concept_labels`` [n], ``concept_token_positions`` [n][<=T], ``concept_token_mask`` [n][<=T]:
  the concepts of the ``.txt`` caption (ragged lists; full padded lists are accepted too);
* ``caption_concepts``: the same three keys for each entry of ``captions`` (when present);
* ``concept_meta``: context length, shape limits and the concept-bank fingerprint.

Reading: :class:`WebDatasetDataModule` (``wds.WebDataset`` of webdataset 1.0.2; bad samples and
unreadable shard tails are skipped, counted and logged, never fatal). Writing shards:
:mod:`ovseg.prepare.shards` and :mod:`ovseg.prepare.concepts`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from ovseg.concepts import (
    CONCEPT_KEYS,
    concept_meta,
    concepts_from_lists,
    meta_mismatch,
)
from ovseg.datamodules.base import TrainDataModule, collate_samples, default_pin_memory
from ovseg.datamodules.decode import SkipCounter, decode_image, decode_label
from ovseg.datamodules.transforms import RandomResizedCrop, Transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_EXTENSION",
    "BadSample",
    "WebDatasetDataModule",
    "WebDatasetStream",
    "expand_urls",
]

logger = logging.getLogger("ovseg.data")

#: Image entries looked for in a sample, in this order.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "seg.png"
DEFAULT_MAX_CONCEPTS, DEFAULT_MAX_TOKENS = 32, 16


class BadSample(ValueError):
    """A sample that cannot be used (missing entries, empty caption, bad label values, ...)."""


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand ``"dir/{00000..00009}.tar"`` (``::`` separates several patterns); lists pass."""
    if isinstance(urls, str):
        return list(wds.shardlists.expand_urls(urls))
    return [str(u) for u in urls]


class _SplitByRank:
    """``wds.split_by_node`` with the rank fixed when the loader is built (from the Trainer).

    ``wds.split_by_node`` asks ``torch.distributed`` / ``RANK`` inside each DataLoader worker,
    which a spawned worker may not see; the rank given here is always right.
    """

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        for i, item in enumerate(src):
            if i % self.world_size == self.rank:
                yield item


_PROGRAMMING_ERRORS = (
    TypeError,
    AttributeError,
    NameError,
    ImportError,
    NotImplementedError,
    RecursionError,
    MemoryError,
)


class WebDatasetStream(IterableDataset):
    """Batches of decoded samples from WebDataset shards (the dataset behind the DataModule).

    Yields collated batches (:func:`~ovseg.datamodules.base.collate_samples`): ``image``
    (B, 3, H, W) uint8 (after ``transform``), ``key`` (list of str), ``caption`` (list of str, with
    captions), ``label`` (B, H, W) int64 (with labels) and the three concept keys when every sample
    of the batch has stored concepts matching ``expected_concept_meta`` (otherwise they are left
    out and SimZSS extracts concepts on the fly).

    Epochs: with ``epoch_length`` this process yields ``epoch_length // batch_size`` batches per
    epoch, split as evenly as possible over DataLoader workers; a worker that reaches the end of
    its shards starts over (new shard order). Without it, each worker makes one pass over its
    shards (the last partial batch is dropped). Shard order and the shuffle buffer are seeded from
    torch's RNG at the start of each epoch (deterministic under ``seed_everything``, except the
    shard draws of ``resampled=True``, which webdataset seeds itself).

    Bad data (undecodable images, truncated tars, missing entries, empty captions, bad label
    values) is skipped, counted in ``skips`` (shared by all workers) and logged.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        batch_size: int,
        epoch_length: int | None = None,
        resampled: bool = False,
        shard_shuffle: int = 100,
        shuffle_buffer: int = 1000,
        transform: Transform | None = None,
        with_captions: bool = True,
        with_labels: bool = False,
        random_caption: bool = True,
        use_stored_concepts: bool = True,
        expected_concept_meta: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        ignore_classes: Sequence[int] = (),
        ignore_index: int = 255,
        rank: int = 0,
        world_size: int = 1,
        skips: SkipCounter | None = None,
    ) -> None:
        super().__init__()
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shard matches {urls!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if epoch_length is not None and epoch_length < batch_size:
            raise ValueError(f"epoch_length ({epoch_length}) must be at least batch_size ({batch_size})")
        if resampled and epoch_length is None:
            raise ValueError("resampled=True draws shards forever: give epoch_length")
        self.batch_size = batch_size
        self.epoch_length = epoch_length
        self.resampled = resampled
        self.shard_shuffle = shard_shuffle
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.with_captions = with_captions
        self.with_labels = with_labels
        self.random_caption = random_caption
        self.use_stored_concepts = use_stored_concepts
        self.expected_concept_meta = dict(expected_concept_meta) if expected_concept_meta else None
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ignore_classes = sorted({int(c) for c in ignore_classes})
        self._lut: Tensor | None = None
        if self.ignore_classes:
            size = max(max(self.ignore_classes) + 1, ignore_index + 1, num_classes or 0)
            self._lut = torch.arange(size, dtype=torch.long)
            self._lut[torch.tensor(self.ignore_classes)] = ignore_index
        self.rank, self.world_size = rank, world_size
        self.skips = skips if skips is not None else SkipCounter("sample")
        self._warned_meta = False

    # ---------------------------------------------------------------- sizes
    @property
    def batches_per_epoch(self) -> int | None:
        """Batches this process yields per epoch (None: one pass over the data, length unknown)."""
        return None if self.epoch_length is None else self.epoch_length // self.batch_size

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a WebDatasetStream without epoch_length has no length")
        return self.batches_per_epoch

    # ---------------------------------------------------------------- errors
    def handler(self, exn: BaseException) -> bool:
        """webdataset exception handler: count and log data errors, re-raise programming errors."""
        if isinstance(exn, _PROGRAMMING_ERRORS):
            raise exn
        self.skips.add(f"{type(exn).__name__}: {exn}")
        return True

    # ---------------------------------------------------------------- decoding
    def _concepts(
        self, stored: Mapping[str, Any] | None, meta: Mapping[str, Any], where: str
    ) -> dict[str, Tensor] | None:
        if not self.use_stored_concepts or not stored or not all(k in stored for k in CONCEPT_KEYS[:2]):
            return None
        stored_meta = meta.get("concept_meta") or {}
        if self.expected_concept_meta is not None:
            problems = meta_mismatch(stored_meta, self.expected_concept_meta)
            if problems:
                if not self._warned_meta:
                    self._warned_meta = True
                    logger.warning(
                        "%s: stored concepts do not match the model (%s); extracting on the fly",
                        where,
                        "; ".join(problems),
                    )
                return None
            shape = (self.expected_concept_meta["max_concepts"], self.expected_concept_meta["max_tokens_per_concept"])
        else:
            shape = (
                stored_meta.get("max_concepts", DEFAULT_MAX_CONCEPTS),
                stored_meta.get("max_tokens_per_concept", DEFAULT_MAX_TOKENS),
            )
        try:
            return concepts_from_lists(stored, int(shape[0]), int(shape[1]))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise BadSample(f"{where}: malformed stored concepts ({exc})") from exc

    def decode(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """One raw webdataset sample (bytes per extension) -> a transformed sample dict."""
        key = raw.get("__key__")
        where = f"{raw.get('__url__')}:{key}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            entries = sorted(k for k in raw if not k.startswith("__"))
            raise BadSample(f"{where}: no image entry ({'/'.join(IMAGE_EXTENSIONS)}), has {entries}")
        sample: dict[str, Any] = {"image": decode_image(raw[ext], name=f"{where}.{ext}"), "key": str(key)}
        meta: dict[str, Any] = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError) as exc:
                raise BadSample(f"{where}.json: invalid JSON ({exc})") from exc
            if not isinstance(meta, dict):
                raise BadSample(f"{where}.json: expected a JSON object")
        if self.with_captions:
            caption, stored = self._caption(raw, meta, where)
            sample["caption"] = caption
            concepts = self._concepts(stored, meta, where)
            if concepts is not None:
                sample.update(concepts)
        if self.with_labels:
            if LABEL_EXTENSION not in raw:
                raise BadSample(f"{where}: no .{LABEL_EXTENSION} label map")
            sample["label"] = self._label(raw[LABEL_EXTENSION], f"{where}.{LABEL_EXTENSION}")
            if tuple(sample["label"].shape) != tuple(sample["image"].shape[-2:]):
                raise BadSample(
                    f"{where}: label size {tuple(sample['label'].shape)} differs from image "
                    f"size {tuple(sample['image'].shape[-2:])}"
                )
        return self.transform(sample) if self.transform is not None else sample

    def _caption(self, raw: Mapping[str, Any], meta: Mapping[str, Any], where: str) -> tuple[str, Mapping | None]:
        captions = meta.get("captions")
        if self.random_caption and isinstance(captions, list) and captions:
            usable = [i for i, c in enumerate(captions) if isinstance(c, str) and c.strip()]
            if usable:
                k = usable[int(torch.randint(len(usable), ()))] if len(usable) > 1 else usable[0]
                per_caption = meta.get("caption_concepts")
                stored = per_caption[k] if isinstance(per_caption, list) and len(per_caption) == len(captions) else None
                if stored is None and captions[k] == meta.get("caption"):
                    stored = meta  # the top-level concepts are those of the main caption
                return captions[k].strip(), stored
        if "txt" in raw:
            try:
                caption = raw["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise BadSample(f"{where}.txt: not UTF-8 ({exc})") from exc
        elif "caption" not in meta:
            raise BadSample(f"{where}: no caption (neither a .txt entry nor a 'caption' key in its .json)")
        else:
            caption = str(meta.get("caption") or "").strip()
        if not caption:
            raise BadSample(f"{where}: empty caption")
        return caption, meta

    def _label(self, data: bytes, name: str) -> Tensor:
        label = decode_label(data, name=name)
        if self.num_classes is not None:
            bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
            if bool(bad.any()):
                values = torch.unique(label[bad])[:10].tolist()
                raise BadSample(
                    f"{name}: label values {values} outside 0..{self.num_classes - 1} and not {self.ignore_index}"
                )
        if self._lut is not None:
            label = self._lut[label.clamp(0, len(self._lut) - 1)].where(label < len(self._lut), label)
        return label

    # ---------------------------------------------------------------- iteration
    def pipeline(self) -> wds.WebDataset:
        """A fresh ``wds.WebDataset`` pipeline of decoded samples (one pass, or endless if resampled)."""
        seed = int(torch.randint(2**31 - 1, ()))
        dataset = wds.WebDataset(
            self.urls,
            handler=self.handler,
            resampled=self.resampled,
            shardshuffle=False if self.resampled or self.shard_shuffle <= 0 else self.shard_shuffle,
            nodesplitter=_SplitByRank(self.rank, self.world_size),
            workersplitter=wds.split_by_worker,
            empty_check=False,
            seed=seed,
        )
        if self.shuffle_buffer > 0:
            dataset = dataset.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), seed=seed + 1)
        return dataset.map(self.decode, handler=self.handler)

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate; the concept keys are kept only if every sample has them (webdataset's
        ``__key__`` / ``__url__`` bookkeeping entries are dropped: ``key`` has the key)."""
        samples = [{k: v for k, v in s.items() if not k.startswith("__")} for s in samples]
        if any(CONCEPT_KEYS[0] in s for s in samples) and not all(CONCEPT_KEYS[0] in s for s in samples):
            samples = [{k: v for k, v in s.items() if k not in CONCEPT_KEYS} for s in samples]
        return collate_samples(samples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        target = None
        if self.batches_per_epoch is not None:
            n = self.batches_per_epoch
            target = n // workers + (1 if worker < n % workers else 0)
            if target == 0:
                return
        produced = 0
        buffer: list[dict[str, Any]] = []
        while True:
            got_any = False
            for sample in self.pipeline():
                got_any = True
                buffer.append(sample)
                if len(buffer) == self.batch_size:
                    yield self.collate(buffer)
                    buffer = []
                    produced += 1
                    if target is not None and produced >= target:
                        return
            if target is None:
                return
            if not got_any:
                raise RuntimeError(
                    f"DataLoader worker {worker} (rank {self.rank}) got no usable sample from "
                    f"{len(self.urls)} shard(s) {self.urls[0]}...; {self.skips.value} bad sample(s) "
                    "skipped so far (see the warnings above)"
                )


class WebDatasetDataModule(TrainDataModule):
    """Image-caption (and optionally label-map) training from WebDataset shards.

    YAML::

        data:
          class_path: ovseg.datamodules.WebDatasetDataModule
          init_args:
            urls: data/coco_shards/{00000..00059}.tar
            epoch_length: 400000      # samples per epoch per process (rank)
            batch_size: 512
            num_workers: 8
            resampled: true           # multi-node: every rank draws shards with replacement
            eval_data: {class_path: ovseg.datamodules.SyntheticDataModule}

    Args:
        urls: brace pattern(s) (``"dir/{00000..00009}.tar"``, ``::``-separated) or a list; local
            paths or any URL webdataset opens (``pipe:``, ``http(s)://``, ...).
        epoch_length: **samples per epoch per process** (per rank): each rank yields
            ``epoch_length // batch_size`` batches per epoch, whatever the number of workers.
            None: one pass over this rank's shards per epoch (unknown length; not with
            ``resampled``; ranks may get unequal numbers of batches, so use it on one process).
        batch_size: samples per batch per process.
        num_workers: DataLoader workers; without ``resampled``, capped at this rank's number of
            shards (webdataset splits shards between workers).
        pin_memory: default: when CUDA is available.
        shuffle_buffer: sample shuffle buffer size (0: no shuffling within shards).
        shard_shuffle: shard shuffle buffer (0: shards in order); ignored with ``resampled``.
        resampled: draw shards with replacement, endlessly (webdataset's multi-node mode).
        transform: default ``RandomResizedCrop(224, scale=(0.9, 1.0), bicubic)``.
        with_captions: read captions (``.txt``, or ``captions`` / ``caption`` in the JSON).
        with_labels: read ``.seg.png`` label maps as raw values.
        random_caption: when the JSON lists several ``captions``, draw one per visit.
        use_stored_concepts: add stored concepts to the batch when they match the model.
        num_classes: label values outside ``0..num_classes-1`` (and not ``ignore_index``) make a
            sample bad (skipped).
        ignore_classes: label values mapped to ``ignore_index`` (e.g. the unseen classes).
        ignore_index: the label ignore value.
        eval_data: DataModule providing ``benchmarks`` and the evaluation loaders.
    """

    def __init__(
        self,
        urls: str | list[str],
        epoch_length: int | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        shuffle_buffer: int = 1000,
        shard_shuffle: int = 100,
        resampled: bool = False,
        transform: Transform | None = None,
        with_captions: bool = True,
        with_labels: bool = False,
        random_caption: bool = True,
        use_stored_concepts: bool = True,
        num_classes: int | None = None,
        ignore_classes: list[int] | None = None,
        ignore_index: int = 255,
        eval_data: L.LightningDataModule | None = None,
    ) -> None:
        super().__init__(eval_data)
        if resampled and epoch_length is None:
            raise ValueError("WebDatasetDataModule: resampled=True needs epoch_length (samples per epoch per process)")
        if epoch_length is not None and epoch_length < batch_size:
            raise ValueError(f"epoch_length ({epoch_length}) must be at least batch_size ({batch_size})")
        self.urls = urls
        self.epoch_length = epoch_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = default_pin_memory(pin_memory)
        self.shuffle_buffer = shuffle_buffer
        self.shard_shuffle = shard_shuffle
        self.resampled = resampled
        self.transform = transform if transform is not None else RandomResizedCrop(224, (0.9, 1.0))
        self.with_captions = with_captions
        self.with_labels = with_labels
        self.random_caption = random_caption
        self.use_stored_concepts = use_stored_concepts
        self.num_classes = num_classes
        self.ignore_classes = list(ignore_classes or [])
        self.ignore_index = ignore_index

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _local_shards(self, shards: list[str]) -> None:
        missing = [u for u in shards if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}")

    def train_stream(self) -> WebDatasetStream:
        """The training stream of this process (rank from the attached trainer)."""
        rank, world = self._rank()
        if self.skips is None:
            self.skips = SkipCounter("sample")
        extractor = self.model_concept_extractor()
        return WebDatasetStream(
            self.urls,
            self.batch_size,
            self.epoch_length,
            self.resampled,
            self.shard_shuffle,
            self.shuffle_buffer,
            self.transform,
            self.with_captions,
            self.with_labels,
            self.random_caption,
            self.use_stored_concepts,
            concept_meta(extractor) if extractor is not None else None,
            self.num_classes,
            self.ignore_classes,
            self.ignore_index,
            rank,
            world,
            self.skips,
        )

    def train_dataloader(self) -> DataLoader:
        stream = self.train_stream()
        self._local_shards(stream.urls)
        workers = self.num_workers
        if not self.resampled:
            per_rank = len(stream.urls[stream.rank :: stream.world_size])
            if per_rank == 0:
                raise ValueError(
                    f"{len(stream.urls)} shard(s) for {stream.world_size} processes: rank {stream.rank} gets "
                    "none; use resampled=True or more shards"
                )
            if workers > per_rank:
                logger.warning(
                    "WebDatasetDataModule: %d shard(s) for this process, using %d DataLoader worker(s) instead of %d",
                    per_rank,
                    per_rank,
                    workers,
                )
                workers = per_rank
        return DataLoader(
            stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory, persistent_workers=workers > 0
        )
