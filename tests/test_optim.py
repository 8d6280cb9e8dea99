"""Parameter groups, learning-rate multipliers, freezing and schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ovseg.optim import (
    PolyLR,
    WarmupCosineLR,
    apply_lr_multipliers,
    freeze_by_prefix,
    parameter_groups,
    set_total_steps,
)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.backbone_head = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))


def lr_of(optimizer, name):
    for group in optimizer.param_groups:
        if name in group["names"]:
            return group["lr"], group["weight_decay"]
    raise KeyError(name)


def test_multipliers_longest_prefix_and_weight_decay_exclusions():
    model = Toy()
    groups = parameter_groups(model, {"backbone.": 0.1, "backbone.1.": 0.5})
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.2)
    apply_lr_multipliers(optimizer, scale=2.0)
    assert lr_of(optimizer, "backbone.0.weight") == pytest.approx((2e-4, 0.2))
    assert lr_of(optimizer, "backbone.0.bias") == pytest.approx((2e-4, 0.0))
    assert lr_of(optimizer, "backbone.1.weight") == pytest.approx((1e-3, 0.0))  # norm, longest prefix
    assert lr_of(optimizer, "backbone_head.weight") == pytest.approx((2e-3, 0.2))  # not "backbone."
    assert lr_of(optimizer, "logit_scale") == pytest.approx((2e-3, 0.0))
    with pytest.raises(ValueError, match="match no parameter"):
        parameter_groups(model, {"backbon.": 0.1})


def test_freezing_removes_parameters_from_the_optimizer():
    model = Toy()
    frozen = freeze_by_prefix(model, ["backbone."])
    assert set(frozen) == {"backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias"}
    names = {n for g in parameter_groups(model) for n in g["names"]}
    assert names == {"backbone_head.weight", "backbone_head.bias", "head.weight", "head.bias", "logit_scale"}
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze_by_prefix(model, ["decoder."])


def run(scheduler, optimizer, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_and_poly_schedules():
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = WarmupCosineLR(optimizer, warmup=0.2)
    set_total_steps(scheduler, 10)
    lrs = run(scheduler, optimizer, 10)
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    expected = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs[2:] == pytest.approx(expected)

    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    lrs = run(PolyLR(optimizer, power=0.9, total_steps=4), optimizer, 4)
    assert lrs == pytest.approx([(1 - k / 4) ** 0.9 for k in range(4)])


def test_scheduler_without_total_steps_fails_loudly():
    optimizer = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = WarmupCosineLR(optimizer)
    optimizer.step()
    with pytest.raises(RuntimeError, match="total_steps"):
        scheduler.step()
