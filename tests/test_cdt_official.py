"""CDT against the official MAFT+ code: golden fixtures written by scripts/golden/maftplus.py (the
release's modules on a tiny random model, in the release's key layout), converted with
methods/cdt/convert.py, must be reproduced to 1e-5 with the release's switches on; the checkpoint
converter maps every key of a real-size (ConvNeXt-L) state dict."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ovseg.convert import ConversionError
from ovseg.masks import MaskTargets
from ovseg.methods.cdt import CDT
from ovseg.methods.cdt.convert import convert_state_dict
from ovseg.methods.cdt.losses import (
    mask_aware_loss,
    pod_descriptor,
    representation_compensation_loss,
)
from ovseg.vocabulary import Vocabulary, reduce_synonyms

FIXTURES = Path(__file__).parent / "fixtures" / "maftplus"
TOLERANCE = 1e-5
#: the release's behaviour (configs/cdt/coco_stuff_convnext_*.yaml); False everywhere is ovseg's
RELEASE_SWITCHES = {
    "cdt_flatten_without_permute": True,
    "upsample_masks_before_sigmoid": True,
    "synonym_logit_max": True,
    "mask_aware_sigmoid_first": True,
    "rc_kernel_from_unresized_width": True,
}


def tiny_clip_module():
    if "tiny_clip" not in sys.modules:
        spec = importlib.util.spec_from_file_location("tiny_clip", FIXTURES / "tiny_clip.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["tiny_clip"] = module
        spec.loader.exec_module(module)
    module = sys.modules["tiny_clip"]
    module.register_tiny_convnext()
    return module


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURES / "inference.pt", weights_only=True)


def init_args(golden: dict, **switches) -> dict:
    """CDT's arguments for the fixture's tiny model (and the release's fixed encoder FFN of 1024)."""
    sizes = golden["sizes"]
    dim = sizes["hidden_dim"]
    return dict(
        clip_config=tiny_clip_module().CLIP_CONFIG,
        num_queries=sizes["num_queries"],
        conv_dim=dim,
        mask_dim=dim,
        hidden_dim=dim,
        enc_layers=sizes["enc_layers"],
        enc_heads=sizes["heads"],
        enc_points=4,
        enc_ffn_dim=1024,
        dec_layers=sizes["dec_layers"],
        dec_heads=sizes["heads"],
        dec_ffn_dim=sizes["dec_ffn_dim"],
        cdt_heads=sizes["heads"],
        **switches,
    )


def build_cdt(golden: dict, **switches) -> CDT:
    return CDT(**init_args(golden, **switches)).eval()


def converted(golden: dict, **switches) -> CDT:
    model = build_cdt(golden, **switches)
    official = dict(golden["state_dict"])
    # the fixture leaves out the text tower's 49408-row token table (the text classifier is given)
    official["backbone.clip_model.token_embedding.weight"] = model.text_encoder.token_embedding.weight.detach()
    state_dict, report = convert_state_dict(official, model)
    model.load_state_dict(state_dict, strict=True)
    assert not report.unaccounted(list(official))
    assert all(key.startswith("backbone_t.") or key == "criterion.empty_weight" for key in report.dropped)
    return model


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@torch.no_grad()
def run(model: CDT, golden: dict):
    vocabulary = Vocabulary(tuple(tuple(names) for names in golden["classes"]))
    image = golden["image"][None]
    pixels, _ = model.pad_batch(model.normalize(image))
    out = model.model(pixels, golden["text"], model._query_to_class(vocabulary, len(golden["text"])))
    return vocabulary, out


@torch.no_grad()
def test_release_switches_reproduce_the_official_inference(golden):
    model = converted(golden, **RELEASE_SWITCHES)
    vocabulary, out = run(model, golden)
    assert max_error(out.in_vocab_logits, golden["in_vocab_logits"]) <= TOLERANCE
    assert max_error(out.mask_logits, golden["mask_logits"]) <= TOLERANCE
    cdt = model.model.transferred_classifier(out.clip_vis_dense, model.model.classifier(golden["text"]))
    assert max_error(cdt, golden["cdt"]) <= TOLERANCE
    assert max_error(out.out_vocab_logits, golden["out_vocab_logits"]) <= TOLERANCE
    predictions = model.predict_scores(golden["image"][None], golden["text"], vocabulary)
    semantic = reduce_synonyms(predictions.pixel_scores(), vocabulary.query_to_class, len(vocabulary))[0]
    assert max_error(semantic, golden["sem_seg"]) <= TOLERANCE


@torch.no_grad()
def test_each_inference_switch_matters(golden):
    """ovseg's own choices give other numbers on the same weights (so the switches are needed to
    load released weights, and the golden test above could fail)."""
    vocabulary, release = run(converted(golden, **RELEASE_SWITCHES), golden)
    _, permuted = run(converted(golden, **{**RELEASE_SWITCHES, "cdt_flatten_without_permute": False}), golden)
    assert max_error(permuted.in_vocab_logits, release.in_vocab_logits) <= TOLERANCE  # CDT feeds out-of-vocab only
    assert max_error(permuted.out_vocab_logits, release.out_vocab_logits) > 1e-2
    model = converted(golden, **{**RELEASE_SWITCHES, "upsample_masks_before_sigmoid": False})
    predictions = model.predict_scores(golden["image"][None], golden["text"], vocabulary)
    assert predictions.mask_logits.shape[-2:] != golden["sem_seg"].shape[-2:]  # summed at stride 4
    image = golden["image"][None]
    release_probs = converted(golden, **RELEASE_SWITCHES).predict_scores(image, golden["text"], vocabulary).class_probs
    model = converted(golden, **{**RELEASE_SWITCHES, "synonym_logit_max": False})
    own_probs = model.predict_scores(image, golden["text"], vocabulary).class_probs  # softmax over all 6 names
    assert release_probs.shape[-1] == own_probs.shape[-1] == len(vocabulary.queries)
    assert max_error(own_probs, release_probs) > 1e-2


@pytest.mark.parametrize("case", ["square", "portrait"])
def test_losses_match_the_official_ones(case):
    golden = torch.load(FIXTURES / "losses.pt", weights_only=True)[case]
    rc = representation_compensation_loss(golden["student"], golden["teacher"], kernel_from_unresized_width=True)
    assert abs(float(rc) - float(golden["rc_loss"])) <= TOLERANCE
    targets = [MaskTargets(labels, masks) for labels, masks in zip(golden["labels"], golden["masks"])]
    ma = mask_aware_loss(
        golden["class_logits"][..., :-1], golden["mask_logits"], targets, sigmoid_before_upsampling=True
    )
    assert abs(float(ma) - float(golden["mask_aware_loss"])) <= TOLERANCE
    # ovseg's own order differs everywhere; its RC kernel only on non-square maps
    ma_ovseg = mask_aware_loss(golden["class_logits"][..., :-1], golden["mask_logits"], targets)
    assert abs(float(ma_ovseg) - float(ma)) > 1e-4
    rc_ovseg = representation_compensation_loss(golden["student"], golden["teacher"])
    assert (abs(float(rc_ovseg) - float(rc)) > 1e-4) == (case == "portrait")


def test_pod_descriptor_length_on_a_portrait_map():
    features = torch.rand(1, 8, 34, 25)
    # release: kernels 25, 12, 6 on the 34 x 34 resize -> grids 1, 2, 5; ovseg: 34, 17, 8 -> 1, 2, 4
    assert pod_descriptor(features, kernel_from_unresized_width=True).shape[1] == 8 * 2 * (1 + 2 + 5)
    assert pod_descriptor(features).shape[1] == 8 * 2 * (1 + 2 + 4)


def test_converter_names_unknown_keys_and_wrong_shapes(golden):
    model = build_cdt(golden)
    official = dict(golden["state_dict"])
    official["backbone.clip_model.token_embedding.weight"] = model.text_encoder.token_embedding.weight.detach()
    with pytest.raises(ConversionError, match="sem_seg_head.predictor.extra"):
        convert_state_dict({**official, "sem_seg_head.predictor.extra": torch.zeros(1)}, model)
    key = "sem_seg_head.predictor.query_feat.weight"
    with pytest.raises(ConversionError, match=r"query_feat.weight \(9, 32\)"):
        convert_state_dict({**official, key: torch.zeros(9, 32)}, model)
    with pytest.raises(ConversionError, match="void_embedding.weight"):
        convert_state_dict({k: v for k, v in official.items() if k != "void_embedding.weight"}, model)
    # the CLIP weights are in the converted checkpoint: loading it must not fetch the pretrained ones
    assert convert_state_dict(official, model)[1].hparams_updates == {}
    model.hparams["pretrained"] = "laion2b_s29b_b131k_ft_soup"
    assert convert_state_dict(official, model)[1].hparams_updates == {"pretrained": None}


@pytest.mark.slow
def test_real_size_release_layout_converts_and_loads_strictly(tmp_path):
    """ConvNeXt-L CLIP + Mask2Former head + teacher at the paper's sizes, random weights, in the
    release's key layout (built from ovseg's model with the inverse of the mapping)."""
    from ovseg.convert import build_model, load_official_weights
    from ovseg.methods.cdt.convert import RULES

    config = Path(__file__).parents[1] / "configs" / "cdt" / "coco_stuff_convnext_l.yaml"
    model = build_model(config, ["--model.init_args.pretrained", "null"])
    own = model.state_dict()
    official = release_layout(own, RULES)
    official.update(
        {
            "backbone_t." + k.removeprefix("backbone."): v
            for k, v in official.items()
            if k.startswith("backbone.clip_model.visual.")
        }
    )
    official["criterion.empty_weight"] = torch.ones(172)
    path = tmp_path / "maftplus_large.pth"
    torch.save({"model": official, "iteration": 55000}, path)
    state_dict, report = convert_state_dict(load_official_weights(path), model)
    model.load_state_dict(state_dict, strict=True)
    assert len(report.mapped) == len(own) and not report.unaccounted(list(official))
    assert set(report.dropped) == {k for k in official if k.startswith("backbone_t.")} | {"criterion.empty_weight"}


def release_layout(own: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """ovseg state dict -> the release's key layout, by inverting the converter's rules on each key
    (an independent check: every ovseg key must be produced by exactly one official key)."""
    import re

    from ovseg.methods.cdt.convert import map_key

    inverse = {
        "model.backbone.encoder.visual.": "backbone.clip_model.visual.",
        "text_encoder.": "backbone.clip_model.",
        "model.clip_logit_scale": "backbone.clip_model.logit_scale",
        "model.pixel_decoder.level_embed": "sem_seg_head.pixel_decoder.transformer.level_embed",
        "model.pixel_decoder.lateral.0.": "sem_seg_head.pixel_decoder.adapter_1.",
        "model.pixel_decoder.lateral.1.": "sem_seg_head.pixel_decoder.adapter_1.norm.",
        "model.pixel_decoder.output.0.": "sem_seg_head.pixel_decoder.layer_1.",
        "model.pixel_decoder.output.1.": "sem_seg_head.pixel_decoder.layer_1.norm.",
        "model.pixel_decoder.": "sem_seg_head.pixel_decoder.",
        "model.decoder.mask_pooling_proj.": "sem_seg_head.predictor._mask_pooling_proj.",
        "model.decoder.": "sem_seg_head.predictor.",
        "model.void_embedding.": "void_embedding.",
        "model.cdt.attention.": "cdt.cross_atten.multihead_attn.",
        "model.cdt.linear.": "cdt.cross_atten.MLP.",
        "model.cdt.norm.": "cdt.cross_atten.norm.",
    }
    official = {}
    for key, value in own.items():
        prefix = max((p for p in inverse if key.startswith(p)), key=len)
        name = inverse[prefix] + key.removeprefix(prefix)
        name = re.sub(
            r"pixel_decoder\.layers\.(\d+)\.attention\.",
            r"pixel_decoder.transformer.encoder.layers.\1.self_attn.",
            name,
        )
        name = re.sub(r"pixel_decoder\.layers\.(\d+)\.", r"pixel_decoder.transformer.encoder.layers.\1.", name)
        name = re.sub(
            r"predictor\.self_attention\.(\d+)\.attention\.",
            r"predictor.transformer_self_attention_layers.\1."
            "self_attn.",
            name,
        )
        name = re.sub(r"predictor\.self_attention\.(\d+)\.", r"predictor.transformer_self_attention_layers.\1.", name)
        name = re.sub(
            r"predictor\.cross_attention\.(\d+)\.attention\.",
            r"predictor.transformer_cross_attention_layers."
            r"\1.multihead_attn.",
            name,
        )
        name = re.sub(r"predictor\.cross_attention\.(\d+)\.", r"predictor.transformer_cross_attention_layers.\1.", name)
        name = re.sub(r"predictor\.ffn\.", "predictor.transformer_ffn_layers.", name)
        name = name.replace(".weight.weight", ".weight")
        assert map_key(name) == key, (key, name, map_key(name))
        official[name] = torch.randn_like(value) if value.is_floating_point() else value
    assert rules
    return official


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_converted_checkpoint_loads_and_reproduces_the_release(golden, tmp_path, suffix):
    """`ovseg convert cdt` on a .pth or detectron2 .pkl file -> a checkpoint that loads without the
    YAML (``load_from_checkpoint``, as ``ovseg validate --ckpt_path`` does) and gives the official logits."""
    import pickle

    import yaml

    from ovseg.convert import convert

    model = build_cdt(golden, **RELEASE_SWITCHES)
    official = dict(golden["state_dict"])
    official["backbone.clip_model.token_embedding.weight"] = model.text_encoder.token_embedding.weight.detach()
    source = tmp_path / f"maftplus_tiny{suffix}"
    if suffix == ".pkl":  # detectron2's format: numpy arrays under "model"
        with source.open("wb") as handle:
            pickle.dump({"model": {k: v.numpy() for k, v in official.items()}, "__author__": "golden"}, handle)
    else:
        torch.save({"model": official, "iteration": 0}, source)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": {"class_path": "ovseg.methods.cdt.CDT", "init_args": init_args(golden, **RELEASE_SWITCHES)}}
        )
    )
    report = convert("cdt", source, tmp_path / "converted.ckpt", config)
    assert len(report.mapped) == len(model.state_dict())
    loaded = CDT.load_from_checkpoint(tmp_path / "converted.ckpt").eval()
    assert all(getattr(loaded, name) for name in ("upsample_masks_before_sigmoid", "synonym_logit_max"))
    _, out = run(loaded, golden)
    assert max_error(out.out_vocab_logits, golden["out_vocab_logits"]) <= TOLERANCE
