"""Which key an executor's pods sign their heartbeats with (mulambda.store.heartbeats).

Derived from the operator's secret and the executor's identity, never
stored by the operator: a restarted operator, or one that lost the Secret,
arrives at the same key.
"""

from __future__ import annotations

from mulambda.store.heartbeats import executor_seed, public_key, vouched
from mulambda.store.records import ReplicaRecord

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


def heartbeat_key(ctx: Context, executor: ObjectRef) -> str | None:
    """The public key routers check the executor's heartbeats with (its record's
    ``heartbeat_key``), or None; derived once per executor (about 0.1 ms)."""
    if ctx.heartbeat_secret is None:
        return None
    key = ctx.heartbeat_keys.get(executor.uid)
    if key is None:
        seed = heartbeat_seed(ctx, executor)
        assert seed is not None
        key = ctx.heartbeat_keys[executor.uid] = public_key(seed)
    return key


def counted(ctx: Context, executor: ObjectRef, heartbeats: list[ReplicaRecord],
            now: float) -> list[ReplicaRecord]:
    """The heartbeats routers count as the executor's pods: status and the store record
    count those, and no others (a forged one cannot make an executor look Ready)."""
    key = heartbeat_key(ctx, executor)
    return [h for h in heartbeats if vouched(key, h, now)]
