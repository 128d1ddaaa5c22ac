"""kopf handlers, one module per resource kind.

kopf runs timers concurrently with change handlers of the same object. Both
go through :func:`serialized`, one lock per object uid, and read the spec
from the live ``body`` inside the lock: a timer tick that started before an
update never re-applies the old spec after the update handler has run, and
nothing writes to the store after the delete handler removed the object's
records.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import kopf


@contextlib.asynccontextmanager
async def serialized(memo: kopf.Memo, uid: str) -> AsyncIterator[None]:
    """Hold the per-object lock shared by handlers and timers."""
    locks: dict[str, asyncio.Lock] = memo.setdefault("locks", {})
    lock = locks.setdefault(uid, asyncio.Lock())
    async with lock:
        yield


def forget_lock(memo: kopf.Memo, uid: str) -> None:
    memo.setdefault("locks", {}).pop(uid, None)


def deleting(body: kopf.Body) -> bool:
    """True once deletion started: timers stop writing, the delete handler cleans up."""
    return bool(body.get("metadata", {}).get("deletionTimestamp"))


def live(body: kopf.Body) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Spec, status and generation as they are now (kopf keeps ``body`` current)."""
    return (dict(body.get("spec") or {}), dict(body.get("status") or {}),
            int(body.get("metadata", {}).get("generation") or 0))
