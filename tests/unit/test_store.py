"""The metadata store against a real redis-server."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

import pytest

from mulambda.store.leases import InflightLeases
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, ExecutorRecord, LatencySample, ReplicaRecord


def _executor(name: str = "mx", ns: str = "ml") -> ExecutorRecord:
    return ExecutorRecord(
        namespace=ns, name=name, model="m", version=1, type="t", input="i", output="o",
        accuracy=0.9, rest="http://x:8501", grpc="x:8500",
    )


async def test_snapshot_reads_executors_replicas_latency_in_one_pipeline(
    store: MetadataStore, monkeypatch: pytest.MonkeyPatch
):
    await store.put_executor(_executor())
    await store.put_replica(ReplicaRecord(executor="ml/mx", pod="p1", state="Available"), ttl=30)
    await store.put_latencies("ml/mx", "p1", {"ml/c": LatencySample(ms=3.0, samples=2)}, ttl=30)
    await store.publish_inflight("sdk", {"ml/mx": 2})

    # Count round trips: every command must go through one pipeline execution.
    executions = 0
    real_pipeline = store.redis.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        async def execute(*a: Any, **k: Any) -> Any:
            nonlocal executions
            executions += 1
            return await real_execute(*a, **k)

        pipe.execute = execute
        return pipe

    async def direct_command(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"command outside the pipeline: {args[:1]}")

    monkeypatch.setattr(store.redis, "pipeline", counting_pipeline)
    monkeypatch.setattr(store.redis, "execute_command", direct_command)
    snap = await store.snapshot("ml/c")
    monkeypatch.undo()
    assert executions == 1

    assert set(snap.executors) == {"ml/mx"}
    assert [r.pod for r in snap.replicas["ml/mx"]] == ["p1"]
    assert snap.latency["ml/mx"]["p1"].ms == 3.0
    assert snap.inflight == {"ml/mx": 2}


async def test_missing_latency_is_absent_not_an_error(store: MetadataStore):
    await store.put_executor(_executor())
    snap = await store.snapshot("ml/nobody")
    assert snap.latency == {}
    assert await store.get_latencies("ml/mx", "p1", ["ml/nobody"]) == {}


async def test_expired_replica_heartbeat_is_ignored_and_pruned(store: MetadataStore):
    await store.put_replica(ReplicaRecord(executor="ml/mx", pod="old"), ttl=-1)
    await store.put_replica(ReplicaRecord(executor="ml/mx", pod="new"), ttl=30)
    await store.put_replica(ReplicaRecord(executor="ml/mx2", pod="other"), ttl=30)
    await store.put_client(ClientRecord(namespace="a", name="c", type="t"))
    await store.put_latencies("ml/mx", "new", {"a/c": LatencySample(ms=2, samples=1)}, ttl=30)
    # A sample its (dead) companion stopped refreshing long ago:
    old = LatencySample(ms=1, samples=1, expires_at=time.time() - 5)
    await store.redis.hset(store.latency_key("a/c"), "ml/mx|old", json.dumps(asdict(old)))
    assert [r.pod for r in await store.list_replicas("ml/mx")] == ["new"]
    assert await store.prune_expired() == 2
    assert await store.redis.hlen(store.replicas_key) == 2
    assert list(await store.redis.hkeys(store.latency_key("a/c"))) == ["ml/mx|new"]


async def test_one_executors_replicas_do_not_include_a_prefix_sibling(store: MetadataStore):
    await store.put_replica(ReplicaRecord(executor="ml/a", pod="p"), ttl=30)
    await store.put_replica(ReplicaRecord(executor="ml/ab", pod="p"), ttl=30)
    assert [r.executor for r in await store.list_replicas("ml/a")] == ["ml/a"]


async def test_removing_executor_drops_its_replicas_and_load(store: MetadataStore):
    await store.put_executor(_executor("a"))
    await store.put_executor(_executor("b"))
    await store.put_replica(ReplicaRecord(executor="ml/a", pod="p"), ttl=30)
    await store.put_replica(ReplicaRecord(executor="ml/b", pod="p"), ttl=30)
    await store.publish_inflight("sdk", {"ml/a": 1})
    await store.publish_inflight("other-sdk", {"ml/a": 2, "ml/b": 1})
    await store.remove_executor("ml/a")
    assert set((await store.snapshot()).executors) == {"ml/b"}
    assert [r.executor for r in await store.list_replicas()] == ["ml/b"]
    assert (await store.snapshot()).inflight == {"ml/b": 1}
    assert await store.executor_load("ml/a") == (0, 0.0)


async def test_record_round_trips_and_tolerates_unknown_fields(store: MetadataStore):
    rec = _executor()
    await store.put_executor(rec)
    # A newer writer added a field this version does not know: still readable.
    raw = await store.redis.hget(store.executors_key, rec.id)
    await store.redis.hset(store.executors_key, rec.id, raw[:-1] + ',"future":1}')
    got = (await store.snapshot()).executors.get(rec.id)
    assert got is not None and got.rest == rec.rest and got.updated_at <= time.time()


async def test_inflight_sums_unexpired_leases_of_every_instance(store: MetadataStore):
    await store.publish_inflight("sdk1", {"ml/a": 2, "ml/b": 1})
    await store.publish_inflight("sdk2", {"ml/a": 3})
    await store.publish_inflight("dead", {"ml/a": 7}, ttl=-1)  # its owner stopped refreshing
    assert (await store.snapshot()).inflight == {"ml/a": 5, "ml/b": 1}
    assert (await store.snapshot(exclude_instance="sdk2")).inflight == {"ml/a": 2, "ml/b": 1}
    assert (await store.executor_load("ml/a"))[0] == 5
    assert (await store.executor_load("ml/a", at=time.time() + 60))[0] == 0  # all expired
    await store.publish_inflight("sdk1", {"ml/a": 0, "ml/b": 1})  # zero deletes the lease
    assert (await store.snapshot()).inflight == {"ml/a": 3, "ml/b": 1}


async def test_prune_drops_expired_leases(store: MetadataStore):
    await store.publish_inflight("live", {"ml/a": 1})
    await store.publish_inflight("dead", {"ml/a": 4, "ml/b": 1}, ttl=-1)
    assert (await store.snapshot()).inflight == {"ml/a": 1}
    assert await store.prune_expired() == 2
    assert list(await store.redis.hkeys(store.inflight_key)) == ["ml/a|live"]


async def test_leases_count_requests_in_flight_and_as_demand(store: MetadataStore):
    leases = InflightLeases(store)
    try:
        leases.start("ml/a", publish=False)
        assert leases.counts["ml/a"] == 1
        leases.start("ml/a", publish=False)
        assert leases.counts["ml/a"] == 2
        await leases.flush()
        assert (await store.executor_load("ml/a"))[0] == 2
        leases.finish("ml/a", publish=False)
        assert leases.counts["ml/a"] == 1
        leases.add("ml/a", -1, publish=False)
        assert "ml/a" not in leases.counts
        await leases.flush()
        assert await store.executor_load("ml/a") == (0, pytest.approx(2 / 10))
        assert await store.redis.hgetall(store.inflight_key) == {}
    finally:
        await leases.close()


GARBAGE = {
    "not json": "{oops",
    "not an object": "[1, 2]",
    "missing a required field": '{"namespace": "ml"}',
    "wrong type": json.dumps({"ms": "fast", "samples": 1, "executor": "x", "pod": "p",
                              "n": "many", "expires_at": "soon", "namespace": "ml",
                              "name": "x", "type": 3}),
    "bad utf-8": b"\xff\xfe{",
}


@pytest.mark.parametrize("what", sorted(GARBAGE))
async def test_malformed_values_are_skipped_and_logged_by_every_reader(
    store: MetadataStore, caplog: pytest.LogCaptureFixture, what: str
):
    bad = GARBAGE[what]
    good = _executor("good")
    await store.put_executor(good)
    await store.put_client(ClientRecord(namespace="a", name="c", type="t"))
    await store.put_replica(ReplicaRecord(executor="ml/good", pod="p", state="Available"), ttl=30)
    await store.put_latencies("ml/good", "p", {"a/c": LatencySample(ms=2, samples=1)}, ttl=30)
    await store.publish_inflight("sdk", {"ml/good": 2})
    await store.publish_inflight("sdk2", {"ml/good": 1})
    bucket = int(time.time() // 10)
    for key, field in [(store.executors_key, "ml/bad"), (store.clients_key, "a/bad"),
                       (store.replicas_key, "ml/good|bad"),
                       (store.latency_key("a/c"), "ml/good|bad"),
                       (store.inflight_key, "ml/good|bad"),
                       (store.demand_key(bucket), "ml/good")]:
        await store.redis.hset(key, field, bad)
    caplog.set_level(logging.DEBUG, logger="mulambda.store")

    snap = await store.snapshot("a/c")
    assert set(snap.executors) == {"ml/good"}
    assert [r.pod for r in snap.replicas["ml/good"]] == ["p"]
    assert set(snap.latency["ml/good"]) == {"p"}
    assert snap.inflight == {"ml/good": 3}
    assert set(await store.list_clients()) == {"a/c"}
    assert (await store.snapshot("a/bad")).client_record is None
    assert [r.pod for r in await store.list_replicas()] == ["p"]
    assert [r.pod for r in await store.list_replicas("ml/good")] == ["p"]
    assert await store.get_latencies("ml/good", "bad", ["a/c"]) == {}
    # The only demand counter is the garbage one.
    assert await store.executor_load("ml/good") == (3, 0.0)
    await store.prune_expired()  # leaves what it cannot read alone, does not raise
    assert await store.redis.hget(store.replicas_key, "ml/good|bad") is not None

    logged = [r.getMessage() for r in caplog.records]
    for key, field in [(store.executors_key, "ml/bad"), (store.clients_key, "a/bad"),
                       (store.replicas_key, "ml/good|bad"), (store.inflight_key, "ml/good|bad"),
                       (store.latency_key("a/c"), "ml/good|bad")]:
        assert any(f"key={key} field={field} " in m for m in logged), (key, field)
    text = "\n".join(logged)
    for fragment in ("oops", "fast", "many", "soon"):
        assert fragment not in text  # the content is never logged


async def test_store_password_comes_from_the_environment_not_the_url(monkeypatch):
    from mulambda.store.records import StoreUnavailable

    from support.procs import RedisServer

    server = RedisServer(password="s3cr3t-pw")
    server.start()
    try:
        monkeypatch.delenv("MULAMBDA_REDIS_PASSWORD", raising=False)
        anonymous = MetadataStore.from_url(server.url)
        try:
            with pytest.raises(StoreUnavailable) as err:
                await anonymous.ping()
            assert "s3cr3t-pw" not in str(err.value)
        finally:
            await anonymous.close()
        monkeypatch.setenv("MULAMBDA_REDIS_PASSWORD", "s3cr3t-pw")
        authed = MetadataStore.from_url(server.url)  # the URL has no credentials
        try:
            assert await authed.ping()
        finally:
            await authed.close()
    finally:
        server.stop()


async def test_snapshot_carries_the_registered_client_in_the_same_round_trip(
    store: MetadataStore,
):
    await store.put_client(ClientRecord(namespace="apps", name="shop", type="vision",
                                        latency_weight=2.0))
    snap = await store.snapshot("apps/shop")
    assert snap.client_record is not None and snap.client_record.latency_weight == 2.0
    assert (await store.snapshot("apps/unknown")).client_record is None
    assert (await store.snapshot()).client_record is None
