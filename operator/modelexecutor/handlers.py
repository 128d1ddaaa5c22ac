"""kopf handlers for ModelExecutor: serialise per object, call the services, nothing else."""

from __future__ import annotations

from typing import Any

import kopf

from mulambda.api.common import GROUP, VERSION
from mulambda.settings import Settings

from ..serialize import deleting, forget_lock, live, serialized
from . import autoscale as autoscaler
from . import build as builders
from . import reconcile as executors

RESOURCE = (GROUP, VERSION, "modelexecutors")


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the ModelExecutor handlers to ``registry``."""

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, registry=registry, field="spec")
    async def reconcile_executor(
        body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: Any,
        retry: int, **_: Any,
    ) -> None:
        async with serialized(memo, uid):
            if deleting(body):
                return
            spec, status, generation = live(body)
            await executors.reconcile(memo.ctx, body, spec, status, generation, patch, logger,
                                      retry)

    @kopf.timer(*RESOURCE, registry=registry, interval=settings.reconcile_interval_seconds,
                initial_delay=settings.reconcile_interval_seconds, idle=None)
    async def refresh_executor(
        body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any,
    ) -> None:
        # Re-converges drift (deleted children, store restarts) and mirrors
        # Deployment readiness and companion heartbeats into status.
        async with serialized(memo, uid):
            if deleting(body):
                return
            spec, status, generation = live(body)
            try:
                await executors.reconcile(memo.ctx, body, spec, status, generation, patch,
                                          logger)
            except kopf.PermanentError:
                pass  # already reported in status by reconcile; nothing to retry
            except kopf.TemporaryError as exc:
                logger.warning("refresh deferred: %s", exc)

    # The executors' Deployments as the watch stream delivers them (kopf's
    # informer-style cache): the autoscaler reads replicas and readiness from
    # here every tick instead of GETting each Deployment every 2 s.
    @kopf.index("apps", "v1", "deployments", registry=registry, id="executor_deployments",
                labels={"app.kubernetes.io/managed-by": builders.MANAGED_BY,
                        "app.kubernetes.io/name": "modelexecutor"})
    def executor_deployments(**kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
        meta, spec, status = kwargs["meta"], kwargs["spec"], kwargs["status"]
        return {(kwargs["namespace"], kwargs["name"]): {
            "metadata": {"ownerReferences": list(meta.get("ownerReferences") or [])},
            "spec": {"replicas": spec.get("replicas")},
            "status": {"readyReplicas": status.get("readyReplicas") or 0},
        }}

    @kopf.timer(*RESOURCE, registry=registry, interval=settings.autoscale_interval_seconds,
                idle=None)
    async def autoscale_executor(
        body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: Any,
        **kwargs: Any,
    ) -> None:
        index: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["executor_deployments"]
        async with serialized(memo, uid):
            if deleting(body):
                return
            spec, status, _generation = live(body)
            key = (body["metadata"]["namespace"], body["metadata"]["name"])
            deployment = next(iter(index.get(key, [])), None)
            await autoscaler.autoscale(memo.ctx, memo.windows, body, spec, status, patch,
                                       logger, deployment=deployment)

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def forget_executor(
        meta: kopf.Meta, uid: str, memo: kopf.Memo, logger: Any, retry: int, **_: Any
    ) -> None:
        async with serialized(memo, uid):
            await executors.forget(memo.ctx, meta["namespace"], meta["name"], retry, logger)
            memo.windows.forget(f"{meta['namespace']}/{meta['name']}")
        forget_lock(memo, uid)
