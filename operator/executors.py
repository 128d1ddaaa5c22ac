"""Reconciling one ModelExecutor: children, metadata store record, status.

Called from the create/update/resume handlers and from a timer, so every
step is idempotent: get-or-create, compare-then-patch, and a status patch
only with what changed. Handlers stay thin (see handlers/modelexecutor.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import kopf
from mulambda.operator import builders
from mulambda.operator.conditions import (
    FALSE,
    TRUE,
    UNKNOWN,
    condition,
    conditions_equal,
    get_condition,
    merge_conditions,
)
from mulambda.operator.kube import JSON_PATCH, KubeApi, is_conflict

from mulambda.resources import ModelExecutorSpec, SpecError, parse_executor_spec
from mulambda.settings import Settings
from mulambda.store import ExecutorRecord, MetadataStore, ReplicaRecord, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a reconcile needs; built once per operator in the startup handler."""

    settings: Settings
    store: MetadataStore
    kube: KubeApi


def backoff(retry: int, settings: Settings) -> float:
    """Exponential back-off for store outages: 1, 2, 4 ... capped."""
    return float(min(settings.retry_max_delay_seconds, 2 ** min(retry, 16)))


async def ensure_deployment(
    ctx: Context, body: kopf.Body, spec: ModelExecutorSpec, logger: Any
) -> dict[str, Any]:
    """Create the Deployment if missing, patch its template if it differs."""
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    desired = builders.build_deployment(name, ns, spec, ctx.settings)
    kopf.adopt(desired, owner=body)
    current = await ctx.kube.get_deployment(desired["metadata"]["name"], ns)
    if current is None:
        try:
            created = await ctx.kube.create_deployment(desired)
        except Exception as exc:
            if not is_conflict(exc):
                raise
            # Created by a concurrent reconcile (or a previous run): converge on it.
            current = await ctx.kube.get_deployment(desired["metadata"]["name"], ns)
            if current is None:
                raise kopf.TemporaryError(
                    "Deployment vanished while creating it", delay=1) from exc
        else:
            kopf.info(body, reason="CreatedDeployment",
                      message=f"Created Deployment {ns}/{desired['metadata']['name']}")
            return created

    ops: list[dict[str, Any]] = []
    what: list[str] = []
    want_hash = desired["metadata"]["annotations"][builders.TEMPLATE_HASH]
    have_hash = (current["metadata"].get("annotations") or {}).get(builders.TEMPLATE_HASH)
    if want_hash != have_hash:
        what.append("pod template")
        ops += [
            {"op": "replace", "path": "/spec/template", "value": desired["spec"]["template"]},
            {"op": "add", "path": "/metadata/annotations",
             "value": {**(current["metadata"].get("annotations") or {}),
                       builders.TEMPLATE_HASH: want_hash}},
        ]
    if (current["metadata"].get("labels") or {}) != desired["metadata"]["labels"]:
        what.append("labels")
        ops.append(
            {"op": "add", "path": "/metadata/labels", "value": desired["metadata"]["labels"]})
    replicas = current.get("spec", {}).get("replicas")
    bounded = _bounded_replicas(replicas, spec)
    if bounded != replicas:
        what.append(f"replicas {replicas} -> {bounded}")
        ops.append({"op": "add", "path": "/spec/replicas", "value": bounded})
    if not ops:
        return current
    patched = await ctx.kube.patch_deployment(current["metadata"]["name"], ns, ops, JSON_PATCH)
    kopf.info(body, reason="UpdatedDeployment",
              message=f"Updated Deployment {ns}/{current['metadata']['name']}: {', '.join(what)}")
    logger.info("deployment patched name=%s changes=%s", current["metadata"]["name"], what)
    return patched


def _bounded_replicas(replicas: int | None, spec: ModelExecutorSpec) -> int:
    if replicas is None:
        return spec.scaling.min_replicas
    return max(spec.scaling.min_replicas, min(spec.scaling.max_replicas, replicas))


async def ensure_service(
    ctx: Context, body: kopf.Body, spec: ModelExecutorSpec
) -> dict[str, Any]:
    """Create the Service if missing, patch ports/selector if they differ."""
    name, ns = body["metadata"]["name"], body["metadata"]["namespace"]
    desired = builders.build_service(name, ns, spec)
    kopf.adopt(desired, owner=body)
    current = await ctx.kube.get_service(desired["metadata"]["name"], ns)
    if current is None:
        try:
            created = await ctx.kube.create_service(desired)
        except Exception as exc:
            if not is_conflict(exc):
                raise
            current = await ctx.kube.get_service(desired["metadata"]["name"], ns)
            if current is None:
                raise kopf.TemporaryError("Service vanished while creating it", delay=1) from exc
        else:
            kopf.info(body, reason="CreatedService",
                      message=f"Created Service {ns}/{desired['metadata']['name']}")
            return created
    ops: list[dict[str, Any]] = []
    cur_spec = current.get("spec", {})
    if _ports(cur_spec.get("ports")) != _ports(desired["spec"]["ports"]):
        ops.append({"op": "replace", "path": "/spec/ports", "value": desired["spec"]["ports"]})
    if cur_spec.get("selector") != desired["spec"]["selector"]:
        ops.append({"op": "add", "path": "/spec/selector", "value": desired["spec"]["selector"]})
    if (current["metadata"].get("labels") or {}) != desired["metadata"]["labels"]:
        ops.append(
            {"op": "add", "path": "/metadata/labels", "value": desired["metadata"]["labels"]})
    if not ops:
        return current
    return await ctx.kube.patch_service(current["metadata"]["name"], ns, ops, JSON_PATCH)


def _ports(ports: list[dict[str, Any]] | None) -> list[tuple[Any, ...]]:
    # The API server adds defaults (protocol, targetPort numbers, nodePort):
    # compare only what we set.
    return sorted(
        (p.get("name"), p.get("port"), str(p.get("targetPort")), p.get("protocol", "TCP"))
        for p in ports or []
    )


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
        ready = get_condition(old_conditions, "Ready")
        already = (ready is not None and ready.get("reason") == "InvalidSpec"
                   and ready.get("observedGeneration") == generation)
        msg = f"Invalid spec: {exc}. Fix the ModelExecutor; existing pods are left as they are."
        patch.status["observedGeneration"] = generation
        patch.status["conditions"] = merge_conditions(
            old_conditions,
            [condition("Ready", FALSE, "InvalidSpec", msg),
             condition("Progressing", FALSE, "InvalidSpec", msg)],
            generation,
        )
        if not already:
            kopf.warn(body, reason="InvalidSpec", message=msg)
        raise kopf.PermanentError(msg) from None

    deployment = await ensure_deployment(ctx, body, parsed, logger)
    await ensure_service(ctx, body, parsed)

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
    if updated < desired or ready < desired:
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


async def forget(ctx: Context, namespace: str, name: str, retry: int, logger: Any) -> None:
    """Remove the executor's store records (the finalizer's job); children go by GC."""
    try:
        await ctx.store.remove_executor(f"{namespace}/{name}")
    except StoreUnavailable as exc:
        delay = backoff(retry, ctx.settings)
        raise kopf.TemporaryError(
            f"{exc}; the executor stays until its metadata is removed. Retrying in {delay:g}s.",
            delay=delay,
        ) from None
    logger.info("executor metadata removed executor=%s/%s", namespace, name)
