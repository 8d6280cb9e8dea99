"""Pieces every DataModule shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch dict samples: tensors of one shape are stacked, anything else stays a list.

    Images of different sizes (evaluation at native resolution) therefore arrive as a list of
    (3, H_i, W_i) tensors, which :meth:`ovseg.module.OVSegModule.segment` accepts.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = samples[0].keys()
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            batch[key] = torch.stack(values)
        elif all(isinstance(v, int) for v in values):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
