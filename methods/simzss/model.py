"""SimZSS as a plain ``nn.Module``: a frozen vision backbone and a text encoder aligned to it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.encoders.base import ImageEncoder, TextEncoder, TextFeatures


@dataclass
class FrozenImageFeatures:
    """L2-normalised outputs of the frozen backbone.

    Attributes:
        patches: (B, N, D) patch tokens, N = h * w, row-major.
        grid: (h, w).
        pooled: (B, D) global feature ([CLS]).
    """

    patches: Tensor
    grid: tuple[int, int]
    pooled: Tensor


class SimZSSModel(nn.Module):
    """Frozen, spatially aware image encoder + trainable text encoder projected into its space.

    Args:
        image_encoder: the frozen backbone (DINOv2 ViT in the paper); kept in eval mode, without
            gradients, whatever ``train()`` is called with.
        text_encoder: a text encoder whose token features have the backbone's width (its
            projection is the paper's g: R^{d_t} -> R^{d_v}).
    """

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> None:
        super().__init__()
        if text_encoder.embed_dim != image_encoder.embed_dim:
            raise ValueError(
                f"the text encoder's output width ({text_encoder.embed_dim}) must equal the image "
                f"encoder's width ({image_encoder.embed_dim}): set the text encoder's output_dim"
            )
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        self.text_encoder = text_encoder

    def train(self, mode: bool = True) -> SimZSSModel:
        super().train(mode)
        self.image_encoder.eval()
        return self

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> FrozenImageFeatures:
        """(B, 3, H, W) images in [0, 1] -> normalised frozen patch tokens and [CLS]."""
        features = self.image_encoder(images)
        _batch, _dim, height, width = features.dense.shape
        patches = features.dense.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return FrozenImageFeatures(
            F.normalize(patches.float(), dim=-1), (height, width), F.normalize(features.pooled.float(), dim=-1)
        )

    def encode_text(self, token_ids: Tensor) -> TextFeatures:
        """(B, L) token ids -> projected token features (B, L, D) and EOT feature (B, D)."""
        return self.text_encoder(token_ids)
