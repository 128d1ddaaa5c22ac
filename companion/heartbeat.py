"""The replica heartbeat: this pod's :class:`~mulambda.store.ReplicaRecord` with a TTL.

The record is renewed every ``interval`` seconds with ``expires_at = now +
ttl``; readers ignore expired records, so a pod that dies without a chance
to clean up ages out by itself. On graceful shutdown (SIGTERM) the record
is deleted at once so selection stops choosing the pod before its TTL runs
out. A state change is published immediately rather than at the next tick,
so the operator sees "Failed" or "Available" without waiting an interval.
With a signing key (``MULAMBDA_HEARTBEAT_KEY_FILE``) the record is signed:
routers count it only then (mulambda.store.heartbeats).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mulambda.store.heartbeats import Signer
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ReplicaRecord, StoreUnavailable

from .server import Metrics, ModelState

log = logging.getLogger("mulambda.companion.heartbeat")


class Heartbeat:
    """Publishes a :class:`ModelState` as this replica's heartbeat until stopped."""

    def __init__(
        self,
        store: MetadataStore,
        state: ModelState,
        *,
        executor: str,
        pod: str,
        ip: str,
        ttl: float,
        interval: float,
        metrics: Metrics | None = None,
        signer: Signer | None = None,
    ) -> None:
        if interval >= ttl:
            # A heartbeat renewed less often than it expires flaps between live and dead.
            log.warning("heartbeat interval=%s >= ttl=%s; replica will flap", interval, ttl)
        self.store = store
        self.state = state
        self.executor = executor
        self.pod = pod
        self.ip = ip
        self.ttl = ttl
        self.interval = interval
        self.metrics = metrics
        self.signer = signer
        self._wake = asyncio.Event()
        self._failures = 0  # failed writes since the last one that landed

    def record(self) -> ReplicaRecord:
        """The heartbeat as it would be written now."""
        s = self.state
        # reason/message explain Loading and Failed, and on an Available replica a version
        # switch that is stuck (the old version keeps serving); otherwise they are empty.
        record = ReplicaRecord(
            executor=self.executor,
            pod=self.pod,
            ip=self.ip,
            state=s.state,
            version=s.version,
            reason=s.reason,
            message=s.message,
        )
        # Signed, routers count it as the executor's pod (mulambda.store.heartbeats).
        return self.signer.sign(record, time.time()) if self.signer is not None else record

    async def publish(self) -> bool:
        """Write the heartbeat once; False (logged, counted) when the store is unreachable."""
        try:
            await self.store.put_replica(self.record(), ttl=self.ttl)
        except StoreUnavailable as exc:
            if self.metrics is not None:
                self.metrics.heartbeat_errors.inc()
            self._failures += 1
            # Repeats are rate-limited by the process's RepeatFilter (.logs).
            log.warning("heartbeat not written pod=%s error=%s", self.pod, exc)
            return False
        if self._failures:
            log.info("heartbeat written again pod=%s after=%d failed writes",
                     self.pod, self._failures)
            self._failures = 0
        return True

    def changed(self) -> None:
        """Ask the loop to publish now (the model state changed)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish every ``interval`` (or on :meth:`changed`) until ``stop`` is set."""
        log.info(
            "heartbeat started executor=%s pod=%s ttl=%s interval=%s",
            self.executor, self.pod, self.ttl, self.interval,
        )
        while not stop.is_set():
            self._wake.clear()
            await self.publish()
            stop_wait = asyncio.ensure_future(stop.wait())
            wake_wait = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait(
                    {stop_wait, wake_wait}, timeout=self.interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for t in (stop_wait, wake_wait):
                    t.cancel()

    async def remove(self) -> None:
        """Delete the heartbeat (graceful shutdown); failure is logged, the TTL cleans up."""
        try:
            await self.store.remove_replica(self.executor, self.pod)
            log.info("heartbeat removed executor=%s pod=%s", self.executor, self.pod)
        except StoreUnavailable as exc:
            log.warning("heartbeat not removed, it expires in <= %ss error=%s", self.ttl, exc)

