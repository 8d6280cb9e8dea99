"""Image and text towers from Hugging Face ``transformers`` behind the encoder protocol.

Supported checkpoints (by Hub name, e.g. ``openai/clip-vit-base-patch16``, or a local folder written
by ``save_pretrained``), chosen by the ``model_type`` of their ``config.json``:

* CLIP family (``clip``, ``metaclip_2``; also vision- or text-only CLIP checkpoints): OpenAI CLIP,
  MetaCLIP, LAION CLIPs in the transformers format;
* SigLIP (``siglip``): SigLIP and the fixed-resolution SigLIP 2 checkpoints (``google/siglip2-*-224``
  and the like are ``SiglipModel``s); the NaFlex SigLIP 2 (``siglip2``) is not supported;
* DINOv2 (``dinov2``, ``dinov2_with_registers``): ``facebook/dinov2-*``, image tower only.

Features match the open_clip / timm towers on the same weights (``tests/test_hf.py``): for CLIP,
dense = every token through ``post_layernorm`` and ``visual_projection`` (joint space), pooled =
the usual image embedding, grid ``(H // p, W // p)``; for DINOv2, dense = the normalised patch
tokens, pooled = [CLS] (or their mean), images zero-padded to a multiple of the patch size (grid
``ceil(H / p)``), as :class:`~ovseg.encoders.TimmViT`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.encoders.base import ImageEncoder, ImageFeatures, TextEncoder, TextFeatures
from ovseg.encoders.timm_vit import NORM_PRESETS, Stat, resolve_norm_stat
from ovseg.errors import MissingResourceError, UserError

CLIP_TYPES = ("clip", "clip_vision_model", "clip_text_model", "metaclip_2")
SIGLIP_TYPES = ("siglip", "siglip_vision_model", "siglip_text_model")
DINOV2_TYPES = ("dinov2", "dinov2_with_registers")

#: default normalisation of each family when the checkpoint has no ``preprocessor_config.json``
FAMILY_NORM = {"clip": NORM_PRESETS["clip"], "siglip": NORM_PRESETS["half"], "dinov2": NORM_PRESETS["imagenet"]}


def model_family(model_type: str, source: str) -> str:
    """``"clip"``, ``"siglip"`` or ``"dinov2"`` for a transformers ``model_type``; a clear error otherwise."""
    if model_type in CLIP_TYPES:
        return "clip"
    if model_type in SIGLIP_TYPES:
        return "siglip"
    if model_type in DINOV2_TYPES:
        return "dinov2"
    if model_type == "siglip2":
        raise UserError(
            f"{source} is a NaFlex SigLIP 2 model (model_type 'siglip2'), which takes variable-resolution patch "
            "sequences: not supported. Use a fixed-resolution SigLIP 2 checkpoint (e.g. "
            "google/siglip2-base-patch16-224, a SiglipModel)"
        )
    raise UserError(
        f"{source} has model_type {model_type!r}; ovseg's transformers towers support CLIP "
        f"({', '.join(CLIP_TYPES)}), SigLIP ({', '.join(SIGLIP_TYPES)}) and DINOv2 ({', '.join(DINOV2_TYPES)})"
    )


def load_hf_model(name_or_path: str, revision: str | None = None) -> tuple[nn.Module, str]:
    """A transformers model by Hub name or local folder, in float32 and eval mode, with its family.

    Offline (``HF_HUB_OFFLINE=1``) a Hub name loads from the local cache only. Errors name the source.
    """
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as err:
        raise MissingResourceError(
            f"could not read the transformers config of {name_or_path!r} (a Hub name or a local folder "
            f"holding config.json; offline, Hub names need a warm cache): {err}"
        ) from err
    family = model_family(config.model_type, repr(name_or_path))
    architectures = list(getattr(config, "architectures", None) or [])
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None or not architectures[0].startswith(("CLIP", "MetaClip", "Siglip", "Dinov2")):
        model_class = transformers.AutoModel
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = model_class.from_pretrained(name_or_path, revision=revision, **{dtype_key: torch.float32})
    return model.eval(), family


def preprocessor_stats(name_or_path: str, revision: str | None = None) -> tuple[Any, Any]:
    """``(image_mean, image_std)`` of the checkpoint's ``preprocessor_config.json`` (None where absent)."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "preprocessor_config.json")
        path = path if os.path.isfile(path) else None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(name_or_path, "preprocessor_config.json", revision=revision)
        except (EntryNotFoundError, LocalEntryNotFoundError):  # not in the repo; offline and not cached
            path = None
    if path is None:
        return None, None
    with open(path, encoding="utf-8") as handle:
        settings = json.load(handle)
    return settings.get("image_mean"), settings.get("image_std")


class HFImage(ImageEncoder):
    """The image tower of a transformers CLIP, SigLIP or DINOv2 checkpoint.

    * CLIP: dense = every patch token through ``post_layernorm`` and ``visual_projection`` (the joint
      image-text space, as :class:`~ovseg.encoders.OpenCLIPImage`), pooled = the image embedding;
      the position embedding is bicubically resized for other grids; grid ``(H // p, W // p)``.
    * SigLIP: dense = the patch tokens after ``post_layernorm`` (width ``dense_dim``; SigLIP's
      attention-pooling head gives no per-location embedding, so ``dense_in_joint_space`` is False),
      pooled = the attention-pooling head's output (the image embedding); grid ``(H // p, W // p)``.
    * DINOv2 (with or without registers): dense = the normalised patch tokens, pooled = [CLS]; images
      are zero-padded (after normalisation) to a multiple of the patch size, grid ``ceil(H / p)``.

    Args:
        model_name_or_path: a Hub name (``facebook/dinov2-base``) or a local ``save_pretrained`` folder.
        revision: a Hub revision (branch, tag or commit).
        mean, std: ``None`` (the checkpoint's ``preprocessor_config.json``, else the family's usual
            statistics), a preset (``"imagenet"``, ``"clip"``, ``"half"``) or an RGB triple.
        pooling: ``"model"`` (the model's own pooled feature, see above) or ``"avg"`` (the mean of
            the dense features).
    """

    def __init__(
        self,
        model_name_or_path: str,
        revision: str | None = None,
        mean: Stat = None,
        std: Stat = None,
        pooling: Literal["model", "avg"] = "model",
    ) -> None:
        model, family = load_hf_model(model_name_or_path, revision)
        file_mean, file_std = preprocessor_stats(model_name_or_path, revision)
        default_mean, default_std = FAMILY_NORM[family]
        super().__init__(
            mean=resolve_norm_stat(mean, file_mean or default_mean, 0),
            std=resolve_norm_stat(std, file_std or default_std, 1),
        )
        if pooling not in ("model", "avg"):
            raise ValueError(f"pooling must be 'model' or 'avg', got {pooling!r}")
        self.family, self.pooling, self.model_name_or_path = family, pooling, model_name_or_path
        self.vision: nn.Module = getattr(model, "vision_model", model)
        if family == "clip" and not hasattr(self.vision, "embeddings"):
            raise UserError(f"{model_name_or_path!r} has no CLIP image tower (a text-only checkpoint?)")
        if family == "siglip" and not hasattr(self.vision, "post_layernorm"):
            raise UserError(f"{model_name_or_path!r} has no SigLIP image tower (a text-only checkpoint?)")
        self.projection: nn.Module | None = getattr(model, "visual_projection", None)
        config = self.vision.config
        patch = config.patch_size
        self.patch_size: int = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        width = int(config.hidden_size)
        self.dense_dim: int = int(self.projection.out_features) if self.projection is not None else width
        self.dense_in_joint_space = family != "siglip"
        self.embed_dim: int = self.dense_dim
        if family == "siglip" and getattr(self.vision, "head", None) is None:
            raise UserError(f"{model_name_or_path!r}: a SigLIP tower without its pooling head is not supported")
        registers = int(getattr(config, "num_register_tokens", 0) or 0)
        self.num_prefix_tokens = {"clip": 1, "siglip": 0}.get(family, 1 + registers)  # [CLS] and registers

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Output grid (h, w) for an input of ``height`` x ``width`` pixels."""
        if self.family == "dinov2":
            return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)
        return height // self.patch_size, width // self.patch_size

    def encode(self, normalized_images: Tensor) -> ImageFeatures:
        """(B, 3, H, W) normalised images -> dense (B, D, h, w) and pooled (B, D) features."""
        b = normalized_images.shape[0]
        h, w = self.grid_size(*normalized_images.shape[-2:])
        if self.family == "dinov2":
            pad = (
                0,
                w * self.patch_size - normalized_images.shape[-1],
                0,
                h * self.patch_size - normalized_images.shape[-2],
            )
            tokens = self.vision(pixel_values=F.pad(normalized_images, pad)).last_hidden_state  # normalised
            patches, pooled = tokens[:, self.num_prefix_tokens :], tokens[:, 0]
        else:
            out = self.vision(pixel_values=normalized_images, interpolate_pos_encoding=True)
            tokens = out.last_hidden_state
            if self.family == "clip":  # CLIP's last_hidden_state precedes post_layernorm
                tokens = self.vision.post_layernorm(tokens)
                if self.projection is not None:
                    tokens = self.projection(tokens)
                patches, pooled = tokens[:, 1:], tokens[:, 0]  # == get_image_features at the native size
            else:  # SigLIP: last_hidden_state is normalised; pooler_output = the attention-pooling head
                patches, pooled = tokens, out.pooler_output
        if patches.shape[1] != h * w:
            raise RuntimeError(f"expected {h}x{w} patch tokens, got {patches.shape[1]}")
        dense = patches.transpose(1, 2).reshape(b, -1, h, w)
        if self.pooling == "avg":
            pooled = patches.mean(dim=1)
        return ImageFeatures(dense=dense, pooled=pooled)


class HFText(TextEncoder):
    """The text tower of a transformers CLIP or SigLIP checkpoint, with the checkpoint's own tokenizer.

    ``tokenize`` pads to ``context_length`` (``padding="max_length"``, truncation keeps the end token),
    as SigLIP was trained and as open_clip does for CLIP. ``forward`` returns every token after the
    final norm and the projection (CLIP: ``text_projection``; SigLIP: the text ``head``), (B, L, D),
    and the pooled feature of the model (CLIP: the first end-of-text token; SigLIP: the last token).

    Args:
        model_name_or_path: a Hub name (``openai/clip-vit-base-patch16``, ``google/siglip-base-patch16-224``)
            or a local ``save_pretrained`` folder (with the tokenizer files).
        revision: a Hub revision.
        context_length: tokens per text (default: the model's ``max_position_embeddings``).
    """

    def __init__(self, model_name_or_path: str, revision: str | None = None, context_length: int | None = None) -> None:
        super().__init__()
        import transformers

        model, family = load_hf_model(model_name_or_path, revision)
        if family == "dinov2":
            raise UserError(f"{model_name_or_path!r} is a DINOv2 image model: it has no text tower")
        self.family, self.model_name_or_path = family, model_name_or_path
        self.text: nn.Module = getattr(model, "text_model", model)
        if not hasattr(self.text, "final_layer_norm"):
            raise UserError(f"{model_name_or_path!r} has no text tower (an image-only checkpoint?)")
        self.projection: nn.Module | None = getattr(model, "text_projection", None)
        if family == "siglip":
            self.projection = self.text.head
        config = self.text.config
        max_length = int(config.max_position_embeddings)
        self.context_length: int = int(context_length or max_length)
        if self.context_length > max_length:
            raise UserError(f"context_length {self.context_length} exceeds the model's {max_length} positions")
        self.embed_dim: int = (
            int(self.projection.out_features) if self.projection is not None else int(config.hidden_size)
        )
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_name_or_path, revision=revision)
        except (OSError, ValueError) as err:
            raise MissingResourceError(f"could not load the tokenizer of {model_name_or_path!r}: {err}") from err

    def tokenize(self, texts: list[str]) -> Tensor:
        """Strings -> (B, context_length) int64 ids, padded to the full length."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return encoded["input_ids"].long()

    def forward(self, token_ids: Tensor) -> TextFeatures:
        """(B, L) ids -> tokens (B, L, D) and pooled (B, D) (== the model's text features)."""
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must be (B, L), got {tuple(token_ids.shape)}")
        out = self.text(input_ids=token_ids)
        tokens, pooled = out.last_hidden_state, out.pooler_output  # after the final norm
        if self.family == "clip" and self.projection is not None:
            tokens, pooled = self.projection(tokens), self.projection(pooled)
        elif self.family == "siglip":  # the pooled output already went through the head
            tokens = self.projection(tokens)
        return TextFeatures(tokens=tokens, pooled=pooled, token_ids=token_ids)
