"""MAFT+ release checkpoint (``MAFT_Plus`` of jiaosiyu1999/MAFT-Plus) -> :class:`~methods.cdt.CDT` state dict.

``ovseg convert cdt maftplus_large.pth runs/maftplus_large.ckpt -c configs/cdt/coco_stuff_convnext_l.yaml``
(the shared machinery is :mod:`ovseg.convert`; docs/cdt.md, "Reproducing the release").

Every official key is mapped by one of :data:`RULES` (a regular expression on the official key and
the ovseg key it becomes) or dropped by one of :data:`DROPS` with its reason; every shape is checked
against the model built from the config.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ovseg.convert import ConversionError, KeyReport

_CLIP = r"backbone\.clip_model\."
_HEAD = r"sem_seg_head\."
_PIXEL = _HEAD + r"pixel_decoder\."
_PREDICTOR = _HEAD + r"predictor\."

#: (official key pattern, ovseg key template); the first full match wins
RULES: tuple[tuple[str, str], ...] = (
    # the CLIP model: image tower (fine-tuned trunk, frozen head), text tower, logit scale
    (_CLIP + r"visual\.(.+)", r"model.backbone.encoder.visual.\1"),
    (_CLIP + r"logit_scale", r"model.clip_logit_scale"),
    (
        _CLIP + r"((?:token_embedding|positional_embedding|text_projection|transformer|ln_final)(?:\..+)?)",
        r"text_encoder.\1",
    ),
    # Mask2Former's pixel decoder (deformable encoder over res5..res3, one FPN step to stride 4)
    (_PIXEL + r"input_proj\.(\d+)\.([01])\.(weight|bias)", r"model.pixel_decoder.input_proj.\1.\2.\3"),
    (_PIXEL + r"transformer\.level_embed", r"model.pixel_decoder.level_embed"),
    (_PIXEL + r"transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)", r"model.pixel_decoder.layers.\1.attention.\2"),
    (
        _PIXEL + r"transformer\.encoder\.layers\.(\d+)\.((?:norm1|norm2|linear1|linear2)\..+)",
        r"model.pixel_decoder.layers.\1.\2",
    ),
    (_PIXEL + r"adapter_1\.weight", r"model.pixel_decoder.lateral.0.weight"),
    (_PIXEL + r"adapter_1\.norm\.(weight|bias)", r"model.pixel_decoder.lateral.1.\1"),
    (_PIXEL + r"layer_1\.weight", r"model.pixel_decoder.output.0.weight"),
    (_PIXEL + r"layer_1\.norm\.(weight|bias)", r"model.pixel_decoder.output.1.\1"),
    (_PIXEL + r"mask_features\.(weight|bias)", r"model.pixel_decoder.mask_features.\1"),
    # the masked-attention decoder with FC-CLIP's in-vocabulary classifier
    (
        _PREDICTOR + r"transformer_self_attention_layers\.(\d+)\.self_attn\.(.+)",
        r"model.decoder.self_attention.\1.attention.\2",
    ),
    (_PREDICTOR + r"transformer_self_attention_layers\.(\d+)\.norm\.(.+)", r"model.decoder.self_attention.\1.norm.\2"),
    (
        _PREDICTOR + r"transformer_cross_attention_layers\.(\d+)\.multihead_attn\.(.+)",
        r"model.decoder.cross_attention.\1.attention.\2",
    ),
    (
        _PREDICTOR + r"transformer_cross_attention_layers\.(\d+)\.norm\.(.+)",
        r"model.decoder.cross_attention.\1.norm.\2",
    ),
    (_PREDICTOR + r"transformer_ffn_layers\.(\d+)\.(.+)", r"model.decoder.ffn.\1.\2"),
    (_PREDICTOR + r"_mask_pooling_proj\.(.+)", r"model.decoder.mask_pooling_proj.\1"),
    (
        _PREDICTOR + r"((?:decoder_norm|query_feat|query_embed|level_embed|input_proj|mask_embed|class_embed)\..+"
        r"|logit_scale)",
        r"model.decoder.\1",
    ),
    # void class embedding and Content-Dependent Transfer
    (r"void_embedding\.weight", r"model.void_embedding.weight"),
    (r"cdt\.cross_atten\.multihead_attn\.(.+)", r"model.cdt.attention.\1"),
    (r"cdt\.cross_atten\.MLP\.(weight|bias)", r"model.cdt.linear.\1"),
    (r"cdt\.cross_atten\.norm\.(weight|bias)", r"model.cdt.norm.\1"),
)

#: (official key pattern, why it is not used)
DROPS: tuple[tuple[str, str], ...] = (
    (
        r"backbone_t\..+",
        (
            "the RC teacher (a frozen copy of the pretrained CLIP, used in training only); ovseg "
            "rebuilds it from the CLIP weights when it trains and does not save it"
        ),
    ),
    (r"criterion\..+", "set-criterion buffer (no-object class weight), rebuilt from no_object_weight"),
    (r"(pixel_mean|pixel_std)", "input normalisation constants; ovseg normalises with the CLIP model's own"),
    (_CLIP + r"attn_mask", "the text tower's causal mask, rebuilt by open_clip"),
)


def map_key(official_key: str) -> str | None:
    """The ovseg key of ``official_key`` by :data:`RULES`, or None."""
    for pattern, template in RULES:
        match = re.fullmatch(pattern, official_key)
        if match:
            return match.expand(template)
    return None


def drop_reason(official_key: str) -> str | None:
    """Why ``official_key`` is dropped (:data:`DROPS`), or None."""
    return next((reason for pattern, reason in DROPS if re.fullmatch(pattern, official_key)), None)


def convert_state_dict(official: dict[str, Tensor], model: Any) -> tuple[dict[str, Tensor], KeyReport]:
    """Map a MAFT+ state dict onto ``model`` (a :class:`~methods.cdt.CDT`).

    Args:
        official: the release's tensors by key (``backbone.clip_model.*``, ``backbone_t.*``,
            ``sem_seg_head.*``, ``cdt.cross_atten.*``, ``void_embedding.weight``, ``criterion.*``).
        model: the CDT built from the config the checkpoint is evaluated with.

    Returns:
        the model's full state dict (every key from the official file) and the report (mapped /
        dropped with reasons; ``pretrained`` recorded as None: the CLIP weights are inside).

    Raises:
        ConversionError: a key the rules do not know, a model key the file lacks, or a shape that
            differs from the config's (naming the keys and both shapes).
    """
    report = KeyReport()
    own = model.state_dict()
    converted: dict[str, Tensor] = {}
    unknown, wrong = [], []
    for key, value in official.items():
        target = map_key(key)
        if target is None:
            reason = drop_reason(key)
            if reason is None:
                unknown.append(key)
            else:
                report.drop(key, reason)
            continue
        if target not in own:
            unknown.append(f"{key} (-> {target}, not in the model)")
            continue
        if tuple(value.shape) != tuple(own[target].shape):
            wrong.append(f"{key} {tuple(value.shape)} -> {target} {tuple(own[target].shape)}")
            continue
        converted[target] = value.to(own[target].dtype)
        report.map(key, target)
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} shape(s) differ from the config's model: " + "; ".join(wrong[:5]))
    if unknown:
        problems.append(f"{len(unknown)} key(s) the converter does not know: " + ", ".join(unknown[:5]))
    missing = [key for key in own if key not in converted]
    if missing:
        problems.append(f"{len(missing)} model key(s) not in the file: " + ", ".join(missing[:5]))
    if problems:
        raise ConversionError(
            "MAFT+ checkpoint does not fit the config's CDT (is it the config of the same CLIP "
            "and head sizes?): " + " | ".join(problems)
        )
    if model.hparams.get("pretrained") is not None:
        report.hparams_updates["pretrained"] = None
    return converted, report
