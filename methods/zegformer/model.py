"""ZegFormer's torch parts (no Lightning): the MaskFormer proposal network with segment embeddings,
segment classification against text embeddings, the CLIP image branch on masked crops and the
seen/unseen score fusion (``../shared/reference/zegformer.md``).

Shapes: B images, N queries (mask proposals), L decoder layers, K classes (text embeddings),
D joint text/segment embedding width, (H, W) image size, (h, w) = stride-4 mask size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ovseg.encoders.base import ImageEncoder


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups, fewer when ``channels`` is not a multiple (tiny models)."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


# ============================================================================ backbone
class TimmBackbone(nn.Module):
    """A timm CNN with ``features_only=True``: res2..res5 maps (strides 4, 8, 16, 32).

    ZegFormer uses detectron2's ResNet-50/101 with FrozenBN (``FREEZE_AT 0``: every conv is trained;
    section 1.1). ``freeze_bn`` replaces timm's BatchNorm layers by frozen ones the same way.

    Args:
        name: timm model name, e.g. ``"resnet101.tv_in1k"``, ``"resnet18"``, ``"test_resnet"``.
        pretrained: load timm's pretrained weights (network or a warm cache).
        checkpoint_path: a local weight file loaded as the pretrained weights instead.
        out_indices: the feature levels of strides 4, 8, 16, 32 (``(1, 2, 3, 4)`` for ResNets).
        freeze_bn: FrozenBN (statistics and affine parameters fixed), as detectron2's default.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. tiny channel overrides).
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        freeze_bn: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if checkpoint_path is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": checkpoint_path}
        self.body = timm.create_model(
            name,
            pretrained=pretrained or checkpoint_path is not None,
            features_only=True,
            out_indices=tuple(out_indices),
            **kwargs,
        )
        reductions = list(self.body.feature_info.reduction())
        if reductions != [4, 8, 16, 32]:
            raise ValueError(
                f"{name} with out_indices {tuple(out_indices)} gives strides {reductions}; "
                "ZegFormer needs res2..res5 (strides 4, 8, 16, 32)"
            )
        self.channels: list[int] = list(self.body.feature_info.channels())
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std: tuple[float, ...] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        if freeze_bn:
            from timm.layers import freeze_batch_norm_2d

            self.body = freeze_batch_norm_2d(self.body)

    def forward(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images -> [res2, res3, res4, res5] feature maps."""
        return list(self.body(images))


# ============================================================================ pixel decoder
class ConvNormAct(nn.Sequential):
    """Conv (no bias) + GroupNorm (+ ReLU), children named ``conv``, ``norm``, ``act``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, relu: bool) -> None:
        layers: dict[str, nn.Module] = {
            "conv": nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            "norm": group_norm(out_channels),
        }
        if relu:
            layers["act"] = nn.ReLU(inplace=True)
        super().__init__(OrderedDict(layers))


class FPNPixelDecoder(nn.Module):
    """MaskFormer's ``BasePixelDecoder`` (section 1.1): an FPN over res2..res5 with GroupNorm.

    res5 goes through a 3x3 conv; every finer level adds its lateral 1x1 conv to the nearest-upsampled
    coarser output and applies a 3x3 output conv; a final 3x3 conv gives the stride-4 per-pixel
    embeddings F(I) (``mask_dim`` channels).

    Args:
        in_channels: channels of res2..res5.
        conv_dim: FPN width (256).
        mask_dim: per-pixel embedding width (256).
    """

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256) -> None:
        super().__init__()
        *fine, coarsest = list(in_channels)
        self.top = ConvNormAct(coarsest, conv_dim, 3, relu=True)
        # ordered coarse to fine: res4, res3, res2
        self.laterals = nn.ModuleList(ConvNormAct(c, conv_dim, 1, relu=False) for c in reversed(fine))
        self.outputs = nn.ModuleList(ConvNormAct(conv_dim, conv_dim, 3, relu=True) for _ in fine)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)  # detectron2's c2_xavier_fill
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """[res2, res3, res4, res5] -> (B, mask_dim, H/4, W/4) per-pixel embeddings."""
        *fine, coarsest = features
        y = self.top(coarsest)
        for lateral, output, x in zip(self.laterals, self.outputs, reversed(fine)):
            y = lateral(x) + F.interpolate(y, size=x.shape[-2:], mode="nearest")
            y = output(y)
        return self.mask_features(y)


# ============================================================================ transformer decoder
def sine_position_encoding(
    height: int, width: int, dim: int, device: torch.device, temperature: float = 10000.0
) -> Tensor:
    """DETR's normalised sine position encoding: (dim, height, width), y features then x features."""
    half = dim // 2
    scale = 2 * math.pi
    eps = 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale
    index = torch.arange(half, dtype=torch.float32, device=device)
    freq = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / half)  # (half,)

    def encode(values: Tensor) -> Tensor:  # (n,) -> (half, n): sin on even, cos on odd channels
        angles = values[None, :] / freq[:, None]
        return torch.stack([angles[0::2].sin(), angles[1::2].cos()], dim=1).flatten(0, 1)

    pos_y = encode(y)[:, :, None].expand(-1, -1, width)
    pos_x = encode(x)[:, None, :].expand(-1, height, -1)
    return torch.cat([pos_y, pos_x], dim=0)


class DecoderLayer(nn.Module):
    """DETR decoder layer, post-norm: self-attention, cross-attention to the image, FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        """tgt (N, B, C), memory (hw, B, C), pos (hw, 1, C), query_pos (N, B, C) -> (N, B, C)."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class MLP(nn.Module):
    """``layers`` linear layers with ReLU in between (MaskFormer's ``mask_embed``: 3 layers)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


@dataclass
class ZegFormerOutput:
    """Per decoder layer (deep supervision; the last layer is the prediction).

    Attributes:
        segment_embeddings: (L, B, N, D) L2-normalised segment embeddings G_q.
        mask_logits: (L, B, N, h, w) mask logits at stride 4 (sigmoid = m_q).
    """

    segment_embeddings: Tensor
    mask_logits: Tensor


class ZegFormerModel(nn.Module):
    """MaskFormer proposal network with ZegFormer's segment embeddings (sections 1.1-1.2).

    Backbone -> FPN pixel decoder (F(I), stride 4); res5 -> 1x1 projection -> DETR decoder with N
    learned queries -> per layer h_q; ``mask_embed`` (3-layer MLP) B_q, masks
    ``einsum("lbqc,bchw->lbqhw")``; segment embedding ``G_q = normalize(Linear(hidden, D)(h_q))``.

    Args:
        backbone: the feature extractor (``channels`` attribute: res2..res5 widths).
        embed_dim: D, the text-embedding width (512 for CLIP ViT-B/16).
        num_queries: N (100).
        conv_dim, mask_dim: pixel decoder widths (256, 256).
        hidden_dim, dec_layers, heads, ffn_dim, dropout: decoder (256, 6, 8, 2048, 0.1).
    """

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        num_queries: int = 100,
        conv_dim: int = 256,
        mask_dim: int = 256,
        hidden_dim: int = 256,
        dec_layers: int = 6,
        heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        channels = list(backbone.channels)
        self.pixel_decoder = FPNPixelDecoder(channels, conv_dim, mask_dim)
        self.input_proj = nn.Conv2d(channels[-1], hidden_dim, 1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, heads, ffn_dim, dropout) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.projection = nn.Linear(hidden_dim, embed_dim)  # section 1.2: Linear(256, 512)
        self.hidden_dim = hidden_dim
        for layer in self.layers:
            for parameter in layer.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
        nn.init.zeros_(self.input_proj.bias)

    def forward(self, images: Tensor) -> ZegFormerOutput:
        """(B, 3, H, W) normalised images -> :class:`ZegFormerOutput`."""
        features = self.backbone(images)
        pixel_embeddings = self.pixel_decoder(features)  # (B, mask_dim, h, w)
        src = self.input_proj(features[-1])  # (B, C, h5, w5)
        b, c, h5, w5 = src.shape
        pos = sine_position_encoding(h5, w5, c, src.device).to(src.dtype).flatten(1).T.unsqueeze(1)  # (hw, 1, C)
        memory = src.flatten(2).permute(2, 0, 1)  # (hw, B, C)
        query_pos = self.query_embed.weight.unsqueeze(1).expand(-1, b, -1)  # (N, B, C)
        tgt = torch.zeros_like(query_pos)
        hidden = []
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
            hidden.append(self.decoder_norm(tgt))
        h = torch.stack(hidden).transpose(1, 2)  # (L, B, N, C)
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(h), pixel_embeddings)
        segments = F.normalize(self.projection(h), dim=-1)
        return ZegFormerOutput(segment_embeddings=segments, mask_logits=masks)


# ============================================================================ classification
class SegmentClassifier(nn.Module):
    """Segment classification against text embeddings with a learnable no-object embedding (1.2).

    ``logits = [G T_1 .. G T_K, G bg] / temperature``: cosines with the L2-normalised text
    embeddings, and, as in the official code, a scaled *dot product* with the unnormalised no-object
    embedding ``bg`` (1 x D, Kaiming-uniform init). The scale 1/temperature (100) is fixed.
    """

    def __init__(self, embed_dim: int, temperature: float = 0.01) -> None:
        super().__init__()
        self.no_object_embedding = nn.Parameter(torch.empty(1, embed_dim))
        nn.init.kaiming_uniform_(self.no_object_embedding)
        self.temperature = temperature

    def forward(self, segment_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
        """(..., N, D) normalised segments, (K, D) normalised texts -> (..., N, K + 1) logits."""
        classes = torch.cat([text_embeddings.to(segment_embeddings), self.no_object_embedding.to(segment_embeddings)])
        return segment_embeddings @ classes.T / self.temperature


def class_probabilities(logits: Tensor) -> Tensor:
    """(..., K + 1) logits -> (..., K): softmax over classes and no-object, no-object dropped."""
    return logits.float().softmax(-1)[..., :-1]


def semantic_inference(class_probs: Tensor, mask_logits: Tensor) -> Tensor:
    """MaskFormer's semantic inference (section 5): ``sum_q p_q(c) sigmoid(m_q)``.

    (B, N, K), (B, N, h, w) -> (B, K, h, w).
    """
    return torch.einsum("bnk,bnhw->bkhw", class_probs, mask_logits.sigmoid())


# ============================================================================ CLIP image branch
#: How the CLIP crops are boxed (section 1.4, step 3; ``docs/zegformer.md``).
#: ``"release"``: as the official code, on the *padded* image: the box ends at the last occupied
#: row / column (its index, not index + 1) and a box of zero area (an empty mask, or one that covers
#: a single row or column) falls back to the whole padded image. ``"tight"``: ovseg's rule, on the
#: image without its padding: the box covers every pixel of the mask ([first, last + 1)) and only an
#: empty mask falls back to the whole image.
CropBoxRule = Literal["release", "tight"]
CROP_BOX_RULES: tuple[str, ...] = ("release", "tight")


def mask_boxes(masks: Tensor, rule: CropBoxRule = "tight") -> Tensor:
    """Boxes of binary masks in continuous pixel coordinates (``roi_align(aligned=True)``).

    A pixel (i, j) covers [j, j+1) x [i, i+1). ``rule`` (see :data:`CropBoxRule`): ``"tight"`` gives
    ``[first, last + 1)`` per axis, ``"release"`` ``[first, last]`` with zero-area boxes replaced;
    empty masks get the full ``(0, 0, W, H)`` box under both rules.

    Args:
        masks: (..., H, W) bool.
        rule: ``"tight"`` or ``"release"``.

    Returns:
        (..., 4) float boxes ``x1, y1, x2, y2``.
    """
    if rule not in CROP_BOX_RULES:
        raise ValueError(f"crop box rule must be one of {CROP_BOX_RULES}, got {rule!r}")
    height, width = masks.shape[-2:]
    rows = masks.any(-1)  # (..., H)
    cols = masks.any(-2)  # (..., W)
    # first occupied index = argmax of the occupancy (the first True); last = the same from the end
    y1, x1 = rows.int().argmax(-1), cols.int().argmax(-1)
    y2 = height - 1 - rows.flip(-1).int().argmax(-1)
    x2 = width - 1 - cols.flip(-1).int().argmax(-1)
    boxes = torch.stack([x1, y1, x2, y2], dim=-1).float()
    fallback = ~rows.any(-1)  # empty masks
    if rule == "tight":
        boxes[..., 2:] += 1
    else:
        fallback = fallback | ((x2 - x1) * (y2 - y1) == 0)
    full = torch.tensor([0.0, 0.0, float(width), float(height)], device=masks.device)
    return torch.where(fallback.unsqueeze(-1), full, boxes)


def masked_crops(normalized_images: Tensor, masks: Tensor, size: int = 224, rule: CropBoxRule = "tight") -> Tensor:
    """ZegFormer's "cropmask" inputs (section 1.4, steps 2-4), all proposals at once.

    Each proposal's image is the normalised image times its binary mask (background 0, i.e. the
    CLIP mean), cropped to the mask's box (:func:`mask_boxes` with ``rule``) and resized to
    ``size x size`` by ``roi_align(aligned=True)`` (aspect ratio not kept).

    Args:
        normalized_images: (B, 3, H, W) CLIP-normalised images.
        masks: (B, N, H, W) bool.
        size: crop side.
        rule: box rule.

    Returns:
        (B * N, 3, size, size), image-major (proposal n of image b at ``b * N + n``).
    """
    b, n = masks.shape[:2]
    masked = (normalized_images.unsqueeze(1) * masks.unsqueeze(2).to(normalized_images.dtype)).flatten(0, 1)
    boxes = mask_boxes(masks, rule).flatten(0, 1).to(masked.dtype)  # (B*N, 4)
    index = torch.arange(b * n, device=masks.device, dtype=masked.dtype).unsqueeze(1)
    return roi_align(masked, torch.cat([index, boxes], dim=1), output_size=size, aligned=True)


class CLIPCropClassifier(nn.Module):
    """ZegFormer's CLIP image branch (section 1.4; inference only, CLIP frozen).

    Binarise each proposal (sigmoid > threshold, after upsampling to the image size), crop the masked
    CLIP-normalised image, encode every proposal of every image in one batch, and return
    ``clip_logit_scale * cos(A_q, T_c)`` with the segment branch's no-object logit appended.

    Args:
        encoder: the frozen CLIP image encoder (``normalize`` + ``encode(...).pooled``).
        crop_size: side of the crops (224 for ViT-B/16).
        logit_scale: CLIP's logit scale (100 for OpenAI CLIP).
        mask_threshold: binarisation threshold of the mask probabilities (0.5).
        box_rule: :data:`CropBoxRule`: ``"release"`` boxes and crops on the padded image as the
            official code, ``"tight"`` on the image without padding.
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        crop_size: int = 224,
        logit_scale: float = 100.0,
        mask_threshold: float = 0.5,
        box_rule: CropBoxRule = "tight",
    ) -> None:
        super().__init__()
        if box_rule not in CROP_BOX_RULES:
            raise ValueError(f"clip_crop_boxes must be one of {CROP_BOX_RULES}, got {box_rule!r}")
        self.encoder = encoder
        self.crop_size = crop_size
        self.logit_scale = logit_scale
        self.mask_threshold = mask_threshold
        self.box_rule = box_rule

    @torch.no_grad()
    def forward(self, images: Tensor, mask_logits: Tensor, text_embeddings: Tensor, no_object_logits: Tensor) -> Tensor:
        """CLIP-branch logits of every proposal.

        Args:
            images: (B, 3, H, W) in [0, 1], without padding.
            mask_logits: (B, N, Hp, Wp) proposal mask logits at the padded input size (Hp >= H,
                Wp >= W; the image is the top-left corner).
            text_embeddings: (K, D) L2-normalised.
            no_object_logits: (B, N) the segment branch's no-object logits.

        Returns:
            (B, N, K + 1) logits, the last column the segment branch's no-object logit.
        """
        b, n = mask_logits.shape[:2]
        height, width = images.shape[-2:]
        padded_h, padded_w = mask_logits.shape[-2:]
        if padded_h < height or padded_w < width:
            raise ValueError(f"mask logits {tuple(mask_logits.shape[-2:])} must cover the image {(height, width)}")
        pixels = self.encoder.normalize(images.float())
        if self.box_rule == "release":  # the CLIP-normalised image padded with 0, as detectron2's ImageList
            pixels = F.pad(pixels, (0, padded_w - width, 0, padded_h - height))
        else:
            mask_logits = mask_logits[..., :height, :width]
        masks = mask_logits.float().sigmoid() > self.mask_threshold
        crops = masked_crops(pixels, masks, self.crop_size, self.box_rule)
        features = F.normalize(self.encoder.encode(crops).pooled.float(), dim=-1)  # (B*N, D): one forward
        logits = self.logit_scale * features @ text_embeddings.float().T
        return torch.cat([logits.view(b, n, -1), no_object_logits.float().unsqueeze(-1)], dim=-1)


# ============================================================================ fusion
def fuse_scores(p_seg: Tensor, p_clip: Tensor, seen: Tensor, weight: float = 2 / 3) -> Tensor:
    """ZegFormer's fusion of the two branches (section 1.5, ``MASK_FORMER.ENSEMBLING``).

    CLIP's seen-class probabilities are replaced by their mean over the seen classes
    (``p'_avg``), then a weighted geometric mean with lambda = ``weight``::

        fused[seen]   = p[seen]   ** lambda       * p'_avg    ** (1 - lambda)
        fused[unseen] = p[unseen] ** (1 - lambda) * p'[unseen] ** lambda

    Args:
        p_seg: (..., K) segment-branch probabilities (no-object dropped).
        p_clip: (..., K) CLIP-branch probabilities (no-object dropped).
        seen: (K,) bool, which classes were trained on.
        weight: lambda (2/3, hard-coded in the official code).

    Returns:
        (..., K) fused scores.
    """
    seen = seen.to(p_seg.device)
    seen_f = seen.to(p_clip.dtype)
    clip_avg = (p_clip * seen_f).sum(-1, keepdim=True) / seen_f.sum().clamp(min=1.0)
    fused_seen = p_seg.pow(weight) * clip_avg.pow(1 - weight)
    fused_unseen = p_seg.pow(1 - weight) * p_clip.pow(weight)
    return torch.where(seen, fused_seen, fused_unseen)
