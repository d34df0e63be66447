"""Shared test set-up: no test reads or writes the user's execution-policy cache; the image folders several
modules train on. The shared functions and constants are in ``helpers.py``: a module imported by name, so that
a reader sees where each comes from (pytest advises against importing ``conftest``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_glyph_folder, noise_folder


@pytest.fixture(autouse=True)
def _no_execution_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cached choice would make a run skip the search, and two runs of one test compare bit for bit.
    monkeypatch.setenv("MAML_FUNC_CACHE_DIR", "off")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``noise_folder`` per test module: 20 classes of 5 grayscale 16x16 images."""
    return noise_folder(tmp_path_factory.mktemp("data") / "noise")


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``make_glyph_folder`` per test module: 40 classes of 10 synthetic 20x20 glyphs."""
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs") / "glyphs")
