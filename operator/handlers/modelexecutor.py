"""kopf handlers for ModelExecutor: parse, call the reconciler, nothing else."""

from __future__ import annotations

from typing import Any

import kopf

from mulambda.operator import autoscaler, executors
from mulambda.resources import GROUP, VERSION
from mulambda.settings import Settings

RESOURCE = (GROUP, VERSION, "modelexecutors")


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the ModelExecutor handlers to ``registry``."""

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, registry=registry, field="spec")
    async def reconcile_executor(
        body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
        patch: kopf.Patch, memo: kopf.Memo, logger: Any, retry: int, **_: Any,
    ) -> None:
        await executors.reconcile(
            memo.ctx, body, dict(spec), dict(status), int(meta.get("generation") or 0),
            patch, logger, retry,
        )

    @kopf.timer(*RESOURCE, registry=registry, interval=settings.reconcile_interval_seconds,
                initial_delay=settings.reconcile_interval_seconds, idle=None)
    async def refresh_executor(
        body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
        patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any,
    ) -> None:
        # Re-converges drift (deleted children, store restarts) and mirrors
        # Deployment readiness and companion heartbeats into status.
        try:
            await executors.reconcile(
                memo.ctx, body, dict(spec), dict(status), int(meta.get("generation") or 0),
                patch, logger,
            )
        except kopf.PermanentError:
            pass  # already reported as InvalidSpec by reconcile; nothing to retry
        except kopf.TemporaryError as exc:
            logger.warning("refresh deferred: %s", exc)

    @kopf.timer(*RESOURCE, registry=registry, interval=settings.autoscale_interval_seconds,
                idle=None)
    async def autoscale_executor(
        body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch,
        memo: kopf.Memo, logger: Any, **_: Any,
    ) -> None:
        await autoscaler.autoscale(memo.ctx, memo.windows, body, dict(spec), dict(status),
                                   patch, logger)

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def forget_executor(
        meta: kopf.Meta, memo: kopf.Memo, logger: Any, retry: int, **_: Any
    ) -> None:
        await executors.forget(memo.ctx, meta["namespace"], meta["name"], retry, logger)
        memo.windows.forget(f"{meta['namespace']}/{meta['name']}")
