"""Mask targets, Hungarian matching and the MaskFormer / Mask2Former set losses (ovseg/masks.py)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.benchmark import TrainingClasses
from ovseg.errors import UserError
from ovseg.masks import (
    HungarianMatcher,
    MaskSetCriterion,
    MaskTargets,
    dice_loss,
    pairwise_bce_cost,
    pairwise_dice_cost,
    pairwise_focal_cost,
    point_sample,
    semantic_targets,
    sigmoid_bce_loss,
    sigmoid_focal_loss,
    uncertain_point_coords,
)
from ovseg.vocabulary import Vocabulary


def plain_focal(logit: float, target: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    if target == 1:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def test_focal_bce_and_dice_losses_match_a_plain_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, dtype=torch.float64)
    targets = (torch.rand(3, 7) > 0.5).double()
    focal = [
        sum(plain_focal(float(logit), float(t)) for logit, t in zip(row, trow)) / 7
        for row, trow in zip(logits, targets)
    ]
    assert torch.allclose(sigmoid_focal_loss(logits, targets), torch.tensor(focal, dtype=torch.float64))
    bce = [
        sum(
            -(
                float(t) * math.log(1 / (1 + math.exp(-float(logit))))
                + (1 - float(t)) * math.log(1 - 1 / (1 + math.exp(-float(logit))))
            )
            for logit, t in zip(row, trow)
        )
        / 7
        for row, trow in zip(logits, targets)
    ]
    assert torch.allclose(sigmoid_bce_loss(logits, targets), torch.tensor(bce, dtype=torch.float64))
    probs = logits.sigmoid()
    dice = [1 - (2 * float((p * t).sum()) + 1) / (float(p.sum()) + float(t.sum()) + 1) for p, t in zip(probs, targets)]
    assert torch.allclose(dice_loss(logits, targets), torch.tensor(dice, dtype=torch.float64))


def test_pairwise_costs_equal_the_per_pair_losses():
    torch.manual_seed(1)
    logits = torch.randn(4, 9, dtype=torch.float64)
    targets = (torch.rand(3, 9) > 0.5).double()
    for pairwise, single in (
        (pairwise_focal_cost, sigmoid_focal_loss),
        (pairwise_bce_cost, sigmoid_bce_loss),
        (pairwise_dice_cost, dice_loss),
    ):
        cost = pairwise(logits, targets)
        assert cost.shape == (4, 3)
        for q, g in itertools.product(range(4), range(3)):
            assert torch.allclose(cost[q, g], single(logits[q : q + 1], targets[g : g + 1])[0])


@pytest.mark.parametrize("seed", range(6))
def test_matcher_finds_the_brute_force_optimum(seed):
    torch.manual_seed(seed)
    num_queries, num_targets = 5, 3
    class_logits = torch.randn(1, num_queries, 4)
    mask_logits = torch.randn(1, num_queries, 6, 6)
    target = MaskTargets(torch.randint(0, 3, (num_targets,)), (torch.rand(num_targets, 6, 6) > 0.5).float())
    matcher = HungarianMatcher(class_weight=1.0, mask_weight=20.0, dice_weight=1.0, mask_cost="focal")
    rows, cols = matcher(class_logits, mask_logits, [target])[0]
    cost = matcher.cost_matrix(class_logits[0], mask_logits[0], target)
    best = min(
        sum(float(cost[q, g]) for g, q in enumerate(perm))
        for perm in itertools.permutations(range(num_queries), num_targets)
    )
    assert len(rows) == num_targets and sorted(cols.tolist()) == list(range(num_targets))
    assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-5)
    # the cost matrix is the weighted sum of its terms
    prob = class_logits[0].softmax(-1)
    flat_pred, flat_gt = mask_logits[0].flatten(1), target.masks.flatten(1)
    expected = (
        -prob[:, target.labels] + 20 * pairwise_focal_cost(flat_pred, flat_gt) + pairwise_dice_cost(flat_pred, flat_gt)
    )
    assert torch.allclose(cost, expected, atol=1e-6)


def test_matcher_with_points_and_without_targets():
    torch.manual_seed(0)
    matcher = HungarianMatcher(2.0, 5.0, 5.0, mask_cost="bce", num_points=50)
    target = MaskTargets(torch.tensor([1, 0]), torch.zeros(2, 8, 8))
    empty = MaskTargets(torch.zeros(0, dtype=torch.long), torch.zeros(0, 8, 8))
    matches = matcher(torch.randn(2, 4, 3), torch.randn(2, 4, 4, 4), [target, empty])
    assert len(matches[0][0]) == 2 and len(matches[1][0]) == 0


def test_semantic_targets_one_mask_per_seen_class_and_no_unseen_pixels():
    labels = torch.tensor([[[0, 0, 2, 255], [3, 3, 2, 1]]])
    lookup = torch.tensor([0, -1, 1, 2])  # class 1 is unseen
    (target,) = semantic_targets(labels, lookup)
    assert target.labels.tolist() == [0, 1, 2]
    assert target.masks.tolist() == [
        [[1, 1, 0, 0], [0, 0, 0, 0]],
        [[0, 0, 1, 0], [0, 0, 1, 0]],
        [[0, 0, 0, 0], [1, 1, 0, 0]],
    ]


def test_training_classes_seen_names():
    classes = TrainingClasses(Vocabulary.from_names(["sky", "cow", "grass"]), ("cow",))
    assert classes.seen_indices == (0, 2) and classes.seen_names == ("sky", "grass")
    with pytest.raises(UserError, match="giraffe"):
        TrainingClasses(Vocabulary.from_names(["sky"]), ("giraffe",))


def test_point_sample_is_bilinear_at_pixel_centres():
    image = torch.arange(12.0).view(1, 1, 3, 4)
    # the centre of pixel (row 1, col 2) is at ((2 + 0.5) / 4, (1 + 0.5) / 3); halfway to its right neighbour
    coords = torch.tensor([[[2.5 / 4, 1.5 / 3], [3.0 / 4, 1.5 / 3]]])
    assert point_sample(image, coords).flatten().tolist() == pytest.approx([6.0, 6.5])


def test_uncertain_points_prefer_logits_near_zero():
    torch.manual_seed(0)
    logits = torch.full((1, 1, 16, 16), 10.0)
    logits[..., :, :8] = 0.0  # uncertain left half
    coords = uncertain_point_coords(logits, num_points=40, oversample_ratio=3.0, importance_ratio=0.75)
    assert coords.shape == (1, 40, 2)
    assert (coords[0, :30, 0] < 0.5).all()  # the 30 importance points all lie in the left half


def test_criterion_cross_entropy_weights_no_object_and_sums_layers():
    torch.manual_seed(0)
    target = MaskTargets(torch.tensor([1]), torch.ones(1, 8, 8))
    class_logits = torch.randn(1, 1, 3, 3)
    mask_logits = torch.randn(1, 1, 3, 4, 4)
    criterion = MaskSetCriterion(num_classes=2, class_weight=1.0, mask_weight=20.0, dice_weight=1.0)
    terms = criterion(class_logits, mask_logits, [target])
    rows = criterion.matcher(class_logits[0], mask_logits[0], [target])[0][0]
    expected_target = torch.full((3,), 2)
    expected_target[rows] = 1
    weights = torch.tensor([1.0, 1.0, 0.1])
    nll = -class_logits[0, 0].log_softmax(-1)[torch.arange(3), expected_target]
    ce = (weights[expected_target] * nll).sum() / weights[expected_target].sum()
    assert float(terms["loss_ce"]) == pytest.approx(float(ce), rel=1e-5)
    # mask losses: the matched prediction upsampled to the label size
    pred = F.interpolate(
        mask_logits[0, 0, rows].unsqueeze(1), size=(8, 8), mode="bilinear", align_corners=False
    ).flatten(1)
    gt = torch.ones(1, 64)
    assert float(terms["loss_mask"]) == pytest.approx(20 * float(sigmoid_focal_loss(pred, gt).sum()), rel=1e-5)
    assert float(terms["loss_dice"]) == pytest.approx(float(dice_loss(pred, gt).sum()), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(terms["loss_ce"] + terms["loss_mask"] + terms["loss_dice"]))
    # two identical layers: twice the loss
    doubled = criterion(class_logits.expand(2, -1, -1, -1), mask_logits.expand(2, -1, -1, -1, -1), [target])
    assert float(doubled["loss"]) == pytest.approx(2 * float(terms["loss"]), rel=1e-5)


def test_criterion_is_lower_for_the_right_answer_and_handles_empty_images():
    target = MaskTargets(torch.tensor([0]), torch.zeros(1, 32, 32))
    target.masks[0, :, :16] = 1
    good_masks = torch.full((1, 1, 2, 32, 32), -8.0)
    good_masks[:, :, 0, :, :16] = 8.0  # query 0 = the left half, query 1 = nothing
    good_classes = torch.tensor([[[[6.0, -6.0, -6.0], [-6.0, -6.0, 6.0]]]])  # query 0 = class 0
    bad_classes, bad_masks = -good_classes, -good_masks
    # uniform points (importance 0): with importance sampling nearly all points sit on the boundary
    for loss_kind, points in (("focal", None), ("bce", 200)):
        criterion = MaskSetCriterion(2, 2.0, 5.0, 5.0, mask_loss=loss_kind, num_points=points, importance_ratio=0.0)
        good = criterion(good_classes, good_masks, [target])["loss"]
        bad = criterion(bad_classes, bad_masks, [target])["loss"]
        assert 20 * float(good) < float(bad)
        empty = MaskTargets(torch.zeros(0, dtype=torch.long), torch.zeros(0, 8, 8))
        logits = torch.randn(1, 1, 2, 3, requires_grad=True)
        terms = criterion(logits, torch.randn(1, 1, 2, 4, 4), [empty])
        terms["loss"].backward()
        assert float(terms["loss_mask"]) == 0.0  # no mask to match: only the no-object class term
        assert float(terms["loss"]) > 0 and logits.grad.abs().sum() > 0


def test_criterion_gradients_reach_masks_through_point_sampling():
    torch.manual_seed(0)
    target = MaskTargets(torch.tensor([0, 1]), (torch.rand(2, 16, 16) > 0.5).float())
    masks = torch.randn(1, 1, 4, 8, 8, requires_grad=True)
    classes = torch.randn(1, 1, 4, 3, requires_grad=True)
    terms = MaskSetCriterion(2, 2.0, 5.0, 5.0, mask_loss="bce", num_points=64)(classes, masks, [target])
    terms["loss"].backward()
    assert masks.grad.abs().sum() > 0 and classes.grad.abs().sum() > 0
