"""Colour overlays of label maps with a legend of the classes present, and palette PNG label maps.

Example::

    from ovseg.visualize import overlay

    names = ["sky", "grass", "a red car"]
    labels = model.segment("photo.jpg", names)[0]
    overlay("photo.jpg", labels, names).save("photo_overlay.png")

Text is drawn by Pillow (its bundled FreeType font, ``ImageFont.load_default(size)``).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ovseg.images import ImageLike, as_image_tensor

#: the colour of class 0 when it is the background of a background threshold
BACKGROUND_COLOUR = (0, 0, 0)


def palette(num_classes: int, background: bool = False) -> np.ndarray:
    """(K, 3) uint8 distinct colours, the same for the same K: hues spaced by the golden ratio at
    alternating saturation/value; class 0 black when ``background``."""
    colours = np.empty((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        hue = (0.13 + k * 0.618033988749895) % 1.0
        saturation, value = ((0.75, 0.95), (0.55, 0.75), (0.9, 0.65))[k % 3]
        colours[k] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)]
    if background and num_classes:
        colours[0] = BACKGROUND_COLOUR
    return colours


def _labels_array(labels: Tensor | np.ndarray) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 2:
        raise ValueError(f"a label map must be (H, W), got shape {array.shape}")
    return array.astype(np.int64, copy=False)


def label_image(labels: Tensor | np.ndarray, colours: np.ndarray) -> Image.Image:
    """A label map as a PNG-ready image whose pixel values are the class indices: a palette ("P")
    image coloured by ``colours`` for up to 256 classes, else a 16-bit grayscale ("I;16") one."""
    array = _labels_array(labels)
    if array.size and (array.min() < 0 or array.max() >= max(len(colours), 1)):
        raise ValueError(f"label values {int(array.min())}..{int(array.max())} outside 0..{len(colours) - 1}")
    if len(colours) <= 256:
        image = Image.fromarray(array.astype(np.uint8), mode="P")
        image.putpalette(colours.reshape(-1).tolist())
        return image
    return Image.fromarray(array.astype(np.uint16), mode="I;16")


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def overlay(
    image: ImageLike,
    labels: Tensor | np.ndarray,
    names: Sequence[str],
    colours: np.ndarray | None = None,
    alpha: float = 0.5,
    fractions: Sequence[float] | None = None,
    legend: bool = True,
) -> Image.Image:
    """The image with each pixel tinted by its class colour, and a legend of the classes present.

    Args:
        image: anything :meth:`~ovseg.module.OVSegModule.segment` accepts (a path, a PIL image,
            an (H, W, 3) uint8 array, a (3, H, W) tensor).
        labels: (H, W) class indices into ``names`` (the image's size).
        names: the class names, index k -> ``names[k]``.
        colours: (K, 3) uint8 colours (default :func:`palette`).
        alpha: weight of the class colour (0: the image, 1: the colours only).
        fractions: per class, the share of pixels shown in the legend (default: counted here).
        legend: add the legend panel to the right of the image.

    Returns:
        an RGB image: the tinted image, then a legend panel (colour swatch, name, pixel share of
        each class present, most frequent first).
    """
    pixels = as_image_tensor(image)
    if pixels.is_floating_point():
        pixels = (pixels * 255).round().clamp(0, 255).to(torch.uint8)
    rgb = pixels.permute(1, 2, 0).cpu().numpy()
    array = _labels_array(labels)
    if array.shape != rgb.shape[:2]:
        raise ValueError(f"labels {array.shape} and image {rgb.shape[:2]} differ in size")
    colours = palette(len(names)) if colours is None else np.asarray(colours, dtype=np.uint8)
    if array.size and (array.min() < 0 or array.max() >= len(names)):
        raise ValueError(f"label values {int(array.min())}..{int(array.max())} outside the {len(names)} names")
    tinted = (1 - alpha) * rgb.astype(np.float32) + alpha * colours[array].astype(np.float32)
    result = Image.fromarray(np.rint(tinted).astype(np.uint8), mode="RGB")
    if not legend:
        return result
    if fractions is None:
        counts = np.bincount(array.reshape(-1), minlength=len(names))
        fractions = counts / max(array.size, 1)
    present = [k for k in np.argsort(-np.asarray(fractions), kind="stable") if fractions[k] > 0]
    return _with_legend(result, [(colours[k], names[k], float(fractions[k])) for k in present])


def _with_legend(image: Image.Image, entries: list[tuple[np.ndarray, str, float]]) -> Image.Image:
    """``image`` with a white panel on its right listing ``entries`` (colour, name, fraction)."""
    size = max(12, min(28, min(image.size) // 20))
    font = _font(size)
    line = round(size * 1.5)
    pad = size // 2
    texts = [
        f"{name}  {100 * fraction:.1f}%" if fraction >= 0.0005 else f"{name}  <0.1%" for _, name, fraction in entries
    ]
    measure = ImageDraw.Draw(image)
    text_width = max((measure.textlength(text, font=font) for text in texts), default=0)
    width = int(pad * 3 + size + text_width + pad)
    height = max(image.height, pad * 2 + line * len(entries))
    canvas = Image.new("RGB", (image.width + width, height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, ((colour, _, _), text) in enumerate(zip(entries, texts)):
        top = pad + row * line
        left = image.width + pad
        draw.rectangle([left, top, left + size, top + size], fill=tuple(int(c) for c in colour), outline=(0, 0, 0))
        draw.text((left + size + pad, top + size / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def save_label_png(labels: Tensor | np.ndarray, colours: np.ndarray, path: str | Path) -> None:
    """Write a label map as a PNG of class indices (palette PNG up to 256 classes, else 16-bit)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    label_image(labels, colours).save(path, optimize=False, compress_level=1)
