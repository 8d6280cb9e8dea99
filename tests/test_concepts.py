"""Tests for SimZSS concept extraction (ovseg.concepts)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

_NLTK_DATA = os.environ.get("NLTK_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "nltk_data")
os.environ["NLTK_DATA"] = _NLTK_DATA

import nltk  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from ovseg.concepts import (  # noqa: E402
    Concept,
    ConceptBank,
    ConceptExtractor,
    _load_tagger,
)

for _p in reversed(_NLTK_DATA.split(os.pathsep)):
    if _p not in nltk.data.path:
        nltk.data.path.insert(0, _p)

_CLIP = open_clip.tokenizer.SimpleTokenizer()


@pytest.fixture(scope="module")
def extractor() -> ConceptExtractor:
    return ConceptExtractor()


def _names(concepts: list[Concept]) -> list[str]:
    return [c.name for c in concepts]


def _decoded(caption: str, concept: Concept, context_length: int = 77) -> str:
    """The caption's BPE ids at the concept's positions, decoded back to text."""
    ids = open_clip.tokenize(caption, context_length=context_length)[0]
    return _CLIP.decode(ids[list(concept.token_positions)].tolist()).strip()


# ------------------------------------------------------------------------------ bank


def test_default_bank_loading() -> None:
    bank = ConceptBank()
    assert bank.num_lines == 574
    assert len(bank) == 573  # "bed" and "bed " merged
    assert bank.names == sorted(bank.names)
    assert all(n == n.strip().lower() for n in bank.names)
    assert bank.names.count("bed") == 1
    assert "bed " in bank and "bed" in bank and "BED" in bank
    assert bank.index("bed") == bank.names.index("bed")
    assert bank.index("traffic light") == bank.names.index("traffic light")
    assert bank.index("not a concept") is None
    assert "not a concept" not in bank and 3 not in bank
    assert bank[bank.index("dog")] == "dog"


def test_bank_from_path(tmp_path: Path) -> None:
    path = tmp_path / "bank.txt"
    path.write_text("Dog\n dog \ncat\n\nTraffic  Light \n", encoding="utf-8")
    bank = ConceptBank(path)
    assert bank.names == ["cat", "dog", "traffic light"]
    assert bank.num_lines == 4
    extractor = ConceptExtractor(str(path))
    assert _names(extractor.extract("two cats near traffic lights")) == ["cat", "traffic light"]
    assert ConceptBank.from_names(["b", "a ", "a"]).names == ["a", "b"]


# ------------------------------------------------------------------------ extraction


def test_plural(extractor: ConceptExtractor) -> None:
    concepts = extractor.extract("two dogs")
    assert concepts == [Concept("dog", extractor.bank.index("dog"), (2,))]
    assert _decoded("two dogs", concepts[0]) == "dogs"
    assert _names(extractor.extract("three red balls")) == ["ball"]
    assert _names(extractor.extract("Two giraffes in a field")) == ["giraffe", "field"]


def test_compound(extractor: ConceptExtractor) -> None:
    caption = "two traffic lights"
    (concept,) = extractor.extract(caption)
    assert concept.name == "traffic light"
    assert concept.label == extractor.bank.index("traffic light")
    assert concept.token_positions == (2, 3)  # SOT, "two", "traffic", "lights"
    assert _decoded(caption, concept) == "traffic lights"


def test_adjectives_dropped(extractor: ConceptExtractor) -> None:
    caption = "a big brown dog"
    assert extractor.extract(caption) == [Concept("dog", extractor.bank.index("dog"), (4,))]


def test_head_fallback_and_plural_bank_entries(extractor: ConceptExtractor) -> None:
    # compound not in the bank -> the head alone, with only the head's tokens
    (concept,) = extractor.extract("a dog bed")
    assert concept.name == "bed" and concept.token_positions == (3,)
    # bank entries that only exist in the plural
    assert _names(extractor.extract("the stairs and street lights")) == [
        "stairs",
        "street lights",
    ]


@pytest.mark.parametrize("caption", ["", "   ", "running quickly and happily", "!!! ...", "🐶"])
def test_no_concept(extractor: ConceptExtractor, caption: str) -> None:
    assert extractor.extract(caption) == []


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a café with two dogs", [("dog", "dogs")]),
        ("ein Hund 🐶 and a cat", [("cat", "cat")]),
        ("Ünïcödé “quotes” — a naïve DOG on the sofa", [("dog", "dog"), ("sofa", "sofa")]),
        ("a dog &amp; a cat", [("dog", "dog"), ("cat", "cat")]),
        ("日本の a bicycle 🚲🚲 near a fire hydrant", [("bicycle", "bicycle"), ("fire hydrant", "fire hydrant")]),
    ],
)
def test_non_ascii(extractor: ConceptExtractor, caption: str, expected: list[tuple[str, str]]) -> None:
    concepts = extractor.extract(caption)
    assert [(c.name, _decoded(caption, c)) for c in concepts] == expected


@pytest.mark.parametrize(
    "caption",
    [
        "A man riding a skateboard down a street next to a parking meter.",
        "Two giraffes and a fire hydrant near the swimming pool",
        "The people's hot dogs are on a wooden dining table, next to wine glasses.",
        "a   café's TV-monitor, a tvmonitor and  3 potted plants!!",
        "A woman holding an umbrella walks past the motorcycles & buses",
    ],
)
def test_bpe_round_trip(extractor: ConceptExtractor, caption: str) -> None:
    concepts = extractor.extract(caption)
    assert concepts
    cleaned = extractor.clean(caption)
    for concept in concepts:
        surface = _decoded(caption, concept)
        words = surface.split()
        assert len(words) == len(concept.name.split())
        # the decoded surface words occur, in order, in the cleaned caption
        assert surface in cleaned
        # and they are the concept's words (up to the head's inflection)
        assert words[:-1] == concept.name.split()[:-1]
        assert words[-1][:2] == concept.name.split()[-1][:2]


def test_truncation_long_caption(extractor: ConceptExtractor) -> None:
    caption = "a dog " + "is sitting very quietly and " * 20 + "next to a cat"
    ids = open_clip.tokenize(caption)[0]
    assert len(_CLIP.encode(caption)) > 77
    concepts = extractor.extract(caption)
    assert _names(concepts) == ["dog"]  # the cat is truncated away
    assert concepts[0].token_positions == (2,)
    assert _decoded(caption, concepts[0]) == "dog"
    assert int(ids[76]) == _CLIP.eot_token_id


def test_truncation_boundary() -> None:
    caption = "a dog and a cat"  # SOT a dog and a cat EOT -> "cat" at position 5
    kept = ConceptExtractor(context_length=7).extract(caption)
    assert _names(kept) == ["dog", "cat"] and kept[1].token_positions == (5,)
    assert _decoded(caption, kept[1], context_length=7) == "cat"
    # with 6 slots position 5 holds EOT: the cat is dropped, not misplaced
    assert open_clip.tokenize(caption, context_length=6)[0, 5] == _CLIP.eot_token_id
    assert _names(ConceptExtractor(context_length=6).extract(caption)) == ["dog"]
    # a multi-token concept partly cut off is dropped as a whole
    caption = "two giraffes and a fire hydrant"  # "fire hydrant" at (6, 7, 8)
    assert ConceptExtractor(context_length=10).extract(caption)[-1].token_positions == (6, 7, 8)
    assert _names(ConceptExtractor(context_length=9).extract(caption)) == ["giraffe"]


def test_limits() -> None:
    caption = "a dog, a cat, a horse and a fire hydrant"
    assert _names(ConceptExtractor(max_concepts=2).extract(caption)) == ["dog", "cat"]
    # "fire hydrant" has 3 BPE tokens: not fewer than 3, and "hydrant" is not in the bank
    assert _names(ConceptExtractor(max_tokens_per_concept=3).extract(caption)) == [
        "dog",
        "cat",
        "horse",
    ]


# --------------------------------------------------------------------------- tensors


def test_encode_shapes_and_padding() -> None:
    extractor = ConceptExtractor(max_concepts=4, max_tokens_per_concept=5)
    out = extractor.encode("two traffic lights and a big brown dog")
    assert set(out) == {"concept_labels", "concept_token_positions", "concept_token_mask"}
    assert out["concept_labels"].shape == (4,) and out["concept_labels"].dtype == torch.int64
    assert out["concept_token_positions"].shape == (4, 5)
    assert out["concept_token_positions"].dtype == torch.int64
    assert out["concept_token_mask"].shape == (4, 5)
    assert out["concept_token_mask"].dtype == torch.bool
    bank = extractor.bank
    assert out["concept_labels"].tolist() == [bank.index("traffic light"), bank.index("dog"), -1, -1]
    assert out["concept_token_positions"].tolist() == [
        [2, 3, 0, 0, 0],
        [8, 0, 0, 0, 0],
        [0] * 5,
        [0] * 5,
    ]
    assert out["concept_token_mask"].sum(1).tolist() == [2, 1, 0, 0]
    assert (out["concept_token_positions"][~out["concept_token_mask"]] == 0).all()

    empty = extractor.encode("")
    assert (empty["concept_labels"] == -1).all() and not empty["concept_token_mask"].any()
    batch = default_collate([out, empty])
    assert batch["concept_token_positions"].shape == (2, 4, 5)


# ---------------------------------------------------------------------- batch / misc

_CAPTIONS = [
    "A man riding a skateboard down a street.",
    "two dogs playing with a frisbee in the grass",
    "",
    "ein Hund 🐶 and a cat",
    "A kitchen with a refrigerator, an oven and a microwave.",
    "nothing to see here",
    "Two traffic lights above a busy road with cars and buses.",
] * 5


def test_extract_many_workers_match(extractor: ConceptExtractor) -> None:
    serial = extractor.extract_many(_CAPTIONS)
    assert serial == [extractor.extract(c) for c in _CAPTIONS]
    parallel = extractor.extract_many(_CAPTIONS, num_workers=2, chunksize=4)
    assert parallel == serial
    assert extractor.extract_many(_CAPTIONS[:3], progress=True) == serial[:3]
    assert extractor.extract_many([], num_workers=2) == []


def test_pickle_round_trip(extractor: ConceptExtractor) -> None:
    clone = pickle.loads(pickle.dumps(extractor))
    assert clone.extract(_CAPTIONS[1]) == extractor.extract(_CAPTIONS[1])


def test_missing_tagger_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setattr(nltk, "download", lambda *args, **kwargs: False)  # offline: no real download in tests
    with pytest.raises(LookupError, match="averaged_perceptron_tagger_eng"):
        _load_tagger()
