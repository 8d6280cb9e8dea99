"""Encoders: tiny random timm ViTs, open_clip CLIP towers and the from-scratch text transformer.

Everything runs on CPU, offline (no weights are downloaded).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ovseg.encoders import (  # noqa: E402
    CLIPTextTransformer,
    ImageFeatures,
    OpenCLIPImage,
    OpenCLIPText,
    TextFeatures,
    TimmViT,
    build_open_clip_model,
    tiny_open_clip_config,
)
from ovseg.encoders.timm_vit import NORM_PRESETS  # noqa: E402
from ovseg.errors import UserError  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------ timm ViT


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "reg4"])
def tiny_vit(request: pytest.FixtureRequest) -> TimmViT:
    torch.manual_seed(0)
    return TimmViT.tiny(registers=request.param).eval()


@pytest.mark.parametrize("size", [(56, 56), (70, 42), (61, 47)])
def test_timm_vit_shapes(tiny_vit: TimmViT, size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        out = tiny_vit(images)
    assert isinstance(out, ImageFeatures)
    h, w = -(-size[0] // 14), -(-size[1] // 14)  # ceil: dynamic padding
    assert out.dense.shape == (2, 64, h, w)
    assert out.pooled.shape == (2, 64)
    assert tiny_vit.grid_size(*size) == (h, w)
    assert torch.isfinite(out.dense).all()


def test_timm_vit_prefix_and_cls(tiny_vit: TimmViT) -> None:
    registers = "reg4" in tiny_vit.model_name
    assert tiny_vit.num_prefix_tokens == (5 if registers else 1)
    assert tiny_vit.embed_dim == 64 and tiny_vit.patch_size == 14
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        out = tiny_vit.encode(x)
        tokens = tiny_vit.model.forward_features(x)
    assert tokens.shape[1] == tiny_vit.num_prefix_tokens + 4 * 3
    torch.testing.assert_close(out.pooled, tokens[:, 0], rtol=0, atol=0)
    # the dense grid is the patch tokens in row-major order, the prefix dropped
    torch.testing.assert_close(out.dense[:, :, 1, 2], tokens[:, tiny_vit.num_prefix_tokens + 1 * 3 + 2])


def test_timm_vit_avg_pooling_and_presets() -> None:
    enc = TimmViT.tiny(pooling="avg", mean="clip", std="clip").eval()
    assert torch.allclose(enc.mean.flatten(), torch.tensor(NORM_PRESETS["clip"][0]))
    with torch.no_grad():
        out = enc.encode(torch.randn(1, 3, 56, 56))
    torch.testing.assert_close(out.pooled, out.dense.flatten(2).mean(-1))
    default = TimmViT.tiny()
    assert torch.allclose(default.mean.flatten(), torch.tensor(NORM_PRESETS["imagenet"][0]))  # pretrained_cfg
    explicit = TimmViT.tiny(mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    assert torch.allclose(explicit.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))


def test_normalisation(tiny_vit: TimmViT) -> None:
    images = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        a = tiny_vit(images)
        b = tiny_vit.encode((images - tiny_vit.mean) / tiny_vit.std)
    torch.testing.assert_close(a.dense, b.dense)
    torch.testing.assert_close(a.pooled, b.pooled)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("registers", [False, True])
def test_timm_vit_checkpoint_roundtrip(tmp_path, fmt: str, registers: bool) -> None:
    torch.manual_seed(1)
    src = TimmViT.tiny(registers=registers).eval()
    path = tmp_path / f"vit.{fmt}"
    state = src.model.state_dict()
    if fmt == "pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(2)
    dst = TimmViT.tiny(registers=registers, checkpoint_path=str(path)).eval()
    x = torch.rand(1, 3, 61, 47)
    with torch.no_grad():
        a, b = src(x), dst(x)
    torch.testing.assert_close(a.dense, b.dense, rtol=0, atol=0)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)


def test_timm_vit_init_seed_fixes_weights_and_leaves_the_run_stream(tmp_path) -> None:
    torch.manual_seed(1)
    a = TimmViT.tiny(init_seed=7)
    after_a = torch.rand(3)
    torch.manual_seed(2)
    b = TimmViT.tiny(init_seed=7)
    torch.manual_seed(1)
    expected = torch.rand(3)  # the stream right after manual_seed(1), as if no model had been built
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(after_a, expected, rtol=0, atol=0)
    other = TimmViT.tiny(init_seed=8)
    assert not torch.equal(other.model.patch_embed.proj.weight, a.model.patch_embed.proj.weight)
    torch.manual_seed(1)
    unseeded = TimmViT.tiny()
    torch.manual_seed(2)
    unseeded_again = TimmViT.tiny()
    assert not torch.equal(unseeded.model.patch_embed.proj.weight, unseeded_again.model.patch_embed.proj.weight)
    path = tmp_path / "other.pth"  # a checkpoint's weights replace the seeded initialisation
    torch.save(other.model.state_dict(), path)
    loaded = TimmViT.tiny(init_seed=7, checkpoint_path=str(path))
    assert torch.equal(loaded.model.patch_embed.proj.weight, other.model.patch_embed.proj.weight)


def test_timm_vit_wrong_checkpoint_raises(tmp_path) -> None:
    deeper = TimmViT.tiny(model_kwargs={"depth": 3, "embed_dim": 64, "num_heads": 2, "img_size": 56})
    path = tmp_path / "deeper.pth"
    torch.save(deeper.model.state_dict(), path)
    with pytest.raises(UserError, match="deeper.pth") as info:
        TimmViT.tiny(checkpoint_path=str(path))
    assert "blocks.2" in str(info.value)  # the unexpected keys are named
    wider = TimmViT.tiny(model_kwargs={"depth": 2, "embed_dim": 96, "num_heads": 2, "img_size": 56})
    path = tmp_path / "wider.safetensors"
    save_file({k: v.contiguous() for k, v in wider.model.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="wider.safetensors"):
        TimmViT.tiny(checkpoint_path=str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        TimmViT.tiny(checkpoint_path=str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------ CLIP text transformer


@pytest.fixture(scope="module")
def tiny_text() -> CLIPTextTransformer:
    torch.manual_seed(0)
    return CLIPTextTransformer.tiny().eval()


def test_text_transformer_tokenizer(tiny_text: CLIPTextTransformer) -> None:
    texts = ["a photo of a cat.", "Two dogs playing in the snow", ""]
    ids = tiny_text.tokenize(texts)
    assert ids.dtype == torch.int64 and ids.shape == (3, 77)
    assert torch.equal(ids, open_clip.tokenize(texts))
    assert tiny_text.bpe_tokenizer.encode("cat") == open_clip.tokenizer._tokenizer.encode("cat")
    long_caption = " ".join(["word"] * 200)
    ids = tiny_text.tokenize([long_caption])
    assert ids[0, 0] == tiny_text.sot_token_id and ids[0, -1] == tiny_text.eot_token_id
    assert (ids[0] == tiny_text.eot_token_id).sum() == 1


def test_text_transformer_outputs(tiny_text: CLIPTextTransformer) -> None:
    ids = tiny_text.tokenize(["a photo of a cat", "a bird"])
    with torch.no_grad():
        out = tiny_text(ids)
    assert isinstance(out, TextFeatures)
    assert out.tokens.shape == (2, 77, 48) and out.pooled.shape == (2, 48)
    assert tiny_text.embed_dim == 48 and tiny_text.context_length == 77
    eot = ids.argmax(-1)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(2), eot])
    assert torch.equal(out.token_ids, ids)
    # a shorter (cropped) sequence gives the same features as the padded one
    with torch.no_grad():
        short = tiny_text(ids[:, :10])
    torch.testing.assert_close(short.tokens, out.tokens[:, :10], rtol=1e-5, atol=1e-5)


def test_text_transformer_causal(tiny_text: CLIPTextTransformer) -> None:
    ids = tiny_text.tokenize(["a photo of a small cat on a mat"])
    j = 5
    changed = ids.clone()
    changed[0, j] = tiny_text.bpe_tokenizer.encode("dog")[0]
    assert not torch.equal(changed, ids)
    with torch.no_grad():
        a, b = tiny_text(ids).tokens, tiny_text(changed).tokens
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, j:], b[:, j:])


def test_text_transformer_defaults_and_checkpoint(tmp_path) -> None:
    with torch.device("meta"):  # the default (full-size) architecture, without allocating it
        full = CLIPTextTransformer()
    assert full.width == 512 and len(full.text.transformer.resblocks) == 12 and full.embed_dim == 768
    assert full.text.attn_mask is not None and full.text.text_projection.shape == (512, 768)
    del full
    torch.manual_seed(3)
    src = CLIPTextTransformer.tiny().eval()
    path = tmp_path / "text.pth"
    torch.save(src.state_dict(), path)
    dst = CLIPTextTransformer.tiny(checkpoint_path=str(path)).eval()
    ids = src.tokenize(["hello world"])
    with torch.no_grad():
        torch.testing.assert_close(src(ids).tokens, dst(ids).tokens, rtol=0, atol=0)
    with pytest.raises(UserError, match="text.pth"):
        CLIPTextTransformer.tiny(output_dim=16, checkpoint_path=str(path))


# ----------------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module", params=["vit", "convnext"])
def tiny_clip(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    return request.param, build_open_clip_model(config=tiny_open_clip_config(request.param))


def _native_size(kind: str) -> int:
    return 32 if kind == "vit" else 64


def test_open_clip_text_matches_encode_text(tiny_clip) -> None:
    _, model = tiny_clip
    enc = OpenCLIPText(model=model).eval()
    ids = enc.tokenize(["a photo of a cat", "a diagram", "an extremely " + "long " * 100 + "caption"])
    assert torch.equal(
        ids, open_clip.tokenize(["a photo of a cat", "a diagram", "an extremely " + "long " * 100 + "caption"])
    )
    with torch.no_grad():
        out = enc(ids)
        ref = model.encode_text(ids)
    assert out.tokens.shape == (3, 77, 32) and enc.embed_dim == 32
    torch.testing.assert_close(out.pooled, ref, rtol=0, atol=0)
    torch.testing.assert_close(out.tokens[torch.arange(3), ids.argmax(-1)], out.pooled, rtol=1e-5, atol=1e-6)
    # parameter names are the CLIP checkpoint's text keys
    assert set(enc.state_dict()) <= set(model.state_dict())


def test_open_clip_image_matches_encode_image(tiny_clip) -> None:
    kind, model = tiny_clip
    enc = OpenCLIPImage(model=model).eval()
    size = _native_size(kind)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = enc.encode(x)
        ref = model.encode_image(x)
    torch.testing.assert_close(out.pooled, ref, rtol=0, atol=0)
    assert enc.embed_dim == 32 and enc.dense_in_joint_space
    grid = size // enc.patch_size
    assert out.dense.shape == (2, 32, grid, grid)
    assert out.dense.shape[1] == out.pooled.shape[1] == enc.embed_dim
    assert torch.allclose(enc.mean.flatten(), torch.tensor(open_clip.OPENAI_DATASET_MEAN))
    assert set(enc.state_dict()) <= set(model.state_dict())


def test_open_clip_image_dense_semantics(tiny_clip) -> None:
    kind, model = tiny_clip
    enc = OpenCLIPImage(model=model).eval()
    if kind == "vit":
        # dense = open_clip's own patch tokens (after ln_post) projected by visual.proj
        x = torch.rand(1, 3, 32, 32)
        model.visual.output_tokens = True
        try:
            with torch.no_grad():
                _, tokens = model.visual(x)
                out = enc.encode(x)
        finally:
            model.visual.output_tokens = False
        ref = (tokens @ model.visual.proj).transpose(1, 2).reshape(1, 32, 4, 4)
        torch.testing.assert_close(out.dense, ref, rtol=1e-5, atol=1e-5)
    else:
        # a 1x1 trunk map: the per-location head equals the pooled head
        x = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            out = enc.encode(x)
        assert out.dense.shape == (1, 32, 1, 1)
        torch.testing.assert_close(out.dense[:, :, 0, 0], out.pooled, rtol=1e-5, atol=1e-5)


def test_open_clip_image_any_size_and_normalisation(tiny_clip) -> None:
    kind, model = tiny_clip
    enc = OpenCLIPImage(model=model).eval()
    x = torch.rand(1, 3, 96, 72)
    with torch.no_grad():
        a = enc(x)
        b = enc.encode((x - enc.mean) / enc.std)
    assert a.dense.shape == (1, 32, 96 // enc.patch_size, 72 // enc.patch_size)
    torch.testing.assert_close(a.dense, b.dense)
    torch.testing.assert_close(a.pooled, b.pooled)


def test_open_clip_checkpoint(tmp_path) -> None:
    cfg = tiny_open_clip_config("vit")
    torch.manual_seed(4)
    src = build_open_clip_model(config=cfg)
    path = tmp_path / "clip.pth"
    torch.save(src.state_dict(), path)
    image = OpenCLIPImage(config=cfg, checkpoint_path=str(path)).eval()
    text = OpenCLIPText(config=cfg, checkpoint_path=str(path)).eval()
    x = torch.rand(1, 3, 32, 32)
    ids = text.tokenize(["a cat"])
    with torch.no_grad():
        torch.testing.assert_close(image.encode(x).pooled, src.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(text(ids).pooled, src.encode_text(ids), rtol=0, atol=0)
    bad = tmp_path / "bad_clip.pth"
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("visual.")}, bad)
    with pytest.raises(UserError, match="bad_clip.pth"):
        OpenCLIPImage(config=cfg, checkpoint_path=str(bad))


def test_timm_vit_loads_original_dinov2_checkpoint(tmp_path) -> None:
    """facebookresearch/dinov2 key layout (register_tokens, mask_token, cls pos in pos_embed)."""
    torch.manual_seed(5)
    src = TimmViT.tiny(registers=True).eval()
    state = src.model.state_dict()
    original = {("register_tokens" if k == "reg_token" else k): v for k, v in state.items()}
    original["pos_embed"] = torch.cat([torch.zeros(1, 1, 64), state["pos_embed"]], dim=1)
    original["mask_token"] = torch.zeros(1, 64)
    path = tmp_path / "dinov2_original.pth"
    torch.save(original, path)
    dst = TimmViT.tiny(registers=True, checkpoint_path=str(path)).eval()
    x = torch.rand(1, 3, 56, 70)
    with torch.no_grad():
        torch.testing.assert_close(src(x).dense, dst(x).dense, rtol=0, atol=0)


# ------------------------------------------------------------------ full-size architectures (slow)


@pytest.mark.slow
def test_full_size_architectures_random_init() -> None:
    """The real architectures build offline with random weights and give the expected shapes."""
    with torch.no_grad():
        vit = TimmViT("vit_base_patch14_reg4_dinov2").eval()
        out = vit(torch.rand(1, 3, 224, 224))
        assert out.dense.shape == (1, 768, 16, 16) and vit.num_prefix_tokens == 5
        model = build_open_clip_model("convnext_large_d_320")
        image, text = OpenCLIPImage(model=model).eval(), OpenCLIPText(model=model).eval()
        out = image(torch.rand(1, 3, 320, 320))
        assert out.dense.shape == (1, 768, 10, 10) and out.pooled.shape == (1, 768)
        ids = text.tokenize(["a photo of a cat"])
        torch.testing.assert_close(text(ids).pooled, model.encode_text(ids))
        del model, image, text
        model = build_open_clip_model("ViT-B-16")
        tokenizer_text = OpenCLIPText(model_name="ViT-B-16")
        assert torch.equal(tokenizer_text.tokenize(["a cat"]), open_clip.tokenize(["a cat"]))
        image = OpenCLIPImage(model=model).eval()
        x = torch.rand(1, 3, 224, 224)
        out = image(x)
        assert out.dense.shape == (1, 512, 14, 14)
        torch.testing.assert_close(out.pooled, model.encode_image(image.normalize(x)))
