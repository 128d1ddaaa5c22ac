"""The aiohttp set-up shared by the companion's HTTP server and the ping responder.

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

import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_LINE_BYTES = 4096  # request line, and each header line
MAX_HEADERS = 32
MAX_BODY_BYTES = 1024  # neither server reads a body; larger declared ones get 413
HEADER_TIMEOUT_SECONDS = 10.0
BODY_DRAIN_SECONDS = 1.0

log = logging.getLogger("mulambda.companion.httpd")


class _ClientErrorsQuiet(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, minus the traceback for requests the client got wrong."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            # aiohttp's "Error handling request from %s": the peer, then why, in one line.
            first = (exc.message or type(exc).__name__).strip().splitlines()[0][:200]
            log.debug("bad request from %s status=%s error=%s", args[0] if args else "?",
                      exc.code, first)
            return
        super().log(level, msg, *args, **kwargs)


def _bounded(handler: Handler) -> Handler:
    async def bounded(request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            response = web.Response(status=413, content_type="application/json",
                                    body=b'{"error":"request body too large"}')
            response.force_close()  # the body is never read: the connection cannot be reused
            return response
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
        app, access_log=None, shutdown_timeout=shutdown_timeout,
        # aiohttp closes a connection whose next request is not complete when the
        # keep-alive timer fires: the header timeout and the idle timeout in one.
        keepalive_timeout=header_timeout, lingering_time=BODY_DRAIN_SECONDS,
        max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES, max_headers=MAX_HEADERS,
        logger=cast(logging.Logger, _ClientErrorsQuiet(logging.getLogger("aiohttp.server"))),
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, int(runner.addresses[0][1])
