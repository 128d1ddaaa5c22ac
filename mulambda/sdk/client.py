"""The async SDK client: cached selection, failover, in-flight counting.

How it works is described in :mod:`mulambda.sdk`, its public face.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any, TypeVar

import httpx

from mulambda.policy.selection import (
    DEFAULT_POLICY,
    Candidate,
    Criteria,
    Policy,
    Ranking,
    prefilter,
    rank,
)
from mulambda.store.leases import InflightLeases
from mulambda.store.metadata import INFLIGHT_LEASE_SECONDS, MetadataStore
from mulambda.store.records import Snapshot, StoreUnavailable

from .errors import AllCandidatesFailed, NoMatchingModel, Prediction, Retryable
from .transport import GrpcTransport, rest_predict

log = logging.getLogger("mulambda.sdk")
T = TypeVar("T")


class MulambdaClient:
    """Async SDK for one client id (``NAMESPACE/NAME``).

    ``criteria`` None means: use the Client the operator registered under
    ``client_id`` in the store (read on first use and with every refresh).
    Keyword arguments ``type``, ``input``, ``output``, ``latency_weight``,
    ``accuracy_weight``, ``max_latency_ms``, ``min_accuracy`` build criteria
    inline instead. ``inflight_lease_seconds`` bounds how long this
    instance's in-flight counts outlive it if it dies without ``close()``.
    """

    def __init__(
        self,
        store: str | MetadataStore,
        client_id: str,
        criteria: Criteria | None = None,
        *,
        cache_ttl: float = 1.0,
        max_stale: float | None = None,
        background_refresh: bool = True,
        timeout: float = 30.0,
        max_attempts: int = 3,
        suspect_seconds: float = 5.0,
        cold_start_timeout: float = 60.0,
        policy: Policy = DEFAULT_POLICY,
        prefix: str = "mulambda",
        http: httpx.AsyncClient | None = None,
        inflight_lease_seconds: float = INFLIGHT_LEASE_SECONDS,
        **criteria_fields: Any,
    ) -> None:
        if criteria is not None and criteria_fields:
            raise TypeError("pass either criteria or criteria fields, not both")
        self.criteria = Criteria(**criteria_fields) if criteria_fields else criteria
        self._registered = self.criteria is None
        self._owns_store = isinstance(store, str)
        self.store = (
            MetadataStore.from_url(store, prefix=prefix) if isinstance(store, str) else store
        )
        self.client_id = client_id
        self.cache_ttl = cache_ttl
        self.max_stale = max(cache_ttl, max_stale if max_stale is not None else 5 * cache_ttl)
        self.background_refresh = background_refresh
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.suspect_seconds = suspect_seconds
        self.cold_start_timeout = cold_start_timeout
        self.policy = policy
        self._owns_http = http is None
        self._http = http
        self._snap: Snapshot | None = None
        self._view: Snapshot | None = None  # _snap restricted to executors meeting the criteria
        self._snap_at = 0.0  # monotonic
        self._leases = InflightLeases(self.store, ttl=inflight_lease_seconds)
        self._local = self._leases.counts  # own in-flight now (snapshots leave it out)
        self._suspect: dict[str, float] = {}  # executor -> monotonic deadline
        self._lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self._woken: set[tuple[str, float]] = set()
        self._bg: set[asyncio.Task[Any]] = set()
        self._grpc: GrpcTransport | None = None

    # -- lifecycle -------------------------------------------------------------
    async def __aenter__(self) -> MulambdaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close what this client opened (not a store or httpx client passed in)."""
        for task in [self._refresh_task, *self._bg]:
            if task is not None and not task.done():
                task.cancel()
        await self._leases.close()
        if self._grpc is not None:
            await self._grpc.close()
        if self._http is not None and self._owns_http:
            await self._http.aclose()
            self._http = None
        if self._owns_store:
            await self.store.close()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            # Connection pooling matters: a new TCP handshake per prediction
            # would cost more than selection does.
            self._http = httpx.AsyncClient(timeout=self.timeout)
        return self._http

    # -- selection -----------------------------------------------------------
    async def _refresh(self) -> None:
        # One round trip: the snapshot carries the registered Client's record.
        snap = await self.store.snapshot(self.client_id, exclude_instance=self._leases.instance)
        if self._registered:
            if snap.client_record is None:
                raise NoMatchingModel(
                    self.client_id, "client is not registered in the store and no criteria given"
                )
            self.criteria = snap.client_record.criteria
        assert self.criteria is not None
        # Ranking runs on every select(); filtering by type once per refresh
        # keeps it proportional to the matching executors, not all of them.
        self._view = prefilter(self.criteria, snap)
        self._snap, self._snap_at = snap, time.monotonic()
        log.debug("snapshot refreshed client=%s executors=%d", self.client_id,
                  len(snap.executors))

    async def _refresh_quietly(self) -> None:
        try:
            async with self._lock:
                await self._refresh()
        except (StoreUnavailable, NoMatchingModel) as exc:
            # The next select() that finds the snapshot too old raises it.
            log.warning("background refresh failed client=%s error=%s", self.client_id, exc)

    async def snapshot(self) -> Snapshot:
        """The cached snapshot, refreshed as the cache settings say."""
        age = time.monotonic() - self._snap_at
        if self._snap is not None and age < self.cache_ttl:
            return self._snap
        if self._snap is not None and self.background_refresh and age < self.max_stale:
            if self._refresh_task is None or self._refresh_task.done():
                self._refresh_task = asyncio.create_task(self._refresh_quietly())
            return self._snap
        async with self._lock:
            # Single flight: whoever waited on the lock may find it fresh now.
            if self._snap is None or time.monotonic() - self._snap_at >= self.cache_ttl:
                await self._refresh()
        assert self._snap is not None
        return self._snap

    async def ranking(self) -> Ranking:
        """All candidates, best first, with this process's own load taken into account."""
        full = await self.snapshot()
        assert self.criteria is not None and self._view is not None
        snap = self._view
        if self._local:
            # The snapshot counts everybody's leases but ours; ours are exact here.
            inflight = dict(snap.inflight)
            for ex, n in self._local.items():
                inflight[ex] = inflight.get(ex, 0) + n
            snap = replace(snap, inflight=inflight)
        ranking = rank(self.criteria, snap, client=self.client_id, now=time.time(),
                       policy=self.policy)
        if not ranking:  # explain with every executor, not only the prefiltered ones
            ranking = rank(self.criteria, full, client=self.client_id, now=time.time(),
                           policy=self.policy)
        if self._suspect:
            now = time.monotonic()
            self._suspect = {e: t for e, t in self._suspect.items() if t > now}
            healthy = [c for c in ranking if c.executor_id not in self._suspect]
            # All suspect: better to retry them than to give up.
            if healthy and len(healthy) < len(ranking):
                ranking = Ranking(
                    healthy + [c for c in ranking if c.executor_id in self._suspect],
                    ranking.rejected, ranking.wake, ranking.criteria,
                )
        if ranking.wake:
            self._wake(ranking.wake)
        return ranking

    async def select(self) -> Candidate:
        """The best candidate now; raises :class:`NoMatchingModel` with the reason."""
        ranking = await self.ranking()
        if not ranking:
            raise NoMatchingModel(self.client_id, ranking.explain())
        return ranking[0]

    def _wake(self, executors: list[str]) -> None:
        """Signal demand for cold executors we would prefer, once per snapshot."""
        todo = [e for e in executors if (e, self._snap_at) not in self._woken]
        if not todo:
            return
        self._woken = {k for k in self._woken if k[1] == self._snap_at}
        self._woken.update((e, self._snap_at) for e in todo)
        self._spawn(self._note_demand(todo))

    async def _note_demand(self, executors: list[str]) -> None:
        try:
            await self.store.note_demand(executors)
            log.info("demand signalled client=%s executors=%s", self.client_id, executors)
        except StoreUnavailable as exc:
            log.warning("demand signal failed client=%s error=%s", self.client_id, exc)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # -- calling models --------------------------------------------------------
    async def _wait_until_warm(self, executor: str) -> Candidate | None:
        """Poll the store until a cold executor has a live replica (or give up)."""
        deadline = time.monotonic() + self.cold_start_timeout
        while time.monotonic() < deadline:
            async with self._lock:
                await self._refresh()
            for c in await self.ranking():
                if c.executor_id == executor and c.warm:
                    return c
            await asyncio.sleep(0.5)
        return None

    async def _with_failover(self, call: Callable[[Candidate], Awaitable[T]]) -> tuple[
        T, Candidate, int
    ]:
        ranking = await self.ranking()
        if not ranking:
            raise NoMatchingModel(self.client_id, ranking.explain())
        attempts: list[tuple[str, str]] = []
        if ranking.criteria.cold_start == "UseWarm" and any(c.warm for c in ranking):
            # Serve from the best warm candidate meanwhile; the cold ones we
            # would prefer get a demand signal so the operator activates them
            # (in the background, once per snapshot: never on the request path).
            if not ranking[0].warm:
                self._wake([ranking[0].executor_id])
            ranking = Ranking([c for c in ranking if c.warm], ranking.rejected,
                              ranking.wake, ranking.criteria)
        for candidate in ranking[: self.max_attempts]:
            if not candidate.warm:
                await self._note_demand([candidate.executor_id])
                warm = await self._wait_until_warm(candidate.executor_id)
                if warm is None:
                    attempts.append((candidate.executor_id,
                                     f"cold start not done in {self.cold_start_timeout:g}s"))
                    continue
                candidate = warm
            try:
                result = await self._counted(candidate.executor_id, call(candidate))
                return result, candidate, len(attempts) + 1
            except Retryable as exc:
                attempts.append((candidate.executor_id, str(exc)))
                self._suspect[candidate.executor_id] = time.monotonic() + self.suspect_seconds
                log.warning("candidate failed client=%s executor=%s error=%s; failing over",
                            self.client_id, candidate.executor_id, exc)
        raise AllCandidatesFailed(self.client_id, attempts)

    async def _counted(self, executor: str, op: Awaitable[T]) -> T:
        """Run ``op`` counted as in flight (and as demand) in this instance's leases.

        Counting and releasing are local and synchronous: nothing between
        them can be skipped by a cancellation, and CancelledError propagates
        untouched. The store learns the counts from the leases' writer.
        """
        self._leases.start(executor)
        try:
            return await op
        finally:
            self._leases.finish(executor)

    async def _predict(self, call: Callable[[Candidate], Awaitable[Any]]) -> Prediction:
        started = time.perf_counter()
        result, cand, n = await self._with_failover(call)
        return Prediction(result, cand.executor_id, cand,
                          (time.perf_counter() - started) * 1000, n)

    async def predict(
        self, instances: list[Any], *, signature_name: str | None = None,
        attempt_timeout: float | None = None,
    ) -> Prediction:
        """POST ``{endpoint}/v1/models/{model}:predict`` to the best model, failing over.

        ``attempt_timeout`` bounds each attempt (default: the client's
        ``timeout``); wrap the call in ``asyncio.timeout`` to bound the total.
        """
        body: dict[str, Any] = {"instances": instances}
        if signature_name:
            body["signature_name"] = signature_name
        timeout = attempt_timeout or self.timeout
        return await self._predict(lambda c: rest_predict(self.http, c, body, timeout))

    async def predict_grpc(
        self, inputs: dict[str, Any], *, signature_name: str = "serving_default",
        attempt_timeout: float | None = None,
    ) -> Prediction:
        """Predict over gRPC (TF Serving PredictionService); needs ``mulambda[grpc]``.

        ``inputs`` maps input tensor names to array-likes; the answer maps
        output names to numpy arrays. ``attempt_timeout`` bounds each attempt.
        """
        if self._grpc is None:
            self._grpc = GrpcTransport()
        grpc, timeout = self._grpc, attempt_timeout or self.timeout
        return await self._predict(lambda c: grpc.predict(c, inputs, signature_name, timeout))
