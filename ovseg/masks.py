"""Mask classification: per-class mask targets, Hungarian matching and the set losses.

Shared by the mask-classification methods (ZegFormer, the CDT variant of MAFT+). Two flavours of the
same set loss (``../shared/reference/zegformer.md`` section 2, ``maftplus.md`` section 4):

- MaskFormer (ZegFormer): mask cost and loss = sigmoid focal loss (alpha 0.25, gamma 2) + dice, on
  every pixel; predictions upsampled to the label size for the loss, labels downsampled (nearest)
  to the prediction size for the matching cost.
- Mask2Former (MAFT+): mask cost and loss = sigmoid binary cross-entropy + dice on sampled points:
  uniform random points shared by all masks of an image for the matching cost, PointRend importance
  sampling (oversample 3, importance 0.75) for the loss.

Both: class cost ``-p(c_gt)``, cross-entropy over the training classes plus "no object" (the
last logit) with the no-object class weighted by ``no_object_weight``, losses normalised by the
number of ground-truth masks (across processes), deep supervision (the same loss after every decoder
layer, each layer matched on its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

MaskLoss = Literal["focal", "bce"]


@dataclass
class MaskTargets:
    """Ground truth of one image as a set of class masks.

    Attributes:
        labels: (G,) int64 class indices in the training vocabulary.
        masks: (G, H, W) float, 1 inside the class's pixels.
    """

    labels: Tensor
    masks: Tensor


def semantic_targets(label_maps: Tensor, label_to_class: Tensor, ignore_index: int = 255) -> list[MaskTargets]:
    """One binary mask per training class present in each label map (MaskFormer's semantic mapper).

    Args:
        label_maps: (B, H, W) int64 label values.
        label_to_class: (V,) int64, the training class of each label value, -1 for classes that are
            not trained on (their pixels then belong to no mask, like ignored pixels).
        ignore_index: label value of unlabelled pixels.

    Returns:
        per image, :class:`MaskTargets` with the classes in increasing label order.
    """
    lookup = label_to_class.to(label_maps.device)
    targets = []
    for label in label_maps:
        values = label.unique()
        values = values[(values != ignore_index) & (values >= 0) & (values < len(lookup))]
        classes = lookup[values]
        keep = classes >= 0
        values, classes = values[keep], classes[keep]
        masks = (label.unsqueeze(0) == values.view(-1, 1, 1)).float()
        targets.append(MaskTargets(labels=classes, masks=masks))
    return targets


# ---------------------------------------------------------------------------- per-mask losses
def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss of each mask, averaged over its points: (N, P), (N, P) -> (N,)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1)


def sigmoid_bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of each mask, averaged over its points: (N, P), (N, P) -> (N,)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` of each mask: (N, P), (N, P) -> (N,)."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(1) + targets.sum(1)
    return 1 - (numerator + 1) / (denominator + 1)


MASK_LOSSES = {"focal": sigmoid_focal_loss, "bce": sigmoid_bce_loss}


# ---------------------------------------------------------------------------- pairwise costs
def pairwise_focal_cost(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """:func:`sigmoid_focal_loss` of every prediction against every target: (Q, P), (G, P) -> (Q, G)."""
    prob = logits.sigmoid()
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    pos = alpha * (1 - prob) ** gamma * pos
    neg = (1 - alpha) * prob**gamma * neg
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """:func:`sigmoid_bce_loss` of every prediction against every target: (Q, P), (G, P) -> (Q, G)."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """:func:`dice_loss` of every prediction against every target: (Q, P), (G, P) -> (Q, G)."""
    prob = logits.sigmoid()
    numerator = 2 * prob @ targets.T
    denominator = prob.sum(1, keepdim=True) + targets.sum(1).unsqueeze(0)
    return 1 - (numerator + 1) / (denominator + 1)


PAIRWISE_MASK_COSTS = {"focal": pairwise_focal_cost, "bce": pairwise_bce_cost}


# ---------------------------------------------------------------------------- point sampling
def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values at normalised points: (N, C, H, W), (N, P, 2) xy in [0, 1] -> (N, C, P)."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # (N, P, 1, 2) in [-1, 1]
    return F.grid_sample(inputs, grid.to(inputs.dtype), mode="bilinear", align_corners=False).squeeze(3)


def uncertain_point_coords(
    mask_logits: Tensor, num_points: int, oversample_ratio: float = 3.0, importance_ratio: float = 0.75
) -> Tensor:
    """PointRend training points: the most uncertain (|logit| smallest) of ``oversample_ratio x``
    random points, topped up with uniform random points.

    Args:
        mask_logits: (N, 1, H, W).

    Returns:
        (N, num_points, 2) xy in [0, 1].
    """
    n = mask_logits.shape[0]
    sampled = torch.rand(n, int(num_points * oversample_ratio), 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, sampled).abs().squeeze(1)  # (N, S)
    num_uncertain = int(importance_ratio * num_points)
    index = uncertainty.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    coords = sampled.gather(1, index.unsqueeze(-1).expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=mask_logits.device)], dim=1)
    return coords


# ---------------------------------------------------------------------------- matching
class HungarianMatcher(nn.Module):
    """One-to-one assignment of predicted masks to ground-truth masks (scipy's solver).

    Cost = ``class_weight * -p(c_gt) + mask_weight * mask_cost + dice_weight * dice_cost``.

    Args:
        class_weight, mask_weight, dice_weight: cost weights (ZegFormer 1 / 20 / 1, MAFT+ 2 / 5 / 5).
        mask_cost: ``"focal"`` (MaskFormer) or ``"bce"`` (Mask2Former).
        num_points: ``None``: every pixel at the prediction resolution (labels downsampled, nearest);
            an int: that many uniform random points shared by all masks of an image.
    """

    def __init__(
        self,
        class_weight: float = 1.0,
        mask_weight: float = 20.0,
        dice_weight: float = 1.0,
        mask_cost: MaskLoss = "focal",
        num_points: int | None = None,
    ) -> None:
        super().__init__()
        if mask_cost not in PAIRWISE_MASK_COSTS:
            raise ValueError(f"mask_cost must be one of {sorted(PAIRWISE_MASK_COSTS)}, got {mask_cost!r}")
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.mask_cost = mask_cost
        self.num_points = num_points

    def cost_matrix(self, class_logits: Tensor, mask_logits: Tensor, target: MaskTargets) -> Tensor:
        """(Q, G) matching cost of one image: (Q, K+1) logits, (Q, h, w) mask logits."""
        prob = class_logits.float().softmax(-1)
        cost_class = -prob[:, target.labels]
        masks = target.masks.to(mask_logits.dtype)
        if self.num_points is None:
            masks = F.interpolate(masks.unsqueeze(1), size=mask_logits.shape[-2:], mode="nearest").squeeze(1)
            pred, gt = mask_logits.flatten(1), masks.flatten(1)
        else:
            coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
            pred = point_sample(mask_logits.unsqueeze(1), coords.expand(len(mask_logits), -1, -1)).squeeze(1)
            gt = point_sample(masks.unsqueeze(1), coords.expand(len(masks), -1, -1)).squeeze(1)
        pred, gt = pred.float(), gt.float()
        cost_mask = PAIRWISE_MASK_COSTS[self.mask_cost](pred, gt)
        cost_dice = pairwise_dice_cost(pred, gt)
        return self.class_weight * cost_class + self.mask_weight * cost_mask + self.dice_weight * cost_dice

    @torch.no_grad()
    def forward(
        self, class_logits: Tensor, mask_logits: Tensor, targets: list[MaskTargets]
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image, (query indices, target indices) of the optimal assignment.

        Args:
            class_logits: (B, Q, K+1).
            mask_logits: (B, Q, h, w).
        """
        matches = []
        for logits, masks, target in zip(class_logits, mask_logits, targets):
            if len(target.labels) == 0:
                empty = torch.zeros(0, dtype=torch.long)
                matches.append((empty, empty))
                continue
            cost = self.cost_matrix(logits, masks, target).cpu().numpy()
            rows, cols = linear_sum_assignment(np.nan_to_num(cost, nan=1e6))
            matches.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return matches


def _global_mask_count(targets: list[MaskTargets], device: torch.device) -> float:
    """Number of ground-truth masks per process, averaged over processes (at least 1)."""
    count = torch.tensor(float(sum(len(t.labels) for t in targets)), device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return max(float(count), 1.0)


class MaskSetCriterion(nn.Module):
    """The MaskFormer / Mask2Former set loss with deep supervision.

    Args:
        num_classes: K, training classes (the logits have K + 1 columns, the last is no-object).
        class_weight, mask_weight, dice_weight: loss weights (and, without ``matcher``, the matcher's
            cost weights): ZegFormer 1 / 20 / 1 with focal masks; MAFT+ 2 / 5 / 5 with BCE masks.
        no_object_weight: cross-entropy weight of the no-object class (0.1).
        mask_loss: ``"focal"`` or ``"bce"``.
        num_points: ``None``: losses on every label pixel (predictions upsampled bilinearly);
            an int: PointRend importance-sampled points (12544 in Mask2Former).
        oversample_ratio, importance_ratio: point sampling (3.0, 0.75).
        matcher: a custom :class:`HungarianMatcher`.
    """

    def __init__(
        self,
        num_classes: int,
        class_weight: float = 1.0,
        mask_weight: float = 20.0,
        dice_weight: float = 1.0,
        no_object_weight: float = 0.1,
        mask_loss: MaskLoss = "focal",
        num_points: int | None = None,
        oversample_ratio: float = 3.0,
        importance_ratio: float = 0.75,
        matcher: HungarianMatcher | None = None,
    ) -> None:
        super().__init__()
        if mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {sorted(MASK_LOSSES)}, got {mask_loss!r}")
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.mask_loss = mask_loss
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_ratio = importance_ratio
        self.matcher = matcher or HungarianMatcher(class_weight, mask_weight, dice_weight, mask_loss, num_points)
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def layer_losses(
        self, class_logits: Tensor, mask_logits: Tensor, targets: list[MaskTargets], num_masks: float
    ) -> dict[str, Tensor]:
        """Unweighted ``ce``, ``mask``, ``dice`` of one decoder layer: (B, Q, K+1), (B, Q, h, w)."""
        if class_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"expected {self.num_classes + 1} class logits (classes + no-object), got {class_logits.shape[-1]}"
            )
        matches = self.matcher(class_logits, mask_logits, targets)
        device = class_logits.device
        batch_index = torch.cat([torch.full_like(rows, b) for b, (rows, _) in enumerate(matches)]).to(device)
        query_index = torch.cat([rows for rows, _ in matches]).to(device)
        target_classes = torch.full(class_logits.shape[:2], self.num_classes, dtype=torch.long, device=device)
        matched_labels = torch.cat([t.labels.to(device)[cols.to(device)] for t, (_, cols) in zip(targets, matches)])
        target_classes[batch_index, query_index] = matched_labels
        ce = F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, self.class_weights)
        if len(query_index) == 0:  # no ground-truth mask in the batch: masks get no signal
            zero = mask_logits.sum() * 0.0
            return {"ce": ce, "mask": zero, "dice": zero}
        pred = mask_logits[batch_index, query_index].unsqueeze(1)  # (N, 1, h, w)
        gt = torch.cat([t.masks.to(device)[cols.to(device)] for t, (_, cols) in zip(targets, matches)])
        gt = gt.unsqueeze(1).to(pred.dtype)  # (N, 1, H, W)
        if self.num_points is None:
            pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=False)
            pred_points, gt_points = pred.flatten(1), gt.flatten(1)
        else:
            with torch.no_grad():
                coords = uncertain_point_coords(
                    pred.detach(), self.num_points, self.oversample_ratio, self.importance_ratio
                )
                gt_points = point_sample(gt, coords).squeeze(1)
            pred_points = point_sample(pred, coords).squeeze(1)
        pred_points, gt_points = pred_points.float(), gt_points.float()
        mask = MASK_LOSSES[self.mask_loss](pred_points, gt_points).sum() / num_masks
        dice = dice_loss(pred_points, gt_points).sum() / num_masks
        return {"ce": ce, "mask": mask, "dice": dice}

    def forward(self, class_logits: Tensor, mask_logits: Tensor, targets: list[MaskTargets]) -> dict[str, Tensor]:
        """Weighted losses summed over decoder layers.

        Args:
            class_logits: (L, B, Q, K+1), one prediction per decoder layer (the last is the output).
            mask_logits: (L, B, Q, h, w).

        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice`` and their sum ``loss``.
        """
        num_masks = _global_mask_count(targets, class_logits.device)
        totals = {"ce": 0.0, "mask": 0.0, "dice": 0.0}
        for layer_class, layer_mask in zip(class_logits, mask_logits):
            for key, value in self.layer_losses(layer_class, layer_mask, targets, num_masks).items():
                totals[key] = totals[key] + value
        terms = {
            "loss_ce": self.class_weight * totals["ce"],
            "loss_mask": self.mask_weight * totals["mask"],
            "loss_dice": self.dice_weight * totals["dice"],
        }
        terms["loss"] = terms["loss_ce"] + terms["loss_mask"] + terms["loss_dice"]
        return terms  # type: ignore[return-value]
