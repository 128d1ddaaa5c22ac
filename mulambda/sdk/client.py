"""The async SDK client: cached selection, failover, in-flight counting.

How it works is described in :mod:`mulambda.sdk`, its public face.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sized
from typing import Any, TypeVar

import httpx

from mulambda.bodies import json_body
from mulambda.policy.experiment import Experiment, experiment_ranking
from mulambda.policy.inflight import OwnRequests
from mulambda.policy.latency import ServiceTracker
from mulambda.policy.ranker import Ranker
from mulambda.policy.rollout import CANDIDATE, ArmChoice, route_view, sticky_draw
from mulambda.policy.selection import (
    DEFAULT_POLICY,
    Candidate,
    Criteria,
    Policy,
    Ranking,
    explained,
    overlay,
    prefilter,
)
from mulambda.store.leases import InflightLeases, InflightReader
from mulambda.store.metadata import INFLIGHT_LEASE_SECONDS, MetadataStore
from mulambda.store.outcomes import OutcomeRecorder
from mulambda.store.reader import SnapshotReader
from mulambda.store.records import Snapshot, StoreUnavailable

from . import workload
from .counting import InflightCounter, Wire
from .errors import AllCandidatesFailed, MulambdaError, NoMatchingModel, Prediction, Retryable
from .shadow import ShadowCopies, count_outcome
from .suspects import Suspects
from .tasks import Task, TaskClient, TaskStatus
from .transport import GrpcTransport, rest_predict
from .waking import ColdStarts, Waking

log = logging.getLogger("mulambda.sdk")
T = TypeVar("T")
# One attempt at a candidate; the transport fills the Wire (mulambda/sdk/counting.py).
Attempt = Callable[[Candidate, Wire], Awaitable[T]]


class MulambdaClient:
    """Async SDK for one client id (``NAMESPACE/NAME``).

    ``criteria`` None means: use the Client the operator registered under
    ``client_id`` in the store (read on first use and with every refresh).
    Keyword arguments ``type``, ``input``, ``output``, ``latency_weight``,
    ``accuracy_weight``, ``max_latency_ms``, ``min_accuracy`` build criteria
    inline instead. ``inflight_lease_seconds`` bounds how long this
    instance's in-flight counts outlive it if it dies without ``close()``.
    ``direct`` sends REST requests to the chosen replica's pod IP (when its
    heartbeat has one) instead of the executor's Service, so this process
    knows its load per replica; ``seed`` seeds the spreading over
    near-equal candidates (default: random). ``fresh_load`` reads everybody
    else's requests in flight and measured service times for each decision
    (decisions while a read is on its way join it; ``load_ttl`` > 0 also
    shares a read that long after it; bounded by ``load_timeout``; see
    :class:`~mulambda.store.leases.InflightReader`) instead of using the
    snapshot's, which are up to ``cache_ttl`` old. Each read is one round
    trip: an SDK process is one of many routers, and a view of the others
    even 2 ms old lost them requests sent in the meantime to the same fast
    replica (bench/README.md, 2026-12-02). ``max_shadow_inflight``
    bounds the copies of requests a Shadow rollout's new version gets from this
    instance (beyond it copies are dropped, never queued: mulambda.sdk.shadow).
    ``selector_url`` (default ``MULAMBDA_SELECTOR_URL``) is where :meth:`submit`
    and :meth:`result` send asynchronous tasks (mulambda.sdk.tasks).
    ``read_only`` (default ``MULAMBDA_SDK_READ_ONLY``, which the operator sets
    in Client workloads it gives the read-only store user) writes nothing to
    the store: in-flight counts and measurements stay in this process (its own
    rankings still use them; other routers do not see them), rollouts and
    experiments do not count its requests, Shadow copies are not sent, and
    demand for a cold executor goes through the selector's ``/select`` (which
    signals it) when a selector URL is known; without one, executors at zero
    replicas are not woken by this client, and it says so once.
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
        prefix: str | None = None,
        http: httpx.AsyncClient | None = None,
        inflight_lease_seconds: float = INFLIGHT_LEASE_SECONDS,
        direct: bool = True,
        seed: int | None = None,
        fresh_load: bool = True,
        load_ttl: float = 0.0,
        load_timeout: float = 0.05,
        max_shadow_inflight: int = 32,
        selector_url: str | None = None,
        read_only: bool | None = None,
        **criteria_fields: Any,
    ) -> None:
        if criteria is not None and criteria_fields:
            raise TypeError("pass either criteria or criteria fields, not both")
        self.criteria = Criteria(**criteria_fields) if criteria_fields else criteria
        self._registered = self.criteria is None
        self._owns_store = isinstance(store, str)
        prefix = prefix or workload.key_prefix()
        self.store = (
            MetadataStore.from_url(store, prefix=prefix) if isinstance(store, str) else store
        )
        self.client_id = client_id
        self.cache_ttl = cache_ttl
        self.max_stale = max(cache_ttl, max_stale if max_stale is not None else 5 * cache_ttl)
        self.background_refresh = background_refresh
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.cold_start_timeout = cold_start_timeout
        self.policy = policy
        self._ranker = Ranker(policy)
        self._owns_http = http is None
        self._http = http
        self._snap: Snapshot | None = None
        self._view: Snapshot | None = None  # _snap restricted to executors meeting the criteria
        self._snap_at = 0.0  # monotonic
        self.direct = direct
        self._rng = random.Random(seed)
        # What this process measured; published with its leases (P:service).
        self.read_only = workload.read_only() if read_only is None else read_only
        self._tracker = ServiceTracker(policy.fit)
        self._leases = InflightLeases(self.store, ttl=inflight_lease_seconds,
                                      service=self._tracker, writes=not self.read_only)
        self._local = self._leases.counts  # own in-flight now (snapshots leave it out)
        self._own = OwnRequests()  # own requests: when sent, how long they should stay
        self._counter = InflightCounter(self._tracker, self._own, self._leases)
        # Each refresh reads what changed since the last (store/reader.py).
        self._reader = SnapshotReader(self.store, client_id,
                                      exclude_instance=self._leases.instance)
        self._view_criteria: Criteria | None = None
        # The others' measurements come with each fresh read: fitted on the snapshot's
        # (up to cache_ttl old), their requests were counted as running after they were
        # served (issue 11).
        self._load = (InflightReader(self.store, self._leases.instance, ttl=load_ttl,
                                     timeout=load_timeout, service=True)
                      if fresh_load else None)
        self._suspects = Suspects(suspect_seconds)
        self._lock = asyncio.Lock()
        self._refresh_task: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._grpc: GrpcTransport | None = None
        # Rollouts and experiments: per-arm outcomes, shadow copies (mulambda.sdk.shadow).
        self._outcomes = OutcomeRecorder(self.store)
        self._outcomes.refused = self.read_only
        self._shadow = ShadowCopies(self._outcomes, max_inflight=max_shadow_inflight,
                                    timeout=timeout)
        self._selector_url = selector_url or workload.selector_url()
        self._tasks: TaskClient | None = None
        self._waking = Waking(
            self.store, client_id,
            ColdStarts(self._tracker, timeout=cold_start_timeout, published=self._leases.kick,
                       name=client_id),
            read_only=self.read_only,
            through_selector=(self._wake_through_selector if self._selector_url else None))

    @classmethod
    def from_env(cls, **options: Any) -> MulambdaClient:
        """The client of a Client workload, from what the operator injects into it:
        ``MULAMBDA_REDIS_URL`` (with the read-only user from ``MULAMBDA_REDIS_USERNAME``
        and ``MULAMBDA_REDIS_PASSWORD``), ``MULAMBDA_CLIENT``, ``MULAMBDA_KEY_PREFIX``,
        ``MULAMBDA_SELECTOR_URL`` and ``MULAMBDA_SDK_READ_ONLY``; ``options`` as for the
        constructor. A workload without store access has no store URL: it uses the
        selector (:class:`~.tasks.TaskClient`, or the gateway's ``/v1/predict``)."""
        return cls(*workload.store_and_client(), **options)

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
        await self._shadow.close()
        await self._outcomes.close()
        if self._load is not None:
            self._load.close()
        if self._grpc is not None:
            await self._grpc.close()
        if self._tasks is not None:
            await self._tasks.close()
        if self._http is not None and self._owns_http:
            await self._http.aclose()
            self._http = None
        if self._owns_store:
            await self.store.close()

    # -- asynchronous tasks (mulambda.sdk.tasks) ------------------------------------
    @property
    def tasks(self) -> TaskClient:
        """The selector's task API for this client."""
        if self._tasks is None:
            if not self._selector_url:
                raise MulambdaError("tasks need the selector: pass selector_url or set "
                                    "MULAMBDA_SELECTOR_URL")
            self._tasks = TaskClient(self._selector_url, self.client_id, timeout=self.timeout)
        return self._tasks

    async def submit(self, instances: Sized, **kwargs: Any) -> Task:
        """Queue a prediction as a task (an Idempotency-Key is sent by default)."""
        return await self.tasks.submit(instances, **kwargs)

    async def result(self, task_id: str, wait: float = 0.0) -> TaskStatus:
        """A task's status and result, waiting up to ``wait`` seconds for it to end."""
        return await self.tasks.result(task_id, wait)

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
        snap = await self._reader.snapshot()
        if self._registered:
            if snap.client_record is None:
                raise NoMatchingModel(
                    self.client_id, "client is not registered in the store and no criteria given"
                )
            self.criteria = snap.client_record.criteria
        assert self.criteria is not None
        # Ranking runs on every select(); filtering by type once per refresh
        # keeps it proportional to the matching executors, not all of them.
        reuse = None
        if self._snap is not None and self._view is not None and self._view_criteria:
            reuse = (self._view_criteria, self._snap, self._view)
        self._view = prefilter(self.criteria, snap, reuse)
        self._view_criteria = self.criteria
        self._snap, self._snap_at = snap, time.monotonic()
        self._waking.cold.note_woken(snap)
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

    async def ranking(self, items: int = 1, *, direct: bool | None = None,
                      key: str | None = None) -> Ranking:
        """All candidates, best first, with this process's own load and measurements
        taken into account; ``items`` is the request's size (for the per-item cost);
        ``key`` the sticky assignment key of rollouts and experiments."""
        return (await self._routed(items, direct, key))[0]

    def _draw(self, key: str | None, salt: str) -> float:
        return sticky_draw(key, salt) if key is not None else self._rng.random()

    async def _routed(self, items: int = 1, direct: bool | None = None, key: str | None = None,
                      force_stable: frozenset[str] = frozenset()) -> tuple[
                          Ranking, dict[str, ArmChoice], Experiment | None]:
        """:meth:`ranking`, the rollout arm chosen per executor, and the client's
        experiment (its arm first in the ranking)."""
        full = await self.snapshot()
        assert self.criteria is not None and self._view is not None
        # The snapshot leaves out our leases and statistics; ours are exact here.
        others = await self._load.read() if self._load is not None else None
        now_ms = time.monotonic() * 1000
        own, own_pods = self._own.ahead(now_ms)
        snap = overlay(self._view, own_inflight=own, replica_inflight=own_pods,
                       service=self._counter.measurements(), own_late=self._own.late(now_ms),
                       inflight=others.counts if others is not None else None,
                       inflight_requests=others.timed if others is not None else None,
                       others_service=others.service if others is not None else None)
        snap, arms = route_view(self._suspects.view(snap), full,
                                lambda salt: self._draw(key, salt), force_stable)
        pods = self.direct if direct is None else direct
        ranking = self._ranker.rank(self.criteria, snap, items=items, rng=self._rng,
                                    replicas=pods, now=time.time())
        ranking, experiment = experiment_ranking(ranking, full.client_record,
                                                 lambda salt: self._draw(key, salt))
        if not ranking:  # explain with every executor, not only the prefiltered ones
            ranking = explained(ranking, full)
        if self._suspects:
            healthy = [c for c in ranking if c not in self._suspects]
            # All suspect: better to retry them than to give up.
            if healthy and len(healthy) < len(ranking):
                ranking = Ranking(
                    healthy + [c for c in ranking if c in self._suspects],
                    ranking.rejected, ranking.wake, ranking.criteria,
                )
        if ranking.wake:
            self._wake(ranking.wake)
        return ranking, arms, experiment

    async def select(self) -> Candidate:
        """The best candidate now; raises :class:`NoMatchingModel` with the reason."""
        ranking = await self.ranking()
        if not ranking:
            raise NoMatchingModel(self.client_id, ranking.explain())
        return ranking[0]

    def _wake(self, executors: list[str]) -> None:
        """Signal demand for cold executors we would prefer, once per snapshot."""
        todo = self._waking.due(executors, self._snap_at)
        if todo:
            self._spawn(self._waking.signal(todo))

    async def _wake_through_selector(self) -> str:
        return await self.tasks.wake(None if self._registered else self.criteria)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # -- calling models --------------------------------------------------------
    async def _wait_until_warm(self, executor: str, items: int, direct: bool) -> Candidate | None:
        """Poll the store until a cold executor has a live replica (or give up)."""
        self._waking.cold.ask([executor])
        deadline = time.monotonic() + self.cold_start_timeout
        while time.monotonic() < deadline:
            async with self._lock:
                await self._refresh()
            for c in await self.ranking(items, direct=direct):
                if c.executor_id == executor and c.warm:
                    return c
            await asyncio.sleep(0.5)
        return None

    async def _with_failover(self, call: Attempt[T], items: int = 1,
                             direct: bool | None = None, key: str | None = None,
                             shadow: bytes | None = None) -> tuple[T, Candidate, int]:
        """Call the best candidate, failing over; ``shadow``: the request's body, copied to
        a Shadow rollout's candidate once answered."""
        pods = self.direct if direct is None else direct
        ranking, arms, experiment = await self._routed(items, pods, key)
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
        queue = list(ranking[: self.max_attempts])
        while queue and len(attempts) < self.max_attempts:
            candidate = queue.pop(0)
            if not candidate.warm:
                await self._waking.signal([candidate.executor_id])
                warm = await self._wait_until_warm(candidate.executor_id, items, pods)
                if warm is None:
                    attempts.append((candidate.executor_id,
                                     f"cold start not done in {self.cold_start_timeout:g}s"))
                    continue
                candidate = warm
            started = time.perf_counter()
            try:
                result = await self._counted(candidate, call, items)
            except Retryable as exc:
                count_outcome(self._outcomes, candidate.executor_id, arms, experiment, ok=False,
                              ms=(time.perf_counter() - started) * 1000)
                attempts.append((candidate.executor_id, str(exc)))
                choice = arms.get(candidate.executor_id)
                if choice is not None and choice.arm == CANDIDATE:
                    # A new version failed this request: the stable one serves it instead,
                    # so a bad candidate costs no caller an error.
                    again = await self._routed(items, pods, key,
                                               frozenset({candidate.executor_id}))
                    queue[:0] = [c for c in again[0] if c.executor_id == candidate.executor_id
                                 and c.warm]
                    arms = {**arms, **again[1]}
                    continue
                self._suspects.add(candidate)
                log.warning("candidate failed client=%s executor=%s error=%s; failing over",
                            self.client_id, candidate.executor_id, exc)
                if candidate.replica is not None:
                    # Another replica of the same executor first, when it has a sound one.
                    reranked = (await self._routed(items, pods, key))[0]
                    queue[:0] = [c for c in reranked if c.executor_id == candidate.executor_id
                                 and c.warm and c not in self._suspects]
                continue
            count_outcome(self._outcomes, candidate.executor_id, arms, experiment, ok=True,
                          ms=(time.perf_counter() - started) * 1000)
            choice = arms.get(candidate.executor_id)
            if shadow is not None and choice is not None and choice.shadow and not self.read_only:
                self._shadow.send(choice, candidate.record.model, shadow, result,
                                  self._rng.random())
            return result, candidate, len(attempts) + 1
        raise AllCandidatesFailed(self.client_id, attempts)

    async def _counted(self, candidate: Candidate, call: Attempt[T], items: int = 1) -> T:
        """Call ``candidate`` counted as in flight (and as demand) in this instance's leases,
        and feed its time on the wire to the service-time model when it answers
        (:class:`~mulambda.sdk.counting.InflightCounter`, shared with the gateway). The
        store learns the counts (and the measurements) from the leases' writer."""
        wire = Wire()
        with self._counter.count(candidate, items) as request:
            result = await call(candidate, wire)
            # Only answers measure the model: a failure's time says nothing about it.
            request.answered(wire.ms())
            return result

    async def _predict(self, call: Attempt[Any], items: int = 1,
                       direct: bool | None = None, key: str | None = None,
                       shadow: bytes | None = None) -> Prediction:
        started = time.perf_counter()
        result, cand, n = await self._with_failover(call, items, direct, key, shadow)
        return Prediction(result, cand.executor_id, cand,
                          (time.perf_counter() - started) * 1000, n)

    def _attempt_timeout(self, given: float | None) -> float:
        """An attempt's bound: ``given``, else the client's ``timeout``."""
        if given is None:
            return self.timeout
        if not given > 0:  # 0 read as "not given" answered after the client's timeout
            raise ValueError(f"attempt_timeout must be > 0 seconds, got {given!r}")
        return given

    async def predict(
        self, instances: Sized, *, signature_name: str | None = None,
        attempt_timeout: float | None = None, key: str | None = None,
    ) -> Prediction:
        """POST ``{endpoint}/v1/models/{model}:predict`` to the best model, failing over.

        ``instances``: a list of inputs, or an array (numpy's, anything with a
        ``tolist()``); ``TypeError`` (NaN or an infinity: ``ValueError``) before
        any request when it cannot be JSON.
        ``attempt_timeout`` bounds each attempt (default: the client's
        ``timeout``); wrap the call in ``asyncio.timeout`` to bound the total.
        ``key`` (an end user, a session) keeps that caller in one arm of a
        rollout or an A/B experiment; without it each request draws anew.
        """
        body: dict[str, Any] = {"instances": instances}
        if signature_name:
            body["signature_name"] = signature_name
        timeout = self._attempt_timeout(attempt_timeout)
        encoded = json_body(body)  # before any attempt: an input JSON cannot hold fails here
        return await self._predict(lambda c, w: rest_predict(self.http, c, encoded, timeout, w),
                                   max(1, len(instances)), key=key, shadow=encoded)

    async def predict_grpc(
        self, inputs: dict[str, Any], *, signature_name: str = "serving_default",
        attempt_timeout: float | None = None, key: str | None = None,
    ) -> Prediction:
        """Predict over gRPC (TF Serving PredictionService); needs ``mulambda[grpc]``.

        ``inputs`` maps input tensor names to array-likes; the answer maps
        output names to numpy arrays. ``attempt_timeout`` bounds each attempt.
        """
        if self._grpc is None:
            self._grpc = GrpcTransport()
        grpc, timeout = self._grpc, self._attempt_timeout(attempt_timeout)
        # gRPC goes to the Service's gRPC port: no replica is picked.
        # Canary and experiment arms apply; shadow copies are REST only.
        return await self._predict(lambda c, _: grpc.predict(c, inputs, signature_name, timeout),
                                   direct=False, key=key)
