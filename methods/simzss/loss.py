"""SimZSS losses: global image-caption InfoNCE and the local concept loss.

Notation and numbering follow the order of the paper's method section as summarised in
../shared/reference/simzss.md, section 2.2:

- (1) textual concept: c_t^l = g((1/|S_l|) sum_{i in S_l} z_t^i), the mean of a concept's token
  features, projected into the vision space (the text encoder's projection is g, so the mean of the
  projected tokens is the same thing);
- (2) visual concept: s = softmax_i(cos(z_v^i, q) / tau), c_v = sum_i s_i z_v^i, with the query q
  the concept's class prototype (as the official code does) and tau = 0.1;
- (3) global loss: symmetric InfoNCE between image [CLS] and caption EOT features
  (:class:`~ovseg.contrastive.GlobalContrastiveLoss`, shared with CLIP pretraining);
- (4) class prototypes: h_k = sum_j 1{q_j = k} c_t^j over the concepts of the batch, L2-normalised;
- (5) local loss: cross-entropy of softmax(s_l * normalise(c_v) . h^T) over the concepts present in
  the batch, s_l = 1/0.07 fixed;
- (6) total: L = L_g + lambda * L_l.

Switches between the paper and the official release (tileb1/simzss @2142ac5, docs/simzss.md,
"Reproducing the release"):

- ``local_target``: ``"label"`` (the paper) trains against the concept labels, ``"argmax"`` (the
  release, reference 2.3 item 6) against the argmax of its own logits;
- ``concept_pooling``: ``"mean"`` (eq. 1) averages a concept's raw token features, ``"normalized_sum"``
  (the release) L2-normalises every token feature and sums them;
- ``class_set``: ``"rank"`` classifies among the classes present on this rank, ``"global"`` (the
  release) among the classes present on any rank, a class absent from this rank having an all-zero
  prototype (logit 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.contrastive import Gather, identity_gather
from ovseg.thread_invariance import softmax as thread_invariant_softmax

CONCEPT_POOLINGS = ("mean", "normalized_sum")
CLASS_SETS = ("rank", "global")

__all__ = ["ConceptLoss", "LocalLossOutput", "gather_concepts"]


@dataclass
class LocalLossOutput:
    """Result of :class:`ConceptLoss`.

    Attributes:
        loss: scalar local loss (0, still attached to the graph, when the batch has no concept).
        accuracy: fraction of concepts whose visual concept is closest to its own prototype.
        num_concepts: number of concepts in the batch.
    """

    loss: Tensor
    accuracy: Tensor
    num_concepts: int


def gather_concepts(
    token_features: Tensor,
    labels: Tensor,
    positions: Tensor,
    mask: Tensor,
    pooling: Literal["mean", "normalized_sum"] = "mean",
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. (1): pool the token features of every valid concept of the batch (``pooling="mean"``), or
    sum the L2-normalised token features (``"normalized_sum"``, the official release).

    Args:
        token_features: (B, L, D) projected text token features.
        labels: (B, C) concept labels, -1 for padding.
        positions: (B, C, T) token positions of each concept in its caption.
        mask: (B, C, T) which positions are real.

    Returns:
        concepts (M, D) pooled token features, concept labels (M,), caption index (M,).
    """
    if pooling not in CONCEPT_POOLINGS:
        raise ValueError(f"concept_pooling must be one of {CONCEPT_POOLINGS}, got {pooling!r}")
    valid = labels >= 0  # (B, C)
    caption, slot = valid.nonzero(as_tuple=True)
    pos = positions[caption, slot]  # (M, T)
    weights = mask[caption, slot].to(token_features.dtype)  # (M, T)
    if pooling == "normalized_sum":
        token_features = F.normalize(token_features, dim=-1)
    tokens = token_features[caption[:, None], pos]  # (M, T, D)
    concepts = (tokens * weights[..., None]).sum(1)
    if pooling == "mean":
        concepts = concepts / weights.sum(1, keepdim=True).clamp(min=1)
    return concepts, labels[caption, slot], caption


class ConceptLoss(nn.Module):
    """Eqs. (2), (4), (5): the concept-level (local) loss.

    Args:
        pool_temperature: tau of the similarity pooling of patch tokens, eq. (2) (0.1).
        logit_scale: fixed scale of the concept classification logits, eq. (5) (1/0.07).
        target: ``"label"`` (the paper) or ``"argmax"`` (the official release).
        pooling: ``"mean"`` (the paper) or ``"normalized_sum"`` (the official release), see
            :func:`gather_concepts`.
        class_set: ``"rank"`` or ``"global"`` (the official release): which classes the softmax of
            eq. (5) covers on several processes (the same on one).
    """

    def __init__(
        self,
        pool_temperature: float = 0.1,
        logit_scale: float = 1 / 0.07,
        target: Literal["label", "argmax"] = "label",
        pooling: Literal["mean", "normalized_sum"] = "mean",
        class_set: Literal["rank", "global"] = "rank",
    ) -> None:
        super().__init__()
        if target not in ("label", "argmax"):
            raise ValueError(f"local target must be 'label' or 'argmax', got {target!r}")
        if pooling not in CONCEPT_POOLINGS:
            raise ValueError(f"concept_pooling must be one of {CONCEPT_POOLINGS}, got {pooling!r}")
        if class_set not in CLASS_SETS:
            raise ValueError(f"class_set must be one of {CLASS_SETS}, got {class_set!r}")
        self.pool_temperature = pool_temperature
        self.register_buffer("logit_scale", torch.tensor(logit_scale), persistent=False)
        self.target = target
        self.pooling = pooling
        self.class_set = class_set

    def forward(
        self,
        token_features: Tensor,
        patch_tokens: Tensor,
        labels: Tensor,
        positions: Tensor,
        mask: Tensor,
        gather: Gather = identity_gather,
    ) -> LocalLossOutput:
        """
        Args:
            token_features: (B, L, D) projected text token features.
            patch_tokens: (B, N, D) L2-normalised frozen patch tokens.
            labels: (B, C) concept labels (-1 = padding).
            positions: (B, C, T) token positions of each concept.
            mask: (B, C, T) valid positions.
            gather: all-gather across ranks; with ``class_set="global"`` it gathers the labels.
        """
        concepts, concept_labels, caption = gather_concepts(token_features, labels, positions, mask, self.pooling)
        if concepts.shape[0] == 0:
            zero = token_features.sum() * 0.0
            return LocalLossOutput(zero, zero.detach(), 0)
        # Eq. (4): prototypes of the classes present in the batch, summed per label.
        present, inverse = torch.unique(concept_labels, return_inverse=True)  # (P,), (M,)
        if self.class_set == "global":
            # the release: the classes present on any rank; one absent here keeps a zero prototype
            all_labels = gather(labels.detach())
            present = torch.unique(torch.cat([all_labels[all_labels >= 0], concept_labels]))
            inverse = torch.searchsorted(present, concept_labels)
        prototypes = torch.zeros(
            len(present), concepts.shape[1], dtype=concepts.dtype, device=concepts.device
        ).index_add_(0, inverse, concepts)
        prototypes = F.normalize(prototypes, dim=-1)  # (P, D)
        # Eq. (2): each concept's prototype queries the patch tokens of its own image.
        query = prototypes[inverse]  # (M, D)
        patches = patch_tokens[caption]  # (M, N, D)
        # (torch's fused softmax backward over 196 patches depends on the CPU thread count; this does not)
        attention = thread_invariant_softmax(torch.einsum("md,mnd->mn", query, patches).div(self.pool_temperature))
        visual = F.normalize(torch.einsum("mn,mnd->md", attention, patches), dim=-1)  # (M, D)
        # Eq. (5): classify visual concepts against the prototypes present in the batch.
        logits = self.logit_scale * visual @ prototypes.T  # (M, P)
        target = inverse if self.target == "label" else logits.detach().argmax(-1)
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.detach().argmax(-1) == inverse).float().mean()
        return LocalLossOutput(loss, accuracy, int(concepts.shape[0]))
