"""Registries, ``Backbone`` and the head builder."""

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import Backbone
from detectron2.utils.registry import Registry

META_ARCH_REGISTRY = Registry("META_ARCH")
SEM_SEG_HEADS_REGISTRY = Registry("SEM_SEG_HEADS")
BACKBONE_REGISTRY = Registry("BACKBONE")


def build_backbone(cfg, input_shape=None):
    return BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, input_shape)


def build_sem_seg_head(cfg, input_shape):
    return SEM_SEG_HEADS_REGISTRY.get(cfg.MODEL.SEM_SEG_HEAD.NAME)(cfg, input_shape)


__all__ = [
    "BACKBONE_REGISTRY",
    "META_ARCH_REGISTRY",
    "SEM_SEG_HEADS_REGISTRY",
    "Backbone",
    "ShapeSpec",
    "build_backbone",
    "build_sem_seg_head",
]
