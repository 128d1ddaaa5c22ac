"""The task worker of one executor pod: pulls its executor's tasks, calls TF Serving beside
it, writes the outcome (the queue is :mod:`mulambda.tasks.queue`).

* It pulls only while the pod is ready (TF Serving serves the version), at
  most ``MULAMBDA_WORKER_CONCURRENCY`` tasks at once (the executor's target
  concurrency): a pod never holds more than it serves, so the backlog stays
  in the stream where the autoscaler sees it and other pods can take it.
* New tasks come with XREADGROUP; every ``visibility / 4`` seconds it also
  claims tasks other pods took and stopped renewing for
  ``MULAMBDA_TASK_VISIBILITY_SECONDS`` (a killed pod), and renews its own
  every ``visibility / 3``, so a slow model is never mistaken for a dead pod.
* An answer decides (:func:`mulambda.tasks.records.after_answer`): 2xx is the
  result, a 4xx the model's refusal of the task itself (dead letter at once:
  no attempt would do better), anything else is retried by whoever claims
  it next, until the task's attempts run out (dead letter with the last
  error). A store outage is counted and the loop goes on; a task whose
  outcome could not be written is delivered again.
* SIGTERM: no new tasks; running ones get ``MULAMBDA_TASK_DRAIN_SECONDS`` to
  finish, the rest go back to the queue at once, their cut attempt not
  counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from mulambda.store.records import StoreUnavailable
from mulambda.tasks.queue import Message, TaskQueue
from mulambda.tasks.records import Next, Status, after_answer, outcome

log = logging.getLogger("mulambda.companion.worker")

# How long one XREADGROUP waits for a task; also how soon a stop is noticed while idle.
READ_BLOCK_MS = 500
_STORE_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)


class Worker:
    """Runs the tasks of one executor in one pod (see the module docstring)."""

    def __init__(self, queue: TaskQueue, *, executor: str, consumer: str, model: str,
                 serving_url: str, concurrency: int, visibility: float, drain: float,
                 predict_timeout: float, ready: Callable[[], bool],
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
        self.ready = ready
        self.running: dict[asyncio.Task[None], Message] = {}
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
                free = self.concurrency + self.prefetch - len(self.running)
                if free <= 0:
                    await asyncio.wait(list(self.running), timeout=0.5,
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    taken: list[Message] = []
                    if time.monotonic() >= next_reclaim:
                        next_reclaim = time.monotonic() + self.visibility_ms / 4000
                        taken = await self.queue.reclaim(self.executor, self.consumer,
                                                         self.visibility_ms, free)
                    if not taken:
                        taken = await self.queue.read(self.executor, self.consumer, free,
                                                      READ_BLOCK_MS)
                    failures = 0
                except StoreUnavailable as exc:
                    self.store_errors.inc()
                    delay = _STORE_RETRY_SECONDS[min(failures, len(_STORE_RETRY_SECONDS) - 1)]
                    failures += 1
                    log.warning("task queue unavailable, retrying delay=%.1f error=%s", delay,
                                exc)
                    await _wait(stop, delay)
                    continue
                for message in taken:
                    task = asyncio.create_task(self._handle(http, message),
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
        self.busy.set(len(self.running))
        if not task.cancelled() and task.exception() is not None:
            log.error("task handler failed", exc_info=task.exception())

    async def _drain(self) -> None:
        """Let running tasks finish for ``drain`` seconds; give the rest back."""
        if self.running:
            log.info("draining tasks=%d seconds=%.0f", len(self.running), self.drain)
            await asyncio.wait(list(self.running), timeout=self.drain)
        left = dict(self.running)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
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

    async def _handle(self, http: aiohttp.ClientSession, message: Message) -> None:
        entry, task_id = message
        try:
            await self._run_task(http, entry, task_id)
        except StoreUnavailable as exc:
            # Still pending in the stream: delivered again after the visibility timeout.
            self.store_errors.inc()
            log.warning("task outcome not written id=%s error=%s", task_id, exc)

    async def _run_task(self, http: aiohttp.ClientSession, entry: str, task_id: str) -> None:
        decision, reason, fields = await self.queue.begin(task_id, self.consumer)
        attempts = int(fields.get("attempts") or 0)
        result_ttl = int(float(fields.get("result_ttl") or 3600))
        if decision is Next.SKIP:
            await self.queue.skip(self.executor, entry)
            self.tasks.labels(outcome="skipped").inc()
            return
        if decision is Next.DEAD:
            await self._dead(entry, task_id, reason, attempts, result_ttl)
            return
        async with self.slots:
            started = time.perf_counter()
            status, payload = await self._predict(http, fields.get("body") or "")
        decision, reason = after_answer(status, payload if status != 200 else "")
        if decision is Next.DONE:
            try:
                result = json.loads(payload)
            except ValueError:
                decision, reason = Next.RETRY, "the model answered something that is not JSON"
            else:
                final = outcome(Status.SUCCEEDED, worker=self.consumer, at=time.time(),
                                result=result, attempts=attempts)
                written = await self.queue.finish(self.executor, entry, task_id, final,
                                                  result_ttl)
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
        await self.queue.dead_letter(self.executor, entry, task_id, reason, attempts=attempts,
                                     worker=self.consumer, result_ttl=result_ttl)
        self.tasks.labels(outcome="dead_letter").inc()
        log.warning("task dead-lettered id=%s attempts=%d reason=%s", task_id, attempts, reason)

    async def _predict(self, http: aiohttp.ClientSession, body: str) -> tuple[int | None, str]:
        """(HTTP status or None without an answer, body or error text)."""
        try:
            async with http.post(f"{self.serving_url}/v1/models/{self.model}:predict",
                                 data=body.encode(),
                                 headers={"Content-Type": "application/json"}) as resp:
                text = await resp.text(errors="replace")
                return resp.status, text if resp.status == 200 else text[:500]
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep unless stopped first; True when stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
