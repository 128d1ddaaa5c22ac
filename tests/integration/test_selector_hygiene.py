"""HTTP hygiene of the selector (issue 12): slow clients are cut off, bodies are bounded,
hostile JSON is a 400, never a 500 with a traceback. Raw sockets on loopback, a real
redis-server behind."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from mulambda.selector.app import create_app, selector_server_options
from mulambda.store.metadata import MetadataStore

pytestmark = pytest.mark.integration

TIMEOUT = 0.5  # header and body timeouts of the selector under test
SLACK = 2.0  # a loaded machine: generous, but far below "never"


@pytest.fixture
async def port(store: MetadataStore) -> AsyncIterator[int]:
    app = create_app(store, cache_ttl=0, body_timeout=TIMEOUT, max_body_bytes=4096)
    runner = web.AppRunner(app, **selector_server_options(header_timeout=TIMEOUT))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await runner.cleanup()


def _exchange(port: int, head: bytes, trickle: bytes = b"", every: float = 0.05,
              within: float = 15.0) -> tuple[bytes, float]:
    """Send ``head``, then ``trickle`` a byte every ``every`` s, read until the server
    closes; (everything received, seconds until closed)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=within) as s:
        try:
            s.sendall(head)
            for byte in trickle:
                s.sendall(bytes([byte]))
                time.sleep(every)
        except OSError:  # closed while we were still sending
            pass
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return received, time.monotonic() - started


async def exchange(port: int, head: bytes, trickle: bytes = b"") -> tuple[bytes, float]:
    return await asyncio.to_thread(_exchange, port, head, trickle)


def status_of(answer: bytes) -> int:
    return int(answer.split(b"\r\n", 1)[0].split()[1])


def body_of(answer: bytes) -> object:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


async def test_slow_header_connections_are_closed_after_the_header_timeout(port):
    slow = b"POST /select/shop/app HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 300 + b"\r\n\r\n"
    results = await asyncio.gather(*(exchange(port, b"", slow) for _ in range(20)))
    for answer, seconds in results:  # a trickle of 15 s each, all cut off together
        assert answer == b""
        assert TIMEOUT <= seconds < TIMEOUT + SLACK


async def test_idle_connections_are_closed_after_the_header_timeout(port):
    answer, seconds = await exchange(port, b"")
    assert answer == b"" and seconds < TIMEOUT + SLACK


@pytest.mark.parametrize("path", ["/select/shop/app", "/v1/predict/shop/app"])
async def test_slow_body_gets_408_and_the_connection_closed(port, path):
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 300\r\n\r\n").encode()
    results = await asyncio.gather(*(exchange(port, head, b"{" + b" " * 299)
                                      for _ in range(10)))
    for answer, seconds in results:
        assert status_of(answer) == 408
        assert "not received within" in body_of(answer)["error"]  # type: ignore[index]
        assert seconds < TIMEOUT + SLACK  # the trickle alone takes 15 s


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
async def test_oversized_body_gets_413(port, chunked):
    if chunked:
        head = (b"POST /v1/predict/shop/app HTTP/1.1\r\nHost: x\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"1" * 1024 + b"\r\n") * 1
        head += (b"400\r\n" + b"1" * 1024 + b"\r\n") * 5 + b"0\r\n\r\n"
    else:
        head = (b"POST /v1/predict/shop/app HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: %d\r\n\r\n" % (100 << 20))
    answer, seconds = await exchange(port, head)
    assert status_of(answer) == 413 and seconds < SLACK
    assert "larger than 4096 bytes" in body_of(answer)["error"]  # type: ignore[index]


# The gateway decodes a body once the client is known (an unregistered one needs a type).
@pytest.mark.parametrize("path", ["/select/shop/app", "/v1/predict/shop/app?type=vision"])
@pytest.mark.parametrize(("payload", "error"), [
    (b"[" * 30_000 + b"]" * 30_000, "nested deeper than 64"),  # /select takes 64 KiB
    (b'{"instances": [' + b"[" * 200 + b"]" * 200 + b"]}", "nested deeper than 64"),
    (b'{"required": {"type": "vision"}, "data_length": ' + b"7" * 5000 + b"}",
     "longer than 100 digits"),
    (b'{"instances": [' + b"9" * 5000 + b"]}", "longer than 100 digits"),
    (b"\xff\xfe{}", "not valid JSON"),
], ids=["deep", "deep-inside", "huge-int", "huge-int-instances", "not-utf8"])
async def test_hostile_json_is_400_without_a_traceback(store, caplog, path, payload, error):
    app = create_app(store, cache_ttl=0, max_body_bytes=1 << 20)
    runner = web.AppRunner(app, **selector_server_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    caplog.set_level(logging.DEBUG)
    try:
        for _ in range(3):  # per request: a 400, never an ERROR or a traceback
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                    f"\r\n").encode()
            answer, _ = await exchange(port, head + payload)
            assert status_of(answer) == 400, answer[:300]
            assert error in body_of(answer)["error"]  # type: ignore[index]
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "Traceback" not in caplog.text


async def test_malformed_request_lines_are_400_without_a_traceback(port, caplog):
    caplog.set_level(logging.DEBUG)
    for raw in (b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64):
        answer, _ = await exchange(port, raw)
        assert status_of(answer) == 400
    assert not [r for r in caplog.records if r.exc_info], caplog.text
