"""Session-wide real servers shared by every test tier."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from mulambda.store.metadata import MetadataStore

from support.procs import RedisServer
from support.seaweedfs import SeaweedFS

# The real control plane and operator fixtures (support/controlplane_fixture.py,
# support/operator_fixtures.py): started once per session, by the first test that asks.
pytest_plugins = ["support.controlplane_fixture", "support.operator_fixtures",
                  "support.acl_store"]


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


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One real ``weed server -s3`` for the session."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def seaweedfs(seaweedfs_server: SeaweedFS) -> SeaweedFS:
    """The session's S3 server, started again if an earlier test killed it."""
    if not seaweedfs_server.running:
        seaweedfs_server.start()
    return seaweedfs_server
