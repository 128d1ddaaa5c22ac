"""Operator start-up: settings, clients in kopf's memo, handler registry, ``mulambda operator``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

import kopf
import kubernetes
import prometheus_client

from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.store.reader import SharedSnapshot
from mulambda.store.records import StoreUnavailable

from .client.handlers import register as register_clients
from .context import Context
from .k8s.api import KubeApi
from .k8s.session import bounded_login
from .modelexecutor.autoscale import Windows
from .modelexecutor.children import Children
from .modelexecutor.fleet import ERRORS, Fleet
from .modelexecutor.handlers import MODEL_EXECUTOR, ROLLOUT_ANALYSIS
from .modelexecutor.handlers import register as register_executors

FINALIZER = "mulambda.io/metadata"
WORKER_LIMIT = 256  # kopf workers at once, per watched kind (configure_kopf says why)
log = logging.getLogger(__name__)


HEARTBEAT_SECRET_MIN_BYTES = 16


def heartbeat_secret_from_env() -> bytes | None:
    """``MULAMBDA_HEARTBEAT_SECRET`` (from a Secret): what executors' heartbeat keys derive
    from. Unset, heartbeats are not signed, and that is said loudly; too short to be a
    secret, the operator does not start."""
    value = os.environ.get("MULAMBDA_HEARTBEAT_SECRET", "").strip()
    if not value:
        log.warning("MULAMBDA_HEARTBEAT_SECRET is not set: executors' heartbeats are NOT "
                    "signed, so any holder of the companions' store credential can point an "
                    "executor's traffic elsewhere (docs/security.md T2)")
        return None
    if len(value.encode()) < HEARTBEAT_SECRET_MIN_BYTES:
        raise SystemExit(f"MULAMBDA_HEARTBEAT_SECRET must be at least "
                         f"{HEARTBEAT_SECRET_MIN_BYTES} bytes (the chart generates 48)")
    return value.encode()


def build_registry(settings: Settings, namespaces: Sequence[str] = ()) -> kopf.OperatorRegistry:
    """The production registry: every handler, for the namespaces watched (none: all)."""
    registry = kopf.OperatorRegistry()
    register_all(registry, settings, namespaces)
    return registry


def register_all(registry: kopf.OperatorRegistry, settings: Settings,
                 namespaces: Sequence[str] = ()) -> None:
    """Login, start-up/clean-up and every resource handler (tests use this on fresh
    registries)."""

    @kopf.on.login(registry=registry)
    async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
        return await bounded_login(namespaces, **kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
        configure_kopf(settings)
        await asyncio.to_thread(load_kube_config)
        memo.locks = {}  # uid -> asyncio.Lock, see handling.serialized
        store = MetadataStore.from_url(app_settings.redis_url, app_settings.key_prefix)
        memo.ctx = Context(settings=app_settings, store=store, kube=KubeApi(),
                           windows=Windows(), snapshots=SharedSnapshot(store, ttl=1.0),
                           heartbeat_secret=heartbeat_secret_from_env())
        memo.pruner = asyncio.create_task(prune_forever(memo.ctx))
        # Filled by the executors' watch events (handlers.executor_cache) and by the
        # children's informers, which start here.
        memo.executors = {}
        memo.children = Children(namespaces)
        memo.children.informers.start()
        fleet = Fleet(memo.ctx, memo, MODEL_EXECUTOR, ROLLOUT_ANALYSIS, memo.executors,
                      memo.children.deployments, memo.children.services,
                      memo.children.complete)
        memo.fleet = [asyncio.create_task(fleet.autoscale_forever()),
                      asyncio.create_task(fleet.refresh_forever())]
        log.info("operator started redis=%s prefix=%s", _redact(app_settings.redis_url),
                 app_settings.key_prefix)

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        tasks = [t for t in [getattr(memo, "pruner", None), *getattr(memo, "fleet", [])] if t]
        for task in tasks:
            task.cancel()
        # Wait for them to end before their clients close: a tick still writing would
        # meet a closed API pool and log a failure at every shutdown.
        await _bounded_step("fleet tasks", asyncio.gather(*tasks, return_exceptions=True))
        children = getattr(memo, "children", None)
        if children is not None:
            await _bounded_step("informers stop", children.informers.stop())
        ctx = getattr(memo, "ctx", None)
        if ctx is not None:
            ctx.snapshots.close()
            await _bounded_step("store close", ctx.store.close())
            await _bounded_step("API client close", ctx.kube.close())

    app_settings = settings
    register_executors(registry, settings)
    register_clients(registry, settings)


# A shutdown step that takes longer is abandoned: a connection stuck in a request
# (seen once in CI: the cleanup never returned) must not keep the operator from exiting.
SHUTDOWN_STEP_SECONDS = 5.0


async def _bounded_step(what: str, step: Any) -> None:
    try:
        await asyncio.wait_for(step, SHUTDOWN_STEP_SECONDS)
    except TimeoutError:
        log.warning("shutdown step %s took over %gs; abandoned", what, SHUTDOWN_STEP_SECONDS)


async def prune_forever(ctx: Context) -> None:
    """Every heartbeat TTL, drop heartbeats and latency samples of pods that died."""
    while True:
        await asyncio.sleep(ctx.settings.heartbeat_ttl_seconds)
        try:
            removed = await ctx.store.prune_expired()
        except StoreUnavailable as exc:
            ERRORS.labels("store", "prune").inc()
            log.warning("prune skipped: %s", exc)
            continue
        except Exception:  # a bug here must not end pruning for good
            log.exception("prune failed")
            continue
        if removed:
            log.info("pruned expired store records count=%d", removed)


def load_kube_config() -> None:
    """In-cluster service account when running in a pod, else the kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


def configure_kopf(s: kopf.OperatorSettings) -> None:
    """kopf settings shared by production and tests."""
    # A finalizer with our own domain: it guards the metadata store record.
    s.persistence.finalizer = FINALIZER
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="mulambda.io")
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="mulambda.io", key="last-handled-configuration")
    # Only meaningful Events: the ones a reconcile returns are posted explicitly
    # (handling.apply); kopf's INFO log lines ("Handler ... succeeded") are not.
    s.posting.level = logging.WARNING
    s.watching.server_timeout = 300
    s.networking.request_timeout = 60
    # A backlog's memory is bounded, not one kopf worker per listed object at
    # once (each holding its body and copies until done: 720 MiB at 5,000).
    # Listing in pages keeps one page in memory; a capped worker pool takes
    # objects as slots free up. A worker that patched waits for its patched
    # version (at most persistence.consistency_timeout, 5 s) while the
    # watcher may be blocked on a free slot, so a slot turns over within 5 s
    # at worst: 256 slots keep >= 50 objects/s moving, above what the API
    # server gives one operator. Idle workers leave after 0.5 s instead of 5 s
    # so a finished object frees its slot.
    s.watching.chunk_size = 500
    s.queueing.worker_limit = WORKER_LIMIT
    s.queueing.idle_timeout = 0.5


def _redact(url: str) -> str:
    """Drop credentials from a URL before logging it."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="watch only these namespaces (repeatable; default: all)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="liveness endpoint URL (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=9090,
                        help="Prometheus /metrics port, 0 to disable (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    logging.getLogger().setLevel(settings.log_level.upper())
    registry = build_registry(settings, args.namespace)
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    asyncio.run(kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
    ))
    return 0
