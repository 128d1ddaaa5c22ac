"""The metadata store against a real redis-server."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from mulambda.store import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    MetadataStore,
    ReplicaRecord,
)


def _executor(name: str = "mx", ns: str = "ml") -> ExecutorRecord:
    return ExecutorRecord(
        namespace=ns, name=name, model="m", version=1, type="t", input="i", output="o",
        accuracy=0.9, rest="http://x:8501", grpc="x:8500",
    )


async def test_snapshot_reads_executors_replicas_latency_in_one_pipeline(store: MetadataStore):
    await store.put_executor(_executor())
    await store.put_replica(ReplicaRecord(executor="ml/mx", pod="p1", state="Available"), ttl=30)
    await store.put_latencies("ml/mx", "p1", {"ml/c": LatencySample(ms=3.0, samples=2)}, ttl=30)
    await store.add_inflight("ml/mx", 2)

    snap = await store.snapshot("ml/c")

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
    await store.add_inflight("ml/a", 1)
    await store.remove_executor("ml/a")
    assert set(await store.list_executors()) == {"ml/b"}
    assert [r.executor for r in await store.list_replicas()] == ["ml/b"]
    assert "ml/a" not in (await store.snapshot()).inflight


async def test_record_round_trips_and_tolerates_unknown_fields(store: MetadataStore):
    rec = _executor()
    await store.put_executor(rec)
    # A newer writer added a field this version does not know: still readable.
    raw = await store.redis.hget(store.executors_key, rec.id)
    await store.redis.hset(store.executors_key, rec.id, raw[:-1] + ',"future":1}')
    got = await store.get_executor(rec.id)
    assert got is not None and got.rest == rec.rest and got.updated_at <= time.time()
