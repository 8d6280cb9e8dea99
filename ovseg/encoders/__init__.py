"""Image and text encoders behind one protocol."""

from ovseg.encoders.base import (
    ImageEncoder,
    ImageFeatures,
    TextEncoder,
    TextFeatures,
    load_state_dict_file,
    load_state_dict_strict,
)
from ovseg.encoders.denoiser import DVTDenoiser
from ovseg.encoders.hf import HFImage, HFText
from ovseg.encoders.hf_open_clip import (
    clip_bpe_hf_tokenizer,
    hf_config_from_open_clip,
    hf_to_open_clip_state_dict,
    open_clip_config_from_hf,
    open_clip_from_transformers,
    open_clip_to_hf_state_dict,
)
from ovseg.encoders.open_clip import (
    OpenCLIPImage,
    OpenCLIPText,
    build_open_clip_model,
    tiny_open_clip_config,
)
from ovseg.encoders.text_transformer import CLIPTextTransformer
from ovseg.encoders.timm_vit import NORM_PRESETS, TimmViT, tiny_timm_vit_kwargs

__all__ = [
    "NORM_PRESETS",
    "CLIPTextTransformer",
    "DVTDenoiser",
    "HFImage",
    "HFText",
    "ImageEncoder",
    "ImageFeatures",
    "OpenCLIPImage",
    "OpenCLIPText",
    "TextEncoder",
    "TextFeatures",
    "TimmViT",
    "build_open_clip_model",
    "clip_bpe_hf_tokenizer",
    "hf_config_from_open_clip",
    "hf_to_open_clip_state_dict",
    "load_state_dict_file",
    "load_state_dict_strict",
    "open_clip_config_from_hf",
    "open_clip_from_transformers",
    "open_clip_to_hf_state_dict",
    "tiny_open_clip_config",
    "tiny_timm_vit_kwargs",
]
