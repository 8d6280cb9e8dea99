"""What users hold -> the (3, H, W) image tensors :meth:`ovseg.module.OVSegModule.segment` reads.

Accepted, each meaning exactly one thing:

- a path (``str`` or ``os.PathLike``): decoded by :func:`ovseg.datamodules.decode.decode_image`
  (any format Pillow reads, EXIF orientation applied, grayscale / palette / alpha -> RGB);
- a ``PIL.Image.Image``: EXIF orientation applied (a no-op on an image already turned upright by
  ``ImageOps.exif_transpose``), then converted to RGB as files are;
- a ``numpy`` array of dtype uint8: (H, W, 3) RGB or (H, W) grayscale (what ``np.asarray`` of a
  Pillow image or ``imageio`` give); (B, H, W, 3) is a batch;
- a ``torch`` tensor (3, H, W) or (B, 3, H, W): uint8 in [0, 255], or floating point in [0, 1].

Refused with a message that says what to do: float arrays (numpy floats could be 0-1 or 0-255),
float tensors outside [0, 1] (0-255 floats, or mean/std-normalised images), channels-last tensors,
other channel counts, other dtypes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

ImageLike = Union[str, os.PathLike, "Image.Image", np.ndarray, Tensor]  # noqa: F821 - PIL imported lazily

#: floats this far outside [0, 1] are still accepted (rounding of a resize or colour conversion)
UNIT_TOLERANCE = 1e-3


def _is_pil(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def is_single_image(value: Any) -> bool:
    """True for one image (a path, a PIL image, a 2-D/3-D array or a 3-D tensor), False for a
    batch (a 4-D array or tensor, a list or tuple)."""
    if isinstance(value, (str, os.PathLike)) or _is_pil(value):
        return True
    if isinstance(value, (np.ndarray, Tensor)):
        return value.ndim <= 3
    return False


def as_image_tensor(image: ImageLike) -> Tensor:
    """One image -> (3, H, W), uint8 or float in [0, 1] (kept as given: no copy for tensors).

    Raises:
        TypeError / ValueError: for input that cannot be read unambiguously (see module doc).
        FileNotFoundError / DecodeError: for a path that does not exist or does not decode.
    """
    if isinstance(image, (str, os.PathLike)):
        from ovseg.datamodules.decode import decode_image

        return decode_image(image)
    if _is_pil(image):
        from PIL import ImageOps

        from ovseg.datamodules.decode import image_to_array

        return torch.from_numpy(np.ascontiguousarray(image_to_array(ImageOps.exif_transpose(image)).transpose(2, 0, 1)))
    if isinstance(image, np.ndarray):
        return _from_numpy(image)
    if isinstance(image, Tensor):
        return _check_tensor(image)
    raise TypeError(
        f"cannot read an image from a {type(image).__name__}: give a file path, a PIL image, "
        "an (H, W, 3) uint8 numpy array or a (3, H, W) tensor"
    )


def as_image_list(images: ImageLike | Sequence[ImageLike]) -> list[Tensor]:
    """One image or several (a list, a (B, ...) array or tensor) -> a list of (3, H_i, W_i)."""
    if is_single_image(images):
        return [as_image_tensor(images)]  # type: ignore[arg-type]
    if isinstance(images, (np.ndarray, Tensor)):
        if images.ndim != 4:
            raise ValueError(f"a batch of images must be 4-D, got shape {tuple(images.shape)}")
        if isinstance(images, Tensor):
            _check_tensor(images)
            return list(images)
        return [as_image_tensor(image) for image in images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        return [as_image_tensor(image) for image in images]
    raise TypeError(
        f"cannot read images from a {type(images).__name__}: give a file path, a PIL image, an "
        "(H, W, 3) uint8 numpy array, a (3, H, W) or (B, 3, H, W) tensor, or a list of these"
    )


def _from_numpy(array: np.ndarray) -> Tensor:
    if array.dtype != np.uint8:
        raise TypeError(
            f"numpy images must be uint8 (H, W, 3) in 0-255, got dtype {array.dtype}: a float array may hold "
            "0-1 or 0-255 values; convert it, e.g. (array * 255).round().astype(np.uint8) for 0-1 values"
        )
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        hint = " (RGBA: drop the alpha channel, array[..., :3])" if array.ndim == 3 and array.shape[2] == 4 else ""
        raise ValueError(f"a numpy image must be (H, W, 3) RGB or (H, W) grayscale, got shape {array.shape}{hint}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _check_tensor(tensor: Tensor) -> Tensor:
    """Check a (3, H, W) or (B, 3, H, W) tensor's layout and value range; returns it unchanged."""
    shape = tuple(tensor.shape)
    if tensor.dim() not in (3, 4) or shape[-3] != 3:
        hint = ""
        if tensor.dim() in (3, 4) and shape[-1] == 3:
            hint = ": it looks channels-last, use tensor.permute(2, 0, 1) (or (0, 3, 1, 2) for a batch)"
        raise ValueError(f"an image tensor must be (3, H, W) or (B, 3, H, W), got shape {shape}{hint}")
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise TypeError(f"image tensors must be uint8 (0-255) or floating point (0-1), got {tensor.dtype}")
    if tensor.numel():
        low, high = float(tensor.min()), float(tensor.max())
        if high > 1 + UNIT_TOLERANCE or low < -UNIT_TOLERANCE:
            what = (
                "0-255 values: divide by 255 or give uint8"
                if low >= 0
                else "negative values (a mean/std-normalised image?): give the image before normalisation"
            )
            raise ValueError(
                f"float image tensors must hold values in [0, 1]; this one spans [{low:.3g}, {high:.3g}], {what}"
            )
    return tensor
