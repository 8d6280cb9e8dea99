"""Joint image / label transforms on sample dicts.

A sample is a dict with ``image``: (3, H, W) uint8 tensor and optionally ``label``: (H, W) int64
tensor (other keys pass through untouched). Every transform takes and returns such a dict (a new
dict; the input is not modified) and

* keeps images uint8 (resampling is done in float32, then rounded and clamped to 0..255);
* resizes labels with nearest-neighbour only (pixel-centre aligned, like Pillow's NEAREST), so
  label values are never invented;
* draws its randomness from torch's global generator (seeded per DataLoader worker by PyTorch,
  hence reproducible under ``seed_everything``), never from Python's ``random``;
* has plain init arguments, so it can be written in YAML::

    transform:
      class_path: ovseg.datamodules.transforms.Compose
      init_args:
        transforms:
          - class_path: ovseg.datamodules.transforms.ResizeShortSide
            init_args: {size: [320, 384, 448, 512, 576, 640], max_long_side: 2560}
          - class_path: ovseg.datamodules.transforms.RandomCrop
            init_args: {size: 640, cat_max_ratio: 0.75}
          - class_path: ovseg.datamodules.transforms.RandomHorizontalFlip
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Compose",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "ResizeShortSide",
    "Transform",
    "resize_image",
    "resize_label",
]

Interpolation = Literal["nearest", "bilinear", "bicubic"]
Sample = dict[str, Any]


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    """``S`` -> (S, S); ``(H, W)`` -> (H, W); both positive."""
    if isinstance(size, int):
        pair = (size, size)
    else:
        values = tuple(int(v) for v in size)
        if len(values) != 2:
            raise ValueError(f"{name} must be an int or (height, width), got {size!r}")
        pair = values  # type: ignore[assignment]
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return pair


def _check_sample(sample: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
    image = sample["image"]
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"sample['image'] must be a (3, H, W) tensor, got {shape}")
    label = sample.get("label")
    if label is not None and tuple(label.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"image {tuple(image.shape[-2:])} and label {tuple(label.shape)} sizes differ")
    return image, label


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _randint(high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, ()))


# ------------------------------------------------------------------------------ functional
def resize_image(image: Tensor, size: tuple[int, int], interpolation: Interpolation = "bilinear") -> Tensor:
    """(3, H, W) uint8 or float image -> (3, h, w), same dtype; antialiased when shrinking.

    uint8 images are resampled in float32 and rounded back (clamped to 0..255).
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if interpolation == "nearest":
        return _nearest(image, size)
    x = image[None].float()
    y = F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)[0]
    if image.dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.to(image.dtype)


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> Tensor:
    """Source index of each output pixel, pixel-centre aligned: floor((i + 0.5) * n_in / n_out)."""
    index = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out)).floor()
    return index.long().clamp_(0, n_in - 1)


def _nearest(tensor: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of (..., H, W) by indexing (exact for any dtype)."""
    h, w = tensor.shape[-2:]
    rows = _nearest_index(h, size[0], tensor.device)
    cols = _nearest_index(w, size[1], tensor.device)
    return tensor.index_select(-2, rows).index_select(-1, cols)


def resize_label(label: Tensor, size: tuple[int, int]) -> Tensor:
    """(H, W) label map -> (h, w) with nearest neighbour (values preserved)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return _nearest(label, size)


# ------------------------------------------------------------------------------ transforms
class Transform(ABC):
    """Base class: ``transform(sample) -> sample``. Subclasses implement :meth:`__call__`."""

    @abstractmethod
    def __call__(self, sample: Mapping[str, Any]) -> Sample:
        """Transform one sample dict (``image`` (3, H, W) uint8, optional ``label`` (H, W))."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply ``transforms`` in order (an empty list is the identity)."""

    def __init__(self, transforms: Sequence[Transform] = ()) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Mapping[str, Any]) -> Sample:
        out = dict(sample)
        for transform in self.transforms:
            out = transform(out)
        return out


class RandomResizedCrop(Transform):
    """Crop a random area and aspect ratio, resize it to ``size`` (torchvision's sampling rule).

    The crop covers a fraction ``scale`` of the image area with aspect ratio (w/h) log-uniform in
    ``ratio``; after 10 failed draws the largest centred crop within ``ratio`` is used. The image
    is resized with ``interpolation`` (antialiased), the label with nearest neighbour.
    SimZSS / OpenCLIP training: ``RandomResizedCrop(224, scale=(0.9, 1.0))`` (bicubic).

    Args:
        size: output side ``S`` or ``(H, W)``.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        interpolation: "bicubic", "bilinear" or "nearest" (image only).
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Interpolation = "bicubic",
    ) -> None:
        self.size = _pair(size, "size")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.interpolation = interpolation

    def params(self, height: int, width: int) -> tuple[int, int, int, int]:
        """A random crop ``(top, left, h, w)`` of an image of ``height`` x ``width``."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(height - h + 1), _randint(width - w + 1), h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            h, w = height, width
        h, w = max(1, min(h, height)), max(1, min(w, width))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, sample: Mapping[str, Any]) -> Sample:
        image, label = _check_sample(sample)
        top, left, h, w = self.params(*image.shape[-2:])
        out = dict(sample)
        out["image"] = resize_image(image[:, top : top + h, left : left + w], self.size, self.interpolation)
        if label is not None:
            out["label"] = resize_label(label[top : top + h, left : left + w], self.size)
        return out


class ResizeShortSide(Transform):
    """Resize (keeping the aspect ratio) so the short side is ``size``; the long side is capped.

    Args:
        size: the target short side, or a list to draw one from uniformly per sample
            (detectron2's ``ResizeShortestEdge(..., "choice")``).
        max_long_side: if the long side would exceed this, scale down so it equals it.
        interpolation: image interpolation (labels always use nearest neighbour).
    """

    def __init__(
        self,
        size: int | Sequence[int] = 512,
        max_long_side: int | None = None,
        interpolation: Interpolation = "bilinear",
    ) -> None:
        sizes = [size] if isinstance(size, int) else [int(s) for s in size]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"size must be a positive int or a non-empty list of them, got {size!r}")
        if max_long_side is not None and max_long_side < 1:
            raise ValueError(f"max_long_side must be positive, got {max_long_side}")
        self.size = size if isinstance(size, int) else sizes
        self._sizes = sizes
        self.max_long_side = max_long_side
        self.interpolation = interpolation

    def output_size(self, height: int, width: int, short: int) -> tuple[int, int]:
        """(h, w) after resizing ``height`` x ``width`` to short side ``short`` (long side capped)."""
        scale = short / min(height, width)
        if self.max_long_side is not None and max(height, width) * scale > self.max_long_side:
            scale = self.max_long_side / max(height, width)
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def __call__(self, sample: Mapping[str, Any]) -> Sample:
        image, label = _check_sample(sample)
        short = self._sizes[_randint(len(self._sizes))] if len(self._sizes) > 1 else self._sizes[0]
        size = self.output_size(*image.shape[-2:], short)
        out = dict(sample)
        out["image"] = resize_image(image, size, self.interpolation)
        if label is not None:
            out["label"] = resize_label(label, size)
        return out


class RandomCrop(Transform):
    """Random ``size`` crop; smaller images are padded at the bottom / right first.

    Padding uses ``image_fill`` for images (0) and ``ignore_index`` for labels (255), so padded
    pixels never count in a loss.

    Args:
        size: crop side ``S`` or ``(H, W)``.
        cat_max_ratio: mmseg's rule: redraw the crop (up to 10 times) while a single class covers
            at least this fraction of the crop's non-ignored pixels (or the crop has fewer than two
            classes); ``None`` or 1.0 disables it. Needs a label.
        ignore_index: label value of padded pixels, and not counted by ``cat_max_ratio``.
        image_fill: image value of padded pixels.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 512,
        cat_max_ratio: float | None = None,
        ignore_index: int = 255,
        image_fill: int = 0,
    ) -> None:
        self.size = _pair(size, "size")
        if cat_max_ratio is not None and not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.image_fill = image_fill

    def _pad(self, image: Tensor, label: Tensor | None) -> tuple[Tensor, Tensor | None]:
        h, w = image.shape[-2:]
        ph, pw = max(0, self.size[0] - h), max(0, self.size[1] - w)
        if ph == 0 and pw == 0:
            return image, label
        padded = image.new_full((image.shape[0], h + ph, w + pw), self.image_fill)
        padded[:, :h, :w] = image
        if label is not None:
            padded_label = label.new_full((h + ph, w + pw), self.ignore_index)
            padded_label[:h, :w] = label
            label = padded_label
        return padded, label

    def _draw(self, height: int, width: int) -> tuple[int, int]:
        return _randint(height - self.size[0] + 1), _randint(width - self.size[1] + 1)

    def __call__(self, sample: Mapping[str, Any]) -> Sample:
        image, label = _check_sample(sample)
        image, label = self._pad(image, label)
        height, width = image.shape[-2:]
        ch, cw = self.size
        top, left = self._draw(height, width)
        if label is not None and self.cat_max_ratio is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = label[top : top + ch, left : left + cw]
                values = crop[crop != self.ignore_index]
                if values.numel():
                    counts = torch.unique(values, return_counts=True)[1]
                    if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                        break
                top, left = self._draw(height, width)
        out = dict(sample)
        out["image"] = image[:, top : top + ch, left : left + cw].contiguous()
        if label is not None:
            out["label"] = label[top : top + ch, left : left + cw].contiguous()
        return out


class RandomHorizontalFlip(Transform):
    """Flip image and label left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, sample: Mapping[str, Any]) -> Sample:
        image, label = _check_sample(sample)
        out = dict(sample)
        if self.p > 0 and float(torch.rand(())) < self.p:
            out["image"] = image.flip(-1)
            if label is not None:
                out["label"] = label.flip(-1)
        return out
