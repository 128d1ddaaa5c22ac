"""Demand: requests counted per time bucket, and the load reads the autoscaler samples
(a part of :class:`~mulambda.store.metadata.MetadataStore`, which owns every key)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .records import _count, _glob_escape, _now

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .decoder import Decoder

# Demand is counted per time bucket so that "requests per second lately" is
# a few HGETALLs of small hashes, and old buckets vanish by themselves.
DEMAND_BUCKET_SECONDS = 10
DEMAND_TTL_SECONDS = 600


class DemandKeys:
    """The demand buckets (``P:demand:BUCKET``) and the load reads over them and the
    in-flight leases: what routers add and the autoscaler reads."""

    if TYPE_CHECKING:  # what MetadataStore provides
        redis: aioredis.Redis
        prefix: str
        decoder: Decoder

        @property
        def inflight_key(self) -> str: ...

        async def _run(self, coro: Any) -> Any: ...

    # -- demand (SDK / selector; read by the autoscaler) -------------------------
    def demand_key(self, bucket: int) -> str:
        return f"{self.prefix}:demand:{bucket}"

    async def note_demand(self, executors: Iterable[str], at: float | None = None) -> None:
        """Record demand for executors a client wants but does not call (cold ones to wake)."""
        names = list(executors)
        if not names:
            return
        key = self.demand_key(_bucket(at))
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hincrby(key, name, 1)
            pipe.expire(key, DEMAND_TTL_SECONDS)
            await self._run(pipe.execute())

    async def add_demand(self, demand: Mapping[tuple[int, str], int]) -> None:
        """Add many demand counts, (bucket, executor) -> requests, in one pipeline: a
        router's coalesced demand (:meth:`note_demand` is one signal)."""
        if not any(demand.values()):
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            self._queue_demand(pipe, demand)
            await self._run(pipe.execute())

    async def executor_load(
        self, executor: str, window_seconds: float = 10.0, at: float | None = None
    ) -> tuple[int, float]:
        """(in-flight requests, arrivals per second over the last ``window_seconds``)
        of one executor; the autoscaler's sample.

        One round trip unless the in-flight hash is large (HSCAN MATCH pages).
        In-flight counts only unexpired leases as of ``at`` (default now).
        """
        now = _now() if at is None else at
        last = int(now // DEMAND_BUCKET_SECONDS)
        n = _bucket_count(window_seconds)
        pattern = f"{_glob_escape(executor)}|*"
        keys = [self.demand_key(b) for b in range(last - n + 1, last + 1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hscan(self.inflight_key, 0, match=pattern, count=1000)
            for key in keys:
                pipe.hget(key, executor)
            results = await self._run(pipe.execute())
        cursor, leases = results[0]
        leases = dict(leases)
        while cursor:
            cursor, more = await self._run(
                self.redis.hscan(self.inflight_key, cursor, match=pattern, count=1000))
            leases.update(more)
        inflight = self.decoder.inflight_totals(leases, now).get(executor, 0)
        arrivals = 0
        for key, raw in zip(keys, results[1:], strict=True):
            count = None if raw is None else _count(raw)
            if count is not None:
                arrivals += count
            elif raw is not None:
                self.decoder.malformed(key, executor, "not an integer")
        return inflight, arrivals / (n * DEMAND_BUCKET_SECONDS)

    # -- fleet-wide reads and writes (the operator's ticks) ------------------------
    async def fleet_load(
        self, windows: Mapping[str, float], at: float | None = None
    ) -> dict[str, tuple[int, float]]:
        """:meth:`executor_load` for many executors in one pipelined round trip:
        executor id -> (in-flight requests, arrivals per second over its window).

        ``windows`` maps each executor to its window in seconds. Reads the
        whole ``P:inflight`` hash once (HGETALL) and every demand bucket that
        the longest window covers (one HGETALL each): the command count does
        not grow with the number of executors.
        """
        if not windows:
            return {}
        now = _now() if at is None else at
        last = int(now // DEMAND_BUCKET_SECONDS)
        counts = {e: _bucket_count(w) for e, w in windows.items()}
        buckets = list(range(last - max(counts.values()) + 1, last + 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.inflight_key)
            for bucket in buckets:
                pipe.hgetall(self.demand_key(bucket))
            results = await self._run(pipe.execute())
        inflight = self.decoder.inflight_totals(results[0], now)
        arrivals: dict[str, list[int]] = {}
        for bucket, raw in zip(buckets, results[1:], strict=True):
            for executor, value in raw.items():
                if executor not in counts:
                    continue
                count = _count(value)
                if count is None:
                    self.decoder.malformed(self.demand_key(bucket), executor, "not an integer")
                elif bucket > last - counts[executor]:
                    arrivals.setdefault(executor, []).append(count)
        return {e: (inflight.get(e, 0),
                    sum(arrivals.get(e, ())) / (n * DEMAND_BUCKET_SECONDS))
                for e, n in counts.items()}

    def _queue_demand(self, pipe: Any, demand: Mapping[tuple[int, str], int]) -> None:
        buckets: set[int] = set()
        for (bucket, executor), n in demand.items():
            if n:
                pipe.hincrby(self.demand_key(bucket), executor, n)
                buckets.add(bucket)
        for bucket in sorted(buckets):
            pipe.expire(self.demand_key(bucket), DEMAND_TTL_SECONDS)


def _bucket(at: float | None = None) -> int:
    return int((_now() if at is None else at) // DEMAND_BUCKET_SECONDS)


def _bucket_count(window_seconds: float) -> int:
    return max(1, min(int(window_seconds // DEMAND_BUCKET_SECONDS),
                      DEMAND_TTL_SECONDS // DEMAND_BUCKET_SECONDS))
