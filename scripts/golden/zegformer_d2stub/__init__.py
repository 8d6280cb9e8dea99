"""A torch-only stand-in for the detectron2 / fvcore pieces that ZegFormer's official modules import.

Not ovseg code and not run in CI: :mod:`scripts.golden.zegformer` calls :func:`install` before it
imports the official modules. What is real and what is stood in:

- real, executed from a detectron2 source checkout: ``layers/{wrappers,batch_norm,shape_spec,blocks}.py``
  (``Conv2d`` with ``norm``/``activation``, ``FrozenBatchNorm2d``, ``get_norm``),
  ``modeling/backbone/{backbone,resnet}.py`` (``build_resnet_backbone``: the R-50/101 of the
  release) and ``structures/image_list.py`` (``ImageList.from_tensors``: the padding);
- stood in (small, behaviour-equivalent for what ZegFormer uses): ``configurable`` (direct keyword
  construction only), the registries, ``MetadataCatalog``, ``comm.get_world_size`` (1),
  ``sem_seg_postprocess`` (crop to the image, bilinear resize: detectron2's three lines),
  ``fvcore.nn.weight_init`` (initialisers; every weight is re-drawn by the golden script anyway),
  and deformable convolutions (unused);
- ZegFormer's own files (``mask_former/...``) run unmodified, imported file by file so that its
  package ``__init__`` (datasets, evaluators, detectron2 training code) is not executed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _package(name: str, path: Path | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []  # type: ignore[attr-defined]
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def _load_file(name: str, path: Path) -> types.ModuleType:
    """Execute one real source file as module ``name``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give the root of a source checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)
    return module


class Registry(dict):
    """fvcore's ``Registry``: ``@REGISTRY.register()`` and ``REGISTRY.get(name)``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def register(self, obj: Any = None) -> Any:
        def add(item: Any) -> Any:
            self[item.__name__] = item
            return item

        return add if obj is None else add(obj)


def configurable(init_func: Any = None, *, from_config: Any = None) -> Any:
    """Stand-in for detectron2's ``@configurable``: only direct keyword construction is used."""
    if init_func is None:
        return lambda func: func
    return init_func


def c2_xavier_fill(module: nn.Module) -> None:
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def c2_msra_fill(module: nn.Module) -> None:
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def sem_seg_postprocess(
    result: torch.Tensor, img_size: tuple[int, int], output_height: int, output_width: int
) -> torch.Tensor:
    """detectron2's: crop the padded (C, H, W) prediction to ``img_size`` and resize bilinearly."""
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    return F.interpolate(result, size=(output_height, output_width), mode="bilinear", align_corners=False)[0]


class _MetadataCatalog:
    """``MetadataCatalog.get(name)`` -> an attribute namespace (set fields on it)."""

    def __init__(self) -> None:
        self._items: dict[str, SimpleNamespace] = {}

    def get(self, name: str) -> SimpleNamespace:
        return self._items.setdefault(name, SimpleNamespace(name=name))


class _Unavailable(nn.Module):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("deformable convolutions are not part of the stand-in")


def install(detectron2_root: str | Path, zegformer_root: str | Path) -> None:
    """Make ``import detectron2...``, ``fvcore...`` and ``mask_former...`` work.

    Args:
        detectron2_root: a detectron2 source checkout (the folder holding ``detectron2/``).
        zegformer_root: a ZegFormer source checkout (the folder holding ``mask_former/``).
    """
    d2 = Path(detectron2_root) / "detectron2"
    zeg = Path(zegformer_root) / "mask_former"
    # fvcore
    _package("fvcore")
    _package("fvcore.nn")
    _module("fvcore.nn.weight_init", c2_xavier_fill=c2_xavier_fill, c2_msra_fill=c2_msra_fill)
    _module("fvcore.nn.distributed", differentiable_all_reduce=lambda x: x)
    # detectron2 utilities
    _package("detectron2", d2)
    _package("detectron2.utils")
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    _module("detectron2.utils.env", TORCH_VERSION=version)
    _module("detectron2.utils.comm", get_world_size=lambda: 1, get_rank=lambda: 0)
    _module("detectron2.utils.torch_version_utils", min_torch_version=lambda v: True)
    _module("detectron2.config", configurable=configurable)
    # detectron2.layers: the real files
    layers = _package("detectron2.layers")
    for name in ("wrappers", "shape_spec", "batch_norm", "blocks"):
        _load_file(f"detectron2.layers.{name}", d2 / "layers" / f"{name}.py")
    for module_name, names in {
        "wrappers": [
            "Conv2d",
            "BatchNorm2d",
            "cat",
            "interpolate",
            "nonzero_tuple",
            "move_device_like",
            "shapes_to_tensor",
        ],
        "shape_spec": ["ShapeSpec"],
        "batch_norm": ["FrozenBatchNorm2d", "get_norm"],
        "blocks": ["CNNBlockBase"],
    }.items():
        for name in names:
            setattr(layers, name, getattr(sys.modules[f"detectron2.layers.{module_name}"], name))
    layers.DeformConv = _Unavailable  # type: ignore[attr-defined]
    layers.ModulatedDeformConv = _Unavailable  # type: ignore[attr-defined]
    # detectron2.structures.ImageList: the real file
    structures = _package("detectron2.structures")
    structures.ImageList = _load_file(
        "detectron2.structures.image_list",  # type: ignore[attr-defined]
        d2 / "structures" / "image_list.py",
    ).ImageList
    # detectron2.modeling: registries + the real ResNet
    sem_seg_heads, meta_archs, backbones = Registry("SEM_SEG_HEADS"), Registry("META_ARCH"), Registry("BACKBONE")
    modeling = _package("detectron2.modeling")
    modeling.SEM_SEG_HEADS_REGISTRY = sem_seg_heads  # type: ignore[attr-defined]
    modeling.META_ARCH_REGISTRY = meta_archs  # type: ignore[attr-defined]
    modeling.build_backbone = lambda cfg: backbones.get(cfg.MODEL.BACKBONE.NAME)(cfg)  # type: ignore[attr-defined]
    modeling.build_sem_seg_head = lambda cfg, shape: sem_seg_heads.get(  # type: ignore[attr-defined]
        cfg.MODEL.SEM_SEG_HEAD.NAME
    )(cfg, shape)
    _module("detectron2.modeling.postprocessing", sem_seg_postprocess=sem_seg_postprocess)
    backbone_pkg = _package("detectron2.modeling.backbone")
    _module("detectron2.modeling.backbone.build", BACKBONE_REGISTRY=backbones)
    backbone_pkg.Backbone = _load_file(
        "detectron2.modeling.backbone.backbone",  # type: ignore[attr-defined]
        d2 / "modeling" / "backbone" / "backbone.py",
    ).Backbone
    _load_file("detectron2.modeling.backbone.resnet", d2 / "modeling" / "backbone" / "resnet.py")
    _module("detectron2.data", MetadataCatalog=_MetadataCatalog())
    # ZegFormer's packages without their __init__ (which pulls in datasets and training code)
    for name, path in {
        "mask_former": zeg,
        "mask_former.modeling": zeg / "modeling",
        "mask_former.modeling.heads": zeg / "modeling" / "heads",
        "mask_former.modeling.transformer": zeg / "modeling" / "transformer",
        "mask_former.third_party": zeg / "third_party",
        "mask_former.utils": zeg / "utils",
    }.items():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} not found: give the root of a ZegFormer checkout")
        _package(name, path)
    importlib.invalidate_caches()
