"""Suite-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the suite's remembered file digests out of the user's ~/.cache."""
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
