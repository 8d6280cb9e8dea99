"""``ovseg data make-shards``: COCO Captions or COCO-Stuff -> WebDataset shards (img2dataset layout).

The shard format is described in :mod:`ovseg.datamodules.webdataset` (which reads it). Every shard
is written atomically (:func:`open_shard`): a killed run leaves complete shards and no partial one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ovseg.concepts import ConceptExtractor, stored_concept_fields
from ovseg.datamodules.base import check_files_exist
from ovseg.datamodules.coco_captions import read_coco_captions
from ovseg.datamodules.coco_stuff import CocoStuffDataset
from ovseg.datamodules.webdataset import LABEL_EXTENSION
from ovseg.io import atomic_write

__all__ = [
    "ShardSummary",
    "TarShard",
    "make_shards_from_coco_captions",
    "make_shards_from_coco_stuff",
    "open_shard",
    "progress_bar",
]

logger = logging.getLogger("ovseg.data")

#: The modification time of every shard member (reproducible shards).
MEMBER_MTIME = 1_500_000_000


class TarShard:
    """Adds members to a tar with mode 0644 and a fixed modification time."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar

    def add(self, name: str, data: bytes, mtime: float = MEMBER_MTIME) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(mtime)
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(data))


@contextmanager
def open_shard(path: str | os.PathLike) -> Iterator[TarShard]:
    """A (USTAR) tar written atomically to ``path`` (:func:`ovseg.io.atomic_write`): complete on
    success, untouched if the body raises."""
    with atomic_write(path) as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        yield TarShard(tar)


def progress_bar(total: int, desc: str, unit: str, progress: bool, leave: bool = True) -> Any:
    """A tqdm bar over ``range(total)`` (disabled without ``progress``): iterate it, or call
    ``update``."""
    from tqdm.auto import tqdm

    return tqdm(
        range(total), desc=desc, unit=unit, disable=None if progress else True, leave=leave, dynamic_ncols=True
    )  # None: no bar when the output is not a terminal


@dataclass
class ShardSummary:
    """What a shard writer did."""

    shards: list[Path]
    samples: int
    skipped: int = 0


def _shard_key(shard: int, index: int) -> str:
    return f"{shard:05d}{index:04d}"


def make_shards_from_coco_captions(
    annotations: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 10_000,
    concepts: bool = False,
    per_caption: bool = False,
    num_workers: int = 0,
    bank: str | None = None,
    context_length: int = 77,
    max_concepts: int = 32,
    max_tokens_per_concept: int = 16,
    progress: bool = True,
    concept_rules: str = "ovseg",
) -> ShardSummary:
    """COCO Captions (JSON + image folder) -> img2dataset-layout shards ``out/{00000..}.tar``.

    One sample per image (``.txt`` = its first caption, ``json["captions"]`` = all of them), or
    with ``per_caption`` one sample per caption (img2dataset's ``mscoco.parquet`` layout). Image
    bytes are stored as they are (not re-encoded). With ``concepts`` the SimZSS concepts of every
    caption are extracted once (``num_workers`` processes) and stored in the JSON. Images whose
    header cannot be read are skipped (counted, logged). Keys are 9 digits: 5-digit shard id and
    4-digit index (so ``shard_size <= 10000``).
    """
    if not 1 <= shard_size <= 10_000:
        raise ValueError("shard_size must be in 1..10000 (4-digit index within a shard)")
    annotations, images, out = Path(annotations), Path(images), Path(out)
    index = read_coco_captions(annotations)
    check_files_exist(images, index.file_names, "images", annotations)
    entries: list[tuple[int, list[int]]] = []  # (image position, caption positions)
    for i, caps in enumerate(index.captions):
        if per_caption:
            entries += [(i, [k]) for k in range(len(caps))]
        else:
            entries.append((i, list(range(len(caps)))))
    extractor = None
    extracted: dict[tuple[int, int], Any] = {}
    if concepts:
        extractor = ConceptExtractor(bank, context_length, max_concepts, max_tokens_per_concept, concept_rules)
        flat = [(i, k) for i, caps in enumerate(index.captions) for k in range(len(caps))]
        results = extractor.extract_many(
            [index.captions[i][k] for i, k in flat], num_workers=num_workers, progress=progress
        )
        extracted = dict(zip(flat, results))
    shards: list[Path] = []
    skipped = written = 0
    bar = progress_bar(len(entries), "make-shards", "img", progress)
    num_shards = (len(entries) + shard_size - 1) // shard_size
    for shard in range(num_shards):
        path = out / f"{shard:05d}.tar"
        with open_shard(path) as tar:
            for j, (i, ks) in enumerate(entries[shard * shard_size : (shard + 1) * shard_size]):
                bar.update(1)
                file = images / index.file_names[i]
                data = file.read_bytes()
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        width, height = im.size
                        fmt = (im.format or "").lower()
                except Exception as exc:  # corrupt header: leave the image out
                    skipped += 1
                    logger.warning("make-shards: skipped %s (%s: %s)", file, type(exc).__name__, exc)
                    continue
                ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(fmt)
                if ext is None:
                    skipped += 1
                    logger.warning("make-shards: skipped %s (format %r is not jpg/png/webp)", file, fmt)
                    continue
                key = _shard_key(shard, j)
                captions = [index.captions[i][k] for k in ks]
                meta: dict[str, Any] = {
                    "url": str(file),
                    "caption": captions[0],
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": width,
                    "height": height,
                    "original_width": width,
                    "original_height": height,
                    "exif": None,
                    "md5": hashlib.md5(data).hexdigest(),
                    "image_id": index.image_ids[i],
                    "file_name": index.file_names[i],
                    "annotation_ids": [index.annotation_ids[i][k] for k in ks],
                }
                if len(captions) > 1:
                    meta["captions"] = captions
                if extractor is not None:
                    per = [extracted[(i, k)] for k in ks] if len(captions) > 1 else None
                    meta.update(stored_concept_fields(extractor, extracted[(i, ks[0])], per))
                tar.add(f"{key}.{ext}", data)
                tar.add(f"{key}.txt", captions[0].encode("utf-8"))
                tar.add(f"{key}.json", json.dumps(meta).encode("utf-8"))
                written += 1
        shards.append(path)
    bar.close()
    return ShardSummary(shards, written, skipped)


def make_shards_from_coco_stuff(
    root: str | os.PathLike,
    out: str | os.PathLike,
    split: str = "train2017",
    shard_size: int = 10_000,
    progress: bool = True,
) -> ShardSummary:
    """COCO-Stuff (mmseg layout) -> shards with ``<key>.jpg``, ``<key>.seg.png``, ``<key>.json``.

    Image and label bytes are stored as they are; the JSON holds ``key``, ``file_name``,
    ``label_file``, ``width`` and ``height``. A missing label file is an error (named).
    Read them back with ``WebDatasetDataModule(with_labels=True, with_captions=False)``.
    """
    if not 1 <= shard_size <= 10_000:
        raise ValueError("shard_size must be in 1..10000 (4-digit index within a shard)")
    dataset = CocoStuffDataset(root, split, num_classes=65536)  # pairing and existence checks only
    out = Path(out)
    shards: list[Path] = []
    n = len(dataset)
    bar = progress_bar(n, "make-shards", "img", progress)
    for shard in range((n + shard_size - 1) // shard_size):
        path = out / f"{shard:05d}.tar"
        with open_shard(path) as tar:
            for j, i in enumerate(range(shard * shard_size, min(n, (shard + 1) * shard_size))):
                bar.update(1)
                image_file = dataset.image_dir / (dataset.stems[i] + dataset.image_suffix)
                label_file = dataset.label_path(i)
                data = image_file.read_bytes()
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        width, height = im.size
                except Exception as exc:
                    raise ValueError(f"{image_file}: cannot read the image header ({exc})") from exc
                key = _shard_key(shard, j)
                meta = {
                    "key": key,
                    "file_name": image_file.name,
                    "label_file": label_file.name,
                    "width": width,
                    "height": height,
                }
                tar.add(f"{key}.jpg", data)
                tar.add(f"{key}.{LABEL_EXTENSION}", label_file.read_bytes())
                tar.add(f"{key}.json", json.dumps(meta).encode("utf-8"))
        shards.append(path)
    bar.close()
    return ShardSummary(shards, n)


# ---------------------------------------------------------------------------- extract-concepts
_SHARD_EXTRACTOR: Any = None
