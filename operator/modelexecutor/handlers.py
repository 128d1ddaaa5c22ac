"""kopf handlers for ModelExecutor: the shared ones (``handling.py``) and the executors'
watch cache that the fleet-wide autoscaler and refresh (``fleet.py``) read (their
children's caches are informers: ``children.py``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import kopf

from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.settings import Settings

from .. import handling
from ..k8s.informer import compact
from .children import trim_meta
from .reconcile import forget, reconcile, rollout_tick
from .status import failure

MODEL_EXECUTOR = handling.Kind(
    plural="modelexecutors", noun="executor", parse=parse_executor_spec, reconcile=reconcile,
    failure=failure, forget=forget,
    # No per-object timer: fleet.Fleet re-converges drift (deleted children,
    # store restarts) and mirrors Deployment readiness and companion
    # heartbeats into status, for the executors whose inputs changed.
    timer=None, interval=lambda settings: settings.reconcile_interval_seconds,
    cached=lambda memo, key: memo.children.synced_of(key),
)
# The executors as the watch delivers them: (namespace, name) -> [trimmed body], the
# shape of the children's caches (fleet.first reads all three).
ExecutorCache = dict[tuple[str, str], list[dict[str, Any]]]


def remember(cache: ExecutorCache, event_type: str | None, key: tuple[str, str],
             body: dict[str, Any]) -> None:
    """Keep the executor of a watch event (listed, added, modified), or forget it
    (deleted)."""
    if event_type == "DELETED":
        cache.pop(key, None)
    else:
        cache[key] = [body]


# A rollout's analysis tick: the same reconcile, with what the rollout measured. The
# fleet refresh runs it for every executor whose rollout is in progress (outcomes
# change without any object changing). Not a kopf timer: with any timer on a kind,
# kopf keeps every object's whole last body (managedFields included) for it,
# about 0.1 MiB per executor.
ROLLOUT_ANALYSIS = replace(MODEL_EXECUTOR, reconcile=rollout_tick)


def register(registry: kopf.OperatorRegistry, settings: Settings) -> None:
    """Attach the ModelExecutor handlers and the executors' watch cache to ``registry``."""
    handling.register(registry, MODEL_EXECUTOR, settings)

    # A cache fed by the watch stream kopf keeps anyway: only what the fleet loops
    # read is kept, so 5,000 executors stay a few MiB. No kopf index (see
    # k8s/informer.py for why): the fleet loops need no complete cache (an executor
    # not yet listed waits a tick).
    @kopf.on.event(*MODEL_EXECUTOR.resource, registry=registry, id="executor_cache")
    async def executor_cache(**kwargs: Any) -> None:
        body = kwargs["body"]
        remember(kwargs["memo"].executors, (kwargs.get("event") or {}).get("type"),
                 (kwargs["namespace"], kwargs["name"]), compact({
                     "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                     "metadata": trim_meta(kwargs["meta"], "deletionTimestamp"),
                     "spec": dict(kwargs["spec"]), "status": dict(kwargs["status"]),
                 }))
