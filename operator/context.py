"""What every reconcile shares: its context (settings, store, Kubernetes API), back-off,
and the finalizer's store clean-up."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import kopf

from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import StoreUnavailable

from .k8s.api import KubeApi


@dataclass
class Context:
    """What a reconcile needs; built once per operator in the startup handler."""

    settings: Settings
    store: MetadataStore
    kube: KubeApi


def backoff(retry: int, settings: Settings) -> float:
    """Exponential back-off for store outages: 1, 2, 4 ... capped."""
    return float(min(settings.retry_max_delay_seconds, 2 ** min(retry, 16)))


async def forget_records(
    ctx: Context, remove: Callable[[str], Awaitable[None]], kind: str, namespace: str,
    name: str, retry: int, logger: Any,
) -> None:
    """Run a store removal for a finalizer; while the store is down, keep the object."""
    try:
        await remove(f"{namespace}/{name}")
    except StoreUnavailable as exc:
        delay = backoff(retry, ctx.settings)
        raise kopf.TemporaryError(
            f"{exc}; the {kind} stays until its metadata is removed. Retrying in {delay:g}s.",
            delay=delay,
        ) from None
    logger.info("%s metadata removed %s=%s/%s", kind, kind, namespace, name)
