"""Official SimZSS checkpoints (tileb1/simzss @2142ac5) -> ovseg :class:`SimZSS` state dicts.

The release's state dict (``SimZSS`` of its open_clip fork, ``module.`` prefix removed) holds:

* ``visual.vit.model.*``: the timm DINOv2 ViT (frozen) -> the ``TimmViT``'s ``model.*``;
* ``visual.denoiser.*`` and ``visual.pos_embed``: the DVT denoiser -> :class:`~ovseg.encoders.DVTDenoiser`;
* ``text.*``: the text tower -> ``CLIPTextTransformer.text.*`` (both open_clip ``TextTransformer``s with
  the same keys; ``text_projection`` is the (width, D) matrix applied to every token);
* ``logit_scale``: the learnt global scale (log) -> ``global_loss.logit_scale``;
* training-only buffers, dropped: ``classification_weights_ema`` and ``beta_ema`` (the EMA of class
  prototypes, off with the release's beta 0) and ``logit_scale_local`` (the fixed ln(1/0.07) of the
  concept loss, ovseg's ``local_logit_scale``).

Usage (the config's image encoder must be a ``DVTDenoiser`` when the checkpoint has a denoiser)::

    ovseg convert simzss simzss_coco.pth runs/simzss_coco.ckpt -c configs/simzss/coco_vitb14.yaml --trust-pickle
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ovseg.convert import ConversionError, KeyReport
from ovseg.encoders.denoiser import DVTDenoiser

_DROPPED = {
    "classification_weights_ema": "training-only EMA of the class prototypes (beta_ema 0 in the release)",
    "beta_ema": "training-only EMA rate of the class prototypes",
    "logit_scale_local": "fixed ln(1/0.07) of the concept loss (training only; ovseg's local_logit_scale)",
}


def _prefixes(model: Any, official: dict[str, Tensor]) -> dict[str, str]:
    """Official key prefix -> ovseg key prefix for ``model``'s encoders."""
    image_encoder = model.model.image_encoder
    has_denoiser = any(key.startswith(("visual.denoiser.", "visual.pos_embed")) for key in official)
    if has_denoiser and not isinstance(image_encoder, DVTDenoiser):
        raise ConversionError(
            "the checkpoint holds a DVT denoiser (visual.denoiser.*, visual.pos_embed) but the config's image "
            "encoder is a plain " + type(image_encoder).__name__ + ": wrap it in ovseg.encoders.DVTDenoiser "
            "(see configs/simzss/coco_vitb14.yaml)"
        )
    if isinstance(image_encoder, DVTDenoiser):
        prefixes = {
            "visual.vit.model.": "model.image_encoder.encoder.model.",
            "visual.denoiser.": "model.image_encoder.denoiser.",
            "visual.pos_embed": "model.image_encoder.pos_embed",
        }
    else:
        prefixes = {"visual.vit.model.": "model.image_encoder.model."}
    prefixes["text."] = "model.text_encoder.text."
    prefixes["logit_scale"] = "global_loss.logit_scale"
    return prefixes


def _without_downloads(hparams: Any) -> Any:
    """``hparams`` with every encoder's ``pretrained`` off and ``checkpoint_path`` cleared (the weights
    are in the converted checkpoint; loading it must not download or read them again)."""
    if isinstance(hparams, dict):
        out = {key: _without_downloads(value) for key, value in hparams.items()}
        if out.get("pretrained") is True:
            out["pretrained"] = False
        if "checkpoint_path" in out:
            out["checkpoint_path"] = None
        return out
    if isinstance(hparams, list):
        return [_without_downloads(value) for value in hparams]
    return hparams


def convert_state_dict(official: dict[str, Tensor], model: Any) -> tuple[dict[str, Tensor], KeyReport]:
    """The full ovseg state dict of ``model`` (a SimZSS) from a released SimZSS state dict.

    Every official key is mapped or dropped with its reason; model keys the release lacks are filled
    from the model as built (and reported).
    """
    report = KeyReport()
    prefixes = _prefixes(model, official)
    state: dict[str, Tensor] = {}
    for key, value in official.items():
        if key in _DROPPED:
            report.drop(key, _DROPPED[key])
            continue
        prefix = next((p for p in prefixes if key == p or (p.endswith(".") and key.startswith(p))), None)
        if prefix is None:
            continue  # left unaccounted: KeyReport.check_complete names it
        target = prefixes[prefix] + key[len(prefix) :]
        state[target] = value
        report.map(key, target)
    if "logit_scale_local" in official:
        scale = float(official["logit_scale_local"].reshape(-1)[0].exp())
        if not math.isclose(scale, float(model.local_loss.logit_scale), rel_tol=1e-4):
            print(
                f"note: the checkpoint's concept-loss scale is {scale:.4g}, the config's local_logit_scale "
                f"{float(model.local_loss.logit_scale):.4g} (training only)"
            )
    for key, value in model.state_dict().items():
        if key not in state:
            state[key] = value
            report.fill(key, "not in the release: kept as the config builds it")
    hparams = dict(model.hparams)
    for name in ("image_encoder", "text_encoder"):
        if name in hparams:
            report.hparams_updates[name] = _without_downloads(hparams[name])
    return state, report


def release_state_dict(model: Any) -> dict[str, Tensor]:
    """The inverse mapping: an ovseg SimZSS (with a ``DVTDenoiser``) as a state dict in the release's
    key layout (tests; the release's training buffers are added with their release values)."""
    prefixes = {ovseg: official for official, ovseg in _prefixes(model, {}).items()}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in prefixes if key == p or (p.endswith(".") and key.startswith(p))), None)
        if prefix is not None:
            out[prefixes[prefix] + key[len(prefix) :]] = value
    dim = model.model.text_encoder.embed_dim
    out["classification_weights_ema"] = torch.zeros(575, dim)
    out["beta_ema"] = torch.tensor(0.0)
    out["logit_scale_local"] = torch.full((1,), math.log(1 / 0.07))
    return out
