"""What the SDK makes of an executor's answer over REST (a real HTTP server that answers
as told): only a JSON object with ``predictions`` is an answer; anything else, or too
late, or too much, is another candidate's turn (Retryable), never a raw Python error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import pytest
from aiohttp import web

from mulambda.sdk.counting import Wire
from mulambda.sdk.errors import PredictionRejected, Retryable
from mulambda.sdk.transport import rest_predict

from support.selector_http import served

pytestmark = pytest.mark.integration


@pytest.fixture
async def executor() -> AsyncIterator[tuple[str, dict]]:
    """An executor whose next answer is ``told["answer"]`` (status, body bytes, pause), its
    headers ``told["hold"]`` seconds after the request came."""
    told: dict = {"answer": (200, b'{"predictions": [1.5]}', 0.0), "hold": 0.0}

    async def predict(request: web.Request) -> web.StreamResponse:
        status, body, pause = told["answer"]
        await request.read()
        await asyncio.sleep(told["hold"])
        resp = web.StreamResponse(status=status)
        await resp.prepare(request)
        for i in range(len(body)):  # a byte at a time, ``pause`` apart
            await resp.write(body[i:i + 1])
            if pause:
                await asyncio.sleep(pause)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/models/m:predict", predict)
    async with served(app) as url:
        yield url, told


def _candidate(url: str) -> SimpleNamespace:
    return SimpleNamespace(url=url, record=SimpleNamespace(model="m"), executor_id="ml/m")


async def _call(url: str, bound: float = 5.0, wire: Wire | None = None) -> object:
    async with httpx.AsyncClient() as http:
        return await rest_predict(http, _candidate(url), b'{"instances": [1.0]}',  # type: ignore[arg-type]
                                  bound, wire or Wire())


async def test_the_wire_is_the_time_from_the_body_sent_to_the_answers_headers(executor) -> None:
    # What the service-time model learns from (mulambda.sdk.counting.Wire): the server's
    # 0.3 s before its headers are in it; the client's own work before and after is not.
    url, told = executor
    told["answer"] = (200, b'{"predictions": [1.5]}', 0.0)
    told["hold"] = 0.3
    wire = Wire()
    called = time.perf_counter()
    assert await _call(url, wire=wire) == [1.5]
    returned = time.perf_counter()
    assert wire.sent is not None and wire.back is not None
    assert called <= wire.sent < wire.back <= returned
    assert (wire.ms() or 0.0) >= 300.0


async def test_a_json_object_with_predictions_is_the_answer(executor) -> None:
    url, _ = executor
    assert await _call(url) == [1.5]


@pytest.mark.parametrize("body", [b"[1, 2]", b'"hi"', b"null", b"<html>", b'{"outputs": 1}'])
async def test_anything_else_is_another_candidates_turn(executor, body: bytes) -> None:
    # A JSON list, string or null was a TypeError out of predict(), with no failover.
    url, told = executor
    told["answer"] = (200, body, 0.0)
    with pytest.raises(Retryable, match="malformed answer"):
        await _call(url)


async def test_an_answer_that_trickles_is_bounded_by_the_attempt_timeout(executor) -> None:
    # A byte every 0.2 s: each read is quick, so httpx's own timeout never fired and the
    # attempt lasted as long as the answer trickled (5.7 s for a 1 s attempt_timeout).
    url, told = executor
    told["answer"] = (200, b'{"predictions": [1.5]}', 0.2)
    started = asyncio.get_running_loop().time()
    with pytest.raises(Retryable, match="no whole answer within 1s"):
        await _call(url, bound=1.0)
    assert asyncio.get_running_loop().time() - started < 3.0


async def test_statuses_say_whose_fault_it_is(executor) -> None:
    url, told = executor
    told["answer"] = (503, b"overloaded", 0.0)
    with pytest.raises(Retryable, match="HTTP 503: overloaded"):
        await _call(url)
    told["answer"] = (400, b'{"error": "bad input"}', 0.0)
    with pytest.raises(PredictionRejected, match="bad input"):
        await _call(url)


async def test_an_answer_too_large_is_not_read_whole(executor, monkeypatch) -> None:
    import mulambda.sdk.transport as transport

    monkeypatch.setattr(transport, "MAX_ANSWER_BYTES", 16)
    url, told = executor
    told["answer"] = (200, b'{"predictions": [' + b"1, " * 20 + b"1]}", 0.0)
    with pytest.raises(Retryable, match="answer larger than 16 bytes"):
        await _call(url)
