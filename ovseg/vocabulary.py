"""Vocabularies: class names with synonyms, prompt templates and the background policy.

A vocabulary is data, not model state: every evaluation set brings its own. The text embeddings of a
vocabulary are computed by :class:`TextEmbeddingCache` once per text-encoder state.

Conventions (../shared/reference/eval_protocol.md, section 1.3-1.4):

- One class per entry; synonyms of a class are alternative names and the class takes the maximum
  score over them (SCLIP-style files write them on one line separated by ", ").
- Each name is embedded under every template; the per-template embeddings are L2-normalised,
  averaged and L2-normalised again.
- With ``background_threshold`` set, class 0 is background: it is predicted wherever the highest
  class probability is below the threshold. If class 0 has names, it also takes part in the argmax
  (SCLIP / NACLIP); if its name list is empty it is predicted only by the threshold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ovseg.errors import UserError

SINGLE_TEMPLATE = ("a photo of a {}.",)


def packaged_text(relative_path: str) -> str:
    """Text of a file shipped in ``ovseg/resources``."""
    return resources.files("ovseg").joinpath("resources", relative_path).read_text(encoding="utf-8")


def imagenet_templates() -> tuple[str, ...]:
    """The 80 OpenAI ImageNet prompt templates, in their published order."""
    lines = [line.strip() for line in packaged_text("imagenet80_templates.txt").splitlines()]
    return tuple(line for line in lines if line)


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """``"single"`` -> ("a photo of a {}.",), ``"imagenet80"`` -> the 80 templates, a list -> itself.

    Every template must contain exactly one ``{}``.
    """
    if isinstance(templates, str):
        presets = {"single": SINGLE_TEMPLATE, "imagenet80": None}
        if templates not in presets:
            raise UserError(
                f"unknown template preset {templates!r}: use 'single', 'imagenet80' or a list of "
                "strings with one '{}' each"
            )
        resolved = presets[templates] or imagenet_templates()
    else:
        resolved = tuple(templates)
    if not resolved:
        raise UserError("the list of prompt templates is empty")
    for template in resolved:
        if template.count("{}") != 1:
            raise UserError(f"prompt template {template!r} must contain exactly one '{{}}'")
    return resolved


def parse_class_names(lines: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Lines of a class-name file -> synonyms per class (``"tv, monitor"`` -> ("tv", "monitor"))."""
    return tuple(_as_synonyms(line) for line in lines if line.strip())


def _as_synonyms(entry: str | Sequence[str]) -> tuple[str, ...]:
    """``"tv, monitor"`` or ``["tv", "monitor"]`` -> ("tv", "monitor"); ``""`` -> ()."""
    if isinstance(entry, str):
        return tuple(name.strip() for name in entry.split(",") if name.strip())
    return tuple(name.strip() for name in entry)


@dataclass(frozen=True)
class Vocabulary:
    """The classes of one evaluation set.

    Attributes:
        classes: synonyms per class, ``classes[k][0]`` is the display name. With a background
            threshold, ``classes[0]`` may be empty (background predicted by the threshold only).
        templates: prompt templates, each with one ``{}``.
        background_threshold: if set, class 0 is background, assigned where the maximum class
            probability is below this value.
    """

    classes: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...] = SINGLE_TEMPLATE
    background_threshold: float | None = None
    display_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        classes = tuple(tuple(names) for names in self.classes)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "templates", resolve_templates(self.templates))
        if not classes:
            raise UserError("the vocabulary is empty: give at least one class name")
        if self.background_threshold is not None and not 0.0 <= self.background_threshold <= 1.0:
            raise UserError(f"background_threshold must be in [0, 1], got {self.background_threshold}")
        seen: dict[str, int] = {}
        for index, names in enumerate(classes):
            if not names and not (index == 0 and self.background_threshold is not None):
                raise UserError(
                    f"class {index} has no name (only class 0 may be nameless, and only with a background_threshold)"
                )
            for name in names:
                if name in seen and seen[name] != index:
                    raise UserError(f"duplicated class name {name!r} in classes {seen[name]} and {index}")
                seen[name] = index
        display = tuple(names[0] if names else "background" for names in classes)
        object.__setattr__(self, "display_names", display)

    @classmethod
    def from_names(
        cls,
        names: Sequence[str | Sequence[str]],
        templates: str | Sequence[str] = SINGLE_TEMPLATE,
        background_threshold: float | None = None,
    ) -> Vocabulary:
        """From a list where each entry is a name, a ``"a, b"`` synonym string or a list of names."""
        classes = tuple(_as_synonyms(entry) for entry in names)
        return cls(classes, resolve_templates(templates), background_threshold)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        templates: str | Sequence[str] = SINGLE_TEMPLATE,
        background_threshold: float | None = None,
    ) -> Vocabulary:
        """From a class-name file (one class per line, synonyms separated by ", ").

        ``path`` may be a file on disk or ``"packaged:voc21"`` for the lists shipped with ovseg.
        """
        path = str(path)
        if path.startswith("packaged:"):
            text = packaged_text(f"class_names/{path.removeprefix('packaged:')}.txt")
        else:
            if not Path(path).is_file():
                raise FileNotFoundError(f"class-name file {path} does not exist")
            text = Path(path).read_text(encoding="utf-8")
        return cls(parse_class_names(text.splitlines()), resolve_templates(templates), background_threshold)

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def queries(self) -> tuple[str, ...]:
        """Every name of every class, flattened in class order."""
        return tuple(name for names in self.classes for name in names)

    @property
    def query_to_class(self) -> Tensor:
        """(Q,) int64: the class index of each query."""
        return torch.tensor([index for index, names in enumerate(self.classes) for _ in names], dtype=torch.long)

    def index_of(self, name: str) -> int:
        """Class index of a display name or synonym."""
        for index, names in enumerate(self.classes):
            if name in names or name == self.display_names[index]:
                return index
        raise KeyError(f"{name!r} is not in the vocabulary {self.display_names}")

    def fingerprint(self) -> str:
        """A stable hash of the queries and templates (what the text embeddings depend on)."""
        payload = repr((self.queries, self.templates)).encode()
        return hashlib.sha1(payload).hexdigest()


def reduce_synonyms(query_scores: Tensor, query_to_class: Tensor, num_classes: int) -> Tensor:
    """Max over the synonyms of each class.

    Args:
        query_scores: (B, Q, H, W) scores per query name.
        query_to_class: (Q,) class index of each query.
        num_classes: K. Classes without any query (a nameless background) get -inf.

    Returns:
        (B, K, H, W) class scores.
    """
    batch, _, height, width = query_scores.shape
    out = query_scores.new_full((batch, num_classes, height, width), float("-inf"))
    index = query_to_class.to(query_scores.device).view(1, -1, 1, 1).expand_as(query_scores)
    return out.scatter_reduce(1, index, query_scores, reduce="amax", include_self=True)


class TextEmbeddingCache:
    """Class-name embeddings computed once per (text-encoder state, vocabulary, templates).

    ``version`` is bumped by the owner whenever the text encoder's weights may have changed
    (a training step, a checkpoint load); entries of older versions are dropped.
    """

    def __init__(self) -> None:
        self.version = 0
        self._entries: dict[tuple[int, str, str], Tensor] = {}

    def invalidate(self) -> None:
        """Mark the text encoder as changed."""
        self.version += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self,
        vocabulary: Vocabulary,
        encode: Callable[[list[Prompt]], Tensor],
        device: torch.device,
        batch_size: int = 1024,
    ) -> Tensor:
        """(Q, D) L2-normalised query embeddings of ``vocabulary``, averaged over templates.

        Args:
            encode: prompts -> (N, D) embeddings (normalised or not; each is normalised here).
            batch_size: prompts per call of ``encode``.
        """
        key = (self.version, vocabulary.fingerprint(), str(device))
        if key not in self._entries:
            self._entries[key] = embed_queries(vocabulary, encode, batch_size)
        return self._entries[key]


class Prompt(NamedTuple):
    """A class name in a prompt template; ``text`` is what a text encoder reads."""

    template: str
    name: str

    @property
    def text(self) -> str:
        return self.template.format(self.name)


@torch.no_grad()
def embed_queries(vocabulary: Vocabulary, encode: Callable[[list[Prompt]], Tensor], batch_size: int = 1024) -> Tensor:
    """(Q, D): per query, the normalised mean of its normalised per-template embeddings."""
    prompts = [Prompt(template, query) for query in vocabulary.queries for template in vocabulary.templates]
    chunks = [encode(prompts[start : start + batch_size]) for start in range(0, len(prompts), batch_size)]
    embeddings = torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)
    embeddings = embeddings.view(len(vocabulary.queries), len(vocabulary.templates), -1).mean(1)
    return torch.nn.functional.normalize(embeddings, dim=-1)
