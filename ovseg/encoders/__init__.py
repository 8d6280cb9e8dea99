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
from ovseg.encoders.open_clip import (
    OpenCLIPImage,
    OpenCLIPText,
    build_open_clip_model,
    tiny_open_clip_config,
)
from ovseg.encoders.text_transformer import CLIPTextTransformer
from ovseg.encoders.timm_vit import NORM_PRESETS, TimmViT, tiny_timm_vit_kwargs

__all__ = [
    "CLIPTextTransformer",
    "DVTDenoiser",
    "ImageEncoder",
    "ImageFeatures",
    "NORM_PRESETS",
    "OpenCLIPImage",
    "OpenCLIPText",
    "TextEncoder",
    "TextFeatures",
    "TimmViT",
    "build_open_clip_model",
    "load_state_dict_file",
    "load_state_dict_strict",
    "tiny_open_clip_config",
    "tiny_timm_vit_kwargs",
]
