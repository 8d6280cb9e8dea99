"""ZegFormer Lightning glue: the hooks of :class:`~ovseg.mask_classification.MaskClassificationModule`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.encoders.base import ImageEncoder, TextEncoder
from ovseg.mask_classification import MaskClassificationModule
from ovseg.methods.zegformer.model import (
    CROP_BOX_RULES,
    CLIPCropClassifier,
    CropBoxRule,
    SegmentClassifier,
    TimmBackbone,
    ZegFormerModel,
    ZegFormerOutput,
    class_probabilities,
    fuse_scores,
)
from ovseg.module import MaskPredictions, to_unit_float
from ovseg.vocabulary import Vocabulary


class ZegFormer(MaskClassificationModule):
    """ZegFormer (Ding et al., CVPR 2022): class-agnostic MaskFormer proposals classified by their
    segment embeddings against frozen CLIP text embeddings, fused at inference with a frozen CLIP
    image encoder on masked crops (``../shared/reference/zegformer.md``).

    Parameter layout: ``model.backbone.*`` (the timm CNN; ``lr_multipliers: {model.backbone.: 0.1}``
    gives the paper's x0.1), ``model.*`` (pixel decoder, transformer decoder, queries, mask MLP,
    segment projection), ``classifier.no_object_embedding``; ``clip_text.*`` and ``clip_image.*``
    are frozen (no gradient, eval mode even while training).

    Inference variants (section 1.5): ``clip_classification=False`` is ZegFormer-seg; with it,
    ``ensemble=True`` is ZegFormer (the seen/unseen fusion) and ``ensemble=False`` ZegFormer-img
    (CLIP-branch probabilities only). ``calibration`` (gamma) is subtracted from the per-pixel
    scores of seen classes after semantic inference, in every variant.

    Args:
        clip_text: frozen CLIP text encoder (ViT-B/16's in the paper); its width is D.
        clip_image: frozen CLIP image encoder for the crop branch (``None``: no CLIP branch).
        backbone: timm model name (``resnet101.tv_in1k``, ``resnet50``, ``resnet18``, ``test_resnet``).
        backbone_pretrained: load timm's pretrained weights.
        backbone_checkpoint: a local backbone weight file (instead of ``backbone_pretrained``).
        backbone_kwargs: extra ``timm.create_model`` arguments.
        backbone_out_indices: feature levels of strides 4..32.
        freeze_bn: detectron2's FrozenBN in the backbone (the paper); off for random-init backbones.
        pixel_mean, pixel_std: backbone normalisation (default: the timm model's).
        num_queries, conv_dim, mask_dim, hidden_dim, dec_layers, heads, ffn_dim, dropout:
            MaskFormer sizes (100, 256, 256, 256, 6, 8, 2048, 0.1).
        temperature: tau of the segment logits (0.01, fixed scale 100).
        class_weight, mask_weight, dice_weight: matcher and loss weights (1, 20, 1; focal masks).
        no_object_weight: cross-entropy weight of no-object (0.1).
        deep_supervision: the set loss after every decoder layer.
        clip_classification: use the CLIP image branch at inference.
        ensemble: fuse the two branches (else CLIP-branch probabilities only).
        ensemble_weight: lambda of the fusion (2/3).
        calibration: gamma subtracted from seen-class scores (0.1 in the COCO / VOC evaluations).
        clip_crop_size: crop side for the CLIP image encoder (224).
        clip_logit_scale: CLIP's logit scale (100).
        clip_templates: templates of the CLIP branch's text embeddings (the official code uses a
            separate 32-template set); ``None``: the benchmark's embeddings, as the segment branch.
        mask_threshold: binarisation of proposals for the crops (0.5).
        clip_crop_boxes: how the CLIP crops are boxed: ``"release"`` (the official rule: box to the
            last occupied row/column index, zero-area boxes -> whole padded image, boxes and crops
            on the padded image) or ``"tight"`` (ovseg's: boxes cover the whole mask, on the image
            without padding). ``docs/zegformer.md`` compares them.
        **kwargs: :class:`~ovseg.mask_classification.MaskClassificationModule` and
            :class:`~ovseg.module.OVSegModule` options (training_templates, optimizer, ...).
    """

    def __init__(
        self,
        clip_text: TextEncoder,
        clip_image: ImageEncoder | None = None,
        backbone: str = "resnet101.tv_in1k",
        backbone_pretrained: bool = False,
        backbone_checkpoint: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_out_indices: Sequence[int] = (1, 2, 3, 4),
        freeze_bn: bool = True,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        num_queries: int = 100,
        conv_dim: int = 256,
        mask_dim: int = 256,
        hidden_dim: int = 256,
        dec_layers: int = 6,
        heads: int = 8,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        temperature: float = 0.01,
        class_weight: float = 1.0,
        mask_weight: float = 20.0,
        dice_weight: float = 1.0,
        no_object_weight: float = 0.1,
        deep_supervision: bool = True,
        clip_classification: bool = True,
        ensemble: bool = True,
        ensemble_weight: float = 2 / 3,
        calibration: float = 0.1,
        clip_crop_size: int = 224,
        clip_logit_scale: float = 100.0,
        clip_templates: str | list[str] | None = None,
        mask_threshold: float = 0.5,
        clip_crop_boxes: CropBoxRule = "tight",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if clip_classification and clip_image is None:
            raise ValueError(
                "clip_classification=True needs a clip_image encoder "
                "(or set clip_classification: false for ZegFormer-seg)"
            )
        self.clip_text = clip_text.requires_grad_(False).eval()
        self.clip_image = None if clip_image is None else clip_image.requires_grad_(False).eval()
        net = TimmBackbone(
            backbone, backbone_pretrained, backbone_checkpoint, backbone_out_indices, freeze_bn, backbone_kwargs
        )
        mean = tuple(pixel_mean) if pixel_mean is not None else net.mean
        std = tuple(pixel_std) if pixel_std is not None else net.std
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.model = ZegFormerModel(
            net,
            clip_text.embed_dim,
            num_queries=num_queries,
            conv_dim=conv_dim,
            mask_dim=mask_dim,
            hidden_dim=hidden_dim,
            dec_layers=dec_layers,
            heads=heads,
            ffn_dim=ffn_dim,
            dropout=dropout,
        )
        self.classifier = SegmentClassifier(clip_text.embed_dim, temperature)
        self.set_loss = dict(
            class_weight=class_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            no_object_weight=no_object_weight,
            mask_loss="focal",
        )
        self.deep_supervision = deep_supervision
        self.clip_classification = clip_classification
        self.ensemble = ensemble
        self.ensemble_weight = ensemble_weight
        self.calibration = calibration
        self.clip_templates = clip_templates
        if clip_crop_boxes not in CROP_BOX_RULES:
            raise ValueError(f"clip_crop_boxes must be one of {CROP_BOX_RULES}, got {clip_crop_boxes!r}")
        self._crop_settings = dict(
            crop_size=clip_crop_size,
            logit_scale=clip_logit_scale,
            mask_threshold=mask_threshold,
            box_rule=clip_crop_boxes,
        )

    def train(self, mode: bool = True) -> ZegFormer:
        """Train mode for everything but the frozen CLIP towers."""
        super().train(mode)
        self.clip_text.eval()
        if self.clip_image is not None:
            self.clip_image.eval()
        return self

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """Texts -> (N, D) frozen CLIP text features (the base normalises and averages templates)."""
        token_ids = self.clip_text.tokenize(texts).to(self.device)
        return self.clip_text(token_ids).pooled.float()

    def forward(self, images: Tensor) -> ZegFormerOutput:
        """(B, 3, H, W) in [0, 1] -> proposal outputs of the normalised, padded batch."""
        return self.model(self.pad_batch(self.normalize(images))[0])

    def predict_scores(
        self, images: Tensor, text_embeddings: Tensor, vocabulary: Vocabulary | None = None
    ) -> MaskPredictions:
        """Masks and class scores of the last decoder layer (sections 1.4, 1.5, 5).

        Args:
            images: (B, 3, H, W) in [0, 1].
            text_embeddings: (Q, D) L2-normalised.
            vocabulary: where the Q queries come from: which of its classes were trained on
                decides the fusion and calibration (None: every query is unseen).

        Returns:
            :class:`MaskPredictions`: (B, N, H, W) mask logits (upsampled to the padded size and
            cropped to the image, as detectron2's ``sem_seg_postprocess``), (B, N, Q) class
            probabilities (segment branch, fused, or CLIP branch), ``query_offsets`` = -gamma on
            seen classes (the calibration, subtracted after the sum over masks).
        """
        if vocabulary is not None and len(vocabulary.queries) != len(text_embeddings):
            raise ValueError(
                f"{len(vocabulary.queries)} queries in the vocabulary for {len(text_embeddings)} text embeddings"
            )
        height, width = images.shape[-2:]
        pixels, _ = self.pad_batch(self.normalize(images))
        out = self.model(pixels)
        padded_masks = F.interpolate(out.mask_logits[-1], size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        masks = padded_masks[..., :height, :width]
        logits = self.classifier(out.segment_embeddings[-1], text_embeddings)  # (B, N, Q + 1)
        probs = class_probabilities(logits)
        seen = (
            self.seen_queries(vocabulary)
            if vocabulary is not None
            else torch.zeros(len(text_embeddings), dtype=torch.bool, device=self.device)
        )
        if self.clip_classification:
            assert self.clip_image is not None
            clip_text = self.clip_text_embeddings(text_embeddings, vocabulary)
            clip_logits = self.crop_classifier()(images, padded_masks, clip_text, logits[..., -1])
            clip_probs = class_probabilities(clip_logits)
            probs = fuse_scores(probs, clip_probs, seen, self.ensemble_weight) if self.ensemble else clip_probs
        offsets = -self.calibration * seen.float() if self.calibration else None
        return MaskPredictions(masks, probs, offsets)

    def training_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """MaskFormer's set loss on the seen classes, after every decoder layer (section 2)."""
        pixels, labels = self.pad_batch(
            self.normalize(to_unit_float(batch["image"])), batch["label"], fill=self.training_pad_fill()
        )
        targets = self.mask_targets(labels)
        out = self.model(pixels)
        text = self.training_text_embeddings()
        logits = self.classifier(out.segment_embeddings, text)  # (L, B, N, K + 1)
        masks = out.mask_logits
        if not self.deep_supervision:
            logits, masks = logits[-1:], masks[-1:]
        return self.criterion(text.shape[0])(logits, masks, targets)

    # ------------------------------------------------------------------ helpers
    def crop_classifier(self) -> CLIPCropClassifier:
        """The CLIP image branch around the frozen image encoder."""
        assert self.clip_image is not None
        return CLIPCropClassifier(self.clip_image, **self._crop_settings)

    def clip_text_embeddings(self, text_embeddings: Tensor, vocabulary: Vocabulary | None) -> Tensor:
        """(Q, D) text embeddings of the CLIP branch: the given ones, or the queries of
        ``vocabulary`` in ``clip_templates``."""
        if self.clip_templates is None:
            return text_embeddings
        if vocabulary is None:
            raise ValueError("clip_templates needs the vocabulary of the queries")
        queries = Vocabulary(tuple((name,) for name in vocabulary.queries), self.clip_templates)
        return self.text_embeddings(queries).to(text_embeddings)

    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised with the backbone's mean and std."""
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
