"""What the selector keeps between requests: one shared store snapshot refreshed
single-flight, a bounded LRU of per-client views, the part of the snapshot each
criteria can match, and demand signals queued and written in batches."""


from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import replace

from prometheus_client import (
    CollectorRegistry,
    Counter,
)

from mulambda.policy.selection import Criteria, prefilter
from mulambda.store.demand import DEMAND_BUCKET_SECONDS, DEMAND_TTL_SECONDS, _bucket
from mulambda.store.metadata import MetadataStore
from mulambda.store.reader import retrieve
from mulambda.store.records import ClientRecord, LatencySample, Snapshot, StoreUnavailable

from .decisions import hard_rejections

log = logging.getLogger("mulambda.selector")

ClientPart = tuple[dict[str, dict[str, LatencySample]], ClientRecord | None]

# The latency samples of a client without any: one object, so that every such client's
# view (and what mulambda.policy.ranker keeps for it) is the same.
NO_SAMPLES: dict[str, dict[str, LatencySample]] = {}
_UNKNOWN: ClientPart = (NO_SAMPLES, None)  # a client with neither samples nor a record


class ClientViews:
    """The per-client part of a snapshot (latency samples, registered record), in a
    bounded LRU, read single-flight per client.

    Bounded whatever the number of client names callers make up: at most
    ``max_clients`` clients and ``max_samples`` samples in all are kept, each
    client's read keeping at most ``max_client_samples``. A name with neither
    a record nor a sample (unknown) keeps only its name and when it was read,
    in an LRU of its own (``max_unknown`` names, about 100 bytes each), so
    that made-up names neither evict registered clients nor cost a store
    read on every request.

    The clients whose part is due in one turn of the event loop are read
    together, in one round trip per ``max_batch`` of them: with many client
    names a busy selector would otherwise spend a tenth of its CPU on a
    pipeline per client (bench/selector_load.py).
    """

    def __init__(self, store: MetadataStore, ttl: float, *, max_clients: int = 1024,
                 max_samples: int = 100_000, max_client_samples: int = 4096,
                 max_unknown: int = 8192, max_batch: int = 128) -> None:
        self.store = store
        self.ttl = ttl
        self.max_clients = max_clients
        self.max_samples = max_samples
        self.max_client_samples = max_client_samples
        self.max_unknown = max_unknown
        self.max_batch = max_batch
        self.samples = 0  # samples kept in all
        # client -> (monotonic time read, part, samples in it)
        self._lru: OrderedDict[str, tuple[float, ClientPart, int]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()  # client -> monotonic read
        self._pending: dict[str, asyncio.Future[ClientPart]] = {}  # queued or being read
        self._queued: list[str] = []  # to be read at the next turn of the event loop
        self._reads: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._lru)

    async def get(self, client: str, max_age: float | None = None) -> ClientPart:
        age = self.ttl if max_age is None else max_age
        hit = self._lru.get(client)
        if hit is not None and time.monotonic() - hit[0] < age:
            self._lru.move_to_end(client)
            return hit[1]
        unknown = self._unknown.get(client)
        if unknown is not None and time.monotonic() - unknown < age:
            return _UNKNOWN
        pending = self._pending.get(client)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.create_future()
            pending.add_done_callback(retrieve)
            self._pending[client] = pending
            self._queued.append(client)
            if len(self._queued) == 1:
                loop.call_soon(self._read_queued)
        # shield: a caller's cancellation must not cancel the read others wait for.
        return await asyncio.shield(pending)

    def _read_queued(self) -> None:
        clients, self._queued = self._queued, []
        if self._closed:
            return
        for at in range(0, len(clients), self.max_batch):
            read = asyncio.ensure_future(self._read(clients[at:at + self.max_batch]))
            self._reads.add(read)
            read.add_done_callback(self._reads.discard)

    async def _read(self, clients: list[str]) -> None:
        """Read ``clients``' parts; each one's waiters get its part, or the failure."""
        started = time.monotonic()
        try:
            parts = await self.store.client_views(clients, max_samples=self.max_client_samples)
        except BaseException as exc:  # incl. cancellation: no waiter may hang
            for client in clients:
                pending = self._pending.pop(client, None)
                if pending is not None and not pending.done():
                    if isinstance(exc, asyncio.CancelledError):
                        pending.cancel()
                    else:
                        pending.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for client, part in zip(clients, parts, strict=True):
            pending = self._pending.pop(client, None)
            kept = self._keep(client, part, started)
            if pending is not None and not pending.done():
                pending.set_result(kept)

    def _keep(self, client: str, part: ClientPart, started: float) -> ClientPart:
        self._forget(client)
        latency, record = part
        if record is None and not latency:
            self._unknown[client] = started
            self._unknown.move_to_end(client)
            while len(self._unknown) > self.max_unknown:
                self._unknown.popitem(last=False)
            return _UNKNOWN
        self._unknown.pop(client, None)
        size = sum(len(pods) for pods in latency.values())
        self._lru[client] = (started, part, size)
        self.samples += size
        while self._lru and (len(self._lru) > self.max_clients
                             or self.samples > self.max_samples):
            self._forget(next(iter(self._lru)))
        return part

    def _forget(self, client: str) -> None:
        gone = self._lru.pop(client, None)
        if gone is not None:
            self.samples -= gone[2]

    def close(self) -> None:
        self._closed = True
        for read in list(self._reads):
            read.cancel()
        for pending in list(self._pending.values()):
            pending.cancel()
        self._pending.clear()
        self._queued = []


class MatchingViews:
    """Per criteria, the part of the snapshot whose executors meet its hard criteria,
    and how many executors they left out, by why; in a bounded LRU.

    Ranking the part costs in proportion to the executors of the wanted type,
    not to all of them. The part is filtered again only when the snapshot's
    shared parts changed, and then only the parts that did (the shared reader
    hands out the same dict for a part that did not:
    :func:`~mulambda.policy.selection.prefilter`'s reuse). The client's own
    part (latency samples, record) is put in as it is: rank reads only the
    samples of the executors it ranks. Criteria come from request bodies, so
    the LRU is bounded whatever callers send.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        # criteria -> (shared snapshot filtered, view of it, executors left out by why)
        self._lru: OrderedDict[Criteria, tuple[Snapshot, Snapshot, Tally[str]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, criteria: Criteria, snap: Snapshot) -> tuple[Snapshot, Tally[str]]:
        """The part of ``snap`` that can match ``criteria``, with ``snap``'s client part,
        and the hard criteria's rejections by
        :func:`~mulambda.selector.decisions.rejection_kind`."""
        hit = self._lru.get(criteria)
        if hit is not None and _same_shared(hit[0], snap):
            self._lru.move_to_end(criteria)
            view, left_out = hit[1], hit[2]
        else:
            shared = replace(snap, latency=NO_SAMPLES, client_record=None)
            view = prefilter(criteria, shared, (criteria, hit[0], hit[1]) if hit else None)
            left_out = (hit[2] if hit is not None and hit[1].executors is view.executors
                        else hard_rejections(criteria, snap.executors))
            self._lru[criteria] = (shared, view, left_out)
            self._lru.move_to_end(criteria)
            while len(self._lru) > self.max_entries:
                self._lru.popitem(last=False)
        return replace(view, latency=snap.latency or NO_SAMPLES,
                       client_record=snap.client_record), left_out

    def left_out(self, criteria: Criteria) -> Tally[str]:
        """The rejections of the last :meth:`get` for ``criteria`` (empty if none)."""
        hit = self._lru.get(criteria)
        return hit[2] if hit is not None else Tally()


def _same_shared(a: Snapshot, b: Snapshot) -> bool:
    """Whether every part but the client's is the very same object in ``a`` and ``b``."""
    return (a.executors is b.executors and a.replicas is b.replicas and a.service is b.service
            and a.inflight is b.inflight and a.inflight_requests is b.inflight_requests
            and a.own_inflight is b.own_inflight and a.replica_inflight is b.replica_inflight
            and a.own_late is b.own_late)


class DemandQueue:
    """Demand signals of selections, coalesced and written off the request path: one
    pipelined write per ``interval`` of everything queued (``P:demand:BUCKET``).

    A failed write is kept and retried with the next one. Nothing is lost
    silently: what the queue cannot hold (``max_pending`` distinct
    (bucket, executor) counts), what is older than the demand buckets live and
    what is still queued when the selector stops are counted as dropped.
    """

    def __init__(self, store: MetadataStore, registry: CollectorRegistry, *,
                 interval: float = 0.5, max_pending: int = 50_000) -> None:
        self.store = store
        self.interval = interval
        self.max_pending = max_pending
        self.pending: dict[tuple[int, str], int] = {}
        self.written = Counter("mulambda_selector_demand_written",
                               "Demand signals written to the store", registry=registry)
        self.dropped = Counter("mulambda_selector_demand_dropped",
                               "Demand signals never written, by reason", ["reason"],
                               registry=registry)
        self.flushes = Counter("mulambda_selector_demand_flushes",
                               "Pipelined demand writes, by outcome", ["outcome"],
                               registry=registry)
        self._writer: asyncio.Task[None] | None = None
        self._warned_at = -math.inf

    def add(self, executors: Iterable[str]) -> None:
        """Queue one demand signal per executor (synchronous, never waits)."""
        bucket = _bucket()
        for executor in executors:
            key = (bucket, executor)
            if key not in self.pending and len(self.pending) >= self.max_pending:
                self._drop("queue_full", 1)
                continue
            self.pending[key] = self.pending.get(key, 0) + 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_forever())

    def _drop(self, reason: str, n: int) -> None:
        self.dropped.labels(reason=reason).inc(n)
        now = time.monotonic()
        if now - self._warned_at >= 10:  # one line per 10 s, whatever the rate
            self._warned_at = now
            log.warning("demand dropped reason=%s count=%d (counted in "
                        "mulambda_selector_demand_dropped_total)", reason, n)

    async def flush(self) -> None:
        """Write everything queued in one pipeline; on failure it stays queued (raises
        StoreUnavailable)."""
        batch, self.pending = self.pending, {}
        oldest = _bucket() - DEMAND_TTL_SECONDS // DEMAND_BUCKET_SECONDS
        stale = sum(n for (bucket, _), n in batch.items() if bucket <= oldest)
        if stale:
            self._drop("expired", stale)
            batch = {k: n for k, n in batch.items() if k[0] > oldest}
        if not batch:
            return
        try:
            await self.store.add_demand(batch)
        except BaseException:  # incl. cancellation: keep it for the next write
            for key, n in batch.items():
                if key in self.pending or len(self.pending) < self.max_pending:
                    self.pending[key] = self.pending.get(key, 0) + n
                else:
                    self._drop("queue_full", n)
            self.flushes.labels(outcome="failed").inc()
            raise
        self.flushes.labels(outcome="ok").inc()
        self.written.inc(sum(batch.values()))

    async def _write_forever(self) -> None:
        delay = self.interval
        while self.pending:
            await asyncio.sleep(delay)
            try:
                await self.flush()
                delay = self.interval
            except StoreUnavailable as exc:
                delay = min(max(delay * 2, self.interval), 10.0)
                log.debug("demand write failed error=%s; retrying in %gs", exc, delay)

    async def close(self, seconds: float = 2.0) -> None:
        """Write what is queued (at most ``seconds``); what is left is counted dropped."""
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        try:
            async with asyncio.timeout(seconds):
                await self.flush()
        except (StoreUnavailable, TimeoutError):
            pass
        left = sum(self.pending.values())
        if left:
            self._drop("shutdown", left)
            self.pending = {}
