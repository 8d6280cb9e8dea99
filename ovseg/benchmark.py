"""What an evaluation dataloader brings with it: name, vocabulary, inference and metric settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from ovseg.errors import UserError
from ovseg.inference import InferenceSettings
from ovseg.vocabulary import Vocabulary

AbsentPolicy = Literal["zero", "exclude"]


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set as the model sees it.

    Attributes:
        name: used in metric keys, ``val/<name>/mIoU``.
        vocabulary: class names, synonyms, templates and background policy.
        inference: resize and sliding-window settings.
        absent_policy: a class predicted but absent from the ground truth counts as IoU 0
            (``"zero"``: mmseg, detectron2 v0.6, MAFT+, ZegFormer) or is left out of the mean
            (``"exclude"``: detectron2 since 2022, FC-CLIP, CAT-Seg).
        unseen_classes: display names of the classes unseen in training (zero-shot splits); when
            given, mIoU of seen and unseen classes and their harmonic mean are reported.
        ignore_index: label value that is not evaluated.
        name_swap_control: also report ``mIoU_unseen_swapped``, the unseen mIoU with the unseen
            classes' names permuted among themselves (mean over all permutations that leave no
            class its own names), and the zero-shot margin ``zs_margin`` = ``mIoU_unseen`` -
            ``mIoU_unseen_swapped``: how much of the unseen mIoU comes from the names, not from
            assigning leftover regions to any unseen class. Read off the true names' confusion
            matrix (:func:`ovseg.metrics.unseen_miou_with_wrong_names`), no second inference pass.
            Needs at least two unseen classes.
    """

    name: str
    vocabulary: Vocabulary
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    absent_policy: AbsentPolicy = "zero"
    unseen_classes: tuple[str, ...] = ()
    ignore_index: int = 255
    name_swap_control: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"benchmark name {self.name!r} must be non-empty and contain no '/'")
        if self.absent_policy not in ("zero", "exclude"):
            raise ValueError(f"absent_policy must be 'zero' or 'exclude', got {self.absent_policy!r}")
        object.__setattr__(self, "unseen_classes", tuple(self.unseen_classes))
        check_unseen_names(self.unseen_classes, self.vocabulary, f"benchmark {self.name!r}")
        if self.name_swap_control and len(set(self.unseen_indices)) < 2:
            raise UserError(
                f"benchmark {self.name!r}: name_swap_control permutes the unseen classes' names among "
                f"themselves and needs at least two unseen classes, got {list(self.unseen_classes)}"
            )

    @property
    def unseen_indices(self) -> tuple[int, ...]:
        """Class indices of :attr:`unseen_classes`."""
        return tuple(self.vocabulary.index_of(name) for name in self.unseen_classes)

    def name_swapped_vocabulary(self) -> Vocabulary:
        """The vocabulary with every unseen class named as the next unseen class (a cyclic shift,
        so no unseen class keeps its own names); seen classes, templates and background unchanged.

        One of the permutations ``name_swap_control`` averages over; a pass with it checks that
        control's premise, that renaming classes only relabels a method's predictions."""
        unseen = sorted(set(self.unseen_indices))
        classes = list(self.vocabulary.classes)
        for position, index in enumerate(unseen):
            classes[index] = self.vocabulary.classes[unseen[(position + 1) % len(unseen)]]
        return replace(self.vocabulary, classes=tuple(classes))


@dataclass(frozen=True)
class TrainingClasses:
    """The label space of a mask-supervised training set.

    Attributes:
        vocabulary: label value ``k`` of the training label maps is class ``k`` of this vocabulary.
        unseen_classes: display names of classes held out of training (zero-shot splits); their
            pixels are ignored and their names are never given to the trained model.
    """

    vocabulary: Vocabulary
    unseen_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "unseen_classes", tuple(self.unseen_classes))
        check_unseen_names(self.unseen_classes, self.vocabulary, "the training classes")

    @property
    def seen_indices(self) -> tuple[int, ...]:
        """Label values of the classes trained on."""
        unseen = {self.vocabulary.index_of(name) for name in self.unseen_classes}
        return tuple(k for k in range(len(self.vocabulary)) if k not in unseen)

    @property
    def seen_names(self) -> tuple[str, ...]:
        """Display names of the classes trained on, in label order."""
        return tuple(self.vocabulary.display_names[k] for k in self.seen_indices)


def check_unique_names(benchmarks: Sequence[Benchmark]) -> None:
    """Raise if two benchmarks share a name (their metrics would overwrite each other)."""
    names = [benchmark.name for benchmark in benchmarks]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"benchmark names must be unique, duplicated: {duplicated}")


def check_unseen_names(names: Sequence[str], vocabulary: Vocabulary, where: str) -> None:
    """Raise :class:`UserError` naming every entry of ``unseen_classes`` that is not a class of ``vocabulary``."""
    known = {name for synonyms in vocabulary.classes for name in synonyms} | set(vocabulary.display_names)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(
            f"{where}: unseen_classes names {unknown}, which are not in its class names "
            f"{list(vocabulary.display_names)}; use the class-name file's spelling"
        )
