"""Test-wide settings: offline, NLTK's tagger from ../shared/nltk_data, small thread count, strict MKL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("NLTK_DATA", str(REPO.parent / "shared" / "nltk_data"))
# Intel MKL in strict reproducibility mode from the first matrix product, as `ovseg fit` puts it for
# a config with ThreadCountInvariance: the in-process trainings of the tests then give the same bits
# with any thread count on Intel CPUs too (MKL fixes its mode at its first call in a process)
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # ovseg.thread_invariance.MKL_CBWR_STRICT_ENV; not imported
# here, so that nothing is imported before the offline settings above


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same global torch seed."""
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in a temp dir (``HF_HOME``), and a function that puts a local folder
    in it as the Hub repo ``ORG/NAME`` (what ``snapshot_download`` leaves: refs/main -> snapshots/COMMIT)."""
    import shutil

    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))

    def add(repo_id: str, folder: Path, commit: str = "a" * 40) -> None:
        repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(folder, repo / "snapshots" / commit)

    add.home = home
    return add
