"""Fleet-wide loops for ModelExecutors: one autoscaler tick and one refresh tick for all.

Per-object kopf timers cost one task and, each tick, reads of their own
(a Deployment GET, a Service GET, an HSCAN and an HSET per executor every
10 s, a store read per executor every 2 s): load that grows with the fleet
while nothing changes. Instead the operator keeps what the watch streams
deliver (the executors from their watch events, ``handlers.py``; their
Deployments and Services from informers, ``children.py``) and runs two loops:

- The autoscaler tick (every ``autoscale_interval_seconds``) reads the
  demand of every executor in one pipelined store read
  (``MetadataStore.fleet_load``), decides per executor (``autoscale.plan``,
  pure) and writes only what changed: the Deployments whose replicas
  change, ``status.scaling`` when it means something, their Events.
- The refresh tick (every ``reconcile_interval_seconds``) reads the
  heartbeats and the ids of the stored executor records once, and
  reconciles only the executors kopf's handlers have concluded (their
  ``observedGeneration`` is the generation) whose inputs changed since their last
  clean refresh (generation, Deployment or Service version, heartbeats,
  record missing from the store), with the cached children and heartbeats,
  so a clean executor costs no request at all; and every executor whose
  rollout is in progress, with its analysis (``reconcile.rollout_tick``:
  outcomes change without any object changing).

Both take the per-object lock the handlers take (``handling.serialized``);
an executor whose lock is held (a handler at work) is skipped until the next
tick rather than stalling the tick behind it. Neither writes to an
executor once its deletion started. Status goes out as a merge patch on the
status subresource, Events through the core API (kopf's poster works only
inside its handlers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter

from mulambda.api.common import GROUP, VERSION, SpecError
from mulambda.api.modelexecutor import ModelExecutorSpec, parse_executor_spec
from mulambda.store.records import ReplicaRecord, StoreUnavailable
from mulambda.tasks.queue import TaskQueue

from .. import handling
from ..context import Context
from ..k8s.api import API_THREADS, Forbidden
from ..k8s.children import owned_by
from ..k8s.objects import LAST_VALID_SPEC, ObjectRef
from ..status import Event, StatusUpdate
from .autoscale import demand_window, plan
from .heartbeats import counted
from .reconcile import last_cold_start_ms
from .rollout import is_active

log = logging.getLogger(__name__)
# Longer LAST_VALID_SPEC annotations are not read: what the operator writes is about
# 0.5 KB, and a forged one must not cost a tick much time.
MAX_SPEC_ANNOTATION = 64 * 1024

ERRORS = Counter("mulambda_operator_errors", "Store and API server calls of the operator's "
                 "loops that failed, by target (store, api) and loop", ["target", "loop"])
for _target, _loop in (("store", "autoscale"), ("store", "refresh"), ("store", "prune"),
                       ("api", "autoscale"), ("api", "refresh"), ("executor", "autoscale")):
    ERRORS.labels(_target, _loop)  # start at zero: a dashboard shows 0, not "no data"

Key = tuple[str, str]  # (namespace, name)
Index = Mapping[Key, Any]  # a watch cache: key -> [the object]
# What a refresh depended on: (generation, Deployment version, Service version,
# heartbeats, record stored). Equal to the last clean refresh's: nothing to do.
Fingerprint = tuple[Any, ...]


def first(index: Index, key: Key) -> Any:
    """The one object indexed under ``key``, if any (a body-like dict: kopf.Body's
    readers accept it)."""
    return next(iter(index.get(key, ())), None)


def heartbeat_facts(heartbeats: list[ReplicaRecord]) -> tuple[Any, ...]:
    """What status and the store record derive from the heartbeats (not their times)."""
    return tuple(sorted((r.pod, r.state, r.version, r.reason, r.message) for r in heartbeats))


class Fleet:
    """The autoscaler and refresh ticks over every executor the watch caches hold."""

    def __init__(self, ctx: Context, memo: kopf.Memo, kind: handling.Kind[Any],
                 analysis: handling.Kind[Any], executors: Index, deployments: Index,
                 services: Index, complete: Callable[[], bool]) -> None:
        self.ctx = ctx
        self.memo = memo
        self.kind = kind
        self.analysis = analysis  # the reconcile of an executor whose rollout is in progress
        self.executors = executors
        self.deployments = deployments
        self.services = services
        self.complete = complete  # the children's caches can be read as the truth
        self._specs: dict[str, tuple[int, ModelExecutorSpec | None]] = {}
        self._clean: dict[str, Fingerprint] = {}

    # -- the loops ---------------------------------------------------------------
    async def autoscale_forever(self) -> None:
        await self._forever(self.autoscale_tick, self.ctx.settings.autoscale_interval_seconds,
                            "autoscaler")

    async def refresh_forever(self) -> None:
        await self._forever(self.refresh_tick, self.ctx.settings.reconcile_interval_seconds,
                            "refresh")

    async def _forever(self, tick: Any, interval: float, name: str) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one tick must not end the loop
                log.exception("%s tick failed", name)

    # -- what the caches hold ---------------------------------------------------------
    def _spec(self, body: Mapping[str, Any]) -> ModelExecutorSpec | None:
        """The parsed spec, parsed once per generation; an invalid one (reported by the
        handlers) is the last valid one, or None."""
        meta = body["metadata"]
        generation = int(meta.get("generation") or 0)
        known = self._specs.get(meta["uid"])
        if known is not None and known[0] == generation:
            return known[1]
        # An invalid edit keeps the last valid spec this process parsed: the Deployment
        # still runs it, and an executor at zero must still be activated (skipped, it
        # stayed ScaledToZero in the store, offered to clients whose requests then
        # waited for a cold start that never came). After a restart, the one the
        # Deployment was last built from.
        try:
            spec: ModelExecutorSpec | None = parse_executor_spec(dict(body.get("spec") or {}))
        except Exception as exc:  # one executor's spec must not stop the fleet's ticks
            if not isinstance(exc, SpecError):  # a SpecError the handlers report
                log.exception("spec of %s/%s could not be parsed; its last valid one is "
                              "used", meta.get("namespace"), meta.get("name"))
            spec = known[1] if known is not None else self._built_from(body)
        self._specs[meta["uid"]] = (generation, spec)
        return spec

    def _built_from(self, body: Mapping[str, Any]) -> ModelExecutorSpec | None:
        """The spec the executor's own Deployment was last built from (its LAST_VALID_SPEC
        annotation), if the cache has one that parses. Read only when the current spec
        does not: the annotation is anyone's who may edit the Deployment, so whatever it
        holds ends here (at worst a spec that passed validation, for this executor
        only, until the next valid edit)."""
        meta = body["metadata"]
        deployment = first(self.deployments, (meta["namespace"], meta["name"]))
        if deployment is None or not owned_by(deployment, ObjectRef.of(body)):
            return None  # someone else's object of that name (NameConflict)
        text = (deployment["metadata"].get("annotations") or {}).get(LAST_VALID_SPEC)
        if not isinstance(text, str) or not text or len(text) > MAX_SPEC_ANNOTATION:
            return None
        try:
            return parse_executor_spec(json.loads(text))
        except Exception:  # forged (deep nesting: RecursionError) or another version's
            return None

    def _live(self) -> Iterator[tuple[Key, Any]]:
        """Every executor in the cache whose deletion has not started."""
        for key in list(self.executors):
            body = first(self.executors, key)
            if body is not None and not handling.deleting(body):
                yield key, body

    def _busy(self, uid: str) -> bool:
        lock = self.memo.setdefault("locks", {}).get(uid)
        return lock is not None and lock.locked()

    def _unhandled(self, body: Any) -> bool:
        """kopf's change handlers have yet to conclude this generation (every conclusion
        writes ``observedGeneration``): theirs to reconcile. Refreshed beside them, a
        backlog's executors were reconciled twice (a GET of each missing child, a Secret
        create refused as a conflict, a second status patch)."""
        return not handling.concluded(handling.previous_status(self.ctx, body), body)

    def _forget_gone(self, seen: set[str]) -> None:
        for cache in (self._specs, self._clean, self.ctx.heartbeat_keys):
            for uid in [u for u in cache if u not in seen]:
                del cache[uid]

    # -- autoscaler ------------------------------------------------------------------
    async def autoscale_tick(self, now: float | None = None) -> None:
        """Sample every executor's demand with one store read, decide, write the changes."""
        now = time.time() if now is None else now
        log.info("autoscaler tick started")
        targets = []
        for key, body in self._live():
            spec = self._spec(body)
            if spec is not None:
                targets.append((key, body, spec, ObjectRef.of(body)))
        try:
            load = await self.ctx.store.fleet_load(
                {ref.id: demand_window(spec) for _, _, spec, ref in targets}, at=now)
            backlog = await TaskQueue(self.ctx.store).backlog(
                [ref.id for *_, ref in targets], now=now)
        except StoreUnavailable as exc:
            ERRORS.labels("store", "autoscale").inc()
            # No sample: decide() holds the count when its window runs dry.
            log.warning("demand unavailable, holding replicas: %s", exc)
            log.info("autoscaler tick done executors=%d writes=0", len(targets))
            return
        writes = []
        for key, body, spec, ref in targets:
            if self._busy(ref.uid):
                continue  # a handler holds it; next tick
            previous = handling.previous_status(self.ctx, body)
            deployment = first(self.deployments, key)
            try:
                update, target = plan(self.ctx.windows, ref, spec, previous, deployment,
                                      load.get(ref.id, (0, 0.0)), now,
                                      backlog.get(ref.id, (0, 0.0)))
            except Exception:  # the others are still decided
                # One executor's decision that raises (a value nothing foresaw) skips
                # that executor, not the tick: it had stopped scaling for the whole fleet.
                ERRORS.labels("executor", "autoscale").inc()
                log.exception("autoscaler: no decision for %s this tick", ref.id)
                continue
            if target is not None or update.fields or update.events:
                current = int((deployment or {}).get("spec", {}).get("replicas") or 0)
                writes.append(self._scale(key, ref, previous, update, current, target))
        await _bounded(writes)
        log.info("autoscaler tick done executors=%d writes=%d", len(targets), len(writes))

    async def _scale(self, key: Key, ref: ObjectRef, previous: dict[str, Any],
                     update: StatusUpdate, current: int, target: int | None) -> None:
        async with handling.serialized(self.memo, ref.uid):
            body = first(self.executors, key)
            if body is None or body["metadata"]["uid"] != ref.uid or handling.deleting(body):
                return
            try:
                if target is not None:
                    await self.ctx.kube.patch(
                        "Deployment", ref.name, ref.namespace,
                        [{"op": "replace", "path": "/spec/replicas", "value": target}])
                    reason = (update.fields.get("scaling") or {}).get("reason", "")
                    log.info("scaled executor=%s from=%d to=%d reason=%s", ref.id, current,
                             target, reason)
                await self._write(body, previous, update)
            except Forbidden as exc:
                ERRORS.labels("api", "autoscale").inc()
                # Reported in status by the refresh, which meets the same refusal.
                log.warning("autoscale skipped executor=%s, the API server refused: %s",
                            ref.id, exc)
            except ApiException as exc:
                ERRORS.labels("api", "autoscale").inc()
                log.warning("autoscale write failed executor=%s: %s", ref.id, exc.reason)

    # -- refresh ---------------------------------------------------------------------
    async def refresh_tick(self) -> None:
        """Reconcile the executors whose Deployment, Service, heartbeats or spec changed,
        or whose record the store lost, from the caches and one store read."""
        if not self.complete():
            log.info("refresh tick skipped: the children's caches are not complete yet")
            return
        log.info("refresh tick started")
        store_down: StoreUnavailable | None = None
        heartbeats: dict[str, list[ReplicaRecord]] = {}
        stored: set[str] = set()
        try:
            for r in await self.ctx.store.list_replicas():
                heartbeats.setdefault(r.executor, []).append(r)
            stored = await self.ctx.store.executor_ids()
        except StoreUnavailable as exc:
            ERRORS.labels("store", "refresh").inc()
            store_down = exc
        seen: set[str] = set()
        jobs = []
        now = time.time()
        for key, body in self._live():
            ref = ObjectRef.of(body)
            seen.add(ref.uid)
            if self._busy(ref.uid) or self._unhandled(body):
                continue
            deployment, service = first(self.deployments, key), first(self.services, key)
            # Only what routers count: a forged heartbeat changes nothing here either.
            mine = counted(self.ctx, ref, heartbeats.get(ref.id, []), now)
            # The cold start the autoscaler measured goes into the record as well.
            fingerprint = (body["metadata"].get("generation"), _version(deployment),
                           _version(service), heartbeat_facts(mine), ref.id in stored,
                           last_cold_start_ms(body.get("status") or {}))
            rolling = is_active(handling.previous_status(self.ctx, body))
            if store_down is None and not rolling and self._clean.get(ref.uid) == fingerprint:
                continue
            cache: dict[str, Any] = {"deployment": deployment, "service": service}
            if store_down is None:
                cache.update(heartbeats=mine, stored=ref.id in stored)
            jobs.append(self._refresh(key, ref, cache, fingerprint,
                                      self.analysis if rolling else self.kind))
        await _bounded(jobs)
        self._forget_gone(seen)
        handling.forget_old_writes(self.ctx)
        log.info("refresh tick done executors=%d refreshed=%d", len(seen), len(jobs))

    async def _refresh(self, key: Key, ref: ObjectRef, cache: dict[str, Any],
                       fingerprint: Fingerprint, kind: handling.Kind[Any]) -> None:
        async with handling.serialized(self.memo, ref.uid):
            body = first(self.executors, key)
            if body is None or body["metadata"]["uid"] != ref.uid or handling.deleting(body):
                return
            patch = kopf.Patch()
            events: list[Event] = []
            clean = True
            try:
                await handling.reconcile(kind, self.ctx, body, patch, log, cache=cache,
                                         post=events.append)
            except kopf.PermanentError:
                pass  # reported in status; nothing to retry until something changes
            except kopf.TemporaryError as exc:
                clean = False
                log.warning("refresh deferred executor=%s: %s", ref.id, exc)
            except ApiException as exc:
                clean = False
                ERRORS.labels("api", "refresh").inc()
                log.warning("refresh failed executor=%s: %s", ref.id, exc.reason)
            try:
                await self._write(body, None, StatusUpdate(dict(patch.get("status") or {}),
                                                           events))
            except ApiException as exc:
                clean = False
                ERRORS.labels("api", "refresh").inc()
                log.warning("status write failed executor=%s: %s", ref.id, exc.reason)
            if clean:
                self._clean[ref.uid] = fingerprint

    # -- writes ----------------------------------------------------------------------
    async def _write(self, body: Any, previous: dict[str, Any] | None,
                     update: StatusUpdate) -> None:
        """Status as a merge patch on the status subresource, then the Events."""
        meta = body["metadata"]
        if update.fields:
            await self.ctx.kube.patch_status(GROUP, VERSION, self.kind.plural, meta["name"],
                                             meta["namespace"], update.fields)
            if previous is not None:  # the refresh's reconcile remembered it already
                handling.remember_status(self.ctx, body, previous, update)
        involved = {"apiVersion": body["apiVersion"], "kind": body["kind"],
                    "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]}
        for event in update.events:
            try:
                await self.ctx.kube.post_event(involved, event.type, event.reason,
                                               event.message)
            except Exception as exc:  # an Event lost is no reason to fail the write
                log.warning("event not posted reason=%s: %s", event.reason, exc)


# Writes in flight at once per tick: as many as the API pool has threads. Unbounded,
# a tick after a backlog opened one store connection per executor (a server's
# maxclients refused them) and queued thousands of calls on the pool.
CONCURRENT_WRITES = API_THREADS


async def _bounded(jobs: list[Any]) -> None:
    """Run the coroutines ``jobs``, at most :data:`CONCURRENT_WRITES` at a time."""
    gate = asyncio.Semaphore(CONCURRENT_WRITES)

    async def gated(job: Any) -> None:
        async with gate:
            await job

    await asyncio.gather(*(gated(job) for job in jobs))


def _version(obj: Mapping[str, Any] | None) -> str | None:
    return None if obj is None else obj.get("metadata", {}).get("resourceVersion")
