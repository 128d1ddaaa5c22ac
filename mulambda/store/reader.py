"""Snapshots for a long-lived reader (an SDK instance, the selector): each refresh reads
only what changed since the previous one (:mod:`mulambda.store.mirror`).

The executor records, heartbeats, in-flight leases, measured service times
and (for a client) its latency samples are mirrored; the client's record is
read with them (one HGET). So a refresh when nothing changed is one round
trip of small replies, and otherwise reads the changed fields and
recomputes the executors they belong to. :class:`InflightMirror` is the
in-flight part alone, for routers that read it fresh for every decision.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .decoder import lease_parts
from .metadata import MetadataStore
from .mirror import FULL_RELOAD_SECONDS, GroupView, HashMirror
from .records import (
    ClientRecord,
    ExecutorRecord,
    InflightLease,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    Snapshot,
    TimedRequest,
    _now,
    _split_field,
)

Timed = list[TimedRequest]


def _whole(name: str) -> tuple[str, str]:
    return name, ""


def _only(members: Mapping[str, Any], _now: float) -> tuple[Any, float]:
    return members.get(""), math.inf


def _live_replicas(members: Mapping[str, ReplicaRecord], now: float) -> tuple[Any, float]:
    live = [r for r in members.values() if r.expires_at >= now]
    return (live or None), min((r.expires_at for r in live), default=math.inf)


def _summed_stats(members: Mapping[str, ServiceStats], now: float) -> tuple[Any, float]:
    total: ServiceStats | None = None
    for stats in members.values():
        if stats.expires_at >= now:
            total = stats if total is None else total + stats
    return total, _next_expiry(members, now)


def _live_samples(members: Mapping[str, LatencySample], now: float) -> tuple[Any, float]:
    live = {pod: s for pod, s in members.items() if s.expires_at >= now}
    return (live or None), _next_expiry(members, now)


def _untimed(members: Mapping[str, InflightLease], now: float) -> tuple[Any, float]:
    n = sum(lease_parts(lease)[0] for lease in members.values() if lease.expires_at >= now)
    return (n or None), _next_expiry(members, now)


def _timed(members: Mapping[str, InflightLease], now: float) -> tuple[Any, float]:
    known: Timed = []
    for lease in members.values():
        if lease.expires_at >= now:
            known.extend(lease_parts(lease)[1])
    return (known or None), _next_expiry(members, now)


def _next_expiry(members: Mapping[str, Any], now: float) -> float:
    return min((r.expires_at for r in members.values() if r.expires_at >= now),
               default=math.inf)


Part = tuple[HashMirror, list[GroupView]]


class Mirrors:
    """Mirrors refreshed together: one pipelined round trip for all (plus whatever the
    caller queues), a second only for those whose hash changed."""

    def __init__(self, store: MetadataStore, parts: list[Part]) -> None:
        self.store = store
        self.parts = parts

    def decoding(self, cls: Any, key: str, exclude_instance: str | None = None,
                 per_instance: bool = False) -> Callable[[str, str], Any]:
        """A mirror's decoder: ``key``'s values as ``cls`` (logged and skipped when bad);
        for ``EXEC|INSTANCE`` fields, ``exclude_instance``'s are left out."""
        decoder = self.store.decoder

        def decode(name: str, raw: str) -> Any:
            if per_instance:
                _, sep, instance = name.rpartition("|")
                if not sep:
                    decoder.malformed(key, name, "field is not EXEC|INSTANCE")
                    return None
                if instance == exclude_instance:
                    return None
            return decoder.decode(cls, key, name, raw)

        return decode

    async def refresh(self, extra: Callable[[Any], int] | None = None) -> tuple[
        list[list[dict[str, Any]]], list[Any]
    ]:
        """Every part's views as of now, and the replies of what ``extra(pipe)`` queued
        in the first round trip (it returns how many commands)."""
        store = self.store
        now = _now()
        async with store.redis.pipeline(transaction=False) as pipe:
            for mirror, _ in self.parts:
                mirror.queue_first(pipe, now)
            n_extra = extra(pipe) if extra is not None else 0
            replies = await store._run(pipe.execute())
        changes: list[dict[str, Any] | None] = []
        at = 0
        for mirror, _ in self.parts:
            n = mirror.replies_first()
            changes.append(mirror.take_first(replies[at:at + n], now))
            at += n
        extra_replies = list(replies[at:at + n_extra])
        second = [i for i, (mirror, _) in enumerate(self.parts) if mirror.pending_second()]
        if second:
            async with store.redis.pipeline(transaction=False) as pipe:
                asked = [i for i in second if self.parts[i][0].queue_second(pipe)]
                more = await store._run(pipe.execute()) if asked else []
            at = 0
            for i in asked:
                mirror = self.parts[i][0]
                n = mirror.replies_first()  # a reload reads 2 replies, a field read 1
                got, before = mirror.take_second(more[at:at + n], now), changes[i]
                changes[i] = None if got is None or before is None else {**before, **got}
                at += n
        out = []
        for (mirror, views), changed in zip(self.parts, changes, strict=True):
            for view in views:
                if changed is None or changed:
                    view.update(changed, mirror.records)
            out.append([view.current(now) for view in views])
        return out, extra_replies


def _inflight_part(mirrors: Mirrors, exclude_instance: str | None,
                   full_every: float) -> Part:
    key = mirrors.store.inflight_key
    return (HashMirror(key, mirrors.decoding(InflightLease, key, exclude_instance, True),
                       full_every=full_every),
            [GroupView(_split_field, _untimed), GroupView(_split_field, _timed)])


def _service_part(mirrors: Mirrors, exclude_instance: str | None, full_every: float) -> Part:
    key = mirrors.store.service_key
    return (HashMirror(key, mirrors.decoding(ServiceStats, key, exclude_instance, True),
                       full_every=full_every),
            [GroupView(_split_field, _summed_stats)])


class Load(NamedTuple):
    """Everybody else's requests in flight, as :meth:`MetadataStore.inflight_load`, and
    (when asked for) their measured service times, as a snapshot's ``service``."""

    counts: dict[str, int]
    timed: dict[str, Timed]
    service: dict[str, ServiceStats] | None = None


class InflightMirror:
    """Everybody else's requests in flight (as :meth:`MetadataStore.inflight_load`),
    reading only the leases that changed since the last call; with ``service``, their
    measured service times too, in the same round trips (one more XRANGE per read, and
    an HMGET of the changed fields when some changed)."""

    def __init__(self, store: MetadataStore, exclude_instance: str | None = None, *,
                 full_every: float = FULL_RELOAD_SECONDS, service: bool = False) -> None:
        self._mirrors = Mirrors(store, [])
        self._mirrors.parts.append(_inflight_part(self._mirrors, exclude_instance,
                                                  full_every))
        if service:
            self._mirrors.parts.append(_service_part(self._mirrors, exclude_instance,
                                                     full_every))

    async def load(self) -> Load:
        [[counts, timed], *rest], _ = await self._mirrors.refresh()
        return Load(counts, timed, rest[0][0] if rest else None)


class SnapshotReader:
    """:meth:`MetadataStore.snapshot` for one reader, incrementally (module docstring).

    ``exclude_instance`` leaves that instance's leases and service statistics
    out, as :meth:`MetadataStore.snapshot` does.
    """

    def __init__(self, store: MetadataStore, client: str | None = None,
                 exclude_instance: str | None = None, *,
                 full_every: float = FULL_RELOAD_SECONDS) -> None:
        self.store = store
        self.client = client
        m = self._mirrors = Mirrors(store, [])

        def part(key: str, cls: Any, group: Callable[[str], tuple[str, str]],
                 reduce: Any, per_instance: bool = False) -> Part:
            decode = m.decoding(cls, key, exclude_instance, per_instance)
            return HashMirror(key, decode, full_every=full_every), [GroupView(group, reduce)]

        m.parts += [
            part(store.executors_key, ExecutorRecord, _whole, _only),
            part(store.replicas_key, ReplicaRecord, _split_field, _live_replicas),
            _service_part(m, exclude_instance, full_every),
            _inflight_part(m, exclude_instance, full_every),
        ]
        if client is not None:
            m.parts.append(part(store.latency_key(client), LatencySample, _split_field,
                                _live_samples))

    @property
    def mirrors(self) -> list[HashMirror]:
        return [mirror for mirror, _ in self._mirrors.parts]

    async def snapshot(self) -> Snapshot:
        """Executors, live replicas, load, measured service times and (for the client)
        latencies and its registered record, as of now."""
        store, client = self.store, self.client

        def record(pipe: Any) -> int:
            if client is None:
                return 0
            pipe.hget(store.clients_key, client)
            return 1

        views, replies = await self._mirrors.refresh(record)
        [executors], [replicas], [service], [inflight, timed], *rest = views
        latency = rest[0][0] if rest else {}
        client_record = None
        if client is not None and replies[0] is not None:
            client_record = store.decoder.decode(ClientRecord, store.clients_key, client,
                                                 replies[0])
        return Snapshot(executors, replicas, latency, inflight, _now(), client_record,
                        service=service, inflight_requests=timed)


class SharedSnapshot:
    """The store-wide part of a snapshot (executors, replicas, load, service times), one
    for every client of a process (the selector, the operator), refreshed
    single-flight: callers that find it older than they accept wait for one
    refresh, never start their own."""

    def __init__(self, store: MetadataStore, ttl: float, exclude_instance: str | None = None,
                 on_refresh: Callable[[Snapshot], None] | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.exclude_instance = exclude_instance
        self.on_refresh = on_refresh
        # Each refresh reads what changed since the last (store/reader.py).
        self.reader = SnapshotReader(store, None, exclude_instance=exclude_instance)
        self.refreshes = 0  # store reads started
        self._snap: Snapshot | None = None
        self._at = -math.inf
        self._pending: asyncio.Future[Snapshot] | None = None

    async def get(self, max_age: float | None = None) -> Snapshot:
        """A snapshot taken less than ``max_age`` (default ``ttl``) seconds ago."""
        age = self.ttl if max_age is None else max_age
        if self._snap is not None and time.monotonic() - self._at < age:
            return self._snap
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._refresh())
            self._pending.add_done_callback(retrieve)
        # shield: one waiter's cancellation must not cancel the read the others wait for.
        return await asyncio.shield(self._pending)

    async def _refresh(self) -> Snapshot:
        started = time.monotonic()
        self.refreshes += 1
        try:
            snap = await self.reader.snapshot()
        finally:
            self._pending = None
        self._snap, self._at = snap, started
        if self.on_refresh is not None:
            self.on_refresh(snap)
        return snap

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()


def retrieve(future: asyncio.Future[Any]) -> None:
    """Retrieve the failure of a shared read nobody waits for any more."""
    if not future.cancelled():
        future.exception()
