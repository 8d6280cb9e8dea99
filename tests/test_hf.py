"""transformers towers (CLIP, SigLIP, DINOv2): equal to the open_clip / timm towers on converted
weights, loaded by path through the YAML route into every method; offline, tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from ovseg.encoders import (
    HFImage,
    HFText,
    OpenCLIPImage,
    OpenCLIPText,
    TimmViT,
    build_open_clip_model,
    clip_bpe_hf_tokenizer,
    hf_config_from_open_clip,
    open_clip_to_hf_state_dict,
    tiny_open_clip_config,
)
from ovseg.errors import MissingResourceError

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a photo of a red ball", "sky", "There is a kite in the scene, flying over the sand"]


# ------------------------------------------------------------------ tiny checkpoints
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny random open_clip ViT CLIP, converted to a transformers CLIPModel folder (+ CLIP BPE tokenizer)."""
    torch.manual_seed(0)
    config = tiny_open_clip_config("vit")
    clip = build_open_clip_model(config=config)
    model = transformers.CLIPModel(hf_config_from_open_clip(config)).eval()
    result = model.load_state_dict(open_clip_to_hf_state_dict(clip.state_dict(), 2, 2), strict=False)
    assert not result.unexpected_keys and all("position_ids" in key for key in result.missing_keys)
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    model.save_pretrained(folder)
    clip_bpe_hf_tokenizer().save_pretrained(folder)
    return folder, clip


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory) -> Path:
    """A tiny random SiglipModel (patch 8, 32 px, 32 wide) with a CLIP BPE tokenizer and a preprocessor config."""
    torch.manual_seed(1)
    tower = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    config = transformers.SiglipConfig(
        text_config={
            **tower,
            "vocab_size": 49408,
            "max_position_embeddings": 24,
            "pad_token_id": 49407,
            "eos_token_id": 49407,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
    )
    folder = tmp_path_factory.mktemp("hf") / "tiny-siglip"
    transformers.SiglipModel(config).eval().save_pretrained(folder)
    clip_bpe_hf_tokenizer().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]})
    )
    return folder


def timm_to_hf_dinov2(timm_vit: TimmViT, registers: int = 0) -> torch.nn.Module:
    """A transformers Dinov2(WithRegisters)Model with the weights of a timm DINOv2 ViT (test-only converter)."""
    vit = timm_vit.model
    width, depth = vit.embed_dim, len(vit.blocks)
    common = {
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": vit.blocks[0].attn.num_heads,
        "mlp_ratio": vit.blocks[0].mlp.fc1.out_features // width,
        "image_size": vit.patch_embed.img_size[0],
        "patch_size": timm_vit.patch_size,
        "layer_norm_eps": 1e-6,
    }
    model = (
        transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        )
        if registers
        else transformers.Dinov2Model(transformers.Dinov2Config(**common))
    ).eval()
    src = vit.state_dict()
    pos = src["pos_embed"]
    if registers:  # timm keeps no position for [CLS] in register models: a zero one is the same
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    state = {
        "embeddings.cls_token": src["cls_token"],
        "embeddings.position_embeddings": pos,
        "embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
        "layernorm.weight": src["norm.weight"],
        "layernorm.bias": src["norm.bias"],
    }
    if registers:
        state["embeddings.register_tokens"] = src["reg_token"]
    own = model.state_dict()
    new_names = "encoder.layer.0.attention.q_proj.weight" in own
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        qkv = (
            ("attention.q_proj", "attention.k_proj", "attention.v_proj")
            if new_names
            else ("attention.attention.query", "attention.attention.key", "attention.attention.value")
        )
        out = "attention.o_proj" if new_names else "attention.output.dense"
        for param in ("weight", "bias"):
            state.update(
                {f"{h}{name}.{param}": part for name, part in zip(qkv, src[f"{b}attn.qkv.{param}"].chunk(3, dim=0))}
            )
            state[f"{h}{out}.{param}"] = src[f"{b}attn.proj.{param}"]
            for part in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                state[f"{h}{part}.{param}"] = src[f"{b}{part}.{param}"]
        state[f"{h}layer_scale1.lambda1"] = src[f"{b}ls1.gamma"]
        state[f"{h}layer_scale2.lambda1"] = src[f"{b}ls2.gamma"]
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["embeddings.mask_token"] and not result.unexpected_keys, result
    return model


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> tuple[Path, TimmViT]:
    torch.manual_seed(2)
    timm_vit = TimmViT.tiny().eval()
    folder = tmp_path_factory.mktemp("hf") / "tiny-dinov2"
    timm_to_hf_dinov2(timm_vit).save_pretrained(folder)
    return folder, timm_vit


# ------------------------------------------------------------------ equal to open_clip / timm
@torch.no_grad()
def test_hf_clip_towers_equal_open_clip_towers(tiny_clip):
    folder, clip = tiny_clip
    image, hf_image = OpenCLIPImage(model=clip).eval(), HFImage(str(folder)).eval()
    assert hf_image.embed_dim == image.embed_dim == 32 and hf_image.patch_size == 8
    torch.testing.assert_close(hf_image.mean, image.mean)  # CLIP statistics without a preprocessor config
    for size in [(32, 32), (48, 40), (35, 43)]:  # native, resized position embedding, remainder dropped
        images = torch.rand(2, 3, *size)
        expected, got = image(images), hf_image(images)
        assert got.dense.shape == expected.dense.shape == (2, 32, size[0] // 8, size[1] // 8)
        torch.testing.assert_close(got.dense, expected.dense, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.pooled, expected.pooled, atol=1e-5, rtol=0)

    text, hf_text = OpenCLIPText(model=clip).eval(), HFText(str(folder)).eval()
    assert hf_text.context_length == 77 and hf_text.embed_dim == 32
    expected, got = text.encode_texts(TEXTS), hf_text.encode_texts(TEXTS)
    torch.testing.assert_close(got.pooled, expected.pooled, atol=1e-5, rtol=0)
    eot = expected.token_ids.argmax(-1)
    for row, end in enumerate(eot.tolist()):  # same ids and features up to EOT (padding ids differ)
        assert torch.equal(got.token_ids[row, : end + 1], expected.token_ids[row, : end + 1])
        torch.testing.assert_close(got.tokens[row, : end + 1], expected.tokens[row, : end + 1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_transformers_clip_converts_back_to_open_clip(tiny_clip):
    """``transformers:FOLDER`` rebuilds the very open_clip model (CDT's route), equal to CLIPModel's features."""
    folder, clip = tiny_clip
    back = build_open_clip_model(f"transformers:{folder}")
    assert back.state_dict().keys() == clip.state_dict().keys()
    assert all(torch.equal(value, back.state_dict()[key]) for key, value in clip.state_dict().items())
    hf = transformers.CLIPModel.from_pretrained(folder).eval()
    images, ids = torch.randn(2, 3, 32, 32), OpenCLIPText(model=back).tokenize(TEXTS[:2])
    hf_image = hf.get_image_features(pixel_values=images)
    hf_text = hf.get_text_features(input_ids=ids)
    hf_image = getattr(hf_image, "pooler_output", hf_image)
    hf_text = getattr(hf_text, "pooler_output", hf_text)
    torch.testing.assert_close(back.encode_image(images), hf_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.encode_text(ids), hf_text, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_equals_timm_dinov2(registers, tmp_path):
    torch.manual_seed(3)
    timm_vit = TimmViT.tiny(registers=bool(registers)).eval()
    timm_to_hf_dinov2(timm_vit, registers).save_pretrained(tmp_path)
    hf_vit = HFImage(str(tmp_path)).eval()
    assert hf_vit.embed_dim == 64 and hf_vit.patch_size == 14 and hf_vit.num_prefix_tokens == 1 + registers
    torch.testing.assert_close(hf_vit.std, timm_vit.std)  # ImageNet statistics
    for size in [(56, 56), (50, 45)]:  # native; padded to the native grid (ceil(H / 14))
        images = torch.rand(2, 3, *size)
        expected, got = timm_vit(images), hf_vit(images)
        assert got.dense.shape == expected.dense.shape == (2, 64, 4, 4)
        torch.testing.assert_close(got.dense, expected.dense, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.pooled, expected.pooled, atol=1e-5, rtol=0)


@torch.no_grad()
def test_hf_dinov2_on_another_grid_pads_and_matches_dinov2model(tiny_dinov2):
    """Off the native grid the position embedding is resized as transformers (and the DINOv2 release)
    do, plain bicubic; timm resizes with antialiasing, so there the two differ slightly by design."""
    folder, _ = tiny_dinov2
    encoder = HFImage(str(folder), pooling="avg").eval()
    images = torch.rand(1, 3, 60, 90)
    got = encoder(images)
    assert got.dense.shape == (1, 64, 5, 7)
    padded = torch.nn.functional.pad(encoder.normalize(images), (0, 98 - 90, 0, 70 - 60))
    tokens = transformers.Dinov2Model.from_pretrained(folder).eval()(pixel_values=padded).last_hidden_state
    torch.testing.assert_close(got.dense.flatten(2).transpose(1, 2), tokens[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooled, tokens[:, 1:].mean(1), atol=1e-5, rtol=0)


@torch.no_grad()
def test_hf_siglip_towers_match_siglipmodel_features(tiny_siglip):
    image, text = HFImage(str(tiny_siglip)).eval(), HFText(str(tiny_siglip)).eval()
    torch.testing.assert_close(image.mean.flatten(), torch.tensor([0.4, 0.5, 0.6]))  # preprocessor_config.json
    torch.testing.assert_close(image.std.flatten(), torch.tensor([0.2, 0.3, 0.4]))
    assert not image.dense_in_joint_space and image.embed_dim == text.embed_dim == 32
    assert text.context_length == 24
    model = transformers.SiglipModel.from_pretrained(tiny_siglip).eval()
    images = torch.rand(2, 3, 32, 32)
    features = image(images)
    expected = model.get_image_features(pixel_values=image.normalize(images))
    torch.testing.assert_close(features.pooled, getattr(expected, "pooler_output", expected), atol=1e-5, rtol=0)
    hidden = model.vision_model(pixel_values=image.normalize(images)).last_hidden_state
    torch.testing.assert_close(features.dense.flatten(2).transpose(1, 2), hidden, atol=1e-5, rtol=0)
    assert image(torch.rand(1, 3, 48, 40)).dense.shape == (1, 32, 6, 5)  # resized position embedding

    encoded = text.encode_texts(TEXTS)
    assert encoded.token_ids.shape == (3, 24)  # padded to max_length, as SigLIP was trained
    expected = model.get_text_features(input_ids=encoded.token_ids)
    torch.testing.assert_close(encoded.pooled, getattr(expected, "pooler_output", expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(encoded.tokens[:, -1], encoded.pooled, atol=1e-5, rtol=0)  # last token, head


@torch.no_grad()
def test_towers_load_by_hub_name_from_the_cache_offline(tiny_clip, hf_cache):
    folder, clip = tiny_clip
    hf_cache("org/tiny-clip", folder)
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(HFImage("org/tiny-clip")(images).pooled, HFImage(str(folder))(images).pooled)
    assert HFText("org/tiny-clip").tokenize(["sky"]).shape == (1, 77)
    converted = build_open_clip_model("transformers:org/tiny-clip")
    assert all(torch.equal(value, converted.state_dict()[key]) for key, value in clip.state_dict().items())
    with pytest.raises(MissingResourceError, match="could not read the transformers config of 'org/other'"):
        HFImage("org/other")


@torch.no_grad()
def test_hf_metaclip2_towers_match_its_features(tmp_path):
    """MetaCLIP 2 (model_type metaclip_2) goes through the CLIP path with its own classes."""
    tower = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = transformers.MetaClip2Config(
        text_config={
            **tower,
            "vocab_size": 49408,
            "max_position_embeddings": 16,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )
    model = transformers.MetaClip2Model(config).eval()
    model.save_pretrained(tmp_path)
    clip_bpe_hf_tokenizer().save_pretrained(tmp_path)
    image, text = HFImage(str(tmp_path)).eval(), HFText(str(tmp_path)).eval()
    images = torch.rand(2, 3, 32, 32)
    expected = model.get_image_features(pixel_values=image.normalize(images))
    torch.testing.assert_close(image(images).pooled, getattr(expected, "pooler_output", expected), atol=1e-5, rtol=0)
    encoded = text.encode_texts(TEXTS[:2])
    expected = model.get_text_features(input_ids=encoded.token_ids)
    torch.testing.assert_close(encoded.pooled, getattr(expected, "pooler_output", expected), atol=1e-5, rtol=0)


def test_unsupported_checkpoints_give_clear_errors(tiny_siglip, tiny_dinov2, tmp_path):
    with pytest.raises(ValueError, match="only CLIP image\\+text checkpoints.*attention-pooling"):
        build_open_clip_model(f"transformers:{tiny_siglip}")
    with pytest.raises(ValueError, match="DINOv2 image model: it has no text tower"):
        HFText(str(tiny_dinov2[0]))
    with pytest.raises(MissingResourceError, match="could not read the transformers config of"):
        HFImage(str(tmp_path / "missing"))
    bert = tmp_path / "bert"
    transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(bert)
    with pytest.raises(ValueError, match="model_type 'bert'; ovseg's transformers towers support CLIP"):
        HFImage(str(bert))
    siglip2 = tmp_path / "siglip2"
    siglip2.mkdir()
    (siglip2 / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ValueError, match="NaFlex SigLIP 2"):
        HFImage(str(siglip2))


# ------------------------------------------------------------------ every method through the YAML route
def hf_overlay(method: str, folder: Path, tmp_path: Path) -> Path:
    """A YAML overlay giving ``method`` the transformers towers of ``folder``."""
    if method == "simzss":
        model = {
            "image_encoder": {"class_path": "ovseg.encoders.HFImage", "init_args": {"model_name_or_path": str(folder)}},
            "text_encoder": {"init_args": {"output_dim": 64}},
        }  # the tiny DINOv2 is 64 wide
    elif method == "zegformer":  # text and crop towers of one checkpoint: they share the joint space
        model = {
            "clip_text": {"class_path": "ovseg.encoders.HFText", "init_args": {"model_name_or_path": str(folder)}},
            "clip_image": {"class_path": "ovseg.encoders.HFImage", "init_args": {"model_name_or_path": str(folder)}},
        }
    else:
        model = {"model_name": f"transformers:{folder}", "clip_config": None}
    path = tmp_path / f"{method}_hf.yaml"
    path.write_text(yaml.safe_dump({"model": {"init_args": model}}))
    return path


@pytest.mark.parametrize(
    ("method", "towers"), [("simzss", "dinov2"), ("zegformer", "siglip"), ("zegformer", "clip"), ("cdt", "clip")]
)
def test_methods_train_validate_and_round_trip_with_hf_towers(
    method, towers, tiny_clip, tiny_siglip, tiny_dinov2, tmp_path, monkeypatch
):
    """One training step and one validation on the synthetic world with transformers towers given by
    folder in YAML; ``save_pretrained`` -> ``from_pretrained`` gives identical predictions."""
    from ovseg.cli import run
    from ovseg.module import OVSegModule

    monkeypatch.chdir(tmp_path)
    folder = {"clip": tiny_clip[0], "siglip": tiny_siglip, "dinov2": tiny_dinov2[0]}[towers]
    cli = run(
        [
            "fit",
            "-c",
            str(REPO / f"configs/{method}/synthetic.yaml"),
            "-c",
            str(REPO / f"tests/fast/{method}.yaml"),
            "-c",
            str(hf_overlay(method, folder, tmp_path)),
            "--trainer.max_steps",
            "1",
            "--trainer.val_check_interval",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.num_train",
            "2",
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.num_val",
            "2",
            "--data.init_args.eval_batch_size",
            "2",
            "--data.init_args.image_size",
            "64",
        ]
    )
    assert cli.trainer.global_step == 1
    assert "val/mIoU" in cli.trainer.callback_metrics
    model = cli.model.eval()
    hf_towers = {type(m).__name__ for m in model.modules() if type(m).__name__ in ("HFImage", "HFText")}
    assert hf_towers == {"simzss": {"HFImage"}, "zegformer": {"HFImage", "HFText"}, "cdt": set()}[method]

    model.save_pretrained(tmp_path / "export")
    loaded = OVSegModule.from_pretrained(str(tmp_path / "export")).eval()
    assert type(loaded) is type(model)
    images = torch.rand(2, 3, 64, 64)
    names = ["sky", "grass", "a red ball"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.class_probabilities(images, _vocabulary(names)),
            model.class_probabilities(images, _vocabulary(names)),
            atol=0,
            rtol=0,
        )


def _vocabulary(names: list[str]):
    from ovseg.vocabulary import Vocabulary

    return Vocabulary.from_names(names)
