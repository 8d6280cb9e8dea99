"""The synthetic world: procedurally generated scenes, captions and label maps."""

from .datamodule import SyntheticDataModule
from .dataset import SyntheticDataset
from .world import (
    CATEGORIES,
    IGNORE_INDEX,
    Category,
    Scene,
    SyntheticWorld,
    canonical_split,
    caption_choice,
    plural,
    split_id,
)
from .writers import (
    FORMATS,
    make_synthetic,
    write_coco_captions,
    write_coco_stuff,
    write_mmseg,
    write_vocabulary,
    write_webdataset,
)

__all__ = [
    "CATEGORIES",
    "FORMATS",
    "IGNORE_INDEX",
    "Category",
    "Scene",
    "SyntheticDataModule",
    "SyntheticDataset",
    "SyntheticWorld",
    "canonical_split",
    "caption_choice",
    "make_synthetic",
    "plural",
    "split_id",
    "write_coco_captions",
    "write_coco_stuff",
    "write_mmseg",
    "write_vocabulary",
    "write_webdataset",
]
