"""An aiohttp application served on a free loopback port: the selector's with an HTTP client
for it, or any (a hostile executor or selector in a test) with its base URL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from aiohttp import web

from mulambda.selector.app import selector_server_options


@asynccontextmanager
async def served(app: web.Application, **options: Any) -> AsyncIterator[str]:
    """``app`` served on a port the system picks (``options`` for its runner); its base
    URL. Cleaned up however the block ends."""
    runner = web.AppRunner(app, **options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def selector_http(app: web.Application) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` (``create_app(...)``) served as ``mulambda selector`` serves it; a client
    whose base URL is the server's."""
    async with served(app, **selector_server_options()) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            yield http
