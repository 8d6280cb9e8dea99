"""COCO-Stuff-164k label maps for mask-supervised training, with the zero-shot split.

On-disk format, mmseg layout (``shared/reference/eval_protocol.md`` section 4):
``root/images/{train2017,val2017}/*.jpg`` and ``root/annotations/{train2017,val2017}/*_labelTrainIds.png``
(171 classes 0..170, 255 ignore). The DataModule's own validation split is COCO-Stuff's val2017;
an ``eval_data`` DataModule replaces it (see :class:`~ovseg.datamodules.base.TrainDataModule`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ovseg.benchmark import AbsentPolicy, Benchmark, TrainingClasses
from ovseg.datamodules.base import (
    TrainDataModule,
    collate_samples,
    default_pin_memory,
    evaluation_sampler,
)
from ovseg.datamodules.decode import decode_image, decode_label
from ovseg.datamodules.transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeShortSide,
    Transform,
)
from ovseg.inference import InferenceSettings
from ovseg.vocabulary import Vocabulary

__all__ = ["COCO_STUFF_UNSEEN", "CocoStuffDataModule", "CocoStuffDataset", "default_segmentation_transform"]

#: ZegFormer / SPNet's 15 unseen COCO-Stuff classes, spelled as in ``coco_stuff.txt``.
COCO_STUFF_UNSEEN: tuple[str, ...] = (
    "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard",
    "clouds", "grass", "playingfield", "river", "road", "tree", "wall-concrete",
)  # fmt: skip

IGNORE_INDEX = 255


class CocoStuffDataset(Dataset):
    """COCO-Stuff semantic segmentation in the mmseg layout.

    Pairs ``root/images/{split}/<stem>{image_suffix}`` with
    ``root/annotations/{split}/<stem>{label_suffix}``. Each item is a dict: ``image`` (3, H, W)
    uint8, ``label`` (H, W) int64 (values 0..num_classes-1, ``ignore_index``; classes in
    ``ignore_classes`` become ``ignore_index``), ``index`` and ``name`` (the stem).

    Raises (with the file named): a missing image or label directory or label file
    (FileNotFoundError, at construction), undecodable files (DecodeError) and label values outside
    ``0..num_classes-1`` that are not ``ignore_index`` (ValueError), when the item is loaded.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train2017",
        num_classes: int = 171,
        ignore_classes: Sequence[int] = (),
        transform: Transform | None = None,
        image_suffix: str = ".jpg",
        label_suffix: str = "_labelTrainIds.png",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_dir = self.root / "images" / split
        self.label_dir = self.root / "annotations" / split
        for directory, what in ((self.image_dir, "image"), (self.label_dir, "label")):
            if not directory.is_dir():
                raise FileNotFoundError(f"COCO-Stuff {what} directory {directory} does not exist")
        self.stems = sorted(n[: -len(image_suffix)] for n in os.listdir(self.image_dir) if n.endswith(image_suffix))
        if not self.stems:
            raise FileNotFoundError(f"no {image_suffix} images in {self.image_dir}")
        labels = set(os.listdir(self.label_dir))
        missing = [s + label_suffix for s in self.stems if s + label_suffix not in labels]
        if missing:
            examples = ", ".join(str(self.label_dir / m) for m in missing[:5])
            raise FileNotFoundError(f"{len(missing)} of {len(self.stems)} label files are missing, e.g. {examples}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ignore_classes = sorted({int(c) for c in ignore_classes})
        for c in self.ignore_classes:
            if not 0 <= c < num_classes:
                raise ValueError(f"ignore class {c} is outside 0..{num_classes - 1}")
        self.transform = transform
        self.image_suffix = image_suffix
        self.label_suffix = label_suffix
        lut = torch.arange(max(num_classes, ignore_index + 1), dtype=torch.long)
        if self.ignore_classes:
            lut[torch.tensor(self.ignore_classes)] = ignore_index
        self._lut = lut

    def __len__(self) -> int:
        return len(self.stems)

    def label_path(self, index: int) -> Path:
        return self.label_dir / (self.stems[index] + self.label_suffix)

    def read_label(self, index: int) -> Tensor:
        """(H, W) int64, range-checked, with ``ignore_classes`` mapped to ``ignore_index``."""
        path = self.label_path(index)
        label = decode_label(path)
        bad = ((label < 0) | (label >= self.num_classes)) & (label != self.ignore_index)
        if bool(bad.any()):
            values = torch.unique(label[bad])[:10].tolist()
            raise ValueError(
                f"{path}: label values {values} are outside 0..{self.num_classes - 1} and not the "
                f"ignore value {self.ignore_index}"
            )
        return self._lut[label] if self.ignore_classes else label

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image_path = self.image_dir / (self.stems[index] + self.image_suffix)
        image = decode_image(image_path)
        label = self.read_label(index)
        if tuple(label.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"{self.label_path(index)}: label size {tuple(label.shape)} differs from "
                f"image {image_path} size {tuple(image.shape[-2:])}"
            )
        sample = {"image": image, "label": label, "index": index, "name": self.stems[index]}
        return self.transform(sample) if self.transform is not None else sample


def default_segmentation_transform() -> Compose:
    """ZegFormer's COCO-Stuff training augmentation: short side {320..1280}, max 2560, 640 crop,
    horizontal flip (detectron2 ``ResizeShortestEdge`` choice + absolute crop)."""
    return Compose(
        [
            ResizeShortSide([int(x * 0.1 * 640) for x in range(5, 21)], max_long_side=2560),
            RandomCrop(640),
            RandomHorizontalFlip(),
        ]
    )


class CocoStuffDataModule(TrainDataModule):
    """COCO-Stuff-164k label maps for mask-supervised training, with the zero-shot split.

    With ``zero_shot`` the unseen classes become 255 (ignored) in *training* labels; images are
    kept (the inductive protocol of ZegFormer). Validation (``val_split``) uses all classes and
    reports seen / unseen mIoU and their harmonic mean (benchmark ``benchmark_name``).

    Classes: ``class_names`` (a file, or ``packaged:coco_stuff``); default ``root/class_names.txt``
    if present, else ``packaged:coco_stuff`` (171 names, e.g. "trafficlight", "wall-concrete").
    Unseen classes, by name: ``unseen_classes``; default ``root/split.json``'s ``"unseen"`` if
    present, else ZegFormer's 15 (:data:`COCO_STUFF_UNSEEN`) for the packaged list.

    Args:
        root: dataset root (``images/``, ``annotations/``).
        train_split, val_split: split directories; ``val_split=None`` for no own validation.
        zero_shot: ignore unseen classes in training labels.
        transform: training transform; default :func:`default_segmentation_transform`.
        eval_transform: validation transform (default None: native resolution).
        templates: prompt templates of the validation vocabulary.
        inference: resize / sliding-window settings of the validation benchmark.
        absent_policy: metric convention (see :class:`~ovseg.benchmark.Benchmark`).
        name_swap_control: also report the unseen mIoU with the unseen names permuted among
            themselves and the zero-shot margin (:class:`~ovseg.benchmark.Benchmark`; no extra pass).
        eval_data: a DataModule whose benchmarks replace the own validation split.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train2017",
        val_split: str | None = "val2017",
        zero_shot: bool = True,
        class_names: str | None = None,
        unseen_classes: list[str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 4,
        num_workers: int = 4,
        pin_memory: bool | None = None,
        transform: Transform | None = None,
        eval_transform: Transform | None = None,
        templates: str | list[str] = "single",
        inference: InferenceSettings | None = None,
        absent_policy: AbsentPolicy = "zero",
        benchmark_name: str = "coco_stuff",
        name_swap_control: bool = False,
        eval_data: L.LightningDataModule | None = None,
    ) -> None:
        super().__init__(eval_data)
        self.root = Path(root)
        self.train_split = train_split
        self.val_split = val_split
        self.zero_shot = zero_shot
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = default_pin_memory(pin_memory)
        self.transform = transform if transform is not None else default_segmentation_transform()
        self.eval_transform = eval_transform
        if class_names is None:
            local = self.root / "class_names.txt"
            class_names = str(local) if local.is_file() else "packaged:coco_stuff"
        self.class_names = class_names
        self.vocabulary = Vocabulary.from_file(class_names, templates)
        self.unseen_classes = tuple(self._resolve_unseen(unseen_classes))
        for name in self.unseen_classes:
            try:
                self.vocabulary.index_of(name)
            except KeyError:
                raise ValueError(f"unseen class {name!r} is not in the class list {class_names}") from None
        self.inference = inference or InferenceSettings()
        self.absent_policy = absent_policy
        self.benchmark_name = benchmark_name
        self.name_swap_control = name_swap_control
        # what mask-supervised methods train on: every class, or the seen ones in zero-shot mode
        self.training_classes = TrainingClasses(
            vocabulary=Vocabulary(tuple(names[:1] for names in self.vocabulary.classes)),
            unseen_classes=self.unseen_classes if zero_shot else (),
        )
        self.train_set: CocoStuffDataset | None = None
        self.val_set: CocoStuffDataset | None = None

    def _resolve_unseen(self, unseen: list[str] | None) -> list[str]:
        if unseen is not None:
            return list(unseen)
        split_file = self.root / "split.json"
        if split_file.is_file():
            meta = json.loads(split_file.read_text(encoding="utf-8"))
            if "unseen" in meta:
                return list(meta["unseen"])
        if self.class_names == "packaged:coco_stuff":
            return list(COCO_STUFF_UNSEEN)
        if self.zero_shot:
            raise ValueError(
                f"zero_shot=True needs the unseen class names: give unseen_classes, or put a "
                f"split.json with an 'unseen' list in {self.root}"
            )
        return []

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)

    @property
    def unseen_indices(self) -> list[int]:
        return [self.vocabulary.index_of(name) for name in self.unseen_classes]

    def own_benchmarks(self) -> list[Benchmark]:
        if self.val_split is None:
            return []
        return [
            Benchmark(
                self.benchmark_name,
                self.vocabulary,
                self.inference,
                self.absent_policy,
                self.unseen_classes,
                name_swap_control=self.name_swap_control,
            )
        ]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.train_set is None:
            ignore = self.unseen_indices if self.zero_shot else []
            self.train_set = CocoStuffDataset(self.root, self.train_split, self.num_classes, ignore, self.transform)
        if self.eval_data is None and self.val_split is not None and self.val_set is None:
            self.val_set = CocoStuffDataset(self.root, self.val_split, self.num_classes, (), self.eval_transform)

    def own_eval_dataloader(self) -> list[DataLoader]:
        if self.val_split is None:
            return []
        if self.val_set is None:
            self.setup("validate")
        return [
            DataLoader(
                self.val_set,
                batch_size=self.eval_batch_size,
                shuffle=False,
                sampler=evaluation_sampler(self.val_set, self.trainer),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                collate_fn=collate_samples,
            )
        ]
