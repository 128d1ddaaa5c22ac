"""kopf handlers for ModelExecutor: the shared ones (``handling.py``), its timer refreshing,
plus the autoscaler's timer and the Deployment index it reads."""

from __future__ import annotations

from typing import Any

import kopf

from mulambda.api.common import SpecError
from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.settings import Settings

from .. import handling
from ..context import Logger
from ..k8s.api import Forbidden
from ..k8s.objects import MANAGED_BY, ObjectRef
from .autoscale import autoscale
from .reconcile import forget, reconcile
from .status import failure

MODEL_EXECUTOR = handling.Kind(
    plural="modelexecutors", noun="executor", parse=parse_executor_spec, reconcile=reconcile,
    failure=failure, forget=forget,
    # Re-converges drift (deleted children, store restarts) and mirrors
    # Deployment readiness and companion heartbeats into status.
    timer="refresh_executor", interval=lambda settings: settings.reconcile_interval_seconds,
)


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the ModelExecutor handlers to ``registry``."""
    handling.register(registry, MODEL_EXECUTOR, settings)

    # The executors' Deployments as the watch stream delivers them (kopf's
    # informer-style cache): the autoscaler reads replicas and readiness from
    # here every tick instead of GETting each Deployment every 2 s.
    @kopf.index("apps", "v1", "deployments", registry=registry, id="executor_deployments",
                labels={"app.kubernetes.io/managed-by": MANAGED_BY,
                        "app.kubernetes.io/name": "modelexecutor"})
    def executor_deployments(**kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
        meta, spec, status = kwargs["meta"], kwargs["spec"], kwargs["status"]
        return {(kwargs["namespace"], kwargs["name"]): {
            "metadata": {"ownerReferences": list(meta.get("ownerReferences") or [])},
            "spec": {"replicas": spec.get("replicas")},
            "status": {"readyReplicas": status.get("readyReplicas") or 0},
        }}

    @kopf.timer(*MODEL_EXECUTOR.resource, registry=registry, id="autoscale_executor",
                interval=settings.autoscale_interval_seconds, idle=None)
    async def autoscale_executor(
        body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: Logger,
        **kwargs: Any,
    ) -> None:
        index: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["executor_deployments"]
        async with handling.serialized(memo, uid):
            if handling.deleting(body):
                return
            try:
                spec = parse_executor_spec(dict(body.get("spec") or {}))
            except SpecError:
                return  # reported by the reconcile handlers; nothing to scale
            executor = ObjectRef.of(body)
            deployment = next(iter(index.get((executor.namespace, executor.name), [])), None)
            previous = handling.previous_status(memo.ctx, body)
            try:
                update = await autoscale(memo.ctx, executor, spec, previous, deployment, logger)
            except Forbidden as exc:
                # Reported in status by the reconcile timer, which meets the same refusal.
                logger.warning("autoscale skipped, the API server refused: %s", exc)
                return
            handling.remember_status(memo.ctx, body, previous, update)
            handling.apply(body, patch, update)
