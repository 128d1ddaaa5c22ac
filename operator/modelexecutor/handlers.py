"""kopf handlers for ModelExecutor: the shared ones (``handling.py``) and the watch caches
(kopf indexes) that the fleet-wide autoscaler and refresh (``fleet.py``) read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import kopf

from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.settings import Settings

from .. import handling
from ..k8s.objects import MANAGED_BY, TEMPLATE_HASH
from .fleet import first
from .reconcile import forget, reconcile, rollout_tick
from .rollout import is_active
from .status import failure

MODEL_EXECUTOR = handling.Kind(
    plural="modelexecutors", noun="executor", parse=parse_executor_spec, reconcile=reconcile,
    failure=failure, forget=forget,
    # No per-object timer: fleet.Fleet re-converges drift (deleted children,
    # store restarts) and mirrors Deployment readiness and companion
    # heartbeats into status, for the executors whose inputs changed.
    timer=None, interval=lambda settings: settings.reconcile_interval_seconds,
    cached=lambda kwargs: cached_children(kwargs),
)
CHILD_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY,
                "app.kubernetes.io/name": "modelexecutor"}
# Index ids: kopf passes each index to every handler under this name.
DEPLOYMENTS, SERVICES = "executor_deployments", "executor_services"
# The executors as the watch delivers them: (namespace, name) -> [trimmed body], the
# shape of a kopf index (fleet.first reads both).
ExecutorCache = dict[tuple[str, str], list[dict[str, Any]]]


def remember(cache: ExecutorCache, event_type: str | None, key: tuple[str, str],
             body: dict[str, Any]) -> None:
    """Keep the executor of a watch event (listed, added, modified), or forget it
    (deleted)."""
    if event_type == "DELETED":
        cache.pop(key, None)
    else:
        cache[key] = [body]


def cached_children(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The executor's Deployment and Service as the watch caches hold them (None: none).

    Only for handlers: kopf starts them once every index is populated, so a
    child missing here does not exist (or is not ours), and is created without
    a GET first (``indexed``). The fleet ticks start before that and GET.
    """
    key = (kwargs["namespace"], kwargs["name"])
    return {"deployment": first(kwargs[DEPLOYMENTS], key),
            "service": first(kwargs[SERVICES], key), "indexed": True}


def _meta(meta: Any, *extra: str) -> dict[str, Any]:
    kept = {k: meta.get(k) for k in ("name", "namespace", "uid", "resourceVersion",
                                     "generation", *extra) if meta.get(k) is not None}
    return {**kept, "labels": dict(meta.get("labels") or {}),
            "ownerReferences": list(meta.get("ownerReferences") or [])}


# A rollout's analysis tick: the same reconcile, with what the rollout measured.
ROLLOUT_ANALYSIS = replace(MODEL_EXECUTOR, reconcile=rollout_tick)


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the ModelExecutor handlers and watch caches to ``registry``."""
    handling.register(registry, MODEL_EXECUTOR, settings)

    # Only while a rollout is in progress (kopf starts and stops the timer by the filter):
    # outcomes change without any object changing, so the fleet refresh would not run.
    @kopf.timer(*MODEL_EXECUTOR.resource, registry=registry, id="rollout_analysis",
                interval=settings.reconcile_interval_seconds, idle=None,
                when=lambda status, **_: is_active(status))
    async def rollout_analysis(body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo,
                               logger: Any, **_: Any) -> None:
        async with handling.serialized(memo, uid):
            if handling.deleting(body):
                return
            try:
                await handling.reconcile(ROLLOUT_ANALYSIS, memo.ctx, body, patch, logger)
            except kopf.PermanentError:
                pass  # reported in status; nothing to retry until the spec changes
            except kopf.TemporaryError as exc:
                logger.warning("rollout analysis deferred: %s", exc)

    # Informer-style caches fed by the watch streams kopf keeps anyway: only
    # what the fleet loops read is kept, so 5,000 executors stay a few MiB.
    # The executors' is no kopf index: with an index on a kind, kopf holds every
    # handler until each object of it has been indexed once, a wait quadratic in
    # the objects (one ToggleSet whose every change wakes every waiting worker): a
    # backlog of 5,000 executors handled none in its first 6 minutes. The fleet
    # loops need no complete cache (an executor not yet listed waits a tick).
    @kopf.on.event(*MODEL_EXECUTOR.resource, registry=registry, id="executor_cache")
    async def executor_cache(**kwargs: Any) -> None:
        body = kwargs["body"]
        remember(kwargs["memo"].executors, (kwargs.get("event") or {}).get("type"),
                 (kwargs["namespace"], kwargs["name"]), {
                     "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                     "metadata": _meta(kwargs["meta"], "deletionTimestamp"),
                     "spec": dict(kwargs["spec"]), "status": dict(kwargs["status"]),
                 })

    # The children's caches are kopf indexes: a handler may create a child its index
    # lacks without a GET, as kopf starts handlers once they are populated. Coroutines,
    # so kopf runs them on its loop (a plain function is a thread hop per event).

    @kopf.index("apps", "v1", "deployments", registry=registry, id=DEPLOYMENTS,
                labels=CHILD_LABELS)
    async def executor_deployments(**kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
        meta, spec, status = kwargs["meta"], kwargs["spec"], kwargs["status"]
        annotations = meta.get("annotations") or {}
        return {(kwargs["namespace"], kwargs["name"]): {
            "kind": "Deployment",
            "metadata": {**_meta(meta),
                         "annotations": {TEMPLATE_HASH: annotations.get(TEMPLATE_HASH)}},
            "spec": {"replicas": spec.get("replicas")},
            "status": {k: status.get(k) for k in ("replicas", "readyReplicas",
                                                  "updatedReplicas", "observedGeneration")
                       if status.get(k) is not None},
        }}

    @kopf.index("", "v1", "services", registry=registry, id=SERVICES, labels=CHILD_LABELS)
    async def executor_services(**kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
        spec = kwargs["spec"]
        return {(kwargs["namespace"], kwargs["name"]): {
            "kind": "Service", "metadata": _meta(kwargs["meta"]),
            "spec": {"ports": list(spec.get("ports") or []),
                     "selector": dict(spec.get("selector") or {})},
        }}
