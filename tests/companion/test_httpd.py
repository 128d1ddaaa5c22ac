"""HTTP bounds of the companion server and the ping responder, over raw sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from mulambda.companion.httpd import MAX_BODY_BYTES, MAX_HEADERS, MAX_LINE_BYTES, start_server

HEADER_TIMEOUT = 0.5


async def _ok(request: web.Request) -> web.Response:
    return web.Response(status=204)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    runner, bound = await start_server(_ok, "127.0.0.1", 0, shutdown_timeout=1.0,
                                       header_timeout=HEADER_TIMEOUT)
    yield bound
    await runner.cleanup()


def _exchange(port: int, payload: bytes, *, trickle: float = 0.0, within: float = 5.0,
              head: bytes = b"") -> tuple[bytes, float]:
    """Send ``head``, then ``payload`` (a byte at a time every ``trickle`` s), read until the
    server closes; (everything received, seconds until closed)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=within) as s:
        try:
            s.sendall(head)
            if trickle:
                for byte in payload:
                    s.sendall(bytes([byte]))
                    time.sleep(trickle)
            else:
                s.sendall(payload)
        except OSError:  # the server closed while we were still sending
            pass
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received, time.monotonic() - started


async def exchange(port: int, payload: bytes, **kw: object) -> tuple[bytes, float]:
    return await asyncio.to_thread(_exchange, port, payload, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"a" * (MAX_LINE_BYTES + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (MAX_LINE_BYTES + 10) + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS + 5))
    + b"\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,  # a TLS hello, not HTTP
], ids=["long-request-line", "long-header", "too-many-headers", "not-http"])
async def test_malformed_requests_get_400_and_no_traceback_in_the_log(port, caplog,
                                                                      request_bytes):
    caplog.set_level(logging.DEBUG)
    for _ in range(3):  # per request: never an ERROR, never a traceback
        answer, _ = await exchange(port, request_bytes)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "Traceback" not in caplog.text


async def test_declared_oversized_body_gets_413_without_being_read(port):
    request = (b"POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
               % (100 * 1024 * 1024))
    answer, seconds = await exchange(port, request + b"x" * 100_000)
    assert answer.split(b"\r\n")[0].endswith(b"413 Request Entity Too Large")
    assert seconds < 2  # answered and closed at once, not after reading 100 MiB


async def test_small_body_is_accepted(port):
    body = b"x" * MAX_BODY_BYTES
    answer, _ = await exchange(port, b"POST /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert b" 204 " in answer.split(b"\r\n")[0]


async def test_client_trickling_its_headers_is_cut_off_after_the_header_timeout(port):
    slow = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 200 + b"\r\n\r\n"
    answer, seconds = await exchange(port, slow, trickle=0.05)  # would take 10 s
    assert answer == b""
    assert HEADER_TIMEOUT <= seconds < HEADER_TIMEOUT + 1.5


async def test_idle_connection_is_closed_after_the_header_timeout(port):
    answer, seconds = await exchange(port, b"")
    assert answer == b"" and seconds < HEADER_TIMEOUT + 1.5


async def test_unread_chunked_body_is_drained_briefly_then_the_connection_closes(port):
    # A body without a length: the handler answers without reading it, and the
    # server drains it for at most a second before it closes the connection.
    head = b"POST /ping HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, seconds = await exchange(port, b"1\r\nx\r\n" * 200, head=head, trickle=0.01)
    assert b" 204 " in answer.split(b"\r\n")[0]
    assert seconds < 8  # the trickle alone would take longer than this


async def test_keep_alive_serves_several_requests_on_one_connection(port):
    one = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer, _ = await exchange(port, one * 3 + last)
    assert answer.count(b"HTTP/1.1 204") == 4
