"""CDT Lightning glue: the hooks of :class:`~ovseg.mask_classification.MaskClassificationModule`."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.benchmark import TrainingClasses
from ovseg.encoders.open_clip import OpenCLIPImage, OpenCLIPText, build_open_clip_model
from ovseg.mask_classification import MaskClassificationModule
from ovseg.methods.cdt.losses import mask_aware_loss, representation_compensation_loss
from ovseg.methods.cdt.model import CDTModel, CLIPBackbone, inference_class_probs
from ovseg.methods.cdt.transfer import Residual
from ovseg.module import MaskPredictions, to_unit_float
from ovseg.vocabulary import Vocabulary

#: ViLD's 14 prompt templates (``VILD_PROMPT`` of MAFT+, maftplus.md section 1).
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

TEACHER = "teacher."


class CDT(MaskClassificationModule):
    """MAFT+ (Jiao et al., ECCV 2024) with Content-Dependent Transfer: one open_clip model whose
    image trunk is fine-tuned, a Mask2Former proposal head on its detached features, and an
    out-of-vocabulary CLIP classifier trained by the mask-aware loss and Representation
    Compensation (../shared/reference/maftplus.md).

    **The CLIP model** is built here, once, from ``model_name`` / ``pretrained`` /
    ``checkpoint_path`` or an explicit ``clip_config`` (see
    :func:`~ovseg.encoders.open_clip.build_open_clip_model`), and split into its towers: building
    it here (rather than taking two encoders from YAML) guarantees that image tower, text tower and
    logit scale come from the same checkpoint, loads the weights once, and gives access to CLIP's
    logit scale, which neither encoder keeps. Parameter layout:

    * ``model.backbone.encoder.visual.*``: the image tower; its trunk is trained (set
      ``lr_multipliers: {model.backbone.: 0.1}`` for MAFT+'s x0.1), its head (ConvNeXt
      ``trunk.head`` norm + ``visual.head`` projection; ViT ``ln_post`` + ``proj``) is frozen;
    * ``model.pixel_decoder``, ``model.decoder``, ``model.void_embedding``, ``model.cdt``: trained
      at the base learning rate;
    * ``model.clip_logit_scale``: CLIP's logit scale, a frozen buffer;
    * ``text_encoder.*``: the CLIP text tower, frozen (eval mode);
    * ``teacher.*``: a frozen deep copy of the image backbone as built (the pretrained weights),
      the RC teacher: eval mode, run under ``torch.no_grad`` in training only, never in the
      optimizer, and left out of checkpoints (it is rebuilt from the same weights with the model).

    Losses (maftplus.md section 4): Mask2Former's set losses on the in-vocabulary head with deep
    supervision (:class:`~ovseg.masks.MaskSetCriterion`, BCE + dice on importance-sampled points)
    + ``mask_aware_weight`` x mask-aware loss + ``rc_weight`` x RC loss.

    Args:
        model_name, pretrained, checkpoint_path, clip_config: the open_clip model (e.g.
            ``convnext_large_d_320`` / ``laion2b_s29b_b131k_ft_soup``).
        num_queries, conv_dim, mask_dim, hidden_dim: Mask2Former sizes (100, 256, 256, 256).
        enc_layers, enc_heads, enc_points, enc_ffn_dim: deformable pixel decoder (6, 8, 4, 1024).
        dec_layers, dec_heads, dec_ffn_dim: masked-attention decoder (10 predictions, 8, 2048).
        cdt_dim: CDT width, checked against CLIP's embedding width (768 for ConvNeXt-L, 640 for -B).
        cdt_heads: CDT heads (8).
        cdt_residual: ``"semantic"`` (``LN(T + Linear(A))``) or ``"panoptic"`` (``T + LN(Linear(A))``,
            zero-initialised Linear).
        use_cdt: ``False`` is the ablation scoring regions against the plain text embeddings.
        class_weight, mask_weight, dice_weight, no_object_weight: set-loss weights (2, 5, 5, 0.1).
        num_points, oversample_ratio, importance_ratio: point sampling (12544, 3, 0.75); ``None``
            points: every pixel.
        mask_aware_weight, rc_weight: weights of the CLIP-branch losses (1, 0.1).
        cdt_flatten_without_permute, upsample_masks_before_sigmoid, mask_aware_sigmoid_first,
        rc_kernel_from_unresized_width, synonym_logit_max: the release's behaviour where it
            differs from ovseg's (one switch each; ``false`` is ovseg's; the table in docs/cdt.md
            gives the measured effects). Respectively: CDT reads the dense map flattened without a
            permute (:class:`~methods.cdt.model.CDTModel`); the semantic map sums sigmoid masks
            upsampled to the padded input (:meth:`~ovseg.module.MaskPredictions.upsampled_before_sigmoid`)
            instead of at stride 4; the mask-aware loss upsamples mask probabilities instead of
            logits; the RC pooling kernel uses the width before the square resize
            (:func:`~methods.cdt.losses.pod_descriptor`); a class's logit is the maximum over its
            names' logits before the softmax (training and inference) instead of every name taking
            part in the softmax and the class keeping its best name's probability.
        training_class_names: a class-name file (one class per line, synonyms separated by ", ",
            ``packaged:NAME`` for ovseg's lists) naming the training label space's classes, in label
            order, e.g. MAFT+'s COCO-Stuff names with synonyms (docs/cdt.md); None: the
            DataModule's names. Names with synonyms need ``synonym_logit_max: true``.
        **kwargs: :class:`~ovseg.mask_classification.MaskClassificationModule` and
            :class:`~ovseg.module.OVSegModule` options (training_templates, optimizer, ...).
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint_path: str | None = None,
        clip_config: dict[str, Any] | None = None,
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
        cdt_dim: int | None = None,
        cdt_heads: int = 8,
        cdt_residual: Residual = "semantic",
        use_cdt: bool = True,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int | None = 12544,
        oversample_ratio: float = 3.0,
        importance_ratio: float = 0.75,
        mask_aware_weight: float = 1.0,
        rc_weight: float = 0.1,
        cdt_flatten_without_permute: bool = False,
        upsample_masks_before_sigmoid: bool = False,
        mask_aware_sigmoid_first: bool = False,
        rc_kernel_from_unresized_width: bool = False,
        synonym_logit_max: bool = False,
        training_class_names: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        clip = build_open_clip_model(model_name, pretrained, checkpoint_path, clip_config)
        self.text_encoder = OpenCLIPText(model=clip)
        if model_name is not None:
            self.text_encoder.tokenizer = open_clip.get_tokenizer(model_name)
        self.text_encoder.requires_grad_(False).eval()
        backbone = CLIPBackbone(OpenCLIPImage(model=clip))
        if cdt_dim is not None and cdt_dim != backbone.embed_dim:
            raise ValueError(f"cdt_dim {cdt_dim} must equal the CLIP embedding width {backbone.embed_dim}")
        self.model = CDTModel(
            backbone,
            float(clip.logit_scale.detach()),
            num_queries=num_queries,
            conv_dim=conv_dim,
            mask_dim=mask_dim,
            hidden_dim=hidden_dim,
            enc_layers=enc_layers,
            enc_heads=enc_heads,
            enc_points=enc_points,
            enc_ffn_dim=enc_ffn_dim,
            dec_layers=dec_layers,
            dec_heads=dec_heads,
            dec_ffn_dim=dec_ffn_dim,
            cdt_heads=cdt_heads,
            cdt_residual=cdt_residual,
            use_cdt=use_cdt,
            cdt_flatten_without_permute=cdt_flatten_without_permute,
        )
        self.teacher = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.register_state_dict_post_hook(_drop_teacher)
        self.register_load_state_dict_post_hook(_teacher_not_missing)
        self.set_loss = dict(
            class_weight=class_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            no_object_weight=no_object_weight,
            mask_loss="bce",
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_ratio=importance_ratio,
        )
        self.mask_aware_weight = mask_aware_weight
        self.rc_weight = rc_weight
        self.upsample_masks_before_sigmoid = upsample_masks_before_sigmoid
        self.mask_aware_sigmoid_first = mask_aware_sigmoid_first
        self.rc_kernel_from_unresized_width = rc_kernel_from_unresized_width
        self.synonym_logit_max = synonym_logit_max
        self.training_class_names = training_class_names
        self._training_names: Vocabulary | None = None

    def train(self, mode: bool = True) -> CDT:
        """Train mode for everything but the frozen text tower and RC teacher."""
        super().train(mode)
        self.text_encoder.eval()
        self.teacher.eval()
        return self

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """Texts -> (N, D) frozen CLIP text features (the base normalises and averages templates)."""
        token_ids = self.text_encoder.tokenize(texts).to(self.device)
        return self.text_encoder(token_ids).pooled.float()

    def training_vocabulary(self) -> Vocabulary:
        """The seen training classes, named by ``training_class_names`` when it is set."""
        if self.training_class_names is None:
            return super().training_vocabulary()
        assert self.training_classes is not None, "no training classes: fit with a DataModule that has them"
        if self._training_names is not None:
            return self._training_names
        try:
            names = Vocabulary.from_file(self.training_class_names, self.training_templates)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"training_class_names {self.training_class_names} does not exist: make it from MAFT+'s "
                "coco_stuff_with_prompt_eng.txt (docs/cdt.md, 'Reproducing the release') or set "
                "training_class_names: null to train on the DataModule's names"
            ) from None
        if len(names) != len(self.training_classes.vocabulary):
            raise ValueError(
                f"training_class_names {self.training_class_names} has {len(names)} classes, the "
                f"training label space {len(self.training_classes.vocabulary)}: give one line per "
                "label value, in label order"
            )
        self._training_names = Vocabulary(
            tuple(names.classes[k] for k in self.training_classes.seen_indices), names.templates
        )
        return self._training_names

    def set_training_classes(self, classes: TrainingClasses) -> None:
        super().set_training_classes(classes)
        self._training_names = None  # re-read training_class_names for the new label space

    def _query_to_class(self, vocabulary: Vocabulary | None, num_queries: int) -> Tensor | None:
        """The name -> class map the logits are reduced with (``synonym_logit_max``), or None."""
        if vocabulary is None or len(vocabulary.queries) == len(vocabulary):
            return None
        if not self.synonym_logit_max:
            return None
        if len(vocabulary.queries) != num_queries:
            raise ValueError(f"{num_queries} text embeddings for a vocabulary of {len(vocabulary.queries)} names")
        return vocabulary.query_to_class.to(self.device)

    def predict_scores(
        self, images: Tensor, text_embeddings: Tensor, vocabulary: Vocabulary | None = None
    ) -> MaskPredictions:
        """Masks and class probabilities by MAFT+'s inference rule (maftplus.md section 6).

        Args:
            images: (B, 3, H, W) in [0, 1].
            text_embeddings: (Q, D) L2-normalised.
            vocabulary: where the Q names come from; with ``synonym_logit_max`` a class's logits
                are the maximum over its names, and its probability is given to each of its names.

        Returns:
            :class:`MaskPredictions` with (B, N, Q) probabilities ``softmax(out-vocab)[c] *
            (1 - p_void)`` and mask logits of the unpadded image: (B, N, ~H/4, ~W/4), or (B, N, H, W)
            with ``upsample_masks_before_sigmoid``.
        """
        pixels, _ = self.pad_batch(self.normalize(images))
        query_to_class = self._query_to_class(vocabulary, text_embeddings.shape[0])
        out = self.model(pixels, text_embeddings, query_to_class)
        probs = inference_class_probs(out.in_vocab_logits[-1], out.out_vocab_logits)
        if query_to_class is not None:
            probs = probs[..., query_to_class]  # (B, N, K) -> (B, N, Q): each name gets its class's probability
        image_size, padded_size = tuple(images.shape[-2:]), tuple(pixels.shape[-2:])
        if self.upsample_masks_before_sigmoid:
            return MaskPredictions(out.mask_logits[-1], probs).upsampled_before_sigmoid(padded_size, image_size)
        return MaskPredictions(crop_padding(out.mask_logits[-1], image_size, padded_size), probs)

    def training_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Set losses (deep supervision) + mask-aware loss + RC loss (maftplus.md section 4)."""
        pixels, labels = self.pad_batch(self.normalize(batch["image"]), batch["label"])
        targets = self.mask_targets(labels)
        vocabulary = self.training_vocabulary()
        if len(vocabulary.queries) != len(vocabulary) and not self.synonym_logit_max:
            raise ValueError("training names with synonyms (training_class_names) need synonym_logit_max: true")
        text = self.training_text_embeddings()
        out = self.model(pixels, text, self._query_to_class(vocabulary, text.shape[0]))
        terms = self.criterion(self.num_training_classes)(out.in_vocab_logits, out.mask_logits, targets)
        set_loss = terms.pop("loss")
        terms["loss_mask_aware"] = mask_aware_loss(
            out.out_vocab_logits[..., :-1],
            out.mask_logits[-1].detach(),
            targets,
            sigmoid_before_upsampling=self.mask_aware_sigmoid_first,
        )
        with torch.no_grad():
            teacher = self.teacher(pixels)["clip_vis_dense"]
        terms["loss_rc"] = representation_compensation_loss(
            out.clip_vis_dense, teacher, kernel_from_unresized_width=self.rc_kernel_from_unresized_width
        )
        terms["loss"] = set_loss + self.mask_aware_weight * terms["loss_mask_aware"] + self.rc_weight * terms["loss_rc"]
        return terms

    # ------------------------------------------------------------------ helpers
    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 or float in [0, 1] -> CLIP-normalised, on the model's device."""
        return self.model.backbone.encoder.normalize(to_unit_float(images.to(self.device)))


def crop_padding(mask_logits: Tensor, size: tuple[int, int], padded_size: tuple[int, int]) -> Tensor:
    """The part of stride-s maps over padded images that covers the unpadded ``size``.

    When ``size`` is a multiple of the stride this is a slice; otherwise the region is resampled
    (bilinear) on a ``ceil(H / s) x ceil(W / s)`` grid so that it spans exactly the image.

    Args:
        mask_logits: (B, N, H_p / s, W_p / s).
        size: (H, W) of the image before padding.
        padded_size: (H_p, W_p).
    """
    h, w = size
    hp, wp = padded_size
    stride_y, stride_x = hp / mask_logits.shape[-2], wp / mask_logits.shape[-1]
    out_h, out_w = math.ceil(h / stride_y), math.ceil(w / stride_x)
    if out_h * stride_y == h and out_w * stride_x == w:
        return mask_logits[..., :out_h, :out_w]
    # output cell centres in padded pixels -> grid_sample coordinates (align_corners=False)
    ys = (torch.arange(out_h, device=mask_logits.device, dtype=torch.float32) + 0.5) * (h / out_h)
    xs = (torch.arange(out_w, device=mask_logits.device, dtype=torch.float32) + 0.5) * (w / out_w)
    grid_y, grid_x = torch.meshgrid(2 * ys / hp - 1, 2 * xs / wp - 1, indexing="ij")
    grid = torch.stack([grid_x, grid_y], -1).unsqueeze(0).expand(mask_logits.shape[0], -1, -1, -1)
    return F.grid_sample(
        mask_logits, grid.to(mask_logits.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )


def _drop_teacher(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post hook: the RC teacher is not saved (it is rebuilt with the model)."""
    for key in [k for k in state_dict if k.startswith(prefix + TEACHER)]:
        del state_dict[key]


def _teacher_not_missing(module: nn.Module, incompatible_keys: Any) -> None:
    """Load post hook: checkpoints without the teacher load strictly."""
    missing = incompatible_keys.missing_keys
    missing[:] = [key for key in missing if not key.startswith(TEACHER) and f".{TEACHER}" not in key]
