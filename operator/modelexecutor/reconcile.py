"""Reconciling one ModelExecutor: children, metadata store record, status.

Called from the create/update/resume handlers and from the fleet-wide
refresh (``fleet.py``), so every step is idempotent: get-or-create,
compare-then-patch, and a status update with only what changed (derived in
``status.py``). The refresh passes what it already read (``Observed.cache``:
the children from the watch caches, the heartbeats from one store read for
the fleet): no GET while the cached children need no change, and the store
record is written only when it differs from the one last written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from mulambda.api.modelexecutor import ModelExecutorSpec
from mulambda.policy.rollout import Route
from mulambda.store.records import ExecutorRecord, ReplicaRecord, StoreUnavailable
from mulambda.tasks.queue import TaskQueue

from ..context import Context, Logger, Observed, forget_records, store_retry
from ..k8s.children import NameConflict, Rejected, create_once, ensure_deployment, ensure_service
from ..k8s.objects import ObjectRef
from ..status import Event, Problem, StatusUpdate
from .build import build_deployment, build_heartbeat_secret, build_service, endpoints
from .heartbeats import counted, heartbeat_key, heartbeat_secret, heartbeat_seed
from .rollout import Observations, advance, observe, reconcile_rollout, rollout_update, stable_spec
from .status import Rollout, executor_state, executor_status, model_report


def _bounded_replicas(spec: ModelExecutorSpec) -> Callable[[int | None], int]:
    """Replicas policy: start at minReplicas, afterwards keep what the autoscaler set
    but never outside [minReplicas, maxReplicas]."""

    def bound(current: int | None) -> int:
        if current is None:
            return spec.scaling.min_replicas
        return max(spec.scaling.min_replicas, min(spec.scaling.max_replicas, current))

    return bound


async def ensure_children(
    ctx: Context, executor: ObjectRef, spec: ModelExecutorSpec, logger: Logger,
    cache: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[Event]]:
    """Deployment and Service of an executor: the Deployment, and an Event per change.

    ``cache`` may hold the children as the watch caches have them; with
    ``indexed`` true, a child they lack does not exist."""
    name, ns = executor.name, executor.namespace
    cache = cache or {}
    indexed = bool(cache.get("indexed"))
    secret = heartbeat_secret(ctx, executor)
    seed = heartbeat_seed(ctx, executor)
    if seed is not None and cache.get("deployment") is None:
        # Before its first pod, so the pod finds it; once the Deployment exists, a
        # refresh from the watch caches does not ask again.
        if await create_once(ctx.kube, executor, build_heartbeat_secret(name, ns, seed)):
            logger.debug("heartbeat key created executor=%s", executor.id)
    deployment, deployment_changes = await ensure_deployment(
        ctx.kube, executor, build_deployment(name, ns, spec, ctx.settings,
                                             heartbeat_secret=secret),
        _bounded_replicas(spec), cache.get("deployment"), absent=indexed)
    service, service_changes = await ensure_service(
        ctx.kube, executor, build_service(name, ns, spec), cache.get("service"),
        absent=indexed)
    return deployment, announce([("Deployment", deployment, deployment_changes),
                                 ("Service", service, service_changes)], logger)


def announce(children: list[tuple[str, dict[str, Any], list[str]]],
             logger: Logger) -> list[Event]:
    """Events and log lines for the changes made to children: one ``Created`` for all that
    were created (an executor's creation tells one story, and each Event is an API
    request: a backlog of executors is bound by the API server), one ``Updated{kind}``
    per child patched."""
    events: list[Event] = []
    created: list[tuple[str, str]] = []  # (kind, namespace/name)
    for kind, obj, changes in children:
        if not changes:
            continue
        ref = f"{obj['metadata'].get('namespace')}/{obj['metadata']['name']}"
        logger.info("child reconciled kind=%s name=%s changes=%s", kind, ref, changes)
        if changes == ["created"]:
            created.append((kind, ref))
        else:
            events.append(Event.normal(reason=f"Updated{kind}",
                                       message=f"Updated {kind} {ref}: {', '.join(changes)}"))
    if len(created) > 1:
        events.insert(0, Event.normal(reason="CreatedChildren", message="Created " + ", ".join(
            f"{kind} {ref}" for kind, ref in created)))
    elif created:
        kind, ref = created[0]
        events.insert(0, Event.normal(reason=f"Created{kind}", message=f"Created {kind} {ref}"))
    return events


def executor_record(
    executor: ObjectRef, spec: ModelExecutorSpec, endpoint: dict[str, str], state: str,
    ready_replicas: int, generation: int, route: Route | None = None,
    heartbeat_key: str | None = None, cold_start_ms: float | None = None,
) -> ExecutorRecord:
    return ExecutorRecord(
        namespace=executor.namespace, name=executor.name, model=spec.model.name,
        version=spec.model.version, type=spec.traits.type, input=spec.traits.input,
        output=spec.traits.output, accuracy=spec.traits.accuracy, rest=endpoint["rest"],
        grpc=endpoint["grpc"], state=state, min_replicas=spec.scaling.min_replicas,
        max_replicas=spec.scaling.max_replicas, ready_replicas=ready_replicas,
        service_time_ms=spec.traits.service_time_ms, generation=generation,
        rollout=route.to_record() if route is not None else None,
        heartbeat_key=heartbeat_key, cold_start_ms=cold_start_ms,
    )


def last_cold_start_ms(status: Mapping[str, Any]) -> float | None:
    """The cold start the autoscaler last measured (``status.scaling``), in ms; None
    before the first or when the status holds no sound number."""
    value = (status.get("scaling") or {}).get("lastColdStartSeconds")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    ms = value * 1000.0
    return round(ms, 3) if math.isfinite(ms) and ms >= 0 else None


async def reconcile(ctx: Context, executor: Observed[ModelExecutorSpec],
                    measured: Observations | None = None) -> StatusUpdate:
    """Converge children and store record for one executor; return its new status.

    Children come first, so pods do not wait for the store. ``measured``: an
    analysis tick's observations of a rollout in progress (``rollout.py``).
    """
    ref = executor.ref
    cache = executor.cache or {}
    rollout = advance(executor.status.get("rollout"), executor.spec, executor.generation,
                      time.time(), measured)
    # While a rollout runs, the stable Deployment and the record keep the stable version.
    spec = stable_spec(executor.spec, rollout)
    deployment, events = await ensure_children(ctx, ref, spec, executor.logger, cache)
    unbuildable: NameConflict | Rejected | None = None
    try:
        route, _ = await reconcile_rollout(ctx, ref, executor.spec, rollout,
                                           int(deployment.get("spec", {}).get("replicas") or 0),
                                           executor.logger)
    except (NameConflict, Rejected) as exc:
        # The new version's children cannot be made; the stable version still serves,
        # and its record must still follow the spec (raised before it was written, the
        # record kept the traits and scaling of before, whatever the spec said since).
        route, unbuildable = None, exc
    endpoint = endpoints(ref.name, ref.namespace, ctx.settings)
    heartbeats: list[ReplicaRecord] = []
    problem: Problem | None = None
    try:
        if "heartbeats" in cache:
            heartbeats = list(cache["heartbeats"])
        else:
            heartbeats = counted(ctx, ref, await ctx.store.list_replicas(ref.id), time.time())
        deployed = Rollout.of(deployment)
        state = executor_state(deployed, model_report(heartbeats, deployed.desired))
        record = executor_record(ref, spec, endpoint, state, deployed.ready,
                                 executor.generation, route, heartbeat_key(ctx, ref),
                                 last_cold_start_ms(executor.status))
        # A handler always writes (the store may have lost it); the refresh only a change,
        # or a record the store no longer has (cache["stored"] False).
        if (not cache or not cache.get("stored", False)
                or ctx.records.get(ref.id) != record):
            ctx.records.pop(ref.id, None)
            await ctx.store.put_executor(record)
            ctx.records[ref.id] = record
    except StoreUnavailable as exc:
        problem = store_retry(exc, executor.retry, ctx.settings,
                              "Pods are managed normally meanwhile.")
    if unbuildable is not None:
        raise unbuildable  # the handler's status says why
    update = executor_status(ref.id, spec, deployment, heartbeats, problem, endpoint,
                             executor.status, executor.generation).after(events)
    return rollout_update(executor.status, rollout, update)


async def rollout_tick(ctx: Context, executor: Observed[ModelExecutorSpec]) -> StatusUpdate:
    """The analysis tick of a rollout in progress: measure, then reconcile with it."""
    try:
        measured = await observe(ctx, executor)
    except StoreUnavailable as exc:
        executor.logger.warning("rollout analysis deferred executor=%s error=%s",
                                executor.ref.id, exc)
        measured = None
    return await reconcile(ctx, executor, measured)


async def forget(ctx: Context, executor_id: str, retry: int, logger: Logger) -> Problem | None:
    """Remove the executor's store records and scaling memory (the finalizer's job);
    children go by garbage collection."""
    async def remove(executor: str) -> None:
        await ctx.store.remove_executor(executor)
        # Its queued tasks would stay pending until they expire: no worker takes them.
        abandoned = await TaskQueue(ctx.store).abandon(
            executor, f"executor {executor} was deleted before the task ran")
        if abandoned:
            logger.info("queued tasks failed executor=%s tasks=%d", executor, abandoned)

    problem = await forget_records(ctx, remove, "executor", executor_id, retry, logger)
    if problem is None:
        ctx.windows.forget(executor_id)
        ctx.records.pop(executor_id, None)
    return problem
