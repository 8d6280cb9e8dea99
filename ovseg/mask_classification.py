"""``MaskClassificationModule``: the shared base of mask-classification methods (ZegFormer, CDT).

What these methods share beyond :class:`~ovseg.module.OVSegModule`: a frozen text encoder (its
class embeddings are computed once, not after every step), a training label space that comes from
the DataModule (``datamodule.training_classes``, a :class:`~ovseg.benchmark.TrainingClasses`) and
travels in the checkpoint, label maps turned into per-class mask targets, and the seen / unseen
status of a query name at inference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.benchmark import TrainingClasses
from ovseg.masks import MaskSetCriterion, MaskTargets, semantic_targets
from ovseg.module import OVSegModule
from ovseg.vocabulary import Vocabulary, resolve_templates

CHECKPOINT_KEY = "ovseg_training_classes"


class MaskClassificationModule(OVSegModule):
    """Base of methods that classify mask proposals against frozen text embeddings.

    Subclasses implement ``encode_text``, ``predict_scores`` (returning
    :class:`~ovseg.module.MaskPredictions`) and ``training_loss``, using
    :meth:`training_text_embeddings` and :meth:`mask_targets`.

    Args:
        training_templates: prompt templates of the training classes' text embeddings
            (``"single"``, ``"imagenet80"`` or a list). Evaluation templates come with each benchmark.
        ignore_index: label value of unlabelled pixels in training label maps.
        size_divisibility: :meth:`pad_batch` pads images and labels (bottom/right) to a multiple of
            this, as detectron2's ``ImageList`` (32, the backbones' largest stride).
        train_pad_value: the pixel value (0..255, before normalisation) that *training* images are
            padded with; ``None``: 0 after normalisation (the mean colour, ovseg's default). The
            official MaskFormer/ZegFormer training mapper pads with 128 (grey); at inference both pad
            with 0 after normalisation.
        **kwargs: :class:`~ovseg.module.OVSegModule` arguments (optimizer, lr_scheduler,
            lr_multipliers, freeze, ...).
    """

    text_encoder_trained = False

    def __init__(
        self,
        training_templates: str | list[str] = "single",
        ignore_index: int = 255,
        size_divisibility: int = 32,
        train_pad_value: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if train_pad_value is not None and not 0 <= train_pad_value <= 255:
            raise ValueError(f"train_pad_value is a pixel value in 0..255 (or null), got {train_pad_value}")
        self.train_pad_value = train_pad_value
        self.training_templates = resolve_templates(training_templates)
        self.ignore_index = ignore_index
        self.size_divisibility = size_divisibility
        self.training_classes: TrainingClasses | None = None
        #: keyword arguments of :class:`~ovseg.masks.MaskSetCriterion` (set by the subclass)
        self.set_loss: dict[str, Any] = {}
        self._criteria: dict[tuple[int, str], MaskSetCriterion] = {}  # not submodules: no state

    # ------------------------------------------------------------------ the training label space
    def setup(self, stage: str) -> None:
        super().setup(stage)
        classes = getattr(getattr(self._trainer, "datamodule", None), "training_classes", None)
        if stage == "fit":
            if classes is None:
                raise RuntimeError(
                    f"{type(self).__name__} trains on label maps: the DataModule needs a "
                    "`training_classes` attribute (ovseg.benchmark.TrainingClasses), e.g. "
                    "SyntheticDataModule or CocoStuffDataModule"
                )
            self.set_training_classes(classes)
        elif self.training_classes is None and classes is not None:
            # e.g. a converted release checkpoint (``ovseg convert``), which records no training
            # classes: the DataModule's split decides which queries are seen (fusion, calibration)
            self.set_training_classes(classes)

    def set_training_classes(self, classes: TrainingClasses) -> None:
        """Use ``classes`` as the training label space (also restored from checkpoints)."""
        self.training_classes = classes
        self.text_cache.invalidate()

    @property
    def seen_class_names(self) -> tuple[str, ...]:
        """Names of the classes the model was trained on (empty before training)."""
        return () if self.training_classes is None else self.training_classes.seen_names

    @property
    def num_training_classes(self) -> int:
        """K, the number of seen training classes (the classifier has K + 1 outputs)."""
        return len(self.seen_class_names)

    def training_vocabulary(self) -> Vocabulary:
        """The seen training classes with :attr:`training_templates`."""
        if not self.seen_class_names:
            raise RuntimeError("no training classes: fit with a DataModule that has `training_classes`")
        return Vocabulary(tuple((name,) for name in self.seen_class_names), self.training_templates)

    def training_text_embeddings(self) -> Tensor:
        """(K, D) L2-normalised embeddings of the seen training classes (computed once)."""
        return self.text_embeddings(self.training_vocabulary())

    def label_to_class(self) -> Tensor:
        """(V,) int64: training-class index of each label value, -1 for unseen classes."""
        assert self.training_classes is not None
        lookup = torch.full((len(self.training_classes.vocabulary),), -1, dtype=torch.long)
        seen = torch.tensor(self.training_classes.seen_indices, dtype=torch.long)
        lookup[seen] = torch.arange(len(seen))
        return lookup

    def criterion(self, num_classes: int) -> MaskSetCriterion:
        """The set loss (:attr:`set_loss` settings) for ``num_classes`` training classes, built
        once per number of classes and device."""
        key = (num_classes, str(self.device))
        if key not in self._criteria:
            self._criteria[key] = MaskSetCriterion(num_classes, **self.set_loss).to(self.device)
        return self._criteria[key]

    def pad_batch(
        self, pixels: Tensor, labels: Tensor | None = None, fill: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Pad at the bottom and right to multiples of ``size_divisibility`` (detectron2's
        ``ImageList``): (B, C, H, W) normalised images with zeros, or with ``fill`` ((C,) normalised
        values, see :meth:`training_pad_fill`), (B, H, W) label maps of the same size with the
        ignore index (returned as int64; None stays None)."""
        height, width = pixels.shape[-2:]
        padding = (0, -width % self.size_divisibility, 0, -height % self.size_divisibility)
        if labels is not None:
            labels = F.pad(labels.long(), padding, value=self.ignore_index)
        padded = F.pad(pixels, padding)
        if fill is not None and (padding[1] or padding[3]):
            outside = torch.ones(padded.shape[-2:], dtype=torch.bool, device=padded.device)
            outside[:height, :width] = False
            padded = torch.where(outside, fill.to(padded).view(1, -1, 1, 1), padded)
        return padded, labels

    def training_pad_fill(self) -> Tensor | None:
        """(C,) the normalised value of ``train_pad_value`` (None when unset); needs the subclass's
        ``normalize`` ((B, 3, H, W) in [0, 1] -> normalised)."""
        if self.train_pad_value is None:
            return None
        grey = torch.full((1, 3, 1, 1), self.train_pad_value / 255.0, device=self.device)
        return self.normalize(grey).view(-1)  # type: ignore[attr-defined]

    def mask_targets(self, label_maps: Tensor) -> list[MaskTargets]:
        """(B, H, W) training label maps -> per image, one mask per seen class present."""
        return semantic_targets(label_maps.long(), self.label_to_class(), self.ignore_index)

    def seen_queries(self, vocabulary: Vocabulary) -> Tensor:
        """(Q,) bool, per query of ``vocabulary``: whether its class was trained on.

        A class is seen when any of its names is a name (display name or synonym) of a seen
        training class, so every synonym of a seen class counts as seen, even one the training
        vocabulary did not list."""
        seen_names: set[str] = set()
        if self.training_classes is not None:
            for index in self.training_classes.seen_indices:
                seen_names.update(self.training_classes.vocabulary.classes[index])
        seen_classes = torch.tensor(
            [any(name in seen_names for name in names) for names in vocabulary.classes], dtype=torch.bool
        )
        return seen_classes[vocabulary.query_to_class].to(self.device)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.training_classes is not None:
            checkpoint[CHECKPOINT_KEY] = {
                "classes": [list(names) for names in self.training_classes.vocabulary.classes],
                "unseen": list(self.training_classes.unseen_classes),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is not None:
            vocabulary = Vocabulary(tuple(tuple(names) for names in stored["classes"]))
            self.set_training_classes(TrainingClasses(vocabulary, tuple(stored["unseen"])))
