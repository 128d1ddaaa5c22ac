"""kopf handlers for Client: serialise per object, call the services, nothing else."""

from __future__ import annotations

from typing import Any

import kopf

from mulambda.api.common import GROUP, VERSION
from mulambda.settings import Settings

from ..serialize import deleting, forget_lock, live, serialized
from . import reconcile as clients

RESOURCE = (GROUP, VERSION, "clients")


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the Client handlers to ``registry``."""

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, registry=registry, field="spec")
    async def reconcile_client(
        body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: Any,
        retry: int, **_: Any,
    ) -> None:
        async with serialized(memo, uid):
            if deleting(body):
                return
            spec, status, generation = live(body)
            await clients.reconcile(memo.ctx, body, spec, status, generation, patch, logger,
                                    retry, spec_changed=True)

    @kopf.timer(*RESOURCE, registry=registry, interval=settings.probe_interval_seconds,
                initial_delay=settings.probe_interval_seconds, idle=None)
    async def reselect_client(
        body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: Any, **_: Any,
    ) -> None:
        # Latencies and executors change without the Client changing:
        # recompute the selection every probe interval.
        async with serialized(memo, uid):
            if deleting(body):
                return
            spec, status, generation = live(body)
            try:
                await clients.reconcile(memo.ctx, body, spec, status, generation, patch, logger)
            except kopf.PermanentError:
                pass  # already reported in status by reconcile
            except kopf.TemporaryError as exc:
                logger.warning("reselect deferred: %s", exc)

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def forget_client(
        meta: kopf.Meta, uid: str, memo: kopf.Memo, logger: Any, retry: int, **_: Any
    ) -> None:
        async with serialized(memo, uid):
            await clients.forget(memo.ctx, meta["namespace"], meta["name"], retry, logger)
        forget_lock(memo, uid)
