"""Test-wide settings: offline, NLTK's tagger from ../shared/nltk_data, small thread count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("NLTK_DATA", str(REPO.parent / "shared" / "nltk_data"))


@pytest.fixture(autouse=True)
def _deterministic_seed():
    """Every test starts from the same global torch seed."""
    import torch

    torch.manual_seed(0)
    yield
