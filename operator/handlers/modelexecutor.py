"""kopf handlers for ModelExecutor: serialise per object, call the services, nothing else."""

from __future__ import annotations

from typing import Any

import kopf

from mulambda.operator import autoscaler, executors
from mulambda.operator.handlers import deleting, forget_lock, live, serialized
from mulambda.resources import GROUP, VERSION
from mulambda.settings import Settings

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

    @kopf.timer(*RESOURCE, registry=registry, interval=settings.autoscale_interval_seconds,
                idle=None)
    async def autoscale_executor(
        body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any,
    ) -> None:
        async with serialized(memo, uid):
            if deleting(body):
                return
            spec, status, _generation = live(body)
            await autoscaler.autoscale(memo.ctx, memo.windows, body, spec, status, patch,
                                       logger)

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def forget_executor(
        meta: kopf.Meta, uid: str, memo: kopf.Memo, logger: Any, retry: int, **_: Any
    ) -> None:
        async with serialized(memo, uid):
            await executors.forget(memo.ctx, meta["namespace"], meta["name"], retry, logger)
            memo.windows.forget(f"{meta['namespace']}/{meta['name']}")
        forget_lock(memo, uid)
