"""Client probing against real loopback responders and a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from mulambda.companion.prober import Prober, ewma
from mulambda.companion.server import Metrics
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, LatencySample

from support.procs import free_port

EXECUTOR, POD = "ml/hpt", "hpt-abc12"


class Responder:
    """A tiny HTTP responder on loopback; ``delay`` before answering; counts concurrency."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests = 0
        self.inflight = 0
        self.max_inflight = 0
        self.release = asyncio.Event()  # ends slow handlers at teardown
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ping"

    async def start(self) -> Responder:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await reader.readuntil(b"\r\n\r\n")
            if self.delay:
                with contextlib.suppress(TimeoutError):  # a slow client: answer late
                    await asyncio.wait_for(self.release.wait(), self.delay)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return  # the prober gave up on this client: expected for slow ones
        finally:
            self.inflight -= 1
            writer.close()

    async def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.close()
            await asyncio.sleep(0.01)  # let released handlers finish


@pytest.fixture
async def responder() -> AsyncIterator[Callable[..., Awaitable[Responder]]]:
    made: list[Responder] = []

    async def make(delay: float = 0.0) -> Responder:
        r = await Responder(delay).start()
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop()


async def register(store: MetadataStore, name: str, url: str | None) -> str:
    await store.put_client(ClientRecord(namespace="ml", name=name, type="regression",
                                        probe_url=url))
    return f"ml/{name}"


def make_prober(store: MetadataStore, **kw: object) -> Prober:
    args: dict = dict(executor=EXECUTOR, pod=POD, interval=0.1, timeout=0.3, concurrency=8,
                      ttl=30.0, alpha=0.5, jitter=0.2, metrics=Metrics())
    args.update(kw)
    return Prober(store, **args)


def sample_value(prober: Prober, name: str, **labels: str) -> float:
    return prober.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_round_with_live_dead_and_slow_clients_is_bounded_and_smooths_live_latency(
    store: MetadataStore, responder
):
    live = await responder()
    slow = await responder(delay=3.0)  # far beyond the 0.3 s timeout
    live_id = await register(store, "live", live.url)
    dead_id = await register(store, "dead", f"http://127.0.0.1:{free_port()}/ping")
    slow_id = await register(store, "slow", slow.url)
    await register(store, "silent", None)  # no probe URL: not probed
    await store.put_latencies(EXECUTOR, POD, {live_id: LatencySample(ms=100.0, samples=3)},
                              ttl=30)
    prober = make_prober(store)

    started = time.monotonic()
    results = await prober.probe_round()
    elapsed = time.monotonic() - started
    await prober.close()

    assert elapsed < 0.3 + 0.4, f"round took {elapsed:.2f}s, slow client stalled it"
    assert set(results) == {live_id, dead_id, slow_id}
    assert (results[dead_id].error, results[slow_id].error) == ("connect", "timeout")
    measured = results[live_id].ms
    assert measured is not None and 0 < measured < 300

    stored = await store.get_latencies(EXECUTOR, POD, [live_id, dead_id, slow_id])
    assert set(stored) == {live_id}, "failed probes must not write a latency"
    assert stored[live_id].samples == 4
    assert stored[live_id].ms == pytest.approx(0.5 * measured + 0.5 * 100.0)

    assert sample_value(prober, "mulambda_companion_probe_errors_total", reason="connect") == 1
    assert sample_value(prober, "mulambda_companion_probe_errors_total", reason="timeout") == 1
    assert sample_value(prober, "mulambda_companion_probe_latency_seconds_count") == 1


async def test_first_sample_is_taken_as_is_and_expires_with_ttl(
    store: MetadataStore, responder, redis_url: str
):
    live = await responder()
    client = await register(store, "live", live.url)
    prober = make_prober(store, ttl=12.0)
    results = await prober.probe_round()
    await prober.close()

    sample = (await store.get_latencies(EXECUTOR, POD, [client]))[client]
    assert sample.samples == 1
    assert sample.ms == pytest.approx(results[client].ms)
    assert sample.expires_at - sample.at == pytest.approx(12.0)
    key_ttl = await store.redis.ttl(store.latency_key(client))
    assert 0 < key_ttl <= 13


async def test_failed_probe_keeps_the_previous_sample_unchanged(store: MetadataStore):
    dead = await register(store, "dead", f"http://127.0.0.1:{free_port()}/")
    await store.put_latencies(EXECUTOR, POD, {dead: LatencySample(ms=5.0, samples=9)}, ttl=30)
    before = (await store.get_latencies(EXECUTOR, POD, [dead]))[dead]
    prober = make_prober(store)
    await prober.probe_round()
    await prober.close()
    after = (await store.get_latencies(EXECUTOR, POD, [dead]))[dead]
    assert (after.ms, after.samples, after.expires_at) == (5.0, 9, before.expires_at)


async def test_concurrency_is_bounded_by_the_semaphore(store: MetadataStore, responder):
    shared = await responder(delay=0.15)
    for i in range(6):
        await register(store, f"c{i}", f"{shared.url}?c={i}")
    prober = make_prober(store, concurrency=2, timeout=2.0)
    started = time.monotonic()
    results = await prober.probe_round()
    elapsed = time.monotonic() - started
    await prober.close()

    assert all(r.ms is not None for r in results.values())
    assert shared.requests == 6
    assert shared.max_inflight == 2
    assert elapsed >= 3 * 0.15 * 0.9  # three waves of two


async def test_loop_survives_store_outage_and_stops_promptly():
    down = MetadataStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="test",
                                  timeout=0.2)
    prober = make_prober(down, interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(prober.run(stop))
    await asyncio.sleep(0.5)
    assert not task.done(), "prober loop ended on a store outage"
    stop.set()
    await asyncio.wait_for(task, 1.0)
    await prober.close()
    await down.close()
    assert sample_value(prober, "mulambda_companion_store_errors_total", component="prober") >= 2


async def test_loop_keeps_probing_on_interval(store: MetadataStore, responder):
    live = await responder()
    client = await register(store, "live", live.url)
    prober = make_prober(store, interval=0.05, jitter=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(prober.run(stop))
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, 1.0)
    await prober.close()
    sample = (await store.get_latencies(EXECUTOR, POD, [client]))[client]
    assert sample.samples >= 3
    assert sample.samples == live.requests


def test_ewma_weights_new_measurement_by_alpha():
    first = ewma(None, 8.0, 0.3)
    assert (first.ms, first.samples) == (8.0, 1)
    smoothed = ewma(LatencySample(ms=10.0, samples=2), 20.0, 0.25)
    assert (smoothed.ms, smoothed.samples) == (12.5, 3)
