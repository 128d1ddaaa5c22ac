"""Session-wide real servers shared by every test tier."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from mulambda.store.metadata import MetadataStore

from support.procs import RedisServer

# The real control plane and operator fixtures (support/controlplane_fixture.py,
# support/operator_fixtures.py): started once per session, by the first test that asks.
pytest_plugins = ["support.controlplane_fixture", "support.operator_fixtures"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests that stop it must start it again."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a flushed, running redis-server."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[MetadataStore]:
    s = MetadataStore.from_url(redis_url, prefix="test")
    yield s
    await s.close()
