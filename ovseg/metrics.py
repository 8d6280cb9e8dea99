"""Dataset-level semantic segmentation metrics built on a confusion matrix.

How the score is accumulated
----------------------------
Every benchmark in this field reports a *dataset-level* mIoU. Per-class intersections and unions
(here: one (K, K) confusion matrix) are summed over every image of the split first; only then is
IoU_c = I_c / U_c formed and averaged over classes. A mean of per-image mIoUs is a different (and
wrong) number. Pixels whose ground truth equals ``ignore_index`` are dropped before counting,
whatever the prediction there is. Counts are kept in int64, so the totals are exact.

Classes absent from the ground truth: two conventions
-----------------------------------------------------
A class can be absent from the GT of the whole split (common on A-847 and PC-459). If it is also
never predicted its IoU is 0/0 and every implementation leaves it out. The implementations differ
when such a class *is* predicted somewhere (a false-positive-only class):

* ``absent_policy="zero"`` counts its IoU as 0 in the mean. This is what mmsegmentation does
  (``np.nanmean`` over I/U, used by GroupViT, TCL, SCLIP, NACLIP, ClearCLIP and the rest of the
  training-free / caption-trained line), what torchmetrics
  ``MulticlassJaccardIndex(average="macro")`` does, and what detectron2's ``SemSegEvaluator`` did
  up to v0.6. Mask-supervised methods whose numbers come from that older evaluator (SAN pins
  detectron2 v0.6; ZegFormer and MAFT+ ship copies of the old formula) follow this convention.
* ``absent_policy="exclude"`` averages only over classes that have GT pixels. detectron2's main
  branch switched to this in July 2022; CAT-Seg and FC-CLIP install detectron2 from main, so their
  published numbers use it.

The two can differ by many points when many classes are missing from the GT, so pick the one that
matches the evaluator behind the number you are comparing against. Values are reported in percent
and not rounded (mmseg prints them rounded to two decimals, detectron2 does not round).

The pixel accuracy (``pAcc``), the class-mean accuracy (``mAcc``, over classes with GT) and the
frequency-weighted IoU (``fwIoU``, weighted by GT pixel counts) do not depend on the policy.

Zero-shot (generalised) evaluation
----------------------------------
Given the indices of the unseen classes, the per-class IoU vector of one prediction over the full
vocabulary is split into seen and unseen parts; ``mIoU_seen`` and ``mIoU_unseen`` are their means
(same absent-class policy) and ``hIoU`` is their harmonic mean, 2*s*u/(s+u), set to 0 when both
are 0.

The zero-shot margin's control (``name_swap_control``)
------------------------------------------------------
How much of the unseen mIoU do the class *names* earn? A method that scores each class against
its own names alone (every method here; ``tests/test_name_swap.py`` checks it on each) labels as
unseen class u, when u is given the names of unseen class v, exactly the pixels it labels v under
the true names. Class u's IoU then becomes C[u, v] / (|GT u| + |pred v| - C[u, v]), read off the
true names' confusion matrix C, so the control needs no second inference pass.
``mIoU_unseen_swapped`` averages that IoU over the other unseen names v != u, then over the unseen
classes as ``mIoU_unseen`` does (same policy); ``zs_margin`` = ``mIoU_unseen`` -
``mIoU_unseen_swapped``. Whenever every unseen class has ground-truth pixels (or under
``"exclude"``) this equals the mean unseen mIoU over all derangements of the unseen names (no class
keeps its own), since in a uniformly drawn derangement the names class u gets are equally likely
to be any other unseen class's. A single permutation is one draw among them: on the synthetic
world's four unseen classes, the cyclic shift ovseg used before gave one random-CLIP ZegFormer run
a margin of -8.6 where the mean over the nine derangements gives -0.3.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "AbsentPolicy",
    "confusion_matrix",
    "metrics_from_confusion",
    "unseen_miou_with_wrong_names",
    "SegmentationMetrics",
]

AbsentPolicy = Literal["zero", "exclude"]
_POLICIES: tuple[str, ...] = ("zero", "exclude")
_MAX_LISTED = 10  # how many offending label values an error message lists


def _describe_values(values: Tensor) -> str:
    """Sorted distinct values of a 1-D tensor, at most ``_MAX_LISTED`` of them, as text."""
    uniq = torch.unique(values).tolist()
    shown = ", ".join(str(v) for v in uniq[:_MAX_LISTED])
    if len(uniq) > _MAX_LISTED:
        shown += f", ... ({len(uniq)} distinct values)"
    return f"[{shown}]"


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return num_classes


def _check_policy(absent_policy: Any) -> str:
    if absent_policy not in _POLICIES:
        raise ValueError(f"absent_policy must be one of {_POLICIES}, got {absent_policy!r}")
    return absent_policy


def _check_unseen(unseen: Sequence[int], num_classes: int) -> list[int]:
    """Validated, sorted, de-duplicated list of unseen class indices."""
    out: list[int] = []
    for c in unseen:
        if isinstance(c, Tensor) and c.numel() == 1:
            c = c.item()
        if isinstance(c, bool):
            raise ValueError(f"unseen class indices must be ints, got {c!r}")
        try:
            c = operator.index(c)  # accepts numpy integers too
        except TypeError:
            raise ValueError(f"unseen class indices must be ints, got {c!r}") from None
        if not 0 <= c < num_classes:
            raise ValueError(
                f"unseen class index {c} is out of range for num_classes={num_classes} (valid: 0..{num_classes - 1})"
            )
        out.append(c)
    return sorted(set(out))


def _check_name_swap_control(unseen: Sequence[int]) -> None:
    """The zero-shot margin's control renames unseen classes among themselves: it needs two."""
    if len(unseen) < 2:
        raise ValueError(f"name_swap_control needs at least two unseen classes, got {list(unseen)}")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix of one prediction/target pair of any matching shape ((H, W), (B, H, W)).

    Args:
        pred: integer class indices, same shape as ``target``; every value must be in [0, K).
        target: integer ground-truth indices in [0, K), or ``ignore_index`` (dropped, together with
            the prediction at that pixel).
        num_classes: K.
        ignore_index: GT value that marks pixels not to be counted.

    Returns:
        (K, K) int64 on the input device; rows = ground truth, columns = prediction.

    Raises:
        ValueError: on shape mismatch, non-integer inputs, a target value outside [0, K) that is
            not ``ignore_index``, or a prediction outside [0, K).
    """
    k = _check_num_classes(num_classes)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    for name, t in (("pred", pred), ("target", target)):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(
                f"{name} must hold integer class indices, got dtype {t.dtype} "
                "(take the argmax over the class dimension first)"
            )
    # int64 before any arithmetic: uint8/uint16 labels would overflow in target * K.
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()

    bad_pred = (pred < 0) | (pred >= k)
    if bool(bad_pred.any()):
        raise ValueError(
            f"pred contains class indices outside [0, {k}) for num_classes={k}: {_describe_values(pred[bad_pred])}"
        )
    keep = target != ignore_index
    target = target[keep]
    pred = pred[keep]
    bad_target = (target < 0) | (target >= k)
    if bool(bad_target.any()):
        raise ValueError(
            f"target contains labels outside [0, {k}) that are not ignore_index={ignore_index} "
            f"(num_classes={k}): {_describe_values(target[bad_target])}"
        )
    counts = torch.bincount(target * k + pred, minlength=k * k)
    return counts.reshape(k, k)


def _mean_iou(iou: Tensor, has_gt: Tensor, absent_policy: str) -> Tensor:
    """Mean of ``iou`` (NaN = 0/0) under the policy; NaN when nothing qualifies. Shapes (n,)."""
    if absent_policy == "exclude":
        iou = torch.where(has_gt, iou, torch.full_like(iou, float("nan")))
    return torch.nanmean(iou)


def unseen_miou_with_wrong_names(conf: Tensor, unseen: Sequence[int], absent_policy: AbsentPolicy = "zero") -> Tensor:
    """Unseen mIoU had each unseen class been read under another unseen class's names, averaged
    over which one (the zero-shot margin's control; see the module docstring).

    Args:
        conf: (K, K) counts of the true names' predictions (rows = GT, cols = prediction).
        unseen: indices of the unseen classes, at least two.
        absent_policy: as :func:`metrics_from_confusion`.

    Returns:
        float64 scalar in percent: mean over unseen u of the mean over unseen v != u of
        C[u, v] / (|GT u| + |pred v| - C[u, v]) (0/0 pairs left out).
    """
    policy = _check_policy(absent_policy)
    unseen_idx = _check_unseen(unseen, conf.shape[0])
    _check_name_swap_control(unseen_idx)
    conf = conf.detach().cpu().to(torch.float64)
    index = torch.tensor(unseen_idx)
    pos_gt = conf.sum(dim=1)[index]  # (U,)
    pos_pred = conf.sum(dim=0)[index]  # (U,)
    hits = conf[index][:, index]  # (U, U): GT u predicted as v
    pair_iou = hits / (pos_gt[:, None] + pos_pred[None, :] - hits)  # (U, U) class u named as v; 0/0 -> NaN
    pair_iou.fill_diagonal_(float("nan"))  # a class never keeps its own names
    per_class = torch.nanmean(pair_iou, dim=1)  # (U,) NaN where no pair counts
    return _mean_iou(per_class, pos_gt > 0, policy) * 100


def metrics_from_confusion(
    conf: Tensor,
    absent_policy: AbsentPolicy = "zero",
    unseen: Sequence[int] = (),
    name_swap_control: bool = False,
) -> dict[str, Tensor]:
    """Segmentation metrics from a (K, K) confusion matrix (rows = GT, cols = prediction).

    Args:
        conf: (K, K) non-negative counts accumulated over the whole dataset.
        absent_policy: "zero" (mmseg / torchmetrics / detectron2 v0.6: a class predicted but
            absent from the GT counts as IoU 0) or "exclude" (detectron2 main: only classes with
            GT pixels are averaged). Classes absent from both GT and prediction never count.
        unseen: indices of unseen classes; when non-empty, seen/unseen mIoU and hIoU are added.
        name_swap_control: also add ``mIoU_unseen_swapped`` (:func:`unseen_miou_with_wrong_names`)
            and ``zs_margin`` = ``mIoU_unseen`` - ``mIoU_unseen_swapped``; needs two unseen classes.

    Returns:
        float64 tensors in percent (x100, unrounded): ``IoU`` (K,) with NaN for classes with no
        GT and no prediction; scalars ``mIoU``, ``pAcc``, ``mAcc``, ``fwIoU`` and, with
        ``unseen``, ``mIoU_seen``, ``mIoU_unseen``, ``hIoU`` (and the two control keys). A mean
        over no classes is NaN.
    """
    policy = _check_policy(absent_policy)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] < 1:
        raise ValueError(f"conf must be a non-empty square (K, K) matrix, got {tuple(conf.shape)}")
    k = conf.shape[0]
    unseen_idx = _check_unseen(unseen, k)

    conf = conf.detach()
    if conf.device.type == "mps":  # no float64 there
        conf = conf.cpu()
    conf = conf.to(torch.float64)
    tp = conf.diagonal()
    pos_gt = conf.sum(dim=1)
    pos_pred = conf.sum(dim=0)
    union = pos_gt + pos_pred - tp
    has_gt = pos_gt > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=conf.device)

    iou = tp / union  # 0/0 -> NaN for classes absent from both GT and prediction
    acc = tp / pos_gt  # NaN where there is no GT
    total_gt = pos_gt.sum()

    out: dict[str, Tensor] = {"IoU": iou * 100}
    out["mIoU"] = _mean_iou(iou, has_gt, policy) * 100
    out["pAcc"] = (tp.sum() / total_gt if total_gt > 0 else nan) * 100
    out["mAcc"] = torch.nanmean(acc) * 100
    if total_gt > 0:
        out["fwIoU"] = (iou[has_gt] * pos_gt[has_gt]).sum() / total_gt * 100
    else:
        out["fwIoU"] = nan * 100

    if unseen_idx:
        is_unseen = torch.zeros(k, dtype=torch.bool, device=conf.device)
        is_unseen[unseen_idx] = True
        s = _mean_iou(iou[~is_unseen], has_gt[~is_unseen], policy) * 100
        u = _mean_iou(iou[is_unseen], has_gt[is_unseen], policy) * 100
        denom = s + u
        h = torch.where(denom == 0, torch.zeros_like(denom), 2 * s * u / denom)
        out["mIoU_seen"] = s
        out["mIoU_unseen"] = u
        out["hIoU"] = h
    if name_swap_control:
        swapped = unseen_miou_with_wrong_names(conf, unseen_idx, policy).to(conf.device)
        out["mIoU_unseen_swapped"] = swapped
        out["zs_margin"] = out["mIoU_unseen"] - swapped
    return out


class SegmentationMetrics(Metric):
    """Dataset-level mIoU / pAcc / mAcc / fwIoU (and seen/unseen/hIoU) as a torchmetrics Metric.

    State: ``confmat`` (K, K) int64, rows = GT, cols = prediction, summed across processes under
    DDP; ``name_swap_control`` adds the zero-shot margin (:func:`unseen_miou_with_wrong_names`).
    ``update(pred, target)`` takes (H, W) or (B, H, W) integer tensors; ``compute()`` returns
    :func:`metrics_from_confusion` of the accumulated matrix.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        absent_policy: AbsentPolicy = "zero",
        unseen_classes: Sequence[int] = (),
        name_swap_control: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes = _check_num_classes(num_classes)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.absent_policy = _check_policy(absent_policy)
        self.unseen_classes = tuple(_check_unseen(unseen_classes, self.num_classes))
        if name_swap_control:
            _check_name_swap_control(self.unseen_classes)
        self.name_swap_control = name_swap_control
        self.add_state(
            "confmat",
            default=torch.zeros(self.num_classes, self.num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch: ``pred``, ``target`` (H, W) or (B, H, W) integer class indices."""
        if pred.ndim not in (2, 3) or target.ndim not in (2, 3):
            raise ValueError(
                "pred and target must be (H, W) or (B, H, W) integer tensors, got shapes "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        conf = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.confmat += conf.to(self.confmat.device)

    def compute(self) -> dict[str, Tensor]:
        """Metrics of everything seen since the last reset (see :func:`metrics_from_confusion`)."""
        return metrics_from_confusion(self.confmat, self.absent_policy, self.unseen_classes, self.name_swap_control)
