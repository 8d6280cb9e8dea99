"""Compose the README's ``docs/images/predict_overlay.png`` from its ``ovseg predict`` example.

Run the README's "Segment your own images" commands first (they write ``data/photos`` and
``runs/photos``), then::

    python scripts/docs/predict_overlay.py --scenes 1 5 --out docs/images/predict_overlay.png

Each row is one scene: the input image beside the ``overlays/NAME.png`` that ``ovseg predict``
wrote for it (tinted labels and legend), on a white background, saved with a 256-colour palette
(a third of the size; the figure has few colours).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def compose(rows: list[tuple[Path, Path]], gap: int = 12) -> Image.Image:
    """Stack ``(input, overlay)`` pairs: each input left of its overlay, rows ``gap`` pixels apart."""
    pairs = [(Image.open(i).convert("RGB"), Image.open(o).convert("RGB")) for i, o in rows]
    width = max(a.width + b.width for a, b in pairs)
    height = sum(max(a.height, b.height) for a, b in pairs) + gap * (len(pairs) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    top = 0
    for image, overlay in pairs:
        canvas.paste(image, (0, top))
        canvas.paste(overlay, (image.width, top))
        top += max(image.height, overlay.height) + gap
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path("data/photos/images/validation"))
    parser.add_argument("--predictions", type=Path, default=Path("runs/photos"))
    parser.add_argument("--scenes", type=int, nargs="+", default=[1, 5], help="indices in sorted file order")
    parser.add_argument("--out", type=Path, default=Path("docs/images/predict_overlay.png"))
    args = parser.parse_args()
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not images:
        raise SystemExit(f"error: no images in {args.images}; run the README's `ovseg data make-synthetic` first")
    rows = []
    for index in args.scenes:
        if not 0 <= index < len(images):
            raise SystemExit(f"error: scene {index} is not among the {len(images)} images of {args.images}")
        overlay = args.predictions / "overlays" / f"{images[index].stem}.png"
        if not overlay.is_file():
            raise SystemExit(f"error: {overlay} is missing; run the README's `ovseg predict` first")
        rows.append((images[index], overlay))
    compose(rows).quantize(256).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
