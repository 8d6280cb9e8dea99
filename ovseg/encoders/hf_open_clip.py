"""Conversion between open_clip's ViT CLIP and transformers' ``CLIPModel`` (weights and configs).

Used to load a transformers-format CLIP into an open_clip model (``build_open_clip_model(
"transformers:NAME_OR_FOLDER")``, e.g. for CDT, which needs open_clip's module layout) and to export
an open_clip ViT CLIP, e.g. one trained by ovseg, to the transformers format. The key mapping is one
table, read in both directions; q/k/v projections are concatenated into / split from open_clip's
``in_proj`` and the projection matrices are transposed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

#: prefix of ``model_name`` that selects a transformers checkpoint in :func:`build_open_clip_model`
TRANSFORMERS_PREFIX = "transformers:"

_LAYER_PAIRS = (  # open_clip resblock suffix -> transformers encoder-layer suffix
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
)


def _key_pairs(vision_layers: int, text_layers: int) -> Iterator[tuple[str, str, str]]:
    """(open_clip key, transformers key, kind) with kind ``same``, ``transpose`` or ``qkv_weight`` /
    ``qkv_bias`` (the transformers key then names the q projection; k and v follow)."""
    yield "logit_scale", "logit_scale", "same"
    yield "visual.class_embedding", "vision_model.embeddings.class_embedding", "same"
    yield "visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", "same"
    yield "visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "same"
    for oc, hf in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"),
    ):
        yield f"{oc}.weight", f"{hf}.weight", "same"
        yield f"{oc}.bias", f"{hf}.bias", "same"
    yield "visual.proj", "visual_projection.weight", "transpose"
    yield "token_embedding.weight", "text_model.embeddings.token_embedding.weight", "same"
    yield "positional_embedding", "text_model.embeddings.position_embedding.weight", "same"
    yield "text_projection", "text_projection.weight", "transpose"
    for oc_tower, hf_tower, layers in (
        ("visual.transformer", "vision_model.encoder", vision_layers),
        ("transformer", "text_model.encoder", text_layers),
    ):
        for i in range(layers):
            oc, hf = f"{oc_tower}.resblocks.{i}", f"{hf_tower}.layers.{i}"
            yield f"{oc}.attn.in_proj_weight", f"{hf}.self_attn.q_proj.weight", "qkv_weight"
            yield f"{oc}.attn.in_proj_bias", f"{hf}.self_attn.q_proj.bias", "qkv_bias"
            for oc_part, hf_part in _LAYER_PAIRS:
                for param in ("weight", "bias"):
                    yield f"{oc}.{oc_part}.{param}", f"{hf}.{hf_part}.{param}", "same"


def _qkv_keys(q_key: str) -> list[str]:
    return [q_key.replace("q_proj", name) for name in ("q_proj", "k_proj", "v_proj")]


def open_clip_to_hf_state_dict(state: dict[str, Tensor], vision_layers: int, text_layers: int) -> dict[str, Tensor]:
    """An open_clip ViT ``CLIP`` state dict -> a transformers ``CLIPModel`` state dict."""
    out: dict[str, Tensor] = {}
    for oc, hf, kind in _key_pairs(vision_layers, text_layers):
        value = state[oc]
        if kind == "transpose":
            out[hf] = value.T.contiguous()
        elif kind.startswith("qkv"):
            out.update(zip(_qkv_keys(hf), (part.contiguous() for part in value.chunk(3, dim=0))))
        else:
            out[hf] = value
    return out


def hf_to_open_clip_state_dict(state: dict[str, Tensor], vision_layers: int, text_layers: int) -> dict[str, Tensor]:
    """A transformers ``CLIPModel`` state dict -> an open_clip ViT ``CLIP`` state dict (``attn_mask`` excluded)."""
    out: dict[str, Tensor] = {}
    for oc, hf, kind in _key_pairs(vision_layers, text_layers):
        if kind == "transpose":
            out[oc] = state[hf].T.contiguous()
        elif kind.startswith("qkv"):
            out[oc] = torch.cat([state[key] for key in _qkv_keys(hf)], dim=0)
        else:
            out[oc] = state[hf]
    return out


def _activation_is_quick_gelu(act: str, source: str) -> bool:
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"{source}: activation {act!r} has no open_clip equivalent (quick_gelu or gelu)")
    return act == "quick_gelu"


def open_clip_config_from_hf(config: Any, source: str = "the transformers CLIP") -> dict[str, Any]:
    """A transformers ``CLIPConfig`` -> ``open_clip.model.CLIP`` keyword arguments (ViT, CLIP BPE text)."""
    vision, text = config.vision_config, config.text_config
    quick = _activation_is_quick_gelu(vision.hidden_act, source)
    if _activation_is_quick_gelu(text.hidden_act, source) != quick:
        raise ValueError(f"{source}: the image and text towers use different activations")
    for tower in (vision, text):
        if abs(float(tower.layer_norm_eps) - 1e-5) > 1e-12:
            raise ValueError(f"{source}: layer_norm_eps {tower.layer_norm_eps} differs from open_clip's 1e-5")
    return {
        "embed_dim": int(config.projection_dim),
        "vision_cfg": {
            "image_size": int(vision.image_size),
            "patch_size": int(vision.patch_size),
            "width": int(vision.hidden_size),
            "layers": int(vision.num_hidden_layers),
            "head_width": int(vision.hidden_size) // int(vision.num_attention_heads),
            "mlp_ratio": float(vision.intermediate_size) / float(vision.hidden_size),
        },
        "text_cfg": {
            "context_length": int(text.max_position_embeddings),
            "vocab_size": int(text.vocab_size),
            "width": int(text.hidden_size),
            "heads": int(text.num_attention_heads),
            "layers": int(text.num_hidden_layers),
            "mlp_ratio": float(text.intermediate_size) / float(text.hidden_size),
        },
        "quick_gelu": quick,
    }


def hf_config_from_open_clip(config: dict[str, Any]) -> Any:
    """``open_clip.model.CLIP`` keyword arguments of a ViT CLIP -> a transformers ``CLIPConfig``."""
    import transformers

    vision, text = dict(config["vision_cfg"]), dict(config["text_cfg"])
    if "timm_model_name" in vision:
        raise ValueError("only open_clip ViT towers have a transformers CLIPModel equivalent")
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    width = int(vision["width"])
    heads = width // int(vision.get("head_width", 64))
    text_width = int(text.get("width", 512))
    return transformers.CLIPConfig(
        projection_dim=int(config["embed_dim"]),
        vision_config={
            "hidden_size": width,
            "num_hidden_layers": int(vision["layers"]),
            "num_attention_heads": heads,
            "intermediate_size": int(width * float(vision.get("mlp_ratio", 4.0))),
            "image_size": int(vision["image_size"]),
            "patch_size": int(vision["patch_size"]),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
        text_config={
            "hidden_size": text_width,
            "num_hidden_layers": int(text.get("layers", 12)),
            "num_attention_heads": int(text.get("heads", 8)),
            "intermediate_size": int(text_width * float(text.get("mlp_ratio", 4.0))),
            "max_position_embeddings": int(text.get("context_length", 77)),
            "vocab_size": int(text.get("vocab_size", 49408)),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
    )


def open_clip_from_transformers(name_or_path: str, revision: str | None = None) -> torch.nn.Module:
    """A transformers-format CLIP (Hub name or local folder) as an ``open_clip.model.CLIP`` (eval, fp32)."""
    import open_clip

    from ovseg.encoders.hf import load_hf_model

    model, _ = load_hf_model(name_or_path, revision)
    if model.config.model_type != "clip" or not hasattr(model, "text_model") or not hasattr(model, "vision_model"):
        raise ValueError(
            f"{name_or_path!r} is not a full transformers CLIPModel ({type(model).__name__}): only CLIP "
            "image+text checkpoints (model_type 'clip', CLIP BPE tokenizer) convert to open_clip. SigLIP's "
            "image embedding comes from an attention-pooling head, with no per-location projection, which "
            "CDT's dense classifier needs"
        )
    config = open_clip_config_from_hf(model.config, repr(name_or_path))
    clip = open_clip.model.CLIP(**config)
    state = hf_to_open_clip_state_dict(model.state_dict(), config["vision_cfg"]["layers"], config["text_cfg"]["layers"])
    clip.load_state_dict(state, strict=True)
    return clip.eval()


def clip_bpe_hf_tokenizer() -> Any:
    """A transformers ``CLIPTokenizer`` built from open_clip's bundled CLIP BPE (no download): the
    tokenizer to save next to a CLIP exported with :func:`open_clip_to_hf_state_dict`."""
    import transformers
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)
