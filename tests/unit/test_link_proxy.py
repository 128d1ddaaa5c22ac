"""bench/link_proxy.py: the per-connection cap and the per-request latency hold.

Timings are judged against an uncapped transfer measured in the same test,
so a slow or busy machine widens the tolerance instead of failing the test.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from types import ModuleType

import pytest

from support.benches import bench_module

MB = 1_000_000
CAP = 20 * MB


@pytest.fixture(scope="module")
def lp() -> Iterator[ModuleType]:
    with bench_module("link_proxy.py") as module:
        yield module

@pytest.fixture(scope="module")
def source(lp: ModuleType) -> Iterator[object]:
    with lp.ByteSource() as src:
        yield src


def seconds(lp: ModuleType, port: int, connections: int, n: int) -> float:
    return connections * n / lp.transfer(port, connections, n)


def test_one_connection_moves_at_the_cap(lp: ModuleType, source) -> None:
    n = 20 * MB  # 1 s at 20 MB/s
    with lp.LinkProxy(source.port) as open_proxy:
        uncapped = seconds(lp, open_proxy.port, 1, n)
    with lp.LinkProxy(source.port, bytes_per_s=CAP) as proxy:
        capped = seconds(lp, proxy.port, 1, n)
        assert proxy.connections == 1
    expected = n / CAP
    assert uncapped < expected / 4, "the machine itself is too slow to judge the cap"
    # Never faster than the cap (at most one 5 ms burst ahead); slower only by
    # what moving the bytes costs here, which the uncapped transfer measures.
    assert capped / expected >= 0.95
    assert capped / expected <= 1.05 + 2 * uncapped / expected


def test_each_connection_has_its_own_cap(lp: ModuleType, source) -> None:
    n = 8 * MB  # 0.4 s per connection at 20 MB/s
    with lp.LinkProxy(source.port) as open_proxy:
        uncapped = seconds(lp, open_proxy.port, 2, n)
    with lp.LinkProxy(source.port, bytes_per_s=CAP) as proxy:
        capped = seconds(lp, proxy.port, 2, n)
    expected = n / CAP  # both in parallel: twice the cap in aggregate, not one cap shared
    assert capped / expected >= 0.95
    # One cap shared would take twice as long (2.0); the margin below it is for a busy
    # machine (1.34 was seen in CI with a 5 % bound: two proxied streams on two cores).
    assert capped / expected <= 1.5 + 2 * uncapped / expected


def test_latency_delays_every_request_once(lp: ModuleType, source) -> None:
    latency = 0.1
    with lp.LinkProxy(source.port) as open_proxy, \
            socket.create_connection(("127.0.0.1", open_proxy.port)) as sock:
        plain = max(lp.fetch(sock, 1000) for _ in range(3))
    with lp.LinkProxy(source.port, latency_s=latency) as proxy, \
            socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        firsts = [lp.fetch(sock, 1000) for _ in range(3)]  # one keep-alive connection
    for first in firsts:
        assert latency <= first <= latency + 0.02 + 5 * plain


def test_pacer_banks_at_most_one_burst_of_idle_time(lp: ModuleType) -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    pacer = lp.Pacer(1000.0, burst_s=0.01, clock=lambda: now[0], sleep=sleep)
    pacer.spend(500)  # 0.5 s worth
    assert slept == [pytest.approx(0.5)]
    now[0] += 10.0  # idle: only 10 ms of it may be spent later
    slept.clear()
    pacer.spend(10)
    assert slept == []
    pacer.spend(100)
    assert slept == [pytest.approx(0.1)]
    assert lp.Pacer(None).chunk == lp.UNPACED_CHUNK
    assert lp.Pacer(80e6).chunk == 400_000  # one 5 ms burst per move


def test_stop_ends_open_connections(lp: ModuleType, source) -> None:
    proxy = lp.LinkProxy(source.port, bytes_per_s=CAP).start()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(b"%d\n" % (100 * MB))  # would take 5 s
    sock.recv(1)
    started = time.perf_counter()
    proxy.stop()
    assert time.perf_counter() - started < 1.0
    sock.settimeout(2)
    while sock.recv(1 << 20):
        pass  # the proxy closed its end: EOF, not a hang
    sock.close()
