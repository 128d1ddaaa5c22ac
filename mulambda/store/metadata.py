"""The store's one owner of keys: :class:`MetadataStore` (the key schema is in the package
docstring, :mod:`mulambda.store`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .connection import DEFAULT_POOL_SIZE, DEFAULT_POOL_TIMEOUT_SECONDS, connect
from .decoder import Decoder
from .demand import DemandKeys
from .mirror import changes_key, queue_change
from .records import (
    INFLIGHT_LEASE_SECONDS,
    MAX_LEASE_SECONDS,
    SERVICE_TTL_SECONDS,
    ClientRecord,
    ExecutorRecord,
    InflightLease,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    Snapshot,
    StoreUnavailable,
    TimedRequest,
    _dump,
    _expires_at,
    _glob_escape,
    _now,
    too_far_ahead,
)

log = logging.getLogger("mulambda.store")

# A client's part of a snapshot: its latency samples (executor -> pod -> sample), its record.
ClientPart = tuple[dict[str, dict[str, LatencySample]], ClientRecord | None]


class MetadataStore(DemandKeys):
    """Async facade over the store; every key is built here and nowhere else.

    Demand buckets and the autoscaler's load reads are :class:`DemandKeys`'.
    In-flight counts are published through
    :class:`~mulambda.store.leases.InflightLeases`, one per SDK instance.
    """

    def __init__(self, redis: aioredis.Redis, prefix: str = "mulambda") -> None:
        self.redis = redis
        self.prefix = prefix
        self.decoder = Decoder(self)

    @classmethod
    def from_url(cls, url: str, prefix: str = "mulambda", timeout: float = 5.0,
                 password: str | None = None, *, pool_size: int = DEFAULT_POOL_SIZE,
                 pool_timeout: float = DEFAULT_POOL_TIMEOUT_SECONDS) -> MetadataStore:
        """Create a store; does not connect until the first command.

        At most ``pool_size`` connections; a command that finds them all busy
        waits up to ``pool_timeout`` seconds for one (then
        :class:`StoreUnavailable`), so a burst of requests queues instead of
        failing at once.

        The password comes from ``password`` or else the environment variable
        ``MULAMBDA_REDIS_PASSWORD`` (fed by the Secret ``MULAMBDA_REDIS_SECRET``
        names), so it never has to be part of a URL that is copied into
        ConfigMaps, pod specs or logs. The user is ``MULAMBDA_REDIS_USERNAME``,
        else the URL's (docs/security.md).
        """
        return cls(connect(url, timeout, password, pool_size, pool_timeout), prefix)

    async def close(self) -> None:
        """Disconnect."""
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

    @property
    def service_key(self) -> str:
        return f"{self.prefix}:service"

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
        """Publish ``record`` (stamped with the time of writing; ``record`` is not changed)."""
        stamped = replace(record, updated_at=_now())
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.executors_key, record.id, _dump(stamped))
            queue_change(pipe, self.executors_key, [record.id])
            await self._run(pipe.execute())

    async def remove_executor(self, executor: str) -> None:
        """Forget an executor and everything keyed by it (replicas, in-flight leases,
        measured service times)."""
        pattern = f"{_glob_escape(executor)}|*"
        mine = list(await self._scan_fields(self.replicas_key, pattern))
        leases = list(await self._scan_fields(self.inflight_key, pattern))
        measured = list(await self._scan_fields(self.service_key, pattern))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.executors_key, executor)
            queue_change(pipe, self.executors_key, [executor])
            if leases:
                pipe.hdel(self.inflight_key, *leases)
                queue_change(pipe, self.inflight_key, leases)
            if measured:
                pipe.hdel(self.service_key, *measured)
                queue_change(pipe, self.service_key, measured)
            if mine:
                pipe.hdel(self.replicas_key, *mine)
                queue_change(pipe, self.replicas_key, mine)
            await self._run(pipe.execute())

    # -- replicas (companion heartbeat) ----------------------------------------
    async def put_replica(self, record: ReplicaRecord, ttl: float) -> None:
        record.heartbeat_at = _now()
        record.expires_at = record.heartbeat_at + ttl
        name = f"{record.executor}|{record.pod}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.replicas_key, name, _dump(record))
            queue_change(pipe, self.replicas_key, [name])
            await self._run(pipe.execute())

    async def remove_replica(self, executor: str, pod: str) -> None:
        name = f"{executor}|{pod}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.replicas_key, name)
            queue_change(pipe, self.replicas_key, [name])
            await self._run(pipe.execute())

    async def list_replicas(self, executor: str | None = None) -> list[ReplicaRecord]:
        """Live (unexpired) replicas, optionally of one executor.

        For one executor the server filters the hash (HSCAN MATCH): it still
        walks every field, but only this executor's replicas are sent back and
        decoded, so the client's cost does not grow with other executors'.
        """
        if executor is None:
            raw = await self._run(self.redis.hgetall(self.replicas_key))
        else:
            raw = await self._scan_fields(self.replicas_key, f"{_glob_escape(executor)}|*")
        return self.decoder.live_replicas(raw, _now())

    async def _scan_fields(self, key: str, pattern: str) -> dict[str, str]:
        async def scan() -> dict[str, str]:
            return {k: v async for k, v in self.redis.hscan_iter(key, match=pattern, count=500)}

        return dict(await self._run(scan()))

    async def prune_expired(self) -> int:
        """Delete expired heartbeats, latency samples, in-flight leases and service times.

        Returns how many. Dead pods and dead SDK processes leave values behind
        (a killed process cannot delete its own); readers already ignore them,
        this keeps the hashes from growing. Values without a readable
        ``expires_at`` are left alone (logged): a newer version may have
        written them.
        """
        now = _now()
        removed = 0

        def expired(key: str, raw: Mapping[str, str], cls: type | None) -> list[str]:
            out = []
            for name, value in raw.items():
                at = _expires_at(value)
                if at is None:
                    self.decoder.malformed(key, name, "no expires_at")
                elif at < now or too_far_ahead(cls, at, now) is not None:
                    out.append(name)
            return out

        clients = await self._run(self.redis.hkeys(self.clients_key))
        ahead_of = {self.inflight_key: InflightLease, self.service_key: ServiceStats}
        for key in [self.replicas_key, self.inflight_key, self.service_key,
                    *map(self.latency_key, clients)]:
            dead = expired(key, await self._run(self.redis.hgetall(key)), ahead_of.get(key))
            if dead:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hdel(key, *dead)
                    queue_change(pipe, key, dead)
                    gone, *_ = await self._run(pipe.execute())
                removed += int(gone)
        return removed

    # -- clients (operator) ----------------------------------------------------
    async def put_client(self, record: ClientRecord) -> None:
        """Publish ``record`` (stamped with the time of writing; ``record`` is not changed)."""
        stamped = replace(record, updated_at=_now())
        await self._run(self.redis.hset(self.clients_key, record.id, _dump(stamped)))

    async def list_clients(self) -> dict[str, ClientRecord]:
        raw = await self._run(self.redis.hgetall(self.clients_key))
        return self.decoder.decode_all(ClientRecord, self.clients_key, raw)

    async def remove_client(self, client: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self.clients_key, client)
            pipe.delete(self.latency_key(client), changes_key(self.latency_key(client)))
            await self._run(pipe.execute())

    # -- latency (companion prober) -------------------------------------------
    async def get_latencies(self, executor: str, pod: str, clients: Iterable[str]) -> dict[
        str, LatencySample
    ]:
        """Current smoothed samples of one replica for the given clients (missing ones absent)."""
        names = list(clients)
        if not names:
            return {}
        name = f"{executor}|{pod}"
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in names:
                pipe.hget(self.latency_key(c), name)
            raws = await self._run(pipe.execute())
        out = {}
        for c, r in zip(names, raws, strict=True):
            sample = None if r is None else self.decoder.decode(LatencySample, self.latency_key(c),
                                                          name, r)
            if sample is not None:
                out[c] = sample
        return out

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
                queue_change(pipe, key, [f"{executor}|{pod}"])
                pipe.expire(key, max(1, int(ttl) + 1))
                pipe.expire(changes_key(key), max(1, int(ttl) + 1))
            await self._run(pipe.execute())

    # -- load (SDK / selector) -------------------------------------------------
    async def publish_inflight(
        self, instance: str, counts: Mapping[str, int], *,
        ttl: float = INFLIGHT_LEASE_SECONDS, demand: Mapping[tuple[int, str], int] | None = None,
        service: Mapping[str, ServiceStats] | None = None,
        requests: Mapping[str, list[list[Any]]] | None = None,
    ) -> None:
        """Set ``instance``'s in-flight leases, one pipeline.

        A positive count is written with ``expires_at = now + ttl``; zero
        deletes the lease. ``demand`` maps (bucket, executor) -> requests to
        add to that demand bucket. ``service`` maps executor -> this
        instance's measured service times (``P:service``, expiring after
        ``SERVICE_TTL_SECONDS``). ``requests`` maps executor -> the timing of
        each request in flight (:class:`InflightLease`).
        """
        if "|" in instance or not instance:
            raise ValueError("instance must be non-empty and contain no '|'")
        if ttl > MAX_LEASE_SECONDS:  # readers would refuse the lease (too_far_ahead)
            raise ValueError(f"ttl must be at most {MAX_LEASE_SECONDS:g} seconds")
        now = _now()
        expires_at = now + ttl
        timing = requests or {}
        live: dict[Any, Any] = {
            f"{e}|{instance}": _dump(InflightLease(int(n), expires_at, list(timing.get(e, ()))))
            for e, n in counts.items() if n > 0}
        gone = [f"{e}|{instance}" for e, n in counts.items() if n <= 0]
        measured: dict[Any, Any] = {
            f"{e}|{instance}": _dump(replace(st, expires_at=now + SERVICE_TTL_SECONDS))
            for e, st in (service or {}).items()
        }
        if not live and not gone and not demand and not measured:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            if live:
                pipe.hset(self.inflight_key, mapping=live)
            if gone:
                pipe.hdel(self.inflight_key, *gone)
            queue_change(pipe, self.inflight_key, [*live, *gone])
            if measured:
                pipe.hset(self.service_key, mapping=measured)
                queue_change(pipe, self.service_key, measured)
            self._queue_demand(pipe, demand or {})
            await self._run(pipe.execute())

    async def service_stats(self, exclude_instance: str | None = None) -> dict[
        str, ServiceStats
    ]:
        """Every executor's measured service times, all writers added up."""
        raw = await self._run(self.redis.hgetall(self.service_key))
        return self.decoder.service_totals(raw, _now(), exclude_instance)

    async def inflight_counts(self, exclude_instance: str | None = None) -> dict[str, int]:
        """Requests in flight per executor (unexpired leases), leaving out
        ``exclude_instance``'s."""
        raw = await self._run(self.redis.hgetall(self.inflight_key))
        return self.decoder.inflight_totals(raw, _now(), exclude_instance)

    async def inflight_load(self, exclude_instance: str | None = None) -> tuple[
        dict[str, int], dict[str, list[TimedRequest]]
    ]:
        """Everybody else's requests in flight: the cheap, fresh part of a snapshot.

        (counts of requests without timing, requests with timing) per executor,
        as :attr:`Snapshot.inflight` and :attr:`Snapshot.inflight_requests`.
        """
        raw = await self._run(self.redis.hgetall(self.inflight_key))
        return self.decoder.inflight_view(raw, _now(), exclude_instance)

    # -- selection snapshot -----------------------------------------------------
    async def client_view(self, client: str, max_samples: int | None = None) -> ClientPart:
        """The per-client part of a snapshot, one round trip: the client's latency
        samples (executor -> pod -> sample) and its registered record.

        With :meth:`snapshot` ``(None)`` it is what ``snapshot(client)`` reads, so
        a reader serving many clients can share one snapshot and keep only this
        part per client; ``max_samples`` bounds how many samples are kept.
        """
        return (await self.client_views([client], max_samples))[0]

    async def client_views(self, clients: list[str], max_samples: int | None = None
                           ) -> list[ClientPart]:
        """:meth:`client_view` of each of ``clients``, all in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for client in clients:
                pipe.hgetall(self.latency_key(client))
                pipe.hget(self.clients_key, client)
            replies = await self._run(pipe.execute())
        now = _now()
        return [self.decoder.client_part(c, replies[2 * i], replies[2 * i + 1], now, max_samples)
                for i, c in enumerate(clients)]

    async def snapshot(self, client: str | None = None,
                       exclude_instance: str | None = None) -> Snapshot:
        """Executors, live replicas, load, measured service times and (for
        ``client``) latencies and its registered record: one round trip.

        ``exclude_instance`` leaves that SDK instance's own leases and
        service-time statistics out (it adds its exact local ones itself).
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.executors_key)
            pipe.hgetall(self.replicas_key)
            pipe.hgetall(self.inflight_key)
            pipe.hgetall(self.service_key)
            if client is not None:
                pipe.hgetall(self.latency_key(client))
                pipe.hget(self.clients_key, client)
            results = await self._run(pipe.execute())
        now = _now()
        executors = self.decoder.decode_all(ExecutorRecord, self.executors_key, results[0])
        replicas: dict[str, list[ReplicaRecord]] = {}
        for r in self.decoder.live_replicas(results[1], now):
            replicas.setdefault(r.executor, []).append(r)
        inflight, timed = self.decoder.inflight_view(results[2], now, exclude_instance)
        service = self.decoder.service_totals(results[3], now, exclude_instance)
        latency: dict[str, dict[str, LatencySample]] = {}
        record: ClientRecord | None = None
        if client is not None:
            latency, record = self.decoder.client_part(client, results[4], results[5], now)
        return Snapshot(executors, replicas, latency, inflight, now, record, service=service,
                        inflight_requests=timed)

    async def executor_ids(self) -> set[str]:
        """The ids of every executor record (HKEYS): finds records a store restart lost."""
        return set(await self._run(self.redis.hkeys(self.executors_key)))

    async def put_executors(self, records: Iterable[ExecutorRecord]) -> None:
        """:meth:`put_executor` for many records: one HSET."""
        now = _now()
        mapping: dict[Any, Any] = {r.id: _dump(replace(r, updated_at=now)) for r in records}
        if mapping:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(self.executors_key, mapping=mapping)
                queue_change(pipe, self.executors_key, mapping)
                await self._run(pipe.execute())

