"""kopf's HTTP session to the API server, with a bound on its connections.

kopf's own session has no connection limit: each request in flight opens a
TLS connection. With a backlog of N objects, kopf patches all N (finalizer,
progress) at once, so it opened N connections, each holding OpenSSL and
aiohttp buffers: measured at about 0.3 MiB each (peak RSS grew by ~0.3 MiB
per executor in ``bench/operator_scale.py``; at N=800, 1,610 TLS memory
BIOs were alive and glibc held 230 MiB freed but not returned). The API
server's priority and fairness then answered some of them 429, which kopf
retried. Bounded, the requests queue in the connector instead: the API
server serves a handful at a time either way.

Each watch stream holds its connection for as long as it runs, so the bound
leaves room for every watch: kopf watches a few kinds per namespace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aiohttp
import kopf

# Requests in flight at once, beside the watches. The API server on a small
# control plane serves far fewer at a time; more only holds more buffers.
REQUESTS_IN_FLIGHT = 32
# Watch streams per watched namespace, with room to spare: the operator
# watches ModelExecutors and Clients in each (plus CRDs and, when namespaced,
# Namespaces cluster-wide); the children's informers have clients of their own.
WATCHES_PER_NAMESPACE = 8
GLOB = ("*", "?", "[", "!")


def connection_limit(namespaces: Sequence[str]) -> int:
    """The bound on kopf's connections for the namespaces watched (none: cluster-wide);
    0 (kopf's own: unbounded) when a pattern could match any number of namespaces, so no
    bound could be sure to leave every watch its connection."""
    if any(ch in ns for ns in namespaces for ch in GLOB):
        return 0
    return REQUESTS_IN_FLIGHT + WATCHES_PER_NAMESPACE * (len(namespaces) + 1)


async def bounded_login(namespaces: Sequence[str], **kwargs: Any) -> kopf.AiohttpSession | None:
    """kopf's login through the kubernetes client's configuration (kubeconfig or the
    pod's ServiceAccount), as a session whose connections are bounded."""
    info = await asyncio.to_thread(kopf.login_via_client, **kwargs)
    if info is None:
        return None
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connection_limit(namespaces),
                                       ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(aiohttp_session=session, server=info.server,
                               default_namespace=info.default_namespace,
                               priority=info.priority, expiration=info.expiration)
