"""ovseg's ZegFormer against the official implementation (golden fixtures, issue 15).

``tests/fixtures/zegformer/golden.pt`` was written by ``scripts/golden/zegformer.py``, which runs the
release's own modules (ZegFormer @8cb9e8f on detectron2's ResNet) at a tiny size with random weights.
Its state dict is in the official key layout: ovseg loads it through the checkpoint converter
(:mod:`ovseg.methods.zegformer.convert`), so these tests also check the key mapping. Tolerance:
1e-5 (fp32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ovseg.benchmark import TrainingClasses
from ovseg.convert import ConversionError, KeyReport
from ovseg.encoders import OpenCLIPImage, OpenCLIPText
from ovseg.methods.zegformer import ZegFormer, masked_crops
from ovseg.methods.zegformer.convert import convert_state_dict
from ovseg.vocabulary import Vocabulary

FIXTURES = Path(__file__).parent / "fixtures" / "zegformer"
TOLERANCE = {"atol": 1e-5, "rtol": 0.0}


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return torch.load(FIXTURES / "golden.pt", weights_only=True)


def official_state_dict(golden: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fixture's state dict in fp32, the token embedding rebuilt (unused rows are 0)."""
    state = {key: value.float() for key, value in golden["state_dict"].items()}
    rows = golden["token_rows"].float()
    embedding = torch.zeros(golden["config"]["clip"]["text_cfg"]["vocab_size"], rows.shape[1])
    embedding[golden["token_ids"]] = rows
    state[golden["token_key"]] = embedding
    return state


def build_ovseg(golden: dict[str, Any], **overrides: Any) -> ZegFormer:
    """ovseg's ZegFormer at the fixture's sizes, release switches on (no weights loaded)."""
    config = golden["config"]
    sizes = config["sizes"]
    width = sizes["width_per_group"]
    torch.manual_seed(0)
    options: dict[str, Any] = {
        "clip_text": OpenCLIPText(config=config["clip"]),
        "clip_image": OpenCLIPImage(config=config["clip"]),
        "backbone": "resnet50",
        "backbone_kwargs": {"channels": [width, 2 * width, 4 * width, 8 * width]},
        "freeze_bn": True,
        "pixel_mean": [v / 255 for v in config["pixel_mean"]],
        "pixel_std": [v / 255 for v in config["pixel_std"]],
        "num_queries": sizes["num_queries"],
        "conv_dim": sizes["conv_dim"],
        "mask_dim": sizes["mask_dim"],
        "hidden_dim": sizes["hidden_dim"],
        "dec_layers": sizes["dec_layers"],
        "heads": sizes["heads"],
        "ffn_dim": sizes["ffn_dim"],
        "dropout": sizes["dropout"],
        "calibration": 0.1,
        "clip_crop_size": 224,
        "clip_logit_scale": 100.0,
        "clip_templates": config["clip_templates"],
        "clip_crop_boxes": "release",
        "training_templates": [config["segment_template"]],
    }
    options.update(overrides)
    model = ZegFormer(**options)
    model.set_training_classes(
        TrainingClasses(Vocabulary(tuple((n,) for n in config["all_classes"])), tuple(config["unseen"]))
    )
    return model


@pytest.fixture(scope="module")
def converted(golden: dict[str, Any]) -> tuple[ZegFormer, KeyReport]:
    model = build_ovseg(golden)
    state, report = convert_state_dict(official_state_dict(golden), model)
    model.load_state_dict(state, strict=True)
    return model.eval(), report


def vocabulary(golden: dict[str, Any]) -> Vocabulary:
    config = golden["config"]
    return Vocabulary(tuple((name,) for name in config["all_classes"]), (config["segment_template"],))


def padded_pixels(model: ZegFormer, images: torch.Tensor) -> torch.Tensor:
    return model.pad_batch(model.normalize(images.float() / 255))[0]


def test_converter_maps_every_official_key(golden: dict[str, Any], converted: tuple[ZegFormer, KeyReport]) -> None:
    _, report = converted
    official = official_state_dict(golden)
    report.check_complete(list(official), "golden.pt")
    assert report.filled == {}  # the fixture carries the CLIP towers too: nothing comes from the config
    assert set(report.dropped) == {
        "sem_seg_head.predictor.logit_scale",
        "sem_seg_head.predictor.clip_model.logit_scale",
        "criterion.empty_weight",
    }
    assert report.mapped["sem_seg_head.predictor.bg_feature"] == "classifier.no_object_embedding"
    assert (
        report.mapped["backbone.res3.0.shortcut.norm.running_var"]
        == "model.backbone.body.layer2.0.downsample.1.running_var"
    )
    assert (
        report.mapped["sem_seg_head.pixel_decoder.adapter_1.norm.weight"]
        == "model.pixel_decoder.laterals.2.norm.weight"
    )


def test_converter_refuses_unknown_missing_and_contradicting_keys(
    golden: dict[str, Any], converted: tuple[ZegFormer, KeyReport]
) -> None:
    model, _ = converted
    official = official_state_dict(golden)
    extra = {**official, "sem_seg_head.predictor.transformer.encoder.layers.0.linear1.weight": torch.zeros(2, 2)}
    _, report = convert_state_dict(extra, model)
    with pytest.raises(ConversionError, match="encoder.layers.0.linear1"):
        report.check_complete(list(extra), "extra.pth")
    lacking = {key: value for key, value in official.items() if key != "sem_seg_head.pixel_decoder.layer_4.weight"}
    with pytest.raises(ConversionError, match="pixel_decoder.top.conv.weight"):
        convert_state_dict(lacking, model)
    scaled = {**official, "sem_seg_head.predictor.logit_scale": torch.tensor([math.log(50.0)])}
    with pytest.raises(ConversionError, match="temperature"):
        convert_state_dict(scaled, model)


def test_proposals_match_the_release(golden: dict[str, Any], converted: tuple[ZegFormer, KeyReport]) -> None:
    model, _ = converted
    expected = golden["inference"]
    with torch.no_grad():
        out = model.model(padded_pixels(model, expected["image"][None]))
        logits = model.classifier(out.segment_embeddings, model.text_embeddings(vocabulary(golden)))
    torch.testing.assert_close(out.mask_logits, expected["mask_logits"], **TOLERANCE)
    torch.testing.assert_close(logits, expected["class_logits"], **TOLERANCE)


def clip_crops(model: ZegFormer, golden: dict[str, Any], rule: str) -> torch.Tensor:
    """ovseg's CLIP crops of the inference image's final-layer proposals under ``rule``."""
    expected = golden["inference"]
    image = expected["image"][None].float() / 255
    padded_masks = F.interpolate(
        expected["mask_logits"][-1],
        size=padded_pixels(model, expected["image"][None]).shape[-2:],
        mode="bilinear",
        align_corners=False,
    )
    pixels = model.clip_image.normalize(image)
    if rule == "release":
        pixels = F.pad(
            pixels, (0, padded_masks.shape[-1] - image.shape[-1], 0, padded_masks.shape[-2] - image.shape[-2])
        )
    else:
        padded_masks = padded_masks[..., : image.shape[-2], : image.shape[-1]]
    return masked_crops(pixels, padded_masks.sigmoid() > 0.5, 224, rule)  # type: ignore[arg-type]


def test_clip_crops_and_features_match_the_release(
    golden: dict[str, Any], converted: tuple[ZegFormer, KeyReport]
) -> None:
    model, _ = converted
    expected = golden["inference"]
    crops = clip_crops(model, golden, "release")
    torch.testing.assert_close(F.avg_pool2d(crops, 16), expected["crops_pooled"], **TOLERANCE)
    with torch.no_grad():
        features = model.clip_image.encode(crops).pooled
    torch.testing.assert_close(features, expected["clip_image_features"], **TOLERANCE)
    # ovseg's own rule (boxes covering the whole mask, on the unpadded image) gives other crops
    tight = F.avg_pool2d(clip_crops(model, golden, "tight"), 16)
    assert (tight - expected["crops_pooled"]).abs().amax() > 0.1


def test_fused_semantic_map_matches_the_release(golden: dict[str, Any], converted: tuple[ZegFormer, KeyReport]) -> None:
    model, _ = converted
    expected = golden["inference"]
    output_size = tuple(expected["output_size"].tolist())
    probs = model.class_probabilities(expected["image"][None], vocabulary(golden), output_size=output_size)
    torch.testing.assert_close(probs[0], expected["sem_seg"], **TOLERANCE)


def test_release_upsamples_mask_logits_before_the_sigmoid(
    golden: dict[str, Any], converted: tuple[ZegFormer, KeyReport]
) -> None:
    """The release sums ``p_q(c) sigmoid(m_q)`` on logits upsampled to the padded input; summing at
    stride 4 and upsampling the scores afterwards is measurably different."""
    model, _ = converted
    expected = golden["inference"]
    image = expected["image"][None]
    output_size = tuple(expected["output_size"].tolist())
    with torch.no_grad():
        prediction = model.predict_scores(
            image.float() / 255, model.text_embeddings(vocabulary(golden)), vocabulary(golden)
        )
        coarse = expected["mask_logits"][-1]  # stride 4 of the padded input
        scores = torch.einsum("bmq,bmhw->bqhw", prediction.class_probs, coarse.sigmoid())
        scores = F.interpolate(
            scores, size=padded_pixels(model, image).shape[-2:], mode="bilinear", align_corners=False
        )[..., : image.shape[-2], : image.shape[-1]]
        scores = F.interpolate(scores, size=output_size, mode="bilinear", align_corners=False)
        scores = scores + prediction.query_offsets.view(1, -1, 1, 1)
    assert (scores[0] - expected["sem_seg"]).abs().amax() > 1e-3


def training_batch(golden: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"image": golden["training"]["images"], "label": golden["training"]["labels"]}


def test_hungarian_assignment_matches_the_release(
    golden: dict[str, Any], converted: tuple[ZegFormer, KeyReport]
) -> None:
    model, _ = converted
    batch = training_batch(golden)
    pixels, labels = model.pad_batch(model.normalize(batch["image"].float() / 255), batch["label"])
    targets = model.mask_targets(labels)
    with torch.no_grad():
        out = model.model(pixels)
        text = model.training_text_embeddings()
        logits = model.classifier(out.segment_embeddings, text)
    matcher = model.criterion(text.shape[0]).matcher
    for layer, expected in enumerate(golden["training"]["matches"]):
        matches = matcher(logits[layer], out.mask_logits[layer], targets)
        assert [torch.stack(m).tolist() for m in matches] == [e.tolist() for e in expected], f"layer {layer}"


def test_set_loss_matches_the_release(golden: dict[str, Any], converted: tuple[ZegFormer, KeyReport]) -> None:
    model, _ = converted
    official = golden["training"]["losses"]
    model.train()
    try:
        with torch.no_grad():
            losses = model.training_loss(training_batch(golden))
    finally:
        model.eval()
    for term in ("loss_ce", "loss_mask", "loss_dice"):  # ovseg sums the deep-supervision layers
        expected = sum(value for key, value in official.items() if key == term or key.startswith(term + "_"))
        torch.testing.assert_close(losses[term], expected, **TOLERANCE)


@pytest.mark.slow
def test_real_size_official_state_dict_converts_and_loads_strictly() -> None:
    """R-101 + 256-wide heads, 100 queries, 6 layers, as the released COCO / VOC checkpoints (random
    weights in the official layout, without the CLIP towers, which come from the config)."""
    shapes = json.loads((FIXTURES / "official_r101_shapes.json").read_text())
    generator = torch.Generator().manual_seed(0)
    official = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    official["sem_seg_head.predictor.logit_scale"] = torch.tensor([4.605170185988091])  # log(1 / 0.01)
    official["criterion.empty_weight"] = torch.cat(
        [torch.ones(len(official["criterion.empty_weight"]) - 1), torch.tensor([0.1])]
    )
    model = ZegFormer(
        clip_text=OpenCLIPText(model_name="ViT-B-16-quickgelu"),
        clip_image=OpenCLIPImage(model_name="ViT-B-16-quickgelu"),
        backbone="resnet101.tv_in1k",
    )
    state, report = convert_state_dict(official, model)
    report.check_complete(list(official), "real-size state dict")
    model.load_state_dict(state, strict=True)
    assert len(report.mapped) == len(official) - 2
    assert report.filled and all(key.startswith(("clip_text.", "clip_image.")) for key in report.filled)
    own = model.state_dict()
    for key, target in report.mapped.items():
        assert torch.equal(own[target], official[key]), key


def golden_config_yaml(golden: dict[str, Any], path: Path) -> Path:
    """A config whose ``model`` section builds the fixture's model (as ``build_ovseg``)."""
    import yaml

    config = golden["config"]
    sizes = config["sizes"]
    width = sizes["width_per_group"]
    clip = {"config": config["clip"]}
    init_args = {
        "clip_text": {"class_path": "ovseg.encoders.OpenCLIPText", "init_args": clip},
        "clip_image": {"class_path": "ovseg.encoders.OpenCLIPImage", "init_args": clip},
        "backbone": "resnet50",
        "backbone_kwargs": {"channels": [width, 2 * width, 4 * width, 8 * width]},
        "pixel_mean": [v / 255 for v in config["pixel_mean"]],
        "pixel_std": [v / 255 for v in config["pixel_std"]],
        **{
            key: sizes[key]
            for key in (
                "num_queries",
                "conv_dim",
                "mask_dim",
                "hidden_dim",
                "dec_layers",
                "heads",
                "ffn_dim",
                "dropout",
            )
        },
        "clip_templates": config["clip_templates"],
        "clip_crop_boxes": "release",
        "training_templates": [config["segment_template"]],
    }
    path.write_text(
        yaml.safe_dump({"model": {"class_path": "ovseg.methods.zegformer.ZegFormer", "init_args": init_args}})
    )
    return path


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_ovseg_convert_writes_a_checkpoint_that_reproduces_the_release(
    golden: dict[str, Any], tmp_path: Path, suffix: str
) -> None:
    """``ovseg convert zegformer`` on a detectron2 checkpoint (``{"model": ...}``; a ``.pth`` or a
    ``.pkl`` of numpy arrays), then ``load_from_checkpoint``: the release's semantic map to 1e-5."""
    import pickle

    from ovseg.convert import convert

    official = official_state_dict(golden)
    source = tmp_path / f"model_final{suffix}"
    if suffix == ".pkl":
        with source.open("wb") as handle:
            pickle.dump({"model": {key: value.numpy() for key, value in official.items()}, "__author__": "d2"}, handle)
    else:
        torch.save({"model": official, "iteration": 60000}, source)
    destination = tmp_path / "zegformer.ckpt"
    report = convert("zegformer", source, destination, golden_config_yaml(golden, tmp_path / "tiny.yaml"))
    assert len(report.mapped) + len(report.dropped) == len(official)
    model = ZegFormer.load_from_checkpoint(destination, map_location="cpu").eval()
    config = golden["config"]
    model.set_training_classes(
        TrainingClasses(Vocabulary(tuple((n,) for n in config["all_classes"])), tuple(config["unseen"]))
    )
    expected = golden["inference"]
    probs = model.class_probabilities(
        expected["image"][None], vocabulary(golden), output_size=tuple(expected["output_size"].tolist())
    )
    torch.testing.assert_close(probs[0], expected["sem_seg"], **TOLERANCE)


def test_release_configs_use_openai_clip_with_quickgelu() -> None:
    """The release runs OpenAI's CLIP, whose blocks use QuickGELU; open_clip's plain ``ViT-B-16`` with
    the ``openai`` tag builds GELU blocks (it only warns), so the configs name the QuickGELU variant."""
    import yaml

    for name in ("coco_stuff_156_r101", "voc_15_r101"):
        model = yaml.safe_load((Path(__file__).parents[1] / "configs" / "zegformer" / f"{name}.yaml").read_text())
        for tower in ("clip_text", "clip_image"):
            assert model["model"]["init_args"][tower]["init_args"]["model_name"] == "ViT-B-16-quickgelu", name


def test_designed_proposals_crops_and_map_match_the_release(
    golden: dict[str, Any], converted: tuple[ZegFormer, KeyReport]
) -> None:
    """Proposals the box rule is about (compact, one row, one column, one pixel, empty, inside the
    padding), given at the padded resolution to the release and to ovseg alike."""
    from dataclasses import replace

    model, _ = converted
    expected = golden["inference"]
    designed = torch.where(expected["designed_masks"], 4.0, -4.0)[None]  # (1, N, Hp, Wp)
    image = expected["image"][None].float() / 255
    pixels = F.pad(
        model.clip_image.normalize(image),
        (0, designed.shape[-1] - image.shape[-1], 0, designed.shape[-2] - image.shape[-2]),
    )
    crops = masked_crops(pixels, designed > 0, 224, "release")
    torch.testing.assert_close(F.avg_pool2d(crops, 16), expected["designed_crops_pooled"], **TOLERANCE)
    with torch.no_grad():
        features = model.clip_image.encode(crops).pooled
    torch.testing.assert_close(features, expected["designed_clip_image_features"], **TOLERANCE)
    tight = masked_crops(model.clip_image.normalize(image), designed[..., :90, :130] > 0, 224, "tight")
    differs = (F.avg_pool2d(tight, 16) - expected["designed_crops_pooled"]).abs().flatten(1).amax(1) > 0.1
    # ovseg's rule crops every non-empty proposal differently, but the one inside the padding (whose
    # crop is all zero either way: the padding is 0 after normalisation)
    assert differs.tolist() == [False, True, True, True, True, False, True, True]
    original = model.model.forward
    model.model.forward = lambda pixels: replace(original(pixels), mask_logits=designed[None])  # type: ignore
    try:
        probs = model.class_probabilities(
            expected["image"][None], vocabulary(golden), output_size=tuple(expected["output_size"].tolist())
        )
    finally:
        del model.model.forward
    torch.testing.assert_close(probs[0], expected["designed_sem_seg"], **TOLERANCE)
