"""OVSegModule's shared evaluation: vocabularies per dataloader, synonyms, background, masks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ovseg.benchmark import Benchmark
from ovseg.datamodules.base import collate_samples
from ovseg.errors import UserError
from ovseg.inference import InferenceSettings
from ovseg.metrics import confusion_matrix, metrics_from_confusion
from ovseg.module import MaskPredictions, OVSegModule
from ovseg.vocabulary import Vocabulary

WORDS = ["cat", "kitty", "dog", "car", "tree", "sky"]  # the oracle's "text space": one axis per word
COLOURS = {"cat": 0, "kitty": 0, "dog": 1, "car": 2, "tree": 3, "sky": 4}  # image channel-0 level


class OracleMethod(OVSegModule):
    """Reads the class from the image: pixel value v = level/8 in channel 0 means word-level `level`.

    Texts embed as one-hot over WORDS (template words ignored); a pixel's feature is one-hot over
    levels mapped back to words, so a correct pipeline gets 100 mIoU. ``mask_mode`` returns the
    same decision as MaskPredictions (one mask per level).
    """

    def __init__(self, mask_mode: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.mask_mode = mask_mode
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.encoded: list[str] = []

    def encode_text(self, texts):
        self.encoded.extend(texts)
        out = torch.zeros(len(texts), len(WORDS))
        for row, text in enumerate(texts):
            for column, word in enumerate(WORDS):
                if f" {word}" in f" {text.strip('.')}":
                    out[row, column] = 1
        return out

    def word_features(self, images):
        level = (images[:, 0] * 8).round().long()  # (B, H, W), 7 = "nothing"
        feats = torch.zeros(images.shape[0], len(WORDS), *images.shape[-2:])
        for word, lvl in COLOURS.items():
            feats[:, WORDS.index(word)] = (level == lvl).float()
        return feats

    def predict_scores(self, images, text_embeddings, vocabulary=None):
        feats = self.word_features(images)  # (B, W, H, W)
        logits = 20 * torch.einsum("bwhx,qw->bqhx", feats, F.normalize(text_embeddings, dim=-1))
        if not self.mask_mode:
            return logits
        masks = feats * 40 - 20  # mask logits per word
        class_probs = F.normalize(text_embeddings, dim=-1).T.unsqueeze(0).expand(images.shape[0], -1, -1)
        return MaskPredictions(masks, class_probs.clamp(min=0))

    def training_loss(self, batch):
        return {"loss": self.dummy.sum()}


def make_image(levels):
    """(3, H, W) float image whose channel 0 encodes the given (H, W) level map."""
    levels = torch.as_tensor(levels, dtype=torch.float32)
    return torch.stack([levels / 8, torch.zeros_like(levels), torch.zeros_like(levels)])


class TwoBenchmarks(L.LightningDataModule):
    def __init__(self, samples_a, samples_b, benchmarks):
        super().__init__()
        self.samples = [samples_a, samples_b]
        self.benchmarks = benchmarks

    def val_dataloader(self):
        return [DataLoader(s, batch_size=2, collate_fn=collate_samples) for s in self.samples]

    test_dataloader = val_dataloader


def sample(levels, labels):
    return {"image": make_image(levels), "label": torch.as_tensor(labels, dtype=torch.long)}


def test_two_benchmarks_each_with_its_vocabulary_and_synonyms():
    # Benchmark A: {cat (synonym kitty), dog}; benchmark B: {sky, tree, car}, whole vs sliding.
    a_levels = torch.tensor([[0, 0, 1], [1, 1, 0]])
    a = [sample(a_levels, [[0, 0, 1], [1, 255, 0]]), sample(a_levels.T, [[0, 1], [0, 1], [1, 0]])]
    b_levels = torch.tensor([[4, 4, 4, 4], [3, 3, 2, 2], [3, 3, 2, 2]])
    b = [sample(b_levels, [[0, 0, 0, 0], [1, 1, 2, 2], [1, 1, 2, 2]])] * 3
    benchmarks = [
        Benchmark("pets", Vocabulary.from_names(["kitty, cat", "dog"], templates=["a {}.", "the {}"])),
        Benchmark("outdoor", Vocabulary.from_names(["sky", "tree", "car"]), InferenceSettings(window=2, stride=1)),
    ]
    model = OracleMethod()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = trainer.validate(model, datamodule=TwoBenchmarks(a, b, benchmarks), verbose=False)[0]
    assert results["val/pets/mIoU"] == pytest.approx(100.0)
    assert results["val/outdoor/mIoU"] == pytest.approx(100.0)
    assert results["val/mIoU"] == pytest.approx(100.0)
    # Each query was embedded once per template in a single validation pass (the cache works).
    assert sorted(model.encoded[:6]) == sorted(["a kitty.", "the kitty", "a cat.", "the cat", "a dog.", "the dog"])
    assert len(model.encoded) == 6 + 3


def test_metrics_match_an_independent_confusion_matrix_when_the_model_errs():
    levels = torch.tensor([[0, 1, 2, 2], [1, 1, 7, 2]])  # 7 = no word: logits all zero -> argmax 0
    labels = torch.tensor([[0, 1, 1, 2], [1, 2, 0, 255]])
    benchmarks = [
        Benchmark("a", Vocabulary.from_names(["cat", "dog", "car"])),
        Benchmark("b", Vocabulary.from_names(["cat", "dog", "car"]), absent_policy="exclude"),
    ]
    model = OracleMethod()
    data = TwoBenchmarks([sample(levels, labels)], [sample(levels, labels)], benchmarks)
    results = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
        model, datamodule=data, verbose=False
    )[0]
    prediction = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2]])
    expected = metrics_from_confusion(confusion_matrix(prediction, labels, 3))
    assert results["val/a/mIoU"] == pytest.approx(float(expected["mIoU"]))
    assert results["val/a/pAcc"] == pytest.approx(float(expected["pAcc"]))
    assert results["val/a/mIoU"] < 100


def test_background_by_threshold():
    vocabulary = Vocabulary.from_names(["", "cat", "dog"], background_threshold=0.9)
    model = OracleMethod()
    image = make_image([[0, 1, 7]])  # the last pixel has no word: uniform probabilities
    assert model.segment(image, vocabulary)[0].tolist() == [[1, 2, 0]]
    no_bg = Vocabulary.from_names(["cat", "dog"])
    assert model.segment(image, no_bg)[0][0, :2].tolist() == [0, 1]


@pytest.mark.parametrize("window", [None, 3])
def test_mask_predictions_become_pixel_scores(window):
    settings = InferenceSettings(window=window, stride=2 if window else None)
    levels = torch.tensor([[0, 1, 2, 2, 1], [1, 1, 0, 2, 2], [2, 2, 2, 1, 0]])
    vocabulary = Vocabulary.from_names(["cat", "dog", "car"])
    logits_model, mask_model = OracleMethod(), OracleMethod(mask_mode=True)
    expected = logits_model.segment(make_image(levels), vocabulary, settings)[0]
    assert torch.equal(expected, levels)
    assert torch.equal(mask_model.segment(make_image(levels), vocabulary, settings)[0], levels)


def test_segment_accepts_images_of_different_sizes_and_output_sizes():
    model = OracleMethod()
    images = [make_image([[0, 1]]), make_image([[1], [0], [1]]), make_image([[1, 0]])]
    out = model.segment(images, ["cat", "dog"], output_sizes=[(2, 4), (3, 1), (1, 2)])
    assert [o.shape for o in out] == [(2, 4), (3, 1), (1, 2)]
    assert out[1].flatten().tolist() == [1, 0, 1]
    assert out[2].flatten().tolist() == [1, 0]


def test_missing_benchmarks_and_duplicate_names_are_reported():
    model = OracleMethod()
    bad = TwoBenchmarks([], [], [Benchmark("x", Vocabulary.from_names(["cat"]))] * 2)
    with pytest.raises(ValueError, match="unique"):
        L.Trainer(accelerator="cpu", logger=False).validate(model, datamodule=bad, verbose=False)


def test_nan_loss_stops_with_step_and_terms():
    class NaNMethod(OracleMethod):
        def training_loss(self, batch):
            return {"loss": self.dummy.sum() * float("nan"), "loss_global": torch.tensor(1.0)}

    model = NaNMethod()
    with pytest.raises(FloatingPointError, match=r"step 0.*loss_global"):
        model.training_step({"image": torch.zeros(1, 3, 2, 2)}, 0)


def test_name_swap_control_reports_the_zero_shot_margin():
    """The oracle reads classes by name: with the unseen names (dog, car, tree) permuted among
    themselves every unseen pixel goes to a wrong unseen class, so the swapped unseen mIoU is 0 and
    the margin is the whole unseen mIoU; a seen-only error (sky) moves neither. (The general case,
    the mean over all derangements: tests/test_name_swap.py.)"""
    levels = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 7]])  # 7: no word (argmax 0 = cat)
    labels = torch.tensor([[0, 1, 2, 3], [4, 4, 1, 4]])
    vocabulary = Vocabulary.from_names(["cat", "dog", "car", "tree", "sky"])
    benchmark = Benchmark("zs", vocabulary, unseen_classes=("dog", "car", "tree"), name_swap_control=True)
    swapped = benchmark.name_swapped_vocabulary()
    assert swapped.classes == (("cat",), ("car",), ("tree",), ("dog",), ("sky",))
    data = TwoBenchmarks([sample(levels, labels)], [sample(levels, labels)], [benchmark, Benchmark("b", vocabulary)])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = trainer.validate(OracleMethod(), datamodule=data, verbose=False)[0]
    assert results["val/zs/mIoU_unseen"] == pytest.approx(100.0)
    assert results["val/zs/mIoU_unseen_swapped"] == pytest.approx(0.0)
    assert results["val/zs/zs_margin"] == pytest.approx(100.0)
    assert results["val/zs/mIoU_seen"] == pytest.approx((50.0 + 200 / 3) / 2)  # cat 1/2, sky 2/3
    assert "val/b/zs_margin" not in results  # only where asked


def test_name_swap_control_needs_two_unseen_classes():
    with pytest.raises(UserError, match="at least two unseen classes"):
        Benchmark("zs", Vocabulary.from_names(["cat", "dog"]), unseen_classes=("dog",), name_swap_control=True)
