"""timm Vision Transformers (the DINOv2 family, with or without registers) as image encoders."""

from __future__ import annotations

import math
from typing import Any, Literal

import timm
import torch
from torch import Tensor

from ovseg.encoders.base import ImageEncoder, ImageFeatures, load_state_dict_file, load_state_dict_strict

#: Normalisation presets accepted by ``mean``/``std`` (RGB, [0, 1] units).
NORM_PRESETS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

Stat = tuple[float, float, float] | Literal["imagenet", "clip", "half"] | None


def resolve_norm_stat(value: Stat, default: tuple[float, ...], which: int) -> tuple[float, float, float]:
    """``value`` = a preset name (``which`` 0: mean, 1: std), explicit triple, or None -> ``default``."""
    if value is None:
        out = tuple(float(v) for v in default)
    elif isinstance(value, str):
        if value not in NORM_PRESETS:
            raise ValueError(f"unknown normalisation preset {value!r}; choose from {sorted(NORM_PRESETS)}")
        out = NORM_PRESETS[value][which]
    else:
        out = tuple(float(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"mean/std must have 3 values (RGB), got {out}")
    return out  # type: ignore[return-value]


class TimmViT(ImageEncoder):
    """A timm ViT (e.g. ``vit_small_patch14_dinov2``, ``vit_base_patch14_reg4_dinov2``).

    The network is created with ``num_classes=0``, ``dynamic_img_size=True`` and
    ``dynamic_img_pad=True``: any input size works, the position embedding is interpolated to the
    grid and the image is zero-padded (right/bottom) to a multiple of the patch size, so the grid is
    ``(ceil(H / p), ceil(W / p))``.

    Args:
        model_name: timm model name.
        pretrained: load timm's pretrained weights by name (needs the network or a warm HF cache).
        checkpoint_path: local state-dict file (``.pth``/``.bin``/``.safetensors``) loaded strictly
            after timm's ViT checkpoint filter (which also converts original DINOv2 checkpoints and
            resamples the position embedding).
        model_kwargs: overrides for ``timm.create_model`` (e.g. ``depth``, ``embed_dim``,
            ``num_heads``, ``img_size`` for tiny test models).
        mean, std: ``None`` (the model's ``pretrained_cfg``), a preset (``"imagenet"``, ``"clip"``,
            ``"half"``) or an explicit RGB triple.
        pooling: ``"cls"`` (the [CLS] token) or ``"avg"`` (mean of the patch tokens).
        init_seed: seed of the random initialisation, drawn from a private generator: the weights are
            the same whatever the run's ``seed_everything``, as a released backbone's are, and the
            run's random stream is left as it was. ``None``: drawn from the global generator (they
            change with the run's seed). Weights from ``pretrained`` or ``checkpoint_path`` replace
            the initialisation either way.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        mean: Stat = None,
        std: Stat = None,
        pooling: Literal["cls", "avg"] = "cls",
        init_seed: int | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True, "dynamic_img_pad": True}
        kwargs.update(model_kwargs or {})
        if init_seed is None:
            model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        else:
            with torch.random.fork_rng(devices=[]):  # the run's own stream continues untouched
                torch.manual_seed(init_seed)
                model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        super().__init__(
            mean=resolve_norm_stat(mean, cfg.get("mean", NORM_PRESETS["imagenet"][0]), 0),
            std=resolve_norm_stat(std, cfg.get("std", NORM_PRESETS["imagenet"][1]), 1),
        )
        if pooling not in ("cls", "avg"):
            raise ValueError(f"pooling must be 'cls' or 'avg', got {pooling!r}")
        self.model = model
        self.model_name = model_name
        self.pooling = pooling
        self.embed_dim: int = int(model.embed_dim)
        patch = model.patch_embed.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if patch[0] != patch[1]:
            raise ValueError(f"only square patches are supported, got {patch}")
        self.patch_size: int = int(patch[0])
        self.num_prefix_tokens: int = int(model.num_prefix_tokens)
        if pooling == "cls" and (self.num_prefix_tokens < 1 or getattr(model, "cls_token", None) is None):
            raise ValueError(f"{model_name} has no [CLS] token; use pooling='avg'")
        if checkpoint_path is not None:
            self.load_checkpoint(checkpoint_path)

    @classmethod
    def tiny(cls, registers: bool = False, **overrides: Any) -> TimmViT:
        """A tiny randomly initialised DINOv2-style ViT for tests (depth 2, width 64, 2 heads, patch 14,
        img_size 56; 4 registers if ``registers``). ``overrides`` go to the constructor."""
        return cls(**tiny_timm_vit_kwargs(registers=registers, **overrides))

    def load_checkpoint(self, path: str) -> None:
        """Load a local state-dict file strictly (error names the file and the mismatching keys)."""
        state = load_state_dict_file(path)
        filter_fn = getattr(timm.models.vision_transformer, "checkpoint_filter_fn", None)
        if filter_fn is not None and isinstance(self.model, timm.models.vision_transformer.VisionTransformer):
            try:
                state = filter_fn(state, self.model)
            except Exception as err:  # a wrong checkpoint may break the filter: report it like a mismatch
                raise RuntimeError(f"could not load checkpoint {path} into {self.model_name}: {err}") from err
        load_state_dict_strict(self.model, state, path)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Output grid (h, w) for an input of ``height`` x ``width`` pixels (with padding)."""
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def encode(self, normalized_images: Tensor) -> ImageFeatures:
        """(B, 3, H, W) normalised images -> dense (B, D, ceil(H/p), ceil(W/p)), pooled (B, D)."""
        b, _, height, width = normalized_images.shape
        tokens = self.model.forward_features(normalized_images)  # (B, prefix + h*w, D), final norm applied
        h, w = self.grid_size(height, width)
        patches = tokens[:, self.num_prefix_tokens :]
        if patches.shape[1] != h * w:
            raise RuntimeError(f"expected {h}x{w} patch tokens, got {patches.shape[1]}")
        dense = patches.transpose(1, 2).reshape(b, self.embed_dim, h, w)
        pooled = tokens[:, 0] if self.pooling == "cls" else patches.mean(dim=1)
        return ImageFeatures(dense=dense, pooled=pooled)


def tiny_timm_vit_kwargs(registers: bool = False, **overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of a tiny random DINOv2-style :class:`TimmViT` (nothing is downloaded)."""
    kwargs: dict[str, Any] = {
        "model_name": "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2",
        "pretrained": False,
        "model_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 56},
    }
    kwargs.update(overrides)
    return kwargs
