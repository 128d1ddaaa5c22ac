"""HTTP hygiene shared by every aiohttp server of mulambda (the selector, the companion's
endpoints, the ping responder).

* **Header timeout**: a connection must deliver a complete request line and
  headers within ``header_timeout`` seconds of opening or of its previous
  response, otherwise it is closed. aiohttp's keep-alive timer does this: it
  starts when a connection opens and fires only while no request is being
  handled, so a client trickling its headers is cut off like an idle one.
* **Header size**: request line and each header line at most
  ``max_line_bytes``, at most ``max_headers`` headers; more is 400 and the
  connection is closed.
* **Body**: :func:`read_body` reads at most ``limit`` bytes within
  ``timeout`` seconds (a declared ``Content-Length`` above the limit is
  refused before reading anything: :class:`BodyTooLarge`, answered 413; a
  client slower than the timeout: :class:`BodyTimeout`, answered 408; both
  close the connection). A body a handler left unread is drained for at most
  ``drain_seconds``.
* **JSON**: bodies are decoded by :mod:`mulambda.bodies` (within limits; a
  body of many containers in a child process), never by a bare ``json.loads``.
* **Logs**: a malformed request (aiohttp's ``HttpProcessingError``) is the
  client's problem: one DEBUG line without a traceback, never aiohttp's ERROR
  with a traceback per request. A handler that raises is a bug and keeps its
  traceback.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .bodies import BodyTooLarge, collect

HEADER_TIMEOUT_SECONDS = 10.0
BODY_DRAIN_SECONDS = 1.0

log = logging.getLogger("mulambda.httpd")


class ClientErrorsQuiet(logging.LoggerAdapter):  # type: ignore[type-arg]
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


def server_options(*, header_timeout: float = HEADER_TIMEOUT_SECONDS,
                   max_line_bytes: int = 8190, max_headers: int = 64,
                   drain_seconds: float = BODY_DRAIN_SECONDS) -> dict[str, Any]:
    """Keyword arguments of ``web.AppRunner`` (or ``web.run_app``) that bound a request."""
    return {
        "access_log": None,
        # aiohttp closes a connection whose next request is not complete when the
        # keep-alive timer fires: the header timeout and the idle timeout in one.
        "keepalive_timeout": header_timeout,
        "lingering_time": drain_seconds,
        "max_line_size": max_line_bytes,
        "max_field_size": max_line_bytes,
        "max_headers": max_headers,
        "logger": cast(logging.Logger, ClientErrorsQuiet(logging.getLogger("aiohttp.server"))),
    }


class BodyTimeout(Exception):
    """The client did not send its body within the timeout: 408."""


def refuse(status: int, message: str) -> web.Response:
    """A JSON error that also closes the connection (its body was not read to the end)."""
    response = web.json_response({"error": message}, status=status)
    response.force_close()
    return response


async def read_body(request: web.Request, limit: int, seconds: float) -> bytes:
    """The whole body, at most ``limit`` bytes within ``seconds``.

    Raises :class:`BodyTooLarge` (before reading anything when the declared
    length says so) or :class:`BodyTimeout`.
    """
    if not request.can_read_body:
        return b""
    if request.content.is_eof():
        # All of it has arrived already (a small body comes with its headers): no
        # timer and no waiting, at every request of a busy server.
        return await read_at_most(request.content, request.content_length, limit,
                                  "request body")
    try:
        async with asyncio.timeout(seconds):
            return await read_at_most(request.content, request.content_length, limit,
                                      "request body")
    except TimeoutError:
        raise BodyTimeout(f"request body not received within {seconds:g} s") from None


async def read_at_most(content: StreamReader, declared: int | None, limit: int,
                       what: str) -> bytes:
    """All of ``content`` (a request's or an answer's body), at most ``limit`` bytes:
    :class:`BodyTooLarge` before reading anything when the ``declared`` length is
    larger, or as soon as more than ``limit`` came."""
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"{what} larger than {limit} bytes")
    if content.is_eof():
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyTooLarge(f"{what} larger than {limit} bytes")
        return body
    return await collect(content.iter_any(), limit, what)
