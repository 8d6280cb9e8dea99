"""CLIP pretraining as an ovseg method: the three hooks of :class:`~ovseg.module.OVSegModule`."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.contrastive import GlobalContrastiveLoss, module_gather
from ovseg.encoders.open_clip import OpenCLIPImage, OpenCLIPText, build_open_clip_model
from ovseg.methods.clip.model import maskclip_value_path
from ovseg.module import OVSegModule, to_unit_float
from ovseg.vocabulary import Vocabulary


class CLIP(OVSegModule):
    """CLIP (Radford et al., 2021) trained from image-caption pairs: an open_clip model whose image
    and text towers are both trained with the symmetric InfoNCE loss over the (gathered) batch.

    It pretrains the CLIP that the mask-supervised methods (CDT, ZegFormer) start from: on the
    synthetic world, whose captions name every category, the unseen classes are learnt from
    captions only, as a web-trained CLIP learns them. :func:`~ovseg.methods.clip.export.save_open_clip`
    (``python -m ovseg.methods.clip.export``) writes the trained model as an open_clip state dict
    that ``checkpoint_path`` options load.

    As a segmenter it scores the image tower's dense features in the joint space against the class
    embeddings (:class:`~ovseg.encoders.OpenCLIPImage`), by default MaskCLIP's: the last ViT
    block's value path, then ``ln_post`` and ``proj`` per patch (``dense_features``). Global
    contrastive training aligns the pooled feature only; the value path carries that alignment to
    each location far better than the output tokens (README, "CLIP pretraining").

    Parameter layout (open_clip's keys after the prefix,
    :func:`~ovseg.methods.clip.export.open_clip_state_dict`):
    ``image_encoder.visual.*``, ``text_encoder.*`` (``token_embedding``, ``transformer.*``, ...),
    ``contrastive_loss.logit_scale`` (CLIP's ``logit_scale``).

    Args:
        model_name, pretrained, checkpoint_path, clip_config: the open_clip model (see
            :func:`~ovseg.encoders.open_clip.build_open_clip_model`); a random one from
            ``clip_config`` to pretrain from scratch.
        max_logit_scale: cap of the learnable logit scale (100, as open_clip); its initial value is
            the model's ``logit_scale`` (1/0.07 for a new model).
        dense_features: ViT towers: ``"maskclip"``, the last block's value path
            (:func:`~ovseg.methods.clip.model.maskclip_value_path`), or ``"tokens"``, its usual
            output tokens; both through ``ln_post`` and ``proj``. Convolutional towers' dense
            features are per location already and ignore it.
        export_path: if set, the trained model is also written there as an open_clip state dict
            when ``fit`` ends (:meth:`export_open_clip`), ready for other configs'
            ``checkpoint_path``; the same file as ``python -m ovseg.methods.clip.export``.
        **kwargs: optimizer, scheduler and evaluation options of :class:`OVSegModule`.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint_path: str | None = None,
        clip_config: dict[str, Any] | None = None,
        max_logit_scale: float = 100.0,
        dense_features: Literal["maskclip", "tokens"] = "maskclip",
        export_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.export_path = export_path
        clip = build_open_clip_model(model_name, pretrained, checkpoint_path, clip_config)
        if getattr(clip, "logit_bias", None) is not None:
            raise ValueError("CLIP pretraining trains with the softmax (InfoNCE) loss: SigLIP models are not supported")
        self.image_encoder = OpenCLIPImage(model=clip)
        if not self.image_encoder.dense_in_joint_space:
            raise ValueError(
                f"the image tower of {model_name or 'clip_config'} has no dense features in the joint space "
                "(attention-pooled head): choose a ViT or a ConvNeXt-style tower"
            )
        self.text_encoder = OpenCLIPText(model=clip)
        if model_name is not None:
            self.text_encoder.tokenizer = open_clip.get_tokenizer(model_name)
        if dense_features not in ("maskclip", "tokens"):
            raise ValueError(f"dense_features must be 'maskclip' or 'tokens', got {dense_features!r}")
        self.dense_features = dense_features
        self.contrastive_loss = GlobalContrastiveLoss(float(clip.logit_scale.detach().exp()), max_logit_scale)

    # ---------------------------------------------------------------- hooks
    def encode_text(self, texts: list[str]) -> Tensor:
        """Texts -> (N, D) normalised CLIP text features (``model.encode_text``)."""
        return F.normalize(self.text_encoder.encode_texts(texts).pooled, dim=-1)

    def encode_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images (uint8, or float in [0, 1]) -> (B, D) normalised CLIP image features."""
        return F.normalize(self.image_encoder(to_unit_float(images)).pooled, dim=-1)

    def predict_scores(self, images: Tensor, text_embeddings: Tensor, vocabulary: Vocabulary | None = None) -> Tensor:
        """Logit scale x cosine between each location's joint-space feature and each class embedding.

        Returns:
            (B, Q, h, w) logits on the image tower's feature grid.
        """
        use_value_path = self.dense_features == "maskclip" and self.image_encoder.kind == "vit"
        with maskclip_value_path(self.image_encoder) if use_value_path else nullcontext():
            dense = F.normalize(self.image_encoder(images).dense, dim=1)  # (B, D, h, w)
        return self.contrastive_loss.scale() * torch.einsum("bdhw,qd->bqhw", dense, text_embeddings.to(dense))

    def training_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Symmetric InfoNCE between the images and their captions, over the global batch."""
        image = self.encode_images(batch["image"])
        text = self.encode_text(list(batch["caption"]))
        gather, rank = module_gather(self)
        loss = self.contrastive_loss(image, text, gather, rank)
        return {"loss": loss, "logit_scale": self.contrastive_loss.scale().detach()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.contrastive_loss.clamp_()

    # ---------------------------------------------------------------- export
    def on_fit_end(self) -> None:
        """Write :attr:`export_path` (rank zero) once training has finished."""
        if self.export_path is not None and self.trainer.is_global_zero:
            path = self.export_open_clip(self.export_path)
            print(f"wrote the trained CLIP as an open_clip state dict: {path}")

    def export_open_clip(self, path: str | Path) -> Path:
        """Write the trained model as an open_clip state dict file
        (:func:`~ovseg.methods.clip.export.save_open_clip`); returns its path."""
        from ovseg.methods.clip.export import save_open_clip

        return save_open_clip(self.state_dict(), path)
