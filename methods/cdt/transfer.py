"""Content-Dependent Transfer (CDT): image-conditioned class embeddings (maftplus.md section 2).

One cross-attention block: the class embeddings (frozen CLIP-T classifier plus void) are the
queries, the dense joint-space CLIP image embeddings of the current image (plus a sine position
encoding on the keys) are keys and values. No self-attention among classes and no FFN, so every
class embedding is updated independently, conditioned on the image.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Residual = Literal["semantic", "panoptic"]


def sine_position_encoding(
    height: int,
    width: int,
    num_feats: int,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """DETR's 2-D sine position encoding of an unpadded ``height x width`` grid.

    Positions are 1-based cumulative counts along each axis, divided by the last one (times
    ``scale``) when ``normalize``; each axis gets ``num_feats`` channels, interleaved sin/cos of the
    position over ``temperature ** (2 * (i // 2) / num_feats)``.

    Returns:
        (2 * num_feats, height, width): the y channels, then the x channels.
    """
    y = torch.arange(1, height + 1, device=device, dtype=torch.float32)
    x = torch.arange(1, width + 1, device=device, dtype=torch.float32)
    if normalize:
        eps = 1e-6
        y = y / (y[-1] + eps) * scale
        x = x / (x[-1] + eps) * scale
    index = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)

    def encode(pos: Tensor) -> Tensor:  # (n,) -> (n, num_feats), sin on even, cos on odd channels
        angles = pos[:, None] / dim_t
        return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, num_feats)
    pos_x = encode(x)[None, :, :].expand(height, width, num_feats)
    return torch.cat([pos_y, pos_x], dim=2).permute(2, 0, 1).to(dtype)


class ContentDependentTransfer(nn.Module):
    """CDT (``content_dependent_transfer.py`` of MAFT+, maftplus.md section 2).

    ``A = MHA(Q = T, K = V + PE, Val = V)``, then

    * ``residual="semantic"``: ``T' = LayerNorm(T + Linear(A))`` (Linear: default init);
    * ``residual="panoptic"``: ``T' = T + LayerNorm(Linear(A))`` with the Linear zero-initialised,
      so the block is the identity at initialisation.

    The output is not re-normalised (its scale multiplies CLIP's logit scale downstream).

    Args:
        dim: D, the joint CLIP embedding width (768 for ConvNeXt-L, 640 for ConvNeXt-B).
        heads: attention heads (8).
        residual: ``"semantic"`` or ``"panoptic"`` (see above).
    """

    def __init__(self, dim: int, heads: int = 8, residual: Residual = "semantic") -> None:
        super().__init__()
        if residual not in ("semantic", "panoptic"):
            raise ValueError(f"residual must be 'semantic' or 'panoptic', got {residual!r}")
        if dim % 2:
            raise ValueError(f"dim must be even (dim // 2 sine channels per axis), got {dim}")
        self.dim = dim
        self.residual = residual
        self.attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True)
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        for parameter in self.attention.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        if residual == "panoptic":
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, text: Tensor, visual: Tensor) -> Tensor:
        """Transfer class embeddings to the image.

        Args:
            text: (B, K+1, D) class embeddings (K classes and void), or (K+1, D) shared by the batch.
            visual: (B, D, h, w) dense CLIP image embeddings in the joint space.

        Returns:
            (B, K+1, D) image-conditioned class embeddings.
        """
        b, d, h, w = visual.shape
        if text.dim() == 2:
            text = text.unsqueeze(0).expand(b, -1, -1)
        text = text.to(visual.dtype)
        pos = sine_position_encoding(h, w, d // 2, device=visual.device, dtype=visual.dtype)
        values = visual.flatten(2).transpose(1, 2)  # (B, h*w, D)
        keys = values + pos.flatten(1).transpose(0, 1).unsqueeze(0)
        attended = self.attention(text, keys, values, need_weights=False)[0]  # (B, K+1, D)
        if self.residual == "semantic":
            return self.norm(text + self.linear(attended))
        return text + self.norm(self.linear(attended))
