"""Which key an executor's pods sign their heartbeats with (mulambda.store.heartbeats).

Derived from the operator's secret and the executor's identity, never
stored by the operator: a restarted operator, or one that lost the Secret,
arrives at the same key.
"""

from __future__ import annotations

from mulambda.store.heartbeats import executor_seed

from ..context import Context
from ..k8s.objects import ObjectRef
from .build import heartbeat_secret_name


def heartbeat_seed(ctx: Context, executor: ObjectRef) -> bytes | None:
    """The executor's heartbeat key seed, or None when heartbeats are not signed."""
    if ctx.heartbeat_secret is None:
        return None
    return executor_seed(ctx.heartbeat_secret, executor.namespace, executor.name,
                         executor.uid)


def heartbeat_secret(ctx: Context, executor: ObjectRef) -> str | None:
    """Name of the Secret with the executor's heartbeat key, or None (not signed)."""
    seed = heartbeat_seed(ctx, executor)
    return heartbeat_secret_name(executor.name, seed) if seed is not None else None
