"""Dense CLIP features for segmentation: MaskCLIP's value path in the last ViT block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from ovseg.encoders.open_clip import OpenCLIPImage


def self_only_mask(length: int, like: Tensor) -> Tensor:
    """(L, L) additive attention mask letting every token attend to itself only: the attention
    output becomes ``out_proj(v_i)``, the value path."""
    mask = torch.full((length, length), float("-inf"), dtype=like.dtype, device=like.device)
    return mask.fill_diagonal_(0.0)


@contextmanager
def maskclip_value_path(encoder: OpenCLIPImage) -> Iterator[None]:
    """Within the block, the ViT tower's last residual block outputs ``ls_1(out_proj(v(ln_1(x))))``
    only: no query-key mixing, no residual, no MLP (MaskCLIP, Zhou et al., ECCV 2022, section 3.2),
    so that :class:`~ovseg.encoders.OpenCLIPImage`'s ``dense`` features (then ``ln_post`` and
    ``proj`` per token) are each location's own value embedding in the joint space. The pooled
    feature is meaningless meanwhile.

    Raises:
        ValueError: a tower that is not a ViT made of open_clip ``ResidualAttentionBlock`` s.
    """
    visual = encoder.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"MaskCLIP dense features need a ViT tower, got {type(visual).__name__}")
    block: nn.Module = visual.transformer.resblocks[-1]
    if not hasattr(block, "attention") or not hasattr(block, "ls_1"):
        raise ValueError(f"MaskCLIP dense features need open_clip ResidualAttentionBlocks, got {type(block).__name__}")
    batch_first = getattr(visual.transformer, "batch_first", True)

    def value_path(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor:
        x = args[0] if args else kwargs["q_x"]  # (B, L, width) batch-first, else (L, B, width)
        mask = self_only_mask(x.shape[1] if batch_first else x.shape[0], x)
        return module.ls_1(module.attention(q_x=module.ln_1(x), attn_mask=mask))

    handle = block.register_forward_hook(value_path, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
