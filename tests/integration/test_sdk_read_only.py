"""The SDK with the tenants' read-only store user, against a real redis-server with the
store's ACLs: it predicts and writes nothing (no lease, no demand, no refused write
logged), and wakes executors at zero through the selector."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from mulambda.sdk import MulambdaClient
from mulambda.selector.app import create_app, selector_server_options
from mulambda.store.demand import _bucket
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, ExecutorRecord, LatencySample, ReplicaRecord

from support.acl_store import login, role_stores
from support.procs import RedisServer
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

P = "ro"
CLIENT = "apps/shop"


@pytest.fixture
async def world(acl_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
    dict[str, MetadataStore]
]:
    acl_redis.flush()
    stores = role_stores(acl_redis.url, P, monkeypatch,
                         ("operator", "companion", "selector", "client"))
    yield stores
    for s in stores.values():
        await s.close()


async def _executor(stores: dict[str, MetadataStore], name: str, rest: str, *, accuracy: float,
                    warm: bool) -> str:
    rec = ExecutorRecord(namespace="ml", name=name, model=f"model-{name}", version=1,
                         type="vision", input="image", output="label", accuracy=accuracy,
                         rest=rest, grpc="127.0.0.1:1", service_time_ms=5.0,
                         state="Ready" if warm else "ScaledToZero",
                         min_replicas=1 if warm else 0)
    await stores["operator"].put_executor(rec)
    if warm:
        await stores["companion"].put_replica(
            ReplicaRecord(executor=rec.id, pod=f"{name}-0", state="Available"), ttl=60)
        await stores["companion"].put_latencies(
            rec.id, f"{name}-0", {CLIENT: LatencySample(ms=1.0, samples=3)}, ttl=60)
    return rec.id


def _refused(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings of writes the store refused (leases, demand, outcomes)."""
    return [r.getMessage() for r in caplog.records
            if any(w in r.getMessage() for w in ("NOPERM", "no permissions", "not published",
                                                 "not released", "signal failed"))]


async def test_a_read_only_sdk_predicts_and_writes_nothing(acl_redis, world, caplog):
    double = await TFServingDouble("warm").start()
    try:
        await _executor(world, "warm", double.url, accuracy=0.8, warm=True)
        await world["operator"].put_client(ClientRecord(namespace="apps", name="shop",
                                                        type="vision"))
        caplog.set_level(logging.WARNING)
        async with MulambdaClient(world["client"], CLIENT, read_only=True) as mu:
            for _ in range(20):
                result = await mu.predict([[1, 2]])
                assert result.executor == "ml/warm"
            await asyncio.sleep(0.5)  # a lease writer, were there one, would have written
        assert len(double.requests) == 20
    finally:
        await double.stop()
    with login(acl_redis.url, "operator") as op:
        assert op.hgetall(f"{P}:inflight") == {}
        assert op.hgetall(f"{P}:demand:{_bucket()}") == {}
    assert not _refused(caplog)


async def test_without_read_only_the_same_user_is_refused_writes(acl_redis, world, caplog):
    """What read-only mode is for: the tenants' user may not write leases."""
    double = await TFServingDouble("warm").start()
    try:
        await _executor(world, "warm", double.url, accuracy=0.8, warm=True)
        caplog.set_level(logging.WARNING)
        async with MulambdaClient(world["client"], CLIENT, type="vision",
                                  read_only=False) as mu:
            await mu.predict([[1, 2]])
            await asyncio.sleep(0.3)
    finally:
        await double.stop()
    assert _refused(caplog)


async def test_a_read_only_sdk_wakes_a_cold_executor_through_the_selector(world):
    double = await TFServingDouble("warm").start()
    app = create_app(world["selector"], demand_interval=0.05)
    runner = web.AppRunner(app, **selector_server_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        await _executor(world, "warm", double.url, accuracy=0.5, warm=True)
        cold = await _executor(world, "cold", "http://127.0.0.1:1", accuracy=0.99, warm=False)
        async with MulambdaClient(world["client"], CLIENT, type="vision", read_only=True,
                                  selector_url=f"http://127.0.0.1:{port}") as mu:
            ranking = await mu.ranking()
            assert ranking.wake == [cold]  # worth waking: far more accurate
            result = await mu.predict([[1, 2]])  # served warm meanwhile
            assert result.executor == "ml/warm"
            deadline = time.monotonic() + 5
            demand = 0
            while time.monotonic() < deadline and not demand:
                await asyncio.sleep(0.05)
                for bucket in (_bucket(), _bucket() - 1):
                    got = await world["operator"].redis.hget(
                        world["operator"].demand_key(bucket), cold)
                    demand += int(got or 0)
            assert demand >= 1, "the selector never signalled demand for the cold executor"
    finally:
        await runner.cleanup()
        await double.stop()
