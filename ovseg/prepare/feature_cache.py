"""``ovseg data cache-features``: run SimZSS's frozen backbone once and write a feature store.

:func:`build_feature_cache` runs the frozen image encoder over the training images for the fixed
:class:`CacheViews` and appends the L2-normalised features to a store (:class:`FeatureStoreWriter`;
the format and its reader are in :mod:`ovseg.datamodules.feature_store`). Building is resumable:
``index.json`` is rewritten (atomically) after every batch, and a second run with the same encoder
and views continues where the first stopped.

Command line::

    ovseg data cache-features --config configs/simzss/coco_vitb14.yaml --out data/coco_vitb14_cache \
        --views center --size 224
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ovseg.datamodules.feature_store import CAPTIONS, FORMAT_VERSION, INDEX
from ovseg.datamodules.transforms import Compose, RandomResizedCrop, resize_image
from ovseg.errors import UserError
from ovseg.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = [
    "CacheViews",
    "FeatureStoreWriter",
    "build_feature_cache",
    "center_view",
    "encoder_fingerprint",
    "frozen_features",
    "train_dataset_of",
]


@dataclass(frozen=True)
class CacheViews:
    """The fixed views cached per image.

    Args:
        mode: ``"center"`` (resize the short side to ``size``, centre crop ``size`` x ``size``; one
            view) or ``"rrc"`` (``num_views`` RandomResizedCrop views, drawn with a seed derived from
            ``seed``, the image index and the view index, hence reproducible and resume-safe).
        size: output side.
        num_views: views per image (``"rrc"`` only; ``"center"`` has one).
        seed: base seed of the ``"rrc"`` views.
        scale: RandomResizedCrop area range (SimZSS: 0.9-1.0).
        interpolation: resize interpolation (SimZSS: bicubic).
    """

    mode: str = "center"
    size: int = 224
    num_views: int = 1
    seed: int = 0
    scale: tuple[float, float] = (0.9, 1.0)
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.mode not in ("center", "rrc"):
            raise ValueError(f"views mode must be 'center' or 'rrc', got {self.mode!r}")
        if self.mode == "center" and self.num_views != 1:
            object.__setattr__(self, "num_views", 1)
        if self.num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {self.num_views}")
        object.__setattr__(self, "scale", (float(self.scale[0]), float(self.scale[1])))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "scale": list(self.scale)}

    def view(self, image: Tensor, image_index: int, view_index: int) -> Tensor:
        """(3, H, W) uint8 or float image -> (3, size, size) float in [0, 1]: view ``view_index``."""
        image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        if self.mode == "center":
            return center_view(image, self.size, self.interpolation)
        crop = RandomResizedCrop(self.size, self.scale, interpolation=self.interpolation)  # type: ignore[arg-type]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + image_index) * 1_009 + view_index)
            return crop({"image": image})["image"].clamp(0, 1)


def center_view(image: Tensor, size: int, interpolation: str = "bicubic") -> Tensor:
    """Resize the short side of a (3, H, W) float image to ``size``, then centre crop a square."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = resize_image(image, new, interpolation)  # type: ignore[arg-type]
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return resized[:, top : top + size, left : left + size].clamp(0, 1)


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """SHA-1 of the encoder's class and its state dict (names, shapes, values)."""
    digest = hashlib.sha1(f"{type(encoder).__module__}.{type(encoder).__qualname__}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@torch.no_grad()
def frozen_features(encoder: torch.nn.Module, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """The SimZSS frozen features of (B, 3, H, W) images in [0, 1]: normalised (B, N, D) patches,
    (B, D) pooled and the (h, w) grid (as :meth:`SimZSSModel.encode_image`)."""
    features = encoder(images)
    _, _, height, width = features.dense.shape
    patches = features.dense.flatten(2).transpose(1, 2)
    return (F.normalize(patches.float(), dim=-1), F.normalize(features.pooled.float(), dim=-1), (height, width))


class FeatureStoreWriter:
    """Appends per-image features to a sharded fp16 store; resumable.

    Opening an existing store checks that ``meta`` (encoder fingerprint, views, shapes) matches and
    continues after the last complete batch; captions written after it are dropped.
    """

    def __init__(
        self,
        store: str | os.PathLike,
        num_images: int,
        num_views: int,
        num_patches: int,
        dim: int,
        grid: tuple[int, int],
        shard_size: int = 4096,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = Path(store)
        self.root.mkdir(parents=True, exist_ok=True)
        fresh = {
            "version": FORMAT_VERSION,
            "dtype": "float16",
            "num_images": int(num_images),
            "num_views": int(num_views),
            "num_patches": int(num_patches),
            "dim": int(dim),
            "grid": list(grid),
            "shard_size": int(shard_size),
            "shards": [f"{{}}_{i:05d}.npy" for i in range(-(-num_images // shard_size))],
            **dict(meta or {}),
            "num_done": 0,
        }
        path = self.root / INDEX
        if path.exists():
            index = json.loads(path.read_text())
            for key in fresh:
                if key != "num_done" and index.get(key) != fresh[key]:
                    raise UserError(
                        f"feature store {self.root} was built with {key}={index.get(key)!r}, not "
                        f"{fresh[key]!r}: use another --out or delete it"
                    )
        else:
            index = fresh
        self.index = index
        self._truncate_captions(index["num_done"])
        self._shards: dict[int, tuple[np.memmap, np.memmap]] = {}
        atomic_write_json(path, index, indent=1)

    @property
    def num_done(self) -> int:
        return int(self.index["num_done"])

    def _truncate_captions(self, lines: int) -> None:
        path = self.root / CAPTIONS
        if not path.exists():
            path.touch()
            return
        with open(path, "rb") as file:
            kept = [next(file, b"") for _ in range(lines)]
        if any(not line.endswith(b"\n") for line in kept):
            raise ValueError(f"{path} has fewer than {lines} complete lines: the store is damaged")
        with open(path, "wb") as file:
            file.writelines(kept)

    def _shard(self, number: int) -> tuple[np.memmap, np.memmap]:
        if number not in self._shards:
            index = self.index
            count = min(index["shard_size"], index["num_images"] - number * index["shard_size"])
            shapes = {
                "patches": (count, index["num_views"], index["num_patches"], index["dim"]),
                "pooled": (count, index["num_views"], index["dim"]),
            }
            arrays = []
            for kind, shape in shapes.items():
                path = self.root / index["shards"][number].format(kind)
                mode = "r+" if path.exists() else "w+"
                arrays.append(np.lib.format.open_memmap(path, mode=mode, dtype=np.float16, shape=shape))
            self._shards = {number: (arrays[0], arrays[1])}  # keep one shard mapped at a time
        return self._shards[number]

    def append(self, patches: np.ndarray, pooled: np.ndarray, captions: list[list[str]]) -> None:
        """Write (B, V, N, D) patches, (B, V, D) pooled and B caption lists after ``num_done``."""
        size = self.index["shard_size"]
        start = self.num_done
        for offset in range(len(captions)):
            number, row = divmod(start + offset, size)
            shard_patches, shard_pooled = self._shard(number)
            shard_patches[row] = patches[offset]
            shard_pooled[row] = pooled[offset]
        for shard_patches, shard_pooled in self._shards.values():
            shard_patches.flush()
            shard_pooled.flush()
        with open(self.root / CAPTIONS, "a") as file:
            file.writelines(json.dumps(list(c)) + "\n" for c in captions)
        self.index["num_done"] = start + len(captions)
        atomic_write_json(self.root / INDEX, self.index, indent=1)


def _sample_captions(dataset: Dataset, index: int, sample: Mapping[str, Any]) -> list[str]:
    inner = getattr(dataset, "index", None)
    if inner is not None and hasattr(inner, "captions"):  # COCO Captions: every caption of the image
        return list(inner.captions[index])
    if "captions" in sample:
        return list(sample["captions"])
    return [sample["caption"]]


def build_feature_cache(
    encoder: torch.nn.Module,
    dataset: Dataset,
    store: str | os.PathLike,
    views: CacheViews | None = None,
    batch_size: int = 32,
    shard_size: int = 4096,
    num_images: int | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    max_batches: int | None = None,
) -> Path:
    """Run the frozen ``encoder`` over ``dataset`` (dict samples with ``image`` (3, H, W) and
    ``caption``/``captions``) for the fixed ``views`` and write the store; resumes an existing one.

    Args:
        num_images: cache the first N images only (default: all).
        max_batches: stop after this many batches (the store stays resumable; for tests).

    Returns:
        The store directory.
    """
    views = views or CacheViews()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder.to(device).eval()
    total = len(dataset) if num_images is None else min(num_images, len(dataset))  # type: ignore[arg-type]
    if total < 1:
        raise ValueError("the dataset is empty")
    probe = torch.zeros(1, 3, views.size, views.size, device=device)
    _, probe_pooled, grid = frozen_features(encoder, probe)
    meta = {
        "encoder": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "encoder_name": getattr(encoder, "model_name", type(encoder).__name__),
        "fingerprint": encoder_fingerprint(encoder),
        "views": views.to_json(),
    }
    writer = FeatureStoreWriter(
        store, total, views.num_views, grid[0] * grid[1], probe_pooled.shape[-1], grid, shard_size, meta
    )
    start = writer.num_done
    if start >= total:
        return writer.root
    if start:
        log.warning("resuming the feature store %s: %d of %d images already cached", writer.root, start, total)

    class _Views(Dataset):
        def __len__(self) -> int:
            return total - start

        def __getitem__(self, i: int) -> dict[str, Any]:
            index = start + i
            sample = dataset[index]
            return {
                "views": torch.stack([views.view(sample["image"], index, v) for v in range(views.num_views)]),
                "captions": _sample_captions(dataset, index, sample),
            }

    loader = DataLoader(
        _Views(),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=lambda s: (torch.stack([x["views"] for x in s]), [x["captions"] for x in s]),
    )
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=start, desc="caching features", unit="img", disable=None if progress else True
    )  # None: no bar when not on a terminal
    for number, (images, captions) in enumerate(loader):
        if max_batches is not None and number >= max_batches:
            break
        flat = images.flatten(0, 1).to(device, non_blocking=True)
        patches, pooled, _ = frozen_features(encoder, flat)
        b, v = images.shape[:2]
        writer.append(
            patches.reshape(b, v, *patches.shape[1:]).half().cpu().numpy(),
            pooled.reshape(b, v, -1).half().cpu().numpy(),
            captions,
        )
        bar.update(b)
    bar.close()
    return writer.root


def train_dataset_of(datamodule: L.LightningDataModule) -> Dataset:
    """The raw (un-augmented) training dataset of a DataModule: its ``train_dataset()`` or, after
    clearing its ``transform``, the ``train_set`` built by ``setup("fit")``."""
    if hasattr(datamodule, "train_dataset"):
        return datamodule.train_dataset()  # type: ignore[operator]
    if hasattr(datamodule, "transform"):
        datamodule.transform = Compose([])  # type: ignore[attr-defined]
    datamodule.setup("fit")
    dataset = getattr(datamodule, "train_set", None)
    if dataset is None:
        raise TypeError(f"{type(datamodule).__name__} has no map-style training dataset to cache")
    return dataset
