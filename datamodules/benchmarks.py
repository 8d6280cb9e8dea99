"""Evaluation benchmarks on disk: specs, presets, decoding, and a DataModule serving several at once.

The facts behind the presets are in ``../shared/reference/eval_protocol.md``:

* **Caption-trained / training-free protocol** (GroupViT, TCL, SCLIP, NACLIP, ClearCLIP, SimZSS;
  mmsegmentation folder layouts under a root such as ``data/``): VOC-21, VOC-20, Context-60,
  Context-59, COCO-Object-81, COCO-Stuff-171, Cityscapes-19, ADE20K-150 with the class-name files
  shipped in ``ovseg/resources/class_names`` (SCLIP's files).
* **Mask-supervised protocol** (ZegFormer, SAN, CAT-Seg, FC-CLIP, MAFT+; detectron2 layouts under a
  root such as ``$DETECTRON2_DATASETS``, default ``datasets/``): ADE-847, PC-459, ADE-150, PC-59,
  PASCAL-20. A-847 and PC-459 labels are 16-bit TIFF with ignore value 65535 (kept as the
  benchmark's ``ignore_index``, since 255 is a real class there). ovseg ships no class names for
  them: give ``class_names`` as a file, one class per line in label order (synonyms after the
  name, separated by ", "); by default ``ade847.txt`` / ``pc459.txt`` is looked up in the
  benchmark's data directory, then in the root.

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

    class_path: ovseg.datamodules.benchmarks.EvaluationDataModule
    init_args:
      root: data
      benchmarks:
        - {name: voc21, layout: mmseg, data_root: VOCdevkit/VOC2012, image_dir: JPEGImages, ...}
        - {preset: ade20k, max_images: 50}      # a preset, with overrides
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ovseg.benchmark import AbsentPolicy, Benchmark, check_unique_names
from ovseg.datamodules.common import collate_samples, evaluation_sampler
from ovseg.datamodules.decode import DecodeError, decode_image, decode_label
from ovseg.errors import UserError
from ovseg.inference import InferenceSettings
from ovseg.vocabulary import Vocabulary, packaged_text, parse_class_names, resolve_templates

log = logging.getLogger(__name__)

Layout = Literal["mmseg", "detectron2"]
LAYOUTS: tuple[str, ...] = ("mmseg", "detectron2")
_MAX_LISTED = 10  # how many offending values / files an error message lists

__all__ = [
    "CAPTION_BENCHMARKS",
    "MASK_BENCHMARKS",
    "PRESETS",
    "BenchmarkDataset",
    "BenchmarkSpec",
    "DataError",
    "EvaluationDataModule",
    "LabelDecoder",
    "Sample",
    "find_samples",
    "preset",
]


DataError = DecodeError
"""A data file is unreadable or malformed: ``DataError(path, message)`` (``path`` names it, the
message starts with it) or ``DataError("full message")``. The same class as
:class:`ovseg.datamodules.decode.DecodeError`, so ``except DataError`` also catches the decoder's
errors (an unreadable image or label, a multi-channel label)."""


# ------------------------------------------------------------------------------------------ spec
@dataclass
class BenchmarkSpec:
    """Where a benchmark lives on disk, how its labels are decoded, and how it is evaluated.

    With ``preset`` set, every field left at ``None`` takes the preset's value (see
    :data:`PRESETS`); without a preset, ``None`` means the generic default listed below.

    Attributes:
        name: metric key, ``val/<name>/mIoU`` (default: the preset's name).
        preset: a standard benchmark to start from, e.g. ``"voc21"`` or ``"ade847"``.
        layout: ``"mmseg"`` (samples listed from ``split_file``, else every image under
            ``image_dir``; a label per image is required) or ``"detectron2"`` (samples listed from
            ``split_file``, else every label under ``label_dir``; an image per label is required,
            as detectron2's ``load_sem_seg`` pairs them by file stem). Default ``"mmseg"``.
        data_root: the benchmark's folder, relative to the DataModule's ``root`` (or absolute).
            Default ``"."``.
        image_dir, label_dir: relative to ``data_root``. Default ``images/validation`` and
            ``annotations/validation`` (the ADE20K / ``ovseg data make-synthetic`` layout).
        split_file: relative to ``data_root``; one sample stem per line (relative to
            ``image_dir``/``label_dir``, without suffix). Default: none, list the folder.
        image_suffix, label_suffix: file-name endings, e.g. ``"_leftImg8bit.png"``,
            ``"_gtFine_labelTrainIds.png"``. Default ``.jpg`` / ``.png``.
        class_names: ``"packaged:voc21"`` or a class-name file (one class per line, synonyms
            separated by ", "). A relative path is looked up in the data directory, then in the
            root, then in the working directory. Required without a preset.
        num_classes: expected number of classes; the class-name file must have exactly this many.
        reduce_zero_label: mmseg's 0 -> ignore, v -> v-1 (ADE20K-150, VOC-20, Context-59).
        label_map: raw label value -> value, applied before ``reduce_zero_label``
            (COCO-Object: ``{255: 0}``; CAT-Seg-style PC-459 files: ``{459: 65535}``).
        templates: ``"single"``, ``"imagenet80"`` or a list of templates with one ``{}`` each.
        background_threshold: class 0 is background, predicted where the best class probability
            is below this value (``None``: no background rule).
        short_side, max_long_side, window, stride: resize and sliding-window settings
            (:class:`~ovseg.inference.InferenceSettings`); default: native size, long side capped
            at 2048, whole image.
        inference: a full :class:`InferenceSettings`; when given it replaces the four fields above
            (the way to switch a preset's window off: ``inference: {short_side: 448}``).
        absent_policy: ``"zero"`` (mmseg, detectron2 v0.6, ZegFormer, MAFT+) or ``"exclude"``
            (detectron2 main, CAT-Seg, FC-CLIP). Default ``"zero"``.
        unseen_classes: names of the unseen classes of a zero-shot split (seen/unseen/h-IoU).
        ignore_index: label value that is not evaluated. Default 255.
        max_images: evaluate only the first N samples (sorted by name), for quick runs.
    """

    name: str | None = None
    preset: str | None = None
    layout: Layout | None = None
    data_root: str | None = None
    image_dir: str | None = None
    label_dir: str | None = None
    split_file: str | None = None
    image_suffix: str | None = None
    label_suffix: str | None = None
    class_names: str | None = None
    num_classes: int | None = None
    reduce_zero_label: bool | None = None
    label_map: dict[int, int] | None = None
    templates: str | list[str] | None = None
    background_threshold: float | None = None
    short_side: int | None = None
    max_long_side: int | None = None
    window: int | None = None
    stride: int | None = None
    inference: InferenceSettings | None = None
    absent_policy: AbsentPolicy | None = None
    unseen_classes: list[str] | None = None
    ignore_index: int | None = None
    max_images: int | None = None

    def resolved(self) -> BenchmarkSpec:
        """A copy with the preset merged in and every generic default filled; validated."""
        spec = self
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise UserError(
                    f"unknown benchmark preset {self.preset!r}; known presets: {sorted(PRESETS)}"
                )
            base = copy.deepcopy(PRESETS[self.preset])  # presets hold lists and dicts
            overrides = {f.name: getattr(self, f.name) for f in fields(self)
                         if getattr(self, f.name) is not None}
            spec = replace(base, **overrides)
        defaults = {f.name: v for f, v in ((f, _GENERIC_DEFAULTS.get(f.name)) for f in fields(spec))
                    if v is not None and getattr(spec, f.name) is None}
        spec = replace(spec, **defaults)
        if spec.name is None:
            raise UserError("a benchmark spec needs a name (or a preset, whose name it takes)")
        if spec.layout not in LAYOUTS:
            raise UserError(f"benchmark {spec.name!r}: layout must be one of {LAYOUTS}, got {spec.layout!r}")
        if spec.class_names is None:
            raise UserError(
                f"benchmark {spec.name!r}: class_names is required ('packaged:NAME' or a file with "
                "one class per line)"
            )
        if spec.max_images is not None and spec.max_images < 1:
            raise UserError(f"benchmark {spec.name!r}: max_images must be >= 1, got {spec.max_images}")
        if spec.num_classes is not None and spec.num_classes < 1:
            raise UserError(f"benchmark {spec.name!r}: num_classes must be >= 1, got {spec.num_classes}")
        if spec.ignore_index is not None and spec.ignore_index < 0:
            raise UserError(f"benchmark {spec.name!r}: ignore_index must be >= 0, got {spec.ignore_index}")
        for key, value in (spec.label_map or {}).items():
            if int(key) < 0 or int(value) < 0:
                raise UserError(f"benchmark {spec.name!r}: label_map entries must be >= 0, got {key}: {value}")
        return spec

    def inference_settings(self) -> InferenceSettings:
        """The resize / sliding-window settings (``inference`` if given, else the four fields)."""
        spec = self.resolved()
        if spec.inference is not None:
            return spec.inference
        return InferenceSettings(short_side=spec.short_side, max_long_side=spec.max_long_side,
                                 window=spec.window, stride=spec.stride)

    def data_dir(self, root: str | Path | None = None) -> Path:
        """The benchmark's folder: ``root / data_root`` (``data_root`` alone if absolute)."""
        spec = self.resolved()
        return Path(root or ".") / spec.data_root  # type: ignore[operator]

    def class_names_path(self, root: str | Path | None = None) -> str:
        """``packaged:NAME`` as is, else the first existing candidate path of the class-name file.

        Raises:
            FileNotFoundError: naming the benchmark and every path tried.
        """
        spec = self.resolved()
        names = str(spec.class_names)
        if names.startswith("packaged:"):
            return names
        path = Path(names).expanduser()
        if path.is_absolute():
            candidates = [path]
        else:
            candidates = [self.data_dir(root) / path]
            if root is not None:
                candidates.append(Path(root) / path)
            candidates.append(path)
        for candidate in candidates:
            if candidate.is_file():
                return str(candidate)
        tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
        data_dir = self.data_dir(root)
        missing_dir = "" if path.is_absolute() or data_dir.is_dir() else (
            f" (the data directory {data_dir} does not exist: root={str(root)!r}, "
            f"data_root={spec.data_root!r}; point the DataModule's root at the folder that holds it)")
        raise FileNotFoundError(
            f"benchmark {spec.name!r}: class-name file {names!r} not found (tried {tried}){missing_dir}; "
            "give class_names as 'packaged:NAME' or a file with one class per line"
        )

    def vocabulary(self, root: str | Path | None = None) -> Vocabulary:
        """The benchmark's :class:`Vocabulary` (class names, templates, background threshold)."""
        spec = self.resolved()
        source = self.class_names_path(root)
        if source.startswith("packaged:"):
            try:
                text = packaged_text(f"class_names/{source.removeprefix('packaged:')}.txt")
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"benchmark {spec.name!r}: no packaged class-name file {source!r} (shipped: "
                    "voc20, voc21, context59, context60, coco_object, coco_stuff, city_scapes, ade20k)"
                ) from None
        else:
            text = Path(source).read_text(encoding="utf-8")
        classes = list(parse_class_names(text.splitlines()))
        if spec.background_threshold is not None and classes:
            classes[0] = _drop_shared_names(classes, spec.name, source)
        try:
            vocabulary = Vocabulary(tuple(classes), resolve_templates(spec.templates),  # type: ignore[arg-type]
                                    spec.background_threshold)
        except ValueError as error:
            raise UserError(f"benchmark {spec.name!r}, class names {source}: {error}") from None
        if spec.num_classes is not None and len(vocabulary) != spec.num_classes:
            raise UserError(
                f"benchmark {spec.name!r}: class-name file {source} has {len(vocabulary)} classes, "
                f"expected {spec.num_classes}"
            )
        return vocabulary

    def benchmark(self, root: str | Path | None = None) -> Benchmark:
        """The :class:`~ovseg.benchmark.Benchmark` the model evaluates with."""
        spec = self.resolved()
        return Benchmark(
            name=spec.name,  # type: ignore[arg-type]
            vocabulary=self.vocabulary(root),
            inference=self.inference_settings(),
            absent_policy=spec.absent_policy,  # type: ignore[arg-type]
            unseen_classes=tuple(spec.unseen_classes or ()),
            ignore_index=spec.ignore_index,  # type: ignore[arg-type]
        )


_GENERIC_DEFAULTS: dict[str, Any] = {
    "layout": "mmseg",
    "data_root": ".",
    "image_dir": "images/validation",
    "label_dir": "annotations/validation",
    "image_suffix": ".jpg",
    "label_suffix": ".png",
    "reduce_zero_label": False,
    "templates": "single",
    "max_long_side": 2048,
    "absent_policy": "zero",
    "unseen_classes": [],
    "ignore_index": 255,
}


_WARNED: set[tuple[str | None, str]] = set()


def _drop_shared_names(classes: list[tuple[str, ...]], name: str | None, source: str) -> tuple[str, ...]:
    """Class 0's names without those that also name another class.

    SCLIP's COCO-Object file lists "bed" both among the background names and as a class; a
    :class:`Vocabulary` forbids a name in two classes, so the background keeps the other names.
    """
    others = {n for names in classes[1:] for n in names}
    shared = [n for n in classes[0] if n in others]
    if shared and (name, source) not in _WARNED:
        _WARNED.add((name, source))
        log.warning("benchmark %r (%s): background names %s also name other classes; they are "
                    "dropped from the background", name, source, shared)
    return tuple(n for n in classes[0] if n not in others)


# ------------------------------------------------------------------------------------------ presets
def _caption(name: str, **kwargs: Any) -> BenchmarkSpec:
    """Caption-trained protocol: mmseg layout; TCL/GroupViT geometry (short side 448, window 448,
    stride 224); 80 ImageNet templates; ClearCLIP background thresholds (see configs/data)."""
    settings: dict[str, Any] = dict(layout="mmseg", templates="imagenet80", short_side=448,
                                    max_long_side=2048, window=448, stride=224, absent_policy="zero",
                                    ignore_index=255, image_suffix=".jpg", label_suffix=".png",
                                    reduce_zero_label=False)
    settings.update(kwargs)
    return BenchmarkSpec(name=name, **settings)


def _mask(name: str, **kwargs: Any) -> BenchmarkSpec:
    """Mask-supervised protocol: detectron2 layout (CAT-Seg style paths); ZegFormer test size
    (short side 640, long side <= 2560, whole image); ZegFormer's prompt; old-formula mIoU."""
    settings: dict[str, Any] = dict(layout="detectron2", templates=list(ZEGFORMER_SINGLE),
                                    short_side=640, max_long_side=2560, absent_policy="zero",
                                    ignore_index=255, image_suffix=".jpg", label_suffix=".png",
                                    reduce_zero_label=False)
    settings.update(kwargs)
    return BenchmarkSpec(name=name, **settings)


ZEGFORMER_SINGLE: tuple[str, ...] = ("A photo of a {} in the scene",)
"""ZegFormer's ``PROMPT_ENSEMBLE_TYPE: single`` template (zegformer.md, 1.3)."""
ZEGFORMER_IMAGENET_SELECT: tuple[str, ...] = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
    "A photo of a {} in the scene",
)
"""ZegFormer's ``imagenet_select`` templates, used by its ADE-847 config (zegformer.md, 1.3)."""

_VOC12 = dict(data_root="VOCdevkit/VOC2012", image_dir="JPEGImages", label_dir="SegmentationClass",
              split_file="ImageSets/Segmentation/val.txt")
_CONTEXT = dict(data_root="VOCdevkit/VOC2010", image_dir="JPEGImages",
                label_dir="SegmentationClassContext", split_file="ImageSets/SegmentationContext/val.txt")
_COCO164K = dict(data_root="coco_stuff164k", image_dir="images/val2017", label_dir="annotations/val2017")

PRESETS: dict[str, BenchmarkSpec] = {
    # ---- caption-trained protocol (mmseg layouts under e.g. data/, TCL README)
    "voc21": _caption("voc21", **_VOC12, class_names="packaged:voc21", num_classes=21,
                      background_threshold=0.5),
    "voc20": _caption("voc20", **_VOC12, class_names="packaged:voc20", num_classes=20,
                      reduce_zero_label=True),
    "context60": _caption("context60", **_CONTEXT, class_names="packaged:context60", num_classes=60,
                          background_threshold=0.15),
    "context59": _caption("context59", **_CONTEXT, class_names="packaged:context59", num_classes=59,
                          reduce_zero_label=True),
    "coco_object": _caption("coco_object", **_COCO164K, label_suffix="_instanceTrainIds.png",
                            class_names="packaged:coco_object", num_classes=81, label_map={255: 0},
                            background_threshold=0.4),
    "coco_stuff": _caption("coco_stuff", **_COCO164K, label_suffix="_labelTrainIds.png",
                           class_names="packaged:coco_stuff", num_classes=171),
    "cityscapes": _caption("cityscapes", data_root="cityscapes", image_dir="leftImg8bit/val",
                           label_dir="gtFine/val", image_suffix="_leftImg8bit.png",
                           label_suffix="_gtFine_labelTrainIds.png", class_names="packaged:city_scapes",
                           num_classes=19),
    "ade20k": _caption("ade20k", data_root="ade/ADEChallengeData2016", image_dir="images/validation",
                       label_dir="annotations/validation", class_names="packaged:ade20k",
                       num_classes=150, reduce_zero_label=True),
    # ---- mask-supervised protocol (detectron2 layouts under e.g. $DETECTRON2_DATASETS)
    "ade847": _mask("ade847", data_root="ADE20K_2021_17_01", image_dir="images_detectron2/validation",
                    label_dir="annotations_detectron2/validation", label_suffix=".tif",
                    class_names="ade847.txt", num_classes=847, ignore_index=65535,
                    templates=list(ZEGFORMER_IMAGENET_SELECT)),
    "pc459": _mask("pc459", data_root="VOCdevkit/VOC2010", image_dir="JPEGImages",
                   label_dir="annotations_detectron2/pc459_val", label_suffix=".tif",
                   class_names="pc459.txt", num_classes=459, ignore_index=65535),
    "ade150": _mask("ade150", data_root="ADEChallengeData2016", image_dir="images/validation",
                    label_dir="annotations_detectron2/validation", class_names="packaged:ade20k",
                    num_classes=150),
    "pc59": _mask("pc59", data_root="VOCdevkit/VOC2010", image_dir="JPEGImages",
                  label_dir="annotations_detectron2/pc59_val", class_names="packaged:context59",
                  num_classes=59),
    "pas20": _mask("pas20", data_root="VOCdevkit/VOC2012", image_dir="JPEGImages",
                   label_dir="annotations_detectron2/val", class_names="packaged:voc20", num_classes=20),
}
"""The standard benchmarks; ``configs/data/eval_caption8.yaml`` and ``eval_mask5.yaml`` spell them out."""

CAPTION_BENCHMARKS: tuple[str, ...] = ("voc21", "context60", "coco_object", "voc20", "context59",
                                       "coco_stuff", "cityscapes", "ade20k")
MASK_BENCHMARKS: tuple[str, ...] = ("ade847", "pc459", "ade150", "pc59", "pas20")


def preset(name: str, **overrides: Any) -> BenchmarkSpec:
    """The spec of a standard benchmark, with ``overrides`` (e.g. ``max_images=10``), resolved."""
    return BenchmarkSpec(preset=name, **overrides).resolved()


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


def find_samples(spec: BenchmarkSpec, root: str | Path | None = None, strict: bool = True
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
        fail(f"data directory {data_dir} does not exist (root={str(root)!r}, "
             f"data_root={spec.data_root!r}); point the DataModule's root at the folder that holds it")
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
        fail(f"no samples: {data_dir / listed} lists no files ending in "
             f"{spec.image_suffix if spec.layout == 'mmseg' and not spec.split_file else spec.label_suffix!r}")
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
        problems.extend(f"orphan {kind} {other_dir / (stem + other_suffix)}: no matching {partner}"  # type: ignore[operator]
                        for stem in _list_files(other_dir, other_suffix) if stem not in listed)  # type: ignore[arg-type]
    if missing:
        if strict:
            shown = "; ".join(missing[:_MAX_LISTED])
            more = f" (and {len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
            raise FileNotFoundError(f"benchmark {spec.name!r}: {len(missing)} of {len(stems)} samples "
                                    f"incomplete: {shown}{more}")
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

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False,
                 label_map: dict[int, int] | None = None, benchmark: str = "") -> None:
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
        raise DataError(path, f"label values [{shown}] are out of range{after}: {name}"
                              f"{self.num_classes} classes (valid 0..{self.num_classes - 1}, "
                              f"ignore {self.ignore_index}), {int(bad_raw.size)} pixels affected")


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
            raise DataError(sample.label, f"label size {label.shape[1]}x{label.shape[0]} differs from "
                                          f"image {sample.image} size {image.shape[2]}x{image.shape[1]}")
        return {
            "image": image,
            "label": torch.from_numpy(label),
            "name": sample.name,
            "index": index,
        }

    def __repr__(self) -> str:
        return f"BenchmarkDataset({self.decoder.benchmark!r}, {len(self)} samples)"


def dataset_for(spec: BenchmarkSpec, root: str | Path | None = None, strict: bool = True,
                num_classes: int | None = None) -> tuple[BenchmarkDataset, list[str]]:
    """The dataset of one spec and the listing problems (none when ``strict``: it raises).

    ``num_classes`` defaults to the length of the spec's vocabulary.
    """
    spec = spec.resolved()
    if num_classes is None:
        num_classes = len(spec.vocabulary(root))
    decoder = LabelDecoder(num_classes, spec.ignore_index, spec.reduce_zero_label,  # type: ignore[arg-type]
                           spec.label_map, spec.name or "")
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
            self.datasets = [dataset_for(spec, self.root, num_classes=len(benchmark.vocabulary))[0]
                             for spec, benchmark in zip(self.specs, self.benchmarks)]

    def _loaders(self) -> list[DataLoader]:
        self.setup()
        assert self.datasets is not None
        return [
            DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                       sampler=evaluation_sampler(dataset, self.trainer),
                       pin_memory=self.pin_memory, collate_fn=collate_samples,
                       persistent_workers=self.num_workers > 0)
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


def specs_by_name(names: Iterable[str], **overrides: Any) -> list[BenchmarkSpec]:
    """Resolved preset specs for ``names`` (each with the same ``overrides``)."""
    return [preset(name, **overrides) for name in names]
