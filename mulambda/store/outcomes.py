"""Per-arm outcomes of rollouts and experiments: counted by routers, read by the operator.

Key ``P:outcomes:SUBJECT`` (HASH), ``SUBJECT`` = ``executor/NAMESPACE/NAME``
(a rollout), ``experiment/ID`` (a Client's A/B experiment) or
``served/MINUTE`` (every executor's requests in that minute, ``MINUTE`` =
epoch // 60; arm = executor id, run ``all``; kept 15 minutes). Fields
``RUN|ARM|NAME`` -> integer (HINCRBY): ``RUN`` is the rollout or experiment
id (a new run never counts an old run's outcomes), ``ARM`` the arm
(``stable``/``candidate`` or an executor id), ``NAME`` one of
``requests``, ``errors``, ``compared``, ``disagreed`` or ``bI`` (answered
requests in latency bucket ``I`` of :data:`mulambda.policy.rollout.BUCKETS`).
Written by the SDK and the gateway (:class:`OutcomeRecorder`: counted in
memory, one pipeline of HINCRBY per second); the key's EXPIRE
(:data:`OUTCOMES_TTL_SECONDS`) is refreshed at every write; the operator
reads it (:func:`read_outcomes`) and deletes it when a rollout ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoPermissionError

from mulambda.policy.rollout import ArmStats, bucket_of

from .records import StoreUnavailable

if TYPE_CHECKING:
    from .metadata import MetadataStore

log = logging.getLogger("mulambda.store")

OUTCOMES_TTL_SECONDS = 7 * 24 * 3600
# Every executor's served requests, per minute (``served/MINUTE`` subjects, run
# ``all``, arm = executor id): what ``mulambda top`` shows as requests/s and
# latency percentiles. Kept a quarter of an hour.
SERVED_RUN = "all"
SERVED_BUCKET_SECONDS = 60
SERVED_TTL_SECONDS = 900
# Counters kept while the store is down; beyond this many distinct ones new ones are dropped.
MAX_PENDING = 100_000


def outcomes_key(store: MetadataStore, subject: str) -> str:
    return f"{store.prefix}:outcomes:{subject}"


def served_subject(at: float) -> str:
    """The subject counting every executor's requests in the minute of ``at``."""
    return f"served/{int(at // SERVED_BUCKET_SECONDS)}"


def _ttl(subject: str) -> int:
    return SERVED_TTL_SECONDS if subject.startswith("served/") else OUTCOMES_TTL_SECONDS


class OutcomeRecorder:
    """One router's outcome counters, published in the background every ``interval`` s.

    :meth:`record` is synchronous and never waits for the store; a failed
    write keeps the counts for the next one (bounded by :data:`MAX_PENDING`).
    """

    def __init__(self, store: MetadataStore, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._pending: Counter[tuple[str, str]] = Counter()  # (subject, field) -> increment
        self._writer: asyncio.Task[None] | None = None
        self.dropped = 0
        # The store user may not write outcomes (a tenant's read-only one): stop counting.
        self.refused = False

    def record(self, subject: str, run: str, arm: str, *, ok: bool,
               ms: float | None = None, agreed: bool | None = None) -> None:
        """One request (or shadow copy) to ``arm``: answered (with its latency) or not;
        ``agreed``: a shadow answer compared with the stable one."""
        if self.refused:
            return
        base = f"{run}|{arm}|"
        names = ["requests"]
        if not ok:
            names.append("errors")
        elif ms is not None:
            names.append(f"b{bucket_of(ms)}")
        if agreed is not None:
            names.append("compared")
            if not agreed:
                names.append("disagreed")
        for name in names:
            key = (subject, base + name)
            if key not in self._pending and len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                continue
            self._pending[key] += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> None:
        """Write what was counted since the last write; raises StoreUnavailable (the
        counts are kept for the next try)."""
        pending, self._pending = self._pending, Counter()
        if not pending:
            return
        pipe = self.store.redis.pipeline(transaction=False)
        subjects = set()
        for (subject, name), n in pending.items():
            pipe.hincrby(outcomes_key(self.store, subject), name, n)
            subjects.add(subject)
        for subject in subjects:
            pipe.expire(outcomes_key(self.store, subject), _ttl(subject))
        try:
            await self.store._run(self._execute(pipe))
        except StoreUnavailable:
            pending.update(self._pending)  # counted meanwhile
            self._pending = pending
            raise

    async def _execute(self, pipe: Any) -> None:
        try:
            await pipe.execute()
        except NoPermissionError as exc:
            self.refused = True
            log.warning("outcomes not counted: the store user may not write them (the "
                        "tenants' read-only user?) error=%s", exc)

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except StoreUnavailable as exc:
                log.warning("outcomes not written, kept for the next try error=%s", exc)

    async def close(self) -> None:
        """Write what is left (best effort, bounded) and stop."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            async with asyncio.timeout(2.0):
                await self.flush()


async def read_outcomes(store: MetadataStore, subject: str, run: str) -> dict[str, ArmStats]:
    """Each arm's outcomes in run ``run`` of ``subject`` (arms without any are absent)."""
    raw = await store._run(store.redis.hgetall(outcomes_key(store, subject)))
    counts: dict[str, dict[str, int]] = {}
    _add_counts(counts, subject, run, raw)
    return {arm: _stats(c) for arm, c in counts.items()}


async def read_served(store: MetadataStore, at: float, minutes: int = 2) -> tuple[
    dict[str, ArmStats], float
]:
    """Every executor's served requests over the last ``minutes`` minutes up to ``at``
    (the current one included), all routers added: (executor -> stats, seconds covered)."""
    subjects = [served_subject(at - i * SERVED_BUCKET_SECONDS) for i in range(minutes)]
    async with store.redis.pipeline(transaction=False) as pipe:
        for subject in subjects:
            pipe.hgetall(outcomes_key(store, subject))
        raws = await store._run(pipe.execute())
    counts: dict[str, dict[str, int]] = {}
    for subject, raw in zip(subjects, raws, strict=True):
        _add_counts(counts, subject, SERVED_RUN, raw)
    covered = (minutes - 1) * SERVED_BUCKET_SECONDS + at % SERVED_BUCKET_SECONDS
    return {arm: _stats(c) for arm, c in counts.items()}, covered


def _add_counts(counts: dict[str, dict[str, int]], subject: str, run: str,
                raw: dict[Any, Any]) -> None:
    """Add the ``RUN|ARM|NAME`` counters of run ``run`` in ``raw`` to ``counts``."""
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        parts = key.split("|")
        if len(parts) < 3 or parts[0] != run:
            continue
        arm, name = "|".join(parts[1:-1]), parts[-1]
        try:
            named = counts.setdefault(arm, {})
            named[name] = named.get(name, 0) + int(value)
        except ValueError:
            log.warning("outcome counter is not an integer key=%s field=%s", subject, key)


def _stats(c: dict[str, int]) -> ArmStats:
    buckets = {int(name[1:]): n for name, n in c.items()
               if name.startswith("b") and name[1:].isdigit()}
    return ArmStats(c.get("requests", 0), c.get("errors", 0), buckets,
                    c.get("compared", 0), c.get("disagreed", 0))


async def drop_outcomes(store: MetadataStore, subject: str) -> None:
    """Forget a subject's outcomes (a rollout ended)."""
    await store._run(store.redis.delete(outcomes_key(store, subject)))
