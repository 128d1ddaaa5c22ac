"""The metadata store: the one module that knows every key mulambda writes.

Works with any Redis-compatible server (Redis, Valkey, DragonflyDB): only
HASH commands (HSET, HGET, HGETALL, HKEYS, HDEL, HINCRBY, HSCAN), EXPIRE,
DEL and pipelines are used, no Lua, no modules, no key-space scans.

Key schema (``P`` is the configured prefix, default ``mulambda``; an
executor id is ``NAMESPACE/NAME``, a client id likewise; values are JSON):

``P:executors`` (HASH) executor id -> :class:`ExecutorRecord`.
    Written by the operator on create/update; deleted by the executor's
    finalizer (``mulambda.io/metadata``).
``P:replicas`` (HASH) ``EXEC|POD`` -> :class:`ReplicaRecord`.
    Companion heartbeats. Each value carries ``expires_at`` (its TTL):
    readers ignore expired values, the operator prunes them, and a companion
    deletes its own on SIGTERM.
``P:clients`` (HASH) client id -> :class:`ClientRecord`.
    Written by the operator; deleted by the Client's finalizer.
``P:latency:CLIENT`` (HASH) ``EXEC|POD`` -> :class:`LatencySample`.
    Smoothed round-trip time from one replica to the client, written by
    companions; per-value ``expires_at`` and a key EXPIRE refreshed on write.
``P:inflight`` (HASH) executor id -> in-flight requests (HINCRBY).
    Written by the SDK around each request (+1 before, -1 after).
``P:demand:BUCKET`` (HASH) executor id -> requests started in that
    10-second bucket (``BUCKET = epoch // 10``), plus demand signals for
    executors scaled to zero (SDK, selector, the operator's Client
    selection). EXPIRE 600 s, so old buckets vanish by themselves. The
    autoscaler reads the arrival rate from the last buckets.

Why hashes with an ``expires_at`` inside the value instead of one key per
replica with EXPIRE: selection must read everything it needs in one
pipelined round trip, and a hash can be read whole with one HGETALL while
per-key TTLs would need a SCAN. Field-level TTL (HEXPIRE) is not available
on all three servers. Missing data is normal and never raises: an executor
with no latency sample for a client simply has none in the snapshot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "ClientRecord",
    "ExecutorRecord",
    "LatencySample",
    "MetadataStore",
    "ReplicaRecord",
    "Snapshot",
    "StoreUnavailable",
]


# Demand is counted per time bucket so that "requests per second lately" is
# a few HGETALLs of small hashes, and old buckets vanish by themselves.
DEMAND_BUCKET_SECONDS = 10
DEMAND_TTL_SECONDS = 600


class StoreUnavailable(RuntimeError):
    """The store could not be reached; callers retry with back-off."""


def executor_id(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _now() -> float:
    return time.time()


@dataclass
class ExecutorRecord:
    """What the operator publishes about one ModelExecutor."""

    namespace: str
    name: str
    model: str
    version: int | None
    type: str
    input: str
    output: str
    accuracy: float | None
    rest: str
    grpc: str
    state: str = "Pending"  # Pending | Ready | ScaledToZero | Failed | Unavailable
    min_replicas: int = 1
    max_replicas: int = 1
    ready_replicas: int = 0
    service_time_ms: float | None = None
    generation: int = 0
    updated_at: float = field(default_factory=_now)

    @property
    def id(self) -> str:
        return executor_id(self.namespace, self.name)


@dataclass
class ReplicaRecord:
    """A companion's heartbeat for one pod of an executor."""

    executor: str
    pod: str
    ip: str = ""
    state: str = "Loading"  # Loading | Available | Failed
    version: int | None = None
    reason: str = ""
    message: str = ""
    heartbeat_at: float = field(default_factory=_now)
    expires_at: float = 0.0


@dataclass
class ClientRecord:
    """What the operator publishes about one Client."""

    namespace: str
    name: str
    type: str
    input: str | None = None
    output: str | None = None
    latency_weight: float = 1.0
    accuracy_weight: float = 1.0
    max_latency_ms: float | None = None
    min_accuracy: float | None = None
    probe_url: str | None = None
    cold_start: str = "UseWarm"  # Wait | UseWarm (when the best executor is at zero)
    generation: int = 0
    updated_at: float = field(default_factory=_now)

    @property
    def id(self) -> str:
        return executor_id(self.namespace, self.name)


@dataclass
class LatencySample:
    """Smoothed round-trip time from one replica to one client."""

    ms: float
    samples: int
    at: float = field(default_factory=_now)
    expires_at: float = 0.0


@dataclass
class Snapshot:
    """Everything selection needs, read in one round trip."""

    executors: dict[str, ExecutorRecord]
    replicas: dict[str, list[ReplicaRecord]]  # executor id -> live replicas
    latency: dict[str, dict[str, LatencySample]]  # executor id -> pod -> sample (one client)
    inflight: dict[str, int]
    taken_at: float


def _dump(obj: Any) -> str:
    return json.dumps(asdict(obj), separators=(",", ":"), sort_keys=True)


def _load(cls: Any, raw: str | bytes) -> Any:
    data = json.loads(raw)
    # Unknown fields (written by a newer version) are dropped, not fatal.
    known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
    return cls(**known)


def _split_field(raw: str) -> tuple[str, str]:
    executor, _, pod = raw.rpartition("|")
    return executor, pod


class MetadataStore:
    """Async facade over the store; every key is built here and nowhere else."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "mulambda") -> None:
        self.redis = redis
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = "mulambda", timeout: float = 5.0) -> MetadataStore:
        """Create a store; does not connect until the first command."""
        client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        return cls(client, prefix)

    async def close(self) -> None:
        await self.redis.aclose()

    # -- keys ---------------------------------------------------------------
    @property
    def executors_key(self) -> str:
        return f"{self.prefix}:executors"

    @property
    def replicas_key(self) -> str:
        return f"{self.prefix}:replicas"

    @property
    def clients_key(self) -> str:
        return f"{self.prefix}:clients"

    @property
    def inflight_key(self) -> str:
        return f"{self.prefix}:inflight"

    def latency_key(self, client: str) -> str:
        return f"{self.prefix}:latency:{client}"

    # -- plumbing -----------------------------------------------------------
    async def _run(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"metadata store unreachable: {exc}") from exc
        except RedisError as exc:
            raise StoreUnavailable(f"metadata store error: {exc}") from exc

    async def ping(self) -> bool:
        return bool(await self._run(self.redis.ping()))

    # -- executors (operator) ------------------------------------------------
    async def put_executor(self, record: ExecutorRecord) -> None:
        record.updated_at = _now()
        await self._run(self.redis.hset(self.executors_key, record.id, _dump(record)))

    async def get_executor(self, executor: str) -> ExecutorRecord | None:
        raw = await self._run(self.redis.hget(self.executors_key, executor))
        return None if raw is None else _load(ExecutorRecord, raw)

    async def list_executors(self) -> dict[str, ExecutorRecord]:
        raw = await self._run(self.redis.hgetall(self.executors_key))
        return {k: _load(ExecutorRecord, v) for k, v in raw.items()}

    async def remove_executor(self, executor: str) -> None:
        """Forget an executor and everything keyed by it (replicas, in-flight)."""
        mine = list(await self._scan_fields(self.replicas_key, f"{executor}|*"))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.executors_key, executor)
            pipe.hdel(self.inflight_key, executor)
            if mine:
                pipe.hdel(self.replicas_key, *mine)
            await self._run(pipe.execute())

    # -- replicas (companion heartbeat) ----------------------------------------
    async def put_replica(self, record: ReplicaRecord, ttl: float) -> None:
        record.heartbeat_at = _now()
        record.expires_at = record.heartbeat_at + ttl
        await self._run(
            self.redis.hset(self.replicas_key, f"{record.executor}|{record.pod}", _dump(record))
        )

    async def remove_replica(self, executor: str, pod: str) -> None:
        await self._run(self.redis.hdel(self.replicas_key, f"{executor}|{pod}"))

    async def list_replicas(self, executor: str | None = None) -> list[ReplicaRecord]:
        """Live (unexpired) replicas, optionally of one executor.

        For one executor the server filters the hash (HSCAN MATCH), so the
        cost does not grow with the number of other executors' replicas.
        """
        if executor is None:
            raw = await self._run(self.redis.hgetall(self.replicas_key))
        else:
            raw = await self._scan_fields(self.replicas_key, f"{executor}|*")
        return _live_replicas(raw, _now())

    async def _scan_fields(self, key: str, pattern: str) -> dict[str, str]:
        async def scan() -> dict[str, str]:
            return {k: v async for k, v in self.redis.hscan_iter(key, match=pattern, count=500)}

        return dict(await self._run(scan()))

    async def prune_expired(self) -> int:
        """Delete expired replica heartbeats and latency samples; returns how many.

        Dead pods leave records behind (a killed companion cannot delete its
        own); readers already ignore them, this keeps the hashes from growing.
        """
        now = _now()
        removed = 0
        raw = await self._run(self.redis.hgetall(self.replicas_key))
        dead = [k for k, v in raw.items() if _load(ReplicaRecord, v).expires_at < now]
        if dead:
            removed += int(await self._run(self.redis.hdel(self.replicas_key, *dead)))
        for client in await self._run(self.redis.hkeys(self.clients_key)):
            key = self.latency_key(client)
            samples = await self._run(self.redis.hgetall(key))
            stale = [k for k, v in samples.items() if _load(LatencySample, v).expires_at < now]
            if stale:
                removed += int(await self._run(self.redis.hdel(key, *stale)))
        return removed

    # -- clients (operator) ----------------------------------------------------
    async def put_client(self, record: ClientRecord) -> None:
        record.updated_at = _now()
        await self._run(self.redis.hset(self.clients_key, record.id, _dump(record)))

    async def get_client(self, client: str) -> ClientRecord | None:
        raw = await self._run(self.redis.hget(self.clients_key, client))
        return None if raw is None else _load(ClientRecord, raw)

    async def list_clients(self) -> dict[str, ClientRecord]:
        raw = await self._run(self.redis.hgetall(self.clients_key))
        return {k: _load(ClientRecord, v) for k, v in raw.items()}

    async def remove_client(self, client: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.clients_key, client)
            pipe.delete(self.latency_key(client))
            await self._run(pipe.execute())

    # -- latency (companion prober) -------------------------------------------
    async def get_latencies(self, executor: str, pod: str, clients: Iterable[str]) -> dict[
        str, LatencySample
    ]:
        """Current smoothed samples of one replica for the given clients (missing ones absent)."""
        names = list(clients)
        if not names:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in names:
                pipe.hget(self.latency_key(c), f"{executor}|{pod}")
            raws = await self._run(pipe.execute())
        return {c: _load(LatencySample, r) for c, r in zip(names, raws, strict=True) if r}

    async def put_latencies(
        self, executor: str, pod: str, samples: dict[str, LatencySample], ttl: float
    ) -> None:
        """Store smoothed samples of one replica (one pipeline for all clients)."""
        if not samples:
            return
        now = _now()
        async with self.redis.pipeline(transaction=False) as pipe:
            for client, sample in samples.items():
                sample.at = now
                sample.expires_at = now + ttl
                key = self.latency_key(client)
                pipe.hset(key, f"{executor}|{pod}", _dump(sample))
                pipe.expire(key, max(1, int(ttl) + 1))
            await self._run(pipe.execute())

    # -- load (SDK / selector) -------------------------------------------------
    async def add_inflight(self, executor: str, delta: int) -> int:
        return int(await self._run(self.redis.hincrby(self.inflight_key, executor, delta)))

    # -- selection snapshot -----------------------------------------------------
    async def snapshot(self, client: str | None = None) -> Snapshot:
        """Executors, live replicas, load and (for ``client``) latencies: one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.executors_key)
            pipe.hgetall(self.replicas_key)
            pipe.hgetall(self.inflight_key)
            if client is not None:
                pipe.hgetall(self.latency_key(client))
            results = await self._run(pipe.execute())
        now = _now()
        executors = {k: _load(ExecutorRecord, v) for k, v in results[0].items()}
        replicas: dict[str, list[ReplicaRecord]] = {}
        for r in _live_replicas(results[1], now):
            replicas.setdefault(r.executor, []).append(r)
        inflight = {k: max(0, int(v)) for k, v in results[2].items()}
        latency: dict[str, dict[str, LatencySample]] = {}
        if client is not None:
            for f, raw in results[3].items():
                sample = _load(LatencySample, raw)
                if sample.expires_at >= now:
                    ex, pod = _split_field(f)
                    latency.setdefault(ex, {})[pod] = sample
        return Snapshot(executors, replicas, latency, inflight, now)

    # -- demand (SDK / selector; read by the autoscaler) -------------------------
    def demand_key(self, bucket: int) -> str:
        return f"{self.prefix}:demand:{bucket}"

    async def start_request(self, executor: str, at: float | None = None) -> int:
        """Count a request as in flight and as demand, in one round trip; returns in-flight."""
        key = self.demand_key(int((_now() if at is None else at) // DEMAND_BUCKET_SECONDS))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.inflight_key, executor, 1)
            pipe.hincrby(key, executor, 1)
            pipe.expire(key, DEMAND_TTL_SECONDS)
            results = await self._run(pipe.execute())
        return int(results[0])

    async def finish_request(self, executor: str) -> int:
        """Undo :meth:`start_request`'s in-flight count (demand stays, it is history)."""
        return await self.add_inflight(executor, -1)

    async def note_demand(self, executors: Iterable[str], at: float | None = None) -> None:
        """Record demand for executors a client wants but does not call (cold ones to wake)."""
        names = list(executors)
        if not names:
            return
        key = self.demand_key(int((_now() if at is None else at) // DEMAND_BUCKET_SECONDS))
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hincrby(key, name, 1)
            pipe.expire(key, DEMAND_TTL_SECONDS)
            await self._run(pipe.execute())

    async def demand(self, window_seconds: float = 60.0, at: float | None = None) -> dict[
        str, float
    ]:
        """Requests per second per executor over the last ``window_seconds`` (whole buckets)."""
        now = _now() if at is None else at
        last = int(now // DEMAND_BUCKET_SECONDS)
        n = max(1, min(int(window_seconds // DEMAND_BUCKET_SECONDS),
                       DEMAND_TTL_SECONDS // DEMAND_BUCKET_SECONDS))
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in range(last - n + 1, last + 1):
                pipe.hgetall(self.demand_key(b))
            buckets = await self._run(pipe.execute())
        total: dict[str, int] = {}
        for bucket in buckets:
            for executor, count in bucket.items():
                total[executor] = total.get(executor, 0) + int(count)
        span = n * DEMAND_BUCKET_SECONDS
        return {k: v / span for k, v in total.items()}


    async def executor_load(
        self, executor: str, window_seconds: float = 10.0, at: float | None = None
    ) -> tuple[int, float]:
        """(in-flight requests, arrivals per second over the last ``window_seconds``)
        of one executor, in one round trip; the autoscaler's sample."""
        now = _now() if at is None else at
        last = int(now // DEMAND_BUCKET_SECONDS)
        n = max(1, min(int(window_seconds // DEMAND_BUCKET_SECONDS),
                       DEMAND_TTL_SECONDS // DEMAND_BUCKET_SECONDS))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.inflight_key, executor)
            for b in range(last - n + 1, last + 1):
                pipe.hget(self.demand_key(b), executor)
            results = await self._run(pipe.execute())
        inflight = max(0, int(results[0] or 0))
        arrivals = sum(int(r or 0) for r in results[1:])
        return inflight, arrivals / (n * DEMAND_BUCKET_SECONDS)


def _live_replicas(raw: dict[str, str], now: float) -> list[ReplicaRecord]:
    out = []
    for value in raw.values():
        record = _load(ReplicaRecord, value)
        if record.expires_at >= now:
            out.append(record)
    return out
