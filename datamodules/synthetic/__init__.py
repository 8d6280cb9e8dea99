"""The synthetic world: procedurally generated scenes, captions and label maps (written to disk in
the real formats by :mod:`ovseg.prepare.synthetic`)."""

from .captions import plural
from .categories import (
    CATEGORIES,
    IGNORE_INDEX,
    PLAIN_BACKGROUND,
    Category,
    Scene,
    canonical_split,
    caption_choice,
    split_id,
)
from .datamodule import SyntheticDataModule
from .dataset import SyntheticDataset
from .world import SyntheticWorld

__all__ = [
    "CATEGORIES",
    "IGNORE_INDEX",
    "PLAIN_BACKGROUND",
    "Category",
    "Scene",
    "SyntheticDataModule",
    "SyntheticDataset",
    "SyntheticWorld",
    "canonical_split",
    "caption_choice",
    "plural",
    "split_id",
]
