"""The gateway's own round trip to a replica, from the TCP connections it opens."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from mulambda.selector.handshakes import KEPT_SAMPLES, Handshakes, Probe

from support.selector_http import served


@pytest.mark.parametrize(("samples", "network"), [
    pytest.param([], None, id="never-connected"),
    pytest.param([3.0, 1.0, 2.0], 1.0, id="least-of-the-kept"),
    # Only the last few count: a path that got slower is learned.
    pytest.param([1.0] + [4.0] * KEPT_SAMPLES, 4.0, id="old-samples-forgotten"),
    pytest.param([-0.5], 0.0, id="never-negative"),
])
def test_network_part_of_a_request(samples, network):
    shakes = Handshakes()
    for ms in samples:
        shakes.add("10.0.0.7:8501", ms)
    assert shakes.network_ms(Probe("10.0.0.7:8501")) == network
    assert shakes.network_ms(Probe("10.0.0.8:8501")) is None  # another replica


async def test_a_session_records_a_handshake_per_connection_it_opens():
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    clock = iter(range(0, 1000, 5))  # each reading 5 "seconds" after the last
    shakes = Handshakes(perf=lambda: float(next(clock)) / 1000)
    async with served(app) as url, aiohttp.ClientSession(
            trace_configs=[shakes.trace_config()]) as http:
        probes = [Probe(), Probe()]
        for probe in probes:  # the second reuses the first one's connection
            async with http.get(url, trace_request_ctx=probe) as resp:
                assert resp.status == 200
    host = url.removeprefix("http://").rstrip("/")
    assert [p.key for p in probes] == [host, host]
    # One sample, of the one connection opened (the connect took one clock step); the
    # request that opened it paid that round trip before its body left, off the wire.
    assert shakes.network_ms(probes[0]) == shakes.network_ms(probes[1]) == 5.0
    for p in probes:  # each request's body left, then its answer's headers came back
        assert p.wire.sent is not None and p.wire.back is not None
        assert p.wire.back > p.wire.sent
