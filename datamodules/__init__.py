"""Method-agnostic data readers: one module per dataset family, the shared base in :mod:`.base`.

Configs name the DataModules from here, e.g. ``class_path: ovseg.datamodules.CocoCaptionsDataModule``.
Tools that write datasets (shards, concept caches, feature stores, checks) are in :mod:`ovseg.prepare`.
"""

from ovseg.datamodules.benchmarks import EvaluationDataModule
from ovseg.datamodules.coco_captions import CocoCaptionsDataModule
from ovseg.datamodules.coco_stuff import CocoStuffDataModule
from ovseg.datamodules.feature_store import CachedFeaturesDataModule
from ovseg.datamodules.image_folder import ImageFolderDataModule
from ovseg.datamodules.synthetic import SyntheticDataModule
from ovseg.datamodules.webdataset import WebDatasetDataModule

__all__ = [
    "CachedFeaturesDataModule",
    "CocoCaptionsDataModule",
    "CocoStuffDataModule",
    "EvaluationDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "WebDatasetDataModule",
]
