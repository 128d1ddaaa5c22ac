"""The selector application served on a free loopback port, with an HTTP client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from aiohttp import web

from mulambda.selector.app import selector_server_options


@asynccontextmanager
async def selector_http(app: web.Application) -> AsyncIterator[httpx.AsyncClient]:
    """``app`` (``create_app(...)``) served as ``mulambda selector`` serves it, on a port
    the system picks; the client's base URL is the server's. Cleaned up however the
    block ends."""
    runner = web.AppRunner(app, **selector_server_options())
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            yield http
    finally:
        await runner.cleanup()
