"""CLIP image and text towers from ``open_clip`` behind the encoder protocol.

Both encoders take the same construction arguments (see :func:`build_open_clip_model`) and keep only
their own tower of the CLIP model, with the parameter names of the CLIP checkpoint
(``visual.*`` for the image tower; ``token_embedding``, ``transformer.*``, ``ln_final``, ... for the
text tower), so their ``state_dict`` keys are a subset of the full model's.
"""

from __future__ import annotations

from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer, VisionTransformer
from torch import Tensor, nn

from ovseg.encoders.base import ImageEncoder, ImageFeatures, TextEncoder, TextFeatures
from ovseg.encoders.hf_open_clip import TRANSFORMERS_PREFIX, open_clip_from_transformers
from ovseg.encoders.text_transformer import projection_dim, run_clip_text_tower
from ovseg.encoders.timm_vit import Stat, resolve_norm_stat
from ovseg.errors import MissingResourceError, UserError


def build_open_clip_model(
    model_name: str | None = None,
    pretrained: str | None = None,
    checkpoint_path: str | None = None,
    config: dict[str, Any] | None = None,
    **create_kwargs: Any,
) -> nn.Module:
    """Build an open_clip CLIP model (eval mode, fp32, CPU).

    Either ``model_name`` (an open_clip architecture, e.g. ``"ViT-B-16"`` or
    ``"convnext_large_d_320"``) with an optional ``pretrained`` tag (e.g. ``"openai"``, needs the
    network or a warm cache) or a local ``checkpoint_path``; or ``"transformers:NAME_OR_FOLDER"``, a
    transformers-format ``CLIPModel`` (e.g. ``"transformers:openai/clip-vit-base-patch16"``) converted
    to open_clip's layout (:mod:`ovseg.encoders.hf_open_clip`); or an explicit ``config``
    ``{"embed_dim", "vision_cfg", "text_cfg", ...}`` given to ``open_clip.model.CLIP`` (tiny test
    models, see :func:`tiny_open_clip_config`), optionally with a ``checkpoint_path`` to load.
    Checkpoints are loaded strictly; errors name the file.
    """
    if (model_name is None) == (config is None):
        raise ValueError("give exactly one of model_name and config")
    if model_name is not None and model_name.startswith(TRANSFORMERS_PREFIX):
        if pretrained is not None or checkpoint_path is not None or create_kwargs:
            raise ValueError(
                f"{model_name!r} names a transformers checkpoint: give no pretrained tag, "
                "checkpoint_path or open_clip options with it"
            )
        return open_clip_from_transformers(model_name[len(TRANSFORMERS_PREFIX) :])
    if pretrained is not None and checkpoint_path is not None:
        raise ValueError("give at most one of pretrained (a tag) and checkpoint_path (a local file)")
    if config is not None:
        if pretrained is not None:
            raise ValueError("pretrained tags need a model_name; use checkpoint_path with a config")
        model = open_clip.model.CLIP(**config)
        if checkpoint_path is not None:
            _load_clip_checkpoint(model, checkpoint_path)
    else:
        if checkpoint_path is not None:
            model = open_clip.create_model(model_name, pretrained=None, **create_kwargs)
            _load_clip_checkpoint(model, checkpoint_path)
        else:
            model = open_clip.create_model(model_name, pretrained=pretrained, **create_kwargs)
    return model.eval()


def _load_clip_checkpoint(model: nn.Module, path: str) -> None:
    import os

    if not os.path.isfile(path):
        raise MissingResourceError(
            f"CLIP checkpoint_path {path} does not exist: give an open_clip state dict file, e.g. the one "
            "`ovseg fit -c configs/clip/synthetic.yaml` writes (runs/clip_synthetic/open_clip.pt) or "
            "`python -m ovseg.methods.clip.export CKPT OUT` makes; for a random CLIP set checkpoint_path: null in a "
            "config file, as configs/zegformer/random_clip.yaml and configs/cdt/random_clip.yaml do"
        )
    try:
        open_clip.load_checkpoint(model, path, strict=True)
    except Exception as err:
        raise UserError(f"could not load checkpoint {path} into {type(model).__name__}: {err}") from err


def tiny_open_clip_config(vision: Literal["vit", "convnext"] = "vit", embed_dim: int = 32) -> dict[str, Any]:
    """A tiny CLIP config for tests (random init, nothing downloaded).

    ``"vit"``: 2-layer width-32 ViT, patch 8, image 32 (4x4 grid). ``"convnext"``: timm's
    ``test_convnext`` trunk with the ``convnext_large_d_320`` head layout (avg pool, MLP
    projection), image 64. Text: 2-layer width-32 transformer, context 77, the CLIP BPE vocabulary.
    """
    if vision == "vit":
        vision_cfg: dict[str, Any] = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
    elif vision == "convnext":
        vision_cfg = {
            "timm_model_name": "test_convnext",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "mlp",
            "image_size": 64,
        }
    else:
        raise ValueError(f"unknown tiny vision tower {vision!r}")
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    return {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


class OpenCLIPImage(ImageEncoder):
    """The image tower of an open_clip CLIP model.

    * ViT tower: the patch tokens of the last block go through ``ln_post`` and ``proj`` per token,
      so ``dense`` lives in the joint image-text space; ``pooled`` is the tower's usual output
      (``model.encode_image``). Any input size works: the position embedding is bicubically
      resized when the grid differs from the pretraining grid; the grid is ``(H // p, W // p)``
      (remainder pixels are dropped, as by the patch convolution). Patch dropout is not applied.
    * timm-trunk tower (e.g. ConvNeXt ``convnext_large_d_320``): ``dense`` = the trunk's
      ``forward_features`` map (stride 32) passed through the trunk head (its norm) and the open_clip
      projection head per location, i.e. the head applied to each location as if it were a 1x1
      map (what FC-CLIP / MAFT+ do); ``pooled`` = the usual output. For towers whose head pools
      with attention (``abs_attn``/``rot_attn``) or whose trunk is not convolutional, ``dense`` is
      the raw trunk map (``dense_in_joint_space`` is False and ``dense_dim`` differs from
      ``embed_dim``).

    Args:
        model_name, pretrained, checkpoint_path, config: see :func:`build_open_clip_model`.
        mean, std: ``None`` (open_clip's preprocess cfg, OpenAI CLIP statistics by default), a
            preset name or an RGB triple.
        model: an already built CLIP model to take the tower from (overrides the above).
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint_path: str | None = None,
        config: dict[str, Any] | None = None,
        mean: Stat = None,
        std: Stat = None,
        model: nn.Module | None = None,
    ) -> None:
        if model is None:
            model = build_open_clip_model(model_name, pretrained, checkpoint_path, config)
        cfg = open_clip.model.get_model_preprocess_cfg(model)
        super().__init__(
            mean=resolve_norm_stat(mean, cfg.get("mean") or OPENAI_DATASET_MEAN, 0),
            std=resolve_norm_stat(std, cfg.get("std") or OPENAI_DATASET_STD, 1),
        )
        visual = model.visual
        self.visual = visual
        self.dense_in_joint_space = True
        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None:
                raise ValueError("ViT towers with attentional pooling have no per-patch projection")
            if visual.pool_type not in ("tok", "avg"):
                raise ValueError(f"unsupported ViT pool_type {visual.pool_type!r}")
            if visual.proj is None:
                raise ValueError("ViT tower without projection")
            patch = visual.patch_size
            self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
            self.kind = "vit"
            self.embed_dim: int = int(visual.proj.shape[-1])
            self.dense_dim = self.embed_dim
        elif isinstance(visual, TimmModel):
            self.kind = "timm"
            self.embed_dim = _timm_tower_output_dim(visual)
            info = getattr(visual.trunk, "feature_info", None)
            self.patch_size = int(info[-1]["reduction"]) if info else 32
            head_names = {name for name, _ in visual.head.named_children()}
            self.dense_in_joint_space = "pool" not in head_names
            self.dense_dim = self.embed_dim if self.dense_in_joint_space else int(visual.trunk.num_features)
        else:
            raise ValueError(f"unsupported open_clip vision tower {type(visual).__name__}")

    # ----------------------------------------------------------------------------------- ViT
    def _vit_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """(1 + h*w, width) position embedding, bicubically resized to ``grid`` when needed."""
        visual: VisionTransformer = self.visual
        pos = visual.positional_embedding
        old = tuple(visual.grid_size)
        if tuple(grid) == old:
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        width = pos.shape[-1]
        patch_pos = patch_pos.reshape(1, old[0], old[1], width).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)
        return torch.cat([cls_pos, patch_pos], dim=0)

    def _encode_vit(self, images: Tensor) -> ImageFeatures:
        visual: VisionTransformer = self.visual
        x = visual.conv1(images)  # (B, width, h, w)
        b, width, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, width)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self._vit_pos_embed((h, w)).to(x.dtype)
        x = visual.ln_pre(x)
        x = visual.transformer(x)
        if visual.final_ln_after_pool:
            pooled = x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]
            pooled, patches = visual.ln_post(pooled), visual.ln_post(x[:, 1:])
        else:
            x = visual.ln_post(x)
            pooled = x[:, 1:].mean(dim=1) if visual.pool_type == "avg" else x[:, 0]
            patches = x[:, 1:]
        pooled = pooled @ visual.proj  # (B, D): identical to visual.forward at the native size
        patches = patches @ visual.proj  # (B, h*w, D)
        dense = patches.transpose(1, 2).reshape(b, -1, h, w)
        return ImageFeatures(dense=dense, pooled=pooled)

    # ----------------------------------------------------------------------------------- timm
    def _encode_timm(self, images: Tensor) -> ImageFeatures:
        visual: TimmModel = self.visual
        fmap = visual.trunk.forward_features(images)
        pooled = visual.head(visual.trunk.forward_head(fmap))  # identical to visual.forward
        if fmap.ndim != 4:
            raise ValueError("dense features need a convolutional (B, C, h, w) timm trunk")
        if not self.dense_in_joint_space:
            return ImageFeatures(dense=fmap, pooled=pooled)
        b, c, h, w = fmap.shape
        # every location as a 1x1 map: the trunk head (pool = identity, norm) then the projection head
        per_loc = fmap.permute(0, 2, 3, 1).reshape(b * h * w, c, 1, 1)
        per_loc = visual.head(visual.trunk.forward_head(per_loc))  # (B*h*w, D)
        dense = per_loc.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return ImageFeatures(dense=dense, pooled=pooled)

    def encode(self, normalized_images: Tensor) -> ImageFeatures:
        """(B, 3, H, W) normalised images -> dense (B, D, h, w) and pooled (B, D) CLIP features."""
        if self.kind == "vit":
            return self._encode_vit(normalized_images)
        return self._encode_timm(normalized_images)


def _timm_tower_output_dim(visual: TimmModel) -> int:
    """Joint-space dimension of an open_clip timm tower: the last linear map of its head."""
    linears = [m for m in visual.head.modules() if isinstance(m, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    out = getattr(visual.head, "pool", None)
    if out is not None and hasattr(out, "out_features"):
        return int(out.out_features)
    return int(visual.trunk.num_classes or visual.trunk.num_features)


class OpenCLIPText(TextEncoder):
    """The text tower of an open_clip CLIP model.

    ``forward`` returns every token after ``ln_final`` and ``text_projection`` (B, L, D) and the
    pooled feature, computed exactly as ``model.encode_text`` (the EOT token, argmax of the ids, for
    CLIP). L may be shorter than the context length (the causal mask is cropped).

    Args:
        model_name, pretrained, checkpoint_path, config: see :func:`build_open_clip_model`.
        model: an already built CLIP model to take the tower from (overrides the above).

    The tokenizer is ``open_clip.get_tokenizer(model_name)`` (offline for the CLIP BPE) or the CLIP
    BPE ``SimpleTokenizer`` when built from a config, a model or a ``transformers:`` CLIP (whose
    CLIP-family tokenizer is that BPE).
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint_path: str | None = None,
        config: dict[str, Any] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if model is None:
            model = build_open_clip_model(model_name, pretrained, checkpoint_path, config)
            self.tokenizer = (
                open_clip.get_tokenizer(model_name)
                if model_name is not None and not model_name.startswith(TRANSFORMERS_PREFIX)
                else None
            )
        else:
            self.tokenizer = None
        text = getattr(model, "text", None)
        if text is not None:  # CustomTextCLIP
            if not isinstance(text, TextTransformer):
                raise ValueError(f"unsupported text tower {type(text).__name__}")
            if text.cls_emb is not None:
                raise ValueError("text towers with an appended CLS embedding (CoCa) are not supported")
            self.text = text
            self.pool_type, self.eos_id = text.pool_type, text.eos_id
            self.context_length: int = int(text.context_length)
        else:  # CLIP: the text tower's parts live on the model itself
            self.token_embedding = model.token_embedding
            self.positional_embedding = model.positional_embedding
            self.transformer = model.transformer
            self.ln_final = model.ln_final
            self.text_projection = model.text_projection
            self.register_buffer("attn_mask", model.attn_mask, persistent=False)
            self.pool_type, self.eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
            self.context_length = int(model.context_length)
        if self.tokenizer is None:
            self.tokenizer = SimpleTokenizer(context_length=self.context_length)
        token_embedding, _, _, _, projection, _ = self._parts()
        self.embed_dim: int = projection_dim(projection, token_embedding.embedding_dim)

    def _parts(self) -> tuple[nn.Embedding, Tensor, nn.Module, nn.Module, nn.Module | Tensor | None, Tensor | None]:
        src = self.text if hasattr(self, "text") else self
        return (
            src.token_embedding,
            src.positional_embedding,
            src.transformer,
            src.ln_final,
            src.text_projection,
            src.attn_mask,
        )

    def tokenize(self, texts: list[str]) -> Tensor:
        """Strings -> (B, context_length) int64 ids."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts), context_length=self.context_length).long()

    def forward(self, token_ids: Tensor) -> TextFeatures:
        """(B, L) ids -> tokens (B, L, D) and pooled (B, D) (== ``model.encode_text`` for L = context)."""
        token_embedding, pos, transformer, ln_final, projection, attn_mask = self._parts()
        return run_clip_text_tower(
            token_ids,
            token_embedding,
            pos,
            transformer,
            ln_final,
            projection,
            attn_mask,
            pool_type=self.pool_type,
            eos_id=self.eos_id,
        )
