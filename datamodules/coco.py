"""COCO training data: COCO Captions (image-caption pairs) and COCO-Stuff-164k (label maps).

On-disk formats (``shared/reference/eval_protocol.md`` section 4):

* COCO Captions: ``root/annotations/captions_train2017.json`` (``images`` with ``id`` /
  ``file_name``, ``annotations`` with ``id`` / ``image_id`` / ``caption``) and the images in
  ``root/train2017/``.
* COCO-Stuff-164k, mmseg layout: ``root/images/{train2017,val2017}/*.jpg`` and
  ``root/annotations/{train2017,val2017}/*_labelTrainIds.png`` (171 classes 0..170, 255 ignore).

Evaluation. Training DataModules here do not define benchmarks themselves (except COCO-Stuff's
own validation split). They forward ``benchmarks`` and the evaluation dataloaders of an optional
``eval_data`` DataModule (for example ``ovseg.datamodules.benchmarks.EvaluationDataModule`` or the
synthetic world); without one, ``benchmarks`` is ``[]`` and the validation loader list is empty, so
training runs without validation. YAML::

    data:
      class_path: ovseg.datamodules.coco.CocoCaptionsDataModule
      init_args:
        root: data/coco
        concepts: auto          # annotations/captions_train2017.concepts.pt
        batch_size: 256
        eval_data:
          class_path: ovseg.datamodules.synthetic.SyntheticDataModule
          init_args: {num_train: 0, num_val: 64}

Precomputed SimZSS concepts. ``ovseg data extract-concepts --coco ANNOTATIONS.json`` writes a
:class:`ConceptCache` (``captions_train2017.concepts.pt``) holding, for every annotation id, the
concepts of that caption; the DataModule adds ``concept_labels`` (C,), ``concept_token_positions``
(C, T) and ``concept_token_mask`` (C, T) to each sample for the caption it drew, exactly what
``ConceptExtractor.encode(caption)`` returns, so SimZSS skips its on-the-fly extraction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ovseg.benchmark import AbsentPolicy, Benchmark, TrainingClasses
from ovseg.datamodules.common import collate_samples, evaluation_sampler
from ovseg.datamodules.decode import DecodeError, SkipCounter, decode_image, decode_label
from ovseg.datamodules.transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ResizeShortSide,
    Transform,
)
from ovseg.errors import UserError
from ovseg.inference import InferenceSettings
from ovseg.vocabulary import Vocabulary

if TYPE_CHECKING:  # pragma: no cover
    from ovseg.methods.simzss.concepts import Concept

__all__ = [
    "CONCEPT_KEYS",
    "COCO_STUFF_UNSEEN",
    "CocoCaptionsDataModule",
    "CocoCaptionsDataset",
    "CocoStuffDataModule",
    "CocoStuffDataset",
    "ConceptCache",
    "TrainDataModule",
    "concept_meta",
    "concepts_from_lists",
    "concepts_to_lists",
    "default_concepts_path",
    "extract_coco_concepts",
    "read_coco_captions",
]

logger = logging.getLogger("ovseg.data")

CONCEPT_KEYS = ("concept_labels", "concept_token_positions", "concept_token_mask")

#: ZegFormer / SPNet's 15 unseen COCO-Stuff classes, spelled as in ``coco_stuff.txt``.
COCO_STUFF_UNSEEN: tuple[str, ...] = (
    "cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors", "cardboard",
    "clouds", "grass", "playingfield", "river", "road", "tree", "wall-concrete",
)  # fmt: skip

IGNORE_INDEX = 255


def _default_pin_memory(pin_memory: bool | None) -> bool:
    return torch.cuda.is_available() if pin_memory is None else bool(pin_memory)


# ================================================================================ stored concepts
def bank_fingerprint(names: Sequence[str]) -> str:
    """SHA-1 of the bank's sorted names: labels are only comparable between equal banks."""
    return hashlib.sha1("\n".join(names).encode("utf-8")).hexdigest()


def concept_meta(extractor: Any) -> dict[str, Any]:
    """What stored concepts depend on: context length, shape limits and the bank."""
    return {
        "context_length": int(extractor.context_length),
        "max_concepts": int(extractor.max_concepts),
        "max_tokens_per_concept": int(extractor.max_tokens_per_concept),
        "bank_size": len(extractor.bank),
        "bank_sha1": bank_fingerprint(list(extractor.bank.names)),
    }


def meta_mismatch(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`concept_meta` dicts."""
    return [
        f"{key}: stored {stored.get(key)!r}, model {expected[key]!r}"
        for key in expected
        if stored.get(key) != expected[key]
    ]


def concepts_to_lists(concepts: Sequence[Concept]) -> dict[str, list]:
    """Concepts -> JSON-friendly ragged lists (only real concepts and tokens are stored).

    ``concept_labels``: [n], ``concept_token_positions``: n rows of token positions,
    ``concept_token_mask``: n rows of 1s. :func:`concepts_from_lists` pads them back.
    """
    return {
        "concept_labels": [int(c.label) for c in concepts],
        "concept_token_positions": [[int(p) for p in c.token_positions] for c in concepts],
        "concept_token_mask": [[1] * len(c.token_positions) for c in concepts],
    }


def concepts_from_lists(stored: Mapping[str, Any], max_concepts: int, max_tokens: int) -> dict[str, Tensor]:
    """Stored concept lists -> the fixed-shape tensors of ``ConceptExtractor.encode``.

    Accepts ragged lists (:func:`concepts_to_lists`) or full padded lists (``encode(...)`` as
    ``.tolist()``): label -1 rows are padding, ``concept_token_mask`` (optional for ragged rows)
    selects the real positions.

    Returns:
        ``concept_labels`` (max_concepts,) int64, -1 padded; ``concept_token_positions``
        (max_concepts, max_tokens) int64, 0 padded; ``concept_token_mask`` same shape, bool.

    Raises:
        ValueError: malformed lists, or more concepts / tokens than the shapes allow.
    """
    labels_in = stored["concept_labels"]
    positions_in = stored["concept_token_positions"]
    masks_in = stored.get("concept_token_mask")
    if len(positions_in) != len(labels_in) or (masks_in is not None and len(masks_in) != len(labels_in)):
        raise ValueError("stored concepts: concept_labels, concept_token_positions and "
                         "concept_token_mask have different lengths")
    labels = torch.full((max_concepts,), -1, dtype=torch.long)
    positions = torch.zeros((max_concepts, max_tokens), dtype=torch.long)
    mask = torch.zeros((max_concepts, max_tokens), dtype=torch.bool)
    n = 0
    for i, label in enumerate(labels_in):
        if int(label) < 0:
            continue
        row = positions_in[i]
        if masks_in is not None:
            row = [int(p) for p, m in zip(row, masks_in[i]) if m]
        if n >= max_concepts or len(row) > max_tokens:
            raise ValueError(f"stored concepts exceed the shape ({max_concepts}, {max_tokens})")
        labels[n] = int(label)
        if row:
            positions[n, : len(row)] = torch.tensor([int(p) for p in row], dtype=torch.long)
            mask[n, : len(row)] = True
        n += 1
    return {"concept_labels": labels, "concept_token_positions": positions, "concept_token_mask": mask}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ConceptCache:
    """Precomputed concepts of every caption of a COCO Captions file, keyed by annotation id.

    Stored compactly (CSR): ``annotation_ids`` (N,) sorted, ``offsets`` (N+1,), and per concept
    ``labels`` (M,), ``token_positions`` (M, T) and ``token_counts`` (M,); :meth:`lookup` expands
    one caption to the fixed shapes of ``ConceptExtractor.encode``. ``meta`` is
    :func:`concept_meta` of the extractor that made it.
    """

    FORMAT = "ovseg-coco-concepts-v1"

    def __init__(self, annotation_ids: Tensor, offsets: Tensor, labels: Tensor, token_positions: Tensor,
                 token_counts: Tensor, meta: Mapping[str, Any], source: str = "<memory>") -> None:
        self.annotation_ids = annotation_ids
        self.offsets = offsets
        self.labels = labels
        self.token_positions = token_positions
        self.token_counts = token_counts
        self.meta = dict(meta)
        self.source = source

    @classmethod
    def build(cls, annotation_ids: Sequence[int], concepts: Sequence[Sequence[Concept]],
              meta: Mapping[str, Any]) -> ConceptCache:
        """From per-annotation concept lists (as ``ConceptExtractor.extract`` returns them)."""
        if len(annotation_ids) != len(concepts):
            raise ValueError("annotation_ids and concepts differ in length")
        order = sorted(range(len(annotation_ids)), key=lambda i: annotation_ids[i])
        ids = torch.tensor([annotation_ids[i] for i in order], dtype=torch.long)
        if len(ids) > 1 and bool((ids[1:] == ids[:-1]).any()):
            raise ValueError("duplicated annotation ids")
        max_tokens = int(meta["max_tokens_per_concept"])
        counts = [len(concepts[i]) for i in order]
        offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0) if counts else offsets[1:]
        flat = [c for i in order for c in concepts[i]]
        labels = torch.tensor([c.label for c in flat], dtype=torch.int32)
        positions = torch.zeros((len(flat), max_tokens), dtype=torch.int16)
        token_counts = torch.zeros(len(flat), dtype=torch.int16)
        for k, concept in enumerate(flat):
            pos = concept.token_positions[:max_tokens]
            positions[k, : len(pos)] = torch.tensor(pos, dtype=torch.int16)
            token_counts[k] = len(pos)
        return cls(ids, offsets, labels, positions, token_counts, meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` atomically (``torch.save`` of plain tensors and a meta dict)."""
        path = Path(path)
        _atomic_torch_save({
            "format": self.FORMAT, "meta": self.meta, "annotation_ids": self.annotation_ids,
            "offsets": self.offsets, "labels": self.labels, "token_positions": self.token_positions,
            "token_counts": self.token_counts,
        }, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConceptCache:
        """Read a cache written by :meth:`save`; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"concepts file {path} does not exist; create it with "
                "`ovseg data extract-concepts --coco ANNOTATIONS.json`"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read the concepts file ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError(f"{path}: not an ovseg concepts file (expected format {cls.FORMAT!r})")
        return cls(data["annotation_ids"], data["offsets"], data["labels"], data["token_positions"],
                   data["token_counts"], data["meta"], source=str(path))

    def __len__(self) -> int:
        return len(self.annotation_ids)

    def _row(self, annotation_id: int) -> int | None:
        row = int(torch.searchsorted(self.annotation_ids, torch.tensor(int(annotation_id))))
        if row < len(self.annotation_ids) and int(self.annotation_ids[row]) == int(annotation_id):
            return row
        return None

    def missing(self, annotation_ids: Sequence[int]) -> list[int]:
        """The ids of ``annotation_ids`` that are not in the cache (vectorised)."""
        if not len(annotation_ids):
            return []
        ids = torch.tensor(list(annotation_ids), dtype=torch.long)
        rows = torch.searchsorted(self.annotation_ids, ids).clamp_(max=max(len(self.annotation_ids) - 1, 0))
        found = self.annotation_ids[rows] == ids if len(self.annotation_ids) else torch.zeros_like(ids, dtype=torch.bool)
        return ids[~found].tolist()

    def __contains__(self, annotation_id: object) -> bool:
        return isinstance(annotation_id, int) and self._row(annotation_id) is not None

    def lookup(self, annotation_id: int) -> dict[str, Tensor]:
        """The concepts of one caption as fixed-shape tensors (see :func:`concepts_from_lists`)."""
        row = self._row(annotation_id)
        if row is None:
            raise KeyError(f"annotation id {annotation_id} is not in the concepts file {self.source}")
        n_max, t_max = int(self.meta["max_concepts"]), int(self.meta["max_tokens_per_concept"])
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        n = min(stop - start, n_max)
        labels = torch.full((n_max,), -1, dtype=torch.long)
        positions = torch.zeros((n_max, t_max), dtype=torch.long)
        labels[:n] = self.labels[start:start + n].long()
        positions[:n] = self.token_positions[start:start + n].long()
        counts = self.token_counts[start:start + n].long()
        mask = torch.zeros((n_max, t_max), dtype=torch.bool)
        mask[:n] = torch.arange(t_max)[None, :] < counts[:, None]
        return {"concept_labels": labels, "concept_token_positions": positions, "concept_token_mask": mask}

    def check_compatible(self, extractor: Any) -> None:
        """Raise if the cache was made for another context length, shape or concept bank."""
        problems = meta_mismatch(self.meta, concept_meta(extractor))
        if problems:
            raise ValueError(
                f"concepts file {self.source} does not match the model's concept extractor ("
                + "; ".join(problems) + "). Re-create it with `ovseg data extract-concepts` and the "
                "model's --context-length / --bank."
            )


def default_concepts_path(annotations: str | os.PathLike) -> Path:
    """``annotations/captions_train2017.json`` -> ``annotations/captions_train2017.concepts.pt``."""
    annotations = Path(annotations)
    return annotations.with_name(annotations.stem + ".concepts.pt")


# ================================================================================ COCO Captions
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
        raise UserError(f"{path}: annotation {annotation.get('id')!r} (image {annotation.get('image_id')!r}) has "
                        "no 'caption' key; a COCO Captions annotation needs 'id', 'image_id' and 'caption'")
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
        raise ValueError(f"{path}: malformed COCO Captions entry ({type(exc).__name__}: {exc}); images "
                         "need 'id' and 'file_name', annotations 'id', 'image_id' and 'caption'") from exc
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
        logger.warning("%s: skipped %d empty caption(s) (annotation ids %s%s)", path, empty,
                       empty_examples, "..." if empty > len(empty_examples) else "")
    if without:
        logger.warning("%s: %d image(s) have no non-empty caption and are not used", path, without)
    if orphans:
        logger.warning("%s: %d caption(s) refer to image ids not listed in 'images' (ignored)", path, orphans)
    return CocoCaptionsIndex(file_names, image_ids, captions, ann_ids, empty, without, orphans)


def check_files_exist(directory: Path, names: Sequence[str], what: str, listed_in: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming the first missing files (one directory listing, fast)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory {directory} does not exist (needed by {listed_in})")
    present = set(os.listdir(directory))
    missing = [n for n in names if n not in present and not (os.sep in n and (directory / n).is_file())]
    if missing:
        examples = ", ".join(str(directory / n) for n in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(names)} {what} listed in {listed_in} are missing, e.g. {examples}"
        )


class CocoCaptionsDataset(Dataset):
    """COCO Captions images with one caption per visit.

    Each item is a dict:
        image: (3, H, W) uint8 (after ``transform``).
        caption: one non-empty caption, drawn uniformly per visit with torch's RNG
            (``random_caption``), else the first.
        index, image_id, annotation_id: ints.
        concept_labels (C,), concept_token_positions (C, T), concept_token_mask (C, T): only with
            a :class:`ConceptCache`, for the drawn caption.

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


# ================================================================================ DataModule base
class TrainDataModule(L.LightningDataModule):
    """Shared plumbing of the training DataModules: forwarded evaluation data and skip logging.

    ``benchmarks``, ``val_dataloader``, ``test_dataloader`` and ``predict_dataloader`` come from
    ``eval_data`` when given, else from :meth:`own_benchmarks` / :meth:`own_eval_dataloader`
    (nothing by default: ``benchmarks == []`` and an empty list of validation loaders).
    The number of skipped bad samples (:attr:`skipped`) is logged as ``data/skipped_samples`` to
    the trainer's loggers whenever it changes.
    """

    def __init__(self, eval_data: L.LightningDataModule | None = None) -> None:
        super().__init__()
        if eval_data is not None and not hasattr(eval_data, "benchmarks"):
            raise TypeError(
                f"eval_data must be a DataModule with a `benchmarks` list, got {type(eval_data).__name__}"
            )
        self.eval_data = eval_data
        self.skips: SkipCounter | None = None
        self._logged_skips = 0

    # ---------------------------------------------------------------- evaluation
    def own_benchmarks(self) -> list[Benchmark]:
        """Benchmarks of this DataModule itself (used when no ``eval_data`` is given)."""
        return []

    def own_eval_dataloader(self) -> list[DataLoader]:
        """Evaluation loaders matching :meth:`own_benchmarks`."""
        return []

    @property
    def benchmarks(self) -> list[Benchmark]:
        if self.eval_data is not None:
            return list(self.eval_data.benchmarks)  # type: ignore[attr-defined]
        return self.own_benchmarks()

    def prepare_data(self) -> None:
        if self.eval_data is not None:
            self.eval_data.prepare_data()

    def setup_eval(self, stage: str) -> None:
        """Set up ``eval_data`` (shares this DataModule's trainer)."""
        if self.eval_data is not None:
            self.eval_data.trainer = self.trainer
            self.eval_data.setup(stage)

    def setup(self, stage: str) -> None:
        self.setup_eval(stage)

    def teardown(self, stage: str) -> None:
        if self.eval_data is not None:
            self.eval_data.teardown(stage)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of ``self.train_set`` (a map-style dataset built by ``setup``)."""
        if getattr(self, "train_set", None) is None:
            self.setup("fit")
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, collate_fn=collate_samples)

    def val_dataloader(self) -> Any:
        if self.eval_data is not None:
            return self.eval_data.val_dataloader()
        return self.own_eval_dataloader()

    def test_dataloader(self) -> Any:
        if self.eval_data is not None:
            return self.eval_data.test_dataloader()
        return self.own_eval_dataloader()

    def predict_dataloader(self) -> Any:
        if self.eval_data is not None:
            return self.eval_data.predict_dataloader()
        return self.own_eval_dataloader()

    # ---------------------------------------------------------------- bad samples
    @property
    def skipped(self) -> int:
        """Bad samples skipped so far by the training loader, summed over its workers."""
        return self.skips.value if self.skips is not None else 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.skips is not None and trainer is not None and trainer.training:
            count = self.skips.value
            if count != self._logged_skips:
                self._logged_skips = count
                if trainer.is_global_zero:
                    for lg in trainer.loggers:
                        lg.log_metrics({"data/skipped_samples": float(count)}, step=trainer.global_step)
        return batch

    # ---------------------------------------------------------------- concepts
    def model_concept_extractor(self) -> Any | None:
        """The attached model's ``concepts`` extractor (SimZSS), if any."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        extractor = getattr(module, "concepts", None)
        if extractor is not None and all(
            hasattr(extractor, a) for a in ("bank", "context_length", "max_concepts", "max_tokens_per_concept")
        ):
            return extractor
        return None


def _resolve(root: Path, path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


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
    ) -> None:
        super().__init__(eval_data)
        self.root = Path(root)
        self.train_annotations = _resolve(self.root, train_annotations)
        self.train_images = _resolve(self.root, train_images)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = _default_pin_memory(pin_memory)
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
            self.train_annotations, self.train_images, self.transform, cache, self.random_caption,
            skips=self.skips,
        )



# ================================================================================ COCO-Stuff
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
            raise ValueError(f"{self.label_path(index)}: label size {tuple(label.shape)} differs from "
                             f"image {image_path} size {tuple(image.shape[-2:])}")
        sample = {"image": image, "label": label, "index": index, "name": self.stems[index]}
        return self.transform(sample) if self.transform is not None else sample


def default_segmentation_transform() -> Compose:
    """ZegFormer's COCO-Stuff training augmentation: short side {320..1280}, max 2560, 640 crop,
    horizontal flip (detectron2 ``ResizeShortestEdge`` choice + absolute crop)."""
    return Compose([
        ResizeShortSide([int(x * 0.1 * 640) for x in range(5, 21)], max_long_side=2560),
        RandomCrop(640),
        RandomHorizontalFlip(),
    ])


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
        self.pin_memory = _default_pin_memory(pin_memory)
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
        return [Benchmark(self.benchmark_name, self.vocabulary, self.inference, self.absent_policy,
                          self.unseen_classes)]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.train_set is None:
            ignore = self.unseen_indices if self.zero_shot else []
            self.train_set = CocoStuffDataset(self.root, self.train_split, self.num_classes, ignore,
                                              self.transform)
        if self.eval_data is None and self.val_split is not None and self.val_set is None:
            self.val_set = CocoStuffDataset(self.root, self.val_split, self.num_classes, (),
                                            self.eval_transform)


    def own_eval_dataloader(self) -> list[DataLoader]:
        if self.val_split is None:
            return []
        if self.val_set is None:
            self.setup("validate")
        return [DataLoader(self.val_set, batch_size=self.eval_batch_size, shuffle=False,
                           sampler=evaluation_sampler(self.val_set, self.trainer), num_workers=self.num_workers, pin_memory=self.pin_memory,
                           collate_fn=collate_samples)]


# ================================================================================ extraction
def extract_coco_concepts(
    annotations: str | os.PathLike,
    out: str | os.PathLike | None = None,
    bank: str | None = None,
    context_length: int = 77,
    max_concepts: int = 32,
    max_tokens_per_concept: int = 16,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Extract the SimZSS concepts of every caption of a COCO Captions file into a cache.

    Args:
        annotations: the captions JSON.
        out: output file (default: :func:`default_concepts_path`, next to the JSON).
        bank, context_length, max_concepts, max_tokens_per_concept: the
            :class:`~ovseg.methods.simzss.concepts.ConceptExtractor` settings (must match the
            model's: SimZSS uses its text encoder's context length).
        num_workers: extraction processes (0: in this process).
        progress: show a progress bar.

    Returns:
        The path written. Empty captions get no concepts (they are not used for training).
    """
    from ovseg.methods.simzss.concepts import ConceptExtractor

    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO Captions annotation file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        items = [(int(a["id"]), annotation_caption(a, path)) for a in doc["annotations"]]
    except UserError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a COCO Captions file ({exc})") from exc
    extractor = ConceptExtractor(bank, context_length, max_concepts, max_tokens_per_concept)
    concepts = extractor.extract_many([c.strip() for _, c in items], num_workers=num_workers,
                                      progress=progress)
    cache = ConceptCache.build([a for a, _ in items], concepts, concept_meta(extractor))
    return cache.save(out if out is not None else default_concepts_path(path))
