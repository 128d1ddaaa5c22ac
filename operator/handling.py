"""kopf's side of every kind: lock, parse at the boundary, reconcile, write the outcome.

kopf runs timers concurrently with change handlers of the same object. Both
go through :func:`serialized`, one lock per object uid, and read the spec
from the live ``body`` inside the lock: a timer tick that started before an
update never re-applies the old spec after the update handler has run, and
nothing writes to the store after the delete handler removed the object's
records.

A reconcile returns a ``StatusUpdate``; :func:`apply` writes its fields to
kopf's patch, posts its Events and turns its problem into the error kopf
retries (TemporaryError) or gives up on (PermanentError).

Only the Events a reconcile returns are posted (``kopf.event``, Normal or
Warning); kopf's own INFO log lines are not Events (posting level WARNING,
``main.configure_kopf``). A kind without a ``timer`` is re-checked by a
fleet-wide loop (``modelexecutor/fleet.py``) that takes the same lock.

kopf writes a handler's status patch after the handler returns, so after
the lock is released; until the watch delivers the patched object, the next
handler or timer of that object gets the old ``body``. :func:`previous_status`
gives it the status as last written instead (seen on a real API server: a
timer re-posting the Ready Event and restamping conditions).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol

import kopf
from kubernetes.client.exceptions import ApiException

from mulambda.api.common import GROUP, VERSION, SpecError
from mulambda.settings import Settings

from .context import Context, Logger, Observed, Spec, backoff
from .k8s.api import Forbidden, api_message
from .k8s.children import NameConflict, Rejected
from .k8s.objects import ObjectRef
from .status import Event, Problem, StatusUpdate


class Failure(Protocol):
    """The status when the operator cannot act on an object as it is (``status.failure``)."""

    def __call__(self, reason: str, detail: str, previous: Mapping[str, Any],
                 generation: int) -> StatusUpdate: ...


@dataclass(frozen=True)
class Kind(Generic[Spec]):
    """A custom resource kind, as the shared handlers drive it."""

    plural: str
    noun: str  # names the handlers: reconcile_<noun>, forget_<noun>
    parse: Callable[[dict[str, Any]], Spec]
    reconcile: Callable[[Context, Observed[Spec]], Awaitable[StatusUpdate]]
    failure: Failure
    # Removes its store records by id; a problem keeps the object (and its finalizer).
    forget: Callable[[Context, str, int, Logger], Awaitable[Problem | None]]
    # The timer that reconciles again: what the object depends on changes
    # without it changing (Deployment readiness, heartbeats, latencies, a store restart).
    timer: str | None
    interval: Callable[[Settings], float]
    # The object's children as the watch caches hold them, from the operator's memo and
    # the object's (namespace, name): spares a GET per child.
    cached: Callable[[kopf.Memo, tuple[str, str]], Awaitable[Mapping[str, Any]]] | None = None

    @property
    def resource(self) -> tuple[str, str, str]:
        return GROUP, VERSION, self.plural


@contextlib.asynccontextmanager
async def serialized(memo: kopf.Memo, uid: str) -> AsyncIterator[None]:
    """Hold the per-object lock shared by handlers and timers."""
    locks: dict[str, asyncio.Lock] = memo.setdefault("locks", {})
    lock = locks.setdefault(uid, asyncio.Lock())
    async with lock:
        yield


# How long a status this operator wrote stands in for an older body's: kopf
# applies the patch right after the handler; a patch that failed is not
# trusted for longer than this.
WRITTEN_STATUS_SECONDS = 10.0


def previous_status(ctx: Context, body: kopf.Body) -> dict[str, Any]:
    """The object's status as this operator last wrote it, while ``body`` predates that
    write; else the body's."""
    meta = body.get("metadata", {})
    written = ctx.written.get(meta.get("uid", ""))
    if (written is not None and written[0] == meta.get("resourceVersion")
            and time.monotonic() - written[1] < WRITTEN_STATUS_SECONDS):
        return dict(written[2])
    return dict(body.get("status") or {})


def remember_status(ctx: Context, body: kopf.Body, previous: dict[str, Any],
                    update: StatusUpdate) -> None:
    """Note the status ``update`` writes over ``previous`` (see :func:`previous_status`)."""
    if not update.fields:
        return
    meta = body.get("metadata", {})
    ctx.written[meta.get("uid", "")] = (meta.get("resourceVersion"), time.monotonic(),
                                        {**previous, **update.fields})


def forget_old_writes(ctx: Context, now: float | None = None) -> None:
    """Drop the statuses written longer ago than :data:`WRITTEN_STATUS_SECONDS`: no longer
    trusted by :func:`previous_status`, they only held memory (a status per executor)."""
    now = time.monotonic() if now is None else now
    for uid in [u for u, (_, at, _) in ctx.written.items() if now - at >= WRITTEN_STATUS_SECONDS]:
        del ctx.written[uid]


def deleting(body: kopf.Body) -> bool:
    """True once deletion started: timers stop writing, the delete handler cleans up."""
    return bool(body.get("metadata", {}).get("deletionTimestamp"))


Post = Callable[[Event], None]


def apply(body: kopf.Body, patch: kopf.Patch, update: StatusUpdate,
          post: Post | None = None) -> None:
    """Write ``update`` through kopf: status fields, Events, then its problem as an error.

    ``post`` replaces kopf's Event poster (which works only inside kopf's handlers)."""
    for key, value in update.fields.items():
        patch.status[key] = value
    for event in update.events:
        if post is not None:
            post(event)
        else:
            # kopf.event, not kopf.info: the posting level (WARNING) keeps kopf's
            # own log lines out of Events, not the ones a reconcile means to post.
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    raise_problem(update.problem)


def raise_problem(problem: Problem | None) -> None:
    if problem is None:
        return
    if problem.retry_after is None:
        raise kopf.PermanentError(problem.message)
    raise kopf.TemporaryError(problem.message, delay=problem.retry_after)


async def reconcile(
    kind: Kind[Spec], ctx: Context, body: kopf.Body, patch: kopf.Patch, logger: Logger,
    retry: int = 0, spec_changed: bool = False, cache: Mapping[str, Any] | None = None,
    post: Post | None = None,
) -> None:
    """Parse the live spec once, reconcile, and apply the outcome; a spec the operator
    cannot act on becomes the kind's failure status."""
    status = previous_status(ctx, body)
    generation = int(body.get("metadata", {}).get("generation") or 0)
    try:
        spec = kind.parse(dict(body.get("spec") or {}))
    except SpecError as exc:
        update = kind.failure(reason="InvalidSpec", detail=f"Invalid spec: {exc}",
                              previous=status, generation=generation)
        remember_status(ctx, body, status, update)
        apply(body, patch, update, post)
        return
    observed = Observed(ObjectRef.of(body), spec, status, generation, logger, retry, spec_changed,
                        cache)
    try:
        update = await kind.reconcile(ctx, observed)
    except NameConflict as exc:
        update = kind.failure(reason="NameConflict", detail=str(exc), previous=status,
                              generation=generation)
    except Rejected as exc:
        update = kind.failure(reason="Rejected", detail=str(exc), previous=status,
                              generation=generation)
    except (Forbidden, ApiException) as exc:
        # RBAC lacks a permission (an admin can grant it), or the API server failed
        # (overloaded, a Service IP range full): say so in status, and retry.
        reason, detail = (
            ("Forbidden", f"The API server refused the operator: {exc}")
            if isinstance(exc, Forbidden) else
            ("APIError", f"The API server failed a request ({exc.status}): {api_message(exc)}"))
        update = kind.failure(reason=reason, detail=detail, previous=status,
                              generation=generation)
        delay = backoff(retry, ctx.settings)
        assert update.problem is not None
        update = replace(update, problem=replace(
            update.problem, message=f"{update.problem.message} Retrying in {delay:g}s.",
            retry_after=delay))
    remember_status(ctx, body, status, update)
    apply(body, patch, update, post)


def left_to_the_fleet(kind: Kind[Any], reason: str, body: Mapping[str, Any]) -> bool:
    """A resume (an operator start) of an object whose generation was concluded, of a kind
    the fleet refresh re-checks: its first tick reconciles every such object from the
    caches (a new process has checked none yet), a bounded number at a time. Resumed
    here as well, each was reconciled twice after a start, and kopf ran all of them
    before it reached an object created meanwhile (107 s at 5,000)."""
    return (reason == kopf.Reason.RESUME and kind.timer is None
            and concluded(body.get("status") or {}, body))


def concluded(status: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """``status`` reports the body's generation: every conclusion of a handler writes
    ``observedGeneration``."""
    return status.get("observedGeneration") == (body.get("metadata") or {}).get("generation")


def register(registry: kopf.OperatorRegistry, kind: Kind[Any], settings: Settings) -> None:
    """Reconcile ``kind`` on create, resume and spec changes and from its timer; remove its
    store records on delete."""
    interval = kind.interval(settings)

    @kopf.on.resume(*kind.resource, registry=registry, id=f"reconcile_{kind.noun}")
    @kopf.on.create(*kind.resource, registry=registry, id=f"reconcile_{kind.noun}")
    @kopf.on.update(*kind.resource, registry=registry, id=f"reconcile_{kind.noun}",
                    field="spec")
    async def on_change(
        body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: Logger,
        retry: int, reason: str, **_: Any,
    ) -> None:
        if left_to_the_fleet(kind, reason, body):
            return
        async with serialized(memo, uid):
            if not deleting(body):
                meta = body.get("metadata", {})
                cache = (None if kind.cached is None else await
                         kind.cached(memo, (meta.get("namespace", ""), meta.get("name", ""))))
                await reconcile(kind, memo.ctx, body, patch, logger, retry, spec_changed=True,
                                cache=cache)

    if kind.timer is not None:
        timer = kind.timer

        @kopf.timer(*kind.resource, registry=registry, id=timer, interval=interval,
                    initial_delay=interval, idle=None)
        async def on_timer(
            body: kopf.Body, uid: str, patch: kopf.Patch, memo: kopf.Memo, logger: Logger,
            **_: Any,
        ) -> None:
            async with serialized(memo, uid):
                if deleting(body):
                    return
                try:
                    await reconcile(kind, memo.ctx, body, patch, logger)
                except kopf.PermanentError:
                    pass  # already reported in status; nothing to retry until the spec changes
                except kopf.TemporaryError as exc:
                    logger.warning("%s deferred: %s", timer, exc)

    @kopf.on.delete(*kind.resource, registry=registry, id=f"forget_{kind.noun}")
    async def on_delete(
        meta: kopf.Meta, uid: str, memo: kopf.Memo, logger: Logger, retry: int, **_: Any
    ) -> None:
        async with serialized(memo, uid):
            problem = await kind.forget(memo.ctx, f"{meta['namespace']}/{meta['name']}", retry,
                                        logger)
        raise_problem(problem)
        memo.setdefault("locks", {}).pop(uid, None)
        memo.ctx.written.pop(uid, None)
