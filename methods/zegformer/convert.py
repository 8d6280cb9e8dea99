"""Official ZegFormer checkpoints (detectron2 layout) -> ovseg's :class:`~ovseg.methods.zegformer.ZegFormer`.

``ovseg convert zegformer SRC DST -c CONFIG`` (:mod:`ovseg.convert`) calls :func:`convert_state_dict`.
The official checkpoint (``dingjiansw101/ZegFormer``, e.g. ``zegformer_R101_bs32_60k_vit16_coco-stuff.pth``)
holds, under ``model``:

- ``backbone.*``: detectron2's ResNet (``stem.conv1``, ``res2..res5.<block>.conv1..3`` and
  ``shortcut``, each with a FrozenBN ``norm``) -> timm's ResNet in ``model.backbone.body``
  (``conv1``/``bn1``, ``layer1..4.<block>.conv1..3``/``bn1..3``, ``downsample.0/1``);
- ``sem_seg_head.pixel_decoder.*``: MaskFormer's ``BasePixelDecoder`` (``layer_<n>`` on res5,
  ``adapter_<i>``/``layer_<i>`` on the finer levels, ``mask_features``) -> ``model.pixel_decoder``;
- ``sem_seg_head.predictor.*``: the DETR decoder (``transformer.decoder.layers.<j>.{self_attn,
  multihead_attn,linear1,linear2,norm1..3}``, ``transformer.decoder.norm``), ``query_embed``,
  ``input_proj``, ``mask_embed``, ``projection_layer`` and the no-object ``bg_feature`` ->
  ``model.*`` and ``classifier.no_object_embedding``; its ``logit_scale`` (fixed, log 1/tau) and
  ``criterion.empty_weight`` (the no-object CE weight) are configuration, checked and dropped;
- optionally ``sem_seg_head.predictor.clip_model.*`` (OpenAI CLIP, present only when the model was
  saved with its CLIP branch) -> ``clip_text`` / ``clip_image`` (open_clip uses the same names).

Keys the file lacks (normally the frozen CLIP towers) keep the weights of the model built from the
config (the open_clip model and pretrained tag it names) and are reported as filled.
"""

from __future__ import annotations

import math
import re
from typing import Any

from torch import Tensor

from ovseg.convert import ConversionError, KeyReport

BACKBONE = "backbone."
PIXEL_DECODER = "sem_seg_head.pixel_decoder."
PREDICTOR = "sem_seg_head.predictor."
CLIP = PREDICTOR + "clip_model."

#: detectron2 FrozenBN buffer -> the same name in timm's FrozenBatchNorm2d
_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")
#: text-tower keys of an OpenAI CLIP model (everything else but ``visual.*`` and ``logit_scale``)
_CLIP_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _backbone_key(key: str) -> str | None:
    """detectron2 ResNet key (without ``backbone.``) -> timm ResNet key (without ``body.``), or None."""
    match = re.fullmatch(r"stem\.conv1\.(weight|norm\.(\w+))", key)
    if match:
        return "conv1.weight" if match.group(2) is None else f"bn1.{match.group(2)}"
    match = re.fullmatch(r"res([2-5])\.(\d+)\.(conv[123]|shortcut)\.(weight|norm\.(\w+))", key)
    if match is None:
        return None
    stage, block, conv, _, norm_param = match.groups()
    layer = f"layer{int(stage) - 1}.{block}"
    if conv == "shortcut":
        return f"{layer}.downsample.0.weight" if norm_param is None else f"{layer}.downsample.1.{norm_param}"
    return f"{layer}.{conv}.weight" if norm_param is None else f"{layer}.bn{conv[-1]}.{norm_param}"


def _pixel_decoder_key(key: str, levels: int) -> str | None:
    """``BasePixelDecoder`` key -> :class:`~ovseg.methods.zegformer.model.FPNPixelDecoder` key.

    ``layer_<levels>`` is the coarsest level's conv (``top``); for finer level ``i`` (1 = res2),
    ``adapter_i`` / ``layer_i`` are ``laterals`` / ``outputs`` number ``levels - 1 - i`` (ovseg orders
    them coarse to fine)."""
    if key.startswith("mask_features."):
        return key
    match = re.fullmatch(r"(adapter|layer)_(\d+)\.(weight|bias|norm\.weight|norm\.bias)", key)
    if match is None:
        return None
    kind, level, param = match.group(1), int(match.group(2)), match.group(3)
    param = "conv." + param if param in ("weight", "bias") else param
    if kind == "layer" and level == levels:
        return f"top.{param}"
    if not 1 <= level < levels:
        return None
    index = levels - 1 - level
    return f"{'laterals' if kind == 'adapter' else 'outputs'}.{index}.{param}"


def _predictor_key(key: str) -> str | None:
    """``TransformerZeroshotPredictor`` key (no CLIP) -> ovseg key, or None."""
    match = re.fullmatch(
        r"transformer\.decoder\.layers\.(\d+)\.(self_attn|multihead_attn|linear1|linear2|"
        r"norm1|norm2|norm3)\.(.+)",
        key,
    )
    if match:
        layer, module, param = match.groups()
        return f"model.layers.{layer}.{'cross_attn' if module == 'multihead_attn' else module}.{param}"
    match = re.fullmatch(r"transformer\.decoder\.norm\.(weight|bias)", key)
    if match:
        return f"model.decoder_norm.{match.group(1)}"
    match = re.fullmatch(r"(input_proj|query_embed|mask_embed\.layers\.\d+)\.(weight|bias)", key)
    if match:
        return f"model.{key}"
    match = re.fullmatch(r"projection_layer\.(weight|bias)", key)
    if match:
        return f"model.projection.{match.group(1)}"
    if key == "bg_feature":
        return "classifier.no_object_embedding"
    return None


def _clip_key(key: str, model: Any) -> str | None:
    """OpenAI CLIP key (``visual.*``, text-tower keys) -> ``clip_image.visual.*`` / ``clip_text.*``."""
    if key.startswith("visual."):
        return None if model.clip_image is None else f"clip_image.{key}"
    if key.startswith(_CLIP_TEXT_PREFIXES):
        return f"clip_text.{key}"
    return None


def _check_scalar(value: Tensor, expected: float, what: str, option: str) -> None:
    if value.numel() < 1 or not math.isclose(float(value.flatten()[-1]), expected, rel_tol=1e-4):
        raise ConversionError(
            f"{what} is {value.flatten()[-1].item():.6g} in the checkpoint but {expected:.6g} "
            f"in the config: set {option} to match the checkpoint"
        )


def convert_state_dict(official: dict[str, Tensor], model: Any) -> tuple[dict[str, Tensor], KeyReport]:
    """Map an official ZegFormer state dict onto ``model``'s keys.

    Args:
        official: the checkpoint's tensors by key (:func:`ovseg.convert.load_official_weights`).
        model: the :class:`~ovseg.methods.zegformer.ZegFormer` built from the config (its state
            dict provides the keys the file lacks, e.g. the CLIP towers).

    Returns:
        ``model``'s full state dict with the checkpoint's tensors in place, and the
        :class:`~ovseg.convert.KeyReport` (every official key mapped or dropped with a reason;
        every model key the file lacks reported as filled from the config).

    Raises:
        ConversionError: an official key the mapping does not know, or a fixed value (logit
            scale, no-object weight) that contradicts the config.
    """
    report = KeyReport()
    own = model.state_dict()
    state = dict(own)
    levels = len(model.model.backbone.channels)
    for key, value in official.items():
        target: str | None = None
        if key.startswith(BACKBONE):
            timm_key = _backbone_key(key.removeprefix(BACKBONE))
            target = None if timm_key is None else f"model.backbone.body.{timm_key}"
        elif key.startswith(PIXEL_DECODER):
            decoder_key = _pixel_decoder_key(key.removeprefix(PIXEL_DECODER), levels)
            target = None if decoder_key is None else f"model.pixel_decoder.{decoder_key}"
        elif key.startswith(CLIP):
            clip_key = key.removeprefix(CLIP)
            if clip_key == "logit_scale":
                report.drop(key, "CLIP's logit scale: ovseg uses clip_logit_scale from the config")
                continue
            target = _clip_key(clip_key, model)
            if target is None and clip_key.startswith("visual.") and model.clip_image is None:
                report.drop(key, "CLIP image tower, unused: the config has no clip_image")
                continue
        elif key == PREDICTOR + "logit_scale":
            _check_scalar(
                value.exp(),
                1.0 / model.classifier.temperature,
                "exp(logit_scale) of the segment logits",
                "model.init_args.temperature",
            )
            report.drop(key, "fixed segment logit scale log(1/temperature): from the config's temperature")
            continue
        elif key.startswith(PREDICTOR):
            target = _predictor_key(key.removeprefix(PREDICTOR))
        elif key == "criterion.empty_weight":
            _check_scalar(
                value,
                model.set_loss["no_object_weight"],
                "the no-object class weight",
                "model.init_args.no_object_weight",
            )
            report.drop(key, "loss buffer (cross-entropy class weights): from the config's no_object_weight")
            continue
        if target is None:
            continue  # unknown: left unaccounted, ovseg.convert reports it
        if target not in own:
            raise ConversionError(
                f"{key} maps to {target}, which the model of the config does not have: "
                "is the config the checkpoint's architecture (backbone, layers, CLIP)?"
            )
        if tuple(value.shape) != tuple(own[target].shape):
            raise ConversionError(
                f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(own[target].shape)} "
                f"for {target} in the config: set the config's sizes to the checkpoint's"
            )
        state[target] = value.to(own[target].dtype)
        report.map(key, target)
    mapped = set(report.mapped.values())
    lacking = [key for key in own if key not in mapped and not key.startswith(("clip_text.", "clip_image."))]
    if lacking:
        shown = ", ".join(lacking[:5]) + (" ..." if len(lacking) > 5 else "")
        raise ConversionError(
            f"the checkpoint lacks {len(lacking)} weight(s) of the proposal network ({shown}): "
            "is it a ZegFormer checkpoint of the config's architecture?"
        )
    for key in own:
        if key not in mapped:
            tower = key.split(".", 1)[0]
            report.fill(key, f"the config's {tower} (its open_clip model and pretrained weights)")
    if model.hparams.get("backbone_pretrained"):
        report.hparams_updates["backbone_pretrained"] = False  # the weights are in the checkpoint now
    return state, report
