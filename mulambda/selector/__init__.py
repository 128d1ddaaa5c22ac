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

``GET /v1/explain/{namespace}/{client}``
    Why the client gets what it gets, as this process would route now
    (:mod:`mulambda.policy.explain`: every executor with the criterion that
    excluded it, or its expected latency in parts, accuracy, utilities and
    score; why the winner won; the near-equal candidates it would spread
    over). The query overrides the registered criteria as the gateway's does.
    Reads only. 404 unknown client, 400 bad parameters, 503 store unreachable.

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
and registered record) is read separately, single-flight per client (the
clients due in one turn of the event loop in one round trip), and
kept in a bounded LRU (1,024 clients, 100,000 samples); a name with neither
record nor samples is never kept, so made-up client names cost no memory.
This process's own requests are exact at every request. An answer is put
together from the JSON text of its candidates, kept per everything it says
(:mod:`mulambda.selector.answers`), and a body is decoded once per distinct
bytes; metric children are looked up once per label values; the process
collects garbage at raised thresholds (``GC_THRESHOLDS``). Store connections
come from a blocking pool (``MULAMBDA_REDIS_POOL_SIZE``, a request waits up to
``MULAMBDA_REDIS_POOL_TIMEOUT_SECONDS`` for one).

Request bounds (:mod:`mulambda.httpd`): a connection has ``--header-timeout``
seconds (10) to send its request line and headers (also the keep-alive idle
timeout) and a request ``--body-timeout`` seconds (15) to send its body,
else 408; bodies above 64 KiB (``/select``) or ``--max-body-bytes`` (the
gateway, 16 MiB) get 413; JSON nested deeper than 64 levels or with integers
longer than 100 digits gets 400. An executor's answer above
``--max-answer-bytes`` (64 MiB) is 502 (``answer_too_large``). Malformed
requests are logged at DEBUG without a traceback.
"""


from __future__ import annotations

import argparse
import gc
import logging
import os

from aiohttp import web

from mulambda import authz
from mulambda.cliargs import port
from mulambda.settings import SelectorSettings
from mulambda.store.metadata import MetadataStore

from .app import create_app, selector_server_options
from .service import (
    BODY_TIMEOUT_SECONDS,
    GATEWAY_MAX_ANSWER_BYTES,
    GATEWAY_MAX_BODY_BYTES,
    HEADER_TIMEOUT_SECONDS,
    SELECT_MAX_BODY_BYTES,
    SELECTOR_KEY,
)

log = logging.getLogger("mulambda.selector")

def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mulambda selector``; store settings default to MULAMBDA_* variables."""
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=port, default=8080, help="port to listen on")
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
    parser.add_argument("--max-answer-bytes", type=int, default=GATEWAY_MAX_ANSWER_BYTES,
                        help="largest executor answer the gateway passes on; larger gets "
                             "502 (default 64 MiB)")


# The garbage collector's thresholds for the selector process (Python's are 700, 10, 10).
# With hundreds of requests in flight, every 700 net allocations a collection walked their
# objects and promoted them, and a full collection of the whole heap (tens of ms) came
# every ten seconds or so: about 7 % of the CPU per request at 200 connections
# (bench/selector_load.py, gc.callbacks); at these thresholds under 1 %. Cyclic garbage
# still goes with the next young collection.
GC_THRESHOLDS = (10_000, 50, 50)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    gc.set_threshold(*GC_THRESHOLDS)
    settings = SelectorSettings.from_env()
    store = MetadataStore.from_url(args.redis_url or settings.shared.redis_url,
                                   prefix=args.key_prefix or settings.shared.key_prefix,
                                   pool_size=settings.redis_pool_size,
                                   pool_timeout=settings.redis_pool_timeout)
    app = create_app(store, cache_ttl=args.cache_ttl, predict_timeout=args.predict_timeout,
                     max_attempts=args.max_attempts,
                     cold_start_timeout=args.cold_start_timeout,
                     body_timeout=args.body_timeout, max_body_bytes=args.max_body_bytes,
                     max_answer_bytes=args.max_answer_bytes,
                     tasks=settings.tasks)

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
