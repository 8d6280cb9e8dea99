"""Frozen-feature caching for SimZSS: run the frozen backbone once, train from stored features.

SimZSS never updates its vision backbone, so its patch tokens and global feature of a given view of
an image never change. :func:`build_feature_cache` runs the backbone once over the training images
for a fixed set of views per image and writes the L2-normalised outputs to a memory-mapped store::

    STORE/index.json              shapes, dtype, encoder name + fingerprint, views, images done
    STORE/patches_00000.npy ...   float16 (shard_size, V, N, D) normalised patch tokens
    STORE/pooled_00000.npy ...    float16 (shard_size, V, D) normalised global features
    STORE/captions.jsonl          one JSON list of captions per image, in store order

Building is resumable: ``index.json`` is rewritten (atomically) after every batch, and a second
run with the same encoder and views continues where the first stopped. :class:`CachedFeaturesDataModule`
then yields ``patches``, ``pooled`` and ``caption`` per sample, read through ``np.memmap`` (pages
are released from the process every few hundred reads, so the resident memory does not grow with
the store), and :class:`~ovseg.methods.simzss.SimZSS` trains from them without an image.

Command line::

    ovseg data cache-features --config configs/simzss/coco_vitb14.yaml --out data/coco_vitb14_cache \
        --views center --size 224
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ovseg.datamodules.common import collate_samples
from ovseg.datamodules.transforms import RandomResizedCrop, resize_image
from ovseg.errors import UserError

log = logging.getLogger(__name__)

INDEX = "index.json"
CAPTIONS = "captions.jsonl"
FORMAT_VERSION = 1


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
    return resized[:, top:top + size, left:left + size].clamp(0, 1)


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    """SHA-1 of the encoder's class and its state dict (names, shapes, values)."""
    digest = hashlib.sha1(f"{type(encoder).__module__}.{type(encoder).__qualname__}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


@torch.no_grad()
def frozen_features(encoder: torch.nn.Module, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """The SimZSS frozen features of (B, 3, H, W) images in [0, 1]: normalised (B, N, D) patches,
    (B, D) pooled and the (h, w) grid (as :meth:`SimZSSModel.encode_image`)."""
    features = encoder(images)
    _, _, height, width = features.dense.shape
    patches = features.dense.flatten(2).transpose(1, 2)
    return (F.normalize(patches.float(), dim=-1), F.normalize(features.pooled.float(), dim=-1),
            (height, width))


# ------------------------------------------------------------------------------------ store
def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_index(store: str | os.PathLike) -> dict[str, Any]:
    """The store's ``index.json``; a :class:`UserError` naming the file if it is not readable JSON."""
    path = Path(store) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"no feature store at {store} ({INDEX} missing): build it with "
                                "`ovseg data cache-features --config CONFIG --out STORE`")
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"feature store index {path} is corrupt ({error}); rebuild the store with "
                        "`ovseg data cache-features` into a new --out") from None
    missing = [key for key in ("num_done", "num_images", "shard_size", "shards") if key not in index]
    if missing:
        raise UserError(f"feature store index {path} lacks {missing}: not a store written by ovseg data cache-features")
    return index


def unfinished_store_message(store: str | os.PathLike, index: Mapping[str, Any]) -> str:
    """What is wrong with a store whose building stopped early, and the two ways on."""
    views = index.get("views") or {}
    return (f"feature store {store} is unfinished: {index['num_done']} of {index['num_images']} images cached "
            f"(its `ovseg data cache-features` run stopped early). Finish it by running that command again with "
            f"the same --config, --views {views.get('mode', '...')} and --size {views.get('size', '...')} and "
            f"--out {store} (it continues where it stopped), or train on the finished part with "
            "--data.init_args.allow_partial true")


class FeatureStoreWriter:
    """Appends per-image features to a sharded fp16 store; resumable.

    Opening an existing store checks that ``meta`` (encoder fingerprint, views, shapes) matches and
    continues after the last complete batch; captions written after it are dropped.
    """

    def __init__(self, store: str | os.PathLike, num_images: int, num_views: int, num_patches: int,
                 dim: int, grid: tuple[int, int], shard_size: int = 4096,
                 meta: Mapping[str, Any] | None = None) -> None:
        self.root = Path(store)
        self.root.mkdir(parents=True, exist_ok=True)
        fresh = {
            "version": FORMAT_VERSION, "dtype": "float16", "num_images": int(num_images),
            "num_views": int(num_views), "num_patches": int(num_patches), "dim": int(dim),
            "grid": list(grid), "shard_size": int(shard_size),
            "shards": [f"{{}}_{i:05d}.npy" for i in range(-(-num_images // shard_size))],
            **dict(meta or {}), "num_done": 0,
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
        _write_json_atomic(path, index)

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
            shapes = {"patches": (count, index["num_views"], index["num_patches"], index["dim"]),
                      "pooled": (count, index["num_views"], index["dim"])}
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
        _write_json_atomic(self.root / INDEX, self.index)


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
    meta = {"encoder": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
            "encoder_name": getattr(encoder, "model_name", type(encoder).__name__),
            "fingerprint": encoder_fingerprint(encoder), "views": views.to_json()}
    writer = FeatureStoreWriter(store, total, views.num_views, grid[0] * grid[1],
                                probe_pooled.shape[-1], grid, shard_size, meta)
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
            return {"views": torch.stack([views.view(sample["image"], index, v)
                                          for v in range(views.num_views)]),
                    "captions": _sample_captions(dataset, index, sample)}

    loader = DataLoader(_Views(), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=lambda s: (torch.stack([x["views"] for x in s]), [x["captions"] for x in s]))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc="caching features", unit="img",
               disable=None if progress else True)  # None: no bar when not on a terminal
    for number, (images, captions) in enumerate(loader):
        if max_batches is not None and number >= max_batches:
            break
        flat = images.flatten(0, 1).to(device, non_blocking=True)
        patches, pooled, _ = frozen_features(encoder, flat)
        b, v = images.shape[:2]
        writer.append(patches.reshape(b, v, *patches.shape[1:]).half().cpu().numpy(),
                      pooled.reshape(b, v, -1).half().cpu().numpy(), captions)
        bar.update(b)
    bar.close()
    return writer.root


def train_dataset_of(datamodule: L.LightningDataModule) -> Dataset:
    """The raw (un-augmented) training dataset of a DataModule: its ``train_dataset()`` or, after
    clearing its ``transform``, the ``train_set`` built by ``setup("fit")``."""
    if hasattr(datamodule, "train_dataset"):
        return datamodule.train_dataset()  # type: ignore[operator]
    if hasattr(datamodule, "transform"):
        from ovseg.datamodules.transforms import Compose

        datamodule.transform = Compose([])  # type: ignore[attr-defined]
    datamodule.setup("fit")
    dataset = getattr(datamodule, "train_set", None)
    if dataset is None:
        raise TypeError(f"{type(datamodule).__name__} has no map-style training dataset to cache")
    return dataset


# ------------------------------------------------------------------------------------ reading
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

    def __init__(self, store: str | os.PathLike, view: int | None = None, random_caption: bool = True,
                 release_every: int = 64, allow_partial: bool = False) -> None:
        self.root = Path(store)
        self.index = read_index(self.root)
        if self.index["num_done"] < self.index["num_images"] and not allow_partial:
            raise UserError(unfinished_store_message(self.root, self.index))
        written = -(-int(self.index["num_done"]) // int(self.index["shard_size"]))  # shards holding samples
        self.shards = list(self.index["shards"][:written])
        absent = [str(self.root / name.format(kind)) for name in self.shards for kind in ("patches", "pooled")
                  if not (self.root / name.format(kind)).is_file()]
        if absent:
            raise UserError(f"feature store {self.root} is damaged: {len(absent)} shard file(s) listed in its "
                            f"{INDEX} are missing, e.g. {absent[0]}; rebuild it into a new --out")
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
            self._arrays = [tuple(np.load(self.root / name.format(kind), mmap_mode="r")  # type: ignore[misc]
                                  for kind in ("patches", "pooled")) for name in self.shards]
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
        view = self.view if self.view is not None else (
            int(torch.randint(self.index["num_views"], ())) if self.index["num_views"] > 1 else 0)
        captions = self.captions[index]
        k = int(torch.randint(len(captions), ())) if self.random_caption and len(captions) > 1 else 0
        sample = {"patches": torch.from_numpy(np.array(patches[row, view])),
                  "pooled": torch.from_numpy(np.array(pooled[row, view])),
                  "caption": captions[k]}
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

    def __init__(self, store: str, batch_size: int = 32, num_workers: int = 0, view: int | None = None,
                 random_caption: bool = True, eval_data: L.LightningDataModule | None = None,
                 allow_partial: bool = False) -> None:
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
            self.train_set = CachedFeaturesDataset(self.store, self.view, self.random_caption,
                                                   allow_partial=self.allow_partial)
            if len(self.train_set) < self.train_set.index["num_images"]:
                log.warning("training on the finished part of the unfinished feature store %s: %d of %d images",
                            self.store, len(self.train_set), self.train_set.index["num_images"])

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_samples)

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
