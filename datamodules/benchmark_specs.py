"""Evaluation benchmarks on disk: the spec of a benchmark (where it lives, how it is decoded and
evaluated) and the presets of the standard benchmarks.

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

The datasets and the DataModule that read the specs are in :mod:`ovseg.datamodules.benchmarks`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from ovseg.benchmark import AbsentPolicy, Benchmark
from ovseg.errors import UserError
from ovseg.inference import InferenceSettings
from ovseg.vocabulary import (
    Vocabulary,
    packaged_text,
    parse_class_names,
    resolve_templates,
)

log = logging.getLogger(__name__)

Layout = Literal["mmseg", "detectron2"]
LAYOUTS: tuple[str, ...] = ("mmseg", "detectron2")

__all__ = [
    "CAPTION_BENCHMARKS",
    "LAYOUTS",
    "MASK_BENCHMARKS",
    "PRESETS",
    "BenchmarkSpec",
    "preset",
    "specs_by_name",
]


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
        name_swap_control: also report the unseen mIoU with the unseen names permuted among
            themselves and the zero-shot margin (:class:`~ovseg.benchmark.Benchmark`). Default off.
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
    name_swap_control: bool | None = None
    ignore_index: int | None = None
    max_images: int | None = None

    def resolved(self) -> BenchmarkSpec:
        """A copy with the preset merged in and every generic default filled; validated."""
        spec = self
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise UserError(f"unknown benchmark preset {self.preset!r}; known presets: {sorted(PRESETS)}")
            base = copy.deepcopy(PRESETS[self.preset])  # presets hold lists and dicts
            overrides = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
            spec = replace(base, **overrides)
        defaults = {
            f.name: v
            for f, v in ((f, _GENERIC_DEFAULTS.get(f.name)) for f in fields(spec))
            if v is not None and getattr(spec, f.name) is None
        }
        spec = replace(spec, **defaults)
        if spec.name is None:
            raise UserError("a benchmark spec needs a name (or a preset, whose name it takes)")
        if spec.layout not in LAYOUTS:
            raise UserError(f"benchmark {spec.name!r}: layout must be one of {LAYOUTS}, got {spec.layout!r}")
        if spec.class_names is None:
            raise UserError(
                f"benchmark {spec.name!r}: class_names is required ('packaged:NAME' or a file with one class per line)"
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
        return InferenceSettings(
            short_side=spec.short_side, max_long_side=spec.max_long_side, window=spec.window, stride=spec.stride
        )

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
        missing_dir = (
            ""
            if path.is_absolute() or data_dir.is_dir()
            else (
                f" (the data directory {data_dir} does not exist: root={str(root)!r}, "
                f"data_root={spec.data_root!r}; point the DataModule's root at the folder that holds it)"
            )
        )
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
            vocabulary = Vocabulary(
                tuple(classes),
                resolve_templates(spec.templates),  # type: ignore[arg-type]
                spec.background_threshold,
            )
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
            name_swap_control=bool(spec.name_swap_control),
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
    "name_swap_control": False,
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
        log.warning(
            "benchmark %r (%s): background names %s also name other classes; they are dropped from the background",
            name,
            source,
            shared,
        )
    return tuple(n for n in classes[0] if n not in others)


# ------------------------------------------------------------------------------------------ presets
#: settings shared by both protocols' presets (old-formula mIoU, ignore 255, JPEG images, PNG labels)
_COMMON: dict[str, Any] = dict(
    absent_policy="zero", ignore_index=255, image_suffix=".jpg", label_suffix=".png", reduce_zero_label=False
)


def _caption(name: str, **kwargs: Any) -> BenchmarkSpec:
    """Caption-trained protocol: mmseg layout; TCL/GroupViT geometry (short side 448, window 448,
    stride 224); 80 ImageNet templates; ClearCLIP background thresholds (see configs/data)."""
    settings: dict[str, Any] = dict(
        layout="mmseg",
        templates="imagenet80",
        short_side=448,
        max_long_side=2048,
        window=448,
        stride=224,
        **_COMMON,
    )
    settings.update(kwargs)
    return BenchmarkSpec(name=name, **settings)


def _mask(name: str, **kwargs: Any) -> BenchmarkSpec:
    """Mask-supervised protocol: detectron2 layout (CAT-Seg style paths); ZegFormer test size
    (short side 640, long side <= 2560, whole image); ZegFormer's prompt; old-formula mIoU."""
    settings: dict[str, Any] = dict(
        layout="detectron2",
        templates=list(ZEGFORMER_SINGLE),
        short_side=640,
        max_long_side=2560,
        **_COMMON,
    )
    settings.update(kwargs)
    return BenchmarkSpec(name=name, **settings)


ZEGFORMER_SINGLE: tuple[str, ...] = ("A photo of a {} in the scene",)
"""ZegFormer's ``PROMPT_ENSEMBLE_TYPE: single`` template (zegformer.md, 1.3)."""
ZEGFORMER_IMAGENET_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "A photo of a {} in the scene",
)
"""ZegFormer's ``imagenet_select`` templates, used by its ADE-847 config (zegformer.md, 1.3)."""

_VOC12 = dict(
    data_root="VOCdevkit/VOC2012",
    image_dir="JPEGImages",
    label_dir="SegmentationClass",
    split_file="ImageSets/Segmentation/val.txt",
)
_CONTEXT = dict(
    data_root="VOCdevkit/VOC2010",
    image_dir="JPEGImages",
    label_dir="SegmentationClassContext",
    split_file="ImageSets/SegmentationContext/val.txt",
)
_COCO164K = dict(data_root="coco_stuff164k", image_dir="images/val2017", label_dir="annotations/val2017")

PRESETS: dict[str, BenchmarkSpec] = {
    # ---- caption-trained protocol (mmseg layouts under e.g. data/, TCL README)
    "voc21": _caption("voc21", **_VOC12, class_names="packaged:voc21", num_classes=21, background_threshold=0.5),
    "voc20": _caption("voc20", **_VOC12, class_names="packaged:voc20", num_classes=20, reduce_zero_label=True),
    "context60": _caption(
        "context60", **_CONTEXT, class_names="packaged:context60", num_classes=60, background_threshold=0.15
    ),
    "context59": _caption(
        "context59", **_CONTEXT, class_names="packaged:context59", num_classes=59, reduce_zero_label=True
    ),
    "coco_object": _caption(
        "coco_object",
        **_COCO164K,
        label_suffix="_instanceTrainIds.png",
        class_names="packaged:coco_object",
        num_classes=81,
        label_map={255: 0},
        background_threshold=0.4,
    ),
    "coco_stuff": _caption(
        "coco_stuff", **_COCO164K, label_suffix="_labelTrainIds.png", class_names="packaged:coco_stuff", num_classes=171
    ),
    "cityscapes": _caption(
        "cityscapes",
        data_root="cityscapes",
        image_dir="leftImg8bit/val",
        label_dir="gtFine/val",
        image_suffix="_leftImg8bit.png",
        label_suffix="_gtFine_labelTrainIds.png",
        class_names="packaged:city_scapes",
        num_classes=19,
    ),
    "ade20k": _caption(
        "ade20k",
        data_root="ade/ADEChallengeData2016",
        image_dir="images/validation",
        label_dir="annotations/validation",
        class_names="packaged:ade20k",
        num_classes=150,
        reduce_zero_label=True,
    ),
    # ---- mask-supervised protocol (detectron2 layouts under e.g. $DETECTRON2_DATASETS)
    "ade847": _mask(
        "ade847",
        data_root="ADE20K_2021_17_01",
        image_dir="images_detectron2/validation",
        label_dir="annotations_detectron2/validation",
        label_suffix=".tif",
        class_names="ade847.txt",
        num_classes=847,
        ignore_index=65535,
        templates=list(ZEGFORMER_IMAGENET_SELECT),
    ),
    "pc459": _mask(
        "pc459",
        data_root="VOCdevkit/VOC2010",
        image_dir="JPEGImages",
        label_dir="annotations_detectron2/pc459_val",
        label_suffix=".tif",
        class_names="pc459.txt",
        num_classes=459,
        ignore_index=65535,
    ),
    "ade150": _mask(
        "ade150",
        data_root="ADEChallengeData2016",
        image_dir="images/validation",
        label_dir="annotations_detectron2/validation",
        class_names="packaged:ade20k",
        num_classes=150,
    ),
    "pc59": _mask(
        "pc59",
        data_root="VOCdevkit/VOC2010",
        image_dir="JPEGImages",
        label_dir="annotations_detectron2/pc59_val",
        class_names="packaged:context59",
        num_classes=59,
    ),
    "pas20": _mask(
        "pas20",
        data_root="VOCdevkit/VOC2012",
        image_dir="JPEGImages",
        label_dir="annotations_detectron2/val",
        class_names="packaged:voc20",
        num_classes=20,
    ),
}
"""The standard benchmarks; ``configs/data/eval_caption8.yaml`` and ``eval_mask5.yaml`` spell them out."""

CAPTION_BENCHMARKS: tuple[str, ...] = (
    "voc21",
    "context60",
    "coco_object",
    "voc20",
    "context59",
    "coco_stuff",
    "cityscapes",
    "ade20k",
)
MASK_BENCHMARKS: tuple[str, ...] = ("ade847", "pc459", "ade150", "pc59", "pas20")


def preset(name: str, **overrides: Any) -> BenchmarkSpec:
    """The spec of a standard benchmark, with ``overrides`` (e.g. ``max_images=10``), resolved."""
    return BenchmarkSpec(preset=name, **overrides).resolved()


def specs_by_name(names: Iterable[str], **overrides: Any) -> list[BenchmarkSpec]:
    """Resolved preset specs for ``names`` (each with the same ``overrides``)."""
    return [preset(name, **overrides) for name in names]
