"""ZegFormer (Ding et al., CVPR 2022): decoupled zero-shot semantic segmentation."""

from ovseg.methods.zegformer.model import (
    CLIPCropClassifier,
    FPNPixelDecoder,
    SegmentClassifier,
    TimmBackbone,
    ZegFormerModel,
    ZegFormerOutput,
    fuse_scores,
    mask_boxes,
    masked_crops,
    semantic_inference,
)
from ovseg.methods.zegformer.module import ZegFormer

__all__ = [
    "CLIPCropClassifier",
    "FPNPixelDecoder",
    "SegmentClassifier",
    "TimmBackbone",
    "ZegFormer",
    "ZegFormerModel",
    "ZegFormerOutput",
    "fuse_scores",
    "mask_boxes",
    "masked_crops",
    "semantic_inference",
]
