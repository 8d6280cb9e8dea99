"""A procedurally generated world that stands in for COCO.

Every scene is 1-3 *stuff* regions (horizontal bands with wavy borders, or blobs on a base) with
1..``max_objects`` *thing* instances painted on top, plus five COCO-like captions. Categories differ
in colour **and** local texture (so a frozen, randomly initialised ViT can separate them); things
also differ in shape (which only helps methods that train their image side).

Scenes are a pure function of ``(seed, split, index)``: ``np.random.default_rng((seed, split_id,
index))``, no global RNG state, vectorised numpy (about 1 ms for a 112x112 scene).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ovseg.datamodules.synthetic.captions import CaptionWriter, Mention
from ovseg.datamodules.synthetic.categories import (
    CATEGORIES,
    ELEVATION,
    IGNORE_INDEX,
    PLAIN_BACKGROUND,
    Category,
    Scene,
    split_id,
)
from ovseg.datamodules.synthetic.painting import (
    blob_mask,
    coordinate_grid,
    paint_texture,
    pixel_noise,
    shape_mask,
)


class SyntheticWorld:
    """Deterministic generator of scenes, labels and captions.

    Args:
        image_size: ``S`` or ``(H, W)``; default 112x112 (an 8x8 grid of 14-px patches).
        seed: world seed; scenes are keyed by ``(seed, split, index)``.
        min_objects, max_objects: number of thing instances per scene (inclusive range).
        color_jitter: maximum per-channel colour offset of each region (and half of it as a global
            brightness shift per scene).
        noise_std: std of the per-pixel Gaussian noise.
        ignore_boundary: mark a 1-px band on every category boundary as 255.
        categories: override :data:`CATEGORIES`.
        close_up_fraction: fraction of *training* scenes that are close-ups (:meth:`close_up`): one
            category, large, on a plain background of :data:`PLAIN_BACKGROUND`, the way product and
            object photos fill a share of web image-text data. 0 (default) leaves every scene as
            before; validation and test scenes are never close-ups.
        excluded_from_training: indices of categories that *training* scenes never show (a data set
            annotated for the other categories only); validation and test scenes show every one.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 112,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 4,
        color_jitter: float = 15.0,
        noise_std: float = 5.0,
        ignore_boundary: bool = True,
        categories: tuple[Category, ...] = CATEGORIES,
        close_up_fraction: float = 0.0,
        excluded_from_training: tuple[int, ...] = (),
    ) -> None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.height, self.width = int(size[0]), int(size[1])
        if min(self.height, self.width) < 16:
            raise ValueError("image_size must be at least 16")
        if not 0 <= min_objects <= max_objects <= 200:
            raise ValueError("need 0 <= min_objects <= max_objects <= 200")
        self.seed = int(seed)
        self.min_objects = int(min_objects)
        self.max_objects = int(max_objects)
        self.color_jitter = float(color_jitter)
        self.noise_std = float(noise_std)
        self.ignore_boundary = bool(ignore_boundary)
        self.categories = tuple(categories)
        if not 0.0 <= close_up_fraction <= 1.0:
            raise ValueError(f"close_up_fraction must be in [0, 1], got {close_up_fraction}")
        self.close_up_fraction = float(close_up_fraction)
        self.excluded_from_training = tuple(sorted({int(i) for i in excluded_from_training}))
        if any(not 0 <= i < len(self.categories) for i in self.excluded_from_training):
            raise ValueError(f"excluded_from_training indexes {len(self.categories)} categories")
        self.stuff_ids = [i for i, c in enumerate(self.categories) if c.kind == "stuff"]
        self.thing_ids = [i for i, c in enumerate(self.categories) if c.kind == "thing"]
        if not self.stuff_ids:
            raise ValueError("the world needs at least one stuff category")
        # what training scenes draw from (the same lists as validation without exclusions)
        self._training_stuff_ids = [i for i in self.stuff_ids if i not in self.excluded_from_training]
        self._training_thing_ids = [i for i in self.thing_ids if i not in self.excluded_from_training]
        self._training_ids = sorted(self._training_stuff_ids + self._training_thing_ids)
        if not self._training_stuff_ids:
            raise ValueError("excluded_from_training leaves no stuff category for the training scenes")
        if len(self.categories) > 255:
            raise ValueError("at most 255 categories (uint8 labels, 255 = ignore)")
        self._caption_writer = CaptionWriter(self.categories)

    # ---------------------------------------------------------------- vocabulary
    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.height, self.width

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def seen_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c.seen]

    @property
    def unseen_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.categories) if not c.seen]

    @property
    def palette(self) -> np.ndarray:
        """(K, 3) uint8 category colours."""
        return np.array([c.color for c in self.categories], dtype=np.uint8)

    def vocabulary_lines(self) -> list[str]:
        """One line per class: ``name, synonym, synonym`` (the class_names.txt format)."""
        return [", ".join((c.name, *c.synonyms)) for c in self.categories]

    def rng(self, index: int, split: str = "train") -> np.random.Generator:
        """The generator of scene ``index`` of ``split``: ``default_rng((seed, split_id, index))``."""
        if index < 0:
            raise IndexError(f"scene index must be >= 0, got {index}")
        return np.random.default_rng((self.seed, split_id(split), int(index)))

    # ---------------------------------------------------------------- scenes
    def _jittered_color(self, rng: np.random.Generator, c: Category) -> np.ndarray:
        """(3,) float32 colour of one region: the category colour + U(-jitter, jitter) per channel."""
        jit = self.color_jitter
        return np.asarray(c.color, np.float32) + rng.uniform(-jit, jit, 3).astype(np.float32)

    def scene(self, index: int, split: str = "train") -> Scene:
        """Generate scene ``index`` of ``split`` (train/val/test streams never share a scene)."""
        rng = self.rng(index, split)
        training = split_id(split) == 0
        if self.close_up_fraction > 0 and training and rng.random() < self.close_up_fraction:
            return self.close_up(rng)
        h, w = self.height, self.width
        s = float(min(h, w))
        yy, xx = coordinate_grid(h, w)
        jit = self.color_jitter
        stuff_ids = self._training_stuff_ids if training else self.stuff_ids
        thing_ids = self._training_thing_ids if training else self.thing_ids
        # region map: stuff regions 0..n_stuff-1, then one region per thing instance
        region_cat: list[int] = []
        region_col: list[np.ndarray] = []
        tex = np.empty((h, w), dtype=np.float32)  # additive texture offset per pixel

        # ---- stuff layout
        u = rng.random()
        n_stuff = min(1 if u < 0.2 else 2 if u < 0.65 else 3, len(stuff_ids))
        stuff = [int(c) for c in rng.choice(stuff_ids, n_stuff, replace=False)]
        layout = "bands" if n_stuff == 1 or rng.random() < 0.7 else "blobs"
        region = np.zeros((h, w), dtype=np.uint8)
        if layout == "bands":
            stuff.sort(key=lambda c: ELEVATION.get(self.categories[c].name, 2.0) + rng.normal(0, 0.7))
            if n_stuff == 2:
                cuts = [rng.uniform(0.3, 0.7)]
            elif n_stuff == 3:
                c1 = rng.uniform(0.22, 0.42)
                cuts = [c1, rng.uniform(c1 + 0.2, 0.8)]
            else:
                cuts = []
            x = xx[0]
            for cut in cuts:
                amp = rng.uniform(0.0, 0.05) * h
                freq = 2 * np.pi / (rng.uniform(0.5, 1.5) * w)
                yb = cut * h + amp * np.sin(x * freq + rng.uniform(0, 2 * np.pi))
                region += yy > yb[None, :]
        else:
            for k in range(1, n_stuff):
                cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
                a, b = rng.uniform(0.22, 0.4) * s, rng.uniform(0.22, 0.4) * s
                region[blob_mask(rng, yy - cy, xx - cx, a, b)] = k
        for k, cat in enumerate(stuff):
            c = self.categories[cat]
            region_cat.append(cat)
            region_col.append(self._jittered_color(rng, c))
            t = paint_texture(c.texture, rng, yy, xx, 0.0, 0.0, 0.0)
            if n_stuff == 1:
                tex = t.astype(np.float32)  # a fresh array (textures never return views)
            else:
                np.copyto(tex, t, where=region == k)

        # ---- things: several instances of 1-3 categories, placed without (much) overlap
        n_obj = int(rng.integers(self.min_objects, self.max_objects + 1)) if thing_ids else 0
        inst_area: list[float] = []  # full (unclipped) area of each instance
        if n_obj:
            n_kinds = min(int(rng.integers(1, 4)), n_obj, len(thing_ids))
            kinds = rng.choice(thing_ids, n_kinds, replace=False)
            cats = list(kinds) + list(rng.choice(kinds, n_obj - len(kinds)))
            placed: list[tuple[float, float, float]] = []
            for cat in cats:
                cat = int(cat)
                r = rng.uniform(0.11, 0.25) * s
                for _ in range(25):
                    cy = rng.uniform(0.6 * r, h - 0.6 * r)
                    cx = rng.uniform(0.6 * r, w - 0.6 * r)
                    if all((cy - py) ** 2 + (cx - px) ** 2 > (0.92 * (r + pr)) ** 2 for py, px, pr in placed):
                        break
                else:
                    continue
                placed.append((cy, cx, r))
                y0, y1 = max(0, int(cy - r)), min(h, int(np.ceil(cy + r)) + 1)
                x0, x1 = max(0, int(cx - r)), min(w, int(np.ceil(cx + r)) + 1)
                by, bx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
                c = self.categories[cat]
                m = shape_mask(c.shape or "circle", by - cy, bx - cx, r)
                region[y0:y1, x0:x1][m] = len(region_cat)
                region_cat.append(cat)
                region_col.append(self._jittered_color(rng, c))
                np.copyto(tex[y0:y1, x0:x1], paint_texture(c.texture, rng, by, bx, cy, cx, r), where=m)
                inst_area.append(float(np.pi * r * r))

        # ---- compose: region colour + texture + global brightness + pixel noise
        img = np.take(np.asarray(region_col, dtype=np.float32), region, axis=0)  # (H, W, 3)
        tex += rng.uniform(-jit / 2, jit / 2) + 0.5  # global brightness (+0.5: round on cast)
        np.add(img, tex[..., None], out=img)
        if self.noise_std > 0:
            np.add(img, self.noise_std * pixel_noise(rng, (h, w, 3)), out=img)
        image = np.clip(img, 0, 255, out=img).astype(np.uint8)
        label = np.take(np.asarray(region_cat, dtype=np.uint8), region)

        # ---- statistics, counts, captions (before the ignore band)
        flat = label.ravel()
        area = np.bincount(flat, minlength=self.num_classes).astype(np.float64)
        row_sum = np.bincount(flat, weights=yy.ravel(), minlength=self.num_classes)
        present = [int(i) for i in np.argsort(-area, kind="stable") if area[i] > 0]
        counts: dict[int, int] = {}
        if inst_area:
            vis = np.bincount(region.ravel(), minlength=len(region_cat))[n_stuff:]
            for k, full in enumerate(inst_area):
                if vis[k] >= max(20, 0.3 * full):
                    cat = region_cat[n_stuff + k]
                    counts[cat] = counts.get(cat, 0) + 1
        mentions = []
        for cat in present:
            frac = area[cat] / (h * w)
            if frac < 0.01:
                continue
            if self.categories[cat].kind == "thing":
                n = max(counts.get(cat, 0), 1)
                counts[cat] = n
                side = np.sqrt(area[cat] / n) / s
                size = "small" if side < 0.17 else "big" if side > 0.3 else None
            else:
                n, size = 1, None
            mentions.append(Mention(cat, frac, n, size, float(row_sum[cat] / area[cat] / h)))
        counts = {cat: counts.get(cat, 1) for cat in present}
        captions = self._caption_writer.captions(rng, mentions, layout)

        if self.ignore_boundary:
            edge = np.zeros((h, w), dtype=bool)
            edge[:, :-1] |= label[:, :-1] != label[:, 1:]
            edge[:-1, :] |= label[:-1, :] != label[1:, :]
            label[edge] = IGNORE_INDEX
        return Scene(image=image, label=label, captions=captions, present=present, counts=counts)

    def close_up(self, rng: np.random.Generator) -> Scene:
        """A close-up: one category filling much of the image on a plain background.

        Things: 1-2 large instances (radius 0.3-0.48 of the side); stuff: one wobbly blob covering
        about half to four fifths of the image. The background is exactly :data:`PLAIN_BACKGROUND`
        (label 255: no category) and the captions name only the category ("close up of a kite").
        """
        h, w = self.height, self.width
        s = float(min(h, w))
        yy, xx = coordinate_grid(h, w)
        if self.excluded_from_training:  # close-ups are training scenes
            cat = int(rng.choice(self._training_ids))
        else:
            cat = int(rng.integers(self.num_classes))
        c = self.categories[cat]
        mask = np.zeros((h, w), dtype=bool)
        tex = np.zeros((h, w), dtype=np.float32)
        count = 1
        if c.kind == "stuff":
            cy, cx = rng.uniform(0.4, 0.6) * h, rng.uniform(0.4, 0.6) * w
            a, b = rng.uniform(0.32, 0.5) * s, rng.uniform(0.32, 0.5) * s
            mask = blob_mask(rng, yy - cy, xx - cx, a, b)
            tex = paint_texture(c.texture, rng, yy, xx, 0.0, 0.0, 0.0).astype(np.float32)
        else:
            count = 1 if rng.random() < 0.7 else 2
            for k in range(count):
                r = rng.uniform(0.3, 0.48) * s / (1.0 if count == 1 else 1.6)
                cy = rng.uniform(0.45, 0.55) * h if count == 1 else rng.uniform(0.3, 0.7) * h
                cx = rng.uniform(0.45, 0.55) * w if count == 1 else (0.28 + 0.44 * k) * w
                m = shape_mask(c.shape or "circle", yy - cy, xx - cx, r)
                np.copyto(tex, paint_texture(c.texture, rng, yy, xx, cy, cx, r), where=m)
                mask |= m
        colour = self._jittered_color(rng, c)
        jit = self.color_jitter
        img = colour[None, None, :] + (tex + rng.uniform(-jit / 2, jit / 2) + 0.5)[..., None]
        if self.noise_std > 0:
            img = img + self.noise_std * pixel_noise(rng, (h, w, 3))
        img = np.where(mask[..., None], img, np.asarray(PLAIN_BACKGROUND, np.float32) + 0.5)
        image = np.clip(img, 0, 255).astype(np.uint8)
        label = np.where(mask, np.uint8(cat), np.uint8(IGNORE_INDEX))
        area = float(mask.mean())
        size = "big" if c.kind == "thing" else None
        mention = Mention(cat, area, count, size, 0.5)
        captions = self._caption_writer.captions(rng, [mention], "close-up")
        return Scene(image=image, label=label, captions=captions, present=[cat], counts={cat: count})

    def scenes(self, split: str = "train", start: int = 0, stop: int | None = None) -> Iterator[Scene]:
        """Iterate over scenes ``start..stop-1`` of ``split`` (forever if ``stop`` is None)."""
        i = start
        while stop is None or i < stop:
            yield self.scene(i, split)
            i += 1

    def __repr__(self) -> str:
        return (
            f"SyntheticWorld(image_size=({self.height}, {self.width}), seed={self.seed}, "
            f"objects={self.min_objects}..{self.max_objects}, classes={self.num_classes})"
        )
