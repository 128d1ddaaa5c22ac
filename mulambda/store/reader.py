"""Snapshots for a long-lived reader (an SDK instance, the selector): each refresh reads
only what changed since the previous one (:mod:`mulambda.store.mirror`).

The executor records, heartbeats, measured service times and (for a client)
its latency samples are mirrored; requests in flight are read whole each
time (HGETALL of ``P:inflight``: its size follows the requests in flight,
not the fleet) with the client's record (HGET). So a refresh when nothing
changed is one round trip of small replies, and otherwise reads the changed
fields and recomputes the executors they belong to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .metadata import MetadataStore
from .mirror import FULL_RELOAD_SECONDS, GroupView, HashMirror
from .records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    Snapshot,
    _now,
    _split_field,
)


def _whole(name: str) -> tuple[str, str]:
    return name, ""


def _only(members: Mapping[str, Any], _now: float) -> tuple[Any, float]:
    return members.get(""), math.inf


def _live_replicas(members: Mapping[str, ReplicaRecord], now: float) -> tuple[Any, float]:
    live = [r for r in members.values() if r.expires_at >= now]
    return (live or None), min((r.expires_at for r in live), default=math.inf)


def _summed_stats(members: Mapping[str, ServiceStats], now: float) -> tuple[Any, float]:
    total: ServiceStats | None = None
    nxt = math.inf
    for stats in members.values():
        if stats.expires_at >= now:
            total = stats if total is None else total + stats
            nxt = min(nxt, stats.expires_at)
    return total, nxt


def _live_samples(members: Mapping[str, LatencySample], now: float) -> tuple[Any, float]:
    live = {pod: s for pod, s in members.items() if s.expires_at >= now}
    return (live or None), min((s.expires_at for s in live.values()), default=math.inf)


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
        self.exclude_instance = exclude_instance
        decoder = store.decoder

        def decoding(cls: Any, key: str, per_instance: bool = False) -> Any:
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

        self._parts: list[tuple[HashMirror, GroupView]] = [
            (HashMirror(store.executors_key, decoding(ExecutorRecord, store.executors_key),
                        full_every=full_every), GroupView(_whole, _only)),
            (HashMirror(store.replicas_key, decoding(ReplicaRecord, store.replicas_key),
                        full_every=full_every), GroupView(_split_field, _live_replicas)),
            (HashMirror(store.service_key, decoding(ServiceStats, store.service_key, True),
                        full_every=full_every), GroupView(_split_field, _summed_stats)),
        ]
        if client is not None:
            key = store.latency_key(client)
            self._parts.append((HashMirror(key, decoding(LatencySample, key),
                                           full_every=full_every),
                                GroupView(_split_field, _live_samples)))

    @property
    def mirrors(self) -> list[HashMirror]:
        return [mirror for mirror, _ in self._parts]

    async def snapshot(self) -> Snapshot:
        """Executors, live replicas, load, measured service times and (for the client)
        latencies and its registered record, as of now."""
        store = self.store
        now = _now()
        async with store.redis.pipeline(transaction=False) as pipe:
            for mirror, _ in self._parts:
                mirror.queue_first(pipe, now)
            pipe.hgetall(store.inflight_key)
            if self.client is not None:
                pipe.hget(store.clients_key, self.client)
            replies = await store._run(pipe.execute())
        changes: list[dict[str, Any] | None] = []
        at = 0
        for mirror, _ in self._parts:
            n = mirror.replies_first()
            changes.append(mirror.take_first(replies[at:at + n], now))
            at += n
        raw_inflight = replies[at]
        raw_record = replies[at + 1] if self.client is not None else None
        second = [i for i, (mirror, _) in enumerate(self._parts) if mirror.pending_second()]
        if second:
            async with store.redis.pipeline(transaction=False) as pipe:
                asked = [i for i in second if self._parts[i][0].queue_second(pipe)]
                more = await store._run(pipe.execute()) if asked else []
            at = 0
            for i in asked:
                mirror = self._parts[i][0]
                n = mirror.replies_first()  # a reload reads 2 replies, a field read 1
                got, before = mirror.take_second(more[at:at + n], now), changes[i]
                changes[i] = None if got is None or before is None else {**before, **got}
                at += n
        views = []
        for (mirror, view), changed in zip(self._parts, changes, strict=True):
            if changed is None or changed:
                view.update(changed, mirror.records)
            views.append(view.current(now))
        decoder = store.decoder
        inflight, timed = decoder.inflight_view(raw_inflight, now, self.exclude_instance)
        latency: dict[str, dict[str, LatencySample]] = {}
        record = None
        if self.client is not None:
            latency = views[3]
            if raw_record is not None:
                record = decoder.decode(ClientRecord, store.clients_key, self.client,
                                        raw_record)
        return Snapshot(views[0], views[1], latency, inflight, now, record, service=views[2],
                        inflight_requests=timed)
