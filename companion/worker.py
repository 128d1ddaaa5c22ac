"""The task worker of one executor pod: pulls its executor's tasks, calls TF Serving beside
it, writes the outcome (the queue is :mod:`mulambda.tasks.queue`).

* It pulls only while the pod is ready (TF Serving serves the version), and
  sends at most ``MULAMBDA_WORKER_CONCURRENCY`` tasks to the model at once
  (the executor's target concurrency). It holds at most as many again,
  prefetched: they show ``running`` (started, no longer cancellable) while
  they wait for a slot. The rest of the backlog stays in the stream where
  the autoscaler sees it and other pods can take it.
* New tasks come with XREADGROUP, in batches: it reads once half its
  prefetch is free (:func:`mulambda.tasks.records.to_read`), and marks a
  whole batch started in one transaction; every ``visibility / 4`` seconds it also
  claims tasks other pods took and stopped renewing for
  ``MULAMBDA_TASK_VISIBILITY_SECONDS`` (a killed pod), and renews its own
  every ``visibility / 3``, so a slow model is never mistaken for a dead pod.
* An answer decides (:func:`mulambda.tasks.records.after_answer`): 2xx is the
  result, a 4xx the model's refusal of the task itself (dead letter at once:
  no attempt would do better), anything else is retried by whoever claims
  it next, until the task's attempts run out (dead letter with the last
  error). Outcomes are written by group commit (:class:`OutcomeWriter`):
  the first at once, the ones that finish meanwhile together in the next
  transaction. A store outage is counted and the loop goes on; a task whose
  outcome could not be written is delivered again.
* SIGTERM: no new tasks; running ones get ``MULAMBDA_TASK_DRAIN_SECONDS`` to
  finish, the rest go back to the queue at once, their cut attempt not
  counted. A task the model has answered is not cut: its outcome is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from mulambda.httpd import BodyTooLarge, read_at_most
from mulambda.store.records import StoreUnavailable
from mulambda.tasks.queue import Finished, Message, TaskQueue
from mulambda.tasks.records import Next, Status, after_answer, outcome, read_result, to_read

log = logging.getLogger("mulambda.companion.worker")

# How long one XREADGROUP waits for a task; also how soon a stop is noticed while idle.
READ_BLOCK_MS = 500
# A failed answer's text is only a reason: read this much of it at most.
_ERROR_TEXT_BYTES = 64 << 10
_STORE_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)


class Worker:
    """Runs the tasks of one executor in one pod (see the module docstring)."""

    def __init__(self, queue: TaskQueue, *, executor: str, consumer: str, model: str,
                 serving_url: str, concurrency: int, visibility: float, drain: float,
                 predict_timeout: float, ready: Callable[[], bool],
                 max_result_bytes: int = 16 << 20,
                 registry: CollectorRegistry | None = None) -> None:
        self.queue = queue
        self.executor = executor
        self.consumer = consumer
        self.model = model
        self.serving_url = serving_url.rstrip("/")
        self.concurrency = max(1, concurrency)
        # TF Serving sees at most ``concurrency`` tasks at once; as many more may be taken
        # ahead, so a slot never waits for the store round trips of its next task.
        self.slots = asyncio.Semaphore(self.concurrency)
        self.prefetch = self.concurrency
        self.visibility_ms = max(1, int(visibility * 1000))
        self.drain = drain
        self.predict_timeout = predict_timeout
        self.max_result_bytes = max_result_bytes
        self.ready = ready
        self.running: dict[asyncio.Task[None], Message] = {}
        self.finishing: set[asyncio.Task[None]] = set()  # past the model: writing
        self.freed = asyncio.Event()  # a running task ended: room to read more
        self.outcomes = OutcomeWriter(queue, executor)
        r = registry or CollectorRegistry()
        self.tasks = Counter("mulambda_companion_tasks", "Tasks this worker ended, by outcome "
                             "(succeeded, dead_letter, retry, skipped, duplicate, returned)",
                             ["outcome"], registry=r)
        self.busy = Gauge("mulambda_companion_tasks_running", "Tasks running in this pod",
                          registry=r)
        self.store_errors = Counter("mulambda_companion_task_store_errors",
                                    "Store calls of the worker that failed", registry=r)

    async def run(self, stop: asyncio.Event) -> None:
        """Pull and run tasks until ``stop``, then drain (see the module docstring)."""
        # aiohttp rather than httpx: at tens of tasks per second per pod the client's own
        # CPU per request is what the queue adds to a direct call (bench/async_tasks.py).
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.predict_timeout))
        renew = asyncio.create_task(self._renew_forever(stop), name="task-renew")
        failures = 0
        next_reclaim = 0.0
        try:
            while not stop.is_set():
                if not self.ready():
                    await _wait(stop, 0.1)
                    continue
                count = to_read(len(self.running), self.concurrency, self.prefetch)
                if count <= 0:
                    self.freed.clear()
                    await _wait(self.freed, 0.5)
                    continue
                try:
                    taken: list[Message] = []
                    if time.monotonic() >= next_reclaim:
                        next_reclaim = time.monotonic() + self.visibility_ms / 4000
                        taken = await self.queue.reclaim(self.executor, self.consumer,
                                                         self.visibility_ms, count)
                    if not taken:
                        taken = await self.queue.read(self.executor, self.consumer, count,
                                                      READ_BLOCK_MS)
                    # Not begun (store down): they stay pending, taken again once their
                    # visibility lapses, their attempt not counted.
                    begun = await self.queue.begin_many([task_id for _, task_id in taken],
                                                        self.consumer)
                    failures = 0
                except StoreUnavailable as exc:
                    self.store_errors.inc()
                    delay = _STORE_RETRY_SECONDS[min(failures, len(_STORE_RETRY_SECONDS) - 1)]
                    failures += 1
                    log.warning("task queue unavailable, retrying delay=%.1f error=%s", delay,
                                exc)
                    await _wait(stop, delay)
                    continue
                for message, (decision, reason, fields) in zip(taken, begun, strict=True):
                    task = asyncio.create_task(
                        self._handle(http, message, decision, reason, fields),
                        name=f"task-{message[1]}")
                    self.running[task] = message
                    task.add_done_callback(self._done)
                self.busy.set(len(self.running))
        finally:
            await self._drain()
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew
            await http.close()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running.pop(task, None)
        self.finishing.discard(task)
        self.freed.set()
        self.busy.set(len(self.running))
        if not task.cancelled() and task.exception() is not None:
            log.error("task handler failed", exc_info=task.exception())

    async def _drain(self) -> None:
        """Let running tasks finish for ``drain`` seconds; give the rest back. Tasks past
        the model (writing what it answered) are let finish: their work is done, and a
        cut write could leave a finished task to be given back."""
        if self.running:
            log.info("draining tasks=%d seconds=%.0f", len(self.running), self.drain)
            await asyncio.wait(list(self.running), timeout=self.drain)
        left = {task: message for task, message in self.running.items()
                if task not in self.finishing}
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await asyncio.gather(*list(self.running), return_exceptions=True)  # the writes
        if left:
            try:
                await self.queue.give_back(self.executor, self.consumer, left.values(),
                                           self.visibility_ms)
                self.tasks.labels(outcome="returned").inc(len(left))
                log.info("tasks returned to the queue tasks=%d", len(left))
            except StoreUnavailable as exc:
                # They come back anyway once their visibility lapses.
                log.warning("tasks not returned, redelivered after the visibility timeout "
                            "tasks=%d error=%s", len(left), exc)

    async def _renew_forever(self, stop: asyncio.Event) -> None:
        while not await _wait(stop, self.visibility_ms / 3000):
            entries = [entry for entry, _ in self.running.values()]
            try:
                await self.queue.touch(self.executor, self.consumer, entries)
            except StoreUnavailable as exc:
                self.store_errors.inc()
                log.warning("task visibility not renewed tasks=%d error=%s", len(entries), exc)

    async def _handle(self, http: aiohttp.ClientSession, message: Message, decision: Next,
                      reason: str, fields: dict[str, str]) -> None:
        entry, task_id = message
        try:
            await self._run_task(http, entry, task_id, decision, reason, fields)
        except StoreUnavailable as exc:
            # Still pending in the stream: delivered again after the visibility timeout.
            self.store_errors.inc()
            log.warning("task outcome not written id=%s error=%s", task_id, exc)

    def _finishing(self) -> None:
        """From here on the handler only writes to the store: a drain lets it finish."""
        task = asyncio.current_task()
        if task is not None:
            self.finishing.add(task)  # type: ignore[arg-type]

    async def _run_task(self, http: aiohttp.ClientSession, entry: str, task_id: str,
                        decision: Next, reason: str, fields: dict[str, str]) -> None:
        """Run a task :meth:`TaskQueue.begin_many` decided on and write what came of it."""
        attempts = int(fields.get("attempts") or 0)
        result_ttl = int(float(fields.get("result_ttl") or 3600))
        if decision is Next.SKIP:
            self._finishing()
            await self.queue.skip(self.executor, entry)
            self.tasks.labels(outcome="skipped").inc()
            return
        if decision is Next.DEAD:
            self._finishing()
            await self._dead(entry, task_id, reason, attempts, result_ttl)
            return
        async with self.slots:
            started = time.perf_counter()
            status, payload, too_large = await self._predict(http, fields.get("body") or "")
        self._finishing()
        if too_large:  # the same input would answer as much again: no attempt does better
            decision, reason = Next.POISON, payload
        else:
            decision, reason = after_answer(status, payload if status != 200 else "")
        if decision is Next.DONE:
            decision, result, reason = read_result(payload)
            if decision is Next.DONE:
                final = outcome(Status.SUCCEEDED, worker=self.consumer, at=time.time(),
                                result=result, attempts=attempts)
                written = await self.outcomes.write(Finished(entry, task_id, final,
                                                             result_ttl))
                self.tasks.labels(outcome="succeeded" if written else "duplicate").inc()
                log.info("task done id=%s attempts=%d seconds=%.3f written=%s", task_id,
                         attempts, time.perf_counter() - started, written)
                return
        limit = int(fields.get("max_attempts") or 1)
        if decision is Next.POISON or attempts >= limit:
            if decision is not Next.POISON:
                reason = f"no result after {attempts} attempt(s); last error: {reason}"
            await self._dead(entry, task_id, reason, attempts, result_ttl)
            return
        await self.queue.retry_later(self.executor, self.consumer, entry, task_id, reason,
                                     self.visibility_ms)
        self.tasks.labels(outcome="retry").inc()
        log.info("task failed, retried id=%s attempts=%d reason=%s", task_id, attempts, reason)

    async def _dead(self, entry: str, task_id: str, reason: str, attempts: int,
                    result_ttl: int) -> None:
        if not await self.queue.dead_letter(self.executor, entry, task_id, reason,
                                            attempts=attempts, worker=self.consumer,
                                            result_ttl=result_ttl):
            self.tasks.labels(outcome="duplicate").inc()  # another delivery ended it first
            return
        self.tasks.labels(outcome="dead_letter").inc()
        log.warning("task dead-lettered id=%s attempts=%d reason=%s", task_id, attempts, reason)

    async def _predict(self, http: aiohttp.ClientSession, body: str) -> tuple[
            int | None, str, bool]:
        """(HTTP status or None without an answer, body or error text, whether the answer
        was longer than ``max_result_bytes``: then the text says so). Read within bounds:
        an answer is held whole in memory, and stored as the result."""
        try:
            async with http.post(f"{self.serving_url}/v1/models/{self.model}:predict",
                                 data=body.encode(),
                                 headers={"Content-Type": "application/json"}) as resp:
                limit = self.max_result_bytes if resp.status == 200 else _ERROR_TEXT_BYTES
                try:
                    raw = await read_at_most(resp.content, resp.content_length, limit,
                                             "the model's answer")
                except BodyTooLarge as exc:
                    if resp.status == 200:
                        return resp.status, f"{exc} (MULAMBDA_TASK_MAX_RESULT_BYTES)", True
                    raw = b"(a longer error text)"
                text = raw.decode(errors="replace")
                return resp.status, text if resp.status == 200 else text[:500], False
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}", False


class OutcomeWriter:
    """Writes the outcomes of one executor's tasks by group commit: the first at once, and
    those that finish while a write is on its way together in the next transaction
    (:meth:`TaskQueue.finish_many`). An idle worker waits for no batch; a busy one pays
    one transaction per batch, not per task."""

    def __init__(self, queue: TaskQueue, executor: str) -> None:
        self.queue = queue
        self.executor = executor
        self._pending: list[tuple[Finished, asyncio.Future[bool]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, finished: Finished) -> bool:
        """Write ``finished``'s outcome and acknowledge its entry; True when this wrote the
        outcome (False: another delivery had). :class:`StoreUnavailable` when the
        transaction failed: nothing of it was written."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((finished, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="task-outcomes")
        return await future

    async def _flush(self) -> None:
        batch: list[tuple[Finished, asyncio.Future[bool]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    written = await self.queue.finish_many(self.executor,
                                                           [done for done, _ in batch])
                except Exception as exc:  # every waiter gets the failure
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), wrote in zip(batch, written, strict=True):
                    if not future.done():
                        future.set_result(wrote)
        finally:
            self._flusher = None
            # Cancelled mid-write (the loop is closing): no waiter may hang.
            for _, future in (*batch, *self._pending):
                future.cancel()
            self._pending = []


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep unless stopped first; True when stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
