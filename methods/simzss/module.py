"""SimZSS Lightning glue: the three hooks of :class:`~ovseg.module.OVSegModule`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.concepts import ConceptBank, ConceptExtractor
from ovseg.contrastive import GlobalContrastiveLoss, module_gather
from ovseg.encoders.base import ImageEncoder, TextEncoder
from ovseg.methods.simzss.loss import ConceptLoss
from ovseg.methods.simzss.model import FrozenImageFeatures, SimZSSModel
from ovseg.module import OVSegModule, to_unit_float
from ovseg.vocabulary import Prompt, Vocabulary

CONCEPT_KEYS = ("concept_labels", "concept_token_positions", "concept_token_mask")


class SimZSS(OVSegModule):
    """SimZSS (Stegmueller et al., ICLR 2025): a text encoder trained from captions to align with
    a frozen, spatially aware vision backbone, with a global and a concept-level loss.

    Args:
        image_encoder: the frozen backbone (DINOv2 ViT-B/14 with registers in the paper).
        text_encoder: the trainable text encoder (CLIP-style, 12 x 512, projected to the backbone
            width).
        lambda_local: weight of the concept loss, eq. (6) (0.05; 0 is the LiT baseline).
        pool_temperature: tau of the concept pooling, eq. (2) (0.1).
        local_logit_scale: fixed scale of the concept logits, eq. (5) (1/0.07).
        init_logit_scale: initial learnable scale of the global loss (1/0.07).
        max_logit_scale: cap of the global scale (100).
        local_target: ``"label"`` (the paper) or ``"argmax"`` (the official release: the argmax of
            its own logits is the cross-entropy target).
        concept_pooling: ``"mean"`` of a concept's raw token features (the paper, eq. 1) or
            ``"normalized_sum"`` of its L2-normalised token features (the official release).
        class_set: on several processes, the concept softmax of eq. (5) covers the classes present
            on this ``"rank"``, or on any rank (``"global"``, the official release, where a class
            absent from this rank enters with logit 0). The same on one process.
        class_embedding: how a class name in a prompt becomes its embedding: ``"eot"``, the
            end-of-text feature (the official release's ``embed_words``), or ``"concept"``, the mean
            of the name's own token features, i.e. the textual concept of eq. (1) that the concept
            loss aligns with patch tokens. A small text tower trained briefly routes that alignment
            into the EOT token only weakly (see the README's synthetic-world figures).
        concept_bank: concept bank file (default: the bank shipped with ovseg).
        concept_rules: how captions become concepts: ``"ovseg"`` (falls back to the head noun when a
            compound is not in the bank) or ``"release"`` (the official release's rules, see
            :mod:`ovseg.concepts`).
        **kwargs: optimizer, scheduler and evaluation options of :class:`OVSegModule`.
    """

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        lambda_local: float = 0.05,
        pool_temperature: float = 0.1,
        local_logit_scale: float = 1 / 0.07,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        local_target: Literal["label", "argmax"] = "label",
        concept_pooling: Literal["mean", "normalized_sum"] = "mean",
        class_set: Literal["rank", "global"] = "rank",
        class_embedding: Literal["eot", "concept"] = "eot",
        concept_bank: str | None = None,
        concept_rules: Literal["ovseg", "release"] = "ovseg",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = SimZSSModel(image_encoder, text_encoder)
        self.global_loss = GlobalContrastiveLoss(init_logit_scale, max_logit_scale)
        self.local_loss = ConceptLoss(pool_temperature, local_logit_scale, local_target, concept_pooling, class_set)
        self.lambda_local = lambda_local
        if class_embedding not in ("eot", "concept"):
            raise ValueError(f"class_embedding must be 'eot' or 'concept', got {class_embedding!r}")
        self.class_embedding = class_embedding
        self.concept_bank = ConceptBank(concept_bank)  # read now: a wrong path fails at once
        self.concept_rules = concept_rules
        self._concepts: ConceptExtractor | None = None  # built on first use: inference needs no NLTK
        self._concept_cache: dict[str, dict[str, Tensor]] = {}

    @property
    def concepts(self) -> ConceptExtractor:
        """The caption concept extractor (NLTK's tagger), built when training first needs it."""
        if self._concepts is None:
            self._concepts = ConceptExtractor(
                self.concept_bank, context_length=self.model.text_encoder.context_length, rules=self.concept_rules
            )
        return self._concepts

    # ---------------------------------------------------------------- hooks
    def encode_text(self, texts: list[str]) -> Tensor:
        """Texts -> (N, D) normalised EOT features."""
        return F.normalize(self.model.text_encoder.encode_texts(texts).pooled, dim=-1)

    def encode_prompts(self, prompts: list[Prompt]) -> Tensor:
        """(N, D) normalised embeddings: the EOT feature, or the mean feature of the name's tokens."""
        if self.class_embedding == "eot":
            return super().encode_prompts(prompts)
        encoder = self.model.text_encoder
        token_ids = encoder.tokenize([prompt.text for prompt in prompts]).to(self.device)
        mask = name_token_mask(prompts, token_ids, encoder.bpe_tokenizer).to(self.device)
        tokens = encoder(token_ids).tokens  # (N, L, D)
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        return F.normalize((tokens * weights).sum(1) / weights.sum(1), dim=-1)

    def predict_scores(self, images: Tensor, text_embeddings: Tensor, vocabulary: Vocabulary | None = None) -> Tensor:
        """Cosine between normalised patch tokens and class embeddings, times the logit scale.

        Returns:
            (B, Q, h, w) logits on the backbone's patch grid.
        """
        features = self.model.encode_image(images)
        height, width = features.grid
        logits = self.global_loss.scale() * features.patches @ text_embeddings.T.to(features.patches)
        return logits.transpose(1, 2).reshape(images.shape[0], -1, height, width)

    def concept_batch(self, captions: list[str]) -> dict[str, Tensor]:
        """Concepts of captions extracted on the fly (cached per caption), as padded tensors."""
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self._concept_cache]
        if len(self._concept_cache) + len(missing) > 200_000:
            self._concept_cache.clear()
        self._concept_cache.update({caption: self.concepts.encode(caption) for caption in missing})
        encoded = [self._concept_cache[caption] for caption in captions]
        return {key: torch.stack([e[key] for e in encoded]).to(self.device) for key in CONCEPT_KEYS}

    def training_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Eq. (6): L = L_g + lambda L_l on a batch of images and captions."""
        captions = list(batch["caption"])
        concepts = (
            {key: batch[key] for key in CONCEPT_KEYS}
            if all(k in batch for k in CONCEPT_KEYS)
            else self.concept_batch(captions)
        )
        image = self.frozen_features(batch)
        text = self.model.encode_text(self.model.text_encoder.tokenize(captions).to(self.device))
        gather, rank = self._gather()
        global_loss = self.global_loss(image.pooled, F.normalize(text.pooled, dim=-1), gather, rank)
        terms = {"loss_global": global_loss, "logit_scale": self.global_loss.scale().detach()}
        loss = global_loss
        if self.lambda_local > 0:
            local = self.local_loss(
                text.tokens,
                image.patches,
                concepts["concept_labels"],
                concepts["concept_token_positions"],
                concepts["concept_token_mask"],
                self._gather(sync_grads=False)[0],
            )
            loss = loss + self.lambda_local * local.loss
            terms.update(
                loss_local=local.loss,
                concept_accuracy=local.accuracy,
                concepts_per_caption=torch.tensor(local.num_concepts / len(captions)),
            )
        terms["loss"] = loss
        return terms

    def frozen_features(self, batch: Mapping[str, Any]) -> FrozenImageFeatures:
        """The backbone's features of a batch: read from ``batch["patches"]`` / ``batch["pooled"]``
        when present (a feature store, see :mod:`ovseg.datamodules.feature_store`; no image
        needed), else computed from ``batch["image"]``."""
        if "patches" in batch and "pooled" in batch:
            patches = F.normalize(batch["patches"].to(self.device, torch.float32), dim=-1)
            pooled = F.normalize(batch["pooled"].to(self.device, torch.float32), dim=-1)
            side = round(patches.shape[1] ** 0.5)
            grid = (side, patches.shape[1] // side) if side * side == patches.shape[1] else (1, patches.shape[1])
            return FrozenImageFeatures(patches, grid, pooled)
        return self.model.encode_image(to_unit_float(batch["image"]))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.global_loss.clamp_()

    def _gather(self, sync_grads: bool = True):
        """All-gather (with gradients if ``sync_grads``) across ranks, and this process's rank
        (:func:`ovseg.contrastive.module_gather`)."""
        return module_gather(self, sync_grads)


def name_token_mask(prompts: list[Prompt], token_ids: Tensor, bpe_tokenizer: Any) -> Tensor:
    """(N, L) bool: the positions of each prompt's class-name tokens in its token ids.

    The name is found where the template puts it (the BPE tokens of the template's prefix come
    first, after the start token) and must tokenize there exactly as on its own; a template that
    glues the name to other characters (``"{}s"``) or a name past the context length is an error.
    """
    mask = torch.zeros(token_ids.shape, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        prefix = prompt.template.split("{}")[0]
        start = 1 + len(bpe_tokenizer.encode(prefix))
        name = bpe_tokenizer.encode(prompt.name)
        found = token_ids[row, start : start + len(name)].tolist()
        if found != name:
            raise ValueError(
                f"class name {prompt.name!r} is not a separate word in template {prompt.template!r} "
                "(or is cut by the context length): use class_embedding 'eot' or another template"
            )
        mask[row, start : start + len(name)] = True
    return mask
