"""COCO-like captions of a synthetic scene: they name only categories present in it.

:class:`CaptionWriter` turns the scene's mentions (category, area, count, size, position) into
``n`` distinct captions with names, synonyms, counts, sizes, colours and spatial relations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ovseg.datamodules.synthetic.categories import Category


def plural(word: str) -> str:
    """English plural of a (simple) noun: ball -> balls, box -> boxes, dinghy -> dinghies."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _pick(rng: np.random.Generator, seq):
    """A uniformly random element of a sequence (cheaper than ``rng.choice`` on small lists)."""
    return seq[int(rng.random() * len(seq))]


_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
_SMALL, _BIG = ("small", "tiny", "little"), ("big", "large", "huge")
_PLURAL_QUANTS = frozenset(_NUMBERS.values()) | {"many", "some", "several"}


@dataclass
class Mention:
    """What a caption may say about one present category."""

    cat: int
    area: float  # fraction of the image
    count: int
    size: str | None  # "small" / "big" / None
    cy: float  # centroid row as a fraction of the height


class CaptionWriter:
    """Captions of scenes of a world with these ``categories``."""

    def __init__(self, categories: tuple[Category, ...]) -> None:
        self.categories = categories

    def _noun_phrase(self, rng: np.random.Generator, m: Mention, use_name: bool) -> str:
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

    def _one_caption(self, rng: np.random.Generator, mentions: list[Mention], layout: str) -> str:
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
        if layout == "close-up":  # one category on a plain background (SyntheticWorld.close_up)
            options += [f"close up of {All}", f"a close-up photo of {All}", f"{All} on a plain background"]
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

    def captions(self, rng: np.random.Generator, mentions: list[Mention], layout: str, n: int = 5) -> list[str]:
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
