"""The selector's aiohttp application and the server options it is served with."""


from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web

from mulambda.httpd import (
    server_options,
)
from mulambda.policy.selection import (
    DEFAULT_POLICY,
    Policy,
)
from mulambda.store.metadata import (
    MetadataStore,
)
from mulambda.tasks.handlers import install as install_tasks
from mulambda.tasks.records import TaskOptions

from .handlers import explain_client, healthz, metrics, predict, select
from .service import (
    BODY_TIMEOUT_SECONDS,
    GATEWAY_MAX_ANSWER_BYTES,
    GATEWAY_MAX_BODY_BYTES,
    HEADER_TIMEOUT_SECONDS,
    SELECTOR_KEY,
    STORE_KEY,
    Selector,
)

log = logging.getLogger("mulambda.selector")

def create_app(store: MetadataStore, *, cache_ttl: float = 0.5,
               policy: Policy = DEFAULT_POLICY, predict_timeout: float = 30.0,
               max_attempts: int = 3, cold_start_timeout: float = 30.0,
               suspect_seconds: float = 5.0, body_timeout: float = BODY_TIMEOUT_SECONDS,
               max_body_bytes: int = GATEWAY_MAX_BODY_BYTES,
               max_answer_bytes: int = GATEWAY_MAX_ANSWER_BYTES,
               max_cached_clients: int = 1024, demand_interval: float = 0.5,
               middlewares: Iterable[Any] = (),
               tasks: TaskOptions | None = None) -> web.Application:
    """The selector's aiohttp application (the caller owns ``store``).

    ``middlewares`` run before every handler, in order (caller authorization goes
    here). Serve it with :func:`server_options` (the header timeout and header
    bounds are the server's, not the application's). ``tasks``: the task API's
    limits (mulambda.tasks; defaults without).
    """
    app = web.Application(middlewares=[json_errors, *middlewares],
                          client_max_size=max_body_bytes)
    app[STORE_KEY] = store
    sel = Selector(store, cache_ttl, policy, predict_timeout=predict_timeout,
                    max_attempts=max_attempts, cold_start_timeout=cold_start_timeout,
                    suspect_seconds=suspect_seconds, body_timeout=body_timeout,
                    max_body_bytes=max_body_bytes, max_answer_bytes=max_answer_bytes,
                    max_cached_clients=max_cached_clients,
                    demand_interval=demand_interval)
    app[SELECTOR_KEY] = sel

    async def open_http(_app: web.Application) -> None:
        # Pooled connections: a TCP handshake per prediction would cost more than selection.
        sel.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         trace_configs=[sel.handshakes.trace_config()],
                                         auto_decompress=False)

    async def close(_app: web.Application) -> None:
        await sel.close()

    app.on_startup.append(open_http)
    app.on_cleanup.append(close)
    app.router.add_post("/v1/predict/{namespace}/{client}", predict)
    app.router.add_post("/select/{client:.+}", select)
    app.router.add_get("/v1/explain/{namespace}/{client}", explain_client)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    install_tasks(app, tasks or TaskOptions())
    return app


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own answers for a path no route takes (404) or a method it does not take
    (405) as JSON, like every other error of the selector (they were plain text)."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPNotFound as exc:
        if exc.content_type == "application/json":
            raise
        return web.json_response({"error": "not found", "path": request.path}, status=404)
    except web.HTTPMethodNotAllowed as exc:
        allowed = sorted(exc.allowed_methods)
        return web.json_response(
            {"error": "method not allowed", "method": request.method, "allowed": allowed},
            status=405, headers={"Allow": ", ".join(allowed)})


def selector_server_options(header_timeout: float = HEADER_TIMEOUT_SECONDS) -> dict[str, Any]:
    """``web.AppRunner`` / ``web.run_app`` arguments the selector is served with: a
    connection that has not sent a complete request line and headers within
    ``header_timeout`` seconds is closed (also the keep-alive idle timeout)."""
    return server_options(header_timeout=header_timeout)
