"""The incremental snapshot reader against a real redis-server: what it returns equals a
whole read after every kind of write, and what it reads follows what changed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from mulambda.store.metadata import MetadataStore
from mulambda.store.mirror import HashMirror, changes_key
from mulambda.store.reader import SnapshotReader
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    Snapshot,
)

CLIENT = "apps/c"
ME = "sdk-me"


def executor(i: int, accuracy: float = 0.8) -> ExecutorRecord:
    return ExecutorRecord(namespace="ml", name=f"e{i}", model="m", version=1, type="t",
                          input="i", output="o", accuracy=accuracy, rest=f"http://e{i}",
                          grpc=f"e{i}:8500", state="Ready")


def stats(n: int) -> ServiceStats:
    return ServiceStats(w=float(n), k=float(n), t=10.0 * n, kk=float(n), kt=10.0 * n, count=n)


def comparable(snap: Snapshot) -> dict[str, Any]:
    """A snapshot without its read time, replica lists in pod order."""
    return {
        "executors": snap.executors,
        "replicas": {e: sorted(rs, key=lambda r: r.pod) for e, rs in snap.replicas.items()},
        "latency": snap.latency, "inflight": snap.inflight,
        "inflight_requests": snap.inflight_requests, "service": snap.service,
        "client": snap.client_record,
    }


async def fill(store: MetadataStore, n: int = 6) -> None:
    for i in range(n):
        await store.put_executor(executor(i))
        await store.put_replica(ReplicaRecord(executor=f"ml/e{i}", pod="p0",
                                              state="Available"), ttl=600)
        await store.put_latencies(f"ml/e{i}", "p0", {CLIENT: LatencySample(ms=1.0 + i, samples=3)},
                                  ttl=600)
    await store.put_client(ClientRecord(namespace="apps", name="c", type="t"))
    await store.publish_inflight("other", {f"ml/e{i}": i % 3 for i in range(n)})


Write = Callable[[MetadataStore], Awaitable[Any]]

# (what, the write, whole-hash reads it costs after the first snapshot's)
WRITES: list[tuple[str, Write, int]] = [
    ("nothing", lambda s: asyncio.sleep(0), 0),
    ("a new executor", lambda s: s.put_executor(executor(9)), 0),
    ("an executor changed", lambda s: s.put_executor(executor(1, accuracy=0.99)), 0),
    ("an executor removed", lambda s: s.remove_executor("ml/e2"), 0),
    ("a heartbeat", lambda s: s.put_replica(
        ReplicaRecord(executor="ml/e3", pod="p1", state="Loading"), ttl=600), 0),
    ("a replica gone", lambda s: s.remove_replica("ml/e0", "p0"), 0),
    ("a latency sample", lambda s: s.put_latencies(
        "ml/e4", "p0", {CLIENT: LatencySample(ms=0.5, samples=3)}, ttl=600), 0),
    ("service times of another router", lambda s: s.publish_inflight(
        "other", {"ml/e1": 2}, service={"ml/e1": stats(5)}), 0),
    ("service times of this reader (left out)", lambda s: s.publish_inflight(
        ME, {"ml/e1": 1}, service={"ml/e1": stats(7)}), 0),
    ("another router's requests done", lambda s: s.publish_inflight(
        "other", {"ml/e1": 0, "ml/e2": 0}), 0),
    ("another router's timed requests", lambda s: s.publish_inflight(
        "timed", {"ml/e3": 2}, requests={"ml/e3": [["p0", time.time() + 5, time.time() + 6]]}),
     0),
    ("the client re-registered", lambda s: s.put_client(
        ClientRecord(namespace="apps", name="c", type="t", latency_weight=0.9)), 0),
    # Its samples and their change stream are deleted: the stream's end is a reload.
    ("the client removed", lambda s: s.remove_client(CLIENT), 1),
]


@pytest.mark.parametrize(("what", "write", "reloads"), WRITES, ids=[w[0] for w in WRITES])
async def test_after_each_kind_of_write_the_reader_equals_a_whole_read(
    store: MetadataStore, what: str, write: Write, reloads: int,
):
    await fill(store)
    reader = SnapshotReader(store, CLIENT, exclude_instance=ME)
    first = await reader.snapshot()
    assert comparable(first) == comparable(await store.snapshot(CLIENT, exclude_instance=ME))
    await write(store)
    incremental = await reader.snapshot()
    assert comparable(incremental) == comparable(
        await store.snapshot(CLIENT, exclude_instance=ME)), what
    assert sum(m.reloads for m in reader.mirrors) == len(reader.mirrors) + reloads


async def test_an_expired_heartbeat_leaves_without_any_write(store: MetadataStore):
    await fill(store, 2)
    await store.put_replica(ReplicaRecord(executor="ml/e0", pod="short", state="Available"),
                            ttl=0.3)
    reader = SnapshotReader(store)
    assert {r.pod for r in (await reader.snapshot()).replicas["ml/e0"]} == {"p0", "short"}
    await asyncio.sleep(0.4)
    assert {r.pod for r in (await reader.snapshot()).replicas["ml/e0"]} == {"p0"}


async def commands(r: aioredis.Redis) -> dict[str, int]:
    stats_ = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats_.items()}


async def test_a_refresh_reads_what_changed_not_the_fleet(store: MetadataStore):
    await fill(store, 300)
    reader = SnapshotReader(store, CLIENT)
    await reader.snapshot()
    before = await commands(store.redis)
    unchanged = await reader.snapshot()
    quiet = await commands(store.redis)
    spent = {k: quiet.get(k, 0) - before.get(k, 0) for k in quiet}
    # Nothing changed: one small read per mirrored hash (executors, replicas, service,
    # in-flight, the client's samples), the client's record, and the same dicts as before.
    assert spent.get("xrange", 0) == 5
    assert spent.get("hget", 0) == 1
    assert spent.get("hgetall", 0) == spent.get("hmget", 0) == 0
    assert (await reader.snapshot()).executors is unchanged.executors

    for i in (5, 6, 7):
        await store.put_replica(ReplicaRecord(executor=f"ml/e{i}", pod="p9",
                                              state="Available"), ttl=600)
    before = await commands(store.redis)
    changed = await reader.snapshot()
    after = await commands(store.redis)
    assert after["hmget"] - before.get("hmget", 0) == 1  # the three fields, in one read
    assert after.get("hgetall", 0) == before.get("hgetall", 0)
    assert {r.pod for r in changed.replicas["ml/e6"]} == {"p0", "p9"}
    assert changed.executors is unchanged.executors  # untouched families are not rebuilt


async def test_a_trimmed_or_lost_change_stream_means_one_whole_read(store: MetadataStore):
    await fill(store, 3)
    mirror_reader = SnapshotReader(store)
    await mirror_reader.snapshot()
    replicas = mirror_reader.mirrors[1]
    replicas.max_changes = 5
    for i in range(8):  # more changes than the reader takes one by one
        await store.put_replica(ReplicaRecord(executor="ml/e0", pod=f"x{i}",
                                              state="Available"), ttl=600)
    snap = await mirror_reader.snapshot()
    assert replicas.reloads == 2
    assert len(snap.replicas["ml/e0"]) == 9

    await store.redis.delete(changes_key(store.replicas_key))  # a store that lost it
    await store.redis.hdel(store.replicas_key, "ml/e0|x0")
    snap = await mirror_reader.snapshot()
    assert replicas.reloads == 3
    assert "x0" not in {r.pod for r in snap.replicas["ml/e0"]}


async def test_a_store_restart_without_data_empties_the_reader(store: MetadataStore):
    await fill(store, 3)
    reader = SnapshotReader(store, CLIENT)
    assert len((await reader.snapshot()).executors) == 3
    await store.redis.flushall()
    snap = await reader.snapshot()
    assert (snap.executors, snap.replicas, snap.latency, snap.client_record) == ({}, {}, {},
                                                                                  None)


async def test_a_write_that_notes_no_change_is_seen_by_the_periodic_whole_read(
    store: MetadataStore,
):
    """An older writer (during an upgrade) writes without a change entry."""
    await fill(store, 2)
    reader = SnapshotReader(store, full_every=0.3)
    await reader.snapshot()
    await store.redis.hdel(store.executors_key, "ml/e1")
    assert "ml/e1" in (await reader.snapshot()).executors  # not noted: not seen yet
    await asyncio.sleep(0.35)
    assert "ml/e1" not in (await reader.snapshot()).executors


async def test_bad_change_entries_and_values_are_skipped_not_fatal(store: MetadataStore):
    await fill(store, 2)
    reader = SnapshotReader(store)
    await reader.snapshot()
    await store.redis.xadd(changes_key(store.executors_key), {"f": "not json"})
    await store.redis.xadd(changes_key(store.executors_key), {"x": "[]"})
    await store.redis.hset(store.executors_key, "ml/bad", "{not json")
    await store.redis.xadd(changes_key(store.executors_key), {"f": '["ml/bad", 7]'})
    snap = await reader.snapshot()
    assert set(snap.executors) == {"ml/e0", "ml/e1"}


async def test_mirror_alone_on_a_hash_nobody_notes(store: MetadataStore):
    """With no stream at all, a mirror reads the hash whole once, then polls cheaply."""
    await store.redis.hset("plain", mapping={"a": "1", "b": "2"})
    mirror = HashMirror("plain", lambda name, raw: int(raw))
    for _ in range(3):
        async with store.redis.pipeline(transaction=False) as pipe:
            mirror.queue_first(pipe, 0.0)
            replies = await pipe.execute()
        mirror.take_first(replies, 0.0)
        assert not mirror.pending_second()
    assert (mirror.records, mirror.reloads) == ({"a": 1, "b": 2}, 1)
