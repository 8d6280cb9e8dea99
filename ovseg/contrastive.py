"""Image-text contrastive learning shared by the methods that train from captions.

:class:`GlobalContrastiveLoss` is CLIP's symmetric InfoNCE with a learnable temperature (SimZSS's
global loss, eq. 3 of its paper; CLIP pretraining, :mod:`ovseg.methods.clip`); :func:`module_gather`
gives a LightningModule's all-gather with gradients, so that every rank contrasts its samples with
the whole global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Gather = Callable[[Tensor], Tensor]
"""(B, ...) local tensor -> (world * B, ...) tensor of all ranks, with gradients."""


def identity_gather(tensor: Tensor) -> Tensor:
    """Single process: nothing to gather."""
    return tensor


def module_gather(module: L.LightningModule, sync_grads: bool = True) -> tuple[Gather, int]:
    """All-gather (with gradients if ``sync_grads``) across the ranks of ``module``'s trainer
    (Lightning's ``all_gather``), or the identity without a trainer or on one process; and this
    process's rank."""
    if module._trainer is None or module.trainer.world_size == 1:
        return identity_gather, 0
    return (lambda tensor: module.all_gather(tensor, sync_grads=sync_grads).flatten(0, 1)), module.global_rank


class GlobalContrastiveLoss(nn.Module):
    """Symmetric image-caption InfoNCE with a learnable temperature (CLIP's loss; SimZSS eq. 3).

    Local features are contrasted with the features of all ranks (gathered with gradients), as
    OpenCLIP's ``ClipLoss(local_loss=True, gather_with_grad=True)``; the result equals the
    single-process loss on the concatenated batch.

    Args:
        init_scale: initial logit scale (1/0.07); stored as its log.
        max_scale: the scale is clamped to at most this value (100).
    """

    def __init__(self, init_scale: float = 1 / 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.max_scale = max_scale

    def scale(self) -> Tensor:
        """The current logit scale exp(t), clamped to ``max_scale``."""
        return self.logit_scale.exp().clamp(max=self.max_scale)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the parameter itself to ln(max_scale), as OpenCLIP does after each optimizer step
        (so that it can come back down instead of drifting above the cap with zero gradient)."""
        self.logit_scale.clamp_(max=math.log(self.max_scale))

    def forward(self, image: Tensor, text: Tensor, gather: Gather = identity_gather, rank: int = 0) -> Tensor:
        """
        Args:
            image: (B, D) L2-normalised image features of this rank.
            text: (B, D) L2-normalised caption features of this rank.
            gather: all-gather with gradients across ranks.
            rank: this rank's index (its samples sit at rank*B .. rank*B+B-1 in the gather).

        Returns:
            scalar loss.
        """
        all_image, all_text = gather(image), gather(text)
        scale = self.scale()
        logits_image = scale * image @ all_text.T  # (B, world*B)
        logits_text = scale * text @ all_image.T
        targets = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        return 0.5 * (F.cross_entropy(logits_image, targets) + F.cross_entropy(logits_text, targets))
