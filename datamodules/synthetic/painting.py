"""Painting the synthetic world: coordinate grids, noise, per-category textures and thing shapes.

Vectorised numpy over whole regions; every random draw comes from the scene's generator.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=16)
def coordinate_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
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


def pixel_noise(rng: np.random.Generator, shape: tuple[int, ...], kind: str = "normal") -> np.ndarray:
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


def paint_texture(
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
        u = pixel_noise(rng, yy.shape, "uniform")
        dots = np.where(u < 0.06, np.float32(-60), np.where(u > 0.95, np.float32(45), np.float32(0)))
        return 5.0 * pixel_noise(rng, yy.shape) + dots
    if name == "grain":  # asphalt: strong per-pixel grain + coarse patches
        return 16.0 * pixel_noise(rng, yy.shape) + 10.0 * _value_noise(rng, *yy.shape, 5.0, 5.0)
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
    if name == "drifts":  # snow: very smooth, faint undulation with rare bright glints
        u = pixel_noise(rng, yy.shape, "uniform")
        glint = np.where(u > 0.97, np.float32(30), np.float32(0))
        return 14.0 * _value_noise(rng, *yy.shape, 12.0, 24.0) + glint
    if name == "panels":  # umbrella: eight alternating radial panels
        sector = np.floor((np.arctan2(xx - cx, yy - cy) + np.pi) * (4.0 / np.pi)).astype(np.int32)
        return np.where(sector % 2 == 1, np.float32(26), np.float32(-26))
    if name == "windows":  # house: a grid of dark windows on a light facade
        window = ((yy.astype(np.int32) % 7) >= 3) & ((xx.astype(np.int32) % 7) >= 3)
        return np.where(window, np.float32(-45), np.float32(15))
    raise ValueError(f"unknown texture {name!r}")


def blob_mask(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, a: float, b: float) -> np.ndarray:
    """A wobbly ellipse with semi-axes ``a`` (rows) and ``b`` (columns): 2-4 lobes of +-15% radius at
    a random phase; ``dy``/``dx`` are offsets from the centre. Draws two numbers from ``rng``."""
    lobes = rng.integers(2, 5)
    wob = 1.0 + 0.15 * np.sin(lobes * np.arctan2(dy, dx) + rng.uniform(0, 2 * np.pi))
    return (dy / a) ** 2 + (dx / b) ** 2 <= wob * wob


def shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
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
    if shape == "dome":  # umbrella canopy: the upper half of a disc, flat underside
        return (dy * dy + dx * dx <= (0.95 * r) ** 2) & (dy <= 0.15 * r)
    if shape == "pentagon":  # house: a square body under a triangular roof
        body = (np.abs(dx) <= 0.65 * r) & (dy >= 0) & (dy <= 0.75 * r)
        t = (dy + 0.85 * r) / (0.85 * r)  # 0 at the ridge, 1 at the eaves
        roof = (t >= 0) & (t < 1) & (np.abs(dx) <= 0.85 * r * t)
        return body | roof
    raise ValueError(f"unknown shape {shape!r}")
