"""The selector under concurrency and many client names, against a real redis-server
(issue 12, capacity): no 5xx at 1,000 concurrent requests, one shared snapshot read
single-flight, demand coalesced into few pipelined writes, memory bounded whatever the
number of client names."""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mulambda.selector.app import create_app, selector_server_options
from mulambda.selector.service import SELECTOR_KEY
from mulambda.store.demand import DEMAND_BUCKET_SECONDS
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    _dump,
)

pytestmark = pytest.mark.integration

TYPES = 10


async def fill(store: MetadataStore, executors: int) -> None:
    """``executors`` warm executors over ``TYPES`` model types, one live replica each."""
    records = [ExecutorRecord(
        namespace="ml", name=f"e{i}", model=f"m{i}", version=1, type=f"t{i % TYPES}",
        input="image", output="label", accuracy=0.5 + (i % 50) / 100,
        rest=f"http://e{i}.ml:8501", grpc=f"e{i}.ml:8500", state="Ready",
        service_time_ms=1 + i % 20) for i in range(executors)]
    await store.put_executors(records)
    now = time.time()
    replicas = {f"{r.id}|{r.name}-0": _dump(ReplicaRecord(
        executor=r.id, pod=f"{r.name}-0", state="Available", heartbeat_at=now,
        expires_at=now + 600)) for r in records}
    await store.redis.hset(store.replicas_key, mapping=replicas)  # type: ignore[arg-type]


class Served:
    """A selector app on loopback: its URL and its state."""

    def __init__(self, app: web.Application, url: str) -> None:
        self.app, self.url = app, url

    @property
    def sel(self) -> Any:
        return self.app[SELECTOR_KEY]


async def serve(store: MetadataStore, **options: Any) -> tuple[web.AppRunner, Served]:
    app = create_app(store, **options)
    runner = web.AppRunner(app, **selector_server_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, Served(app, f"http://127.0.0.1:{port}")


@pytest.fixture
async def selector(store: MetadataStore) -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(**options: Any) -> Served:
        runner, served = await serve(store, **options)
        runners.append(runner)
        return served

    yield start
    for runner in runners:
        await runner.cleanup()


def count_calls(obj: Any, name: str, delay: float = 0.0) -> list[float]:
    """Wrap ``obj.name`` (an async method) to record when each call started; optionally
    make each call take ``delay`` seconds longer."""
    calls: list[float] = []
    original = getattr(obj, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        if delay:
            await asyncio.sleep(delay)
        return await original(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def count_clients_read(store: MetadataStore, delay: float = 0.0) -> list[str]:
    """Wrap ``store.client_views`` to record each client whose part is read (clients due
    together are read in one round trip); optionally make each read ``delay`` slower."""
    clients: list[str] = []
    original = store.client_views

    async def counted(names: list[str], **kwargs: Any) -> Any:
        clients.extend(names)
        if delay:
            await asyncio.sleep(delay)
        return await original(names, **kwargs)

    store.client_views = counted  # type: ignore[method-assign]
    return clients


async def burst(url: str, paths: list[str], body: dict[str, Any]) -> Counter[int]:
    """POST ``body`` to every path at once, one connection each; statuses counted."""
    statuses: Counter[int] = Counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as http:
        async def one(path: str) -> None:
            async with http.post(url + path, json=body) as resp:
                await resp.read()
                statuses[resp.status] += 1

        await asyncio.gather(*(one(p) for p in paths))
    return statuses


async def test_a_thousand_concurrent_selections_all_answer_without_5xx(store, selector):
    await fill(store, 1000)
    served = await selector(cache_ttl=0.5)
    refreshes = count_calls(served.sel.shared.reader, "snapshot")
    paths = [f"/select/shop/app{i % 50}" for i in range(1000)]

    statuses = await burst(served.url, paths, {"required": {"type": "t3"}})

    assert statuses == Counter({200: 1000})
    # One shared snapshot for all 50 clients, read again at most once per TTL.
    assert 1 <= len(refreshes) <= 2 + (refreshes[-1] - refreshes[0]) / 0.5


async def test_the_shared_snapshot_is_refreshed_single_flight(store, selector):
    await fill(store, 100)
    served = await selector(cache_ttl=60)
    # A slow store read: every request of the burst arrives while it is in progress.
    refreshes = count_calls(served.sel.shared.reader, "snapshot", delay=0.3)
    client_reads = count_clients_read(store, delay=0.3)
    paths = [f"/select/shop/app{i % 10}" for i in range(200)]

    statuses = await burst(served.url, paths, {"required": {"type": "t1"}})

    assert statuses == Counter({200: 200})
    assert len(refreshes) == 1  # one read for 200 requests and 10 clients
    assert sorted(client_reads) == sorted(f"shop/app{i}" for i in range(10))  # one per client
    metrics = await fetch_metrics(served.url)
    assert "mulambda_selector_snapshot_refreshes_total 1.0" in metrics
    # Expired: the next burst waits for one refresh again.
    served.sel.shared.ttl = served.sel.clients.ttl = 0.0
    assert await burst(served.url, paths[:50], {"required": {"type": "t1"}}) == Counter({200: 50})
    assert len(refreshes) == 2


async def fetch_metrics(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        return await resp.text()


async def test_demand_is_coalesced_into_few_writes_and_counted(store, selector):
    await fill(store, 20)
    served = await selector(cache_ttl=0.5, demand_interval=0.2)
    writes = count_calls(store, "add_demand")
    paths = [f"/select/shop/app{i % 5}" for i in range(300)]
    body = {"required": {"type": "t0"}, "desired": {"accuracy": 1, "latency": 0}}

    assert await burst(served.url, paths, body) == Counter({200: 300})

    demand_keys = [store.demand_key(int(time.time() // DEMAND_BUCKET_SECONDS) - k)
                   for k in range(3)]

    async def written() -> int:
        total = 0
        for key in demand_keys:
            total += sum(int(v) for v in (await store.redis.hgetall(key)).values())
        return total

    for _ in range(100):
        if await written() >= 300:
            break
        await asyncio.sleep(0.05)
    assert await written() == 300  # every selection, none lost
    assert 1 <= len(writes) <= 10  # batched: a few pipelines, not 300 writes
    metrics = await fetch_metrics(served.url)
    assert "mulambda_selector_demand_written_total 300.0" in metrics
    assert not [line for line in metrics.splitlines()
                if line.startswith("mulambda_selector_demand_dropped_total{")]  # none dropped


async def test_memory_stays_bounded_for_ten_thousand_client_names(store):
    """10,000 client names (1,500 of them registered, with latency samples) against
    1,000 executors: what the selector keeps grows by far less than 20 MB."""
    await fill(store, 1000)
    registered = 1500
    async with store.redis.pipeline(transaction=False) as pipe:
        for i in range(registered):
            client = ClientRecord(namespace="shop", name=f"reg{i}", type=f"t{i % TYPES}")
            pipe.hset(store.clients_key, client.id, _dump(client))
            sample = LatencySample(ms=1.0, samples=1, expires_at=time.time() + 600)
            pipe.hset(store.latency_key(client.id), "ml/e1|e1-0", _dump(sample))
        await pipe.execute()
    app = create_app(store, cache_ttl=60)
    sel = app[SELECTOR_KEY]
    names = [f"shop/reg{i}" for i in range(registered)] + [
        f"made-up/{i:05d}-{'x' * 40}" for i in range(10_000 - registered)]
    gate = asyncio.Semaphore(64)

    async def view(name: str) -> None:
        async with gate:
            snap = await sel.view(name)
            assert len(snap.executors) == 1000

    await asyncio.gather(*(view(n) for n in names[:200]))  # warm: the shared snapshot
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(names), 1000):
            await asyncio.gather(*(view(n) for n in names[start:start + 1000]))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20 * 2**20, f"grew {grown / 2**20:.1f} MiB"
    assert len(sel.clients) <= 1024  # registered clients: a bounded LRU
    assert sel.clients.samples <= 1024
    assert len(sel.clients._unknown) <= sel.clients.max_unknown  # made-up names: names only
    assert not sel.clients._pending
    await sel.close()


async def test_a_made_up_name_is_read_from_the_store_once_per_ttl(store, monkeypatch):
    """Unknown names are remembered (names only, bounded) for the cache TTL: a caller
    repeating one costs no store read per request, and it evicts no registered client."""
    await fill(store, 10)
    client = ClientRecord(namespace="shop", name="known", type="t0")
    await store.redis.hset(store.clients_key, client.id, _dump(client))
    app = create_app(store, cache_ttl=60)
    sel = app[SELECTOR_KEY]
    reads: list[str] = []
    real = store.client_views

    async def counted(names: list[str], **kw):
        reads.extend(names)
        return await real(names, **kw)

    monkeypatch.setattr(store, "client_views", counted)
    sel.clients.max_unknown = 3
    assert (await sel.view("shop/known")).client_record == client
    for _ in range(5):
        snap = await sel.view("made-up/a")
        assert snap.client_record is None and not snap.latency
    assert reads == ["shop/known", "made-up/a"]
    for name in ("made-up/b", "made-up/c", "made-up/d"):  # pushes "a" out
        await sel.view(name)
    await sel.view("made-up/a")
    assert reads.count("made-up/a") == 2
    assert len(sel.clients._unknown) == 3 and len(sel.clients) == 1
    await sel.view("shop/known")
    assert reads.count("shop/known") == 1  # still kept
    await sel.close()
