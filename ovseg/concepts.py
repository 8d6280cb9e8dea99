"""SimZSS concept extraction: caption -> bank concepts -> CLIP-BPE token positions.

This is the offline step of SimZSS (reference brief, section 2.1), re-done with NLTK
instead of spaCy:

1. the caption is cleaned and lowercased exactly as the OpenCLIP tokenizer does it
   (ftfy, HTML unescape, whitespace squeeze, lowercase);
2. it is split into words with a data-free regular expression, POS-tagged with NLTK's
   averaged perceptron tagger and chunked into noun phrases with ``nltk.RegexpParser``;
3. each noun phrase is reduced to its concept: the noun modifier directly before the
   head noun (if any) followed by the singular head ("two traffic lights" ->
   "traffic light", "a big brown dog" -> "dog");
4. only concepts present in the concept bank are kept, and each is mapped to the
   positions of its words' BPE tokens in ``open_clip.tokenize(caption)`` (position 0 is
   ``<start_of_text>``), by aligning character spans of the NLTK words with the CLIP
   words of the same cleaned text.

Bank look-up order for a noun phrase with modifier ``m``, surface head ``h`` and singular
head ``s`` (first match wins):

* ``"m s"`` -- the reference concept (compound + lemma);
* ``"m h"`` -- plural compound bank entries such as "street lights";
* ``"s"``   -- the head alone when the compound is not in the bank (a deliberate choice:
  "a dog bed" without "dog bed" in the bank still yields "bed");
* ``"h"``   -- plural-only bank entries such as "stairs", "boots", "leaves", which the
  reference (lemma only) can never produce.

The singular comes from ``inflect``. The tagger often labels rarer plurals as singular
("giraffes"/NN), so for a head tagged singular the surface form is tried first and the
inflect singular second (so "bus"/NN stays "bus" rather than "bu").

The positions of a compound concept are those of the modifier's and the head's tokens; a
head-only concept uses only the head's tokens. Positions are always of the surface words
("lights", not "light").

``rules="release"`` applies the official release's rules instead (``make_shards_spacy.py`` and
``data.py``'s bank filter, tileb1/simzss @2142ac5) on the same noun chunks (:meth:`ConceptExtractor.noun_chunks`;
the release parses with spaCy ``en_core_web_trf``, which cannot be installed here):

* a chunk's concept is its compound modifier (the noun directly before the head) and the head's
  lemma, kept only when that exact string is in the bank (no fall-back to the head alone);
* the 32-concept limit counts every noun chunk (bank or not), and a chunk whose words or concept
  take 16 or more BPE tokens is skipped, before the bank filter;
* token positions come from a left-to-right search of the caption's CLIP words for the compound
  and head surface words, which continues where the previous concept's search stopped; a word
  that the search cannot find (e.g. "3d", split by CLIP into "3" and "d") ends the caption's
  extraction.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.resources
import logging
import multiprocessing as mp
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import regex
import torch
from torch import Tensor

from ovseg.errors import MissingResourceError
from ovseg.io import atomic_torch_save

log = logging.getLogger(__name__)

__all__ = [
    "CONCEPT_KEYS",
    "DEFAULT_BANK_RESOURCE",
    "NP_GRAMMAR",
    "Concept",
    "ConceptBank",
    "ConceptCache",
    "ConceptExtractor",
    "NounChunk",
    "bank_fingerprint",
    "concept_meta",
    "concepts_from_lists",
    "concepts_to_lists",
    "default_concepts_path",
    "meta_mismatch",
    "stored_concept_fields",
    "use_nltk_paths",
]

#: Packaged default concept bank, relative to package ``ovseg``.
DEFAULT_BANK_RESOURCE = "resources/simzss_concept_bank.txt"

#: Noun-phrase chunk grammar: determiners/numbers, then adjectives/participles, then nouns.
NP_GRAMMAR = r"NP: {<DT|PDT|PRP\$|CD>*<JJ.*|VBN|VBG>*<NN.*>+}"

_NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
_PLURAL_TAGS = frozenset({"NNS", "NNPS"})
# Tags accepted for the word directly before the head to count as its noun modifier.
# VBG covers nominal gerunds the tagger often emits ("swimming pool", "parking meter");
# such a compound is only used when it is in the bank, otherwise the head alone is used.
_MODIFIER_TAGS = _NOUN_TAGS | {"VBG"}

# Data-free word tokenizer roughly following Penn-Treebank conventions (what the tagger
# was trained on): clitics split off ("dog's" -> "dog" "'s", "don't" -> "do" "n't"),
# hyphenated words kept whole, every other non-space character its own token.
_WORD_RE = regex.compile(
    r"[\p{L}\p{M}\p{N}]+?(?=n't\b)"
    r"|n't\b"
    r"|'(?:s|re|ve|m|ll|d)\b"
    r"|\p{N}+(?:[.,:]\p{N}+)*(?![\p{L}\p{M}])"
    r"|[\p{L}\p{M}\p{N}]+(?:-[\p{L}\p{M}\p{N}]+)*"
    r"|\S",
    regex.IGNORECASE,
)

_HAS_ALNUM = regex.compile(r"[\p{L}\p{N}]")

#: NLTK's resource name of the English part-of-speech tagger
TAGGER_RESOURCE = "averaged_perceptron_tagger_eng"
#: seconds the one automatic download of the tagger may take
TAGGER_DOWNLOAD_TIMEOUT_S = 60.0

_TAGGER_HELP = (
    "NLTK's English part-of-speech tagger ('averaged_perceptron_tagger_eng'), needed to extract SimZSS "
    "concepts from captions, is not installed{reason}: run "
    "`python -c \"import nltk; nltk.download('averaged_perceptron_tagger_eng')\"` on a machine with network "
    "access, or set NLTK_DATA to a folder holding taggers/averaged_perceptron_tagger_eng (searched: {searched})"
)


@dataclass(frozen=True)
class NounChunk:
    """One noun phrase of a caption, as the concept rules see it.

    ``words`` are the chunk's words (lowercased surface forms), ``modifier`` the noun modifier
    directly before the head (the release's last ``compound`` child) or ``None``, ``head`` the head
    noun's surface form and ``lemma`` its singular.
    """

    words: tuple[str, ...]
    modifier: str | None
    head: str
    lemma: str


@dataclass(frozen=True)
class Concept:
    """One bank concept found in a caption.

    ``token_positions`` index the caption's CLIP-BPE token sequence (0 = start of text).
    """

    name: str
    label: int
    token_positions: tuple[int, ...]


def _normalise_name(name: str) -> str:
    return " ".join(name.split()).lower()


class ConceptBank:
    """The concept vocabulary: sorted unique, stripped, lowercased names; label = index.

    Args:
        path: a bank text file (one concept per line); ``None`` loads the packaged
            default ``ovseg/resources/simzss_concept_bank.txt``.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is None:
            text = importlib.resources.files("ovseg").joinpath(DEFAULT_BANK_RESOURCE).read_text(encoding="utf-8")
            self.source = f"ovseg/{DEFAULT_BANK_RESOURCE}"
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            self.source = os.fspath(path)
        self._set_names(text.splitlines())

    @classmethod
    def from_names(cls, names: Iterable[str]) -> ConceptBank:
        """Builds a bank from an iterable of names (same normalisation as a file)."""
        bank = cls.__new__(cls)
        bank.source = "<names>"
        bank._set_names(names)
        return bank

    def _set_names(self, lines: Iterable[str]) -> None:
        raw = [_normalise_name(line) for line in lines]
        raw = [name for name in raw if name]
        #: number of non-empty lines (the reference uses it as ``n_classes``).
        self.num_lines: int = len(raw)
        #: sorted unique names; a name's label is its index here.
        self.names: list[str] = sorted(set(raw))
        self._index: dict[str, int] = {name: i for i, name in enumerate(self.names)}

    def index(self, name: str) -> int | None:
        """Label of ``name`` (normalised like the bank), or ``None`` when absent."""
        label = self._index.get(name)
        if label is None:
            label = self._index.get(_normalise_name(name))
        return label

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.index(name) is not None

    def __iter__(self):
        return iter(self.names)

    def __getitem__(self, label: int) -> str:
        return self.names[label]

    def __repr__(self) -> str:
        return f"ConceptBank({self.source!r}, {len(self)} concepts)"


# --------------------------------------------------------------------------- cached tools


class TaggerNotFoundError(MissingResourceError):
    """NLTK's tagger is missing and could not be downloaded; the message (one line) says what to do."""


_DOWNLOAD_TRIED = False


def download_tagger(timeout_s: float = TAGGER_DOWNLOAD_TIMEOUT_S) -> str | None:
    """Try once per process to download the tagger with ``nltk.download``, quietly (NLTK's own
    messages are swallowed), for at most ``timeout_s`` seconds. Returns None on success, else why not."""
    global _DOWNLOAD_TRIED
    if _DOWNLOAD_TRIED:
        return "and the automatic download already failed in this process"
    _DOWNLOAD_TRIED = True
    import contextlib
    import io
    import threading

    import nltk

    outcome: list[object] = []
    sink = io.StringIO()

    def fetch() -> None:
        try:
            outcome.append(bool(nltk.download(TAGGER_RESOURCE, quiet=True, raise_on_error=True, print_error_to=sink)))
        except Exception as error:  # noqa: BLE001 - no network, a refused proxy, a full disk: all reported
            outcome.append(error)

    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        thread = threading.Thread(target=fetch, name="ovseg-nltk-download", daemon=True)
        thread.start()
        thread.join(timeout_s)
    if not outcome:
        return f"and the automatic download did not finish within {timeout_s:.0f} s"
    if outcome[0] is True:
        return None
    detail = " ".join(str(outcome[0]).split())[:200] if isinstance(outcome[0], Exception) else "nltk.download failed"
    return f"and the automatic download failed ({detail})"


def _load_tagger() -> Any:
    """NLTK's English averaged perceptron tagger; if missing, one quiet download attempt, then
    :class:`TaggerNotFoundError` with a one-line message naming the command and NLTK_DATA."""
    from nltk.tag.perceptron import PerceptronTagger

    try:
        return PerceptronTagger(lang="eng")
    except LookupError:
        pass
    reason = download_tagger()
    if reason is None:
        try:
            return PerceptronTagger(lang="eng")
        except LookupError:
            reason = "and the downloaded copy cannot be read"
    import nltk

    searched = ", ".join(nltk.data.path[:3]) + (", ..." if len(nltk.data.path) > 3 else "")
    raise TaggerNotFoundError(_TAGGER_HELP.format(reason=f" {reason}" if reason else "", searched=searched))


@lru_cache(maxsize=1)
def _get_tagger() -> Any:
    return _load_tagger()


@lru_cache(maxsize=1)
def _get_chunker() -> Any:
    import nltk

    return nltk.RegexpParser(NP_GRAMMAR)


@lru_cache(maxsize=1)
def _get_clip_tokenizer() -> Any:
    import open_clip.tokenizer as clip_tokenizer

    # Reuse the instance behind ``open_clip.tokenize`` (same BPE, no second load).
    shared = getattr(clip_tokenizer, "_tokenizer", None)
    if isinstance(shared, clip_tokenizer.SimpleTokenizer):
        return shared
    return clip_tokenizer.SimpleTokenizer()


@lru_cache(maxsize=1)
def _get_inflect() -> Any:
    import inflect

    return inflect.engine()


@lru_cache(maxsize=1 << 16)
def _singular(word: str) -> str:
    """Singular of a plural noun (``word`` itself when inflect finds no plural)."""
    try:
        singular = _get_inflect().singular_noun(word)
    except Exception:  # inflect rejects some odd strings (e.g. empty, punctuation)
        return word
    return singular if isinstance(singular, str) and singular else word


def _clip_clean(tokenizer: Any, text: str) -> str:
    """Cleans ``text`` exactly as ``tokenizer.encode`` does before splitting it."""
    clean_fn = getattr(tokenizer, "clean_fn", None)
    if clean_fn is not None:
        return clean_fn(text)
    from open_clip.tokenizer import basic_clean, whitespace_clean

    return whitespace_clean(basic_clean(text)).lower()


# ----------------------------------------------------------------------------- extractor


class ConceptExtractor:
    """Finds bank concepts in captions and their CLIP-BPE token positions.

    Args:
        bank: a :class:`ConceptBank`, a bank file path, or ``None`` for the packaged bank.
        context_length: CLIP context length; tokens at or beyond ``context_length - 1``
            are truncated away (the last slot is EOT), so concepts touching them are dropped.
        max_concepts: at most this many concepts per caption (the first ones in the caption).
        max_tokens_per_concept: a concept must have fewer BPE tokens than this.
        rules: ``"ovseg"`` (the look-up order in the module docstring) or ``"release"`` (the
            official release's rules, see the module docstring).
    """

    def __init__(
        self,
        bank: ConceptBank | str | os.PathLike[str] | None = None,
        context_length: int = 77,
        max_concepts: int = 32,
        max_tokens_per_concept: int = 16,
        rules: Literal["ovseg", "release"] = "ovseg",
    ) -> None:
        if rules not in ("ovseg", "release"):
            raise ValueError(f"concept rules must be 'ovseg' or 'release', got {rules!r}")
        self.rules = rules
        if context_length < 3:
            raise ValueError("context_length must be at least 3 (SOT, a token, EOT)")
        if max_concepts < 1 or max_tokens_per_concept < 2:
            raise ValueError("max_concepts must be >= 1 and max_tokens_per_concept >= 2")
        self.bank = bank if isinstance(bank, ConceptBank) else ConceptBank(bank)
        self.context_length = int(context_length)
        self.max_concepts = int(max_concepts)
        self.max_tokens_per_concept = int(max_tokens_per_concept)
        self._init_tools()

    def _init_tools(self) -> None:
        self._tagger = _get_tagger()
        self._chunker = _get_chunker()
        self._tokenizer = _get_clip_tokenizer()

    # Pickle only the configuration (for DataLoader / multiprocessing workers); the
    # tagger, chunker and tokenizer are rebuilt (or taken from the process cache).
    def __getstate__(self) -> dict[str, Any]:
        return {
            "bank": self.bank,
            "context_length": self.context_length,
            "max_concepts": self.max_concepts,
            "max_tokens_per_concept": self.max_tokens_per_concept,
            "rules": self.rules,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("rules", "ovseg")
        self.__dict__.update(state)
        self._init_tools()

    def __repr__(self) -> str:
        return (
            f"ConceptExtractor(bank={self.bank!r}, context_length={self.context_length}, "
            f"max_concepts={self.max_concepts}, "
            f"max_tokens_per_concept={self.max_tokens_per_concept}, rules={self.rules!r})"
        )

    # ------------------------------------------------------------------ text processing

    def clean(self, caption: str) -> str:
        """The caption as the CLIP tokenizer sees it (ftfy-fixed, squeezed, lowercased)."""
        return _clip_clean(self._tokenizer, caption)

    def is_cut(self, caption: str) -> bool:
        """Whether ``caption`` has more BPE tokens than the context holds (SOT + tokens + EOT): the text
        encoder sees it cut, and concepts in the cut part are dropped."""
        return bool(caption) and len(self._tokenizer.encode(self.clean(caption))) > self.context_length - 2

    def _clip_words(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """CLIP words of cleaned ``text``: their char starts/ends and first BPE position."""
        tok = self._tokenizer
        byte_encoder = tok.byte_encoder
        starts: list[int] = []
        ends: list[int] = []
        first_pos: list[int] = []
        pos = 1  # position 0 is <start_of_text>
        for m in tok.pat.finditer(text):
            word = "".join(byte_encoder[b] for b in m.group().encode("utf-8"))
            starts.append(m.start())
            ends.append(m.end())
            first_pos.append(pos)
            pos += len(tok.bpe(word).split(" "))
        first_pos.append(pos)  # sentinel: one past the last content token
        return starts, ends, first_pos

    @staticmethod
    def _word_positions(span: tuple[int, int], clip: tuple[list[int], list[int], list[int]]) -> tuple[int, ...]:
        """BPE positions of every CLIP word overlapping the character ``span``."""
        starts, ends, first_pos = clip
        begin, end = span
        i = bisect.bisect_right(ends, begin)  # first CLIP word ending after ``begin``
        j = i
        while j < len(starts) and starts[j] < end:
            j += 1
        if i == j:
            return ()
        return tuple(range(first_pos[i], first_pos[j]))

    def _candidates(
        self, words: Sequence[str], tags: Sequence[str], lo: int, hi: int
    ) -> list[tuple[str, tuple[int, ...]]]:
        """Bank-lookup candidates ``(name, word indices)`` for the noun phrase [lo, hi)."""
        head = hi - 1  # the grammar ends every chunk with a noun; search to be safe
        while head >= lo and tags[head] not in _NOUN_TAGS:
            head -= 1
        if head < lo:
            return []
        surface = words[head]
        singular = _singular(surface)
        if singular == surface:
            heads = [surface]
        elif tags[head] in _PLURAL_TAGS:
            heads = [singular, surface]
        else:  # tagged singular, yet inflect sees a plural ("giraffes"/NN, "bus"/NN)
            heads = [surface, singular]
        out: list[tuple[str, tuple[int, ...]]] = []
        mod = head - 1
        if mod >= lo and tags[mod] in _MODIFIER_TAGS:
            out += [(f"{words[mod]} {h}", (mod, head)) for h in heads]
        out += [(h, (head,)) for h in heads]
        return out

    def _parse(self, text: str) -> tuple[list[Any], list[str], list[str], Any] | None:
        """Words (regex matches and strings), POS tags and the NP chunk tree of cleaned ``text``."""
        matches = list(_WORD_RE.finditer(text))
        if not matches:
            return None
        words = [m.group() for m in matches]
        tags = [
            tag if _HAS_ALNUM.search(word) else "SYM"  # emoji etc. are never nouns
            for word, (_, tag) in zip(words, self._tagger.tag(words))
        ]
        return matches, words, tags, self._chunker.parse(list(zip(words, tags)))

    def noun_chunks(self, caption: str) -> list[NounChunk]:
        """The noun phrases of ``caption`` (cleaned as CLIP does) in order, with modifier, head and lemma.

        The lemma of a head tagged plural is its singular; a head tagged singular keeps its surface
        form unless the tagger missed a plural in ``-s`` (not ``-ss``/``-us``/``-is``) that inflect
        can make singular ("giraffes"/NN -> "giraffe", "bus"/NN stays "bus").
        """
        parsed = self._parse(self.clean(caption)) if caption else None
        if parsed is None:
            return []
        _, words, tags, tree = parsed
        chunks: list[NounChunk] = []
        k = 0
        for node in tree:
            if not hasattr(node, "label"):
                k += 1
                continue
            lo, hi = k, k + len(node)
            k = hi
            head = hi - 1
            while head >= lo and tags[head] not in _NOUN_TAGS:
                head -= 1
            if head < lo:
                continue
            surface = words[head]
            singular = _singular(surface)
            tagged_plural = tags[head] in _PLURAL_TAGS
            missed_plural = surface.endswith("s") and not surface.endswith(("ss", "us", "is"))
            lemma = singular if tagged_plural or missed_plural else surface
            modifier = words[head - 1] if head - 1 >= lo and tags[head - 1] in _MODIFIER_TAGS else None
            chunks.append(NounChunk(tuple(words[lo:hi]), modifier, surface, lemma))
        return chunks

    def _release_clip_words(self, text: str) -> list[tuple[str, tuple[int, ...]]]:
        """The complete CLIP words of ``open_clip.tokenize(text)``: their BPE strings (byte-level
        alphabet, ``</w>`` removed) and positions; a word cut by truncation and what follows is left out."""
        tok = self._tokenizer
        ids = tok([text], context_length=self.context_length)[0].tolist()
        words: list[tuple[str, tuple[int, ...]]] = []
        pieces: list[str] = []
        positions: list[int] = []
        for position, token in enumerate(ids[1:], start=1):
            piece = tok.decoder[token]
            pieces.append(piece.replace("</w>", ""))
            positions.append(position)
            if piece.endswith("</w>"):
                words.append(("".join(pieces), tuple(positions)))
                pieces, positions = [], []
        return words

    @staticmethod
    def _release_find(
        word: str, clip_words: Sequence[tuple[str, tuple[int, ...]]], start: int
    ) -> tuple[tuple[int, ...], int] | None:
        """The release's search for ``word`` among ``clip_words[start:]``: (positions, next start), or
        ``None`` when it runs out of words. A CLIP word that is a proper prefix of ``word`` is glued (with
        a space) to the next one before comparing, and both are dropped when that fails."""
        joined, positions = "", ()
        for index in range(start, len(clip_words)):
            piece, piece_positions = clip_words[index]
            joined, positions = joined + piece, positions + piece_positions
            if joined == word:
                return positions, index + 1
            if word.startswith(joined):
                joined += " "
            else:
                joined, positions = "", ()
        return None

    def _extract_release(self, caption: str) -> list[Concept]:
        """Bank concepts of ``caption`` under the official release's rules (module docstring)."""
        chunks = self.noun_chunks(caption)
        if not chunks:
            return []
        clip_words = self._release_clip_words(self.clean(caption))
        chunk_cursor = concept_cursor = 0
        kept = 0
        concepts: list[Concept] = []
        for chunk in chunks:
            chunk_tokens = 0
            for word in chunk.words:
                found = self._release_find(word, clip_words, chunk_cursor)
                if found is None:  # the chunk-token search is exhausted for the rest of the caption
                    chunk_cursor = len(clip_words)
                    break
                chunk_tokens += len(found[0])
                chunk_cursor = found[1]
            positions: tuple[int, ...] = ()
            for word in ((chunk.modifier,) if chunk.modifier else ()) + (chunk.head,):
                found = self._release_find(word, clip_words, concept_cursor)
                if found is None:
                    return concepts  # a concept word not found ends the caption's extraction
                positions += found[0]
                concept_cursor = found[1]
            if (
                kept < self.max_concepts
                and chunk_tokens < self.max_tokens_per_concept
                and len(positions) < self.max_tokens_per_concept
            ):
                kept += 1
                name = f"{chunk.modifier} {chunk.lemma}" if chunk.modifier else chunk.lemma
                label = self.bank.index(name)
                if label is not None:
                    concepts.append(Concept(name, label, positions))
        return concepts

    def extract(self, caption: str) -> list[Concept]:
        """Bank concepts of ``caption`` in caption order, with their BPE token positions."""
        if self.rules == "release":
            return self._extract_release(caption)
        if not caption:
            return []
        text = self.clean(caption)
        if not text:
            return []
        parsed = self._parse(text)
        if parsed is None:
            return []
        matches, words, tags, tree = parsed

        clip: tuple[list[int], list[int], list[int]] | None = None
        limit = self.context_length - 1  # first position lost to truncation (EOT slot)
        concepts: list[Concept] = []
        k = 0  # index of the next word in the flat sentence
        truncated = False
        for node in tree:
            if not hasattr(node, "label"):  # a (word, tag) leaf outside any chunk
                k += 1
                continue
            lo, hi = k, k + len(node)
            k = hi
            for name, idx in self._candidates(words, tags, lo, hi):
                label = self.bank.index(name)
                if label is None:
                    continue
                if clip is None:
                    clip = self._clip_words(text)
                positions = tuple(p for i in idx for p in self._word_positions(matches[i].span(), clip))
                if not positions:
                    continue
                if positions[-1] >= limit:
                    truncated = True  # the head is cut off, and so is all that follows
                    break
                if len(positions) < self.max_tokens_per_concept:
                    concepts.append(Concept(name, label, positions))
                    break
            if truncated or len(concepts) >= self.max_concepts:
                break
        return concepts

    # ----------------------------------------------------------------------- tensors

    def to_tensors(self, concepts: Sequence[Concept]) -> dict[str, torch.Tensor]:
        """Fixed-shape, collatable tensors for a list of concepts (see :meth:`encode`)."""
        n, t = self.max_concepts, self.max_tokens_per_concept
        labels = torch.full((n,), -1, dtype=torch.long)
        positions = torch.zeros((n, t), dtype=torch.long)
        mask = torch.zeros((n, t), dtype=torch.bool)
        for i, concept in enumerate(concepts[:n]):
            pos = concept.token_positions[:t]
            labels[i] = concept.label
            positions[i, : len(pos)] = torch.tensor(pos, dtype=torch.long)
            mask[i, : len(pos)] = True
        return {
            "concept_labels": labels,
            "concept_token_positions": positions,
            "concept_token_mask": mask,
        }

    def encode(self, caption: str) -> dict[str, torch.Tensor]:
        """Concepts of ``caption`` as fixed-shape tensors ready for default collation.

        Returns ``concept_labels`` (max_concepts,) int64 padded with -1,
        ``concept_token_positions`` (max_concepts, max_tokens_per_concept) int64 padded
        with 0 (SOT doubles as padding, as in the reference) and ``concept_token_mask``
        (same shape, bool, True on real positions).
        """
        return self.to_tensors(self.extract(caption))

    # ------------------------------------------------------------------------ batches

    def extract_many(
        self,
        captions: Sequence[str],
        num_workers: int = 0,
        chunksize: int = 64,
        progress: bool = False,
    ) -> list[list[Concept]]:
        """:meth:`extract` over many captions, in order; a process pool if ``num_workers > 0``."""
        captions = list(captions)
        if num_workers <= 0 or len(captions) == 0:
            results: Iterable[tuple[list[Concept], bool]] = map(self._extract_and_measure, captions)
            if progress:
                results = _progress(results, len(captions))
            return self._report_cut(list(results))

        import nltk

        initargs = (self.__getstate__(), list(nltk.data.path))
        with mp.get_context().Pool(num_workers, initializer=_worker_init, initargs=initargs) as pool:
            results = pool.imap(_worker_extract, captions, chunksize=max(1, chunksize))
            if progress:
                results = _progress(results, len(captions))
            return self._report_cut(list(results))

    def _extract_and_measure(self, caption: str) -> tuple[list[Concept], bool]:
        return self.extract(caption), self.is_cut(caption)

    def _report_cut(self, results: list[tuple[list[Concept], bool]]) -> list[list[Concept]]:
        """The concepts; logs how many captions were longer than the context (cut), if any."""
        cut = sum(is_cut for _, is_cut in results)
        if cut:
            log.warning(
                "%d of %d captions are longer than the text context (%d tokens) and were cut: "
                "concepts after the cut are dropped",
                cut,
                len(results),
                self.context_length,
            )
        return [concepts for concepts, _ in results]


def _progress(iterable: Iterable[Any], total: int) -> Iterable[Any]:
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="concepts", unit="caption", disable=None)  # None: off a terminal


_WORKER_EXTRACTOR: ConceptExtractor | None = None


def _worker_init(state: dict[str, Any], nltk_paths: list[str]) -> None:
    """Pool initializer: one extractor per process (NLTK search paths copied over)."""
    global _WORKER_EXTRACTOR
    use_nltk_paths(nltk_paths)
    extractor = ConceptExtractor.__new__(ConceptExtractor)
    extractor.__setstate__(state)
    _WORKER_EXTRACTOR = extractor


def _worker_extract(caption: str) -> tuple[list[Concept], bool]:
    assert _WORKER_EXTRACTOR is not None, "worker not initialised"
    return _WORKER_EXTRACTOR._extract_and_measure(caption)


def use_nltk_paths(nltk_paths: Sequence[str]) -> None:
    """Put the parent process's NLTK search paths first in this (worker) process."""
    import nltk

    for path in reversed(nltk_paths):
        if path not in nltk.data.path:
            nltk.data.path.insert(0, path)


# ================================================================================ stored concepts
#: The batch keys of precomputed concepts, as ``ConceptExtractor.encode`` names them.
CONCEPT_KEYS = ("concept_labels", "concept_token_positions", "concept_token_mask")


def bank_fingerprint(names: Sequence[str]) -> str:
    """SHA-1 of the bank's sorted names: labels are only comparable between equal banks."""
    return hashlib.sha1("\n".join(names).encode("utf-8")).hexdigest()


#: :func:`concept_meta` entries that stores written before they existed lack: their value then.
META_DEFAULTS = {"rules": "ovseg"}


def concept_meta(extractor: Any) -> dict[str, Any]:
    """What stored concepts depend on: context length, shape limits, the bank and the rules."""
    return {
        "context_length": int(extractor.context_length),
        "max_concepts": int(extractor.max_concepts),
        "max_tokens_per_concept": int(extractor.max_tokens_per_concept),
        "bank_size": len(extractor.bank),
        "bank_sha1": bank_fingerprint(list(extractor.bank.names)),
        "rules": getattr(extractor, "rules", "ovseg"),
    }


def meta_mismatch(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`concept_meta` dicts (a key a stored dict lacks
    takes its :data:`META_DEFAULTS` value)."""
    return [
        f"{key}: stored {stored.get(key, META_DEFAULTS.get(key))!r}, model {expected[key]!r}"
        for key in expected
        if stored.get(key, META_DEFAULTS.get(key)) != expected[key]
    ]


def concepts_to_lists(concepts: Sequence[Concept]) -> dict[str, list]:
    """Concepts -> JSON-friendly ragged lists (only real concepts and tokens are stored).

    ``concept_labels``: [n], ``concept_token_positions``: n rows of token positions,
    ``concept_token_mask``: n rows of 1s. :func:`concepts_from_lists` pads them back.
    """
    return {
        "concept_labels": [int(c.label) for c in concepts],
        "concept_token_positions": [[int(p) for p in c.token_positions] for c in concepts],
        "concept_token_mask": [[1] * len(c.token_positions) for c in concepts],
    }


def concepts_from_lists(stored: Mapping[str, Any], max_concepts: int, max_tokens: int) -> dict[str, Tensor]:
    """Stored concept lists -> the fixed-shape tensors of ``ConceptExtractor.encode``.

    Accepts ragged lists (:func:`concepts_to_lists`) or full padded lists (``encode(...)`` as
    ``.tolist()``): label -1 rows are padding, ``concept_token_mask`` (optional for ragged rows)
    selects the real positions.

    Returns:
        ``concept_labels`` (max_concepts,) int64, -1 padded; ``concept_token_positions``
        (max_concepts, max_tokens) int64, 0 padded; ``concept_token_mask`` same shape, bool.

    Raises:
        ValueError: malformed lists, or more concepts / tokens than the shapes allow.
    """
    labels_in = stored["concept_labels"]
    positions_in = stored["concept_token_positions"]
    masks_in = stored.get("concept_token_mask")
    if len(positions_in) != len(labels_in) or (masks_in is not None and len(masks_in) != len(labels_in)):
        raise ValueError(
            "stored concepts: concept_labels, concept_token_positions and concept_token_mask have different lengths"
        )
    labels = torch.full((max_concepts,), -1, dtype=torch.long)
    positions = torch.zeros((max_concepts, max_tokens), dtype=torch.long)
    mask = torch.zeros((max_concepts, max_tokens), dtype=torch.bool)
    n = 0
    for i, label in enumerate(labels_in):
        if int(label) < 0:
            continue
        row = positions_in[i]
        if masks_in is not None:
            row = [int(p) for p, m in zip(row, masks_in[i]) if m]
        if n >= max_concepts or len(row) > max_tokens:
            raise ValueError(f"stored concepts exceed the shape ({max_concepts}, {max_tokens})")
        labels[n] = int(label)
        if row:
            positions[n, : len(row)] = torch.tensor([int(p) for p in row], dtype=torch.long)
            mask[n, : len(row)] = True
        n += 1
    return {"concept_labels": labels, "concept_token_positions": positions, "concept_token_mask": mask}


class ConceptCache:
    """Precomputed concepts of every caption of a COCO Captions file, keyed by annotation id.

    Stored compactly (CSR): ``annotation_ids`` (N,) sorted, ``offsets`` (N+1,), and per concept
    ``labels`` (M,), ``token_positions`` (M, T) and ``token_counts`` (M,); :meth:`lookup` expands
    one caption to the fixed shapes of ``ConceptExtractor.encode``. ``meta`` is
    :func:`concept_meta` of the extractor that made it.
    """

    FORMAT = "ovseg-coco-concepts-v1"

    def __init__(
        self,
        annotation_ids: Tensor,
        offsets: Tensor,
        labels: Tensor,
        token_positions: Tensor,
        token_counts: Tensor,
        meta: Mapping[str, Any],
        source: str = "<memory>",
    ) -> None:
        self.annotation_ids = annotation_ids
        self.offsets = offsets
        self.labels = labels
        self.token_positions = token_positions
        self.token_counts = token_counts
        self.meta = dict(meta)
        self.source = source

    @classmethod
    def build(
        cls, annotation_ids: Sequence[int], concepts: Sequence[Sequence[Concept]], meta: Mapping[str, Any]
    ) -> ConceptCache:
        """From per-annotation concept lists (as ``ConceptExtractor.extract`` returns them)."""
        if len(annotation_ids) != len(concepts):
            raise ValueError("annotation_ids and concepts differ in length")
        order = sorted(range(len(annotation_ids)), key=lambda i: annotation_ids[i])
        ids = torch.tensor([annotation_ids[i] for i in order], dtype=torch.long)
        if len(ids) > 1 and bool((ids[1:] == ids[:-1]).any()):
            raise ValueError("duplicated annotation ids")
        max_tokens = int(meta["max_tokens_per_concept"])
        counts = [len(concepts[i]) for i in order]
        offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0) if counts else offsets[1:]
        flat = [c for i in order for c in concepts[i]]
        labels = torch.tensor([c.label for c in flat], dtype=torch.int32)
        positions = torch.zeros((len(flat), max_tokens), dtype=torch.int16)
        token_counts = torch.zeros(len(flat), dtype=torch.int16)
        for k, concept in enumerate(flat):
            pos = concept.token_positions[:max_tokens]
            positions[k, : len(pos)] = torch.tensor(pos, dtype=torch.int16)
            token_counts[k] = len(pos)
        return cls(ids, offsets, labels, positions, token_counts, meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` atomically (``torch.save`` of plain tensors and a meta dict)."""
        path = Path(path)
        atomic_torch_save(
            {
                "format": self.FORMAT,
                "meta": self.meta,
                "annotation_ids": self.annotation_ids,
                "offsets": self.offsets,
                "labels": self.labels,
                "token_positions": self.token_positions,
                "token_counts": self.token_counts,
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConceptCache:
        """Read a cache written by :meth:`save`; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"concepts file {path} does not exist; create it with "
                "`ovseg data extract-concepts --coco ANNOTATIONS.json`"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: cannot read the concepts file ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError(f"{path}: not an ovseg concepts file (expected format {cls.FORMAT!r})")
        return cls(
            data["annotation_ids"],
            data["offsets"],
            data["labels"],
            data["token_positions"],
            data["token_counts"],
            data["meta"],
            source=str(path),
        )

    def __len__(self) -> int:
        return len(self.annotation_ids)

    def _row(self, annotation_id: int) -> int | None:
        row = int(torch.searchsorted(self.annotation_ids, torch.tensor(int(annotation_id))))
        if row < len(self.annotation_ids) and int(self.annotation_ids[row]) == int(annotation_id):
            return row
        return None

    def missing(self, annotation_ids: Sequence[int]) -> list[int]:
        """The ids of ``annotation_ids`` that are not in the cache (vectorised)."""
        if not len(annotation_ids):
            return []
        ids = torch.tensor(list(annotation_ids), dtype=torch.long)
        rows = torch.searchsorted(self.annotation_ids, ids).clamp_(max=max(len(self.annotation_ids) - 1, 0))
        found = (
            self.annotation_ids[rows] == ids if len(self.annotation_ids) else torch.zeros_like(ids, dtype=torch.bool)
        )
        return ids[~found].tolist()

    def __contains__(self, annotation_id: object) -> bool:
        return isinstance(annotation_id, int) and self._row(annotation_id) is not None

    def lookup(self, annotation_id: int) -> dict[str, Tensor]:
        """The concepts of one caption as fixed-shape tensors (see :func:`concepts_from_lists`)."""
        row = self._row(annotation_id)
        if row is None:
            raise KeyError(f"annotation id {annotation_id} is not in the concepts file {self.source}")
        n_max, t_max = int(self.meta["max_concepts"]), int(self.meta["max_tokens_per_concept"])
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        n = min(stop - start, n_max)
        labels = torch.full((n_max,), -1, dtype=torch.long)
        positions = torch.zeros((n_max, t_max), dtype=torch.long)
        labels[:n] = self.labels[start : start + n].long()
        positions[:n] = self.token_positions[start : start + n].long()
        counts = self.token_counts[start : start + n].long()
        mask = torch.zeros((n_max, t_max), dtype=torch.bool)
        mask[:n] = torch.arange(t_max)[None, :] < counts[:, None]
        return {"concept_labels": labels, "concept_token_positions": positions, "concept_token_mask": mask}

    def check_compatible(self, extractor: Any) -> None:
        """Raise if the cache was made for another context length, shape or concept bank."""
        problems = meta_mismatch(self.meta, concept_meta(extractor))
        if problems:
            raise ValueError(
                f"concepts file {self.source} does not match the model's concept extractor ("
                + "; ".join(problems)
                + "). Re-create it with `ovseg data extract-concepts` and the "
                "model's --context-length / --bank."
            )


def default_concepts_path(annotations: str | os.PathLike) -> Path:
    """``annotations/captions_train2017.json`` -> ``annotations/captions_train2017.concepts.pt``."""
    annotations = Path(annotations)
    return annotations.with_name(annotations.stem + ".concepts.pt")


def stored_concept_fields(
    extractor: Any,
    main: Sequence[Concept] | None,
    per_caption: Sequence[Sequence[Concept]] | None,
) -> dict[str, Any]:
    """The JSON fields that store concepts in a shard sample: the main caption's lists
    (:func:`concepts_to_lists`), ``caption_concepts`` (one per caption) and ``concept_meta``."""
    fields: dict[str, Any] = {}
    if main is not None:
        fields.update(concepts_to_lists(main))
    if per_caption is not None:
        fields["caption_concepts"] = [concepts_to_lists(c) for c in per_caption]
    fields["concept_meta"] = concept_meta(extractor)
    return fields
