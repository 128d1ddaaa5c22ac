"""kopf handlers for Client: parse, call the reconciler, nothing else."""

from __future__ import annotations

from typing import Any

import kopf

from mulambda.operator import clients
from mulambda.resources import GROUP, VERSION
from mulambda.settings import Settings

RESOURCE = (GROUP, VERSION, "clients")


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the Client handlers to ``registry``."""

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, registry=registry, field="spec")
    async def reconcile_client(
        body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
        patch: kopf.Patch, memo: kopf.Memo, logger: Any, retry: int, **_: Any,
    ) -> None:
        await clients.reconcile(
            memo.ctx, body, dict(spec), dict(status), int(meta.get("generation") or 0),
            patch, logger, retry,
        )

    @kopf.timer(*RESOURCE, registry=registry, interval=settings.probe_interval_seconds,
                initial_delay=settings.probe_interval_seconds, idle=None)
    async def reselect_client(
        body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta,
        patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any,
    ) -> None:
        # Latencies and executors change without the Client changing:
        # recompute the selection every probe interval.
        try:
            await clients.reconcile(
                memo.ctx, body, dict(spec), dict(status), int(meta.get("generation") or 0),
                patch, logger,
            )
        except kopf.PermanentError:
            pass  # already reported in status by reconcile
        except kopf.TemporaryError as exc:
            logger.warning("reselect deferred: %s", exc)

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def forget_client(
        meta: kopf.Meta, memo: kopf.Memo, logger: Any, retry: int, **_: Any
    ) -> None:
        await clients.forget(memo.ctx, meta["namespace"], meta["name"], retry, logger)
