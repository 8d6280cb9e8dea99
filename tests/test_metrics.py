"""Tests for ovseg.metrics: dataset-level confusion-matrix mIoU in both absent-class conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.utilities.data import dim_zero_sum

from ovseg.metrics import SegmentationMetrics, confusion_matrix, metrics_from_confusion

IGNORE = 255
K = 8
GT_CLASSES = 6  # GT uses classes 0..5
FP_ONLY = 6  # predicted on valid pixels, never in the GT
ABSENT = 7  # never in the GT; predicted only on ignored pixels, so it must stay absent
SIZES = [(17, 23), (32, 32), (9, 41), (25, 13), (40, 30), (11, 11)]


def _make_dataset(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pred, target) pairs of different sizes: ~10% ignored, ~30% label noise, skewed classes."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i, (h, w) in enumerate(SIZES):
        # Skew the class distribution per image so per-image and dataset-level means differ.
        probs = torch.rand(GT_CLASSES, generator=g) ** 3 + 0.02
        probs[i % GT_CLASSES] += 1.0
        target = torch.multinomial(probs, h * w, replacement=True, generator=g).reshape(h, w)
        pred = target.clone()
        noise = torch.rand(h, w, generator=g) < 0.3
        pred[noise] = torch.randint(0, FP_ONLY + 1, (int(noise.sum()),), generator=g)
        ignored = torch.rand(h, w, generator=g) < 0.1
        target[ignored] = IGNORE
        # Predictions on ignored pixels: include the never-valid class ABSENT.
        pred[ignored] = torch.where(
            torch.rand(int(ignored.sum()), generator=g) < 0.5,
            torch.full((int(ignored.sum()),), ABSENT),
            torch.randint(0, K, (int(ignored.sum()),), generator=g),
        )
        data.append((pred, target))
    return data


# ----------------------------------------------------------------------------- numpy oracles
def _mmseg_areas(pred: np.ndarray, gt: np.ndarray, k: int, ignore: int = IGNORE):
    """mmseg-style intersect_and_union for one image: (I, U, area_pred, area_gt), each (K,)."""
    mask = gt != ignore
    p, t = pred[mask], gt[mask]
    inter = p[p == t]
    area_i = np.histogram(inter, bins=k, range=(0, k - 1))[0]
    area_p = np.histogram(p, bins=k, range=(0, k - 1))[0]
    area_t = np.histogram(t, bins=k, range=(0, k - 1))[0]
    return area_i, area_p + area_t - area_i, area_p, area_t


def _numpy_totals(data, k: int = K):
    tot_i = np.zeros(k, np.int64)
    tot_u = np.zeros(k, np.int64)
    tot_p = np.zeros(k, np.int64)
    tot_t = np.zeros(k, np.int64)
    for pred, target in data:
        i, u, p, t = _mmseg_areas(pred.numpy(), target.numpy(), k)
        tot_i += i
        tot_u += u
        tot_p += p
        tot_t += t
    return tot_i, tot_u, tot_p, tot_t


def _mmseg_miou(data, k: int = K) -> float:
    """mmseg: per-image histograms summed, IoU = I/U, nanmean (fraction, not percent)."""
    tot_i, tot_u, _, _ = _numpy_totals(data, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tot_i / tot_u
    return float(np.nanmean(iou))


def _d2_main_miou(data, k: int = K) -> float:
    """detectron2 main: mean IoU over classes with pos_gt > 0 and union > 0."""
    tot_i, tot_u, _, tot_t = _numpy_totals(data, k)
    valid = (tot_t > 0) & (tot_u > 0)
    return float(np.mean(tot_i[valid] / tot_u[valid]))


def _d2_v06_miou(data, k: int = K) -> float:
    """detectron2 v0.6: sum(IoU over classes with GT) / #classes with GT or prediction."""
    tot_i, tot_u, tot_p, tot_t = _numpy_totals(data, k)
    has_gt = tot_t > 0
    return float(np.sum(tot_i[has_gt] / tot_u[has_gt]) / np.sum((tot_t + tot_p) > 0))


def _accumulate(data, **kwargs) -> SegmentationMetrics:
    m = SegmentationMetrics(K, ignore_index=IGNORE, **kwargs)
    for pred, target in data:
        m.update(pred, target)
    return m


# ----------------------------------------------------------------------------- random data
def test_dataset_has_intended_structure():
    data = _make_dataset()
    conf = _accumulate(data).confmat
    gt = conf.sum(1)
    pr = conf.sum(0)
    assert gt[FP_ONLY] == 0 and pr[FP_ONLY] > 0
    assert gt[ABSENT] == 0 and pr[ABSENT] == 0
    # ABSENT is predicted on ignored pixels, which must not count.
    assert any(bool((p[t == IGNORE] == ABSENT).any()) for p, t in data)
    assert bool((gt[:GT_CLASSES] > 0).all())


def test_zero_policy_matches_torchmetrics_and_mmseg():
    data = _make_dataset()
    out = _accumulate(data, absent_policy="zero").compute()

    jac = MulticlassJaccardIndex(num_classes=K, ignore_index=IGNORE, average="macro")
    jac_w = MulticlassJaccardIndex(num_classes=K, ignore_index=IGNORE, average="weighted")
    acc = MulticlassAccuracy(num_classes=K, ignore_index=IGNORE, average="micro")
    for pred, target in data:
        for m in (jac, jac_w, acc):
            m.update(pred.reshape(-1), target.reshape(-1))

    assert out["mIoU"].item() / 100 == pytest.approx(jac.compute().item(), abs=1e-6)
    assert out["fwIoU"].item() / 100 == pytest.approx(jac_w.compute().item(), abs=1e-6)
    assert out["pAcc"].item() / 100 == pytest.approx(acc.compute().item(), abs=1e-6)
    assert out["mIoU"].item() / 100 == pytest.approx(_mmseg_miou(data), abs=1e-6)
    assert out["mIoU"].item() / 100 == pytest.approx(_d2_v06_miou(data), abs=1e-6)

    # Per-class IoU: 0 for the false-positive-only class, NaN for the absent class.
    tot_i, tot_u, tot_p, tot_t = _numpy_totals(data)
    iou = out["IoU"]
    assert iou.shape == (K,) and iou.dtype == torch.float64
    assert iou[FP_ONLY].item() == 0.0
    assert math.isnan(iou[ABSENT].item())
    np.testing.assert_allclose(
        iou[: FP_ONLY + 1].numpy() / 100, tot_i[: FP_ONLY + 1] / tot_u[: FP_ONLY + 1], atol=1e-12
    )
    # mAcc (numpy): mean over classes with GT of tp / gt.
    has_gt = tot_t > 0
    assert out["mAcc"].item() / 100 == pytest.approx(float(np.mean(tot_i[has_gt] / tot_t[has_gt])), abs=1e-12)


def test_exclude_policy_matches_detectron2_main():
    data = _make_dataset()
    zero = _accumulate(data, absent_policy="zero").compute()
    excl = _accumulate(data, absent_policy="exclude").compute()
    assert excl["mIoU"].item() / 100 == pytest.approx(_d2_main_miou(data), abs=1e-6)
    # The conventions must really disagree on this data, or the test could not tell them apart.
    assert excl["mIoU"].item() - zero["mIoU"].item() > 1.0
    # Exclude = zero * n_union / n_gt (FP-only IoU is 0), checked independently.
    n_union, n_gt = GT_CLASSES + 1, GT_CLASSES
    assert excl["mIoU"].item() == pytest.approx(zero["mIoU"].item() * n_union / n_gt, abs=1e-9)
    # The policy does not touch the other metrics.
    for key in ("pAcc", "mAcc", "fwIoU"):
        assert excl[key].item() == zero[key].item()
    torch.testing.assert_close(excl["IoU"], zero["IoU"], equal_nan=True)


def test_accumulation_is_dataset_level():
    data = _make_dataset()
    acc = _accumulate(data).confmat
    # One confusion matrix on the concatenation of all pixels.
    all_pred = torch.cat([p.reshape(-1) for p, _ in data])
    all_target = torch.cat([t.reshape(-1) for _, t in data])
    torch.testing.assert_close(acc, confusion_matrix(all_pred, all_target, K))
    # A mean of per-image mIoUs is a different number.
    dataset_miou = metrics_from_confusion(acc)["mIoU"].item()
    per_image = [metrics_from_confusion(confusion_matrix(p, t, K))["mIoU"].item() for p, t in data]
    assert abs(dataset_miou - float(np.mean(per_image))) > 0.5


def test_batched_update_equals_per_image_updates():
    data = _make_dataset()
    per_image = _accumulate(data).confmat
    batched = SegmentationMetrics(K)
    for pred, target in data:
        # (2, H, W): the image and its vertical flip, which has the same confusion matrix.
        batched.update(torch.stack([pred, pred.flip(0)]), torch.stack([target, target.flip(0)]))
    torch.testing.assert_close(batched.confmat, 2 * per_image)


# ----------------------------------------------------------------------------- hand-worked example
#   GT row \ pred col   0  1  2  3  4
#   0                   3  1  .  .  .
#   1                   1  2  .  .  .
#   2                   .  .  1  1  .
#   3 (FP only)         .  .  .  .  .
#   4 (absent)          .  .  .  .  .
# plus two ignored pixels predicted as 4 and 0.
# tp = [3,2,1,0,0], gt = [4,3,2,0,0], pred = [4,3,1,1,0], union = [5,4,2,1,0]
# IoU = [60, 50, 50, 0, NaN]
HAND_TARGET = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 255, 255]])
HAND_PRED = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 2, 3, 4, 0]])
HAND_CONF = torch.tensor([[3, 1, 0, 0, 0], [1, 2, 0, 0, 0], [0, 0, 1, 1, 0], [0] * 5, [0] * 5], dtype=torch.long)


def test_hand_confusion_matrix():
    conf = confusion_matrix(HAND_PRED, HAND_TARGET, 5)
    assert conf.dtype == torch.int64
    torch.testing.assert_close(conf, HAND_CONF)


@pytest.mark.parametrize(
    ("policy", "miou", "seen", "unseen", "hiou"),
    [
        # zero: mean(60, 50, 50, 0) = 40; unseen {2,3,4}: mean(50, 0) = 25; h = 2*55*25/80
        ("zero", 40.0, 55.0, 25.0, 34.375),
        # exclude: mean(60, 50, 50) = 160/3; unseen: class 2 only = 50; h = 2*55*50/105
        ("exclude", 160.0 / 3.0, 55.0, 50.0, 5500.0 / 105.0),
    ],
)
def test_hand_metrics(policy, miou, seen, unseen, hiou):
    m = SegmentationMetrics(5, absent_policy=policy, unseen_classes=[2, 3, 4])
    m.update(HAND_PRED, HAND_TARGET)
    out = m.compute()
    iou = out["IoU"]
    assert iou[:4].tolist() == pytest.approx([60.0, 50.0, 50.0, 0.0], abs=1e-12)
    assert math.isnan(iou[4].item())
    assert out["mIoU"].item() == pytest.approx(miou, abs=1e-12)
    assert out["pAcc"].item() == pytest.approx(600.0 / 9.0, abs=1e-12)
    assert out["mAcc"].item() == pytest.approx(100.0 * 23.0 / 36.0, abs=1e-12)  # (3/4+2/3+1/2)/3
    assert out["fwIoU"].item() == pytest.approx(490.0 / 9.0, abs=1e-12)  # (.6*4+.5*3+.5*2)/9
    assert out["mIoU_seen"].item() == pytest.approx(seen, abs=1e-12)
    assert out["mIoU_unseen"].item() == pytest.approx(unseen, abs=1e-12)
    assert out["hIoU"].item() == pytest.approx(hiou, abs=1e-12)
    for key in ("mIoU", "pAcc", "mAcc", "fwIoU", "mIoU_seen", "mIoU_unseen", "hIoU"):
        assert out[key].dtype == torch.float64 and out[key].ndim == 0


def test_no_split_keys_without_unseen():
    out = metrics_from_confusion(HAND_CONF)
    assert set(out) == {"IoU", "mIoU", "pAcc", "mAcc", "fwIoU"}


def test_hiou_is_zero_when_both_zero():
    conf = confusion_matrix(torch.tensor([[1, 0]]), torch.tensor([[0, 1]]), 2)
    out = metrics_from_confusion(conf, unseen=[1])
    assert out["mIoU_seen"].item() == 0.0 and out["mIoU_unseen"].item() == 0.0
    assert out["hIoU"].item() == 0.0


# ----------------------------------------------------------------------------- ignore / validation
def test_ignored_pixels_never_count():
    target = torch.full((4, 4), IGNORE)
    target[0, 0] = 1
    pred = torch.full((4, 4), 2)
    pred[0, 0] = 1
    conf = confusion_matrix(pred, target, 3)
    expected = torch.zeros(3, 3, dtype=torch.long)
    expected[1, 1] = 1
    torch.testing.assert_close(conf, expected)
    out = metrics_from_confusion(conf)
    assert out["mIoU"].item() == 100.0  # class 2 was predicted only on ignored pixels
    assert math.isnan(out["IoU"][2].item())


def test_uint8_labels_and_custom_ignore_index():
    data = _make_dataset(seed=1)
    for pred, target in data:
        ref = confusion_matrix(pred, target, K)
        # uint8 storage must not overflow in target * K.
        conf_u8 = confusion_matrix(pred.to(torch.uint8), target.to(torch.uint8), K)
        torch.testing.assert_close(conf_u8, ref)
        # detectron2-style 65535 ignore in int32.
        t65 = target.to(torch.int32).masked_fill(target == IGNORE, 65535)
        torch.testing.assert_close(confusion_matrix(pred.to(torch.int32), t65, K, 65535), ref)


@pytest.mark.parametrize(
    ("pred", "target", "needle"),
    [
        (torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]), "[3]"),  # target == K
        (torch.tensor([0, 1, 2]), torch.tensor([0, -1, 254]), "[-1, 254]"),
        (torch.tensor([0, 3, 2]), torch.tensor([0, 1, 2]), "[3]"),  # pred == K
        (torch.tensor([0, -2, 2]), torch.tensor([0, 1, 2]), "[-2]"),
        (torch.tensor([0, 7, 2]), torch.tensor([0, 255, 2]), "[7]"),  # pred bad on ignored pixel
    ],
)
def test_out_of_range_labels_raise(pred, target, needle):
    with pytest.raises(ValueError) as exc:
        confusion_matrix(pred, target, 3)
    msg = str(exc.value)
    assert needle in msg and "3" in msg
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError):
        m.update(pred[None], target[None])


def test_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 2)
    m = SegmentationMetrics(2)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        bad = torch.zeros(1, 1, 2, 3, dtype=torch.long)
        m.update(bad, bad)


def test_argument_validation():
    with pytest.raises(ValueError, match="absent_policy"):
        SegmentationMetrics(5, absent_policy="exclude_absent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="absent_policy"):
        metrics_from_confusion(HAND_CONF, absent_policy="mmseg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        SegmentationMetrics(5, unseen_classes=[1, 5])
    with pytest.raises(ValueError, match="out of range"):
        SegmentationMetrics(5, unseen_classes=[-1])
    with pytest.raises(ValueError, match="out of range"):
        metrics_from_confusion(HAND_CONF, unseen=[9])
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(0)
    with pytest.raises(ValueError, match="square"):
        metrics_from_confusion(torch.zeros(2, 3, dtype=torch.long))
    assert SegmentationMetrics(5, unseen_classes=np.array([4, 2, 2])).unseen_classes == (2, 4)


# ----------------------------------------------------------------------------- DDP-safe state
def test_state_is_sum_reduced_and_mergeable():
    data = _make_dataset()
    whole = _accumulate(data)
    assert whole._reductions["confmat"] is dim_zero_sum
    assert type(whole).full_state_update is False
    assert whole.confmat.dtype == torch.int64 and whole.confmat.shape == (K, K)

    first, second = SegmentationMetrics(K), SegmentationMetrics(K)
    for pred, target in data[:3]:
        first.update(pred, target)
    for pred, target in data[3:]:
        second.update(pred, target)
    # What a DDP all-reduce with dist_reduce_fx="sum" does to the states.
    torch.testing.assert_close(first.confmat + second.confmat, whole.confmat)
    first.merge_state(second)
    torch.testing.assert_close(first.confmat, whole.confmat)
    torch.testing.assert_close(first.compute()["mIoU"], whole.compute()["mIoU"])

    whole.reset()
    assert int(whole.confmat.sum()) == 0
