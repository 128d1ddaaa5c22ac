"""Client probing: network latency from this replica to every registered client.

Every ``interval`` (with random jitter, so the companions of many executors
do not probe in lock-step) the prober lists the clients the operator
registered, sends one HTTP GET to each ``probe_url`` and keeps a smoothed
latency per (this replica, client) in the store, which selection reads.

Rules, chosen so a bad client can never hurt the loop:

* Probes run concurrently, at most ``concurrency`` in flight
  (:class:`asyncio.Semaphore`); each one has its own ``timeout`` that starts
  when it gets a slot, so a queue of slow clients does not eat the budget of
  the ones behind them. A round therefore takes at most about
  ``ceil(clients / concurrency) * timeout``.
* What is measured is the time from sending the request to receiving the
  response headers, over a fresh connection each time (no keep-alive), so
  every sample includes the same TCP handshake and samples are comparable
  across replicas. Any HTTP answer counts, whatever its status: the client
  answered, so the network path works, and its latency is what selection
  needs; whether the client is healthy is not the prober's business.
* A failed probe (connection refused, timeout, any other error) is counted
  in ``mulambda_companion_probe_errors_total{reason}`` and does NOT update
  the stored latency: a timeout says "slower than the timeout", not by how
  much, and folding the timeout value in would invent a number. The old
  sample keeps its ``expires_at``, so a client that stays unreachable loses
  its latency after ``ttl`` and selection treats it as unmeasured.
* Smoothing is an EWMA: ``ms = alpha * new + (1 - alpha) * old``; the first
  sample is taken as is. The previous value is read back from the store, so
  a restarted companion continues its series instead of starting over.
* A store outage skips the round (counted, logged) and the loop goes on;
  the first round that stores again says so. A routine round logs at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import httpx

from mulambda.store.metadata import MetadataStore
from mulambda.store.records import LatencySample, StoreUnavailable

from .server import Metrics

log = logging.getLogger("mulambda.companion.prober")


@dataclass(frozen=True)
class ProbeResult:
    """One probe: ``ms`` on success, else ``error`` (timeout | connect | error)."""

    client: str
    ms: float | None = None
    error: str | None = None
    detail: str = ""


def ewma(previous: LatencySample | None, ms: float, alpha: float) -> LatencySample:
    """Fold a new measurement into a smoothed sample."""
    if previous is None or previous.samples <= 0:
        return LatencySample(ms=ms, samples=1)
    return LatencySample(
        ms=alpha * ms + (1.0 - alpha) * previous.ms, samples=previous.samples + 1
    )


class Prober:
    """Probes registered clients from one replica and stores smoothed latencies."""

    def __init__(
        self,
        store: MetadataStore,
        *,
        executor: str,
        pod: str,
        interval: float,
        timeout: float,
        concurrency: int,
        ttl: float,
        alpha: float = 0.3,
        jitter: float = 0.2,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.executor = executor
        self.pod = pod
        self.interval = interval
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.ttl = ttl
        self.alpha = alpha
        self.jitter = jitter
        self.metrics = metrics or Metrics()
        self._store_failures = 0  # store calls failed since the last one that worked
        self._exported: set[str] = set()  # clients with a client_rtt gauge
        self._http = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            # No keep-alive: every probe pays the same handshake (see module docstring).
            limits=httpx.Limits(max_keepalive_connections=0, max_connections=self.concurrency),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def probe(self, client: str, url: str, slots: asyncio.Semaphore) -> ProbeResult:
        """Probe one client; never raises."""
        async with slots:
            start = time.perf_counter()
            try:
                # asyncio.timeout bounds the whole exchange; httpx's own timeouts are per phase.
                async with asyncio.timeout(self.timeout), self._http.stream("GET", url):
                    elapsed = time.perf_counter() - start
            except (TimeoutError, httpx.TimeoutException):
                return self._failed(client, "timeout", f"no answer within {self.timeout}s")
            except httpx.ConnectError as exc:
                return self._failed(client, "connect", str(exc) or type(exc).__name__)
            except Exception as exc:  # bad URL, reset, protocol error: all the client's problem
                return self._failed(client, "error", f"{type(exc).__name__}: {exc}")
        self.metrics.probe_latency.observe(elapsed)
        return ProbeResult(client=client, ms=elapsed * 1000.0)

    def _failed(self, client: str, reason: str, detail: str) -> ProbeResult:
        self.metrics.probe_errors.labels(reason=reason).inc()
        log.debug("probe failed client=%s reason=%s detail=%s", client, reason, detail)
        return ProbeResult(client=client, error=reason, detail=detail)

    async def probe_round(self) -> dict[str, ProbeResult]:
        """Probe every registered client once and store the smoothed latencies."""
        try:
            clients = await self.store.list_clients()
        except StoreUnavailable as exc:
            self._store_failed()
            log.warning("probe round skipped, store unavailable error=%s", exc)
            return {}
        targets = {cid: c.probe_url for cid, c in clients.items() if c.probe_url}
        if not targets:
            self._store_ok()
            self.metrics.probe_rounds.inc()
            return {}
        slots = asyncio.Semaphore(self.concurrency)
        started = time.monotonic()
        results = await asyncio.gather(
            *(self.probe(cid, url, slots) for cid, url in targets.items())
        )
        by_client = {r.client: r for r in results}
        measured = {r.client: r.ms for r in results if r.ms is not None}
        try:
            previous = await self.store.get_latencies(self.executor, self.pod, measured)
            samples = {c: ewma(previous.get(c), ms, self.alpha) for c, ms in measured.items()}
            await self.store.put_latencies(self.executor, self.pod, samples, ttl=self.ttl)
            self._export_rtts(samples, set(targets))
        except StoreUnavailable as exc:
            self._store_failed()
            log.warning("probe results not stored error=%s", exc)
        else:
            self._store_ok()
        self.metrics.probe_rounds.inc()
        # DEBUG: a round every probe interval is routine; failures are counted in metrics.
        log.debug(
            "probe round done clients=%d ok=%d failed=%d seconds=%.3f",
            len(targets), len(measured), len(targets) - len(measured),
            time.monotonic() - started,
        )
        return by_client

    def _export_rtts(self, samples: dict[str, LatencySample], registered: set[str]) -> None:
        """Smoothed RTTs as gauges; clients no longer registered lose theirs."""
        for client, sample in samples.items():
            self.metrics.client_rtt.labels(self.executor, client).set(sample.ms / 1000)
        for client in self._exported - registered:
            self.metrics.client_rtt.remove(self.executor, client)
        self._exported = (self._exported & registered) | set(samples)

    def _store_failed(self) -> None:
        self.metrics.store_errors.labels(component="prober").inc()
        self._store_failures += 1

    def _store_ok(self) -> None:
        if self._store_failures:
            log.info("store reachable again after=%d failed calls", self._store_failures)
            self._store_failures = 0

    def next_delay(self) -> float:
        """The interval with +/- ``jitter`` fraction, so companions drift apart."""
        return max(0.0, self.interval * (1.0 + random.uniform(-self.jitter, self.jitter)))

    async def run(self, stop: asyncio.Event) -> None:
        """Probe rounds until ``stop`` is set; the first round starts at once."""
        log.info(
            "prober started executor=%s pod=%s interval=%s timeout=%s concurrency=%d",
            self.executor, self.pod, self.interval, self.timeout, self.concurrency,
        )
        while not stop.is_set():
            try:
                await self.probe_round()
            except Exception:  # a bug here must not silently end probing for the pod's life
                log.exception("probe round crashed; continuing")
            try:
                await asyncio.wait_for(stop.wait(), self.next_delay())
            except TimeoutError:
                pass
