"""Reconciling one Client: workload, store registration, and the current selection.

The selection in ``status.selected`` is recomputed from one store snapshot
(one pipelined round trip) on every change and every probe interval, so a
new executor, a lost replica or a latency shift shows within one interval.
"""

from __future__ import annotations

from typing import Any

import kopf

from mulambda.api.client import ClientSpec, parse_client_spec
from mulambda.api.common import SpecError
from mulambda.policy.selection import DEFAULT_POLICY, Candidate, Ranking, rank
from mulambda.store.records import ClientRecord, StoreUnavailable

from ..context import Context, backoff, forget_records
from ..k8s import children
from ..k8s.conditions import (
    FALSE,
    TRUE,
    condition,
    conditions_equal,
    get_condition,
    merge_conditions,
    now_iso,
    report_failure,
)
from . import build as builders

TOP_CANDIDATES = 3


async def ensure_workload(
    ctx: Context, body: kopf.Body, spec: ClientSpec, logger: Any, spec_changed: bool,
) -> None:
    """Run (or stop running) the Client's workload Deployment + ping Service."""
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    if spec.workload is None:
        if not spec_changed:
            return  # a workload can only have gone away with a spec change
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
    spec_changed: bool = False,
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
        await ensure_workload(ctx, body, parsed, logger, spec_changed)
    except children.NameConflict as exc:
        _fail(body, patch, old_conditions, generation, "NameConflict", str(exc))
        raise
    except children.Rejected as exc:
        _fail(body, patch, old_conditions, generation, "Rejected", str(exc))
        raise kopf.PermanentError(str(exc)) from None

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

    ranking = rank(record.criteria, snapshot, client=record.id)
    # Cold executors are woken by real demand (SDK and selector requests),
    # not by the operator: a Client that sends nothing must let them sleep.
    updates = [condition("Registered", TRUE, "Registered",
                         f"Registered in the metadata store as {record.id}.")]
    old_sel = status.get("selected") or {}
    old_selected = old_sel.get("executor")
    if ranking:
        best = _sticky_choice(ranking, old_selected)
        selected = {
            "executor": best.executor_id,
            "endpoint": {"rest": best.record.rest, "grpc": best.record.grpc},
            "score": round(best.score, 3),
            "reason": best.reason,
            "since": old_sel.get("since") if old_selected == best.executor_id else now_iso(),
        }
        updates.append(condition("Ready", TRUE, "Selected", f"Selected {best.executor_id}."))
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
        {"executor": c.executor_id, "score": round(c.score, 3), "reason": c.reason}
        for c in ranking[:TOP_CANDIDATES]
    ]
    new_conditions = merge_conditions(old_conditions, updates, generation)
    if not conditions_equal(old_conditions, new_conditions):
        patch.status["conditions"] = new_conditions
    # Scores and reasons carry measured latencies that move every probe: only
    # a different choice or a clearly different score is worth a status write.
    if _summary(status.get("selected")) != _summary(selected):
        patch.status["selected"] = selected
    if [_summary(c) for c in status.get("candidates") or []] != [_summary(c)
                                                                 for c in candidates]:
        patch.status["candidates"] = candidates
    if status.get("observedGeneration") != generation:
        patch.status["observedGeneration"] = generation


def _sticky_choice(ranking: Ranking, current: str | None) -> Candidate:
    """The best candidate, but keep the current one while it is as good (within the
    tie tolerance): the SDK spreads ties per request; the Client's status should
    not flap between equals every probe interval."""
    best = ranking[0]
    if current is None or current == best.executor_id:
        return best
    for c in ranking:
        if c.executor_id == current:
            if best.score - c.score <= DEFAULT_POLICY.tie_tolerance and c.warm == best.warm:
                return c
            break
    return best


def _summary(entry: dict[str, Any] | None) -> tuple[Any, ...] | None:
    if not entry:
        return None
    return entry.get("executor"), round(float(entry.get("score") or 0), 2)


def _fail(body: kopf.Body, patch: kopf.Patch, old: list[dict[str, Any]] | None,
          generation: int, reason: str, msg: str) -> None:
    report_failure(body, patch, old, generation, reason, msg)


async def forget(ctx: Context, namespace: str, name: str, retry: int, logger: Any) -> None:
    """Remove the Client's store records (the finalizer's job); the workload goes by GC."""
    await forget_records(ctx, ctx.store.remove_client, "Client", namespace, name, retry, logger)
