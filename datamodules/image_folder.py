"""``ImageFolderDataModule``: your own images, any vocabulary, for ``ovseg predict``.

Example::

    ovseg predict -c configs/experiment/smoke.yaml --ckpt_path runs/smoke/checkpoints/last.ckpt \\
        --data ovseg.datamodules.ImageFolderDataModule \\
        --data.init_args.images photos/ --data.init_args.classes "sky,grass,a red car"

Images: a folder (every image file under it, recursively), a glob (``"photos/*.jpg"``), or a list
of files / folders / globs. Any size and any format the project's decoder reads
(:func:`ovseg.datamodules.decode.decode_image`: EXIF orientation applied, grayscale / palette /
alpha / 16-bit converted to 8-bit RGB); images keep their own size (batches of mixed sizes arrive
as lists). Each image is named by its path relative to the common folder of all images, without
the suffix (``a/b.jpg`` -> ``a/b``; the suffix is kept, as ``b_jpg``, where two files would
otherwise share a name).

Classes: a string of comma-separated names (``"sky,grass,a red car"``; ``|`` separates the
synonyms of one class: ``"sky,tv|monitor"``), a class-name file (one class per line, synonyms
separated by ``", "``, as the benchmark files), ``packaged:NAME`` for a list shipped with ovseg
(e.g. ``packaged:ade20k``), or a list (each entry a name or a ``"tv, monitor"`` synonym string).
Templates and background threshold work as for benchmarks.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from ovseg.benchmark import Benchmark
from ovseg.datamodules.base import collate_samples, evaluation_sampler
from ovseg.datamodules.decode import decode_image
from ovseg.inference import InferenceSettings
from ovseg.vocabulary import Vocabulary

#: file suffixes listed when a folder is given (any file may be given explicitly)
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jp2", ".jfif"}
)

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataModule", "ImageListDataset", "find_images", "image_names", "parse_classes"]


def find_images(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files of a folder, a glob, a file, or a list of these (sorted within each entry,
    in the order given across entries, each file once).

    Raises:
        FileNotFoundError: naming an entry that matches no image file.
    """
    entries = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not entries:
        raise FileNotFoundError("no images given: pass a folder, a glob or a list of image files")
    found: dict[Path, None] = {}
    for entry in entries:
        text = os.path.expanduser(os.fspath(entry))
        path = Path(text)
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise FileNotFoundError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.is_file():
            files = [path]
        elif glob.has_magic(text):
            files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not files:
                raise FileNotFoundError(f"the pattern {text!r} matches no file")
        else:
            raise FileNotFoundError(f"image {text} does not exist (give a folder, a glob or image files)")
        found.update(dict.fromkeys(files))
    return list(found)


def image_names(paths: Sequence[Path]) -> list[str]:
    """Unique output names: the path relative to the folder common to all, without suffix (with the
    suffix as ``_ext`` where two files would share a name)."""
    absolute = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([p.parent for p in absolute])) if absolute else Path(".")
    stems = [p.relative_to(root).with_suffix("").as_posix() for p in absolute]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    return [stem if counts[stem] == 1 else f"{stem}_{p.suffix.lstrip('.').lower()}" for stem, p in zip(stems, absolute)]


def parse_classes(classes: str | Sequence[str]) -> list[str | tuple[str, ...]]:
    """Class entries for :meth:`Vocabulary.from_names` (see the module docstring)."""
    if not isinstance(classes, str):
        return list(classes)
    text = classes.strip()
    if text.startswith("packaged:") or Path(text).expanduser().is_file():
        return [
            names
            for names in Vocabulary.from_file(
                Path(text).expanduser() if not text.startswith("packaged:") else text
            ).classes
        ]
    entries = [tuple(name.strip() for name in entry.split("|") if name.strip()) for entry in text.split(",")]
    return [entry for entry in entries if entry]


class ImageListDataset(Dataset):
    """Image files decoded at their own size: items ``image`` (3, H, W) uint8 RGB, ``name``,
    ``path`` and ``index``."""

    def __init__(self, paths: Sequence[Path], names: Sequence[str] | None = None) -> None:
        self.paths = list(paths)
        self.names = list(names) if names is not None else image_names(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        return {"image": decode_image(path), "name": self.names[index], "path": str(path), "index": index}


class ImageFolderDataModule(L.LightningDataModule):
    """Images from disk with a vocabulary given on the command line, for ``ovseg predict``.

    ``self.benchmarks`` holds one :class:`~ovseg.benchmark.Benchmark` (the vocabulary and inference
    settings :class:`~ovseg.module.OVSegModule` reads); no labels, so predict only.

    Args:
        images: a folder, a glob, an image file, or a list of these.
        classes: the class names (see the module docstring).
        templates: ``"single"``, ``"imagenet80"`` or a list of templates with one ``{}`` each.
        background_threshold: class 0 is background, predicted where the best class probability
            is below this value (``None``: no background rule).
        short_side, max_long_side, window, stride: resize and sliding-window settings
            (:class:`~ovseg.inference.InferenceSettings`; default: native size, long side <= 2048).
        batch_size: images per batch (images of different sizes run one size group at a time).
        num_workers: dataloader worker processes decoding images.
        name: the benchmark name (a sub-folder of the writer's output only with several dataloaders).
    """

    def __init__(
        self,
        images: str | list[str],
        classes: str | list[str],
        templates: str | list[str] = "single",
        background_threshold: float | None = None,
        short_side: int | None = None,
        max_long_side: int | None = 2048,
        window: int | None = None,
        stride: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        name: str = "images",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.paths = find_images(images)
        vocabulary = Vocabulary.from_names(parse_classes(classes), templates, background_threshold)
        inference = InferenceSettings(short_side=short_side, max_long_side=max_long_side, window=window, stride=stride)
        self.benchmarks = [Benchmark(name, vocabulary, inference)]
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataset = ImageListDataset(self.paths)

    @property
    def vocabulary(self) -> Vocabulary:
        return self.benchmarks[0].vocabulary

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            sampler=evaluation_sampler(self.dataset, self.trainer),
            collate_fn=collate_samples,
            persistent_workers=False,
        )

    def __repr__(self) -> str:
        return f"ImageFolderDataModule({len(self.paths)} images, classes={list(self.vocabulary.display_names)})"
