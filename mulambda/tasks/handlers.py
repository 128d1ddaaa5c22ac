"""The task routes of the selector: ``POST /v1/tasks/NAMESPACE/CLIENT`` (202 with an id),
``GET /v1/tasks/ID`` (its status and result) and ``DELETE /v1/tasks/ID`` (cancel).

Selection is the gateway's: the registered Client's criteria (overridable by
query parameters) rank the executors with the selector's snapshot and load,
and the task is queued for the best one, warm or cold (a cold one is woken:
the demand signal now, the backlog on every autoscaler tick). A client whose
criteria match nothing is answered 404 with the reason at once, never queued.
A task id names its Client (``NAMESPACE~NAME~HEX``), so the caller
authorization guards ``GET`` and ``DELETE`` exactly as it guards the Client's
other routes: a tenant cannot read another Client's results.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import Counter

from mulambda.httpd import BodyTimeout, BodyTooLarge, read_body
from mulambda.selector.handlers import _bad_body, _error, _json, _query_criteria, _unavailable
from mulambda.selector.service import SELECTOR_KEY, Selector
from mulambda.store.records import StoreUnavailable

from .queue import TaskQueue, TooManyTasks
from .records import ID_ROUTE, Status, TaskOptions, idempotency_problem, new_task_id, view

log = logging.getLogger("mulambda.tasks")


@dataclass
class Tasks:
    """The task API's state in one selector process."""

    queue: TaskQueue
    options: TaskOptions
    requests: Counter


TASKS_KEY = web.AppKey("tasks", Tasks)
# A Client at its open-task limit asks again after this long (one of its tasks may end).
TOO_MANY_RETRY_SECONDS = 5


def install(app: web.Application, options: TaskOptions) -> None:
    """Add the task routes to the selector's ``app`` (its store and metrics registry)."""
    sel = app[SELECTOR_KEY]
    app[TASKS_KEY] = Tasks(TaskQueue(sel.store), options, Counter(
        "mulambda_task_requests", "Task API requests by route and outcome",
        ["route", "outcome"], registry=sel.registry))
    app.router.add_post("/v1/tasks/{namespace}/{client}", submit)
    app.router.add_get(f"/v1/tasks/{ID_ROUTE}", status)
    app.router.add_delete(f"/v1/tasks/{ID_ROUTE}", cancel)


def _task_id(request: web.Request) -> str:
    m = request.match_info
    return f"{m['namespace']}~{m['client']}~{m['task']}"


async def submit(request: web.Request) -> web.Response:
    sel: Selector = request.app[SELECTOR_KEY]
    tasks = request.app[TASKS_KEY]
    client = f"{request.match_info['namespace']}/{request.match_info['client']}"
    outcome = "error"
    try:
        key = request.headers.get("Idempotency-Key")
        problem = None if key is None else idempotency_problem(key)
        if problem is not None:
            outcome = "bad_request"
            return _error(400, problem)
        try:
            raw = await read_body(request, tasks.options.max_payload_bytes, sel.body_timeout)
            items, _, predict = await sel.inspector.inspect(raw)
        except (BodyTooLarge, BodyTimeout, ValueError) as exc:
            outcome, answer = _bad_body(exc)
            return answer
        if not predict:
            # Said now, not by a worker long after as a failed task.
            outcome = "bad_request"
            return _error(400, "not a TF Serving predict request: a JSON object with "
                          '"instances" or "inputs"')
        try:
            # A replay answers with the task it names before anything is selected: its
            # own executor, even when another is best now or none matches any more.
            found = None if key is None else await tasks.queue.earlier(client, key)
            if found is not None:
                outcome = "replayed"
                return _accepted(*found, created=False)
            snap = await sel.view(client)
            if snap.client_record is None and not request.query.get("type"):
                outcome = "unknown_client"
                return _error(404, "unknown client", reason=f"client {client!r} is not "
                              "registered and the query gives no type")
            try:
                criteria = _query_criteria(request.query, snap.client_record)
            except ValueError as exc:
                outcome = "bad_request"
                return _error(400, str(exc))
            ranking = await sel.ranking(criteria, snap, items=items)
            if not ranking:
                outcome = "no_match"
                return _error(404, "no matching model", reason=ranking.explain())
            best = ranking[0]
            # Every task is an arrival (the autoscaler's rate: with the backlog it sizes
            # replicas to drain it); ``wake`` holds the best one too when it is cold.
            sel.note_demand([best.executor_id, *ranking.wake], list(ranking.wake))
            task_id, created = await tasks.queue.submit(
                new_task_id(client), client=client, executor=best.executor_id,
                model=best.record.model, body=raw.decode("utf-8", "replace"),
                options=tasks.options, idempotency_key=key)
            executor = best.executor_id
            if not created:  # a retry that raced its original: the original's executor
                executor = (await tasks.queue.get(task_id)).get("executor") or executor
        except TooManyTasks as exc:
            outcome = "too_many"
            answer = _error(429, "too many open tasks", client=client, limit=exc.limit,
                            reason="wait for one to end, or cancel one")
            answer.headers["Retry-After"] = str(TOO_MANY_RETRY_SECONDS)
            return answer
        except StoreUnavailable as exc:
            outcome = "store_unavailable"
            log.warning("task not queued client=%s error=%s", client, exc)
            return _unavailable("metadata store unavailable")
        outcome = "queued" if created else "replayed"
        log.info("task %s id=%s client=%s executor=%s warm=%s", outcome, task_id, client,
                 executor, best.warm)
        return _accepted(task_id, executor, created=created)
    finally:
        tasks.requests.labels(route="submit", outcome=outcome).inc()


def _accepted(task_id: str, executor: str, *, created: bool) -> web.Response:
    url = f"/v1/tasks/{task_id}"
    return _json({"id": task_id, "status_url": url, "executor": executor}, status=202,
                 headers={"Location": url, "Idempotent-Replayed": str(not created).lower()})


async def status(request: web.Request) -> web.Response:
    tasks = request.app[TASKS_KEY]
    task_id = _task_id(request)
    outcome = "error"
    try:
        try:
            fields = await tasks.queue.get(task_id)
        except StoreUnavailable:
            outcome = "store_unavailable"
            return _unavailable("metadata store unavailable")
        if not fields:
            outcome = "unknown"
            return _error(404, "unknown task", reason="no such task, or its result expired")
        answer = view(task_id, fields, time.time())
        outcome = answer["status"]
        return _json(answer)
    finally:
        tasks.requests.labels(route="status", outcome=outcome).inc()


async def cancel(request: web.Request) -> web.Response:
    tasks = request.app[TASKS_KEY]
    task_id = _task_id(request)
    outcome = "error"
    try:
        try:
            after = await tasks.queue.cancel(task_id)
        except StoreUnavailable:
            outcome = "store_unavailable"
            return _unavailable("metadata store unavailable")
        if after is None:
            outcome = "unknown"
            return _error(404, "unknown task", reason="no such task, or its result expired")
        if after is not Status.CANCELLED:
            outcome = "conflict"
            return _json({"error": f"task is {after}: only a pending task can be cancelled",
                          "status": str(after)}, status=409)
        outcome = "cancelled"
        return _json({"id": task_id, "status": str(after)})
    finally:
        tasks.requests.labels(route="cancel", outcome=outcome).inc()
