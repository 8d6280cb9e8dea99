"""Write the synthetic world to disk in the real data formats (COCO, COCO-Stuff, mmseg, WebDataset).

Every writer draws scenes ``0..num_images-1`` of the split it writes (train-like names use the
train stream, "val2017"/"validation" the validation stream), saves images as JPEG (quality 95) and
label maps as lossless single-channel PNG (255 = ignore), and writes ``class_names.txt`` (one class
per line, synonyms after the name, separated by ", ") and ``split.json`` (seen/unseen class names)
next to the data so the loaders know the vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from ovseg.datamodules.synthetic import (
    IGNORE_INDEX,
    SyntheticWorld,
    canonical_split,
    caption_choice,
)
from ovseg.io import atomic_write_bytes
from ovseg.prepare.shards import open_shard, progress_bar

JPEG_QUALITY = 95
FORMATS = ("coco", "coco-stuff", "mmseg", "wds")
DEFAULT_SPLITS = {"coco": "train2017", "coco-stuff": "train2017", "mmseg": "validation", "wds": "train"}
# COCO image ids of the streams, so train and val ids never collide
_ID_OFFSET = {"train": 0, "val": 100_000_000, "test": 200_000_000}


# ------------------------------------------------------------------------------------------ helpers
def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(label: np.ndarray) -> bytes:
    """(H, W) uint8 -> single-channel ('L') PNG bytes (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def coco_image_id(index: int, split: str) -> int:
    """The COCO-style image id of scene ``index`` of ``split`` (1-based, offset per stream)."""
    return _ID_OFFSET[canonical_split(split)] + index + 1


def write_vocabulary(world: SyntheticWorld, root: str | os.PathLike) -> None:
    """``root/class_names.txt`` (name, synonyms...) and ``root/split.json`` (seen/unseen names)."""
    root = Path(root)
    atomic_write_bytes(root / "class_names.txt", "\n".join(world.vocabulary_lines()) + "\n")
    cats = world.categories
    meta = {
        "seen": [c.name for c in cats if c.seen],
        "unseen": [c.name for c in cats if not c.seen],
        "stuff": [c.name for c in cats if c.kind == "stuff"],
        "things": [c.name for c in cats if c.kind == "thing"],
        "num_classes": len(cats),
        "ignore_index": IGNORE_INDEX,
        "image_size": [world.height, world.width],
        "seed": world.seed,
    }
    atomic_write_bytes(root / "split.json", json.dumps(meta, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ writers
def write_coco_captions(
    world: SyntheticWorld,
    root: str | os.PathLike,
    split: str = "train2017",
    num_images: int = 100,
    progress: bool = True,
) -> Path:
    """COCO Captions: ``root/{split}/000000xxxxxx.jpg`` + ``root/annotations/captions_{split}.json``.

    The JSON has the real keys: info, licenses, images {id, file_name, coco_url, flickr_url, height,
    width, license, date_captured} and annotations {id, image_id, caption}, five per image.
    """
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in progress_bar(num_images, f"coco captions {split}", "img", progress, leave=False):
        scene = world.scene(i, split)
        image_id = coco_image_id(i, split)
        file_name = f"{image_id:012d}.jpg"
        atomic_write_bytes(root / split / file_name, encode_jpeg(scene.image))
        images.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": f"synthetic://{split}/{file_name}",
                "height": world.height,
                "width": world.width,
                "date_captured": "2017-01-01 00:00:00",
                "flickr_url": f"synthetic://{split}/{file_name}",
                "id": image_id,
            }
        )
        for caption in scene.captions:
            annotations.append({"image_id": image_id, "id": len(annotations) + 1, "caption": caption})
    doc = {
        "info": {
            "description": f"ovseg synthetic world (seed {world.seed}) in COCO Captions format",
            "url": "",
            "version": "1.0",
            "year": 2017,
            "contributor": "ovseg",
            "date_created": "2017/01/01",
        },
        "licenses": [{"url": "", "id": 1, "name": "synthetic, public domain"}],
        "images": images,
        "annotations": annotations,
    }
    atomic_write_bytes(root / "annotations" / f"captions_{split}.json", json.dumps(doc))
    write_vocabulary(world, root)
    return root


def write_coco_stuff(
    world: SyntheticWorld,
    root: str | os.PathLike,
    split: str = "train2017",
    num_images: int = 100,
    progress: bool = True,
) -> Path:
    """COCO-Stuff in the mmseg layout.

    ``root/images/{split}/*.jpg`` + ``root/annotations/{split}/*_labelTrainIds.png``.

    Label values are the world's category indices (contiguous 0..K-1), 255 = ignore.
    """
    return _write_image_label_folders(
        world,
        Path(root),
        split,
        num_images,
        progress,
        "coco-stuff",
        lambda i: f"{coco_image_id(i, split):012d}",
        "_labelTrainIds.png",
    )


def write_mmseg(
    world: SyntheticWorld,
    root: str | os.PathLike,
    split: str = "validation",
    num_images: int = 100,
    progress: bool = True,
) -> Path:
    """A generic mmseg-style benchmark: ``root/images/{split}/*.jpg`` + ``root/annotations/{split}/*.png``.

    Also writes ``root/class_names.txt`` and ``root/split.json`` (seen/unseen class names).
    """
    stream = canonical_split(split)
    return _write_image_label_folders(
        world, Path(root), split, num_images, progress, "mmseg", lambda i: f"synthetic_{stream}_{i:08d}", ".png"
    )


def _write_image_label_folders(
    world: SyntheticWorld,
    root: Path,
    split: str,
    num_images: int,
    progress: bool,
    what: str,
    stem: Callable[[int], str],
    label_suffix: str,
) -> Path:
    """``root/images/{split}/STEM.jpg`` + ``root/annotations/{split}/STEM{label_suffix}``, plus
    the class names and split files."""
    for i in progress_bar(num_images, f"{what} {split}", "img", progress, leave=False):
        scene = world.scene(i, split)
        atomic_write_bytes(root / "images" / split / f"{stem(i)}.jpg", encode_jpeg(scene.image))
        atomic_write_bytes(root / "annotations" / split / f"{stem(i)}{label_suffix}", encode_png(scene.label))
    write_vocabulary(world, root)
    return root


def write_webdataset(
    world: SyntheticWorld,
    root: str | os.PathLike,
    num_images: int = 100,
    shard_size: int = 100,
    split: str = "train",
    progress: bool = True,
) -> Path:
    """img2dataset-style WebDataset shards ``root/{00000..}.tar``.

    Each sample ``<key>`` (9 digits: 5-digit shard id + 4-digit index in the shard) holds
    ``<key>.jpg``, ``<key>.txt`` (one caption per image: :func:`caption_choice`, as the epoch-0
    caption of :class:`SyntheticDataset`),
    ``<key>.json`` (url, caption, key, status "success", error_message, width, height,
    original_width, original_height, exif, md5, plus ``captions`` and ``index``) and
    ``<key>.seg.png`` (the label map). A ``{shard}_stats.json`` is written per shard.
    """
    if not 1 <= shard_size <= 10_000:
        raise ValueError("shard_size must be in 1..10000 (4-digit index within a shard)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stream = canonical_split(split)
    num_shards = (num_images + shard_size - 1) // shard_size
    bar = progress_bar(num_images, f"webdataset {split}", "img", progress, leave=False)
    it = iter(bar)
    for shard in range(num_shards):
        start_time = time.time()
        n = min(shard_size, num_images - shard * shard_size)
        with open_shard(root / f"{shard:05d}.tar") as tar:
            for j in range(n):
                i = next(it)
                scene = world.scene(i, split)
                key = f"{shard:05d}{j:04d}"
                caption = scene.captions[caption_choice(world, i, split)]
                jpg = encode_jpeg(scene.image)
                meta = {
                    "url": f"synthetic://{stream}/{i}",
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": world.width,
                    "height": world.height,
                    "original_width": world.width,
                    "original_height": world.height,
                    "exif": None,
                    "md5": hashlib.md5(jpg).hexdigest(),
                    "captions": scene.captions,
                    "index": i,
                }
                tar.add(f"{key}.jpg", jpg)
                tar.add(f"{key}.txt", caption.encode())
                tar.add(f"{key}.json", json.dumps(meta).encode())
                tar.add(f"{key}.seg.png", encode_png(scene.label))
        stats = {
            "count": n,
            "successes": n,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "duration": time.time() - start_time,
            "start_time": start_time,
            "end_time": time.time(),
            "status_dict": {"success": n},
        }
        atomic_write_bytes(root / f"{shard:05d}_stats.json", json.dumps(stats, indent=4))
    bar.close()
    write_vocabulary(world, root)
    return root


def make_synthetic(
    format: Literal["coco", "coco-stuff", "mmseg", "wds"],
    out: str | os.PathLike,
    num_images: int = 100,
    split: str | None = None,
    image_size: int = 112,
    seed: int = 0,
    progress: bool = True,
    **world_kwargs,
) -> Path:
    """Write ``num_images`` synthetic scenes to ``out`` in ``format``; returns the dataset root.

    ``split`` defaults to train2017 (coco, coco-stuff), validation (mmseg) or train (wds). Extra
    keyword arguments go to :class:`SyntheticWorld` (e.g. ``max_objects``).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    if num_images < 0:
        raise ValueError("num_images must be >= 0")
    split = split or DEFAULT_SPLITS[format]
    canonical_split(split)  # validate early
    world = SyntheticWorld(image_size=image_size, seed=seed, **world_kwargs)
    if format == "coco":
        return write_coco_captions(world, out, split=split, num_images=num_images, progress=progress)
    if format == "coco-stuff":
        return write_coco_stuff(world, out, split=split, num_images=num_images, progress=progress)
    if format == "mmseg":
        return write_mmseg(world, out, split=split, num_images=num_images, progress=progress)
    return write_webdataset(world, out, num_images=num_images, split=split, progress=progress)
