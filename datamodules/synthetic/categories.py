"""The categories of the synthetic world, its split streams, and the scene record.

Every category has a colour **and** a local texture (so a frozen, randomly initialised ViT can
separate them); things also have a shape (which only helps methods that train their image side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ovseg.datamodules.synthetic.world import SyntheticWorld

IGNORE_INDEX = 255
#: background of close-up scenes: CLIP's mean colour (OpenAI normalisation), i.e. 0 after normalising,
#: the fill of masked region crops (ZegFormer's CLIP branch)
PLAIN_BACKGROUND = (123, 117, 104)


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
# ruff: noqa: E501  (one aligned row per category reads better than wrapped ones)
CATEGORIES: tuple[Category, ...] = (
    # stuff
    Category("sky",    ("heavens",),               "stuff", (110, 175, 235), "gradient", None, True,  ("blue", "clear", "cloudless")),
    Category("grass",  ("lawn", "meadow"),         "stuff", (80, 175, 60),   "blades",   None, True,  ("green", "fresh", "tall")),
    Category("sea",    ("ocean",),                 "stuff", (25, 55, 140),   "waves",    None, True,  ("blue", "dark", "calm")),
    Category("sand",   ("beach", "dune"),          "stuff", (225, 200, 140), "speckle",  None, False, ("yellow", "dry", "soft")),
    Category("road",   ("street", "asphalt"),      "stuff", (90, 90, 95),    "grain",    None, True,  ("gray", "empty", "paved")),
    Category("wall",   ("brickwork",),             "stuff", (150, 60, 45),   "bricks",   None, True,  ("red", "old", "tall")),
    Category("snow",   ("snowfield", "snowdrift"), "stuff", (170, 215, 240), "drifts",   None, False, ("pale", "cold", "powdery")),
    # things
    Category("ball",   ("sphere",),                "thing", (235, 40, 40),   "shaded",   "circle",    True,  ("red", "round", "shiny")),
    Category("box",    ("crate", "carton"),        "thing", (205, 135, 45),  "hatched",  "square",    True,  ("brown", "square", "wooden")),
    Category("car",    ("automobile", "vehicle"),  "thing", (235, 225, 30),  "checker",  "rectangle", True,  ("yellow", "parked", "shiny")),
    Category("tree",   ("pine", "fir"),            "thing", (20, 95, 40),    "leafy",    "triangle",  True,  ("green", "dark", "leafy")),
    Category("flower", ("blossom", "daisy"),       "thing", (240, 90, 200),  "rings",    "star",      True,  ("pink", "pretty", "blooming")),
    Category("kite",   ("glider",),                "thing", (125, 40, 190),  "stripes",  "diamond",   False, ("purple", "flying", "colorful")),
    Category("boat",   ("dinghy", "vessel"),       "thing", (240, 240, 235), "planks",   "trapezoid", True,  ("white", "wooden", "sturdy")),
    Category("umbrella", ("parasol", "sunshade"),  "thing", (20, 165, 160),  "panels",   "dome",      False, ("teal", "open", "striped")),
    Category("house",  ("cottage", "cabin"),       "thing", (120, 120, 40),  "windows",  "pentagon",  True,  ("olive", "small", "cozy")),
)
# fmt: on

TEXTURES: tuple[str, ...] = tuple(c.texture for c in CATEGORIES)
SHAPES: tuple[str, ...] = tuple(c.shape for c in CATEGORIES if c.shape is not None)

# Stuff "elevation": small values tend to be painted at the top of a banded scene.
ELEVATION = {"sky": 0.0, "wall": 1.0, "snow": 1.5, "sea": 2.0, "grass": 3.0, "road": 3.5, "sand": 4.0}

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


def caption_choice(world: SyntheticWorld, index: int, split: str = "train", epoch: int = 0, n: int = 5) -> int:
    """Which of a scene's ``n`` captions to use: random per (seed, index, epoch) for train, else 0."""
    if canonical_split(split) != "train":
        return 0
    return int(np.random.default_rng((world.seed, int(index), int(epoch))).integers(n))


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
