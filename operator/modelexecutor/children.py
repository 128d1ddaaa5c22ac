"""The executors' Deployments and Services as their informers keep them (``k8s/informer.py``).

The fleet-wide loops (``fleet.py``) read readiness, replicas and versions
from here instead of GETs, and the handlers create a child that is missing
here without a GET, once the caches are synced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..k8s.informer import Cache, Informers
from ..k8s.objects import LAST_VALID_SPEC, MANAGED_BY, TEMPLATE_HASH
from .fleet import first

log = logging.getLogger(__name__)
# How long a handler waits for the caches to be complete before it reads them anyway
# (and GETs what they lack): a server slow to list must not hold handlers for good.
SYNC_WAIT_SECONDS = 30.0
CHILD_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY,
                "app.kubernetes.io/name": "modelexecutor"}


def trim_meta(meta: Mapping[str, Any], *extra: str) -> dict[str, Any]:
    """What the caches keep of an object's metadata: identity, version, labels, owners."""
    kept = {k: meta.get(k) for k in ("name", "namespace", "uid", "resourceVersion",
                                     "generation", *extra) if meta.get(k) is not None}
    return {**kept, "labels": dict(meta.get("labels") or {}),
            "ownerReferences": list(meta.get("ownerReferences") or [])}


def trim_deployment(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A Deployment as the autoscaler and the refresh read it (and ensure_deployment
    compares it: template hash, last valid spec, labels, replicas)."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    return {
        "kind": "Deployment",
        "metadata": {**trim_meta(meta),
                     "annotations": {k: annotations[k] for k in (TEMPLATE_HASH, LAST_VALID_SPEC)
                                     if k in annotations}},
        "spec": {"replicas": spec.get("replicas")},
        "status": {k: status.get(k) for k in ("replicas", "readyReplicas", "updatedReplicas",
                                              "observedGeneration")
                   if status.get(k) is not None},
    }


def trim_service(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A Service as ensure_service compares it (ports, selector, labels)."""
    spec = obj.get("spec") or {}
    return {"kind": "Service", "metadata": trim_meta(obj["metadata"]),
            "spec": {"ports": list(spec.get("ports") or []),
                     "selector": dict(spec.get("selector") or {})}}


class Children:
    """The Deployments and Services of every watched executor, by (namespace, name)."""

    def __init__(self, namespaces: Sequence[str]) -> None:
        self.deployments: Cache = {}
        self.services: Cache = {}
        self._said_unsynced = False
        self._since = time.monotonic()
        selector = ",".join(f"{k}={v}" for k, v in CHILD_LABELS.items())
        self.informers = Informers(selector, namespaces, {
            "Deployment": (trim_deployment, self.deployments),
            "Service": (trim_service, self.services),
        })

    async def synced_of(self, key: tuple[str, str]) -> dict[str, Any]:
        """:meth:`of`, once the caches are complete (or after :data:`SYNC_WAIT_SECONDS`).

        At a start over thousands of executors kopf runs their resume handlers at
        once; before the first LISTs are in, each would GET its children (and
        create its key Secret only to be refused). The wait is one Event, not
        kopf's per-object toggles."""
        try:
            await asyncio.wait_for(self.informers.synced.wait(), SYNC_WAIT_SECONDS)
        except TimeoutError:
            if not self._said_unsynced:  # once: every handler meets the same wait
                self._said_unsynced = True
                log.warning("the children's caches are not complete after %gs (see the "
                            "informers' warnings); handlers read children from the API "
                            "server meanwhile", SYNC_WAIT_SECONDS)
        return self.of(key)

    def complete(self, now: float | None = None) -> bool:
        """Whether the fleet refresh may reconcile from the caches: their first LISTs are
        in, or :data:`SYNC_WAIT_SECONDS` passed since the start (as for the handlers).
        Before, an executor whose children were not listed yet looked as if they were
        missing: a GET each, and a key Secret create refused (1,906 of each when a start
        over 5,000 refreshed before its caches were complete)."""
        now = time.monotonic() if now is None else now
        return self.informers.synced.is_set() or now - self._since >= SYNC_WAIT_SECONDS

    def of(self, key: tuple[str, str]) -> dict[str, Any]:
        """One executor's children for a reconcile (None: not in the cache). ``indexed``:
        the caches are complete, so a child missing here does not exist."""
        return {"deployment": first(self.deployments, key),
                "service": first(self.services, key),
                "indexed": self.informers.synced.is_set()}
