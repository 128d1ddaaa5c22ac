"""``mulambda selector``: model selection over HTTP, for clients without the SDK.

API (JSON in, JSON out):

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
    store is unreachable.

``GET /healthz``
    200 when the store answers a PING, else 503.

``GET /metrics``
    Prometheus text format.

The selector cannot see when a client's request to the model ends, so it
counts every selection as demand (``P:demand:BUCKET``) but not as in-flight
load; clients that want load feedback use the SDK. Snapshots are cached per
client for ``--cache-ttl`` seconds, so a burst of selections costs one store
round trip per client per TTL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from mulambda.policy.selection import DEFAULT_POLICY, Criteria, Policy, rank
from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, Snapshot, StoreUnavailable

log = logging.getLogger("mulambda.selector")

STORE_KEY = web.AppKey("store", MetadataStore)


class _Selector:
    """State of one selector process: store, per-client snapshot cache, metrics."""

    def __init__(self, store: MetadataStore, cache_ttl: float, policy: Policy,
                 max_cached_clients: int = 1024) -> None:
        self.store = store
        self.cache_ttl = cache_ttl
        self.policy = policy
        self.max_cached = max_cached_clients
        self._cache: OrderedDict[str, tuple[float, Snapshot, ClientRecord | None]] = OrderedDict()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mulambda_selector_requests", "Selection requests by outcome",
            ["outcome"], registry=self.registry,
        )
        self._background: set[asyncio.Task[None]] = set()
        self.latency = Histogram(
            "mulambda_selector_selection_seconds", "Time to answer a selection request",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )

    def note_demand(self, executors: list[str], client: str) -> None:
        """Record demand without making the caller wait for the store."""

        async def write() -> None:
            try:
                await self.store.note_demand(executors)
            except StoreUnavailable as exc:  # demand is a hint; the answer still helps
                log.warning("demand not recorded client=%s error=%s", client, exc)

        task = asyncio.create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def view(self, client: str) -> tuple[Snapshot, ClientRecord | None]:
        """Snapshot and registered Client of ``client``, cached for ``cache_ttl``."""
        hit = self._cache.get(client)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.cache_ttl:
            self._cache.move_to_end(client)
            return hit[1], hit[2]
        snap = await self.store.snapshot(client)  # one round trip, with the Client's record
        record = snap.client_record
        self._cache[client] = (now, snap, record)
        self._cache.move_to_end(client)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return snap, record


SELECTOR_KEY = web.AppKey("selector", _Selector)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


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


async def select(request: web.Request) -> web.Response:
    sel = request.app[SELECTOR_KEY]
    started = time.perf_counter()
    client = unquote(request.match_info["client"])
    outcome = "error"
    try:
        try:
            body = await request.json() if request.can_read_body else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            outcome = "bad_request"
            return _error(400, f"body is not valid JSON: {exc}")
        try:
            snap, record = await sel.view(client)
        except StoreUnavailable as exc:
            outcome = "store_unavailable"
            log.warning("selection failed client=%s error=%s", client, exc)
            return _error(503, "metadata store unavailable")
        try:
            criteria = _criteria(body, record)
        except ValueError as exc:
            outcome = "bad_request"
            return _error(400, str(exc))
        ranking = rank(criteria, snap, client=client, now=time.time(), policy=sel.policy)
        if not ranking:
            outcome = "no_match"
            reason = ranking.explain()
            log.info("no match client=%s reason=%r", client, reason)
            return _error(404, "no matching model", reason=reason)
        best = ranking[0]
        sel.note_demand([best.executor_id, *ranking.wake], client)
        rec = best.record
        outcome = "selected"
        log.info("selected client=%s executor=%s score=%.3f warm=%s", client,
                 best.executor_id, best.score, best.warm)
        return web.json_response({
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


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE_KEY].ping()
    except StoreUnavailable as exc:
        return _error(503, "metadata store unavailable", detail=str(exc))
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    sel = request.app[SELECTOR_KEY]
    return web.Response(body=generate_latest(sel.registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(store: MetadataStore, *, cache_ttl: float = 0.5,
               policy: Policy = DEFAULT_POLICY) -> web.Application:
    """The selector's aiohttp application (the caller owns ``store``)."""
    app = web.Application()
    app[STORE_KEY] = store
    app[SELECTOR_KEY] = _Selector(store, cache_ttl, policy)
    app.router.add_post("/select/{client:.+}", select)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mulambda selector``; store settings default to MULAMBDA_* variables."""
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on")
    parser.add_argument("--redis-url", default=None, help="store URL (MULAMBDA_REDIS_URL)")
    parser.add_argument("--key-prefix", default=None, help="key prefix (MULAMBDA_KEY_PREFIX)")
    parser.add_argument("--cache-ttl", type=float, default=0.5,
                        help="seconds a client's snapshot is reused (default 0.5)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    settings = Settings.from_env()
    store = MetadataStore.from_url(args.redis_url or settings.redis_url,
                                   prefix=args.key_prefix or settings.key_prefix)
    app = create_app(store, cache_ttl=args.cache_ttl)

    async def close_store(_app: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(close_store)
    log.info("selector listening host=%s port=%d", args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    return 0
