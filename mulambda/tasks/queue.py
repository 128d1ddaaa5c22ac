"""The task queue on the store: every task key and command (the schema is the package
docstring, :mod:`mulambda.tasks`).

Delivery is at least once: a worker reads a task with XREADGROUP and it stays
in the group's pending list until the worker acknowledges it; while the
worker is busy it renews the entry's idle time (XCLAIM ... JUSTID), and an
entry idle longer than the visibility timeout (its worker died, or froze) is
claimed by another worker with XAUTOCLAIM. Each start counts an attempt;
past the task's limit it goes to the dead-letter stream with the reason. The
outcome is written with HSETNX, so a second delivery of a task that did
finish cannot overwrite (or duplicate) its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from redis.exceptions import ResponseError, WatchError

from mulambda.store.metadata import MetadataStore
from mulambda.store.records import StoreUnavailable

from .records import Next, Status, TaskOptions, before_run, client_of, outcome, status_of
from .scripts import BEGIN, FINISH

GROUP = "workers"
DEAD_LETTER_MAXLEN = 10_000
# WATCH retries before a task's cancel gives up (a worker kept changing it).
_WATCH_TRIES = 5
# Pauses while a racing submission with the same Idempotency-Key writes its task.
_CREATION_WAITS = (0.01, 0.02, 0.05, 0.1)

Message = tuple[str, str]  # (stream entry id, task id)


class Finished(NamedTuple):
    """A task whose outcome is ready to be written (:meth:`TaskQueue.finish_many`)."""

    entry: str
    task_id: str
    outcome: str  # the ``outcome`` field, :func:`.records.outcome`
    result_ttl: int


class TooManyTasks(Exception):
    """The Client has as many open tasks as ``MULAMBDA_TASK_MAX_OPEN_PER_CLIENT``: 429."""

    def __init__(self, client: str, limit: int) -> None:
        super().__init__(f"client {client} has {limit} open tasks, the most it may have")
        self.client = client
        self.limit = limit


class TaskQueue:
    """Submit, read, finish and inspect tasks; one stream per executor."""

    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self.redis = store.redis
        self.prefix = store.prefix
        self._claim_from: dict[str, str] = {}  # queue -> where the next reclaim starts
        # EVALSHA, loading the script first where the store does not know it (a restart).
        self._begin = self.redis.register_script(BEGIN)
        self._finish = self.redis.register_script(FINISH)

    # -- keys ---------------------------------------------------------------------
    def queue_key(self, executor: str) -> str:
        return f"{self.prefix}:tasks:queue:{executor}"

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def open_key(self, client: str) -> str:
        """The Client's open tasks (queued or running): task id -> when it expires."""
        return f"{self.prefix}:tasks:open:{client}"

    def open_key_of(self, task_id: str) -> str:
        return self.open_key(client_of(task_id) or "")

    def idempotency_key(self, client: str, key: str) -> str:
        return f"{self.prefix}:tasks:idem:{client}:{hashlib.sha256(key.encode()).hexdigest()}"

    @property
    def active_key(self) -> str:
        return f"{self.prefix}:tasks:active"

    @property
    def dead_key(self) -> str:
        return f"{self.prefix}:tasks:dead"

    async def _run(self, coro: Any) -> Any:
        return await self.store._run(coro)  # the store's one mapping of errors

    # -- the selector's side ----------------------------------------------------------
    async def submit(self, task_id: str, *, client: str, executor: str, model: str, body: str,
                     options: TaskOptions, idempotency_key: str | None = None,
                     now: float | None = None) -> tuple[str, bool]:
        """Queue a task for ``executor``; (task id, created). With an idempotency key
        already used by ``client`` for a live task, that task's id and False."""
        ttl = max(1, int(options.ttl_seconds))
        at = time.time() if now is None else now
        await self._reserve(client, task_id, options.max_open_per_client, at, ttl)
        if idempotency_key is not None:
            try:
                earlier = await self._take_key(client, idempotency_key, task_id, ttl)
            except StoreUnavailable:
                # Nothing was queued: the place goes back (kept, a few store hiccups held
                # a Client's whole limit for a day).
                with contextlib.suppress(StoreUnavailable):
                    await self._release(client, task_id)
                raise
            if earlier is not None:
                await self._release(client, task_id)
                return earlier, False
        fields = {"client": client, "executor": executor, "model": model, "body": body,
                  "created_at": repr(at),
                  "max_attempts": str(options.max_attempts),
                  "result_ttl": str(max(1, int(options.result_ttl_seconds))), "attempts": "0"}
        queue = self.queue_key(executor)
        # One MULTI/EXEC: the task exists exactly when its entry is queued. Sent as
        # separate commands, a connection cut after the HSET left a task in no queue,
        # and a retry with its Idempotency-Key was told it was queued (a replay finds
        # the task; nothing would ever run it).
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.task_key(task_id), mapping=fields)  # type: ignore[arg-type]
            pipe.expire(self.task_key(task_id), ttl)
            # Created at 0 before the first entry, so no worker can miss it.
            pipe.xgroup_create(queue, GROUP, id="0", mkstream=True)
            pipe.xadd(queue, {"task": task_id})
            pipe.sadd(self.active_key, executor)  # after the entry: see backlog()
            results = await self._run(pipe.execute(raise_on_error=False))
        for result in results:
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise StoreUnavailable(f"metadata store error: {result}")
            if isinstance(result, Exception) and not isinstance(result, ResponseError):
                raise StoreUnavailable(f"metadata store unreachable: {result}")
        # Where it sits in the stream, so a cancel can take it out of the backlog.
        await self._run(self.redis.hset(self.task_key(task_id), "entry", str(results[-2])))
        return task_id, True

    async def _take_key(self, client: str, idempotency_key: str, task_id: str,
                        ttl: int) -> str | None:
        """Point the Client's Idempotency-Key at ``task_id``; or the live task it already
        names (then nothing is taken)."""
        key = self.idempotency_key(client, idempotency_key)
        if await self._run(self.redis.set(key, task_id, nx=True, ex=ttl)):
            return None
        earlier = await self._run(self.redis.get(key))
        if earlier and await self._created(str(earlier)):
            return str(earlier)
        # The earlier task is gone (its result expired, or its submission failed
        # half-way): the key starts over with this one.
        await self._run(self.redis.set(key, task_id, ex=ttl))
        return None

    async def earlier(self, client: str, idempotency_key: str) -> tuple[str, str] | None:
        """The live task ``client``'s Idempotency-Key already names: (id, its executor)."""
        task_id = await self._run(self.redis.get(self.idempotency_key(client,
                                                                      idempotency_key)))
        if not task_id:
            return None
        executor = await self._run(self.redis.hget(self.task_key(str(task_id)), "executor"))
        return (str(task_id), str(executor)) if executor else None

    async def _reserve(self, client: str, task_id: str, limit: int, now: float,
                       ttl: int) -> None:
        """Take one of ``client``'s ``limit`` open tasks for ``task_id`` (those past their
        time to live no longer count), or raise :class:`TooManyTasks`.

        Taken, then counted, in one transaction: counted first and taken when the task
        was queued, forty submissions sent at once all passed a limit of five. A refused
        one holds a place until it gives it back, so a race can refuse a submission that
        would have fitted (it may retry), never let one more in. A submission whose
        transaction failed keeps its place until its time to live (it may have been
        queued); one that failed before gives it back.
        """
        key = self.open_key(client)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {task_id: now + ttl})
            pipe.expire(key, ttl)
            pipe.zcard(key)
            *_, count = await self._run(pipe.execute())
        if int(count) > limit:
            await self._release(client, task_id)
            raise TooManyTasks(client, limit)

    async def _release(self, client: str, task_id: str) -> None:
        """Give back the place :meth:`_reserve` took for a task that was not queued."""
        await self._run(self.redis.zrem(self.open_key(client), task_id))

    async def _created(self, task_id: str) -> bool:
        """Whether ``task_id`` exists, waiting a moment for a submission that took its
        Idempotency-Key a few milliseconds ago (a retry racing the original) to write it."""
        for delay in _CREATION_WAITS:
            if await self._run(self.redis.exists(self.task_key(task_id))):
                return True
            await asyncio.sleep(delay)
        return bool(await self._run(self.redis.exists(self.task_key(task_id))))

    async def get(self, task_id: str) -> dict[str, str]:
        """The task's fields; empty when it is unknown or expired."""
        return dict(await self._run(self.redis.hgetall(self.task_key(task_id))))

    async def cancel(self, task_id: str, now: float | None = None) -> Status | None:
        """Cancel a pending task; its status afterwards (None: unknown). A task that
        is running or finished keeps its status."""
        at = time.time() if now is None else now
        for _ in range(_WATCH_TRIES):
            done, after = await self._run(self._cancel_once(task_id, at))
            if done:
                return after  # type: ignore[no-any-return]
        raise StoreUnavailable(f"task {task_id} kept changing while being cancelled")

    async def _cancel_once(self, task_id: str, at: float) -> tuple[bool, Status | None]:
        """(False, None) when a worker changed the task meanwhile: try again."""
        key = self.task_key(task_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                # decode_responses=True: str, whatever the stubs say
                fields: dict[str, str] = await pipe.hgetall(key)  # type: ignore[assignment]
                if not fields:
                    return True, None
                status = status_of(fields)
                if status is not Status.PENDING:
                    return True, status
                pipe.multi()
                pipe.hset(key, "outcome", outcome(Status.CANCELLED, worker="", at=at,
                                                  reason="cancelled by the caller"))
                pipe.zrem(self.open_key_of(task_id), task_id)
                pipe.expire(key, max(1, int(float(fields.get("result_ttl") or 1))))
                if fields.get("entry"):  # not delivered yet: out of the backlog at once
                    pipe.xdel(self.queue_key(fields["executor"]), fields["entry"])
                await pipe.execute()
            except WatchError:
                return False, None
        return True, Status.CANCELLED

    # -- the worker's side --------------------------------------------------------------
    async def ensure_group(self, executor: str) -> None:
        """The consumer group, created at the start of the stream if it is missing (a
        store that lost it: every entry still in the stream is delivered)."""
        try:
            await self._run(self.redis.xgroup_create(self.queue_key(executor), GROUP, id="0",
                                                     mkstream=True))
        except StoreUnavailable as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, executor: str, consumer: str, count: int, block_ms: int
                   ) -> list[Message]:
        """Up to ``count`` new tasks for ``consumer``, waiting up to ``block_ms``."""
        try:
            raw = await self._run(self.redis.xreadgroup(
                GROUP, consumer, {self.queue_key(executor): ">"}, count=count, block=block_ms))
        except StoreUnavailable as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group(executor)
            return []
        return [(entry, data.get("task", "")) for _stream, entries in raw or ()
                for entry, data in entries]

    async def reclaim(self, executor: str, consumer: str, min_idle_ms: int, count: int
                      ) -> list[Message]:
        """Tasks another consumer took and has not renewed for ``min_idle_ms``.

        Each call goes on from where the last one stopped: XAUTOCLAIM looks at no more
        than ten times ``count`` pending entries per call, so always starting at the
        first left a dead pod's tasks behind many live ones unclaimed."""
        queue = self.queue_key(executor)
        try:
            raw = await self._run(self.redis.xautoclaim(
                queue, GROUP, consumer, min_idle_ms, self._claim_from.get(queue, "0-0"),
                count=count))
        except StoreUnavailable as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group(executor)
            return []
        self._claim_from[queue] = str(raw[0])  # "0-0" once the whole list was seen
        return [(entry, data.get("task", "")) for entry, data in raw[1] if data]

    async def begin(self, task_id: str, worker: str, now: float | None = None) -> tuple[
        Next, str, dict[str, str]
    ]:
        """Decide whether a delivered task runs and, if so, count the attempt: (decision,
        reason, the task's fields as they are now). :meth:`begin_many` for one task."""
        return (await self.begin_many([task_id], worker, now))[0]

    async def begin_many(self, task_ids: Sequence[str], worker: str,
                         now: float | None = None) -> list[tuple[Next, str, dict[str, str]]]:
        """:meth:`begin` for every task of a delivered batch at once: per task, in order,
        (decision, reason, its fields as they are now).

        One script reads each task and marks it started (atomic, like a
        transaction); a task that must not run gets its marks taken back. A
        cancel racing with it either lands first (the task is final: skipped)
        or sees it running (its WATCH fails).
        """
        if not task_ids:
            return []
        started = repr(time.time() if now is None else now)
        keys = [self.task_key(task_id) for task_id in task_ids]
        replies = await self._run(self._begin(keys=keys, args=[started, worker]))
        out: list[tuple[Next, str, dict[str, str]]] = []
        taken_back: list[tuple[str, dict[str, str]]] = []
        for key, (flat, attempts) in zip(keys, replies, strict=True):
            before = _pairs(flat)
            decision, reason = before_run(before)
            if decision is Next.RUN:
                out.append((decision, "", {**before, "attempts": str(attempts),
                                           "started_at": started, "worker": worker}))
            else:
                out.append((decision, reason, before))
                taken_back.append((key, before))
        if taken_back:
            await self._unmark(taken_back)
        return out

    async def _unmark(self, marked: Sequence[tuple[str, dict[str, str]]]) -> None:
        """Take back :meth:`begin_many`'s marks on (key, fields before) (an expired task's
        hash goes with its fields)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for key, before in marked:
                if not before:
                    pipe.hdel(key, "attempts", "started_at", "worker")
                    continue
                pipe.hincrby(key, "attempts", -1)
                for name in ("started_at", "worker"):
                    if name in before:
                        pipe.hset(key, name, before[name])
                    else:
                        pipe.hdel(key, name)
            await self._run(pipe.execute())

    async def finish(self, executor: str, entry: str, task_id: str, final: str,
                     result_ttl: int) -> bool:
        """Write the outcome unless one is there, acknowledge and drop the entry; True
        when this call wrote it. :meth:`finish_many` for one task."""
        return (await self.finish_many(executor, [Finished(entry, task_id, final,
                                                           result_ttl)]))[0]

    async def finish_many(self, executor: str, finished: Sequence[Finished]) -> list[bool]:
        """Write each outcome unless one is there, acknowledge and drop the entries, in one
        script; per task, in order, True when this call wrote its outcome.

        Atomic: a task's outcome and its acknowledgement land together (or, when
        the store fails, neither does and the task is delivered again).
        """
        if not finished:
            return []
        args: list[str | int] = [GROUP]
        keys = [self.queue_key(executor)]
        for done in finished:
            args += [done.entry, done.outcome, max(1, done.result_ttl), done.task_id]
            keys += [self.task_key(done.task_id), self.open_key_of(done.task_id)]
        written = await self._run(self._finish(keys=keys, args=args))
        return [bool(w) for w in written]

    async def dead_letter(self, executor: str, entry: str, task_id: str, reason: str, *,
                          attempts: int, worker: str, result_ttl: int,
                          now: float | None = None) -> bool:
        """Fail the task with ``reason`` and record it in the dead-letter stream; False (and
        no dead letter) when another delivery had written its outcome (a success, say)."""
        at = time.time() if now is None else now
        written = await self.finish(executor, entry, task_id, outcome(
            Status.FAILED, worker=worker, at=at, reason=reason, attempts=attempts), result_ttl)
        if written:
            await self._run(self.redis.xadd(
                self.dead_key, {"task": task_id, "executor": executor, "reason": reason,
                                "attempts": str(attempts), "worker": worker},
                maxlen=DEAD_LETTER_MAXLEN, approximate=True))
        return written

    async def skip(self, executor: str, entry: str) -> None:
        """Acknowledge and drop an entry whose task is gone or already final."""
        queue = self.queue_key(executor)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(queue, GROUP, entry)
            pipe.xdel(queue, entry)
            await self._run(pipe.execute())

    async def retry_later(self, executor: str, consumer: str, entry: str, task_id: str,
                          error: str, visibility_ms: int) -> None:
        """Keep the error and let the entry be claimed again at once (by anyone)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.task_key(task_id), "last_error", error[:1000])
            pipe.hdel(self.task_key(task_id), "started_at")
            pipe.xclaim(self.queue_key(executor), GROUP, consumer, 0, [entry],
                        idle=visibility_ms, justid=True)
            await self._run(pipe.execute())

    async def give_back(self, executor: str, consumer: str, messages: Iterable[Message],
                        visibility_ms: int) -> None:
        """Shutdown: tasks this worker started but will not finish go back to the queue
        at once, and the cut attempt does not count."""
        taken = list(messages)
        if not taken:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            for _entry, task_id in taken:
                pipe.hincrby(self.task_key(task_id), "attempts", -1)
                pipe.hdel(self.task_key(task_id), "started_at")
            pipe.xclaim(self.queue_key(executor), GROUP, consumer, 0,
                        [entry for entry, _ in taken], idle=visibility_ms, justid=True)
            await self._run(pipe.execute())

    async def touch(self, executor: str, consumer: str, entries: Sequence[str]) -> None:
        """Renew the visibility of entries this worker is still busy with."""
        if entries:
            await self._run(self.redis.xclaim(self.queue_key(executor), GROUP, consumer, 0,
                                              list[Any](entries), justid=True))

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead letters, newest first."""
        raw = await self._run(self.redis.xrevrange(self.dead_key, count=count))
        return [{"entry": entry, **data} for entry, data in raw]

    # -- the operator's side ---------------------------------------------------------
    async def abandon(self, executor: str, reason: str, now: float | None = None) -> int:
        """Fail every task still in ``executor``'s queue with ``reason`` and delete the
        queue: the executor was deleted and no worker will take them (they stayed
        ``pending`` until they expired). A task whose outcome was written keeps it. How
        many entries there were."""
        queue = self.queue_key(executor)
        entries = await self._run(self.redis.xrange(queue))
        failed = outcome(Status.FAILED, worker="", at=time.time() if now is None else now,
                         reason=reason)
        async with self.redis.pipeline(transaction=True) as pipe:
            for _entry, data in entries:
                if data.get("task"):
                    task_id = str(data["task"])
                    pipe.hsetnx(self.task_key(task_id), "outcome", failed)
                    pipe.zrem(self.open_key_of(task_id), task_id)
            pipe.delete(queue)
            pipe.srem(self.active_key, executor)
            await self._run(pipe.execute())
        return len(entries)

    async def backlog(self, executors: Iterable[str], now: float | None = None, *,
                      tidy: bool = True) -> dict[str, tuple[int, float]]:
        """Executor id -> (tasks queued or running, age of the oldest in seconds), for the
        ``executors`` with a backlog; the others are left out.

        Reads only the queues in ``P:tasks:active`` (SMEMBERS, then XLEN and the
        first entry of each in one pipeline), so an idle fleet costs one
        command per tick, not two per executor. A queue found empty leaves
        the set, and is read once more after that: a task queued meanwhile
        (its submission adds the executor after its entry) is seen, now or
        by the next tick. ``tidy`` False leaves the set alone (a read-only
        reader: ``mulambda top``).
        """
        wanted = set(executors)
        members = {str(m) for m in await self._run(self.redis.smembers(self.active_key))}
        names = sorted(members & wanted)
        depths = await self._depths(names)
        empty = [name for name in names if not depths.get(name)]
        if empty and tidy:
            await self._run(self.redis.srem(self.active_key, *empty))
            for name, found in (await self._depths(empty)).items():
                await self._run(self.redis.sadd(self.active_key, name))
                depths[name] = found
        at = time.time() if now is None else now
        return {name: (depth, max(0.0, at - first_ms / 1000))
                for name, (depth, first_ms) in depths.items()}

    async def _depths(self, names: list[str]) -> dict[str, tuple[int, int]]:
        """Queue -> (XLEN, its first entry's time in ms) for the non-empty ``names``."""
        if not names:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xlen(self.queue_key(name))
                pipe.xrange(self.queue_key(name), count=1)
            results = await self._run(pipe.execute())
        out = {}
        for i, name in enumerate(names):
            depth, first = int(results[2 * i]), results[2 * i + 1]
            if depth and first:
                out[name] = (depth, int(str(first[0][0]).partition("-")[0]))
        return out


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    """A hash from a script's HGETALL reply (field, value, field, value, ...)."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
