"""A map-style torch dataset over the scenes of a :class:`SyntheticWorld`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .categories import canonical_split
from .world import SyntheticWorld


class SyntheticDataset(Dataset):
    """Scenes ``0..length-1`` of one split of a synthetic world, generated on the fly.

    Each item is a dict:
        image: (3, H, W) uint8 tensor.
        label: (H, W) int64 tensor, category indices, 255 = ignore.
        caption: one of the five captions. Validation/test: the first. Training: a random one per
            visit, drawn from torch's random generator (seeded per worker by the DataLoader, so
            runs are reproducible under ``seed_everything``).
        captions: the five captions.
        index: the scene index.

    Args:
        world: the generator (or keyword arguments for one).
        split: "train", "val" or "test" (aliases such as "train2017"/"validation" accepted).
        length: number of scenes.
        transform: optional callable applied to each item dict.
    """

    def __init__(
        self,
        world: SyntheticWorld | dict[str, Any] | None = None,
        split: str = "train",
        length: int = 1000,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if world is None:
            world = SyntheticWorld()
        elif isinstance(world, dict):
            world = SyntheticWorld(**world)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.world = world
        self.split = canonical_split(split)
        self.length = int(length)
        self.transform = transform

    @property
    def class_names(self) -> list[str]:
        return self.world.class_names

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        scene = self.world.scene(index, self.split)
        k = int(torch.randint(len(scene.captions), ())) if self.split == "train" else 0
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(scene.image.transpose(2, 0, 1))),
            "label": torch.from_numpy(scene.label.astype(np.int64)),
            "caption": scene.captions[k],
            "captions": list(scene.captions),
            "index": int(index),
        }
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        return f"SyntheticDataset(split={self.split!r}, length={self.length}, world={self.world!r})"
