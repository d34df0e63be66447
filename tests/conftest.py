"""Shared test set-up: no test reads or writes the user's execution-policy cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_execution_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cached choice would make a run skip the search, and two runs of one test compare bit for bit.
    monkeypatch.setenv("MAML_FUNC_CACHE_DIR", "off")
