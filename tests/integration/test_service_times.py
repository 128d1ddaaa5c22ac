"""Measured service times and fresh load in the store (``P:service``, ``P:inflight``),
against a real redis-server."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from mulambda.policy.inflight import OwnRequests
from mulambda.policy.latency import ServiceTracker
from mulambda.sdk.counting import InflightCounter
from mulambda.store.leases import InflightLeases, InflightReader, Load
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ExecutorRecord, ServiceStats, TimedRequest

from support.procs import RedisServer

pytestmark = pytest.mark.integration


def _executor(name: str = "mx") -> ExecutorRecord:
    return ExecutorRecord(namespace="ml", name=name, model="m", version=1, type="t", input="i",
                          output="o", accuracy=0.9, rest="http://x:8501", grpc="x:8500",
                          state="Ready", service_time_ms=5.0)


async def test_every_writers_measurements_add_up_and_a_writer_leaves_its_own_out(
    store: MetadataStore,
):
    await store.put_executor(_executor())
    a, b = ServiceTracker(), ServiceTracker()
    for _ in range(3):
        a.observe("ml/mx", inflight=1, items=2, elapsed_ms=40, network_ms=10,
                  predicted_ms=20, at=0.0)
    b.observe("ml/mx", inflight=0, items=1, elapsed_ms=15, network_ms=5, predicted_ms=20, at=0.0)
    b.observe_cold_start("ml/mx", 9000)
    await store.publish_inflight("sdk-a", {}, service=a.take_changed())
    await store.publish_inflight("sdk-b", {}, service=b.take_changed())

    snap = await store.snapshot()
    total = snap.service["ml/mx"]
    assert total.count == 4 and total.cold_count == 1 and total.cold_ms == 9000
    assert total.w == pytest.approx(a.stats["ml/mx"].w + b.stats["ml/mx"].w)
    assert total.t == pytest.approx(a.stats["ml/mx"].t + b.stats["ml/mx"].t)
    assert (await store.snapshot(exclude_instance="sdk-a")).service["ml/mx"].count == 1
    assert (await store.service_stats(exclude_instance="sdk-b"))["ml/mx"].count == 3
    # Written with an expiry an hour out.
    raw = json.loads(await store.redis.hget(store.service_key, "ml/mx|sdk-a"))
    assert raw["expires_at"] == pytest.approx(time.time() + 3600, abs=60)


async def test_expired_measurements_are_ignored_pruned_and_removed_with_the_executor(
    store: MetadataStore,
):
    await store.put_executor(_executor())
    old = ServiceStats(w=1, t=30, count=1, expires_at=time.time() - 1)
    await store.redis.hset(store.service_key, "ml/mx|dead", json.dumps(vars(old)))
    tracker = ServiceTracker()
    tracker.observe("ml/mx", inflight=0, items=1, elapsed_ms=15, network_ms=5,
                    predicted_ms=20, at=0.0)
    await store.publish_inflight("live", {}, service=tracker.take_changed())
    assert (await store.snapshot()).service["ml/mx"].count == 1
    assert await store.prune_expired() == 1
    assert await store.redis.hkeys(store.service_key) == ["ml/mx|live"]
    await store.remove_executor("ml/mx")
    assert await store.redis.hgetall(store.service_key) == {}


@pytest.mark.parametrize(("value", "why"), [
    ({"w": "NaN"}, "not a finite number"),
    ({"t": -3}, "is negative"),
    ({"cold_ms": "Infinity"}, "not a finite number"),
])
async def test_impossible_measurements_are_skipped_with_a_logged_reason(
    store: MetadataStore, caplog: pytest.LogCaptureFixture, value: dict, why: str
):
    await store.put_executor(_executor())
    fields = {"w": 1, "t": 20, "count": 1, "expires_at": time.time() + 60}
    # NaN and Infinity as JSON literals (Python's json writes and reads them).
    text = json.dumps({**fields, **value}).replace('"NaN"', "NaN").replace(
        '"Infinity"', "Infinity")
    await store.redis.hset(store.service_key, "ml/mx|bad", text)
    caplog.set_level(logging.WARNING, logger="mulambda.store")
    assert (await store.snapshot()).service == {}
    assert any("field=ml/mx|bad error=" in r.getMessage() and why in r.getMessage()
               for r in caplog.records)


async def test_an_executor_record_with_a_nan_accuracy_is_not_in_the_snapshot(
    store: MetadataStore, caplog: pytest.LogCaptureFixture
):
    good = _executor("good")
    await store.put_executor(good)
    raw = json.loads(json.dumps(vars(_executor("bad"))))
    raw["accuracy"] = float("nan")
    await store.redis.hset(store.executors_key, "ml/bad", json.dumps(raw))
    caplog.set_level(logging.WARNING, logger="mulambda.store")
    assert set((await store.snapshot()).executors) == {"ml/good"}
    assert any("field=ml/bad" in r.getMessage() and "'accuracy' is not a finite number"
               in r.getMessage() for r in caplog.records)


async def test_leases_publish_the_trackers_measurements_with_the_counts(store: MetadataStore):
    tracker = ServiceTracker()
    leases = InflightLeases(store, "sdk-1", service=tracker)
    leases.start("ml/mx")
    tracker.observe("ml/mx", inflight=0, items=1, elapsed_ms=15, network_ms=5,
                    predicted_ms=20, at=0.0)
    await leases.flush()
    assert (await store.inflight_counts()) == {"ml/mx": 1}
    assert (await store.inflight_load()) == ({"ml/mx": 1}, {})  # started without timing
    assert (await store.inflight_counts(exclude_instance="sdk-1")) == {}
    assert (await store.service_stats())["ml/mx"].count == 1
    leases.finish("ml/mx")
    await leases.close()
    assert await store.inflight_counts() == {}
    assert (await store.service_stats())["ml/mx"].count == 1  # measurements stay


async def test_a_retimed_request_reaches_the_other_routers_with_the_next_write(
    store: MetadataStore
):
    # What mulambda.sdk.counting does when an answer shows a request will be served
    # sooner than its lease said: the next write carries the new timing.
    leases = InflightLeases(store, "sdk-1")
    token = leases.start("ml/mx", timing=("mx-0", 1e10 + 0.09, 1e10 + 0.1, 1.0, 2.0, 80.0))
    await leases.flush()
    reader = InflightReader(store, "sdk-2", ttl=0.0, timeout=5.0)  # not a timing test
    first = await reader.read()
    assert first is not None
    assert first.timed == {"ml/mx": [TimedRequest("mx-0", 1e10 + 0.09, 1e10 + 0.1, 1, 2, 80)]}
    leases.retime("ml/mx", token, ("mx-0", 1e10 + 0.02, 1e10 + 0.03, 0.0, 2.0, 10.0))
    leases.retime("ml/mx", token + 1, ("mx-0", 0.0, 0.0))  # not in flight: ignored
    await leases.flush()
    second = await reader.read()
    assert second is not None
    assert second.timed == {"ml/mx": [TimedRequest("mx-0", 1e10 + 0.02, 1e10 + 0.03, 0, 2, 10)]}
    leases.finish("ml/mx", token=token)
    await leases.close()


async def test_fresh_reader_sees_new_leases_at_once_and_gives_up_fast_without_a_store(
    store: MetadataStore, redis_server: RedisServer
):
    reader = InflightReader(store, "me", ttl=0.0, timeout=0.2, backoff=1.0)
    assert await reader.read() == Load({}, {})
    await store.publish_inflight("old", {"ml/mx": 2})  # no timing: only counted
    await store.publish_inflight("other", {"ml/mx": 1},
                                 requests={"ml/mx": [["mx-0", 1e10, 2e10]]})
    await store.publish_inflight("me", {"ml/mx": 5})
    assert await reader.read() == Load({"ml/mx": 2},
                                       {"ml/mx": [TimedRequest("mx-0", 1e10, 2e10)]})
    redis_server.stop()
    try:
        started = time.monotonic()
        assert await reader.read() is None
        assert await reader.read() is None  # backing off: no second wait
        assert time.monotonic() - started < 1.0
    finally:
        redis_server.start()
    reader.close()


def _measured(ms: float, n: int = 3) -> dict[str, ServiceStats]:
    tracker = ServiceTracker()
    for _ in range(n):
        tracker.observe("ml/mx", inflight=0, items=1, elapsed_ms=ms + 1, network_ms=1,
                        predicted_ms=5, at=0.0)
    return tracker.take_changed()


async def test_fresh_reader_with_service_reads_the_others_measurements_at_every_read(
    store: MetadataStore,
):
    with_service = InflightReader(store, "me", ttl=0.0, timeout=0.5, service=True)
    without = InflightReader(store, "me", ttl=0.0, timeout=0.5)
    assert await with_service.read() == Load({}, {}, {})
    assert (await without.read()).service is None  # type: ignore[union-attr]
    await store.publish_inflight("sdk-a", {}, service=_measured(40))
    await store.publish_inflight("me", {}, service=_measured(900))  # its own: left out
    first = await with_service.read()
    assert first is not None and first.service is not None
    assert first.service["ml/mx"].count == 3
    # Another writer's new measurements are added up at the next read (the changed
    # fields only: the mirror's XRANGE then HMGET, not a whole read).
    await store.publish_inflight("sdk-b", {}, service=_measured(40, n=2))
    second = await with_service.read()
    assert second is not None and second.service is not None
    assert second.service["ml/mx"].count == 5
    assert with_service._mirror._mirrors.parts[1][0].reloads == 1
    assert (await without.read()).service is None  # type: ignore[union-attr]
    with_service.close()
    without.close()


async def test_faded_measurements_reach_the_other_routers_through_the_store(
    store: MetadataStore,
):
    # A router that got no answer from an executor for two idle half-lives halves its
    # sums twice before its next decision (ServiceTracker.fade) and its lease writer
    # publishes them, unasked, so every other router fits on the faded sums too.
    tracker = ServiceTracker()
    leases = InflightLeases(store, "sdk-1", service=tracker)
    mono = [100.0]
    counter = InflightCounter(tracker, OwnRequests(), leases, monotonic=lambda: mono[0])
    try:
        tracker.observe("ml/mx", inflight=0, items=1, elapsed_ms=15, network_ms=5,
                        predicted_ms=20, at=mono[0])
        await leases.flush()
        published = (await store.service_stats())["ml/mx"]
        mono[0] += 2 * tracker.settings.idle_half_life_s
        counter.measurements()
        for _ in range(100):
            faded = (await store.service_stats())["ml/mx"]
            if faded.w < published.w:
                break
            await asyncio.sleep(0.02)
        assert faded.w == pytest.approx(published.w / 4)
        assert faded.t == pytest.approx(published.t / 4)
        assert faded.count == published.count
    finally:
        await leases.close()
