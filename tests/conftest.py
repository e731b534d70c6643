"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture
def memory_store():
    """fsspec's in-memory object store (``memory://``), empty for each test: the object-store
    code paths of pipelines.storage without a server."""
    import fsspec

    from pipelines import storage

    storage._filesystem.cache_clear()
    yield
    fsspec.filesystem("memory").store.clear()
    storage._filesystem.cache_clear()
