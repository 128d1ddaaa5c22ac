"""The SDK measures what it sees: response times, other routers' load, cold starts.

Real redis-server, TF Serving REST test doubles on loopback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mulambda.policy.latency import ServiceModel, ServiceTracker, fit
from mulambda.sdk import MulambdaClient
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ExecutorRecord, LatencySample, ReplicaRecord

from support.procs import free_port
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

CLIENT = "shop/app"


async def register(store: MetadataStore, name: str, rest: str, *, rtt: float,
                   service: float, accuracy: float = 0.9, ip: str = "",
                   state: str = "Ready", min_replicas: int = 1) -> str:
    rec = ExecutorRecord(
        namespace="ml", name=name, model=f"model-{name}", version=1, type="vision",
        input="image", output="label", accuracy=accuracy, rest=rest, grpc="127.0.0.1:1",
        state=state, min_replicas=min_replicas, service_time_ms=service,
    )
    await store.put_executor(rec)
    if state != "ScaledToZero":
        await publish_replica(store, rec, rtt=rtt, ip=ip)
    return rec.id


async def publish_replica(store: MetadataStore, rec: ExecutorRecord, *, rtt: float = 1.0,
                          ip: str = "") -> None:
    await store.put_replica(ReplicaRecord(executor=rec.id, pod=f"{rec.name}-0", ip=ip,
                                          state="Available"), ttl=60)
    await store.put_latencies(rec.id, f"{rec.name}-0", {CLIENT: LatencySample(ms=rtt, samples=3)},
                              ttl=60)


@pytest.fixture
async def doubles() -> AsyncIterator[list[TFServingDouble]]:
    made: list[TFServingDouble] = []
    yield made
    for d in made:
        await d.stop()


async def serve(store: MetadataStore, doubles: list[TFServingDouble], name: str, *,
                on_request: Any = None, **record: Any) -> str:
    """A TF Serving double named ``name`` (stopped after the test), registered as an
    executor with :func:`register`'s keywords; returns the executor's id."""
    double = await TFServingDouble(name, on_request=on_request).start()
    doubles.append(double)
    return await register(store, name, double.url, **record)


def sleeper(seconds: float):
    async def sleep() -> None:
        await asyncio.sleep(seconds)
    return sleep


async def test_a_model_slower_than_declared_is_measured_and_left(store, doubles):
    # "liar" declares 1 ms and takes 300; "honest" declares 20 and takes 10.
    await serve(store, doubles, "liar", on_request=sleeper(0.3), rtt=1, service=1)
    await serve(store, doubles, "honest", on_request=sleeper(0.01), rtt=1, service=20)

    async with MulambdaClient(store, CLIENT, type="vision", latency_weight=1,
                              accuracy_weight=0, seed=1) as mu:
        used = [(await mu.predict([[0]])).executor for _ in range(8)]
        measured = (await mu.select()).record.name
    assert used[0] == "ml/liar"
    assert used[-3:] == ["ml/honest"] * 3 and measured == "honest"
    # What it measured is in the store for every other router (P:service).
    stats = (await store.service_stats())["ml/liar"]
    assert stats.count >= 1
    assert fit(stats, ServiceModel(1, 1)).base_ms > 20  # no longer the declared 1 ms


async def test_requests_go_to_the_replica_pod_address(store, doubles):
    served = await TFServingDouble("pod").start()
    doubles.append(served)
    # The Service name does not resolve: only the pod IP from the heartbeat reaches it.
    await register(store, "pod", f"http://no-such-service.invalid:{served.port}", rtt=1,
                   service=5, ip="127.0.0.1")
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        result = await mu.predict([[1]])
    assert result.predictions == [["pod"]]
    assert result.candidate.replica is not None and result.candidate.replica.pod == "pod-0"
    assert result.candidate.url == f"http://127.0.0.1:{served.port}"


async def test_another_sdks_requests_in_flight_are_seen_at_once(store, doubles):
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    # A request on "near" is expected to take 500 ms (the lease says when it will be
    # served), so it still counts as ahead when b decides, however slow this machine.
    await serve(store, doubles, "near", on_request=hold, rtt=1, service=500)
    await serve(store, doubles, "other", rtt=60, service=500)
    # load_timeout: the fresh read gives up after 50 ms by default (a request must not
    # wait on the store); a loaded CI machine can take longer, and this test is about
    # what the read sees, not how fast it is.
    crit = {"type": "vision", "latency_weight": 1, "accuracy_weight": 0, "cache_ttl": 60,
            "load_timeout": 5.0}
    async with MulambdaClient(store, CLIENT, **crit) as a, \
            MulambdaClient(store, CLIENT, **crit) as b:
        assert (await b.select()).executor_id == "ml/near"  # b's snapshot is now cached
        call = asyncio.create_task(a.predict([[0]]))
        deadline = time.monotonic() + 10  # a's lease reaches the store in the background
        while not (await store.inflight_counts()).get("ml/near"):
            assert time.monotonic() < deadline, "a's in-flight lease never reached the store"
            await asyncio.sleep(0.01)
        # b's snapshot is a minute old, but it reads the in-flight leases fresh.
        assert (await b.select()).executor_id == "ml/other"
        release.set()
        await call


async def test_a_request_not_back_when_due_turns_the_next_ones_away_before_its_answer(
        store, doubles):
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        arrived.set()
        await release.wait()

    # "stalls" declares 5 ms and holds what it gets; "steady" declares 40.
    await serve(store, doubles, "stalls", on_request=hold, rtt=1, service=5)
    await serve(store, doubles, "steady", rtt=1, service=40)
    async with MulambdaClient(store, CLIENT, type="vision", latency_weight=1,
                              accuracy_weight=0, seed=1) as mu:
        call = asyncio.create_task(mu.predict([[0]]))
        await asyncio.wait_for(arrived.wait(), 10)
        await asyncio.sleep(0.2)  # it was due back after about 6 ms
        # Counted as one request ahead at 5 ms each, "stalls" would still look like
        # 1 + 5 + 5 = 11 ms against 41: the request it has held for 200 ms says more.
        stalls = next(c for c in await mu.ranking() if c.executor_id == "ml/stalls")
        assert stalls.service_ms >= 190
        assert (await mu.select()).executor_id == "ml/steady"
        release.set()
        assert (await call).executor == "ml/stalls"


async def test_a_cold_start_is_measured_and_published(store, doubles):
    best = await serve(store, doubles, "cold", rtt=1, service=5, accuracy=0.99,
                       state="ScaledToZero", min_replicas=0)
    await serve(store, doubles, "warm", rtt=1, service=5, accuracy=0.5)
    async with MulambdaClient(store, CLIENT, type="vision", latency_weight=0,
                              accuracy_weight=1, cache_ttl=0.1) as mu:
        assert (await mu.predict([[0]])).executor == "ml/warm"  # and "cold" is asked to wake
        started = time.monotonic()
        await asyncio.sleep(0.3)
        rec = (await store.snapshot()).executors[best]
        await publish_replica(store, rec)  # the activated pod's companion
        for _ in range(100):
            stats = (await store.service_stats()).get(best)
            if stats is not None and stats.cold_count:
                break
            await mu.select()  # refreshes the snapshot: the replica is there
            await asyncio.sleep(0.05)
        assert stats is not None and stats.cold_count == 1
        assert 300 <= stats.cold_ms <= (time.monotonic() - started) * 1000 + 1000
        assert (await mu.predict([[0]])).executor == best  # warm now, and the best


async def test_an_unreachable_replica_address_fails_over(store, doubles):
    backup = await TFServingDouble("backup").start()
    doubles.append(backup)
    await register(store, "gone", f"http://127.0.0.1:{free_port()}", rtt=1, service=5,
                   ip="127.0.0.1")
    await register(store, "backup", backup.url, rtt=20, service=5)
    async with MulambdaClient(store, CLIENT, type="vision", latency_weight=1,
                              accuracy_weight=0) as mu:
        result = await mu.predict([[0]])
    assert result.executor == "ml/backup" and result.attempts == 2


async def test_the_sdk_fits_on_the_others_measurements_read_at_each_decision(store, doubles):
    # Both declare fast; another SDK process has since measured "a" at 300 ms. The
    # snapshot (an hour's cache here) predates that; the per-decision read does not.
    await serve(store, doubles, "a", rtt=1, service=5)
    await serve(store, doubles, "b", rtt=1, service=20)
    # The default load_ttl (0): every decision reads; with a load_ttl decisions within it
    # would share one read, and the publish below could land inside the first one's.
    kwargs = {"type": "vision", "latency_weight": 1, "accuracy_weight": 0, "seed": 1,
              "cache_ttl": 3600}
    async with MulambdaClient(store, CLIENT, **kwargs) as fresh, \
            MulambdaClient(store, CLIENT, fresh_load=False, **kwargs) as stale:
        assert (await fresh.select()).executor_id == "ml/a"
        assert (await stale.select()).executor_id == "ml/a"
        other = ServiceTracker()
        for _ in range(5):
            other.observe("ml/a", inflight=0, items=1, elapsed_ms=301, network_ms=1,
                          predicted_ms=5, at=0.0)
        await store.publish_inflight("other-sdk", {}, service=other.take_changed())
        chosen = await fresh.select()
        assert chosen.executor_id == "ml/b"
        assert next(c for c in await fresh.ranking() if c.executor_id == "ml/a").service_ms > 100
        # Without fresh reads the snapshot's copy (taken before) still rules.
        assert (await stale.select()).executor_id == "ml/a"
