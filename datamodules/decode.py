"""Decode image and label-map files into tensors, with errors that name the file.

* :func:`decode_image` -> (3, H, W) uint8 RGB. Every Pillow mode is brought to 8-bit RGB:
  grayscale ("L", "1", "LA") is replicated to three channels, palette ("P", "PA") images are
  expanded through their palette, alpha is dropped ("RGBA", "LA", "PA", as Pillow's and
  torchvision's ``convert('RGB')`` do), CMYK / YCbCr / LAB / HSV are converted by Pillow, and
  16/32-bit integer ("I;16*", "I") and float ("F") images are rescaled to 0..255 (16-bit:
  ``round(v * 255 / 65535)``). EXIF orientation is **not** applied (labels are stored in the raw
  pixel orientation).
* :func:`decode_label` -> (H, W) int64 raw values. Palette PNGs give their *indices* (never
  ``convert('L')``, which would turn indices into luminance); 8- and 16-bit single-channel PNGs
  give their values. Multi-channel label files are rejected.

Both accept bytes or a path. Anything undecodable raises :class:`DecodeError` whose message starts
with the file name (or the name given by the caller, e.g. ``"shard.tar:000001234.jpg"``).
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "DecodeError",
    "SkipCounter",
    "decode_image",
    "decode_label",
    "image_to_array",
    "label_to_array",
]

logger = logging.getLogger("ovseg.data")


class DecodeError(ValueError):
    """Raised when image or label data cannot be decoded; the message names the file."""


def _source_name(source: bytes | bytearray | memoryview | str | os.PathLike, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<bytes>"


def _open(source: bytes | bytearray | memoryview | str | os.PathLike, name: str) -> Image.Image:
    """Open and fully decode with Pillow (``load()`` inside the try, so truncation is caught)."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise DecodeError(f"{name}: empty file")
            image = Image.open(io.BytesIO(bytes(source)))
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"{name}: file does not exist")
            image = Image.open(path)
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes..." is handled below
            warnings.simplefilter("ignore", UserWarning)
            image.load()
        return image
    except (DecodeError, FileNotFoundError):
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise DecodeError(f"{name}: cannot decode ({type(exc).__name__}: {exc})") from exc


def _rescale_to_uint8(array: np.ndarray, maximum: float) -> np.ndarray:
    """Integer or float array with full scale ``maximum`` -> uint8 (rounded, clipped)."""
    scaled = np.rint(array.astype(np.float64) * (255.0 / maximum))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def image_to_array(image: Image.Image, name: str = "<image>") -> np.ndarray:
    """A decoded Pillow image of any mode -> (H, W, 3) uint8 RGB array (see module docstring)."""
    mode = image.mode
    if mode == "RGB":
        array = np.asarray(image, dtype=np.uint8)
    elif mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)
        if values.ndim != 2:
            raise DecodeError(f"{name}: unsupported {mode} image with shape {values.shape}")
        if mode == "I":  # 32-bit container: 8-bit or 16-bit content (PNG 16-bit gray loads as I)
            full = 255.0 if values.max(initial=0) <= 255 and values.min(initial=0) >= 0 else 65535.0
            values = np.clip(values, 0, full)
        else:
            full = 65535.0
        gray = _rescale_to_uint8(values, full)
        array = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        full = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        gray = _rescale_to_uint8(np.clip(values, 0, full), full)
        array = np.repeat(gray[:, :, None], 3, axis=2)
    else:
        if mode in ("P", "PA") and "transparency" in image.info:
            image = image.convert("RGBA")
        try:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except Exception as exc:
            raise DecodeError(f"{name}: cannot convert a {mode!r} image to RGB ({exc})") from exc
    if array.ndim != 3 or array.shape[2] != 3:
        raise DecodeError(f"{name}: decoded to an unexpected shape {array.shape}")
    return array


def decode_image(
    source: bytes | bytearray | memoryview | str | os.PathLike, name: str | None = None
) -> Tensor:
    """Image bytes or path -> (3, H, W) uint8 RGB tensor.

    Args:
        source: encoded bytes (JPEG, PNG, WebP, TIFF, ...) or a file path.
        name: how to name the data in errors (default: the path, or ``"<bytes>"``).

    Raises:
        DecodeError: corrupt, truncated, empty or unsupported data (message starts with the name).
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    label = _source_name(source, name)
    image = _open(source, label)
    if image.width == 0 or image.height == 0:
        raise DecodeError(f"{label}: image has zero size {image.size}")
    array = image_to_array(image, label)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def label_to_array(image: Image.Image, name: str = "<label>") -> np.ndarray:
    """A decoded single-channel Pillow image -> (H, W) int64 raw values (palette -> indices)."""
    if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise DecodeError(
            f"{name}: a label map must be a single-channel PNG (mode L, P or I;16), got mode "
            f"{image.mode!r} ({len(image.getbands())} channels)"
        )
    return np.asarray(image).astype(np.int64)


def decode_label(
    source: bytes | bytearray | memoryview | str | os.PathLike, name: str | None = None
) -> Tensor:
    """Label-map bytes or path -> (H, W) int64 tensor of the raw stored values.

    Palette PNGs give their indices, 16-bit PNGs their 16-bit values. No value is remapped here.

    Raises:
        DecodeError: undecodable or multi-channel data (message starts with the name).
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    label = _source_name(source, name)
    image = _open(source, label)
    return torch.from_numpy(label_to_array(image, label))


class SkipCounter:
    """A count of skipped (bad) samples shared by a process and its DataLoader workers.

    The count lives in shared memory (``multiprocessing.Value``), so increments made in forked or
    spawned DataLoader workers are summed and visible in the main process as :attr:`value`. Each
    skip is logged as a warning on the ``ovseg.data`` logger with the reason and the running count
    (the first ``max_warnings`` skips, then every 100th).

    Create it in the process that owns the DataLoader (not in a config object that gets pickled):
    a ``multiprocessing.Value`` can only travel to child processes at their start.
    """

    def __init__(self, what: str = "sample", max_warnings: int = 20) -> None:
        self.what = what
        self.max_warnings = max_warnings
        self._value = mp.get_context().Value("q", 0)

    @property
    def value(self) -> int:
        """Number of skips so far, summed over every process sharing this counter."""
        return int(self._value.value)

    def add(self, reason: str) -> int:
        """Count one skip and log it; returns the running count."""
        with self._value.get_lock():
            self._value.value += 1
            count = int(self._value.value)
        if count <= self.max_warnings or count % 100 == 0:
            logger.warning("skipped a bad %s: %s (%d skipped so far)", self.what, reason, count)
        return count

    def __repr__(self) -> str:
        return f"SkipCounter(what={self.what!r}, value={self.value})"
