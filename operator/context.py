"""What every reconcile shares: its context (settings, store, Kubernetes API, the
autoscaler's memory), the object it is called for, back-off, and the finalizer's store
clean-up."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.store.reader import SharedSnapshot
from mulambda.store.records import StoreUnavailable

from .k8s.api import KubeApi
from .k8s.objects import ObjectRef
from .status import Problem

if TYPE_CHECKING:
    from .modelexecutor.autoscale import Windows

Spec = TypeVar("Spec")
Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass
class Context:
    """What a reconcile needs; built once per operator in the startup handler."""

    settings: Settings
    store: MetadataStore
    kube: KubeApi
    windows: Windows
    # The store-wide part of every Client's selection, read incrementally and shared
    # by all Clients' reselections within a second (store/reader.py).
    snapshots: SharedSnapshot
    # uid -> (resourceVersion it was written over, monotonic time, status):
    # see handling.previous_status.
    written: dict[str, tuple[str | None, float, dict[str, Any]]] = field(default_factory=dict)
    # executor id -> the store record last written: a refresh writes only changes.
    records: dict[str, Any] = field(default_factory=dict)
    # client id -> the executor in its status.selected (filled as Clients reconcile, also
    # on resume): how many Clients select an executor, for its Selected Events.
    selections: dict[str, str] = field(default_factory=dict)
    # The secret executors' heartbeat keys derive from (MULAMBDA_HEARTBEAT_SECRET, from a
    # Secret); None: heartbeats are not signed (mulambda.store.heartbeats).
    heartbeat_secret: bytes | None = None
    # uid -> the executor's heartbeat public key (derived once: see modelexecutor/heartbeats).
    heartbeat_keys: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Observed(Generic[Spec]):
    """The object a handler runs for, typed once at the boundary."""

    ref: ObjectRef
    spec: Spec
    status: Mapping[str, Any]  # as it was when the handler started
    generation: int
    # kopf's per-object logger: it tags each line with the object (and posts
    # INFO and above as Events).
    logger: Logger = field(compare=False)
    retry: int = 0  # kopf's retry count for this change, drives the back-off
    spec_changed: bool = False  # a change handler, not a timer
    # What a fleet-wide loop already read for this object (watch caches, one
    # store read for all): the reconcile uses it instead of its own reads.
    cache: Mapping[str, Any] | None = field(default=None, compare=False)


def backoff(retry: int, settings: Settings) -> float:
    """Exponential back-off for store outages: 1, 2, 4 ... capped."""
    return float(min(settings.retry_max_delay_seconds, 2 ** min(retry, 16)))


def store_retry(exc: StoreUnavailable, retry: int, settings: Settings, note: str = "") -> Problem:
    """The store is down: retry with back-off. The message also goes into status."""
    delay = backoff(retry, settings)
    message = f"{exc}; retrying in {delay:g}s."
    return Problem(f"{message} {note}" if note else message, retry_after=delay)


async def forget_records(
    ctx: Context, remove: Callable[[str], Awaitable[None]], kind: str, object_id: str,
    retry: int, logger: Logger,
) -> Problem | None:
    """Run a store removal for a finalizer; while the store is down, the object stays
    (the problem says when to try again)."""
    try:
        await remove(object_id)
    except StoreUnavailable as exc:
        delay = backoff(retry, ctx.settings)
        return Problem(
            f"{exc}; the {kind} stays until its metadata is removed. Retrying in {delay:g}s.",
            retry_after=delay,
        )
    logger.info("%s metadata removed %s=%s", kind, kind, object_id)
    return None
