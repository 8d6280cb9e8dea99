"""No hidden set-up: without NLTK's tagger, concept extraction tries one quiet download and, offline,
stops with a one-line message naming the command to run and NLTK_DATA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONCEPTS = "ovseg.concepts"
SHARED_TAGGER = Path(os.environ.get("NLTK_DATA", "")) / "taggers" / "averaged_perceptron_tagger_eng.zip"


@pytest.fixture
def no_tagger(tmp_path, monkeypatch):
    """An NLTK search path with an empty folder only, and fresh tagger caches; yields the module."""
    import importlib

    import nltk

    concepts = importlib.import_module(CONCEPTS)
    empty = tmp_path / "nltk_data"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    monkeypatch.setattr(concepts, "_DOWNLOAD_TRIED", False)
    concepts._get_tagger.cache_clear()
    yield concepts, empty
    concepts._get_tagger.cache_clear()


def test_missing_tagger_is_downloaded_once_quietly(no_tagger, monkeypatch, capfd):
    concepts, folder = no_tagger
    if not SHARED_TAGGER.is_file():
        pytest.skip("the shared NLTK tagger is not available to stand in for the download")
    import nltk

    calls = []

    def fake_download(resource, quiet=False, **kwargs):
        calls.append((resource, quiet))
        print("[nltk_data] Downloading package ...")  # NLTK's chatter must not reach the user
        (folder / "taggers").mkdir()
        shutil.copy(SHARED_TAGGER, folder / "taggers")
        return True

    monkeypatch.setattr(nltk, "download", fake_download)
    extractor = concepts.ConceptExtractor(concepts.ConceptBank.from_names(["dog", "ball"]))
    assert [c.name for c in extractor.extract("A dog chases a ball.")] == ["dog", "ball"]
    assert calls == [("averaged_perceptron_tagger_eng", True)]
    assert "nltk_data" not in capfd.readouterr().out


def test_offline_without_tagger_stops_with_one_line_naming_the_fix(no_tagger, monkeypatch):
    concepts, _ = no_tagger
    import nltk

    calls = []

    def offline(resource, **kwargs):
        calls.append(resource)
        raise ValueError(
            "Error loading averaged_perceptron_tagger_eng: <urlopen error [Errno -3]\n"
            "Temporary failure in name resolution>"
        )

    monkeypatch.setattr(nltk, "download", offline)
    for _ in range(2):  # the second attempt does not download again
        with pytest.raises(concepts.TaggerNotFoundError) as error:
            concepts.ConceptExtractor()
        message = str(error.value)
        assert "\n" not in message
        assert "nltk.download('averaged_perceptron_tagger_eng')" in message and "NLTK_DATA" in message
    assert calls == ["averaged_perceptron_tagger_eng"]
    assert isinstance(error.value, LookupError)


@pytest.mark.timeout(180)
def test_fresh_clone_offline_gets_the_one_line_message(tmp_path):
    """A new process with an empty NLTK_DATA, no home copy, and every network connection refused."""
    code = textwrap.dedent(f"""
        import socket

        def offline(*args, **kwargs):
            raise OSError("network is unreachable")

        socket.socket.connect = offline
        socket.create_connection = offline
        socket.getaddrinfo = offline
        from {CONCEPTS} import ConceptExtractor

        ConceptExtractor()
    """)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "NLTK_DATA": str(empty), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=170, check=False
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ovseg.") and "TaggerNotFoundError: NLTK's English part-of-speech tagger" in last
    assert "automatic download failed" in last
    assert "nltk.download('averaged_perceptron_tagger_eng')" in last and "NLTK_DATA" in last
    assert str(empty) in last
    assert "[nltk_data]" not in result.stderr + result.stdout
