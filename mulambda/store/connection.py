"""How a process connects to the store: its ACL user, its password (never in a URL),
a bounded, blocking connection pool."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as aioredis

# Connections per process, and how long a command waits for one when all are busy
# (a burst queues for a connection instead of failing at once).
DEFAULT_POOL_SIZE = 64
DEFAULT_POOL_TIMEOUT_SECONDS = 5.0

PASSWORD_ENV = "MULAMBDA_REDIS_PASSWORD"
# The ACL user a process logs in as (mulambda.store.acl: one per role); it wins over
# the URL's own user, which the operator copies into executor pods for companions.
USERNAME_ENV = "MULAMBDA_REDIS_USERNAME"


def _with_username(url: str) -> str:
    """``url`` with its user replaced by ``MULAMBDA_REDIS_USERNAME`` when that is set."""
    username = os.environ.get(USERNAME_ENV, "").strip()
    if not username:
        return url
    parts = urlsplit(url)
    secret = f":{parts.password}" if parts.password else ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(username, safe='')}{secret}@{host}"))


def connect(url: str, timeout: float, password: str | None, pool_size: int,
            pool_timeout: float) -> aioredis.Redis:
    """A client that connects on its first command (see ``MetadataStore.from_url``)."""
    url = _with_username(url)
    if password is None:
        password = os.environ.get(PASSWORD_ENV) or None
    extra: dict[str, Any] = {"password": password} if password else {}
    if pool_size < 1 or not pool_timeout > 0:
        raise ValueError("pool_size must be >= 1 and pool_timeout > 0")
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=pool_timeout,
        **extra,
        decode_responses=True,
        # Invalid UTF-8 in one value must not fail a whole HGETALL: it
        # decodes to U+FFFD and that value is skipped as malformed.
        encoding_errors="replace",
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)
