"""The shared base of mask-classification methods: training classes, targets, cache, checkpoints."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from ovseg.benchmark import TrainingClasses
from ovseg.datamodules.synthetic import CATEGORIES
from ovseg.datamodules.synthetic.datamodule import SyntheticDataModule
from ovseg.mask_classification import MaskClassificationModule
from ovseg.masks import MaskSetCriterion
from ovseg.module import MaskPredictions
from ovseg.vocabulary import Vocabulary


class CountingText(nn.Module):
    """A frozen 'text encoder' that embeds a text by its hash and counts its calls."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.calls = 0

    def forward(self, texts: list[str]) -> Tensor:
        self.calls += 1
        generator = torch.Generator().manual_seed(0)
        table = torch.randn(4096, self.dim, generator=generator)
        return table[[sum(map(ord, t)) % 4096 for t in texts]]


class TinyMaskMethod(MaskClassificationModule):
    """Two fixed masks per image (left / right half) with learnable class embeddings."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.text = CountingText()
        self.queries = nn.Parameter(torch.randn(2, 8))
        self.mask_bias = nn.Parameter(torch.zeros(2, 1, 1))

    def encode_text(self, texts: list[str]) -> Tensor:
        return self.text(texts)

    def _outputs(self, images: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = images.shape
        masks = torch.full((b, 2, h, w), -5.0)
        masks[:, 0, :, : w // 2] = 5.0
        masks[:, 1, :, w // 2 :] = 5.0
        logits = torch.cat([self.queries @ text.T, torch.zeros(2, 1)], dim=1)  # (2, K + 1)
        return logits.expand(b, -1, -1), masks + self.mask_bias

    def predict_scores(self, images, text_embeddings, vocabulary=None):
        logits, masks = self._outputs(images, text_embeddings)
        return MaskPredictions(masks, logits.softmax(-1)[..., :-1])

    def training_loss(self, batch):
        logits, masks = self._outputs(batch["image"], self.training_text_embeddings())
        criterion = MaskSetCriterion(self.num_training_classes)
        return criterion(logits.unsqueeze(0), masks.unsqueeze(0), self.mask_targets(batch["label"]))


def test_training_classes_come_from_the_datamodule_and_travel_in_the_checkpoint(tmp_path):
    data = SyntheticDataModule(num_train=8, num_val=4, image_size=32, batch_size=4, unseen_in_training="ignored")
    module = TinyMaskMethod(optimizer=lambda params: torch.optim.SGD(params, lr=0.1), print_metrics=False)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    seen = tuple(c.name for c in CATEGORIES if c.seen)
    assert module.seen_class_names == seen and module.num_training_classes == len(seen)
    # the frozen text encoder ran once for the training classes, not once per step
    assert module.text.calls == 1
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    restored = TinyMaskMethod()
    restored.on_load_checkpoint(torch.load(path, weights_only=False))
    assert restored.seen_class_names == seen
    unseen = [c.name for c in CATEGORIES if not c.seen]
    queries = Vocabulary.from_names([seen[0], unseen[0], "zebra", [f"a {seen[1]}", seen[1]]])
    assert restored.seen_queries(queries).tolist() == [True, False, False, True, True]


def test_mask_targets_drop_unseen_classes():
    module = TinyMaskMethod()
    module.set_training_classes(TrainingClasses(Vocabulary.from_names(["sky", "cow", "grass"]), ("cow",)))
    labels = torch.tensor([[[0, 1], [2, 255]]])
    (target,) = module.mask_targets(labels)
    assert target.labels.tolist() == [0, 1]  # sky -> 0, grass -> 1, cow dropped
    assert target.masks.tolist() == [[[1, 0], [0, 0]], [[0, 0], [1, 0]]]
    assert module.training_vocabulary().display_names == ("sky", "grass")


def test_query_offsets_shift_every_pixel_score():
    masks = torch.tensor([[[[0.0, 2.0]], [[1.0, -1.0]]]])  # (B=1, M=2, 1, 2)
    probs = torch.tensor([[[0.5, 0.25], [0.1, 0.6]]])  # (1, M=2, Q=2)
    plain = MaskPredictions(masks, probs).pixel_scores()
    sig = masks.sigmoid()
    expected = torch.stack([0.5 * sig[0, 0] + 0.1 * sig[0, 1], 0.25 * sig[0, 0] + 0.6 * sig[0, 1]]).unsqueeze(0)
    assert torch.allclose(plain, expected)
    shifted = MaskPredictions(masks, probs, torch.tensor([-0.1, 0.0])).pixel_scores()
    assert torch.allclose(shifted[:, 0], plain[:, 0] - 0.1) and torch.allclose(shifted[:, 1], plain[:, 1])
