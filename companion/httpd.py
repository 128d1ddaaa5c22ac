"""The aiohttp set-up shared by the companion's HTTP server and the ping responder.

The bounds themselves (header timeout, line and header limits, quiet logs for
malformed requests) are :mod:`mulambda.httpd`'s, shared with the selector;
here are the companion's sizes.

Both answer probes and scrapes: a request line, a few short headers, no
body. Requests are bounded accordingly, and one catch-all route hands every
request to a single handler, which decides status and body itself (so a
wrong method or path gets the handler's answer, not aiohttp's).

Bounds (tests/companion/test_httpd.py):

* **Headers**: request line and each header line at most
  :data:`MAX_LINE_BYTES`, at most :data:`MAX_HEADERS` headers; longer gets
  400 and the connection is closed.
* **Header timeout**: a connection must deliver a complete request within
  ``header_timeout`` seconds of opening or of its previous response,
  otherwise it is closed (this is also the keep-alive idle timeout, so a
  client trickling a request line byte by byte is cut off like an idle one).
* **Body**: neither server reads one. A declared ``Content-Length`` above
  :data:`MAX_BODY_BYTES` gets 413 and the connection closed without reading
  it; a body the handler left unread is drained for at most
  :data:`BODY_DRAIN_SECONDS`, then the connection is closed.
* **Logs**: a malformed request (aiohttp's ``HttpProcessingError``: too
  long, too many headers, not HTTP) is the client's problem: one DEBUG line
  without a traceback, not aiohttp's ERROR with a traceback per request. A
  handler that raises is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from mulambda.httpd import BODY_DRAIN_SECONDS, HEADER_TIMEOUT_SECONDS, refuse, server_options

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_LINE_BYTES = 4096  # request line, and each header line
MAX_HEADERS = 32
MAX_BODY_BYTES = 1024  # neither server reads a body; larger declared ones get 413

__all__ = ["BODY_DRAIN_SECONDS", "HEADER_TIMEOUT_SECONDS", "MAX_BODY_BYTES", "MAX_HEADERS",
           "MAX_LINE_BYTES", "start_server"]


def _bounded(handler: Handler) -> Handler:
    async def bounded(request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            # The body is never read: the connection cannot be reused.
            return refuse(413, "request body too large")
        return await handler(request)

    return bounded


async def start_server(handler: Handler, host: str, port: int, *,
                       shutdown_timeout: float,
                       header_timeout: float = HEADER_TIMEOUT_SECONDS,
                       ) -> tuple[web.AppRunner, int]:
    """Serve every request with ``handler``; the runner and the bound port (0 picks a free one).

    ``shutdown_timeout`` bounds how long ``runner.cleanup()`` waits for
    requests in flight, so a stuck scraper cannot delay exit.
    """
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_route("*", "/{path:.*}", _bounded(handler))
    runner = web.AppRunner(
        app, shutdown_timeout=shutdown_timeout,
        **server_options(header_timeout=header_timeout, max_line_bytes=MAX_LINE_BYTES,
                         max_headers=MAX_HEADERS))
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])
