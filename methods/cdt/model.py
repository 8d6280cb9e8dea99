"""The CDT variant of MAFT+ as plain ``nn.Module``s (maftplus.md sections 1, 2 and 6).

* :class:`CLIPBackbone`: the open_clip image tower as a multi-scale backbone (res2..res5 and the
  stride-32 ``clip_vis_dense`` map), with the frozen CLIP head applied per vector / per location.
* :class:`MSDeformAttnPixelDecoder`: Mask2Former's multi-scale deformable-attention pixel decoder,
  with a pure-PyTorch :class:`MultiScaleDeformableAttention` (see :func:`ms_deform_attn_sample`).
* :class:`MaskedAttentionDecoder`: Mask2Former's masked-attention transformer decoder with the
  FC-CLIP in-vocabulary classifier (cosine against the frozen text embeddings plus a void column).
* :class:`CDTModel`: the whole model: proposals from DETACHED CLIP features, the out-of-vocabulary
  classifier (mask pooling of the fine-tuned CLIP features, CLIP head, CDT class embeddings), and
  the inference rule :func:`inference_class_probs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from ovseg.encoders.open_clip import OpenCLIPImage
from ovseg.methods.cdt.transfer import ContentDependentTransfer, Residual, sine_position_encoding

LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


# ============================================================================ backbone
class CLIPBackbone(nn.Module):
    """An open_clip image tower as the single shared backbone (``maft/modeling/backbone/clip.py``).

    * timm ConvNeXt tower: ``res2..res5`` are the outputs of the 4 trunk stages (strides 4/8/16/32)
      and ``clip_vis_dense = trunk.norm_pre(res5)``.
    * ViT tower: ``clip_vis_dense`` is the last block's patch tokens as a stride-``p`` map (before
      ``ln_post``); ``res2..res5`` are a simple pyramid: that map bilinearly resized to strides
      4/8/16/32 of the input.

    The CLIP head (ConvNeXt: ``trunk.head`` norm + ``visual.head`` projection; ViT: ``ln_post`` +
    ``proj``) is frozen here: MAFT+ fine-tunes the trunk only (maftplus.md section 3). Trainable
    parameters all start with ``encoder.visual.``.

    Args:
        encoder: an :class:`~ovseg.encoders.OpenCLIPImage` whose dense features are in the joint space.
    """

    def __init__(self, encoder: OpenCLIPImage) -> None:
        super().__init__()
        if not encoder.dense_in_joint_space:
            raise ValueError("the CLIP tower's head must apply per location (no attention pooling)")
        self.encoder = encoder
        self.kind = encoder.kind
        visual = encoder.visual
        self.embed_dim: int = encoder.embed_dim
        if self.kind == "timm":
            trunk = visual.trunk
            if not all(hasattr(trunk, name) for name in ("stem", "stages", "norm_pre")):
                raise ValueError(f"timm trunk {type(trunk).__name__} is not ConvNeXt-like (stem, stages, norm_pre)")
            if len(trunk.stages) != 4:
                raise ValueError(f"expected 4 trunk stages, got {len(trunk.stages)}")
            info = trunk.feature_info
            self.channels = {level: int(info[i]["num_chs"]) for i, level in enumerate(LEVELS)}
            self.dense_channels = int(trunk.num_features)
            self.dense_stride = 32
            head = [trunk.head, visual.head]
        else:
            width = int(visual.conv1.out_channels)
            self.channels = dict.fromkeys(LEVELS, width)
            self.dense_channels = width
            self.dense_stride = encoder.patch_size
            head = [visual.ln_post]
            visual.proj.requires_grad_(False)
        for module in head:
            module.requires_grad_(False)

    @property
    def head_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the frozen CLIP head's parameters."""
        return [name for name, p in self.named_parameters() if not p.requires_grad]

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) normalised images (H, W multiples of 32) -> ``res2..res5`` and
        ``clip_vis_dense`` (B, C, H/stride, W/stride) maps."""
        visual = self.encoder.visual
        if self.kind == "timm":
            trunk = visual.trunk
            x = trunk.stem(images)
            out = {}
            for level, stage in zip(LEVELS, trunk.stages):
                x = stage(x)
                out[level] = x
            out["clip_vis_dense"] = trunk.norm_pre(x)
            return out
        return self._forward_vit(images)

    def _forward_vit(self, images: Tensor) -> dict[str, Tensor]:
        visual: VisionTransformer = self.encoder.visual
        x = visual.conv1(images)
        b, width, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.encoder._vit_pos_embed((h, w)).to(x.dtype)
        x = visual.transformer(visual.ln_pre(x))
        dense = x[:, 1:].transpose(1, 2).reshape(b, width, h, w)
        height, width_px = images.shape[-2:]
        out = {
            level: F.interpolate(
                dense, size=(height // STRIDES[level], width_px // STRIDES[level]), mode="bilinear", align_corners=False
            )
            for level in LEVELS
        }
        out["clip_vis_dense"] = dense
        return out

    def embed(self, features: Tensor) -> Tensor:
        """The frozen CLIP head on vectors: (..., C) trunk features -> (..., D) joint-space embeddings."""
        shape = features.shape[:-1]
        x = features.reshape(-1, features.shape[-1])
        visual = self.encoder.visual
        if self.kind == "timm":
            # each vector as a 1x1 map: trunk head (pool = identity, norm) then projection head
            x = visual.head(visual.trunk.forward_head(x[:, :, None, None]))
        else:
            x = visual.ln_post(x) @ visual.proj
        return x.reshape(*shape, -1)

    def dense_embedding(self, dense: Tensor) -> Tensor:
        """(B, C, h, w) ``clip_vis_dense`` -> (B, D, h, w): the CLIP head at every location."""
        return self.embed(dense.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# ============================================================================ deformable attention
def ms_deform_attn_sample(
    value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Multi-scale deformable attention core in pure PyTorch (``F.grid_sample``).

    Computes, for every query q and head m,
    ``sum_l sum_k A[q, m, l, k] * bilinear(V_l^m, p[q, m, l, k])``, bilinear sampling with zeros
    outside the map, at pixel coordinates ``p * (W_l, H_l) - 0.5`` (``align_corners=False``).
    This is the same math as Deformable DETR's CUDA op ``MSDeformAttnFunction``; it differs in
    numerics only (summation order; float rounding) and is slower and uses more memory (the
    sampled values of every point are materialised before the weighted sum). It needs no compiled
    extension, runs on any device and under autocast, and is differentiable in all inputs.

    Args:
        value: (B, S, M, C_h) values of all levels, S = sum_l H_l W_l, M heads.
        spatial_shapes: [(H_l, W_l)] per level, in the order of ``value``.
        sampling_locations: (B, Q, M, L, P, 2) xy in [0, 1] (normalised by each level's size).
        attention_weights: (B, Q, M, L, P), softmax-normalised over (L, P).

    Returns:
        (B, Q, M * C_h).
    """
    b, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):  # a handful of levels, not pixels
        v = per_level[level].permute(0, 2, 3, 1).reshape(b * heads, head_dim, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(b * heads, queries, points, 2)
        sampled.append(
            F.grid_sample(v, grid.to(v.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*M, C_h, Q, P)
    stacked = torch.stack(sampled, dim=3)  # (B*M, C_h, Q, L, P)
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, queries, levels, points)
    out = (stacked * weights.to(stacked.dtype)).sum((-1, -2))  # (B*M, C_h, Q)
    return out.view(b, heads * head_dim, queries).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's ``MSDeformAttn`` with the pure-PyTorch core :func:`ms_deform_attn_sample`.

    Args:
        dim: model width (256).
        levels: feature levels (3 in Mask2Former's pixel decoder).
        heads: attention heads (8).
        points: sampling points per head and level (4).
    """

    def __init__(self, dim: int = 256, levels: int = 3, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring of directions (one per head), growing with the point index."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values  # (M, 2)
        grid = grid[:, None, None, :].repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """Attend from queries to sampled points of every level.

        Args:
            query: (B, Q, D) queries (with position embedding).
            reference_points: (B, Q, L, 2) xy in [0, 1] per level.
            value: (B, S, D) flattened multi-level values, S = sum_l H_l W_l.
            spatial_shapes: [(H_l, W_l)].

        Returns:
            (B, Q, D).
        """
        b, q, _ = query.shape
        m, lv, p = self.heads, self.levels, self.points
        v = self.value_proj(value).view(b, value.shape[1], m, self.dim // m)
        offsets = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
        # offsets are in pixels of each level: normalise by (W_l, H_l)
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_sample(v, spatial_shapes, locations, weights))


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when the width is not a multiple of 32)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _conv_init(conv: nn.Conv2d) -> nn.Conv2d:
    """detectron2's ``c2_xavier_fill``: Kaiming-uniform (a=1) weights, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable self-attention + ReLU FFN."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, levels: int, points: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = MultiScaleDeformableAttention(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """(B, S, D) tokens of all levels -> (B, S, D)."""
        src = self.norm1(src + self.dropout(self.attention(src + pos, reference_points, src, spatial_shapes)))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's ``MSDeformAttnPixelDecoder`` (maftplus.md section 1).

    A deformable-attention encoder over res3..res5 (projected to ``conv_dim`` with 1x1 conv +
    GroupNorm, plus sine position and learnable level embeddings), then an FPN step to stride 4
    with the res2 lateral, and a 1x1 conv to the mask features.

    Args:
        in_channels: channels of res2..res5.
        conv_dim, mask_dim: widths (256, 256).
        num_layers, heads, points, ffn_dim: encoder (6, 8, 4, 1024).
        dropout: encoder dropout (0).
    """

    def __init__(
        self,
        in_channels: dict[str, int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        heads: int = 8,
        points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.transformer_levels = ("res5", "res4", "res3")  # low to high resolution
        self.input_proj = nn.ModuleList()
        for level in self.transformer_levels:
            conv = nn.Conv2d(in_channels[level], conv_dim, kernel_size=1)
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
            self.input_proj.append(nn.Sequential(conv, _group_norm(conv_dim)))
        n = len(self.transformer_levels)
        self.level_embed = nn.Parameter(torch.empty(n, conv_dim).normal_())
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(conv_dim, ffn_dim, heads, n, points, dropout) for _ in range(num_layers)
        )
        self.lateral = nn.Sequential(
            _conv_init(nn.Conv2d(in_channels["res2"], conv_dim, 1, bias=False)), _group_norm(conv_dim)
        )
        self.output = nn.Sequential(
            _conv_init(nn.Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False)), _group_norm(conv_dim), nn.ReLU()
        )
        self.mask_features = _conv_init(nn.Conv2d(conv_dim, mask_dim, 1))
        self.conv_dim = conv_dim

    @staticmethod
    def reference_points(
        spatial_shapes: list[tuple[int, int]], batch: int, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """(B, S, L, 2): every token's normalised centre, the same on every level (no padding mask:
        inputs are padded images, as in detectron2, so all valid ratios are 1)."""
        points = []
        for h, w in spatial_shapes:
            y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
            x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
            grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
            points.append(torch.stack([grid_x.flatten(), grid_y.flatten()], -1))
        ref = torch.cat(points, 0).to(dtype)  # (S, 2)
        return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """res2..res5 maps -> mask features (B, mask_dim, H/4, W/4) and the 3 encoder maps
        (B, conv_dim, H/s, W/s) for s = 32, 16, 8 (the decoder's memory, low to high resolution)."""
        srcs, pos, shapes = [], [], []
        for index, level in enumerate(self.transformer_levels):
            x = self.input_proj[index](features[level])
            b, c, h, w = x.shape
            shapes.append((h, w))
            srcs.append(x.flatten(2).transpose(1, 2))
            pe = sine_position_encoding(h, w, c // 2, device=x.device, dtype=x.dtype)
            pos.append(pe.flatten(1).transpose(0, 1).unsqueeze(0) + self.level_embed[index].to(x.dtype))
        src = torch.cat(srcs, 1)
        pos_all = torch.cat(pos, 1).expand(src.shape[0], -1, -1)
        reference = self.reference_points(shapes, src.shape[0], src.device, src.dtype)
        for layer in self.layers:
            src = layer(src, pos_all, reference, shapes)
        maps = [
            t.transpose(1, 2).reshape(src.shape[0], self.conv_dim, h, w)
            for t, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)
        ]
        lateral = self.lateral(features["res2"])
        y = lateral + F.interpolate(maps[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_features(self.output(y)), maps


# ============================================================================ transformer decoder
class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class AttentionLayer(nn.Module):
    """Post-norm attention block: ``norm(tgt + MHA(tgt + query_pos, memory + pos, memory))``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(
        self, tgt: Tensor, memory: Tensor, query_pos: Tensor, pos: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        key = memory if pos is None else memory + pos
        out = self.attention(tgt + query_pos, key, memory, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class FFNLayer(nn.Module):
    """Post-norm ReLU FFN block."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


def mask_pool(features: Tensor, mask_logits: Tensor) -> Tensor:
    """Average of ``features`` inside each binarised mask (``mask > 0``), ODISE/FC-CLIP ``MaskPooling``.

    Args:
        features: (B, C, h, w).
        mask_logits: (B, N, h', w') resized bilinearly to (h, w) first.

    Returns:
        (B, N, C) (zeros for an empty mask).
    """
    if mask_logits.shape[-2:] != features.shape[-2:]:
        mask_logits = F.interpolate(mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False)
    masks = (mask_logits > 0).to(features.dtype)
    denominator = masks.sum((-1, -2)).unsqueeze(-1) + 1e-8
    return torch.einsum("bchw,bnhw->bnc", features, masks) / denominator


def reduce_synonym_logits(logits: Tensor, query_to_class: Tensor | None) -> Tensor:
    """Per-class logits as the maximum over each class's names (OpenSeg/ODISE's max ensemble, used
    by MAFT+ before any softmax).

    Args:
        logits: (..., Q+1) logits of Q names and void (last).
        query_to_class: (Q,) class index of each name, or None (then ``logits`` is returned).

    Returns:
        (..., K+1) with void last.
    """
    if query_to_class is None:
        return logits
    names, void = logits[..., :-1], logits[..., -1:]
    index = query_to_class.to(logits.device)
    if index.numel() != names.shape[-1]:
        raise ValueError(f"query_to_class has {index.numel()} entries for {names.shape[-1]} name logits")
    num_classes = int(index.max()) + 1
    out = names.new_full((*names.shape[:-1], num_classes), float("-inf"))
    out = out.scatter_reduce(-1, index.expand_as(names), names, reduce="amax", include_self=True)
    return torch.cat([out, void], -1)


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's ``MultiScaleMaskedTransformerDecoder`` with FC-CLIP's in-vocabulary classifier.

    ``dec_layers - 1`` layers of masked cross-attention (round-robin over the 3 memory levels, low
    resolution first; each query attends only where its previous mask is > 0.5, or everywhere if
    that is empty), self-attention and FFN; a prediction from the learnable queries and after every
    layer (``dec_layers`` predictions). Class logits: ``class_embed`` MLP of (decoder output + a
    LayerNorm+Linear of the mask-pooled mask features), cosine against the classifier (text
    embeddings and void), times a learnable scale (init 1/0.07, at most 100).

    Args:
        in_dim: memory width (the pixel decoder's ``conv_dim``).
        embed_dim: D, the text embedding width.
        hidden_dim, num_queries, heads, ffn_dim, dec_layers, mask_dim: Mask2Former sizes
            (256, 100 in MAFT+, 8, 2048, 10, 256).
    """

    def __init__(
        self,
        in_dim: int,
        embed_dim: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        heads: int = 8,
        ffn_dim: int = 2048,
        dec_layers: int = 10,
        mask_dim: int = 256,
        num_levels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dec_layers < 1:
            raise ValueError(f"dec_layers must be >= 1, got {dec_layers}")
        self.heads, self.num_levels, self.hidden_dim = heads, num_levels, hidden_dim
        self.cross_attention = nn.ModuleList(AttentionLayer(hidden_dim, heads, dropout) for _ in range(dec_layers - 1))
        self.self_attention = nn.ModuleList(AttentionLayer(hidden_dim, heads, dropout) for _ in range(dec_layers - 1))
        self.ffn = nn.ModuleList(FFNLayer(hidden_dim, ffn_dim, dropout) for _ in range(dec_layers - 1))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.input_proj = nn.ModuleList(
            _conv_init(nn.Conv2d(in_dim, hidden_dim, 1)) if in_dim != hidden_dim else nn.Identity()
            for _ in range(num_levels)
        )
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.mask_pooling_proj = nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, hidden_dim))
        self.class_embed = MLP(hidden_dim, hidden_dim, embed_dim, 3)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def predict(
        self,
        output: Tensor,
        mask_features: Tensor,
        classifier: Tensor,
        target_size: tuple[int, int],
        query_to_class: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Class logits (B, N, K+1), mask logits (B, N, H/4, W/4) and the next attention mask
        (B*heads, N, h*w) bool (True = not attended) of decoder queries (B, N, C). With
        ``query_to_class``, the classifier has one row per name (Q+1) and a class's logit is the
        maximum over its names (:func:`reduce_synonym_logits`)."""
        decoded = self.decoder_norm(output)
        masks = torch.einsum("bnc,bchw->bnhw", self.mask_embed(decoded), mask_features)
        pooled = self.mask_pooling_proj(mask_pool(mask_features, masks))
        embedding = F.normalize(self.class_embed(decoded + pooled), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100.0)
        logits = reduce_synonym_logits(scale * embedding @ classifier.to(embedding.dtype).T, query_to_class)
        attn = F.interpolate(masks, size=target_size, mode="bilinear", align_corners=False)
        attn = attn.sigmoid().flatten(2) < 0.5  # (B, N, h*w)
        attn = attn.unsqueeze(1).expand(-1, self.heads, -1, -1).flatten(0, 1).detach()
        return logits, masks, attn

    def forward(
        self, memory: list[Tensor], mask_features: Tensor, classifier: Tensor, query_to_class: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Decode queries against the multi-scale memory.

        Args:
            memory: ``num_levels`` maps (B, in_dim, h_l, w_l), low resolution first.
            mask_features: (B, mask_dim, H/4, W/4).
            classifier: (K+1, D) L2-normalised text embeddings and void (last); (Q+1, D), one row
                per name, with ``query_to_class`` (Q,) giving each name's class.

        Returns:
            class logits (L, B, N, K+1) and mask logits (L, B, N, H/4, W/4), L = ``dec_layers``.
        """
        sources, positions, sizes = [], [], []
        for level, x in enumerate(memory):
            b, _, h, w = x.shape
            sizes.append((h, w))
            pe = sine_position_encoding(h, w, self.hidden_dim // 2, device=x.device, dtype=x.dtype)
            positions.append(pe.flatten(1).transpose(0, 1).unsqueeze(0).expand(b, -1, -1))
            sources.append(self.input_proj[level](x).flatten(2).transpose(1, 2) + self.level_embed.weight[level])
        b = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        output = self.query_feat.weight.unsqueeze(0).expand(b, -1, -1)
        logits, masks, attn = self.predict(output, mask_features, classifier, sizes[0], query_to_class)
        all_logits, all_masks = [logits], [masks]
        for i, (cross, self_attn, ffn) in enumerate(zip(self.cross_attention, self.self_attention, self.ffn)):
            level = i % self.num_levels
            attn = attn & ~attn.all(-1, keepdim=True)  # a query that masks everything sees everything
            output = cross(output, sources[level], query_pos, positions[level], attn_mask=attn)
            output = ffn(self_attn(output, output, query_pos, query_pos))  # position on queries and keys
            logits, masks, attn = self.predict(
                output, mask_features, classifier, sizes[(i + 1) % self.num_levels], query_to_class
            )
            all_logits.append(logits)
            all_masks.append(masks)
        return torch.stack(all_logits), torch.stack(all_masks)


# ============================================================================ the whole model
@dataclass
class CDTOutput:
    """Outputs of :class:`CDTModel`.

    Attributes:
        in_vocab_logits: (L, B, N, K+1) in-vocabulary class logits of every decoder prediction
            (the last column is void).
        mask_logits: (L, B, N, H/4, W/4).
        out_vocab_logits: (B, N, K+1) out-of-vocabulary (CLIP) logits of the final masks.
        clip_vis_dense: (B, C, H/32, W/32) the fine-tuned trunk's map (for the RC loss).
    """

    in_vocab_logits: Tensor
    mask_logits: Tensor
    out_vocab_logits: Tensor
    clip_vis_dense: Tensor


def inference_class_probs(in_vocab_logits: Tensor, out_vocab_logits: Tensor) -> Tensor:
    """MAFT+'s inference rule (maftplus.md section 6, no geometric ensemble).

    ``P(n, c) = softmax_c(out-vocab logits without void)[c] * (1 - p_void,n)``, p_void from the
    softmax of the in-vocabulary logits (void last).

    Args:
        in_vocab_logits: (B, N, K+1) final in-vocabulary logits.
        out_vocab_logits: (B, N, K+1) out-of-vocabulary logits.

    Returns:
        (B, N, K).
    """
    p_void = in_vocab_logits.float().softmax(-1)[..., -1:]
    return out_vocab_logits[..., :-1].float().softmax(-1) * (1.0 - p_void)


class CDTModel(nn.Module):
    """MAFT+ with CDT as one module: shared CLIP backbone, proposals, in- and out-of-vocabulary
    classifiers (maftplus.md section 1).

    Gradient routing: the pixel decoder and transformer decoder see DETACHED backbone features
    (their losses never reach CLIP); the out-of-vocabulary branch pools the fine-tuned trunk's
    ``clip_vis_dense`` with gradients, inside the DETACHED final masks, through the frozen CLIP
    head to region embeddings e_n, and scores them against CDT(T):
    ``min(exp(tau_CLIP), 100) * e_n / |e_n| . CDT(T)_c`` (CDT output not re-normalised).

    Args:
        backbone: the fine-tuned CLIP image tower.
        clip_logit_scale: CLIP's (frozen) log logit scale.
        num_queries, conv_dim, mask_dim, hidden_dim, enc_*, dec_*: Mask2Former sizes.
        cdt_heads, cdt_residual: :class:`~methods.cdt.transfer.ContentDependentTransfer`.
        use_cdt: the ablation switch: ``False`` scores regions against the plain T.
        cdt_flatten_without_permute: feed CDT the dense map as the release does,
            ``(B, C, h, w).reshape(B*h*w, C)`` without a permute, so each "location" vector mixes
            channels and positions (released weights were trained so); ``False``: one vector per
            location (docs/cdt.md, "Reproducing the release").
    """

    def __init__(
        self,
        backbone: CLIPBackbone,
        clip_logit_scale: float,
        num_queries: int = 100,
        conv_dim: int = 256,
        mask_dim: int = 256,
        hidden_dim: int = 256,
        enc_layers: int = 6,
        enc_heads: int = 8,
        enc_points: int = 4,
        enc_ffn_dim: int = 1024,
        dec_layers: int = 10,
        dec_heads: int = 8,
        dec_ffn_dim: int = 2048,
        cdt_heads: int = 8,
        cdt_residual: Residual = "semantic",
        use_cdt: bool = True,
        cdt_flatten_without_permute: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.cdt_flatten_without_permute = cdt_flatten_without_permute
        dim = backbone.embed_dim
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            backbone.channels, conv_dim, mask_dim, enc_layers, enc_heads, enc_points, enc_ffn_dim
        )
        self.decoder = MaskedAttentionDecoder(
            conv_dim, dim, hidden_dim, num_queries, dec_heads, dec_ffn_dim, dec_layers, mask_dim
        )
        self.void_embedding = nn.Embedding(1, dim)
        self.use_cdt = use_cdt
        self.cdt = ContentDependentTransfer(dim, cdt_heads, cdt_residual) if use_cdt else None
        self.register_buffer("clip_logit_scale", torch.tensor(float(clip_logit_scale)))

    def classifier(self, text: Tensor) -> Tensor:
        """(K, D) normalised text embeddings -> (K+1, D) with the normalised void embedding last."""
        void = F.normalize(self.void_embedding.weight, dim=-1)
        return torch.cat([text.to(void.dtype), void], 0)

    def transferred_classifier(self, clip_vis_dense: Tensor, classifier: Tensor) -> Tensor:
        """(B, C, h, w) fine-tuned CLIP map, (K+1, D) classifier -> (B, K+1, D): CDT(T), or T
        repeated per image without CDT."""
        if self.cdt is None:
            return classifier.unsqueeze(0).expand(clip_vis_dense.shape[0], -1, -1)
        if self.cdt_flatten_without_permute:
            b, c, h, w = clip_vis_dense.shape
            scrambled = clip_vis_dense.reshape(b * h * w, c)  # the release's layout (no permute)
            visual = self.backbone.embed(scrambled).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        else:
            visual = self.backbone.dense_embedding(clip_vis_dense)
        return self.cdt(classifier, visual)

    def out_vocab_logits(
        self, clip_vis_dense: Tensor, mask_logits: Tensor, classifier: Tensor, query_to_class: Tensor | None = None
    ) -> Tensor:
        """(B, C, h, w) fine-tuned CLIP map, (B, N, H/4, W/4) mask logits (detached here), (K+1, D)
        classifier (or (Q+1, D) with ``query_to_class``) -> (B, N, K+1) CLIP logits."""
        pooled = mask_pool(clip_vis_dense, mask_logits.detach())  # (B, N, C)
        regions = F.normalize(self.backbone.embed(pooled), dim=-1)  # (B, N, D)
        text = self.transferred_classifier(clip_vis_dense, classifier)  # (B, K+1, D)
        scale = self.clip_logit_scale.exp().clamp(max=100.0)
        logits = scale * torch.einsum("bnd,bkd->bnk", regions, text.to(regions.dtype))
        return reduce_synonym_logits(logits, query_to_class)

    def forward(self, images: Tensor, text: Tensor, query_to_class: Tensor | None = None) -> CDTOutput:
        """All predictions of a batch.

        Args:
            images: (B, 3, H, W) normalised, H and W multiples of 32.
            text: (K, D) L2-normalised class embeddings, or (Q, D) name embeddings with
                ``query_to_class`` (Q,): then every logit of a class is the maximum over its names.
        """
        features = self.backbone(images)
        detached = {level: features[level].detach() for level in LEVELS}
        mask_features, memory = self.pixel_decoder(detached)
        classifier = self.classifier(text)
        in_logits, masks = self.decoder(memory, mask_features, classifier, query_to_class)
        out_logits = self.out_vocab_logits(features["clip_vis_dense"], masks[-1], classifier, query_to_class)
        return CDTOutput(in_logits, masks, out_logits, features["clip_vis_dense"])
