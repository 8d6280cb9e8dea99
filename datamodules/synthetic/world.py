"""A procedurally generated world that stands in for COCO.

Every scene is 1-3 *stuff* regions (horizontal bands with wavy borders, or blobs on a base) with
1..``max_objects`` *thing* instances painted on top, plus five COCO-like captions. Categories differ
in colour **and** local texture (so a frozen, randomly initialised ViT can separate them); things
also differ in shape (which only helps methods that train their image side).

Scenes are a pure function of ``(seed, split, index)``: ``np.random.default_rng((seed, split_id,
index))``, no global RNG state, vectorised numpy (about 1 ms for a 112x112 scene).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Literal

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Category:
    """One category of the synthetic world.

    Attributes:
        name: the class name; always an entry of the SimZSS concept bank.
        synonyms: other words for it (used in some captions and in vocabularies); never bank
            entries, so they cannot be mistaken for another concept.
        kind: "stuff" (amorphous background region) or "thing" (countable object).
        color: mean RGB colour of its pixels.
        texture: name of its local texture (see :data:`TEXTURES`).
        shape: silhouette of a thing instance (``None`` for stuff).
        seen: ``False`` for the zero-shot (unseen) split.
        adjectives: descriptive words used in captions (colour words first).
    """

    name: str
    synonyms: tuple[str, ...]
    kind: Literal["thing", "stuff"]
    color: tuple[int, int, int]
    texture: str
    shape: str | None
    seen: bool
    adjectives: tuple[str, ...] = ()


# fmt: off
CATEGORIES: tuple[Category, ...] = (
    # stuff
    Category("sky",    ("heavens",),               "stuff", (110, 175, 235), "gradient", None, True,  ("blue", "clear", "cloudless")),
    Category("grass",  ("lawn", "meadow"),         "stuff", (80, 175, 60),   "blades",   None, True,  ("green", "fresh", "tall")),
    Category("sea",    ("ocean",),                 "stuff", (25, 55, 140),   "waves",    None, True,  ("blue", "dark", "calm")),
    Category("sand",   ("beach", "dune"),          "stuff", (225, 200, 140), "speckle",  None, False, ("yellow", "dry", "soft")),
    Category("road",   ("street", "asphalt"),      "stuff", (90, 90, 95),    "grain",    None, True,  ("gray", "empty", "paved")),
    Category("wall",   ("brickwork",),             "stuff", (150, 60, 45),   "bricks",   None, True,  ("red", "old", "tall")),
    # things
    Category("ball",   ("sphere",),                "thing", (235, 40, 40),   "shaded",   "circle",    True,  ("red", "round", "shiny")),
    Category("box",    ("crate", "carton"),        "thing", (205, 135, 45),  "hatched",  "square",    True,  ("brown", "square", "wooden")),
    Category("car",    ("automobile", "vehicle"),  "thing", (235, 225, 30),  "checker",  "rectangle", True,  ("yellow", "parked", "shiny")),
    Category("tree",   ("pine", "fir"),            "thing", (20, 95, 40),    "leafy",    "triangle",  True,  ("green", "dark", "leafy")),
    Category("flower", ("blossom", "daisy"),       "thing", (240, 90, 200),  "rings",    "star",      True,  ("pink", "pretty", "blooming")),
    Category("kite",   ("glider",),                "thing", (125, 40, 190),  "stripes",  "diamond",   False, ("purple", "flying", "colorful")),
    Category("boat",   ("dinghy", "vessel"),       "thing", (240, 240, 235), "planks",   "trapezoid", True,  ("white", "wooden", "sturdy")),
)
# fmt: on

TEXTURES: tuple[str, ...] = tuple(c.texture for c in CATEGORIES)
SHAPES: tuple[str, ...] = tuple(c.shape for c in CATEGORIES if c.shape is not None)

# Stuff "elevation": small values tend to be painted at the top of a banded scene.
_ELEVATION = {"sky": 0.0, "wall": 1.0, "sea": 2.0, "grass": 3.0, "road": 3.5, "sand": 4.0}

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_SPLIT_ALIASES = {
    "train": "train", "training": "train", "train2017": "train",
    "val": "val", "valid": "val", "validation": "val", "val2017": "val",
    "test": "test", "testing": "test", "test2017": "test",
}  # fmt: skip


def canonical_split(split: str) -> Literal["train", "val", "test"]:
    """Map a split name ("train2017", "validation", ...) to "train", "val" or "test"."""
    try:
        return _SPLIT_ALIASES[split.lower()]  # type: ignore[return-value]
    except KeyError:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_ALIASES)}") from None


def split_id(split: str) -> int:
    """The integer that keys a split's scene stream (train 0, val 1, test 2)."""
    return _SPLIT_IDS[canonical_split(split)]


def caption_choice(
    world: "SyntheticWorld", index: int, split: str = "train", epoch: int = 0, n: int = 5
) -> int:
    """Which of a scene's ``n`` captions to use: random per (seed, index, epoch) for train, else 0."""
    if canonical_split(split) != "train":
        return 0
    return int(np.random.default_rng((world.seed, int(index), int(epoch))).integers(n))


def plural(word: str) -> str:
    """English plural of a (simple) noun: ball -> balls, box -> boxes, dinghy -> dinghies."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


@dataclass
class Scene:
    """One generated scene.

    Attributes:
        image: (H, W, 3) uint8 RGB image.
        label: (H, W) uint8 category indices, 255 on the 1-px boundary band (ignored).
        captions: five captions that name only categories present in the scene.
        present: indices of the categories present, largest area first.
        counts: number of visible instances per present thing category (stuff: 1).
    """

    image: np.ndarray
    label: np.ndarray
    captions: list[str]
    present: list[int]
    counts: dict[int, int] = field(default_factory=dict)


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) float32 row and column coordinates (cached, read-only)."""
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


@lru_cache(maxsize=8)
def _noise_table(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (2h, 2w, 3) standard-normal and (2h, 2w) uniform tables; scenes crop them at random offsets.

    Drawing ~40k Gaussians per scene costs more than the rest of the scene, so per-pixel noise
    is a random crop of a table made once (from a fixed seed, so it is deterministic).
    """
    g = np.random.default_rng(0x5EED).standard_normal((2 * h, 2 * w, 3), dtype=np.float32)
    u = np.random.default_rng(0x5EED + 1).random((2 * h, 2 * w), dtype=np.float32)
    g.flags.writeable = False
    u.flags.writeable = False
    return g, u


def _crop_noise(rng: np.random.Generator, table: np.ndarray, h: int, w: int) -> np.ndarray:
    """A random (h, w, ...) crop of ``table`` (a view, do not write)."""
    oy = int(rng.integers(table.shape[0] - h + 1))
    ox = int(rng.integers(table.shape[1] - w + 1))
    return table[oy : oy + h, ox : ox + w]


def _pixel_noise(rng: np.random.Generator, shape: tuple[int, ...], kind: str = "normal") -> np.ndarray:
    """Per-pixel noise of ``shape`` ((h, w) or (h, w, 3)): "normal" N(0, 1) or "uniform" U[0, 1)."""
    h, w = shape[:2]
    g, u = _noise_table(max(h, 64), max(w, 64))
    if kind == "uniform":
        return _crop_noise(rng, u, h, w)
    crop = _crop_noise(rng, g, h, w)
    return crop if len(shape) == 3 else crop[..., int(rng.integers(3))]


@lru_cache(maxsize=512)
def _interp_table(n: int, cell: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Linear interpolation of ``n`` px from knots ``cell`` px apart: (n,) left knot, (n,) weight, #knots."""
    t = np.arange(n, dtype=np.float64) / cell
    i0 = t.astype(np.intp)
    f = (t - i0).astype(np.float32)
    i0.flags.writeable = False
    f.flags.writeable = False
    return i0, f, int(i0.max()) + 2


def _value_noise(rng: np.random.Generator, h: int, w: int, cell_y: float, cell_x: float) -> np.ndarray:
    """(h, w) smooth value noise in [-1, 1]: random knots every ``cell_y`` x ``cell_x`` px, bilinear."""
    iy, fy, ny = _interp_table(h, cell_y)
    ix, fx, nx = _interp_table(w, cell_x)
    g = rng.uniform(-1.0, 1.0, (ny, nx)).astype(np.float32)
    rows = g[iy] * (1 - fy)[:, None] + g[iy + 1] * fy[:, None]  # (h, nx)
    return rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx


def _texture(
    name: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float
) -> np.ndarray:
    """Additive intensity offset (same shape as ``yy``), roughly zero mean, amplitude ~20-30.

    ``yy``/``xx`` are absolute pixel coordinates of the region (full image for stuff, a bounding
    box for things); ``(cy, cx, r)`` is the instance centre and radius (things only).
    """
    if name == "gradient":  # smooth vertical gradient, lighter at the top
        h, w = yy.shape
        tilt = rng.uniform(-0.15, 0.15)
        return 40.0 * (0.5 - (yy - yy[0, 0]) / h) + tilt * (xx - (xx[0, 0] + w / 2))
    if name == "blades":  # vertical streaks: noise fine in x, coarse in y
        return 26.0 * _value_noise(rng, *yy.shape, 6.0, 1.0)
    if name == "waves":  # horizontal wavy stripes
        p = rng.uniform(6.0, 8.0)
        wob = 2.5 * np.sin(xx * (2 * np.pi / rng.uniform(20, 40)) + rng.uniform(0, 2 * np.pi))
        return 24.0 * np.sin((yy + wob) * (2 * np.pi / p) + rng.uniform(0, 2 * np.pi))
    if name == "speckle":  # fine grain with sparse dark and light dots
        u = _pixel_noise(rng, yy.shape, "uniform")
        dots = np.where(u < 0.06, np.float32(-60), np.where(u > 0.95, np.float32(45), np.float32(0)))
        return 5.0 * _pixel_noise(rng, yy.shape) + dots
    if name == "grain":  # asphalt: strong per-pixel grain + coarse patches
        return 16.0 * _pixel_noise(rng, yy.shape) + 10.0 * _value_noise(rng, *yy.shape, 5.0, 5.0)
    if name == "bricks":  # bricks 12x6 with light mortar and per-brick shade (separable index maths)
        bh, bw = 6, 12
        y = np.arange(yy.shape[0]) + int(yy[0, 0]) + int(rng.integers(bh))
        x = np.arange(yy.shape[1]) + int(xx[0, 0]) + int(rng.integers(bw))
        row = y // bh
        odd = (row % 2).astype(bool)[:, None]
        xo = x + bw // 2  # odd rows are shifted by half a brick
        col = np.where(odd, (xo // bw)[None, :], (x // bw)[None, :])
        mortar = (y % bh == 0)[:, None] | np.where(odd, (xo % bw == 0)[None, :], (x % bw == 0)[None, :])
        shade = rng.uniform(-14, 14, (int(row[-1]) + 1, int(col.max()) + 1)).astype(np.float32)
        return shade[row[:, None], col] + np.where(mortar, np.float32(43), np.float32(-12))
    if name == "shaded":  # sphere shading, highlight up-left
        d = np.hypot(yy - (cy - 0.35 * r), xx - (cx - 0.35 * r)) / r
        return 45.0 * (0.75 - d)
    if name == "hatched":  # diagonal stripes
        return np.where(((yy + xx).astype(np.int32) // 3) % 2 == 1, np.float32(24), np.float32(-24))
    if name == "checker":  # 4-px checkerboard
        cell = (yy.astype(np.int32) // 4) + (xx.astype(np.int32) // 4)
        return np.where(cell % 2 == 1, np.float32(24), np.float32(-24))
    if name == "leafy":  # blotchy foliage
        return 30.0 * _value_noise(rng, *yy.shape, 3.0, 3.0)
    if name == "rings":  # concentric rings
        return 24.0 * np.cos(np.hypot(yy - cy, xx - cx) * (2 * np.pi / 5.0))
    if name == "stripes":  # vertical stripes
        return np.where((xx.astype(np.int32) // 3) % 2 == 1, np.float32(24), np.float32(-24))
    if name == "planks":  # horizontal planks with dark seams
        return np.where((yy.astype(np.int32) % 5) == 0, np.float32(-35), np.float32(10))
    raise ValueError(f"unknown texture {name!r}")


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean silhouette inscribed in a disc of radius ``r``; ``dy``/``dx`` are offsets from the centre."""
    if shape == "circle":
        return dy * dy + dx * dx <= (0.85 * r) ** 2
    if shape == "square":
        a = 0.72 * r
        return (np.abs(dy) <= a) & (np.abs(dx) <= a)
    if shape == "rectangle":
        return (np.abs(dy) <= 0.45 * r) & (np.abs(dx) <= 0.9 * r)
    if shape == "triangle":  # isosceles, apex up
        t = (dy + r) / (1.8 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= 0.85 * r * t)
    if shape == "diamond":
        return np.abs(dx) / (0.7 * r) + np.abs(dy) / r <= 1.0
    if shape == "star":  # five points
        theta = np.arctan2(dx, -dy)
        sector = 2 * np.pi / 5
        t = np.abs(np.mod(theta, sector) / sector * 2.0 - 1.0)  # 1 at a point, 0 between points
        return np.hypot(dy, dx) <= r * (0.45 + 0.55 * t**1.5)
    if shape == "trapezoid":  # hull: wide deck on top, narrow keel below
        t = (dy + 0.5 * r) / r  # 0 at the deck, 1 at the keel
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * (0.95 - 0.4 * t))
    raise ValueError(f"unknown shape {shape!r}")


def _pick(rng: np.random.Generator, seq):
    """A uniformly random element of a sequence (cheaper than ``rng.choice`` on small lists)."""
    return seq[int(rng.random() * len(seq))]


_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_SMALL, _BIG = ("small", "tiny", "little"), ("big", "large", "huge")
_PLURAL_QUANTS = frozenset(_NUMBERS.values()) | {"many", "some", "several"}


@dataclass
class _Mention:
    """What a caption may say about one present category."""

    cat: int
    area: float  # fraction of the image
    count: int
    size: str | None  # "small" / "big" / None
    cy: float  # centroid row as a fraction of the height


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
        self.stuff_ids = [i for i, c in enumerate(self.categories) if c.kind == "stuff"]
        self.thing_ids = [i for i, c in enumerate(self.categories) if c.kind == "thing"]
        if not self.stuff_ids:
            raise ValueError("the world needs at least one stuff category")
        if len(self.categories) > 255:
            raise ValueError("at most 255 categories (uint8 labels, 255 = ignore)")

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
        h, w = self.height, self.width
        s = float(min(h, w))
        yy, xx = _grid(h, w)
        jit = self.color_jitter
        # region map: stuff regions 0..n_stuff-1, then one region per thing instance
        region_cat: list[int] = []
        region_col: list[np.ndarray] = []
        tex = np.empty((h, w), dtype=np.float32)  # additive texture offset per pixel

        # ---- stuff layout
        u = rng.random()
        n_stuff = min(1 if u < 0.2 else 2 if u < 0.65 else 3, len(self.stuff_ids))
        stuff = [int(c) for c in rng.choice(self.stuff_ids, n_stuff, replace=False)]
        layout = "bands" if n_stuff == 1 or rng.random() < 0.7 else "blobs"
        region = np.zeros((h, w), dtype=np.uint8)
        if layout == "bands":
            stuff.sort(key=lambda c: _ELEVATION.get(self.categories[c].name, 2.0) + rng.normal(0, 0.7))
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
                dy, dx = yy - cy, xx - cx
                wob = 1.0 + 0.15 * np.sin(rng.integers(2, 5) * np.arctan2(dy, dx) + rng.uniform(0, 2 * np.pi))
                region[(dy / a) ** 2 + (dx / b) ** 2 <= wob * wob] = k
        for k, cat in enumerate(stuff):
            c = self.categories[cat]
            region_cat.append(cat)
            region_col.append(self._jittered_color(rng, c))
            t = _texture(c.texture, rng, yy, xx, 0.0, 0.0, 0.0)
            if n_stuff == 1:
                tex = t.astype(np.float32)  # a fresh array (textures never return views)
            else:
                np.copyto(tex, t, where=region == k)

        # ---- things: several instances of 1-3 categories, placed without (much) overlap
        n_obj = int(rng.integers(self.min_objects, self.max_objects + 1)) if self.thing_ids else 0
        inst_area: list[float] = []  # full (unclipped) area of each instance
        if n_obj:
            n_kinds = min(int(rng.integers(1, 4)), n_obj, len(self.thing_ids))
            kinds = rng.choice(self.thing_ids, n_kinds, replace=False)
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
                m = _shape_mask(c.shape or "circle", by - cy, bx - cx, r)
                region[y0:y1, x0:x1][m] = len(region_cat)
                region_cat.append(cat)
                region_col.append(self._jittered_color(rng, c))
                np.copyto(tex[y0:y1, x0:x1], _texture(c.texture, rng, by, bx, cy, cx, r), where=m)
                inst_area.append(float(np.pi * r * r))

        # ---- compose: region colour + texture + global brightness + pixel noise
        img = np.take(np.asarray(region_col, dtype=np.float32), region, axis=0)  # (H, W, 3)
        tex += rng.uniform(-jit / 2, jit / 2) + 0.5  # global brightness (+0.5: round on cast)
        np.add(img, tex[..., None], out=img)
        if self.noise_std > 0:
            np.add(img, self.noise_std * _pixel_noise(rng, (h, w, 3)), out=img)
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
            mentions.append(_Mention(cat, frac, n, size, float(row_sum[cat] / area[cat] / h)))
        counts = {cat: counts.get(cat, 1) for cat in present}
        captions = self._captions(rng, mentions, layout)

        if self.ignore_boundary:
            edge = np.zeros((h, w), dtype=bool)
            edge[:, :-1] |= label[:, :-1] != label[:, 1:]
            edge[:-1, :] |= label[:-1, :] != label[1:, :]
            label[edge] = IGNORE_INDEX
        return Scene(image=image, label=label, captions=captions, present=present, counts=counts)

    def scenes(self, split: str = "train", start: int = 0, stop: int | None = None) -> Iterator[Scene]:
        """Iterate over scenes ``start..stop-1`` of ``split`` (forever if ``stop`` is None)."""
        i = start
        while stop is None or i < stop:
            yield self.scene(i, split)
            i += 1

    # ---------------------------------------------------------------- captions
    def _noun_phrase(self, rng: np.random.Generator, m: _Mention, use_name: bool) -> str:
        c = self.categories[m.cat]
        noun = c.name if use_name or not c.synonyms else _pick(rng, c.synonyms)
        words: list[str] = []
        if c.kind == "thing" and m.size is not None and rng.random() < 0.35:
            words.append(_pick(rng, _SMALL if m.size == "small" else _BIG))
        if c.adjectives and rng.random() < 0.5:
            # the colour word (first adjective) most often, so captions tie colour to the name
            other = c.adjectives[1:] or c.adjectives
            words.append(c.adjectives[0] if rng.random() < 0.6 else _pick(rng, other))
        if c.kind == "thing":
            if m.count > 1:
                if rng.random() < 0.85:
                    quant = _NUMBERS.get(m.count, "many")
                else:
                    quant = _pick(rng, ("some", "several"))
                return " ".join([quant, *words, plural(noun)])
            det = "the" if rng.random() < 0.2 else ("an" if (words or [noun])[0][0] in "aeiou" else "a")
            return " ".join([det, *words, noun])
        det = "the" if rng.random() < 0.65 else ""
        return " ".join([det, *words, noun]) if det else " ".join([*words, noun])

    @staticmethod
    def _join(parts: list[str]) -> str:
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def _one_caption(self, rng: np.random.Generator, mentions: list[_Mention], layout: str) -> str:
        cats = self.categories
        ranked = sorted(mentions, key=lambda m: -(m.area + (0.25 if cats[m.cat].kind == "thing" else 0.0)))
        chosen = [ranked[0]]
        for m in ranked[1:]:
            p = 0.7 if cats[m.cat].kind == "thing" else (0.75 if m.area > 0.3 else 0.45)
            if len(chosen) < 4 and rng.random() < p:
                chosen.append(m)
        use_name = [rng.random() < 0.85 for _ in chosen]
        if not any(use_name):
            use_name[0] = True
        nps = {m.cat: self._noun_phrase(rng, m, u) for m, u in zip(chosen, use_name)}
        things = [nps[m.cat] for m in chosen if cats[m.cat].kind == "thing"]
        stuff_m = [m for m in chosen if cats[m.cat].kind == "stuff"]
        stuff = [nps[m.cat] for m in stuff_m]
        every = [nps[m.cat] for m in chosen]
        if rng.random() < 0.3:
            every = [every[i] for i in rng.permutation(len(every))]
        All, T, S = self._join(every), things and self._join(things), stuff and self._join(stuff)

        options = [
            f"a photo of {All}",
            f"an image of {All}",
            f"this image shows {All}",
            f"a simple scene with {All}",
            f"a snapshot of {All}",
            f"a colorful scene showing {All}",
            f"{All}",
        ]
        if T and S:
            options += [
                f"{T} in front of {S}",
                f"{T} in the middle of {S}",
                f"{S} with {T}",
                f"{T} near {S}",
                f"a view of {S} with {T}",
                f"there {'are' if things[0].split()[0] in _PLURAL_QUANTS else 'is'} {T} and {S}",
            ]
        if len(things) >= 2:
            rest = self._join(things[1:])
            options += [f"{things[0]} next to {rest}", f"{things[0]} beside {rest}"]
        if T and not S:
            options += [f"close up of {T}", f"{T} seen from above"]
        if S and not T:
            options += [f"a view of {S}", f"a wide view of {S}", f"a landscape with {S}"]
        if layout == "bands" and len(stuff_m) >= 2 and not T:
            top, bottom = sorted(stuff_m, key=lambda m: m.cy)[0], sorted(stuff_m, key=lambda m: m.cy)[-1]
            if bottom.cy - top.cy > 0.2:
                up, down = nps[top.cat], nps[bottom.cat]
                options += [f"{up} above {down}", f"{down} below {up}"] * 2
        cap = _pick(rng, options)
        u = rng.random()
        if u < 0.12:
            cap += " on a sunny day"
        elif u < 0.2:
            cap += " in the afternoon"
        elif u < 0.26:
            cap += " seen from far away"
        return " ".join(cap.split())

    def _captions(
        self, rng: np.random.Generator, mentions: list[_Mention], layout: str, n: int = 5
    ) -> list[str]:
        """``n`` distinct captions (when possible) naming only the mentioned categories."""
        if not mentions:  # cannot happen with >= 1 stuff region covering >= 1% of the image
            return ["a photo"] * n
        caps: list[str] = []
        for _ in range(n):
            for _attempt in range(8):
                cap = self._one_caption(rng, mentions, layout)
                if cap not in caps:
                    break
            caps.append(cap)
        return caps

    def __repr__(self) -> str:
        return (
            f"SyntheticWorld(image_size=({self.height}, {self.width}), seed={self.seed}, "
            f"objects={self.min_objects}..{self.max_objects}, classes={self.num_classes})"
        )
