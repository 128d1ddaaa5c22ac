"""Reconciling one ModelExecutor: children, metadata store record, status.

Called from the create/update/resume handlers and from a timer, so every
step is idempotent: get-or-create, compare-then-patch, and a status patch
only with what changed. Handlers stay thin (see modelexecutor/handlers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import kopf

from mulambda.api.common import SpecError
from mulambda.api.modelexecutor import ModelExecutorSpec, parse_executor_spec
from mulambda.store.records import ExecutorRecord, ReplicaRecord, StoreUnavailable

from ..context import Context, backoff, forget_records
from ..k8s import children
from ..k8s.conditions import (
    FALSE,
    TRUE,
    UNKNOWN,
    condition,
    conditions_equal,
    get_condition,
    merge_conditions,
    report_failure,
)
from . import build as builders

log = logging.getLogger(__name__)




def _bounded_replicas(spec: ModelExecutorSpec) -> Callable[[int | None], int]:
    """Replicas policy: start at minReplicas, afterwards keep what the autoscaler set
    but never outside [minReplicas, maxReplicas]."""

    def bound(current: int | None) -> int:
        if current is None:
            return spec.scaling.min_replicas
        return max(spec.scaling.min_replicas, min(spec.scaling.max_replicas, current))

    return bound


async def ensure_children(
    ctx: Context, body: kopf.Body, spec: ModelExecutorSpec, logger: Any
) -> dict[str, Any]:
    """Deployment and Service of an executor; returns the Deployment."""
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    deployment, changed = await children.ensure_deployment(
        ctx.kube, body, builders.build_deployment(name, ns, spec, ctx.settings),
        _bounded_replicas(spec),
    )
    _announce(body, "Deployment", deployment, changed, logger)
    service, changed = await children.ensure_service(
        ctx.kube, body, builders.build_service(name, ns, spec))
    _announce(body, "Service", service, changed, logger)
    return deployment


def _announce(body: kopf.Body, kind: str, obj: dict[str, Any], changed: list[str],
              logger: Any) -> None:
    """An Event and a log line for every change made to a child."""
    if not changed:
        return
    ref = f"{obj['metadata'].get('namespace')}/{obj['metadata']['name']}"
    if changed == ["created"]:
        kopf.info(body, reason=f"Created{kind}", message=f"Created {kind} {ref}")
    else:
        kopf.info(body, reason=f"Updated{kind}",
                  message=f"Updated {kind} {ref}: {', '.join(changed)}")
    logger.info("child reconciled kind=%s name=%s changes=%s", kind, ref, changed)


def model_condition(
    replicas: list[ReplicaRecord], desired: int
) -> tuple[dict[str, str], dict[str, Any]]:
    """ModelLoaded condition and status.model from the companions' heartbeats."""
    available = [r for r in replicas if r.state == "Available"]
    failed = [r for r in replicas if r.state == "Failed"]
    if available:
        version = max((r.version or 0) for r in available)
        cond = condition("ModelLoaded", TRUE, "ModelAvailable",
                         f"Version {version} is AVAILABLE in TF Serving on "
                         f"{len(available)}/{len(replicas)} reporting replica(s).")
        if failed:
            # Old pods still serve (maxUnavailable 0) while new ones cannot
            # load: the rollout is stuck, say why instead of looking healthy.
            first = sorted(failed, key=lambda r: r.pod)[0]
            msg = (f"Replica {first.pod} failed to load the model "
                   f"({first.reason or 'LoadFailed'}): {first.message or first.reason}; "
                   f"version {version} keeps serving.")
            return cond, {"loadedVersion": str(version), "state": "Available",
                          "reason": first.reason or "LoadFailed", "message": msg,
                          "newVersionFailed": True}
        return cond, {"loadedVersion": str(version), "state": "Available", "reason": "",
                      "message": ""}
    if failed:
        first = sorted(failed, key=lambda r: r.pod)[0]
        reason = first.reason or "LoadFailed"
        cond = condition("ModelLoaded", FALSE, reason,
                         f"Replica {first.pod} failed to load the model: "
                         f"{first.message or reason}")
        return cond, {"state": "Failed", "reason": reason, "message": first.message or ""}
    if replicas:
        cond = condition("ModelLoaded", FALSE, "Loading",
                         f"{len(replicas)} replica(s) are downloading or loading the model.")
        return cond, {"state": "Loading", "reason": "Loading", "message": ""}
    if desired == 0:
        cond = condition("ModelLoaded", UNKNOWN, "ScaledToZero",
                         "No replicas run; the model loads when the executor is activated.")
        return cond, {"state": "ScaledToZero", "reason": "", "message": ""}
    cond = condition("ModelLoaded", UNKNOWN, "NoHeartbeat",
                     "No companion has reported yet.")
    return cond, {"state": "Pending", "reason": "", "message": ""}


def executor_state(ready: int, desired: int, model_state: str) -> str:
    if ready > 0:
        return "Ready"
    if model_state == "Failed":
        return "Failed"
    if desired == 0:
        return "ScaledToZero"
    return "Pending"


async def reconcile(
    ctx: Context,
    body: kopf.Body,
    spec: dict[str, Any],
    status: dict[str, Any],
    generation: int,
    patch: kopf.Patch,
    logger: Any,
    retry: int = 0,
) -> None:
    """Converge children, store record and status for one executor."""
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    old_conditions = status.get("conditions")
    try:
        parsed = parse_executor_spec(spec)
    except SpecError as exc:
        msg = f"Invalid spec: {exc}. Fix the ModelExecutor; existing pods are left as they are."
        _fail(body, patch, old_conditions, generation, "InvalidSpec", msg)
        raise kopf.PermanentError(msg) from None

    try:
        deployment = await ensure_children(ctx, body, parsed, logger)
    except children.NameConflict as exc:
        _fail(body, patch, old_conditions, generation, "NameConflict", str(exc))
        raise
    except children.Rejected as exc:
        msg = f"{exc}. Fix the ModelExecutor spec."
        _fail(body, patch, old_conditions, generation, "Rejected", msg)
        raise kopf.PermanentError(msg) from None

    dep_status = deployment.get("status") or {}
    desired = int(deployment.get("spec", {}).get("replicas") or 0)
    current = int(dep_status.get("replicas") or 0)
    ready = int(dep_status.get("readyReplicas") or 0)
    updated = int(dep_status.get("updatedReplicas") or 0)
    endpoint = builders.endpoints(name, ns, ctx.settings)
    updates: list[dict[str, str]] = []

    try:
        replicas = await ctx.store.list_replicas(f"{ns}/{name}")
        model_cond, model_status = model_condition(replicas, desired)
        state = executor_state(ready, desired, model_status["state"])
        await ctx.store.put_executor(ExecutorRecord(
            namespace=ns, name=name, model=parsed.model.name, version=parsed.model.version,
            type=parsed.traits.type, input=parsed.traits.input, output=parsed.traits.output,
            accuracy=parsed.traits.accuracy, rest=endpoint["rest"], grpc=endpoint["grpc"],
            state=state, min_replicas=parsed.scaling.min_replicas,
            max_replicas=parsed.scaling.max_replicas, ready_replicas=ready,
            service_time_ms=parsed.traits.service_time_ms, generation=generation,
        ))
    except StoreUnavailable as exc:
        delay = backoff(retry, ctx.settings)
        msg = f"{exc}; retrying in {delay:g}s. Pods are managed normally meanwhile."
        registered = get_condition(old_conditions, "Registered")
        if registered is None or registered.get("reason") != "StoreUnavailable":
            kopf.warn(body, reason="StoreUnavailable", message=msg)
        patch.status["conditions"] = merge_conditions(
            old_conditions,
            [condition("Registered", FALSE, "StoreUnavailable", msg),
             condition("Ready", FALSE, "StoreUnavailable",
                       "Not selectable: the metadata store is unreachable.")],
            generation,
        )
        _mirror_replicas(patch, status, desired, current, ready, endpoint, generation)
        raise kopf.TemporaryError(msg, delay=delay) from None

    updates.append(condition("Registered", TRUE, "Registered",
                             f"Registered in the metadata store as {ns}/{name}."))
    dep_generation = int(deployment.get("metadata", {}).get("generation") or 0)
    observed = int(dep_status.get("observedGeneration") or 0)
    if model_status.get("newVersionFailed"):
        updates.append(condition("Progressing", FALSE, "NewVersionFailed",
                                 model_status["message"]))
    elif observed < dep_generation:
        # The Deployment controller has not seen our last change yet: its
        # replica counts describe the previous template.
        updates.append(condition("Progressing", TRUE, "RollingOut",
                                 "Waiting for the Deployment controller to pick up the change."))
    elif updated < desired or ready < desired:
        updates.append(condition("Progressing", TRUE, "RollingOut",
                                 f"{ready}/{desired} replicas ready, {updated} up to date."))
    else:
        updates.append(condition("Progressing", FALSE, "RolloutComplete",
                                 f"All {desired} replica(s) are up to date and ready."))
    updates.append(model_cond)
    if ready > 0:
        updates.append(condition("Ready", TRUE, "ModelServing",
                                 f"Serving {parsed.model.name} on {ready} replica(s)."))
    elif model_status["state"] == "Failed":
        updates.append(condition("Ready", FALSE, model_cond["reason"], model_cond["message"]))
    elif desired == 0:
        updates.append(condition("Ready", FALSE, "ScaledToZero",
                                 "Scaled to zero; activates when a client needs it."))
    else:
        updates.append(condition("Ready", FALSE, "WaitingForReplicas",
                                 f"0/{desired} replicas ready yet."))

    new_conditions = merge_conditions(old_conditions, updates, generation)
    old_ready = get_condition(old_conditions, "Ready")
    new_ready = get_condition(new_conditions, "Ready")
    if new_ready and (old_ready is None or old_ready.get("status") != new_ready["status"]
                      or old_ready.get("reason") != new_ready["reason"]):
        (kopf.info if new_ready["status"] == TRUE else kopf.warn if
         new_ready["reason"] not in {"WaitingForReplicas", "ScaledToZero"} else kopf.info)(
            body, reason=new_ready["reason"], message=new_ready["message"])
    if not conditions_equal(old_conditions, new_conditions):
        patch.status["conditions"] = new_conditions
    stuck = bool(model_status.pop("newVersionFailed", False))
    if stuck and status.get("lastFailure") != model_status["message"]:
        patch.status["lastFailure"] = model_status["message"]
        kopf.warn(body, reason="NewVersionFailed", message=model_status["message"])
    if status.get("model") != {**(status.get("model") or {}), **model_status}:
        patch.status["model"] = model_status
    if model_status["state"] == "Failed" and status.get("lastFailure") != model_cond["message"]:
        patch.status["lastFailure"] = model_cond["message"]
    _mirror_replicas(patch, status, desired, current, ready, endpoint, generation)


def _mirror_replicas(
    patch: kopf.Patch, status: dict[str, Any], desired: int, current: int, ready: int,
    endpoint: dict[str, str], generation: int,
) -> None:
    """Set the replica counts, endpoint and observedGeneration, only if they changed."""
    fields = {
        "observedGeneration": generation,
        "desiredReplicas": desired,
        "replicas": current,
        "readyReplicas": ready,
        "replicaSummary": f"{ready}/{desired}",
        "endpoint": endpoint,
    }
    for key, value in fields.items():
        if status.get(key) != value:
            patch.status[key] = value


def _fail(
    body: kopf.Body, patch: kopf.Patch, old_conditions: list[dict[str, Any]] | None,
    generation: int, reason: str, msg: str,
) -> None:
    report_failure(body, patch, old_conditions, generation, reason, msg,
                   ("Ready", "Progressing"))


async def forget(ctx: Context, namespace: str, name: str, retry: int, logger: Any) -> None:
    """Remove the executor's store records (the finalizer's job); children go by GC."""
    await forget_records(ctx, ctx.store.remove_executor, "executor", namespace, name, retry,
                         logger)
