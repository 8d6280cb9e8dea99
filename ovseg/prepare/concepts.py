"""``ovseg data extract-concepts``: precompute SimZSS concepts of COCO captions or of existing shards.

Concepts are extracted by :class:`ovseg.concepts.ConceptExtractor` and stored as a
:class:`~ovseg.concepts.ConceptCache` next to a COCO Captions file (read by
:class:`~ovseg.datamodules.CocoCaptionsDataModule`) or in the JSON of every shard sample (read by
:class:`~ovseg.datamodules.WebDatasetDataModule`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ovseg.concepts import (
    ConceptCache,
    ConceptExtractor,
    concept_meta,
    default_concepts_path,
    stored_concept_fields,
    use_nltk_paths,
)
from ovseg.datamodules.coco_captions import annotation_caption
from ovseg.datamodules.webdataset import expand_urls
from ovseg.errors import UserError
from ovseg.prepare.shards import open_shard, progress_bar

__all__ = ["add_concepts_to_shard", "add_concepts_to_shards", "extract_coco_concepts"]

logger = logging.getLogger("ovseg.data")

_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def extract_coco_concepts(
    annotations: str | os.PathLike,
    out: str | os.PathLike | None = None,
    bank: str | None = None,
    context_length: int = 77,
    max_concepts: int = 32,
    max_tokens_per_concept: int = 16,
    concept_rules: str = "ovseg",
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Extract the SimZSS concepts of every caption of a COCO Captions file into a cache.

    Args:
        annotations: the captions JSON.
        out: output file (default: :func:`default_concepts_path`, next to the JSON).
        bank, context_length, max_concepts, max_tokens_per_concept, concept_rules: the
            :class:`~ovseg.concepts.ConceptExtractor` settings (must match the
            model's: SimZSS uses its text encoder's context length).
        num_workers: extraction processes (0: in this process).
        progress: show a progress bar.

    Returns:
        The path written. Empty captions get no concepts (they are not used for training).
    """
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"COCO Captions annotation file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        items = [(int(a["id"]), annotation_caption(a, path)) for a in doc["annotations"]]
    except UserError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a COCO Captions file ({exc})") from exc
    extractor = ConceptExtractor(bank, context_length, max_concepts, max_tokens_per_concept, concept_rules)
    concepts = extractor.extract_many([c.strip() for _, c in items], num_workers=num_workers, progress=progress)
    cache = ConceptCache.build([a for a, _ in items], concepts, concept_meta(extractor))
    return cache.save(out if out is not None else default_concepts_path(path))


# ---------------------------------------------------------------------------- shards


def _shard_worker_init(settings: tuple, nltk_paths: list[str]) -> None:
    global _SHARD_EXTRACTOR
    use_nltk_paths(nltk_paths)
    _SHARD_EXTRACTOR = ConceptExtractor(*settings)


def add_concepts_to_shard(path: str | os.PathLike, extractor: Any) -> tuple[int, int]:
    """Rewrite one local shard (atomically) with stored concepts in every sample's JSON.

    The caption is the ``.txt`` entry (else the JSON ``caption``); a JSON ``captions`` list gets
    ``caption_concepts`` too. Other entries are copied unchanged, in order. A sample without a JSON
    gets one. Returns (samples, captions processed).

    Raises:
        ValueError: the shard is unreadable (truncated, not a tar); it is left untouched.
    """
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read the shard ({type(exc).__name__}: {exc}); left unchanged") from exc
    groups: dict[str, dict[str, bytes]] = {}
    for member, data in members:
        match = _KEY_RE.match(member.name)
        if match:
            groups.setdefault(match.group(1), {})[match.group(2).lower()] = data
    updated: dict[str, bytes] = {}
    captions_done = 0
    for key, entries in groups.items():
        try:
            meta = json.loads(entries["json"]) if "json" in entries else {}
        except ValueError as exc:
            raise ValueError(f"{path}:{key}.json: invalid JSON ({exc})") from exc
        caption = (
            entries["txt"].decode("utf-8", "replace").strip() if "txt" in entries else str(meta.get("caption") or "")
        )
        captions = meta.get("captions") if isinstance(meta.get("captions"), list) else None
        main = extractor.extract(caption)
        per = [extractor.extract(str(c)) for c in captions] if captions else None
        captions_done += 1 + (len(captions) if captions else 0)
        meta.update(stored_concept_fields(extractor, main, per))
        updated[key] = json.dumps(meta).encode("utf-8")
    last_member: dict[str, int] = {}
    for position, (member, _) in enumerate(members):
        match = _KEY_RE.match(member.name)
        if match:
            last_member[match.group(1)] = position
    with open_shard(path) as out:
        for position, (member, data) in enumerate(members):
            match = _KEY_RE.match(member.name)
            key = match.group(1) if match else None
            if key is not None and match.group(2).lower() == "json":
                data = updated[key]
            out.add(member.name, data, member.mtime)
            if key is not None and "json" not in groups[key] and last_member[key] == position:
                out.add(f"{key}.json", updated[key], member.mtime)
    return len(groups), captions_done


def _shard_worker(path: str) -> tuple[str, int, int, str | None]:
    try:
        samples, captions = add_concepts_to_shard(path, _SHARD_EXTRACTOR)
        return path, samples, captions, None
    except Exception as exc:
        return path, 0, 0, str(exc)


def add_concepts_to_shards(
    urls: str | Sequence[str],
    num_workers: int = 0,
    bank: str | None = None,
    context_length: int = 77,
    max_concepts: int = 32,
    max_tokens_per_concept: int = 16,
    concept_rules: str = "ovseg",
    progress: bool = True,
) -> tuple[int, list[str]]:
    """Add stored concepts to existing local shards (each rewritten atomically).

    Args:
        urls: brace pattern or list of local shard paths.
        num_workers: processes, one shard at a time each (0: in this process).

    Returns:
        (samples updated, errors): an error message per shard that could not be processed (those
        shards are left unchanged).
    """
    import nltk

    shards = expand_urls(urls)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards are not local files, e.g. {missing[0]}")
    settings = (bank, context_length, max_concepts, max_tokens_per_concept, concept_rules)
    errors: list[str] = []
    total = 0
    bar = progress_bar(len(shards), "extract-concepts", "shard", progress)
    if num_workers <= 0:
        _shard_worker_init(settings, list(nltk.data.path))
        results: Any = map(_shard_worker, shards)
        pool = None
    else:
        pool = mp.get_context().Pool(
            num_workers, initializer=_shard_worker_init, initargs=(settings, list(nltk.data.path))
        )
        results = pool.imap_unordered(_shard_worker, shards)
    try:
        for _path, samples, _captions, error in results:
            bar.update(1)
            total += samples
            if error is not None:
                errors.append(error)
                logger.warning("extract-concepts: %s", error)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    return total, errors
