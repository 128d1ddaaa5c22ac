"""Decoding what the store holds: every value a reader takes in goes through here, and a
value that does not decode is skipped and logged (key and field, never its content)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .records import (
    ClientRecord,
    InflightLease,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    TimedRequest,
    _load,
    _now,
    _split_field,
    too_far_ahead,
)

if TYPE_CHECKING:
    from .metadata import MetadataStore

log = logging.getLogger("mulambda.store")


class Decoder:
    """Turns raw hash values into records for one store's keys; warns once per bad value."""

    def __init__(self, keys: MetadataStore) -> None:
        self.keys = keys
        self._reported: set[tuple[str, str]] = set()

    def malformed(self, key: str, name: str, why: str) -> None:
        # Never the value: it may be anything, including a secret pasted by mistake.
        # Warn once per value (readers run every second); debug afterwards.
        seen = (key, name)
        level = logging.DEBUG if seen in self._reported else logging.WARNING
        if len(self._reported) >= 4096:
            self._reported.clear()
        self._reported.add(seen)
        log.log(level, "malformed value skipped key=%s field=%s error=%s", key, name, why)

    def decode(self, cls: Any, key: str, name: str, raw: str) -> Any:
        """``raw`` as a ``cls``, or None (logged) when it is not a valid one."""
        try:
            record = _load(cls, raw)
        except ValueError as exc:
            self.malformed(key, name, str(exc))
            return None
        why = too_far_ahead(cls, getattr(record, "expires_at", 0.0), _now())
        if why is not None:
            self.malformed(key, name, why)
            return None
        return record

    def decode_all(self, cls: Any, key: str, raw: Mapping[str, str]) -> dict[str, Any]:
        out = {}
        for name, value in raw.items():
            record = self.decode(cls, key, name, value)
            if record is not None:
                out[name] = record
        return out

    def live_replicas(self, raw: Mapping[str, str], now: float) -> list[ReplicaRecord]:
        return [r for r in self.decode_all(ReplicaRecord, self.keys.replicas_key, raw).values()
                if r.expires_at >= now]

    def per_instance(self, cls: Any, key: str, raw: Mapping[str, str], now: float,
                     exclude_instance: str | None = None) -> Iterator[tuple[str, Any]]:
        """(executor, record) of each unexpired ``EXEC|INSTANCE`` field of ``key`` that
        decodes as ``cls``, leaving out ``exclude_instance``'s."""
        for name, value in raw.items():
            executor, sep, instance = name.rpartition("|")
            if not sep:
                self.malformed(key, name, "field is not EXEC|INSTANCE")
                continue
            if instance == exclude_instance:
                continue
            record = self.decode(cls, key, name, value)
            if record is not None and record.expires_at >= now:
                yield executor, record

    def inflight_totals(self, raw: Mapping[str, str], now: float,
                        exclude_instance: str | None = None) -> dict[str, int]:
        totals: dict[str, int] = {}
        for executor, lease in self.per_instance(InflightLease, self.keys.inflight_key, raw,
                                                 now, exclude_instance):
            if lease.n > 0:
                totals[executor] = totals.get(executor, 0) + lease.n
        return totals

    def service_totals(self, raw: Mapping[str, str], now: float,
                       exclude_instance: str | None = None) -> dict[str, ServiceStats]:
        totals: dict[str, ServiceStats] = {}
        for executor, stats in self.per_instance(ServiceStats, self.keys.service_key, raw, now,
                                                 exclude_instance):
            seen = totals.get(executor)
            totals[executor] = stats if seen is None else seen + stats
        return totals

    def inflight_view(self, raw: Mapping[str, str], now: float,
                      exclude_instance: str | None = None) -> tuple[
        dict[str, int], dict[str, list[TimedRequest]]
    ]:
        counts: dict[str, int] = {}
        timed: dict[str, list[TimedRequest]] = {}
        for executor, lease in self.per_instance(InflightLease, self.keys.inflight_key, raw,
                                                 now, exclude_instance):
            untimed, known = lease_parts(lease)
            if known:
                timed.setdefault(executor, []).extend(known)
            if untimed:
                counts[executor] = counts.get(executor, 0) + untimed
        return counts, timed

    def client_part(self, client: str, raw: Mapping[str, str], raw_record: str | None,
                     now: float, max_samples: int | None = None) -> tuple[
        dict[str, dict[str, LatencySample]], ClientRecord | None
    ]:
        key = self.keys.latency_key(client)
        latency: dict[str, dict[str, LatencySample]] = {}
        kept = 0
        for f, sample in self.decode_all(LatencySample, key, raw).items():
            if sample.expires_at >= now:
                if max_samples is not None and kept >= max_samples:
                    self.malformed(key, "*", f"more than {max_samples} live samples; "
                                    "the rest are ignored")
                    break
                ex, pod = _split_field(f)
                latency.setdefault(ex, {})[pod] = sample
                kept += 1
        record = None
        if raw_record is not None:
            record = self.decode(ClientRecord, self.keys.clients_key, client, raw_record)
        return latency, record


def lease_parts(lease: InflightLease) -> tuple[int, list[TimedRequest]]:
    """(requests without timing, requests with timing) of one in-flight lease."""
    if lease.n <= 0:
        return 0, []
    known = [TimedRequest(str(r[0]), *(float(v) for v in r[1:]))
             for r in lease.requests[:lease.n]]
    return lease.n - len(known), known
