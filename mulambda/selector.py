"""``mulambda selector``: model selection over HTTP, and a gateway that routes predictions.

API (JSON in, JSON out; every JSON answer is strict JSON, never ``NaN``):

``POST /v1/predict/{namespace}/{client}``
    The gateway, for clients that cannot embed the SDK. The body is a TF
    Serving REST predict body (``{"instances": [...]}`` or ``{"inputs":
    ...}``), forwarded as is to the best executor for the client (the
    Client registered as ``namespace/client``; query parameters ``type``,
    ``input``, ``output``, ``latency``, ``accuracy``, ``max_latency_ms``,
    ``min_accuracy``, ``cold_start`` override its criteria, and give them
    when the client is not registered) at
    ``/v1/models/MODEL:predict``. The answer is the executor's (status,
    body, content type) with headers ``X-Mulambda-Executor``,
    ``X-Mulambda-Replica`` and ``X-Mulambda-Attempts``.

    The gateway sees load the way the SDK does: it picks a replica (its pod
    IP from the heartbeat, else the executor's Service), counts its own
    requests in flight per replica exactly, publishes them as in-flight
    leases (so SDKs, other selector replicas and the autoscaler see them),
    times every answer and feeds the service-time model
    (:mod:`mulambda.policy.latency`, published to ``P:service``). A connect
    failure or a 503 moves on to another executor (at most
    ``--max-attempts``; the failed replica is avoided for a few seconds);
    another error answer is passed through, a timeout is 504, a broken
    connection 502. With only cold candidates (or ``cold_start: Wait`` and
    a better cold one) it signals demand and waits up to
    ``--cold-start-timeout`` for a replica, measuring the cold start;
    otherwise 503. Network latency is the client's, as
    the companions measure it to the client's probe URL: right when the
    selector runs near its clients (the extra hop is not in the estimate).
    Errors of its own: 400 (body not
    JSON, bad criteria), 404 (``unknown client``, ``no matching model``
    with the reason), 502 ``{"error": "all candidates failed", "attempts":
    [...]}``, 503 (store unreachable).

``POST /select/{client}``
    ``client`` is the client id ``NAMESPACE/NAME`` (the slash may appear
    literally or as ``%2F``). Body, the MuLambda prototype's shape::

        {"required": {"type": "vision", "input": "image", "output": "label",
                      "max_latency_ms": 50, "min_accuracy": 0.8},
         "desired": {"latency": 1, "accuracy": 2},
         "data_length": 1024}

    Every field is optional when the client is registered (its Client
    resource gives the defaults; the request overrides them). ``data_length``
    (bytes of the payload) is validated and logged but not used for ranking
    yet. Answers 200::

        {"endpoint": "http://...:8501", "grpc": "...:8500",
         "model": {"executor": "ns/name", "name": ..., "version": ..., "type": ...,
                   "input": ..., "output": ..., "accuracy": ..., "score": ...,
                   "expected_latency_ms": ..., "warm": true, "reason": "..."},
         "candidates": [{"executor": ..., "score": ..., "reason": ...}, ...]}

    404 ``{"error": "no matching model", "reason": "..."}`` when nothing
    matches; 400 ``{"error": "..."}`` on bad JSON or bad fields; 503 when the
    store is unreachable. The selector cannot see when the client's request
    ends, so each answer counts, in this process only, as one request in
    flight on the chosen executor for its expected latency: a burst of
    selections spreads instead of all getting the same answer. Clients that
    want measured load use the SDK or the gateway.

``GET /healthz``
    200 when the store answers a PING, else 503.

``GET /metrics``
    Prometheus text format.

Every selection is counted as demand (``P:demand:BUCKET``) for the
autoscaler: queued, coalesced and written off the request path in one
pipeline every half second; a failed write is retried with the next one, and
demand that cannot be written (queue full, too old, still queued at
shutdown) is counted in ``mulambda_selector_demand_dropped_total``.

Capacity: one snapshot of the store-wide keys (executors, replicas, load,
service times) serves every client; it is read again once it is
``--cache-ttl`` seconds old, single-flight (requests that find it old wait for
the one read in progress). The per-client part (the client's latency samples
and registered record) is read separately, single-flight per client, and
kept in a bounded LRU (1,024 clients, 100,000 samples); a name with neither
record nor samples is never kept, so made-up client names cost no memory.
This process's own requests are exact at every request. Store connections
come from a blocking pool (``MULAMBDA_REDIS_POOL_SIZE``, a request waits up to
``MULAMBDA_REDIS_POOL_TIMEOUT_SECONDS`` for one).

Request bounds (:mod:`mulambda.httpd`): a connection has ``--header-timeout``
seconds (10) to send its request line and headers (also the keep-alive idle
timeout) and a request ``--body-timeout`` seconds (15) to send its body,
else 408; bodies above 64 KiB (``/select``) or ``--max-body-bytes`` (the
gateway, 16 MiB) get 413; JSON nested deeper than 64 levels or with integers
longer than 100 digits gets 400. Malformed requests are logged at DEBUG
without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import heapq
import json
import logging
import math
import os
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from mulambda import authz
from mulambda.httpd import (
    BodyTimeout,
    BodyTooLarge,
    loads_guarded,
    read_body,
    refuse,
    server_options,
)
from mulambda.policy.latency import OwnRequests, ServiceTracker
from mulambda.policy.selection import (
    DEFAULT_POLICY,
    Candidate,
    Criteria,
    Policy,
    Ranking,
    overlay,
    rank,
)
from mulambda.settings import SelectorSettings
from mulambda.store.leases import InflightLeases, InflightReader
from mulambda.store.metadata import (
    DEMAND_BUCKET_SECONDS,
    DEMAND_TTL_SECONDS,
    MetadataStore,
    _bucket,
)
from mulambda.store.records import ClientRecord, LatencySample, Snapshot, StoreUnavailable

log = logging.getLogger("mulambda.selector")

STORE_KEY = web.AppKey("store", MetadataStore)
_dumps = functools.partial(json.dumps, allow_nan=False)

# An answered selection counts as in flight for its expected latency, at most this long.
VIRTUAL_INFLIGHT_MAX_SECONDS = 10.0
# Request bounds (mulambda.httpd): a /select body is a few hundred bytes; a gateway body
# is a TF Serving request (images: megabytes).
SELECT_MAX_BODY_BYTES = 64 << 10
GATEWAY_MAX_BODY_BYTES = 16 << 20
HEADER_TIMEOUT_SECONDS = 10.0
BODY_TIMEOUT_SECONDS = 15.0


class SharedSnapshot:
    """The store-wide part of a snapshot (executors, replicas, load, service times), one
    for every client, refreshed single-flight: requests that find it older than they
    accept wait for one refresh, never start their own."""

    def __init__(self, store: MetadataStore, ttl: float, exclude_instance: str,
                 on_refresh: Callable[[Snapshot], None] | None = None) -> None:
        self.store = store
        self.ttl = ttl
        self.exclude_instance = exclude_instance
        self.on_refresh = on_refresh
        self.refreshes = 0  # store reads started
        self._snap: Snapshot | None = None
        self._at = -math.inf
        self._pending: asyncio.Future[Snapshot] | None = None

    async def get(self, max_age: float | None = None) -> Snapshot:
        """A snapshot taken less than ``max_age`` (default ``ttl``) seconds ago."""
        age = self.ttl if max_age is None else max_age
        if self._snap is not None and time.monotonic() - self._at < age:
            return self._snap
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._refresh())
            self._pending.add_done_callback(_retrieve)
        # shield: one waiter's cancellation must not cancel the read the others wait for.
        return await asyncio.shield(self._pending)

    async def _refresh(self) -> Snapshot:
        started = time.monotonic()
        self.refreshes += 1
        try:
            snap = await self.store.snapshot(None, exclude_instance=self.exclude_instance)
        finally:
            self._pending = None
        self._snap, self._at = snap, started
        if self.on_refresh is not None:
            self.on_refresh(snap)
        return snap

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Retrieve the failure of a shared read nobody waits for any more."""
    if not future.cancelled():
        future.exception()


ClientPart = tuple[dict[str, dict[str, LatencySample]], ClientRecord | None]


class ClientViews:
    """The per-client part of a snapshot (latency samples, registered record), in a
    bounded LRU, read single-flight per client.

    Bounded whatever the number of client names callers make up: a name with
    neither a record nor a sample (unknown) is never kept; at most
    ``max_clients`` clients and ``max_samples`` samples in all are kept, each
    client's read keeping at most ``max_client_samples``.
    """

    def __init__(self, store: MetadataStore, ttl: float, *, max_clients: int = 1024,
                 max_samples: int = 100_000, max_client_samples: int = 4096) -> None:
        self.store = store
        self.ttl = ttl
        self.max_clients = max_clients
        self.max_samples = max_samples
        self.max_client_samples = max_client_samples
        self.samples = 0  # samples kept in all
        # client -> (monotonic time read, part, samples in it)
        self._lru: OrderedDict[str, tuple[float, ClientPart, int]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[ClientPart]] = {}

    def __len__(self) -> int:
        return len(self._lru)

    async def get(self, client: str, max_age: float | None = None) -> ClientPart:
        age = self.ttl if max_age is None else max_age
        hit = self._lru.get(client)
        if hit is not None and time.monotonic() - hit[0] < age:
            self._lru.move_to_end(client)
            return hit[1]
        pending = self._pending.get(client)
        if pending is None:
            pending = asyncio.ensure_future(self._read(client))
            pending.add_done_callback(_retrieve)
            self._pending[client] = pending
        return await asyncio.shield(pending)

    async def _read(self, client: str) -> ClientPart:
        started = time.monotonic()
        try:
            part = await self.store.client_view(client, max_samples=self.max_client_samples)
        finally:
            self._pending.pop(client, None)
        self._forget(client)
        latency, record = part
        if record is not None or latency:
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
        for pending in list(self._pending.values()):
            pending.cancel()


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


class _Selector:
    """State of one selector process: store, snapshot cache, own load and measurements."""

    def __init__(self, store: MetadataStore, cache_ttl: float, policy: Policy, *,
                 predict_timeout: float = 30.0, max_attempts: int = 3,
                 cold_start_timeout: float = 30.0, suspect_seconds: float = 5.0,
                 max_cached_clients: int = 1024, demand_interval: float = 0.5,
                 body_timeout: float = 15.0, max_body_bytes: int = 16 << 20) -> None:
        self.store = store
        self.cache_ttl = cache_ttl
        self.policy = policy
        self.predict_timeout = predict_timeout
        self.max_attempts = max(1, max_attempts)
        self.cold_start_timeout = cold_start_timeout
        self.suspect_seconds = suspect_seconds
        self.body_timeout = body_timeout
        self.max_body_bytes = max_body_bytes
        self.instance = f"selector-{uuid.uuid4().hex[:12]}"
        self.shared = SharedSnapshot(store, cache_ttl, self.instance, self._refreshed)
        self.clients = ClientViews(store, cache_ttl, max_clients=max_cached_clients)
        self.tracker = ServiceTracker(policy.fit)
        self.leases = InflightLeases(store, self.instance, service=self.tracker)
        self.load = InflightReader(store, self.instance)
        # Own requests (forwarded ones, and /select answers while they last): when sent,
        # how long they should stay at the executor.
        self.own = OwnRequests()
        self.suspect: dict[tuple[str, str], float] = {}  # (executor, pod) -> monotonic deadline
        self.waking: dict[str, float] = {}  # cold executor -> monotonic time demand was sent
        self.rng = random.Random()
        self._virtual: list[tuple[float, int]] = []  # (monotonic expiry, own token) heap
        self.http: aiohttp.ClientSession | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mulambda_selector_requests", "Selection requests by outcome",
            ["outcome"], registry=self.registry,
        )
        self.predictions = Counter(
            "mulambda_gateway_requests", "Gateway predictions by outcome",
            ["outcome"], registry=self.registry,
        )
        self.latency = Histogram(
            "mulambda_selector_selection_seconds", "Time to answer a selection request",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.gateway_latency = Histogram(
            "mulambda_gateway_seconds", "Time to answer a prediction through the gateway",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.demand = DemandQueue(store, self.registry, interval=demand_interval)
        self.refreshes = Counter(
            "mulambda_selector_snapshot_refreshes", "Shared snapshots read from the store",
            registry=self.registry)

    # -- background store writes ---------------------------------------------------
    def note_demand(self, executors: list[str], cold: list[str] | None = None) -> None:
        """Record demand without making the caller wait for the store (queued, written
        in batches); ``cold`` ones (asked to wake) have their cold start measured when
        they come up."""
        now = time.monotonic()
        for e in cold or ():
            self.waking.setdefault(e, now)
        self.demand.add(executors)

    async def close(self) -> None:
        self.shared.close()
        self.clients.close()
        await self.demand.close()
        await self.leases.close()
        self.load.close()
        if self.http is not None:
            await self.http.close()

    # -- snapshots -------------------------------------------------------------------
    async def view(self, client: str, fresh: bool = False) -> Snapshot:
        """Snapshot for ``client``: the shared part (one for all clients, at most
        ``cache_ttl`` old, refreshed single-flight) with the client's own part (its
        latency samples and registered record, cached in a bounded LRU). This
        process's leases and measurements are left out (:meth:`ranking` adds them).
        ``fresh``: both parts read after this call started (or joined a read in
        progress)."""
        max_age = 0.0 if fresh else None
        shared, (latency, record) = await asyncio.gather(
            self.shared.get(max_age), self.clients.get(client, max_age))
        return replace(shared, latency=latency, client_record=record)

    def _refreshed(self, snap: Snapshot) -> None:
        self.refreshes.inc()
        self._note_woken(snap)

    def _note_woken(self, snap: Snapshot) -> None:
        """An executor we asked to wake that now has a live replica: its cold start."""
        if not self.waking:
            return
        now = time.monotonic()
        for executor, asked in list(self.waking.items()):
            if any(r.state == "Available" for r in snap.replicas.get(executor, ())):
                self.tracker.observe_cold_start(executor, (now - asked) * 1000)
                self.leases.kick()
                del self.waking[executor]
            elif now - asked > max(self.cold_start_timeout, 600.0):
                del self.waking[executor]

    async def ranking(self, criteria: Criteria, snap: Snapshot, client: str, *,
                      items: int = 1, replicas: bool = False) -> Ranking:
        """Rank with this process's own requests in flight and measurements added, and
        everybody else's requests in flight read fresh."""
        now = time.monotonic()
        while self._virtual and self._virtual[0][0] <= now:
            self.own.remove(heapq.heappop(self._virtual)[1])
        others = await self.load.read()
        own, own_pods = self.own.ahead(now * 1000)
        view = overlay(snap, own_inflight=own, replica_inflight=own_pods,
                       service=self.tracker.stats,
                       inflight=others[0] if others is not None else None,
                       inflight_requests=others[1] if others is not None else None)
        return rank(criteria, view, client=client, policy=self.policy, items=items,
                    rng=self.rng, replicas=replicas, now=time.time())

    def count_selection(self, candidate: Candidate) -> None:
        """A /select answer: one request of ours on its way, for its expected latency."""
        seconds = min(candidate.expected_latency_ms / 1000, VIRTUAL_INFLIGHT_MAX_SECONDS)
        now = time.monotonic()
        token = self.own.add(candidate.executor_id, None, now * 1000,
                             candidate.service_ms + candidate.load_ms, candidate.network_ms)
        heapq.heappush(self._virtual, (now + seconds, token))

    # -- forwarding ------------------------------------------------------------------
    def is_suspect(self, candidate: Candidate) -> bool:
        if not self.suspect:
            return False
        now = time.monotonic()
        self.suspect = {k: t for k, t in self.suspect.items() if t > now}
        pod = candidate.replica.pod if candidate.replica is not None else ""
        return (candidate.executor_id, pod) in self.suspect

    def distrust(self, candidate: Candidate) -> None:
        pod = candidate.replica.pod if candidate.replica is not None else ""
        self.suspect[(candidate.executor_id, pod)] = time.monotonic() + self.suspect_seconds

    async def forward(self, candidate: Candidate, body: bytes, items: int) -> tuple[
        int, bytes, str
    ]:
        """POST ``body`` to the candidate, counted in flight; (status, body, content type).

        Raises aiohttp errors and TimeoutError; a 200 feeds the service-time model.
        """
        assert self.http is not None
        executor = candidate.executor_id
        pod = candidate.replica.pod if candidate.replica is not None else None
        url = f"{candidate.url.rstrip('/')}/v1/models/{candidate.record.model}:predict"
        stay, net = candidate.service_ms + candidate.load_ms, candidate.network_ms
        sent = time.time()
        lease = self.leases.start(executor, timing=(
            pod or "", sent + (net / 2 + stay) / 1000, sent + (net + stay) / 1000))
        token = self.own.add(executor, pod, time.monotonic() * 1000, stay, net)
        started = time.perf_counter()
        try:
            async with self.http.post(
                url, data=body, headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.predict_timeout,
                                              sock_connect=min(5.0, self.predict_timeout)),
            ) as resp:
                payload = await resp.read()
                status, ctype = resp.status, resp.headers.get("Content-Type",
                                                              "application/json")
            if status == 200:
                self.tracker.observe(
                    executor, inflight=candidate.inflight, items=items,
                    elapsed_ms=(time.perf_counter() - started) * 1000,
                    network_ms=candidate.network_ms,
                    predicted_ms=candidate.service_ms + candidate.load_ms)
            return status, payload, ctype
        finally:
            self.own.remove(token)
            self.leases.finish(executor, token=lease)


SELECTOR_KEY = web.AppKey("selector", _Selector)


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None
          ) -> web.Response:
    """A strict JSON answer: a non-finite number is a bug, answered as 500, never ``NaN``."""
    try:
        text = _dumps(data)
    except ValueError as exc:
        log.error("answer not representable as JSON error=%s", exc)
        text, status = _dumps({"error": "internal error: non-finite number in answer"}), 500
    return web.Response(text=text, status=status, content_type="application/json",
                        headers=headers)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status=status)


def _bad_body(exc: Exception) -> tuple[str, web.Response]:
    """(outcome, answer) for a body that cannot be used: 413, 408 (both close the
    connection: the body was not read to its end) or 400; never a traceback."""
    if isinstance(exc, BodyTooLarge):
        return "too_large", refuse(413, str(exc))
    if isinstance(exc, BodyTimeout):
        return "body_timeout", refuse(408, str(exc))
    return "bad_request", _error(400, f"body is not valid JSON: {exc}")


def _criteria(body: Any, record: ClientRecord | None) -> Criteria:
    """Criteria from a request body and the registered client; ValueError when bad."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    required = body.get("required") or {}
    desired = body.get("desired") or {}
    if not isinstance(required, dict) or not isinstance(desired, dict):
        raise ValueError("required and desired must be JSON objects")
    length = body.get("data_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or length < 0):
        raise ValueError("data_length must be a non-negative integer")
    base = record.criteria if record is not None else None
    if base is None and not required.get("type"):
        raise ValueError("required.type is missing and the client is not registered")
    return Criteria.from_request(required, desired, base)


_QUERY_NUMBERS = {"latency": "desired", "accuracy": "desired", "max_latency_ms": "required",
                  "min_accuracy": "required"}
_QUERY_TEXT = ("type", "input", "output", "cold_start")


def _query_criteria(query: Mapping[str, str], record: ClientRecord | None) -> Criteria:
    """Criteria of a gateway request: the registered client, overridden by the query."""
    required: dict[str, Any] = {k: query[k] for k in _QUERY_TEXT if query.get(k)}
    desired: dict[str, Any] = {}
    for name, where in _QUERY_NUMBERS.items():
        if query.get(name):
            try:
                value = float(query[name])
            except ValueError:
                raise ValueError(f"query parameter {name} must be a number") from None
            (required if where == "required" else desired)[name] = value
    base = record.criteria if record is not None else None
    return Criteria.from_request(required, desired, base)


def _items(payload: Any) -> int:
    """How many items a TF Serving predict body carries (1 when it does not say)."""
    if isinstance(payload, dict):
        for key in ("instances", "inputs"):
            value = payload.get(key)
            if isinstance(value, list):
                return max(1, len(value))
            if isinstance(value, dict):
                first = next(iter(value.values()), None)
                if isinstance(first, list):
                    return max(1, len(first))
    return 1


async def select(request: web.Request) -> web.Response:
    sel = request.app[SELECTOR_KEY]
    started = time.perf_counter()
    client = unquote(request.match_info["client"])
    outcome = "error"
    try:
        try:
            raw = await read_body(request, min(SELECT_MAX_BODY_BYTES, sel.max_body_bytes),
                                  sel.body_timeout)
            body = loads_guarded(raw) if raw.strip() else {}
        except (BodyTooLarge, BodyTimeout, ValueError) as exc:
            outcome, answer = _bad_body(exc)
            return answer
        try:
            snap = await sel.view(client)
        except StoreUnavailable as exc:
            outcome = "store_unavailable"
            log.warning("selection failed client=%s error=%s", client, exc)
            return _error(503, "metadata store unavailable")
        try:
            criteria = _criteria(body, snap.client_record)
        except ValueError as exc:
            outcome = "bad_request"
            return _error(400, str(exc))
        ranking = await sel.ranking(criteria, snap, client)
        if not ranking:
            outcome = "no_match"
            reason = ranking.explain()
            log.info("no match client=%s reason=%r", client, reason)
            return _error(404, "no matching model", reason=reason)
        best = ranking[0]
        if best.warm:
            sel.count_selection(best)
        sel.note_demand([best.executor_id, *ranking.wake], ranking.wake)
        rec = best.record
        outcome = "selected"
        log.info("selected client=%s executor=%s score=%.3f warm=%s", client,
                 best.executor_id, best.score, best.warm)
        return _json({
            "endpoint": rec.rest,
            "grpc": rec.grpc,
            "model": {
                "executor": best.executor_id, "name": rec.model, "version": rec.version,
                "type": rec.type, "input": rec.input, "output": rec.output,
                "accuracy": rec.accuracy, "score": best.score,
                "expected_latency_ms": round(best.expected_latency_ms, 3),
                "warm": best.warm, "reason": best.reason,
            },
            "candidates": [
                {"executor": c.executor_id, "endpoint": c.record.rest, "score": c.score,
                 "warm": c.warm, "reason": c.reason}
                for c in ranking[:5]
            ],
        })
    finally:
        sel.requests.labels(outcome=outcome).inc()
        sel.latency.observe(time.perf_counter() - started)


async def _warm_candidate(sel: _Selector, criteria: Criteria, client: str, executor: str,
                          items: int) -> Candidate | None:
    """Wait for a cold executor to get a live replica (demand was signalled); None on
    timeout."""
    deadline = time.monotonic() + sel.cold_start_timeout
    while time.monotonic() < deadline:
        snap = await sel.view(client, fresh=True)
        for c in await sel.ranking(criteria, snap, client, items=items, replicas=True):
            if c.executor_id == executor and c.warm:
                return c
        await asyncio.sleep(0.5)
    return None


async def predict(request: web.Request) -> web.StreamResponse:
    sel = request.app[SELECTOR_KEY]
    started = time.perf_counter()
    client = f"{request.match_info['namespace']}/{request.match_info['client']}"
    outcome = "error"
    try:
        try:
            body = await read_body(request, sel.max_body_bytes, sel.body_timeout)
            items = _items(loads_guarded(body))
        except (BodyTooLarge, BodyTimeout, ValueError) as exc:
            outcome, answer = _bad_body(exc)
            return answer
        try:
            snap = await sel.view(client)
        except StoreUnavailable as exc:
            outcome = "store_unavailable"
            log.warning("prediction failed client=%s error=%s", client, exc)
            return _error(503, "metadata store unavailable")
        if snap.client_record is None and not request.query.get("type"):
            outcome = "unknown_client"
            return _error(404, "unknown client", reason=f"client {client!r} is not registered "
                          "and the query gives no type")
        try:
            criteria = _query_criteria(request.query, snap.client_record)
        except ValueError as exc:
            outcome = "bad_request"
            return _error(400, str(exc))
        attempts: list[dict[str, str]] = []
        tried: set[str] = set()
        while len(attempts) < sel.max_attempts:
            ranking = await sel.ranking(criteria, snap, client, items=items, replicas=True)
            if not ranking and not attempts:
                outcome = "no_match"
                return _error(404, "no matching model", reason=ranking.explain())
            left = [c for c in ranking if c.executor_id not in tried]
            healthy = [c for c in left if not sel.is_suspect(c)] or left
            if not healthy:
                break
            warm = [c for c in healthy if c.warm]
            if ranking.wake:
                sel.note_demand(ranking.wake, ranking.wake)
            if warm and (criteria.cold_start == "UseWarm" or healthy[0].warm):
                candidate = warm[0]
            else:
                cold = healthy[0]
                sel.note_demand([cold.executor_id], [cold.executor_id])
                found = await _warm_candidate(sel, criteria, client, cold.executor_id, items)
                if found is None:
                    outcome = "cold_start_timeout"
                    return _error(503, "cold start not done", executor=cold.executor_id,
                                  waited_seconds=sel.cold_start_timeout)
                candidate = found
            tried.add(candidate.executor_id)
            try:
                status, payload, ctype = await sel.forward(candidate, body, items)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                attempts.append({"executor": candidate.executor_id,
                                 "error": f"connect failed: {exc}"})
                sel.distrust(candidate)
                continue
            except TimeoutError:
                outcome = "timeout"
                return _error(504, "executor timed out", executor=candidate.executor_id,
                              timeout_seconds=sel.predict_timeout)
            except aiohttp.ClientError as exc:
                outcome = "upstream_error"
                return _error(502, "executor connection failed", executor=candidate.executor_id,
                              detail=str(exc))
            if status == 503:
                attempts.append({"executor": candidate.executor_id, "error": "HTTP 503"})
                sel.distrust(candidate)
                continue
            outcome = "ok" if status == 200 else f"http_{status // 100}xx"
            headers = {
                "X-Mulambda-Executor": candidate.executor_id,
                "X-Mulambda-Attempts": str(len(attempts) + 1),
            }
            if candidate.replica is not None:
                headers["X-Mulambda-Replica"] = candidate.replica.pod
            return web.Response(body=payload, status=status, headers=headers,
                                content_type=ctype.split(";")[0].strip() or None)
        outcome = "all_failed"
        log.warning("all candidates failed client=%s attempts=%s", client, attempts)
        return _error(502, "all candidates failed", attempts=attempts)
    finally:
        sel.predictions.labels(outcome=outcome).inc()
        sel.gateway_latency.observe(time.perf_counter() - started)


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE_KEY].ping()
    except StoreUnavailable as exc:
        return _error(503, "metadata store unavailable", detail=str(exc))
    return _json({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    sel = request.app[SELECTOR_KEY]
    return web.Response(body=generate_latest(sel.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(store: MetadataStore, *, cache_ttl: float = 0.5,
               policy: Policy = DEFAULT_POLICY, predict_timeout: float = 30.0,
               max_attempts: int = 3, cold_start_timeout: float = 30.0,
               suspect_seconds: float = 5.0, body_timeout: float = BODY_TIMEOUT_SECONDS,
               max_body_bytes: int = GATEWAY_MAX_BODY_BYTES,
               max_cached_clients: int = 1024, demand_interval: float = 0.5,
               middlewares: Iterable[Any] = ()) -> web.Application:
    """The selector's aiohttp application (the caller owns ``store``).

    ``middlewares`` run before every handler, in order (caller authorization goes
    here). Serve it with :func:`server_options` (the header timeout and header
    bounds are the server's, not the application's).
    """
    app = web.Application(middlewares=list(middlewares), client_max_size=max_body_bytes)
    app[STORE_KEY] = store
    sel = _Selector(store, cache_ttl, policy, predict_timeout=predict_timeout,
                    max_attempts=max_attempts, cold_start_timeout=cold_start_timeout,
                    suspect_seconds=suspect_seconds, body_timeout=body_timeout,
                    max_body_bytes=max_body_bytes, max_cached_clients=max_cached_clients,
                    demand_interval=demand_interval)
    app[SELECTOR_KEY] = sel

    async def open_http(_app: web.Application) -> None:
        # Pooled connections: a TCP handshake per prediction would cost more than selection.
        sel.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         auto_decompress=False)

    async def close(_app: web.Application) -> None:
        await sel.close()

    app.on_startup.append(open_http)
    app.on_cleanup.append(close)
    app.router.add_post("/v1/predict/{namespace}/{client}", predict)
    app.router.add_post("/select/{client:.+}", select)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def selector_server_options(header_timeout: float = HEADER_TIMEOUT_SECONDS) -> dict[str, Any]:
    """``web.AppRunner`` / ``web.run_app`` arguments the selector is served with: a
    connection that has not sent a complete request line and headers within
    ``header_timeout`` seconds is closed (also the keep-alive idle timeout)."""
    return server_options(header_timeout=header_timeout)


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mulambda selector``; store settings default to MULAMBDA_* variables."""
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("--redis-url", default=None, help="store URL (MULAMBDA_REDIS_URL)")
    parser.add_argument("--key-prefix", default=None, help="key prefix (MULAMBDA_KEY_PREFIX)")
    parser.add_argument("--cache-ttl", type=float, default=0.5,
                        help="seconds a client's snapshot is reused (default 0.5)")
    parser.add_argument("--predict-timeout", type=float, default=30.0,
                        help="seconds the gateway waits for an executor's answer (default 30)")
    parser.add_argument("--max-attempts", type=int, default=3,
                        help="executors the gateway tries per prediction (default 3)")
    parser.add_argument("--cold-start-timeout", type=float, default=30.0,
                        help="seconds the gateway waits for a cold executor (default 30)")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_SECONDS,
                        help="seconds a connection has to send a request's headers, and "
                             f"to stay idle (default {HEADER_TIMEOUT_SECONDS:g})")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_SECONDS,
                        help="seconds a request has to send its body; slower gets 408 "
                             f"(default {BODY_TIMEOUT_SECONDS:g})")
    parser.add_argument("--max-body-bytes", type=int, default=GATEWAY_MAX_BODY_BYTES,
                        help="largest gateway body; larger gets 413 (default 16 MiB; "
                             f"/select bodies at most {SELECT_MAX_BODY_BYTES} bytes)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    settings = SelectorSettings.from_env()
    store = MetadataStore.from_url(args.redis_url or settings.shared.redis_url,
                                   prefix=args.key_prefix or settings.shared.key_prefix,
                                   pool_size=settings.redis_pool_size,
                                   pool_timeout=settings.redis_pool_timeout)
    app = create_app(store, cache_ttl=args.cache_ttl, predict_timeout=args.predict_timeout,
                     max_attempts=args.max_attempts,
                     cold_start_timeout=args.cold_start_timeout,
                     body_timeout=args.body_timeout, max_body_bytes=args.max_body_bytes)

    # Callers prove who they are with a ServiceAccount token; the API server
    # says whether they may select the Client (mulambda.authz). None when
    # MULAMBDA_SELECTOR_AUTH=false, which it warns about loudly.
    authorizer = authz.from_settings(settings.shared.selector_auth, os.environ)
    if authorizer is not None:
        authz.install(app, authorizer)
        authorizer.register_metrics(app[SELECTOR_KEY].registry)

    async def close_store(_app: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(close_store)
    log.info("selector listening host=%s port=%d auth=%s", args.host, args.port,
             "on" if authorizer is not None else "OFF")
    web.run_app(app, host=args.host, port=args.port, print=None,
                **selector_server_options(args.header_timeout))
    return 0
