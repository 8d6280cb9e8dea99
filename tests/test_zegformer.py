"""ZegFormer: fusion rule, CLIP crop branch, no-object logit, shapes, semantic inference, frozen CLIP
and a short training (../shared/reference/zegformer.md)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ovseg.benchmark import TrainingClasses
from ovseg.datamodules.synthetic import CATEGORIES
from ovseg.datamodules.synthetic.datamodule import SyntheticDataModule
from ovseg.encoders import OpenCLIPImage, OpenCLIPText, tiny_open_clip_config
from ovseg.methods import METHODS
from ovseg.methods.zegformer import (
    SegmentClassifier,
    TimmBackbone,
    ZegFormer,
    ZegFormerModel,
    fuse_scores,
    mask_boxes,
    masked_crops,
    semantic_inference,
)
from ovseg.methods.zegformer.model import CLIPCropClassifier, class_probabilities
from ovseg.module import MaskPredictions
from ovseg.optim import parameter_groups
from ovseg.thread_invariance import intra_op_threads
from ovseg.vocabulary import Vocabulary

TINY = {
    "backbone": "test_resnet",
    "freeze_bn": False,
    "num_queries": 6,
    "conv_dim": 16,
    "mask_dim": 16,
    "hidden_dim": 16,
    "dec_layers": 2,
    "heads": 2,
    "ffn_dim": 32,
    "clip_crop_size": 32,
    "size_divisibility": 32,
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine two OpenMP threads
    spin against other processes (a tiny training step took 13 s instead of 0.2 s)."""
    with intra_op_threads(1):
        yield


def tiny_zegformer(**overrides) -> ZegFormer:
    config = tiny_open_clip_config("vit")
    kwargs = {**TINY, **overrides}
    return ZegFormer(OpenCLIPText(config=config), OpenCLIPImage(config=config), **kwargs)


# ------------------------------------------------------------------------------- fusion (1.5)
def test_fusion_rule_by_hand():
    # classes: A, B seen; C, D unseen. Values are cubes so that the powers 1/3, 2/3 are exact.
    seen = torch.tensor([True, True, False, False])
    p_seg = torch.tensor([[0.512, 0.064, 0.216, 0.008], [0.027, 0.729, 0.001, 0.125]])
    p_clip = torch.tensor(
        [
            [0.100, 0.150, 0.343, 0.027],  # seen mean 0.125 -> cube root 0.5
            [0.010, 0.006, 0.729, 0.001],
        ]
    )  # seen mean 0.008 -> cube root 0.2
    # seen:   p^(2/3) * mean_seen(p')^(1/3); unseen: p^(1/3) * p'^(2/3)
    expected = torch.tensor(
        [[0.64 * 0.5, 0.16 * 0.5, 0.6 * 0.49, 0.2 * 0.09], [0.09 * 0.2, 0.81 * 0.2, 0.1 * 0.81, 0.5 * 0.01]]
    )
    fused = fuse_scores(p_seg, p_clip, seen)
    assert torch.allclose(fused, expected, atol=1e-6)
    assert torch.allclose(fused, torch.tensor([[0.32, 0.08, 0.294, 0.018], [0.018, 0.162, 0.081, 0.005]]), atol=1e-6)
    # the mean does not reorder seen classes among themselves
    assert torch.equal(fused[:, :2].argsort(-1), p_seg[:, :2].argsort(-1))
    # batched over (B, N, K) and the weight is a parameter
    batched = fuse_scores(p_seg.view(1, 2, 4), p_clip.view(1, 2, 4), seen, weight=1.0)
    assert torch.allclose(batched[0, :, :2], p_seg[:, :2]) and torch.allclose(batched[0, :, 2:], p_clip[:, 2:])


def test_calibration_is_subtracted_from_seen_pixel_scores_after_semantic_inference():
    model = tiny_zegformer(clip_classification=False, calibration=0.1).eval()
    names = ("sky", "grass", "sand")
    model.set_training_classes(TrainingClasses(Vocabulary.from_names(list(names)), ("sand",)))
    text = F.normalize(torch.randn(3, 32), dim=-1)
    with torch.no_grad():
        out = model.predict_scores(torch.rand(1, 3, 40, 48), text, vocabulary=Vocabulary.from_names(list(names)))
    assert out.query_offsets.tolist() == pytest.approx([-0.1, -0.1, 0.0])
    plain = semantic_inference(out.class_probs, out.mask_logits)
    scores = out.pixel_scores()
    assert torch.allclose(scores[:, :2], plain[:, :2] - 0.1, atol=1e-6)
    assert torch.allclose(scores[:, 2], plain[:, 2])


def test_synonyms_of_a_seen_class_are_calibrated_and_fused_as_seen():
    """A query is seen by its class: "heaven", a synonym of the seen "sky" that training never
    named, is calibrated like "sky"; the unseen "sand" is not."""
    model = tiny_zegformer(clip_classification=False, calibration=0.1).eval()
    model.set_training_classes(TrainingClasses(Vocabulary.from_names(["sky", "grass", "sand"]), ("sand",)))
    queries = Vocabulary.from_names([["sky", "heaven"], "grass", "sand"])
    with torch.no_grad():
        out = model.predict_scores(
            torch.rand(1, 3, 64, 64), F.normalize(torch.randn(4, 32), dim=-1), vocabulary=queries
        )
    assert out.query_offsets.tolist() == pytest.approx([-0.1, -0.1, -0.1, 0.0])


# ------------------------------------------------------------------------------- semantic inference (5)
def test_semantic_inference_by_hand():
    # 2 masks over a 1x2 image: sigmoid(0) = 0.5, sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25
    ln3 = torch.log(torch.tensor(3.0))
    masks = torch.tensor([[[[0.0, -ln3]], [[ln3, 0.0]]]])  # (B=1, N=2, 1, 2)
    probs = torch.tensor([[[0.5, 0.25], [0.1, 0.6]]])  # (1, N=2, K=2)
    expected = torch.tensor(
        [[[[0.5 * 0.5 + 0.1 * 0.75, 0.5 * 0.25 + 0.1 * 0.5]], [[0.25 * 0.5 + 0.6 * 0.75, 0.25 * 0.25 + 0.6 * 0.5]]]]
    )
    assert torch.allclose(semantic_inference(probs, masks), expected)
    assert torch.allclose(expected, torch.tensor([[[[0.325, 0.175]], [[0.575, 0.3625]]]]))
    assert torch.allclose(MaskPredictions(masks, probs).pixel_scores(), expected)


def test_predict_scores_segment_branch_is_softmax_without_no_object():
    model = tiny_zegformer(clip_classification=False, calibration=0.0).eval()
    images, text = torch.rand(2, 3, 64, 64), F.normalize(torch.randn(4, 32), dim=-1)
    with torch.no_grad():
        out = model.predict_scores(images, text, vocabulary=Vocabulary.from_names(["a", "b", "c", "d"]))
        logits = model.classifier(model(images).segment_embeddings[-1], text)
    assert out.query_offsets is None
    assert out.mask_logits.shape == (2, 6, 64, 64) and out.class_probs.shape == (2, 6, 4)
    assert torch.allclose(out.class_probs, logits.softmax(-1)[..., :4], atol=1e-6)
    assert bool((out.class_probs.sum(-1) < 1).all())  # no-object takes the rest


# ------------------------------------------------------------------------------- classification (1.2)
def test_no_object_logit_is_an_unnormalised_dot_product_times_100():
    classifier = SegmentClassifier(4, temperature=0.01)
    assert classifier.no_object_embedding.shape == (1, 4) and classifier.no_object_embedding.requires_grad
    with torch.no_grad():
        classifier.no_object_embedding.copy_(torch.tensor([[2.0, 0.0, 0.0, 0.0]]))  # norm 2, kept as is
    segment = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    text = F.normalize(torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]), dim=-1)
    logits = classifier(segment, text)
    assert torch.allclose(logits, torch.tensor([[100 * 0.5**0.5, 0.0, 200.0]]), atol=1e-4)
    assert torch.allclose(class_probabilities(logits), logits.softmax(-1)[..., :2])


# ------------------------------------------------------------------------------- CLIP crops (1.4)
def test_mask_boxes_of_known_masks_and_empty_mask_is_full_image():
    masks = torch.zeros(4, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 1:6] = True  # rows 2..4, cols 1..5
    masks[1, 0, 0] = True  # one pixel
    masks[2, 3, 9] = masks[2, 7, 4] = True  # two pixels: box spans both
    boxes = mask_boxes(masks.view(2, 2, 8, 10))  # (B, N) leading dims are kept
    assert boxes.shape == (2, 2, 4)
    assert boxes.view(4, 4).tolist() == [[1, 2, 6, 5], [0, 0, 1, 1], [4, 3, 10, 8], [0, 0, 10, 8]]


def test_masked_crops_match_one_roi_align_per_proposal():
    images = torch.randn(2, 3, 12, 16)
    masks = torch.rand(2, 3, 12, 16) > 0.7
    masks[0, 1] = False  # empty: full image
    masks[1, 2] = False
    masks[1, 2, 4:9, 2:5] = True
    crops = masked_crops(images, masks, size=8)
    assert crops.shape == (6, 3, 8, 8)
    for b in range(2):
        for n in range(3):
            mask = masks[b, n]
            if mask.any():
                ys, xs = torch.nonzero(mask, as_tuple=True)
                box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            else:
                box = [0, 0, 16, 12]
            box = torch.tensor([[0.0, *map(float, box)]])
            expected = roi_align((images[b] * mask).unsqueeze(0), box, 8, aligned=True)[0]
            assert torch.allclose(crops[b * 3 + n], expected, atol=1e-5)
    # pixels outside the mask are 0 (the CLIP mean in normalised space): a box-shaped mask's crop
    # is the image inside the box
    box_only = roi_align(images[1:2], torch.tensor([[0.0, 2.0, 4.0, 5.0, 9.0]]), 8, aligned=True)[0]
    assert not torch.allclose(crops[5], box_only)  # bilinear samples at the border mix in the zeros
    assert torch.allclose(crops[5][:, 2:6, 2:6], box_only[:, 2:6, 2:6], atol=1e-5)


class CountingEncoder(torch.nn.Module):
    """Wraps an image encoder, recording the batch size of every ``encode`` call."""

    def __init__(self, encoder) -> None:
        super().__init__()
        self.inner = encoder
        self.calls: list[tuple[int, ...]] = []

    def normalize(self, images):
        return self.inner.normalize(images)

    def encode(self, images):
        self.calls.append(tuple(images.shape))
        return self.inner.encode(images)


def test_clip_branch_encodes_all_proposals_of_all_images_in_one_forward():
    model = tiny_zegformer(clip_classification=True, ensemble=True, calibration=0.0).eval()
    counter = CountingEncoder(model.clip_image)
    model.clip_image = counter
    names = ("sky", "grass", "sand")
    model.set_training_classes(TrainingClasses(Vocabulary.from_names(list(names)), ("sand",)))
    images, text = torch.rand(2, 3, 48, 40), F.normalize(torch.randn(3, 32), dim=-1)
    with torch.no_grad():
        out = model.predict_scores(images, text, vocabulary=Vocabulary.from_names(list(names)))
    assert counter.calls == [(2 * 6, 3, 32, 32)]  # B * N crops of clip_crop_size, once
    # the fused probabilities are fuse_scores of the two branches
    with torch.no_grad():
        seg_logits = model.classifier(model(images).segment_embeddings[-1], text)
        clip_logits = CLIPCropClassifier(counter, 32)(images, out.mask_logits, text, seg_logits[..., -1])
    assert torch.allclose(clip_logits[..., -1], seg_logits[..., -1])  # segment branch's no-object appended
    expected = fuse_scores(
        class_probabilities(seg_logits), class_probabilities(clip_logits), torch.tensor([True, True, False])
    )
    assert torch.allclose(out.class_probs, expected, atol=1e-5)
    # ZegFormer-img: CLIP-branch probabilities only
    model.ensemble = False
    with torch.no_grad():
        img_only = model.predict_scores(images, text, vocabulary=Vocabulary.from_names(list(names)))
    assert torch.allclose(img_only.class_probs, class_probabilities(clip_logits), atol=1e-5)


def test_clip_classification_needs_an_image_encoder():
    with pytest.raises(ValueError, match="clip_image"):
        ZegFormer(OpenCLIPText(config=tiny_open_clip_config("vit")), None, **TINY)


# ------------------------------------------------------------------------------- model shapes (1.1)
def test_model_outputs_per_decoder_layer():
    backbone = TimmBackbone("test_resnet", freeze_bn=True)
    assert backbone.channels == [32, 48, 192, 96]
    model = ZegFormerModel(
        backbone, embed_dim=24, num_queries=5, conv_dim=16, mask_dim=8, hidden_dim=16, dec_layers=3, heads=2, ffn_dim=32
    ).eval()
    out = model(torch.randn(2, 3, 64, 96))
    assert out.segment_embeddings.shape == (3, 2, 5, 24)
    assert out.mask_logits.shape == (3, 2, 5, 16, 24)  # stride 4
    assert torch.allclose(out.segment_embeddings.norm(dim=-1), torch.ones(3, 2, 5), atol=1e-5)


# ------------------------------------------------------------------------------- training
def test_clip_stays_frozen_and_in_eval_mode_through_lightning_training():
    data = SyntheticDataModule(num_train=8, num_val=2, image_size=48, batch_size=4, unseen_in_training="ignored")
    model = tiny_zegformer(
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        lr_multipliers={"model.backbone.": 0.1},
        print_metrics=False,
    )
    assert all(not p.requires_grad for p in model.clip_text.parameters())
    assert all(not p.requires_grad for p in model.clip_image.parameters())
    clip_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("clip_")}
    trained_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.")}
    groups = parameter_groups(model, {"model.backbone.": 0.1})
    names = [name for group in groups for name in group["names"]]
    assert not any(name.startswith("clip_") for name in names)
    assert {g["lr_multiplier"] for g in groups if any(n.startswith("model.backbone.") for n in g["names"])} == {0.1}

    modes: list[tuple[bool, bool, bool]] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            modes.append((module.model.training, module.clip_text.training, module.clip_image.training))

    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Spy()],
    )
    trainer.fit(model, data)
    assert modes == [(True, False, False)] * 2
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in clip_before.items())
    assert any(not torch.equal(state[k], v) for k, v in trained_before.items())
    seen = tuple(c.name for c in CATEGORIES if c.seen)
    assert model.seen_class_names == seen


def test_short_training_on_synthetic_scenes_decreases_the_loss():
    torch.manual_seed(0)
    data = SyntheticDataModule(num_train=4, image_size=48, batch_size=4, unseen_in_training="ignored")
    model = tiny_zegformer(clip_classification=False, dropout=0.0)
    model.set_training_classes(data.training_classes)
    batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        terms = model.training_loss(batch)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"].detach()))
    assert set(terms) == {"loss", "loss_ce", "loss_mask", "loss_dice"}
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_registered_in_methods():
    assert METHODS["zegformer"] == "ovseg.methods.zegformer.ZegFormer"


# ---------------------------------------------------------------------------- release switches (issue 15)
def test_release_crop_boxes_end_at_the_last_occupied_index_and_zero_area_falls_back_to_the_image():
    """The official rule (cumsum argmax/argmin in MaskFormer.forward), worked out by hand: x2/y2 are
    the last occupied column/row index; a box of zero area (one row or one column) or an empty mask
    becomes the whole (padded) image."""
    masks = torch.zeros(5, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 1:6] = True  # rows 2..4, cols 1..5
    masks[1, 0, 0] = True  # one pixel: zero area
    masks[2, 3, 9] = masks[2, 7, 4] = True  # two pixels: box spans both
    masks[3, 1:7, 4] = True  # one column: zero area
    release = mask_boxes(masks, "release").tolist()
    assert release == [[1, 2, 5, 4], [0, 0, 10, 8], [4, 3, 9, 7], [0, 0, 10, 8], [0, 0, 10, 8]]
    tight = mask_boxes(masks, "tight").tolist()
    assert tight == [[1, 2, 6, 5], [0, 0, 1, 1], [4, 3, 10, 8], [4, 1, 5, 7], [0, 0, 10, 8]]
    with pytest.raises(ValueError, match="release"):
        mask_boxes(masks, "official")  # type: ignore[arg-type]


def test_release_crops_are_taken_on_the_padded_image():
    """With ``box_rule="release"`` a proposal reaching into the padding is cropped there (CLIP-normalised
    zeros); ``"tight"`` cuts the masks to the image first."""
    torch.manual_seed(0)
    encoder = OpenCLIPImage(config=tiny_open_clip_config())
    images = torch.rand(1, 3, 20, 24)
    logits = torch.full((1, 1, 32, 32), -10.0)
    logits[..., 10:30, 12:30] = 10.0  # the mask runs past the image (20 x 24) into the padding
    seen: list[torch.Tensor] = []
    encoder.encode = lambda crops: seen.append(crops) or encoder.__class__.encode(encoder, crops)  # type: ignore
    text = F.normalize(torch.randn(3, 32), dim=-1)
    for rule in ("release", "tight"):
        CLIPCropClassifier(encoder, crop_size=16, box_rule=rule)(images, logits, text, torch.zeros(1, 1))
    pixels = encoder.normalize(images)
    padded = F.pad(pixels, (0, 8, 0, 12)) * (logits[0].sigmoid() > 0.5)
    expected_release = roi_align(padded, [torch.tensor([[12.0, 10.0, 29.0, 29.0]])], 16, aligned=True)
    tight_image = pixels * (logits[0, :, :20, :24].sigmoid() > 0.5)
    expected_tight = roi_align(tight_image, [torch.tensor([[12.0, 10.0, 24.0, 20.0]])], 16, aligned=True)
    torch.testing.assert_close(seen[0], expected_release)
    torch.testing.assert_close(seen[1], expected_tight)


def test_training_images_are_padded_with_the_normalised_train_pad_value():
    model = tiny_zegformer(train_pad_value=128)
    pixels = model.normalize(torch.rand(2, 3, 40, 50))
    padded, labels = model.pad_batch(pixels, torch.zeros(2, 40, 50, dtype=torch.long), fill=model.training_pad_fill())
    grey = model.normalize(torch.full((1, 3, 1, 1), 128 / 255)).view(3)
    assert padded.shape == (2, 3, 64, 64)
    assert labels is not None and labels.shape == (2, 64, 64)
    torch.testing.assert_close(padded[..., :40, :50], pixels)
    torch.testing.assert_close(padded[:, :, 40:, :], grey.view(1, 3, 1, 1).expand(2, 3, 24, 64))
    torch.testing.assert_close(padded[:, :, :, 50:], grey.view(1, 3, 1, 1).expand(2, 3, 64, 14))
    assert (labels[:, 40:] == 255).all() and (labels[:, :, 50:] == 255).all()
    assert tiny_zegformer().training_pad_fill() is None  # ovseg's default: 0 after normalisation
    with pytest.raises(ValueError, match="train_pad_value"):
        tiny_zegformer(train_pad_value=300)


def test_release_class_names_differ_from_ovsegs_in_fifteen_coco_stuff_names():
    release = Vocabulary.from_file("packaged:coco_stuff_zegformer")
    ovseg_names = Vocabulary.from_file("packaged:coco_stuff")
    assert len(release.classes) == len(ovseg_names.classes) == 171
    differ = [(a[0], b[0]) for a, b in zip(release.classes, ovseg_names.classes) if a != b]
    assert len(differ) == 15
    assert ("traffic light", "trafficlight") in differ and ("potted plant", "pottedplant") in differ
    voc = Vocabulary.from_file("packaged:voc20_zegformer")
    assert [names[0] for names in voc.classes][-5:] == ["potted plant", "sheep", "sofa", "train", "tvmonitor"]


def test_a_model_without_training_classes_takes_the_datamodules_split_at_evaluation():
    """A converted release checkpoint records no training classes; validating it on a zero-shot
    DataModule must still fuse and calibrate that DataModule's seen classes as seen."""
    from types import SimpleNamespace

    model = tiny_zegformer()
    split = TrainingClasses(Vocabulary((("cat",), ("dog",), ("sand",))), ("sand",))
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(training_classes=split, benchmarks=[]))
    model.setup("validate")
    assert model.seen_class_names == ("cat", "dog")
    other = TrainingClasses(Vocabulary((("cat",), ("kite",))), ("kite",))
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(training_classes=other, benchmarks=[]))
    model.setup("validate")  # classes recorded in a checkpoint (or set before) are kept
    assert model.seen_class_names == ("cat", "dog")
