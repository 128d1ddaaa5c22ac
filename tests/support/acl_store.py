"""A real redis-server that loads the store's ACL file, and stores logged in as roles.

Every role's password is known here; a store is built the way its process
builds it (``MULAMBDA_REDIS_USERNAME`` and ``MULAMBDA_REDIS_PASSWORD``, which
win over a user in the URL). The fixture ``acl_redis`` (a plugin of
tests/conftest.py) serves the test module's key prefix ``P``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pytest
import redis

from mulambda.store.acl import ROLES, acl_file
from mulambda.store.metadata import MetadataStore

from support.procs import RedisServer

PASSWORDS = {name: f"{name}-pw-0123456789" for name in ROLES}


def acl_server(prefix: str) -> RedisServer:
    """A (not yet started) redis-server with every role's user for keys under ``prefix``."""
    return RedisServer(acl=acl_file(prefix, PASSWORDS))


def role_stores(url: str, prefix: str, monkeypatch: pytest.MonkeyPatch,
                roles: Iterable[str] = ROLES) -> dict[str, MetadataStore]:
    """One MetadataStore per role, each logged in as that role's user."""
    out = {}
    for role in roles:
        monkeypatch.setenv("MULAMBDA_REDIS_USERNAME", ROLES[role].username)
        monkeypatch.setenv("MULAMBDA_REDIS_PASSWORD", PASSWORDS[role])
        out[role] = MetadataStore.from_url(url, prefix=prefix, timeout=2)
    return out


def login(url: str, role: str, password: str | None = None) -> redis.Redis:
    """A plain client logged in as ``role``'s user (raw commands)."""
    return redis.Redis.from_url(url, username=ROLES[role].username,
                                password=password or PASSWORDS[role], decode_responses=True)


@pytest.fixture(scope="module")
def acl_redis(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A redis-server with every role's user for the keys under the module's ``P``."""
    server = acl_server(request.module.P)
    server.start()
    yield server
    server.stop()
