"""In-flight leases: one router's requests in flight, published so they expire; and a
fresh reader of everybody else's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from .demand import DEMAND_BUCKET_SECONDS, DEMAND_TTL_SECONDS, _bucket
from .metadata import INFLIGHT_LEASE_SECONDS
from .reader import InflightMirror, Load
from .records import MAX_LEASE_SECONDS, StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mulambda.policy.latency import ServiceTracker

    from .metadata import MetadataStore

log = logging.getLogger("mulambda.store")

__all__ = ["InflightLeases", "InflightReader", "Load"]


class InflightLeases:
    """One SDK instance's requests in flight, published as self-expiring leases.

    Counting is local and synchronous (:meth:`start`, :meth:`finish` never
    wait for the store, so neither a cancelled caller nor a slow store can
    skip or delay a release). One background writer publishes the absolute
    counts, coalescing bursts into one pipelined write, and rewrites them
    every ``ttl / 3`` while anything is in flight; a failed write is retried
    with back-off. Requests started are queued as demand and go out with the
    next write. :meth:`close` deletes the leases (best effort, bounded);
    :meth:`stop` leaves them to expire. With a ``service`` tracker, the
    service times it measured since the last write go out in the same
    pipeline (``P:service``). With ``writes=False`` (a store user that may
    not write them) it only counts: nothing is published and no demand is
    kept.
    """

    def __init__(self, store: MetadataStore, instance: str | None = None,
                 ttl: float = INFLIGHT_LEASE_SECONDS,
                 service: ServiceTracker | None = None, *, writes: bool = True) -> None:
        self.store = store
        self.service = service
        self.writes = writes
        self.instance = instance or uuid.uuid4().hex[:16]
        if "|" in self.instance:
            raise ValueError("instance must not contain '|'")
        if not 0 < ttl <= MAX_LEASE_SECONDS:  # readers refuse a lease expiring later
            raise ValueError(f"ttl must be within (0, {MAX_LEASE_SECONDS:g}] seconds")
        self.ttl = ttl
        self.release_timeout = 2.0  # close() gives up deleting the leases after this
        self.refresh_seconds = max(0.05, ttl / 3)
        self.counts: dict[str, int] = {}
        # executor -> token -> the timing of each request that has it (InflightLease)
        self.timing: dict[str, dict[int, list[Any]]] = {}
        self._token = 0
        # Executors whose lease the store may hold (a failed write may have landed).
        self._maybe_published: set[str] = set()
        self._demand: dict[tuple[int, str], int] = {}
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    # -- counting (synchronous) ------------------------------------------------
    def add(self, executor: str, delta: int, publish: bool = True) -> None:
        """Change the local count of ``executor`` (never below zero)."""
        n = max(0, self.counts.get(executor, 0) + delta)
        if n:
            self.counts[executor] = n
        else:
            self.counts.pop(executor, None)
        self._ensure_writer()
        if publish:
            self._dirty.set()

    def start(self, executor: str, at: float | None = None, publish: bool = True,
              timing: Sequence[str | float] | None = None) -> int:
        """A request to ``executor`` started: in flight, and one more demand. ``timing``
        is its entry of :attr:`InflightLease.requests`; returns the token :meth:`finish`
        and :meth:`retime` take."""
        if self.writes:
            key = (_bucket(at), executor)
            self._demand[key] = self._demand.get(key, 0) + 1
        self._token += 1
        if timing is not None:
            self.timing.setdefault(executor, {})[self._token] = list(timing)
        self.add(executor, 1, publish)
        return self._token

    def retime(self, executor: str, token: int, timing: Sequence[str | float]) -> None:
        """Replace the timing of a request still in flight (published with the next write)."""
        known = self.timing.get(executor)
        if known is not None and token in known:
            known[token] = list(timing)
            self.kick()

    def finish(self, executor: str, publish: bool = True, token: int | None = None) -> None:
        """A request to ``executor`` ended (answered, failed or cancelled)."""
        known = self.timing.get(executor)
        if known is not None and token is not None:
            known.pop(token, None)
            if not known:
                del self.timing[executor]
        self.add(executor, -1, publish)

    def kick(self) -> None:
        """Publish soon, in the background."""
        self._ensure_writer()
        self._dirty.set()

    # -- publishing ----------------------------------------------------------------
    async def flush(self) -> None:
        """Publish the current counts and queued demand now; raises StoreUnavailable."""
        if not self.writes:
            return
        async with self._lock:
            counts = dict(self.counts)
            for executor in self._maybe_published:
                counts.setdefault(executor, 0)  # zero: delete the lease
            oldest = _bucket() - DEMAND_TTL_SECONDS // DEMAND_BUCKET_SECONDS
            demand = {k: v for k, v in self._demand.items() if k[0] > oldest}
            self._demand = {}
            measured = self.service.take_changed() if self.service is not None else {}
            if not counts and not demand and not measured:
                return
            timing = {e: list(t.values()) for e, t in self.timing.items()}
            try:
                await self.store.publish_inflight(self.instance, counts, ttl=self.ttl,
                                                  demand=demand, service=measured,
                                                  requests=timing)
            except BaseException:  # incl. cancellation: the write may or may not have landed
                self._maybe_published |= {e for e, n in counts.items() if n > 0}
                for k, v in demand.items():
                    self._demand[k] = self._demand.get(k, 0) + v
                if self.service is not None:
                    self.service.mark_changed(list(measured))
                raise
            self._maybe_published = {e for e, n in counts.items() if n > 0}

    def _ensure_writer(self) -> None:
        if (not self.writes or self._closed
                or (self._writer is not None and not self._writer.done())):
            return
        try:
            self._writer = asyncio.get_running_loop().create_task(self._write_forever())
        except RuntimeError:  # no running loop: flush() / close() publish instead
            self._writer = None

    async def _write_forever(self) -> None:
        backoff = 0.0
        while True:
            if not self._dirty.is_set():
                # Refresh the expiry only while something is in flight.
                # asyncio.timeout, not wait_for: 3.11's wait_for swallows a
                # cancellation that arrives as the event is set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.refresh_seconds if self.counts else None):
                        await self._dirty.wait()
            if self._closed:
                return
            self._dirty.clear()
            try:
                await self.flush()
            except StoreUnavailable as exc:
                log.warning("in-flight leases not published instance=%s error=%s",
                            self.instance, exc)
                self._dirty.set()
                backoff = min(self.refresh_seconds, max(0.1, backoff * 2))
                await asyncio.sleep(backoff)
            else:
                backoff = 0.0

    async def stop(self) -> None:
        """Stop publishing; the leases expire within ``ttl``."""
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.cancel()
        # redis-py can swallow a cancellation that lands as a reply arrives;
        # then the writer wakes up here, sees _closed and returns.
        self._dirty.set()
        while not writer.done():
            await asyncio.wait({writer}, timeout=0.1)
            writer.cancel()
        if not writer.cancelled() and writer.exception() is not None:
            log.warning("in-flight lease writer failed instance=%s error=%r", self.instance,
                        writer.exception())

    async def close(self) -> None:
        """Stop publishing and delete this instance's leases (best effort, bounded)."""
        await self.stop()
        self.counts.clear()
        try:
            async with asyncio.timeout(self.release_timeout):
                await self.flush()
        except (StoreUnavailable, TimeoutError) as exc:
            log.warning("in-flight leases not released instance=%s error=%r; they expire "
                        "within %gs", self.instance, exc, self.ttl)


class InflightReader:
    """Everybody else's requests in flight, read fresh for each routing decision.

    A snapshot is refreshed about once a second, but a fast model serves a
    request in tens of milliseconds: routers that only see each other's load
    a second late send their requests to the same idle replica at the same
    time. So each decision reads the in-flight leases again (those changed
    since the last read: :class:`~mulambda.store.reader.InflightMirror`, a
    fraction of a millisecond on a nearby store), shared by
    every decision within ``ttl`` seconds and bounded by ``timeout``. When
    the store is slow or down, :meth:`read` returns None at once for
    ``backoff`` seconds (callers then use their snapshot's counts): a store
    outage never adds more than one ``timeout`` to a prediction.

    With ``service``, each read also brings everybody else's measured service
    times (``P:service``, in the same pipeline: one more XRANGE, and an HMGET
    of the changed fields in the round trip the changed leases already
    take). A router that fits its latency model on them counts the others'
    requests as running for as long as they now take, not as long as they
    took up to a snapshot ago.
    """

    def __init__(self, store: MetadataStore, exclude_instance: str | None = None, *,
                 ttl: float = 0.002, timeout: float = 0.05, backoff: float = 1.0,
                 service: bool = False) -> None:
        self.store = store
        self.exclude_instance = exclude_instance
        self.ttl = ttl
        self.timeout = timeout
        self.backoff = backoff
        # Only the leases that changed since the last read are read (store/reader.py).
        self._mirror = InflightMirror(store, exclude_instance, service=service)
        self._load: Load | None = None
        self._at = -float("inf")
        self._failed_until = -float("inf")
        self._pending: asyncio.Task[Load] | None = None

    async def read(self) -> Load | None:
        """Everybody else's requests in flight per executor: (counts of those without
        timing, those with timing), as :meth:`MetadataStore.inflight_load`, and with
        ``service`` their measured service times; or None (use the snapshot)."""
        now = time.monotonic()
        if self._load is not None and now - self._at < self.ttl:
            return self._load
        if now < self._failed_until:
            return None
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._mirror.load())
            # Retrieve a failure nobody waits for any more (its caller timed out).
            self._pending.add_done_callback(lambda t: t.cancelled() or t.exception())
        pending = self._pending
        try:
            async with asyncio.timeout(self.timeout):
                # shield: a caller's timeout or cancellation must not cancel the read
                # others are waiting for.
                load = await asyncio.shield(pending)
        except (StoreUnavailable, TimeoutError) as exc:
            if not _answered(pending):
                self._failed_until = time.monotonic() + self.backoff
                log.debug("fresh in-flight read failed error=%r; using the snapshot for %gs",
                          exc, self.backoff)
                return None
            # The read came back, but this process was too busy to wake its caller
            # before the timer (a saturated event loop, not a slow store): at a few
            # thousand requests a second the read would otherwise be given up for
            # ``backoff`` again and again, exactly when load matters most.
            load = pending.result()
        self._load, self._at = load, now
        return load

    def close(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()


def _answered(read: asyncio.Future[Load]) -> bool:
    """Whether ``read`` is done with a result (not failed, not cancelled)."""
    return read.done() and not read.cancelled() and read.exception() is None
