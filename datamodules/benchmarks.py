"""Evaluation benchmarks on disk: listing their samples, decoding their labels, and a DataModule
serving several at once (the specs and presets are in :mod:`ovseg.datamodules.benchmark_specs`).

Labels are decoded as raw indices (palette PNGs give their indices, never ``convert("L")``),
then ``label_map`` (raw value -> value, e.g. COCO-Object's 255 -> 0) and ``reduce_zero_label``
(0 -> ignore, v -> v-1, as mmseg) are applied, and every value must be a class index or the
ignore index, otherwise a :class:`DataError` names the file. Labels stay at the original
resolution. Files are read by :mod:`ovseg.datamodules.decode`, the project's one decoder: images
come out RGB uint8 with their EXIF orientation applied (as cv2 / mmseg and detectron2 read them;
grayscale, palette, RGBA, CMYK images converted, 16-bit ones scaled by ``>> 8`` as OpenCV does),
labels as raw indices, never re-oriented.

Example (Python)::

    dm = EvaluationDataModule([preset("voc21"), preset("ade20k", max_images=50)], root="data")

Example (YAML, ``--data configs/data/eval_caption8.yaml``)::

    class_path: ovseg.datamodules.EvaluationDataModule
    init_args:
      root: data
      benchmarks:
        - {name: voc21, layout: mmseg, data_root: VOCdevkit/VOC2012, image_dir: JPEGImages, ...}
        - {preset: ade20k, max_images: 50}      # a preset, with overrides
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ovseg.benchmark import Benchmark, check_unique_names
from ovseg.datamodules.base import collate_samples, evaluation_sampler
from ovseg.datamodules.benchmark_specs import BenchmarkSpec
from ovseg.datamodules.decode import DecodeError, decode_image, decode_label
from ovseg.errors import UserError

_MAX_LISTED = 10  # how many offending values / files an error message lists

__all__ = [
    "BenchmarkDataset",
    "DataError",
    "EvaluationDataModule",
    "LabelDecoder",
    "Sample",
    "dataset_for",
    "find_samples",
]


DataError = DecodeError
"""A data file is unreadable or malformed: ``DataError(path, message)`` (``path`` names it, the
message starts with it) or ``DataError("full message")``. The same class as
:class:`ovseg.datamodules.decode.DecodeError`, so ``except DataError`` also catches the decoder's
errors (an unreadable image or label, a multi-channel label)."""


# ------------------------------------------------------------------------------------------ listing
@dataclass(frozen=True)
class Sample:
    """One evaluation sample: image and label paths and the stem that names it."""

    image: Path
    label: Path
    name: str


def _list_files(folder: Path, suffix: str) -> list[str]:
    """Stems (paths relative to ``folder`` without ``suffix``) of the files ending in ``suffix``."""
    stems = []
    for path in folder.rglob(f"*{suffix}"):
        if path.is_file() and not path.name.startswith("."):
            stems.append(path.relative_to(folder).as_posix()[: -len(suffix)])
    return sorted(stems)


def find_samples(
    spec: BenchmarkSpec, root: str | Path | None = None, strict: bool = True
) -> tuple[list[Sample], list[str]]:
    """The samples of a benchmark, and the problems found while listing them.

    Args:
        spec: the benchmark.
        root: the DataModule's root.
        strict: raise on the first kind of problem instead of returning it.

    Returns:
        (samples, problems): samples whose image and label both exist (the first
        ``max_images``), and messages naming each missing folder or file.

    Raises:
        FileNotFoundError: with ``strict``, naming the benchmark and the missing path(s).
    """
    spec = spec.resolved()
    problems: list[str] = []

    def fail(message: str) -> None:
        if strict:
            raise FileNotFoundError(f"benchmark {spec.name!r}: {message}")
        problems.append(message)

    data_dir = spec.data_dir(root)
    if not data_dir.is_dir():
        fail(
            f"data directory {data_dir} does not exist (root={str(root)!r}, "
            f"data_root={spec.data_root!r}); point the DataModule's root at the folder that holds it"
        )
        return [], problems
    image_dir, label_dir = data_dir / spec.image_dir, data_dir / spec.label_dir  # type: ignore[operator]
    missing_dirs = [d for d in (image_dir, label_dir) if not d.is_dir()]
    if missing_dirs:
        fail("missing folder " + " and ".join(str(d) for d in missing_dirs))
        return [], problems
    if spec.split_file is not None:
        split = data_dir / spec.split_file
        if not split.is_file():
            fail(f"split file {split} does not exist")
            return [], problems
        stems = [line.strip() for line in split.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif spec.layout == "mmseg":
        stems = _list_files(image_dir, spec.image_suffix)  # type: ignore[arg-type]
    else:
        stems = _list_files(label_dir, spec.label_suffix)  # type: ignore[arg-type]
    if not stems:
        listed = spec.split_file or (spec.image_dir if spec.layout == "mmseg" else spec.label_dir)
        fail(
            f"no samples: {data_dir / listed} lists no files ending in "
            f"{spec.image_suffix if spec.layout == 'mmseg' and not spec.split_file else spec.label_suffix!r}"
        )
        return [], problems

    samples, missing = [], []
    for stem in stems:
        sample = Sample(image_dir / f"{stem}{spec.image_suffix}", label_dir / f"{stem}{spec.label_suffix}", stem)
        absent = [p for p in (sample.image, sample.label) if not p.is_file()]
        if absent:
            kind = "label" if absent == [sample.label] else "image" if absent == [sample.image] else "image and label"
            missing.append(f"missing {kind} for {stem!r}: " + ", ".join(str(p) for p in absent))
        else:
            samples.append(sample)
    if not strict and spec.split_file is None:  # files no sample uses: harmless to validate, a sign of a bad copy
        if spec.layout == "mmseg":  # samples listed from the images: labels without an image
            other_dir, other_suffix, kind, partner = label_dir, spec.label_suffix, "label", "image"
        else:
            other_dir, other_suffix, kind, partner = image_dir, spec.image_suffix, "image", "label"
        listed = set(stems)
        problems.extend(
            f"orphan {kind} {other_dir / (stem + other_suffix)}: no matching {partner}"  # type: ignore[operator]
            for stem in _list_files(other_dir, other_suffix)
            if stem not in listed
        )  # type: ignore[arg-type]
    if missing:
        if strict:
            shown = "; ".join(missing[:_MAX_LISTED])
            more = f" (and {len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
            raise FileNotFoundError(
                f"benchmark {spec.name!r}: {len(missing)} of {len(stems)} samples incomplete: {shown}{more}"
            )
        problems.extend(missing)
    if spec.max_images is not None:
        samples = samples[: spec.max_images]
    return samples, problems


# ------------------------------------------------------------------------------------------ labels
class LabelDecoder:
    """Raw label values -> class indices, by one lookup table: ``label_map``, then
    ``reduce_zero_label``, then a range check (a class index, or the ignore index).

    Args:
        num_classes: K.
        ignore_index: the value not evaluated (kept as is).
        reduce_zero_label: 0 -> ignore, ignore -> ignore, v -> v-1.
        label_map: raw value -> value, applied first.
        benchmark: its name, for error messages.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        reduce_zero_label: bool = False,
        label_map: dict[int, int] | None = None,
        benchmark: str = "",
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reduce_zero_label = reduce_zero_label
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.benchmark = benchmark
        self._tables: dict[int, np.ndarray] = {}

    def map_values(self, raw: np.ndarray) -> np.ndarray:
        """int64 values after ``label_map`` and ``reduce_zero_label``; no range check."""
        values = raw.astype(np.int64)
        if self.label_map:
            mapped = values.copy()
            for key, value in self.label_map.items():
                mapped[values == key] = value
            values = mapped
        if self.reduce_zero_label:
            reduced = values - 1
            reduced[(values == 0) | (values == self.ignore_index)] = self.ignore_index
            values = reduced
        return values

    def table(self, size: int) -> np.ndarray:
        """(size,) int64: raw value -> class index, or -1 where the value is invalid."""
        if size not in self._tables:
            values = self.map_values(np.arange(size))
            valid = ((values >= 0) & (values < self.num_classes)) | (values == self.ignore_index)
            self._tables[size] = np.where(valid, values, -1)
        return self._tables[size]

    def __call__(self, raw: np.ndarray | torch.Tensor, path: str | Path | None = None) -> np.ndarray:
        """(H, W) int64 class indices of a raw label map.

        Args:
            raw: raw values of any integer dtype, e.g. the int64 of
                :func:`~ovseg.datamodules.decode.decode_label` (a tensor is accepted too).
            path: the label file, for error messages.

        Raises:
            DataError: naming ``path`` and the offending raw values when a value is neither a
                class index nor the ignore index (values outside 0..65535 never are).
        """
        if isinstance(raw, torch.Tensor):
            raw = raw.numpy()
        if raw.dtype == np.uint8:
            size = 256
        elif raw.dtype == np.uint16:
            size = 65536
        elif raw.dtype.kind in "iu":
            low, high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
            if low < 0 or high > 65535:
                self._raise(path, raw[(raw < 0) | (raw > 65535)])
            size = 256 if high < 256 else 65536
        else:
            raise TypeError(f"raw label values must be integers, got dtype {raw.dtype}")
        out = self.table(size)[raw]
        if out.size and out.min() < 0:
            self._raise(path, raw[out < 0])
        return out

    def _raise(self, path: str | Path | None, bad_raw: np.ndarray) -> None:
        values = np.unique(bad_raw).tolist()
        shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
        if len(values) > _MAX_LISTED:
            shown += f", ... ({len(values)} distinct values)"
        steps = []
        if self.label_map:
            steps.append(f"label_map={self.label_map}")
        if self.reduce_zero_label:
            steps.append("reduce_zero_label")
        after = f" after {' and '.join(steps)}" if steps else ""
        name = f"benchmark {self.benchmark!r} has " if self.benchmark else ""
        raise DataError(
            path,
            f"label values [{shown}] are out of range{after}: {name}"
            f"{self.num_classes} classes (valid 0..{self.num_classes - 1}, "
            f"ignore {self.ignore_index}), {int(bad_raw.size)} pixels affected",
        )


# ------------------------------------------------------------------------------------------ dataset
class BenchmarkDataset(Dataset):
    """The samples of one benchmark, decoded at their original resolution.

    Each item is a dict: ``image`` (3, H, W) uint8 RGB, ``label`` (H, W) int64 class indices
    (``ignore_index`` where not evaluated), ``name`` (the sample's stem) and ``index``.

    Args:
        samples: image/label pairs (see :func:`find_samples`).
        decoder: turns raw label values into class indices and checks them.
    """

    def __init__(self, samples: Sequence[Sample], decoder: LabelDecoder) -> None:
        self.samples = list(samples)
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = decode_image(sample.image)
        label = self.decoder(decode_label(sample.label), sample.label)
        if tuple(image.shape[1:]) != label.shape:
            raise DataError(
                sample.label,
                f"label size {label.shape[1]}x{label.shape[0]} differs from "
                f"image {sample.image} size {image.shape[2]}x{image.shape[1]}",
            )
        return {
            "image": image,
            "label": torch.from_numpy(label),
            "name": sample.name,
            "index": index,
        }

    def __repr__(self) -> str:
        return f"BenchmarkDataset({self.decoder.benchmark!r}, {len(self)} samples)"


def dataset_for(
    spec: BenchmarkSpec, root: str | Path | None = None, strict: bool = True, num_classes: int | None = None
) -> tuple[BenchmarkDataset, list[str]]:
    """The dataset of one spec and the listing problems (none when ``strict``: it raises).

    ``num_classes`` defaults to the length of the spec's vocabulary.
    """
    spec = spec.resolved()
    if num_classes is None:
        num_classes = len(spec.vocabulary(root))
    decoder = LabelDecoder(
        num_classes,
        spec.ignore_index,
        spec.reduce_zero_label,  # type: ignore[arg-type]
        spec.label_map,
        spec.name or "",
    )
    samples, problems = find_samples(spec, root, strict=strict)
    return BenchmarkDataset(samples, decoder), problems


# ------------------------------------------------------------------------------------------ datamodule
class EvaluationDataModule(L.LightningDataModule):
    """Several evaluation benchmarks at once: one val/test/predict dataloader per benchmark.

    ``self.benchmarks`` (one :class:`~ovseg.benchmark.Benchmark` per dataloader, in order) carries
    each benchmark's vocabulary, inference settings and metric convention to
    :class:`~ovseg.module.OVSegModule`. Vocabularies are built at construction (a missing
    class-name file fails at once); folders are listed in :meth:`setup` (a missing root or file
    fails there, naming the benchmark and the path); labels are checked as they are loaded.

    Args:
        benchmarks: the specs (a preset name alone, ``"voc21"``, is accepted too).
        root: the folder the specs' ``data_root`` are relative to (default: the working dir).
        batch_size: images per batch; images of different sizes arrive as lists.
        num_workers: dataloader worker processes.
        pin_memory: pin batches in page-locked memory.
        max_images: if set, caps every benchmark's number of samples (quick runs).
        select: if set, keep only the benchmarks with these names (in the given order).
    """

    def __init__(
        self,
        benchmarks: list[BenchmarkSpec | str],
        root: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_images: int | None = None,
        select: list[str] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {num_workers}")
        specs = [BenchmarkSpec(preset=s) if isinstance(s, str) else s for s in benchmarks]
        specs = [s.resolved() for s in specs]
        if max_images is not None:
            specs = [replace(s, max_images=min(max_images, s.max_images or max_images)) for s in specs]
        if select is not None:
            by_name = {s.name: s for s in specs}
            unknown = [n for n in select if n not in by_name]
            if unknown:
                raise UserError(f"select names unknown benchmarks {unknown}; known: {list(by_name)}")
            specs = [by_name[n] for n in select]
        if not specs:
            raise UserError("EvaluationDataModule needs at least one benchmark")
        self.specs: list[BenchmarkSpec] = specs
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.benchmarks: list[Benchmark] = [spec.benchmark(root) for spec in specs]
        check_unique_names(self.benchmarks)
        self.datasets: list[BenchmarkDataset] | None = None

    def setup(self, stage: str | None = None) -> None:
        """List every benchmark's files (raises naming the benchmark and path on a missing one)."""
        if self.datasets is None:
            self.datasets = [
                dataset_for(spec, self.root, num_classes=len(benchmark.vocabulary))[0]
                for spec, benchmark in zip(self.specs, self.benchmarks)
            ]

    def _loaders(self) -> list[DataLoader]:
        self.setup()
        assert self.datasets is not None
        return [
            DataLoader(
                dataset,
                batch_size=self.batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                sampler=evaluation_sampler(dataset, self.trainer),
                pin_memory=self.pin_memory,
                collate_fn=collate_samples,
                persistent_workers=self.num_workers > 0,
            )
            for dataset in self.datasets
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders()

    def predict_dataloader(self) -> list[DataLoader]:
        return self._loaders()

    @property
    def names(self) -> list[str]:
        """The benchmark names, in dataloader order."""
        return [benchmark.name for benchmark in self.benchmarks]

    def __repr__(self) -> str:
        return f"EvaluationDataModule(root={self.root!r}, benchmarks={self.names})"
