"""The two losses on the CLIP branch of MAFT+: Representation Compensation and the mask-aware loss.

Both are the only supervision of the fine-tuned CLIP image trunk and of CDT (maftplus.md section 4:
there is no cross-entropy on the out-of-vocabulary logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ovseg.masks import MaskTargets

RC_SCALES = (1, 2, 4)


def pod_descriptor(
    features: Tensor, scales: Sequence[int] = RC_SCALES, kernel_from_unresized_width: bool = False
) -> Tensor:
    """Multi-grid pooled descriptor of a feature map (PLOP/PODNet "local POD", maftplus.md section 3).

    A non-square map is first resized (bilinear) to a square of side ``max(h, w)``; for each scale
    ``s``, ``avg_pool2d`` with kernel ``w // s`` (at least 1) gives an ``s' x s'`` grid, which is
    summed over its height and over its width; the two vectors are concatenated, without
    normalisation, and so are the scales.

    Args:
        features: (B, C, h, w).
        kernel_from_unresized_width: take ``w`` before the square resize, as the release does (on a
            portrait map, h > w, the grids are then finer than ``s x s``); ``False``: the side of
            the square, so scale ``s`` pools an ``s x s`` grid.

    Returns:
        (B, C * sum_s 2 s') descriptor.
    """
    b, c, h, w = features.shape
    if h != w:
        side = max(h, w)
        features = F.interpolate(features, size=(side, side), mode="bilinear", align_corners=False)
        w = w if kernel_from_unresized_width else side
    parts = []
    for scale in scales:
        kernel = max(w // scale, 1)
        pooled = F.avg_pool2d(features, kernel_size=kernel)  # (B, C, s', s')
        parts.append(pooled.sum(dim=2).flatten(1))  # summed over the height: (B, C * s')
        parts.append(pooled.sum(dim=3).flatten(1))  # summed over the width: (B, C * s')
    return torch.cat(parts, dim=1)


def representation_compensation_loss(
    student: Tensor, teacher: Tensor, scales: Sequence[int] = RC_SCALES, kernel_from_unresized_width: bool = False
) -> Tensor:
    """RC loss: SmoothL1 (beta 1, mean) between the POD descriptors of the ReLU'd stride-32 maps
    of the fine-tuned (student) and frozen (teacher) CLIP image trunks (maftplus.md section 3).

    Args:
        student: (B, C, h, w) ``clip_vis_dense`` of the fine-tuned trunk (with gradients).
        teacher: (B, C, h, w) the same map of the frozen copy.
        kernel_from_unresized_width: see :func:`pod_descriptor`.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    student_pod = pod_descriptor(student.float().relu(), scales, kernel_from_unresized_width)
    teacher_pod = pod_descriptor(teacher.float().relu(), scales, kernel_from_unresized_width)
    return F.smooth_l1_loss(student_pod, teacher_pod.detach(), beta=1.0)


def soft_iou(mask_probs: Tensor, gt_masks: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft IoU of every ground-truth mask with every predicted mask.

    ``IoU(g, n) = sum(p_n y_g) / (sum p_n + sum y_g - sum(p_n y_g))``, as matrix products.

    Args:
        mask_probs: (N, H, W) predicted mask probabilities.
        gt_masks: (G, H, W) binary ground truth.

    Returns:
        (G, N).
    """
    # On the CPU, BLAS splits the long pixel sum among the threads, which changes its last bits with
    # the thread count; summed in float64 and rounded, the thread count no longer shows in float32.
    dtype = torch.float64 if mask_probs.device.type == "cpu" else torch.float32
    probs = mask_probs.flatten(1).to(dtype)
    gt = gt_masks.flatten(1).to(dtype)
    intersection = gt @ probs.T  # (G, N)
    union = gt.sum(1, keepdim=True) + probs.sum(1).unsqueeze(0) - intersection
    return (intersection / union.clamp_min(eps)).float()


def mask_aware_loss(
    class_logits: Tensor,
    mask_logits: Tensor,
    targets: Sequence[MaskTargets],
    eps: float = 1e-6,
    sigmoid_before_upsampling: bool = False,
) -> Tensor:
    """MAFT's mask-aware (IoU-regression) loss ``MA_Loss`` (maftplus.md section 4).

    For every ground-truth segment g of image b (class c_g, mask Y_g): the soft IoU between
    sigmoid(M_n) (bilinearly upsampled to the ground-truth size) and Y_g, min-max normalised over
    the queries n, is the SmoothL1 target of p[b, n, c_g], p = softmax over the K training
    classes. Averaged over all (g, n) of the batch.

    Args:
        class_logits: (B, N, K) out-of-vocabulary logits of the training classes (void removed).
        mask_logits: (B, N, h, w) mask logits (detached: the loss trains the classifier only).
        targets: per image, :class:`~ovseg.masks.MaskTargets` with (G_b, H, W) masks.
        sigmoid_before_upsampling: the release's order, sigmoid at the mask resolution then
            bilinear upsampling of the probabilities; ``False``: upsample the logits, then sigmoid.

    Returns:
        scalar loss (0 with a graph to ``class_logits`` when the batch has no segment).
    """
    probs = class_logits.float().softmax(-1)
    mask_logits = mask_logits.detach()
    predictions, ious = [], []
    for b, target in enumerate(targets):  # images may have different label sizes
        if len(target.labels) == 0:
            continue
        gt = target.masks.to(mask_logits.device)
        masks = mask_logits[b : b + 1].float()
        masks = masks.sigmoid() if sigmoid_before_upsampling else masks
        masks = F.interpolate(masks, size=gt.shape[-2:], mode="bilinear", align_corners=False)[0]
        masks = masks if sigmoid_before_upsampling else masks.sigmoid()  # (N, H, W)
        iou = soft_iou(masks, gt)  # (G, N)
        low, high = iou.min(1, keepdim=True).values, iou.max(1, keepdim=True).values
        ious.append((iou - low) / (high - low).clamp_min(eps))
        predictions.append(probs[b][:, target.labels.to(probs.device)].T)  # (G, N)
    if not predictions:
        return class_logits.sum() * 0.0
    return F.smooth_l1_loss(torch.cat(predictions), torch.cat(ious), beta=1.0)
