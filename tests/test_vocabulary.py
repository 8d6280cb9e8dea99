"""Vocabularies, templates, synonyms and the text-embedding cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ovseg.vocabulary import (
    TextEmbeddingCache,
    Vocabulary,
    embed_queries,
    imagenet_templates,
    reduce_synonyms,
    resolve_templates,
)


def test_imagenet_templates_are_the_80_published_ones():
    templates = imagenet_templates()
    assert len(templates) == 80
    assert templates[0] == "a bad photo of a {}."
    assert templates[-1] == "a tattoo of the {}."
    assert resolve_templates("imagenet80") == templates
    assert resolve_templates("single") == ("a photo of a {}.",)
    assert resolve_templates(["{} here"]) == ("{} here",)
    with pytest.raises(ValueError, match="preset"):
        resolve_templates("imagenet")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["no slot"])


def test_class_files_and_synonyms():
    voc21 = Vocabulary.from_file("packaged:voc21", background_threshold=0.5)
    assert len(voc21) == 21
    assert voc21.classes[0][:2] == ("sky", "wall")  # SCLIP's background as a list of stuff names
    assert "television monitor" in voc21.classes[-1]
    assert len(Vocabulary.from_file("packaged:ade20k")) == 150
    assert len(Vocabulary.from_file("packaged:coco_stuff")) == 171
    vocabulary = Vocabulary.from_names(["cat, kitty", ["dog", "puppy"], "car"])
    assert vocabulary.queries == ("cat", "kitty", "dog", "puppy", "car")
    assert vocabulary.query_to_class.tolist() == [0, 0, 1, 1, 2]
    assert vocabulary.index_of("puppy") == 1


def test_vocabulary_errors_are_clear():
    with pytest.raises(ValueError, match="empty"):
        Vocabulary.from_names([])
    with pytest.raises(ValueError, match="duplicated class name 'cat'"):
        Vocabulary.from_names(["cat", "dog, cat"])
    with pytest.raises(ValueError, match="no name"):
        Vocabulary.from_names(["cat", ""])
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        Vocabulary.from_file("nowhere.txt")
    # Only with a background threshold may class 0 be nameless.
    assert Vocabulary.from_names(["", "cat"], background_threshold=0.3).display_names == ("background", "cat")


def test_reduce_synonyms_takes_the_max_and_leaves_nameless_classes_at_minus_inf():
    scores = torch.tensor([0.1, 0.7, 0.3, 0.2, 0.9]).view(1, 5, 1, 1)
    out = reduce_synonyms(scores, torch.tensor([1, 1, 2, 2, 3]), num_classes=4)
    assert out.flatten().tolist()[1:] == pytest.approx([0.7, 0.3, 0.9])
    assert out.flatten()[0] == float("-inf")


def test_embeddings_average_normalised_templates_then_renormalise():
    vocabulary = Vocabulary.from_names(["cat", "dog"], templates=["a {}.", "the {}!", "{}"])
    table = {
        text: torch.randn(8) * (i + 1)
        for i, text in enumerate([t.format(n) for n in ("cat", "dog") for t in vocabulary.templates])
    }
    out = embed_queries(vocabulary, lambda prompts: torch.stack([table[p.text] for p in prompts]), batch_size=2)
    expected = torch.stack(
        [
            F.normalize(
                torch.stack([F.normalize(table[t.format(n)], dim=0) for t in vocabulary.templates]).mean(0), dim=0
            )
            for n in ("cat", "dog")
        ]
    )
    torch.testing.assert_close(out, expected)


def test_cache_encodes_once_per_encoder_state():
    calls = []

    def encode(prompts):
        calls.append(len(prompts))
        return torch.randn(len(prompts), 4)

    cache = TextEmbeddingCache()
    vocabulary = Vocabulary.from_names(["a", "b"], templates="imagenet80")
    first = cache.get(vocabulary, encode, torch.device("cpu"))
    second = cache.get(vocabulary, encode, torch.device("cpu"))
    assert first is second and sum(calls) == 160
    cache.get(Vocabulary.from_names(["a", "b"]), encode, torch.device("cpu"))  # other templates
    assert sum(calls) == 162
    cache.invalidate()
    assert len(cache) == 0
    third = cache.get(vocabulary, encode, torch.device("cpu"))
    assert sum(calls) == 322 and not torch.equal(first, third)
