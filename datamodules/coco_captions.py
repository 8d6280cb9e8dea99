"""COCO Captions (image-caption pairs) for caption-supervised training (SimZSS).

On-disk format (``shared/reference/eval_protocol.md`` section 4): ``root/annotations/captions_train2017.json``
(``images`` with ``id`` / ``file_name``, ``annotations`` with ``id`` / ``image_id`` / ``caption``) and
the images in ``root/train2017/``.

Evaluation comes from an optional ``eval_data`` DataModule (see :class:`~ovseg.datamodules.base.TrainDataModule`);
without one, training runs without validation. YAML::

    data:
      class_path: ovseg.datamodules.CocoCaptionsDataModule
      init_args:
        root: data/coco
        concepts: auto          # annotations/captions_train2017.concepts.pt
        batch_size: 256
        eval_data:
          class_path: ovseg.datamodules.SyntheticDataModule
          init_args: {num_train: 0, num_val: 64}

Precomputed SimZSS concepts. ``ovseg data extract-concepts --coco ANNOTATIONS.json`` writes a
:class:`~ovseg.concepts.ConceptCache` (``captions_train2017.concepts.pt``) holding, for every
annotation id, the concepts of that caption; the DataModule adds ``concept_labels`` (C,),
``concept_token_positions`` (C, T) and ``concept_token_mask`` (C, T) to each sample for the caption
it drew, exactly what ``ConceptExtractor.encode(caption)`` returns, so SimZSS skips its on-the-fly
extraction.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ovseg.concepts import ConceptCache, default_concepts_path
from ovseg.datamodules.base import (
    TrainDataModule,
    check_files_exist,
    default_pin_memory,
    resolve_path,
)
from ovseg.datamodules.decode import DecodeError, SkipCounter, decode_image
from ovseg.datamodules.transforms import RandomResizedCrop, Transform
from ovseg.errors import UserError

__all__ = ["CocoCaptionsDataModule", "CocoCaptionsDataset", "CocoCaptionsIndex", "read_coco_captions"]

logger = logging.getLogger("ovseg.data")


@dataclass(frozen=True)
class CocoCaptionsIndex:
    """A parsed COCO Captions file.

    Attributes:
        file_names: per kept image, its ``file_name``.
        image_ids: per kept image, its COCO id.
        captions: per kept image, its non-empty captions (stripped).
        annotation_ids: per kept image, the annotation id of each caption.
        empty_captions: number of empty / whitespace-only captions skipped.
        images_without_captions: images listed but left with no caption (dropped).
        orphan_captions: captions whose ``image_id`` is not among the images (ignored).
    """

    file_names: list[str]
    image_ids: list[int]
    captions: list[list[str]]
    annotation_ids: list[list[int]]
    empty_captions: int = 0
    images_without_captions: int = 0
    orphan_captions: int = 0


def annotation_caption(annotation: Mapping[str, Any], path: Path) -> str:
    """The caption of a COCO Captions annotation (``""`` for a null one); a missing ``caption`` key is a
    malformed entry, not an empty caption: :class:`UserError` naming the file and annotation."""
    if "caption" not in annotation:
        raise UserError(
            f"{path}: annotation {annotation.get('id')!r} (image {annotation.get('image_id')!r}) has "
            "no 'caption' key; a COCO Captions annotation needs 'id', 'image_id' and 'caption'"
        )
    return str(annotation["caption"] or "")


def read_coco_captions(annotations: str | os.PathLike) -> CocoCaptionsIndex:
    """Parse a COCO Captions JSON; empty captions are skipped with a warning (counted).

    Raises:
        FileNotFoundError: the annotation file does not exist (named).
        ValueError: not valid JSON or missing the ``images`` / ``annotations`` keys (named).
    """
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO Captions annotation file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a valid JSON file ({exc})") from exc
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise ValueError(f"{path}: a COCO Captions file needs top-level 'images' and 'annotations'")
    by_image: dict[int, list[tuple[int, str]]] = {}
    file_name_of: dict[int, str] = {}
    empty = orphans = 0
    empty_examples: list[int] = []
    try:
        for image in doc["images"]:
            file_name_of[int(image["id"])] = str(image["file_name"])
            by_image.setdefault(int(image["id"]), [])
        for ann in doc["annotations"]:
            caption = annotation_caption(ann, path).strip()
            image_id = int(ann["image_id"])
            if image_id not in by_image:
                orphans += 1
                continue
            if not caption:
                empty += 1
                if len(empty_examples) < 5:
                    empty_examples.append(int(ann["id"]))
                continue
            by_image[image_id].append((int(ann["id"]), caption))
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(
            f"{path}: malformed COCO Captions entry ({type(exc).__name__}: {exc}); images "
            "need 'id' and 'file_name', annotations 'id', 'image_id' and 'caption'"
        ) from exc
    file_names, image_ids, captions, ann_ids = [], [], [], []
    without = 0
    for image_id, items in by_image.items():
        if not items:
            without += 1
            continue
        file_names.append(file_name_of[image_id])
        image_ids.append(image_id)
        captions.append([c for _, c in items])
        ann_ids.append([a for a, _ in items])
    if empty:
        logger.warning(
            "%s: skipped %d empty caption(s) (annotation ids %s%s)",
            path,
            empty,
            empty_examples,
            "..." if empty > len(empty_examples) else "",
        )
    if without:
        logger.warning("%s: %d image(s) have no non-empty caption and are not used", path, without)
    if orphans:
        logger.warning("%s: %d caption(s) refer to image ids not listed in 'images' (ignored)", path, orphans)
    return CocoCaptionsIndex(file_names, image_ids, captions, ann_ids, empty, without, orphans)


class CocoCaptionsDataset(Dataset):
    """COCO Captions images with one caption per visit.

    Each item is a dict:
        image: (3, H, W) uint8 (after ``transform``).
        caption: one non-empty caption, drawn uniformly per visit with torch's RNG
            (``random_caption``), else the first.
        index, image_id, annotation_id: ints.
        concept_labels (C,), concept_token_positions (C, T), concept_token_mask (C, T): only with
            a :class:`~ovseg.concepts.ConceptCache`, for the drawn caption.

    A corrupt image is skipped (counted in ``skips``, logged) and another random image is returned
    instead when ``skip_corrupt``; otherwise :class:`DecodeError` naming the file is raised.

    Args:
        annotations: the captions JSON.
        images: the image directory.
        transform: sample transform (see :mod:`ovseg.datamodules.transforms`).
        concepts: precomputed concepts of the captions.
        random_caption: draw a caption per visit (else always the first).
        check_files: check at construction that every listed image exists.
        skip_corrupt: skip undecodable images instead of raising.
        skips: the counter of skipped images (a new one if None).
    """

    def __init__(
        self,
        annotations: str | os.PathLike,
        images: str | os.PathLike,
        transform: Transform | None = None,
        concepts: ConceptCache | None = None,
        random_caption: bool = True,
        check_files: bool = True,
        skip_corrupt: bool = True,
        skips: SkipCounter | None = None,
    ) -> None:
        self.annotations = Path(annotations)
        self.images = Path(images)
        self.index = read_coco_captions(self.annotations)
        if check_files:
            check_files_exist(self.images, self.index.file_names, "images", self.annotations)
        if concepts is not None:
            missing = concepts.missing([a for ids in self.index.annotation_ids for a in ids])
            if missing:
                raise ValueError(
                    f"concepts file {concepts.source} has no entry for {len(missing)} caption(s) of "
                    f"{self.annotations} (e.g. annotation id {missing[0]}); re-run extract-concepts"
                )
        self.transform = transform
        self.concepts = concepts
        self.random_caption = random_caption
        self.skip_corrupt = skip_corrupt
        self.skips = skips if skips is not None else SkipCounter("image")

    def __len__(self) -> int:
        return len(self.index.file_names)

    def _load(self, index: int) -> Tensor:
        return decode_image(self.images / self.index.file_names[index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        for attempt in range(11):
            try:
                image = self._load(index)
                break
            except (DecodeError, FileNotFoundError) as exc:
                if not self.skip_corrupt:
                    raise
                self.skips.add(str(exc))
                if attempt == 10:
                    raise RuntimeError(f"11 images in a row could not be decoded, last: {exc}") from exc
                index = int(torch.randint(len(self), ()))
        captions = self.index.captions[index]
        k = int(torch.randint(len(captions), ())) if self.random_caption and len(captions) > 1 else 0
        annotation_id = self.index.annotation_ids[index][k]
        sample: dict[str, Any] = {
            "image": image,
            "caption": captions[k],
            "index": index,
            "image_id": self.index.image_ids[index],
            "annotation_id": annotation_id,
        }
        if self.concepts is not None:
            sample.update(self.concepts.lookup(annotation_id))
        return self.transform(sample) if self.transform is not None else sample


class CocoCaptionsDataModule(TrainDataModule):
    """COCO Captions for caption-supervised training (SimZSS), from the original JSON + images.

    Setup checks that the annotation file and every listed image exist (errors name the file);
    empty captions are skipped with a warning. Each visit of an image draws one of its captions
    (torch RNG). Corrupt images met during training are skipped and counted (:attr:`skipped`).

    Args:
        root: the COCO directory.
        train_annotations: captions JSON, relative to ``root`` (or absolute).
        train_images: image directory, relative to ``root`` (or absolute).
        batch_size: per process.
        num_workers: DataLoader workers.
        pin_memory: default: when CUDA is available.
        transform: default ``RandomResizedCrop(224, scale=(0.9, 1.0), bicubic)`` (SimZSS / OpenCLIP);
            give ``Compose`` with an empty list for none.
        concepts: precomputed concepts: a file path (relative to ``root`` if not found as given),
            ``"auto"`` for ``<annotations>.concepts.pt`` next to the annotation file, or None
            (the model extracts concepts on the fly). Checked against the model's extractor.
        random_caption: draw a caption per visit (else the first caption).
        eval_data: DataModule providing ``benchmarks`` and the evaluation loaders.
        samples_per_epoch: samples per epoch over all ranks (None: one pass over the images); the
            official SimZSS release's ``--train-num-samples`` (400,000).
    """

    def __init__(
        self,
        root: str,
        train_annotations: str = "annotations/captions_train2017.json",
        train_images: str = "train2017",
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        transform: Transform | None = None,
        concepts: str | None = None,
        random_caption: bool = True,
        eval_data: L.LightningDataModule | None = None,
        samples_per_epoch: int | None = None,
    ) -> None:
        super().__init__(eval_data, samples_per_epoch)
        self.root = Path(root)
        self.train_annotations = resolve_path(self.root, train_annotations)
        self.train_images = resolve_path(self.root, train_images)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = default_pin_memory(pin_memory)
        self.transform = transform if transform is not None else RandomResizedCrop(224, (0.9, 1.0))
        self.concepts = concepts
        self.random_caption = random_caption
        self.train_set: CocoCaptionsDataset | None = None

    def concepts_path(self) -> Path | None:
        """The resolved concepts file (None without concepts)."""
        if self.concepts is None:
            return None
        if self.concepts == "auto":
            return default_concepts_path(self.train_annotations)
        path = Path(self.concepts)
        return path if path.is_absolute() or path.exists() else self.root / path

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or self.train_set is not None:
            return
        cache = None
        path = self.concepts_path()
        if path is not None:
            cache = ConceptCache.load(path)
            extractor = self.model_concept_extractor()
            if extractor is not None:
                cache.check_compatible(extractor)
        self.skips = SkipCounter("image")
        self.train_set = CocoCaptionsDataset(
            self.train_annotations,
            self.train_images,
            self.transform,
            cache,
            self.random_caption,
            skips=self.skips,
        )
