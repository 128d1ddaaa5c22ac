"""The aiohttp set-up shared by the companion's HTTP server and the ping responder.

Both answer probes and scrapes: a request line, a few short headers, no
body. Requests are bounded accordingly (aiohttp answers 400 to longer
ones), connections are kept alive between requests, and one catch-all
route hands every request to a single handler, which decides status and
body itself (so a wrong method or path gets the handler's answer, not
aiohttp's).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_LINE_BYTES = 4096  # request line, and each header line
MAX_HEADERS = 32
MAX_BODY_BYTES = 1024  # neither server reads a body; this bounds what it would buffer
KEEPALIVE_SECONDS = 75.0


async def start_server(handler: Handler, host: str, port: int, *,
                       shutdown_timeout: float) -> tuple[web.AppRunner, int]:
    """Serve every request with ``handler``; the runner and the bound port (0 picks a free one).

    ``shutdown_timeout`` bounds how long ``runner.cleanup()`` waits for
    requests in flight, so a stuck scraper cannot delay exit.
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_route("*", "/{path:.*}", handler)
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=shutdown_timeout,
        keepalive_timeout=KEEPALIVE_SECONDS, max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_LINE_BYTES, max_headers=MAX_HEADERS,
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])
