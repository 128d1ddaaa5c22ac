"""How an SDK instance wakes executors at zero replicas and learns their cold starts.

Demand for a cold executor goes to the store (``P:demand``), or, for an
instance whose store user may not write (read-only mode), through the
selector's ``/select``, which signals demand for what it selects
(:class:`Waking`). An executor asked to wake that later shows a live replica
took that long to start: the time goes to the service-time model
(:class:`ColdStarts`, which the selector's gateway uses too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import httpx

from mulambda.policy.latency import ServiceTracker
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import Snapshot, StoreUnavailable

from .errors import MulambdaError

log = logging.getLogger("mulambda.sdk")


# A cold start is measured only when a snapshot showed the executor still without a live
# replica at most this long (or this share of the cold start) before the one that shows it.
COLD_START_SLACK_SECONDS = 2.0
COLD_START_SLACK_SHARE = 0.25


class ColdStarts:
    """Executors asked to wake, and how long each took to show a live replica: the
    cold start goes to the service-time model (a router's, the SDK's or the gateway's).
    """

    def __init__(self, tracker: ServiceTracker, *, timeout: float,
                 published: Callable[[], None], name: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tracker = tracker
        self.timeout = timeout
        self.published = published  # asks for the measurement to be published
        self.name = name  # the router, in log lines
        self.clock = clock
        # cold executor -> (monotonic time asked to wake, last time a snapshot showed it
        # without a live replica)
        self.asked: dict[str, tuple[float, float]] = {}

    def ask(self, executors: list[str]) -> None:
        now = self.clock()
        for e in executors:
            self.asked.setdefault(e, (now, now))

    def note_woken(self, snap: Snapshot) -> None:
        """An executor asked to wake that now has a live replica took (now - asked) to
        start, give or take the time since a snapshot last showed it without one. A
        router reads snapshots only as requests come: after a quiet while that time is
        not known well enough, and nothing is learned (a selector asked once and idle
        for ten minutes would have measured ten minutes)."""
        if not self.asked:
            return
        now = self.clock()
        for executor, (asked, absent) in list(self.asked.items()):
            if any(r.state == "Available" for r in snap.replicas.get(executor, ())):
                del self.asked[executor]
                cold = now - asked
                if now - absent > max(COLD_START_SLACK_SECONDS, cold * COLD_START_SLACK_SHARE):
                    log.info("cold start not measured router=%s executor=%s: up within the "
                             "last %.1fs of %.1fs", self.name, executor, now - absent, cold)
                    continue
                self.tracker.observe_cold_start(executor, cold * 1000)
                self.published()
                log.info("cold start measured router=%s executor=%s seconds=%.1f",
                         self.name, executor, cold)
            elif now - asked > max(self.timeout, 600.0):
                del self.asked[executor]  # it never came: nothing to learn
            else:
                self.asked[executor] = (asked, now)


class Waking:
    """Demand signals for cold executors, once per snapshot, and their cold starts."""

    def __init__(self, store: MetadataStore, client_id: str, cold: ColdStarts, *,
                 through_selector: Callable[[], Awaitable[str]] | None,
                 read_only: bool) -> None:
        self.store = store
        self.client_id = client_id
        self.cold = cold
        # Read-only: ask the selector (None: there is none to ask).
        self.through_selector = through_selector
        self.read_only = read_only
        self._signalled: set[tuple[str, float]] = set()  # (executor, snapshot time)
        self._told_no_selector = False

    def due(self, executors: list[str], snapshot_at: float) -> list[str]:
        """Of ``executors``, those not yet signalled for this snapshot (now counted as
        asked to wake)."""
        todo = [e for e in executors if (e, snapshot_at) not in self._signalled]
        self.cold.ask(todo)
        self._signalled = {k for k in self._signalled if k[1] == snapshot_at}
        self._signalled.update((e, snapshot_at) for e in todo)
        return todo

    async def signal(self, executors: list[str]) -> None:
        """Signal demand for ``executors`` (failures are logged, never raised)."""
        if self.read_only:
            await self._through_selector(executors)
            return
        try:
            await self.store.note_demand(executors)
            log.info("demand signalled client=%s executors=%s", self.client_id, executors)
        except StoreUnavailable as exc:
            log.warning("demand signal failed client=%s error=%s", self.client_id, exc)

    async def _through_selector(self, executors: list[str]) -> None:
        if self.through_selector is None:
            if not self._told_no_selector:
                self._told_no_selector = True
                log.warning("read-only client=%s cannot wake executors at zero replicas "
                            "(%s): set MULAMBDA_SELECTOR_URL so the selector signals demand",
                            self.client_id, ", ".join(executors))
            return
        try:
            picked = await self.through_selector()
            log.info("demand signalled through the selector client=%s wanted=%s picked=%s",
                     self.client_id, executors, picked)
        except (MulambdaError, httpx.HTTPError) as exc:
            log.warning("demand signal through the selector failed client=%s error=%s",
                        self.client_id, exc)
