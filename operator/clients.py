"""Reconciling one Client: workload, store registration, and the current selection.

The selection in ``status.selected`` is recomputed from one store snapshot
(one pipelined round trip) on every change and every probe interval, so a
new executor, a lost replica or a latency shift shows within one interval.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf

from mulambda.operator import builders, children
from mulambda.operator.conditions import (
    FALSE,
    TRUE,
    condition,
    conditions_equal,
    get_condition,
    merge_conditions,
)
from mulambda.operator.executors import Context, backoff
from mulambda.resources import ClientSpec, SpecError, parse_client_spec
from mulambda.selection import Criteria, rank
from mulambda.store import ClientRecord, StoreUnavailable

TOP_CANDIDATES = 3


def _now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


async def ensure_workload(
    ctx: Context, body: kopf.Body, spec: ClientSpec, logger: Any
) -> None:
    """Run (or stop running) the Client's workload Deployment + ping Service."""
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    if spec.workload is None:
        removed = await children.remove_owned(ctx.kube, body, builders.workload_name(name), ns)
        for what in removed:
            kopf.info(body, reason="DeletedWorkload", message=f"Deleted {what}: no spec.workload")
        return
    replicas = spec.workload.replicas
    dep, changed = await children.ensure_deployment(
        ctx.kube, body,
        builders.build_client_deployment(name, ns, spec.workload.template, replicas, ctx.settings),
        lambda _current: replicas,
    )
    if changed:
        kopf.info(body, reason="CreatedWorkload" if changed == ["created"] else "UpdatedWorkload",
                  message=f"Workload Deployment {ns}/{dep['metadata']['name']}: "
                          f"{', '.join(changed)}")
    svc, changed = await children.ensure_service(
        ctx.kube, body, builders.build_client_service(name, ns))
    if changed:
        logger.info("workload service reconciled name=%s changes=%s",
                    svc["metadata"]["name"], changed)


def client_record(name: str, ns: str, spec: ClientSpec, generation: int,
                  ctx: Context) -> ClientRecord:
    probe = spec.probe_url
    if probe is None and spec.workload is not None:
        probe = builders.probe_url(name, ns, ctx.settings)
    return ClientRecord(
        namespace=ns, name=name, type=spec.criteria.type, input=spec.criteria.input,
        output=spec.criteria.output, latency_weight=spec.preferences.latency,
        accuracy_weight=spec.preferences.accuracy, max_latency_ms=spec.limits.max_latency_ms,
        min_accuracy=spec.limits.min_accuracy, probe_url=probe, cold_start=spec.cold_start,
        generation=generation,
    )


async def reconcile(
    ctx: Context, body: kopf.Body, spec: dict[str, Any], status: dict[str, Any],
    generation: int, patch: kopf.Patch, logger: Any, retry: int = 0,
) -> None:
    """Converge workload, registration and selection for one Client."""
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    old_conditions = status.get("conditions")
    try:
        parsed = parse_client_spec(spec)
    except SpecError as exc:
        msg = f"Invalid spec: {exc}"
        _fail(body, patch, old_conditions, generation, "InvalidSpec", msg)
        raise kopf.PermanentError(msg) from None
    try:
        await ensure_workload(ctx, body, parsed, logger)
    except children.NameConflict as exc:
        _fail(body, patch, old_conditions, generation, "NameConflict", str(exc))
        raise

    record = client_record(name, ns, parsed, generation, ctx)
    try:
        await ctx.store.put_client(record)
        snapshot = await ctx.store.snapshot(record.id)
    except StoreUnavailable as exc:
        delay = backoff(retry, ctx.settings)
        msg = f"{exc}; retrying in {delay:g}s."
        registered = get_condition(old_conditions, "Registered")
        if registered is None or registered.get("reason") != "StoreUnavailable":
            kopf.warn(body, reason="StoreUnavailable", message=msg)
        patch.status["conditions"] = merge_conditions(
            old_conditions, [condition("Registered", FALSE, "StoreUnavailable", msg)], generation)
        raise kopf.TemporaryError(msg, delay=delay) from None

    ranking = rank(Criteria.from_client(record), snapshot, client=record.id)
    if ranking.wake:
        # A better executor is scaled to zero: record demand so it is activated.
        try:
            await ctx.store.note_demand(ranking.wake)
        except StoreUnavailable as exc:
            logger.warning("could not record activation demand: %s", exc)

    updates = [condition("Registered", TRUE, "Registered",
                         f"Registered in the metadata store as {record.id}.")]
    old_selected = (status.get("selected") or {}).get("executor")
    if ranking:
        best = ranking[0]
        selected = {
            "executor": best.executor_id,
            "endpoint": {"rest": best.record.rest, "grpc": best.record.grpc},
            "score": round(best.score, 4),
            "reason": best.reason,
            "since": (status.get("selected") or {}).get("since") if old_selected ==
            best.executor_id else _now_iso(),
        }
        updates.append(condition("Ready", TRUE, "Selected",
                                 f"Selected {best.executor_id}: {best.reason}"))
        if old_selected != best.executor_id:
            kopf.info(body, reason="SelectionChanged",
                      message=f"Selected {best.executor_id} (was {old_selected or 'none'}): "
                              f"{best.reason}")
    else:
        selected = None
        explain = ranking.explain()
        updates.append(condition("Ready", FALSE, "NoMatchingExecutor", explain))
        old_ready = get_condition(old_conditions, "Ready") or {}
        if old_selected is not None or old_ready.get("reason") != "NoMatchingExecutor":
            kopf.warn(body, reason="NoMatchingExecutor", message=explain)
    candidates = [
        {"executor": c.executor_id, "score": round(c.score, 4), "reason": c.reason}
        for c in ranking[:TOP_CANDIDATES]
    ]
    new_conditions = merge_conditions(old_conditions, updates, generation)
    if not conditions_equal(old_conditions, new_conditions):
        patch.status["conditions"] = new_conditions
    if status.get("selected") != selected:
        patch.status["selected"] = selected
    if status.get("candidates") != candidates:
        patch.status["candidates"] = candidates
    if status.get("observedGeneration") != generation:
        patch.status["observedGeneration"] = generation


def _fail(body: kopf.Body, patch: kopf.Patch, old: list[dict[str, Any]] | None,
          generation: int, reason: str, msg: str) -> None:
    ready = get_condition(old, "Ready")
    already = (ready is not None and ready.get("reason") == reason
               and ready.get("observedGeneration") == generation)
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = merge_conditions(
        old, [condition("Ready", FALSE, reason, msg)], generation)
    if not already:
        kopf.warn(body, reason=reason, message=msg)


async def forget(ctx: Context, namespace: str, name: str, retry: int, logger: Any) -> None:
    """Remove the Client's store records (the finalizer's job); the workload goes by GC."""
    try:
        await ctx.store.remove_client(f"{namespace}/{name}")
    except StoreUnavailable as exc:
        delay = backoff(retry, ctx.settings)
        raise kopf.TemporaryError(
            f"{exc}; the Client stays until its metadata is removed. Retrying in {delay:g}s.",
            delay=delay,
        ) from None
    logger.info("client metadata removed client=%s/%s", namespace, name)
