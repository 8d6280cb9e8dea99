"""Decode image and label-map files into tensors, with errors that name the file.

This is the one decoder of the project: the training datasets (COCO, COCO-Stuff, WebDataset
shards), the evaluation benchmarks (:mod:`ovseg.datamodules.benchmarks`) and ``ovseg data check``
all read pixels through it.

* :func:`decode_image` -> (3, H, W) uint8 RGB, **EXIF orientation applied** (the image is turned
  upright, as OpenCV's ``imread``/``imdecode`` -- hence mmseg -- and detectron2's ``read_image``
  do). Every Pillow mode is brought to 8-bit RGB: grayscale ("L", "1", "LA") is replicated to three
  channels, palette ("P", "PA") images are expanded through their palette, alpha is dropped
  ("RGBA", "LA", "PA", as Pillow's and torchvision's ``convert('RGB')`` do), CMYK / YCbCr / LAB /
  HSV are converted by Pillow. 16-bit integer images ("I;16*", and "I", which is how Pillow may
  load 16-bit grayscale) are scaled to 8 bits **as OpenCV does: ``value >> 8``** (values clipped
  to 0..65535 first; e.g. 257 * v -> v, 65535 -> 255), the convention of mmseg's cv2-based
  loading. Float ("F") images are clipped to 0..255 and rounded (OpenCV's saturating cast).
* :func:`decode_label` -> (H, W) int64 raw values, **never** re-oriented (label maps are stored in
  the raw pixel orientation; EXIF tags on a label file are ignored). Palette PNGs give their
  *indices* (never ``convert('L')``, which would turn indices into luminance); 8- and 16-bit
  single-channel PNG/TIFF and 32-bit integer TIFF give their values. Multi-channel label files are
  rejected.
* :func:`image_size` -> the (H, W) :func:`decode_image` would return, from the header only.

All accept bytes or a path. Anything undecodable raises :class:`DecodeError` whose message starts
with the file name (or the name given by the caller, e.g. ``"shard.tar:000001234.jpg"``); a path
that does not exist raises :class:`FileNotFoundError` naming it.

EXIF orientation: tag 0x0112 as Pillow's ``getexif()`` reports it (so also ``ImageOps.exif_transpose``
and the evaluation code this replaces): values 2..8 flip/rotate the pixels, 1 or anything else
leaves them as stored; a corrupt EXIF block is ignored (orientation 1), as OpenCV does.

JPEG fast path: when `simplejpeg <https://gitlab.com/jfolz/simplejpeg>`_ is importable,
:func:`decode_image` decodes JPEGs whose colour space is YCbCr, RGB or grayscale with it, straight
to RGB (grayscale is replicated to three channels by libjpeg-turbo). Pillow's JPEG plugin is built
on libjpeg-turbo too, with the same defaults (accurate integer IDCT, fancy upsampling), so the
pixels came out identical in our checks; simplejpeg skips Pillow's image-object overhead and was
~1.7x faster on 112x112 and ~1.1-1.4x faster on 512x512 synthetic JPEGs (quality 95, one core).
The orientation is read on this path by walking the JPEG's header segments up to the scan (no
pixel data is touched; a few microseconds) and parsing the first IFD of its APP1 "Exif" segment;
a JPEG without one, or with orientation 1, costs nothing more, and a rotated one is turned with a
numpy view before the single copy every image gets. Whenever that header walk is unsure (malformed
or several Exif segments, an unusual tag type, an XMP ``tiff:Orientation``) the image goes to
Pillow, whose ``getexif()`` then decides. Everything else falls back to Pillow too: CMYK/YCCK
JPEGs, any JPEG simplejpeg rejects (it runs in strict mode, so corrupt or truncated data, and even
the recoverable warnings Pillow tolerates, go to Pillow, which then decodes it or raises the usual
:class:`DecodeError` naming the file), and all other formats.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ovseg.errors import UserError

try:  # optional fast JPEG decoder (libjpeg-turbo); Pillow is the fallback
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

__all__ = [
    "DecodeError",
    "SkipCounter",
    "decode_image",
    "decode_label",
    "image_size",
    "image_to_array",
    "label_to_array",
]

logger = logging.getLogger("ovseg.data")

Source = bytes | bytearray | memoryview | str | os.PathLike


class DecodeError(UserError):
    """Data that cannot be decoded, or is malformed; the message starts with the file's name.

    ``DecodeError("name: what went wrong")`` or ``DecodeError(path, "what went wrong")`` (the
    message is then ``f"{path}: what went wrong"`` and :attr:`path` keeps ``path``; ``None`` with
    the one-argument form, as when a DataLoader worker re-raises it from its message).
    ``ovseg.datamodules.benchmarks.DataError`` is this class.
    """

    def __init__(self, path: str | os.PathLike | None, message: str | None = None) -> None:
        if message is None:
            path, message = None, str(path)
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


def _source_name(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return "<bytes>"


def _open(source: Source, name: str, what: str = "image") -> Image.Image:
    """Open and fully decode with Pillow (``load()`` inside the try, so truncation is caught)."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise DecodeError(f"{name}: unreadable {what} (empty file)")
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
        raise DecodeError(f"{name}: unreadable {what} ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------------------ EXIF orientation
_ORIENTATION_TAG = 0x0112

# EXIF orientation -> the numpy view of an (H, W, C) array that shows it upright; the same
# transposes as Pillow's ImageOps.exif_transpose (FLIP_LEFT_RIGHT, ROTATE_180, FLIP_TOP_BOTTOM,
# TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90) and OpenCV's ExifTransform
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: a[::-1].swapaxes(0, 1),  # rotate 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: a[:, ::-1].swapaxes(0, 1),  # rotate 90 degrees counter-clockwise
}


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """``array`` (H, W, ...) turned upright for EXIF ``orientation`` (a view; 1/unknown: as is)."""
    transform = _ORIENT.get(orientation)
    return array if transform is None else transform(array)


def _swaps_axes(orientation: int) -> bool:
    return orientation in (5, 6, 7, 8)


def _pil_orientation(image: Image.Image, header_only: bool = False) -> int:
    """EXIF orientation of a Pillow image as ``getexif()`` reports it (1 if absent or corrupt).

    ``header_only`` reads only the metadata Pillow parsed when opening the file (Pillow's PNG
    plugin would otherwise decode the whole image to look for an eXIf chunk after the pixels).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data", ...
            exif = Image.Image.getexif(image) if header_only else image.getexif()
            value = exif.get(_ORIENTATION_TAG, 1)
    except Exception:  # a corrupt EXIF block does not make the image unreadable
        return 1
    return value if isinstance(value, int) else 1


_XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\x00"


def _jpeg_orientation(data: bytes | bytearray | memoryview) -> int | None:
    """EXIF orientation of JPEG bytes read from their header segments, or ``None`` when unsure.

    Walks the marker segments from SOI up to the first scan (SOS) without touching pixel data.
    Gives 1 when there is no Exif APP1 segment or it has no orientation tag, the tag's value when
    the segment is well formed, and ``None`` -- let Pillow decide -- for anything this does not
    mirror exactly (a malformed header, several Exif segments, which Pillow concatenates, an
    orientation tag that is not a single SHORT, an XMP ``tiff:Orientation``, which Pillow falls
    back to).
    """
    view = memoryview(data)
    size = len(view)
    pos = 2  # after SOI
    exif = None
    while True:
        if pos + 2 > size or view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: the header is over
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length field
            pos += 2
            continue
        if pos + 4 > size:
            return None
        end = pos + 2 + ((view[pos + 2] << 8) | view[pos + 3])
        if end < pos + 4 or end > size:
            return None
        if marker == 0xE1:
            segment = view[pos + 4 : end]
            if segment[:6] == b"Exif\x00\x00":
                if exif is not None:
                    return None
                exif = segment[6:]
            elif segment[: len(_XMP_APP1)] == _XMP_APP1 and b"tiff:Orientation" in bytes(segment):
                return None
        pos = end
    return 1 if exif is None else _tiff_orientation(bytes(exif))


def _tiff_orientation(tiff: bytes) -> int | None:
    """Orientation tag of the first IFD of a TIFF/EXIF block (1 if absent), ``None`` when unsure."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "<" if tiff[:2] == b"II" else ">"
    magic, offset = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42 or offset < 8 or offset + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, offset)
    if offset + 2 + 12 * count > len(tiff):
        return None
    found = None
    for entry in range(offset + 2, offset + 2 + 12 * count, 12):
        tag, kind, number = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == _ORIENTATION_TAG:
            if found is not None or kind != 3 or number != 1:  # not one SHORT
                return None
            (found,) = struct.unpack_from(order + "H", tiff, entry + 8)
    return 1 if found is None else found


# ------------------------------------------------------------------------------ JPEG fast path
_JPEG_MAGIC = b"\xff\xd8\xff"
# libjpeg-turbo colour spaces that simplejpeg converts to RGB exactly as Pillow does ("CMYK" and
# "YCCK" are left to Pillow: decode_jpeg(colorspace="RGB") would not convert them properly)
_FAST_JPEG_COLORSPACES = frozenset({"YCbCr", "RGB", "Gray"})


def _read_jpeg(source: Source) -> bytes | bytearray | memoryview | None:
    """The encoded bytes of ``source`` if it is JPEG data (by its magic number), else ``None``.

    A path is read only when its first bytes are a JPEG SOI marker; a missing or unreadable file
    gives ``None`` (the Pillow path then raises its usual error).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return source if bytes(source[:3]) == _JPEG_MAGIC else None
    try:
        with open(source, "rb") as file:
            head = file.read(3)
            return head + file.read() if head == _JPEG_MAGIC else None
    except OSError:
        return None


def _decode_jpeg_fast(data: bytes | bytearray | memoryview) -> np.ndarray | None:
    """JPEG bytes -> (H, W, 3) uint8 RGB with simplejpeg, or ``None`` to leave it to Pillow.

    ``None`` when simplejpeg is not installed, the colour space is not YCbCr/RGB/gray (e.g. CMYK),
    or simplejpeg cannot decode the data (strict mode: corrupt/truncated data and recoverable
    libjpeg warnings all raise there, so Pillow decides those cases exactly as before). The EXIF
    orientation is not applied here.
    """
    if _simplejpeg is None:
        return None
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
        if colorspace not in _FAST_JPEG_COLORSPACES or height <= 0 or width <= 0:
            return None
        array = _simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except Exception:  # ValueError from libjpeg-turbo, or anything else: Pillow tries (and names the file)
        return None
    if array.dtype != np.uint8 or array.shape != (height, width, 3):
        return None
    return array


# ------------------------------------------------------------------------------ images
def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def image_to_array(image: Image.Image, name: str = "<image>") -> np.ndarray:
    """A decoded Pillow image of any mode -> (H, W, 3) uint8 RGB array (see module docstring).

    Pixels as stored: the EXIF orientation is applied by :func:`decode_image`, not here.
    """
    mode = image.mode
    if mode == "RGB":
        array = np.asarray(image, dtype=np.uint8)
    elif mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)
        if values.ndim != 2:
            raise DecodeError(f"{name}: unsupported {mode} image with shape {values.shape}")
        # 16 bits -> 8 as OpenCV (so mmseg) does: v >> 8 ("I" is a 32-bit container Pillow uses
        # for 16-bit grayscale PNGs too; anything outside 0..65535 is clipped first)
        values = np.clip(values.astype(np.int64), 0, 65535)
        array = _gray_to_rgb((values >> 8).astype(np.uint8))
    elif mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        array = _gray_to_rgb(np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8))
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


def decode_image(source: Source, name: str | None = None) -> Tensor:
    """Image bytes or path -> (3, H, W) uint8 RGB tensor, EXIF orientation applied.

    Args:
        source: encoded bytes (JPEG, PNG, WebP, TIFF, ...) or a file path.
        name: how to name the data in errors (default: the path, or ``"<bytes>"``).

    Raises:
        DecodeError: corrupt, truncated, empty or unsupported data (message starts with the name).
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    label = _source_name(source, name)
    array = None
    if _simplejpeg is not None:
        data = _read_jpeg(source)
        if data is not None:
            orientation = _jpeg_orientation(data)
            if orientation is not None:  # else Pillow reads the orientation (and the pixels)
                array = _decode_jpeg_fast(data)
                if array is not None:
                    array = _apply_orientation(array, orientation)
            if array is None and not isinstance(source, (bytes, bytearray, memoryview)):
                source = data  # already read: let Pillow decode these bytes, not reread the file
    if array is None:
        image = _open(source, label, "image")
        if image.width == 0 or image.height == 0:
            raise DecodeError(f"{label}: image has zero size {image.size}")
        array = _apply_orientation(image_to_array(image, label), _pil_orientation(image))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def image_size(source: Source, name: str | None = None) -> tuple[int, int]:
    """(height, width) of the tensor :func:`decode_image` would return, read from the header only.

    No pixel data is decoded, so truncated pixel data goes unnoticed. The EXIF orientation is the
    one found in the metadata before the pixel data (all of it for JPEG, TIFF and WebP; a PNG eXIf
    chunk written after the image data, which Pillow itself never writes, is not seen).

    Raises:
        DecodeError: unreadable header or zero size (message starts with the name).
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    label = _source_name(source, name)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise DecodeError(f"{label}: unreadable image (empty file)")
            image = Image.open(io.BytesIO(bytes(source)))
        else:
            if not Path(source).is_file():
                raise FileNotFoundError(f"{label}: file does not exist")
            image = Image.open(source)
    except (DecodeError, FileNotFoundError):
        raise
    except Exception as exc:
        raise DecodeError(f"{label}: unreadable image ({type(exc).__name__}: {exc})") from exc
    with image:
        width, height = image.size
        tags = getattr(image, "tag_v2", None)
        if tags is not None and isinstance(tags.get(256), int) and isinstance(tags.get(257), int):
            # TIFF: the stored size (recent Pillow reports the upright one, and turns the pixels
            # itself on load; decode_image's result is upright either way)
            width, height = tags[256], tags[257]
        orientation = _pil_orientation(image, header_only=True)
    if width == 0 or height == 0:
        raise DecodeError(f"{label}: image has zero size {(width, height)}")
    return (width, height) if _swaps_axes(orientation) else (height, width)


# ------------------------------------------------------------------------------ labels
_LABEL_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS")


def label_to_array(image: Image.Image, name: str = "<label>") -> np.ndarray:
    """A decoded single-channel Pillow image -> (H, W) int64 raw values (palette -> indices)."""
    if image.mode not in _LABEL_MODES:
        raise DecodeError(
            f"{name}: a label must be a single-channel index image (mode L, P, I or I;16), got mode "
            f"{image.mode!r} ({len(image.getbands())} channels)"
        )
    return np.asarray(image).astype(np.int64)


def decode_label(source: Source, name: str | None = None) -> Tensor:
    """Label-map bytes or path -> (H, W) int64 tensor of the raw stored values.

    Palette PNGs give their indices, 16-bit PNGs their 16-bit values. No value is remapped here,
    and no EXIF orientation is applied (labels are used as stored).

    Raises:
        DecodeError: undecodable or multi-channel data (message starts with the name).
        FileNotFoundError: ``source`` is a path that does not exist.
    """
    label = _source_name(source, name)
    image = _open(source, label, "label")
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
