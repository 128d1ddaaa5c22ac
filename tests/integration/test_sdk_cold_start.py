"""The SDK and executors scaled to zero: wait for activation, or use a warm model meanwhile.

Real redis-server, TF Serving REST test doubles on loopback. The "activator"
here plays the operator and the companion: it waits for the demand the SDK
records, then publishes a live replica, as a started pod's companion would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from mulambda.sdk import AllCandidatesFailed, MulambdaClient
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ExecutorRecord, LatencySample, ReplicaRecord

from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

CLIENT = "apps/shop"


async def put_executor(store: MetadataStore, name: str, rest: str, *, warm: bool,
                       accuracy: float) -> str:
    rec = ExecutorRecord(
        namespace="ml", name=name, model=f"model-{name}", version=1, type="sentiment",
        input="text", output="label", accuracy=accuracy, rest=rest, grpc="127.0.0.1:1",
        state="Ready" if warm else "ScaledToZero", min_replicas=0, service_time_ms=5.0,
    )
    await store.put_executor(rec)
    if warm:
        await publish_replica(store, rec)
    return rec.id


async def publish_replica(store: MetadataStore, rec: ExecutorRecord) -> None:
    rec.state = "Ready"
    await store.put_executor(rec)
    await store.put_replica(ReplicaRecord(executor=rec.id, pod=f"{rec.name}-0",
                                          state="Available"), ttl=60)
    await store.put_latencies(rec.id, f"{rec.name}-0",
                              {CLIENT: LatencySample(ms=1.0, samples=1)}, ttl=60)


async def activator(store: MetadataStore, executor: str, delay: float) -> float:
    """Wait for demand on ``executor``, 'start a pod' for ``delay`` s, publish it."""
    while True:  # polling the store is what the operator's autoscaler does too
        if (await store.executor_load(executor, window_seconds=20))[1] > 0:
            break
        await asyncio.sleep(0.05)
    seen = time.monotonic()
    await asyncio.sleep(delay)
    rec = (await store.snapshot()).executors.get(executor)
    assert rec is not None
    await publish_replica(store, rec)
    return seen


@pytest.fixture
async def doubles() -> AsyncIterator[list[TFServingDouble]]:
    made: list[TFServingDouble] = []
    yield made
    for d in made:
        await d.stop()


async def test_waiting_client_signals_demand_and_predicts_once_activated(store, doubles):
    cold = await TFServingDouble("cold").start()
    doubles.append(cold)
    eid = await put_executor(store, "cold", cold.url, warm=False, accuracy=0.95)
    wake = asyncio.create_task(activator(store, eid, delay=1.0))

    started = time.monotonic()
    async with MulambdaClient(store, CLIENT, type="sentiment", cold_start="Wait",
                              cold_start_timeout=10) as mu:
        result = await mu.predict([["great"]])
    elapsed = time.monotonic() - started

    assert result.executor == eid and result.predictions == [["cold"]]
    assert elapsed >= 1.0  # it waited for the activation, it did not fail fast
    assert wake.done()
    assert (await store.snapshot()).inflight.get(eid, 0) == 0


async def test_waiting_gives_up_after_the_cold_start_timeout(store, doubles):
    cold = await TFServingDouble("cold").start()
    doubles.append(cold)
    eid = await put_executor(store, "cold", cold.url, warm=False, accuracy=0.95)

    started = time.monotonic()
    async with MulambdaClient(store, CLIENT, type="sentiment", cold_start="Wait",
                              cold_start_timeout=1.0) as mu:
        with pytest.raises(AllCandidatesFailed, match="cold start not done"):
            await mu.predict([["meh"]])
    assert 1.0 <= time.monotonic() - started < 5
    assert (await store.executor_load(eid, window_seconds=20))[1] > 0  # it did ask for it
    assert cold.requests == []


async def test_use_warm_client_is_served_by_a_warm_model_while_the_better_one_wakes(
    store, doubles
):
    cold = await TFServingDouble("cold").start()
    warm = await TFServingDouble("warm").start()
    doubles += [cold, warm]
    best = await put_executor(store, "cold", cold.url, warm=False, accuracy=0.99)
    await put_executor(store, "warm", warm.url, warm=True, accuracy=0.5)

    async with MulambdaClient(store, CLIENT, type="sentiment", cold_start="UseWarm",
                              latency_weight=0, accuracy_weight=1) as mu:
        started = time.monotonic()
        result = await mu.predict([["ok"]])
        assert time.monotonic() - started < 1.0  # no waiting
        assert result.executor == "ml/warm"
        # The much better cold model was asked for, so the operator activates it.
        for _ in range(40):
            if (await store.executor_load(best, window_seconds=20))[1] > 0:
                break
            await asyncio.sleep(0.05)
        assert (await store.executor_load(best, window_seconds=20))[1] > 0
    assert cold.requests == []


async def test_pending_record_with_a_live_replica_serves_at_once(store, doubles):
    # The operator rewrites the record's state only every reconcile interval;
    # the companion's Available heartbeat is the fresher truth.
    fresh = await TFServingDouble("fresh").start()
    doubles.append(fresh)
    rec = ExecutorRecord(
        namespace="ml", name="fresh", model="model-fresh", version=1, type="sentiment",
        input="text", output="label", accuracy=0.9, rest=fresh.url, grpc="127.0.0.1:1",
        state="Pending", min_replicas=1, service_time_ms=5.0,
    )
    await store.put_executor(rec)
    await store.put_replica(ReplicaRecord(executor=rec.id, pod="fresh-0", state="Available"),
                            ttl=60)
    async with MulambdaClient(store, CLIENT, type="sentiment", cold_start_timeout=1) as mu:
        result = await mu.predict([["hi"]])
    assert result.executor == rec.id and result.candidate.warm
    assert result.predictions == [["fresh"]]
