"""The synthetic world as a LightningDataModule: captioned, labelled scenes generated on the fly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ovseg.benchmark import AbsentPolicy, Benchmark, TrainingClasses
from ovseg.datamodules.base import collate_samples, evaluation_sampler
from ovseg.datamodules.synthetic.categories import CATEGORIES
from ovseg.datamodules.synthetic.dataset import SyntheticDataset
from ovseg.datamodules.synthetic.world import SyntheticWorld
from ovseg.inference import InferenceSettings
from ovseg.vocabulary import Vocabulary

UnseenInTraining = Literal["labelled", "ignored", "absent"]


class _IgnoreUnseen(Dataset):
    """Wraps a dataset so that pixels of unseen classes become ``ignore_index`` (training only)."""

    def __init__(self, dataset: Dataset, unseen: Sequence[int], ignore_index: int = 255) -> None:
        self.dataset = dataset
        self.unseen = torch.tensor(sorted(unseen), dtype=torch.long)
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        label = sample["label"]
        sample["label"] = torch.where(torch.isin(label, self.unseen), torch.full_like(label, self.ignore_index), label)
        return sample


class SyntheticDataModule(L.LightningDataModule):
    """Training scenes with captions and label maps, and one evaluation benchmark ``synthetic``.

    Args:
        num_train: training scenes per epoch.
        num_val: validation scenes (disjoint from training).
        image_size: side of the square scenes.
        seed: world seed; the same seed gives the same scenes.
        batch_size: training batch size (per process).
        eval_batch_size: evaluation batch size.
        num_workers: dataloader workers.
        templates: prompt templates of the evaluation vocabulary ("single", "imagenet80" or a list).
        use_synonyms: evaluation classes take the max over their synonyms too.
        unseen_in_training: what the training scenes hold of the unseen categories:
            ``"labelled"`` (default): everything, labelled (caption-trained methods read only the
            captions); ``"ignored"``: their pixels become 255 in the training labels, the zero-shot
            protocol of the ZegFormer release (unseen objects stay in the images, in no target
            mask); ``"absent"``: training scenes are drawn from the seen categories only, as in a
            data set annotated for the seen classes alone (ZS3Net's protocol, which drops training
            images that show an unseen class). Validation scenes never change.
        inference: resize / sliding-window settings of the benchmark.
        absent_policy: metric convention for classes predicted but absent from the ground truth.
        close_up_fraction: share of training scenes that are close-ups of one category on a plain
            background (:class:`SyntheticWorld`; CLIP pretraining); validation scenes never are.
        name_swap_control: also report the unseen mIoU with the unseen names permuted among
            themselves and the zero-shot margin (:class:`~ovseg.benchmark.Benchmark`; no extra pass).
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 100,
        image_size: int = 112,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        templates: str | list[str] = "single",
        use_synonyms: bool = False,
        unseen_in_training: UnseenInTraining = "labelled",
        inference: InferenceSettings | None = None,
        absent_policy: AbsentPolicy = "zero",
        close_up_fraction: float = 0.0,
        name_swap_control: bool = False,
    ) -> None:
        super().__init__()
        if unseen_in_training not in get_args(UnseenInTraining):
            raise ValueError(
                f"unseen_in_training must be one of {get_args(UnseenInTraining)}, got {unseen_in_training!r}"
            )
        self.unseen_in_training = unseen_in_training
        excludes = tuple(self.unseen_indices) if unseen_in_training == "absent" else ()
        self.world = SyntheticWorld(
            image_size=image_size, seed=seed, close_up_fraction=close_up_fraction, excluded_from_training=excludes
        )
        self.num_train = num_train
        self.num_val = num_val
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        classes = [(c.name, *c.synonyms) if use_synonyms else (c.name,) for c in CATEGORIES]
        self.benchmarks = [
            Benchmark(
                name="synthetic",
                vocabulary=Vocabulary(tuple(classes), templates),
                inference=inference or InferenceSettings(),
                absent_policy=absent_policy,
                unseen_classes=tuple(c.name for c in CATEGORIES if not c.seen),
                name_swap_control=name_swap_control,
            )
        ]
        # label maps index CATEGORIES; mask-supervised methods train on the seen classes only
        # unless the unseen ones are labelled
        self.training_classes = TrainingClasses(
            vocabulary=Vocabulary(tuple((c.name,) for c in CATEGORIES)),
            unseen_classes=self.benchmarks[0].unseen_classes if unseen_in_training != "labelled" else (),
        )

    @property
    def unseen_indices(self) -> list[int]:
        """Category indices of the unseen split."""
        return [index for index, category in enumerate(CATEGORIES) if not category.seen]

    def train_dataset(self) -> Dataset:
        dataset: Dataset = SyntheticDataset(self.world, "train", self.num_train)
        if self.unseen_in_training == "ignored":
            dataset = _IgnoreUnseen(dataset, self.unseen_indices)
        return dataset

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # evaluation: each scene once across processes (no padding by repeated scenes)
        sampler = None if shuffle else evaluation_sampler(dataset, self.trainer)  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            sampler=sampler,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(SyntheticDataset(self.world, "val", self.num_val), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
