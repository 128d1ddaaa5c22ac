"""The pure parts of asynchronous inference: task ids, what a task's fields say, and what
a worker does with an answer. No I/O; :mod:`.queue` stores what these decide."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# NAMESPACE~CLIENT~HEX: "~" is in neither a namespace nor a Client name, so the id names
# its Client and the caller authorization (mulambda.authz) can check it like any route.
_ID = re.compile(r"^(?P<namespace>[a-z0-9]([-a-z0-9]*[a-z0-9])?)~"
                 r"(?P<client>[a-z0-9]([-.a-z0-9]*[a-z0-9])?)~(?P<token>[0-9a-f]{32})$")
# The route patterns of the three parts (aiohttp splits one path segment on them).
ID_ROUTE = r"{namespace:[a-z0-9-]+}~{client:[a-z0-9.-]+}~{task:[0-9a-f]{32}}"
MAX_IDEMPOTENCY_KEY = 256


class Status(StrEnum):
    """What ``GET /v1/tasks/ID`` answers."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})


def new_task_id(client: str) -> str:
    """A fresh, unguessable id naming ``client`` (``NAMESPACE/NAME``)."""
    namespace, _, name = client.partition("/")
    task_id = f"{namespace}~{name}~{secrets.token_hex(16)}"
    if not _ID.match(task_id):
        raise ValueError(f"client {client!r} is not NAMESPACE/NAME")
    return task_id


def client_of(task_id: str) -> str | None:
    """``NAMESPACE/NAME`` of the Client a task id names; None for a malformed id."""
    m = _ID.match(task_id)
    return None if m is None else f"{m['namespace']}/{m['client']}"


def idempotency_problem(key: str) -> str | None:
    """Why an ``Idempotency-Key`` header cannot be used (None: it can)."""
    if not key:
        return "Idempotency-Key is empty"
    if len(key) > MAX_IDEMPOTENCY_KEY:
        return f"Idempotency-Key is longer than {MAX_IDEMPOTENCY_KEY} characters"
    if not key.isprintable():
        return "Idempotency-Key holds control characters"
    return None


@dataclass(frozen=True)
class TaskOptions:
    """The selector's knobs for the tasks it accepts (``MULAMBDA_TASK_*``)."""

    max_payload_bytes: int = 1 << 20
    ttl_seconds: float = 86_400.0
    result_ttl_seconds: float = 3_600.0
    max_attempts: int = 3
    max_open_per_client: int = 1000


def outcome(status: Status, *, worker: str, at: float, result: Any = None,
            reason: str | None = None, attempts: int = 0) -> str:
    """The ``outcome`` field: the final word on a task, written once."""
    body: dict[str, Any] = {"status": str(status), "worker": worker, "finished_at": at,
                            "attempts": attempts}
    if status is Status.SUCCEEDED:
        body["result"] = result
    if reason is not None:
        body["reason"] = reason
    return json.dumps(body, allow_nan=False)


def view(task_id: str, fields: dict[str, str], now: float) -> dict[str, Any]:
    """The answer of ``GET /v1/tasks/ID`` from the task's stored fields (non-empty)."""
    out: dict[str, Any] = {"id": task_id, "executor": fields.get("executor"),
                           "attempts": _int(fields.get("attempts"))}
    created = _float(fields.get("created_at"))
    if created is not None:
        out["created_at"] = created
        out["age_seconds"] = round(max(0.0, now - created), 3)
    done = _decoded(fields.get("outcome"))
    if done is not None:
        out["status"] = str(status_of(fields))
        for key in ("result", "reason", "finished_at", "worker"):
            if key in done:
                out[key] = done[key]
        return out
    if fields.get("started_at"):
        out["status"] = str(Status.RUNNING)
        out["worker"] = fields.get("worker")
    else:
        out["status"] = str(Status.PENDING)
    if fields.get("last_error"):
        out["last_error"] = fields["last_error"]
    return out


def status_of(fields: dict[str, str]) -> Status:
    """The task's status from its stored fields (non-empty)."""
    done = _decoded(fields.get("outcome"))
    if done is not None:
        try:
            return Status(str(done.get("status")))
        except ValueError:
            return Status.FAILED
    return Status.RUNNING if fields.get("started_at") else Status.PENDING


# -- the worker's decisions ----------------------------------------------------------


class Next(StrEnum):
    """What a worker does with a delivered task before or after calling the model."""

    RUN = "run"  # call the model
    SKIP = "skip"  # gone (expired) or already final: acknowledge and drop
    DEAD = "dead"  # out of attempts: to the dead-letter stream, failed with the reason
    DONE = "done"  # answered: write the result
    RETRY = "retry"  # failed in a way another attempt may not: back to the queue
    POISON = "poison"  # the model refuses it: no attempt will do better


def before_run(fields: dict[str, str]) -> tuple[Next, str]:
    """Whether a delivered task runs: (decision, reason for a dead letter)."""
    if not fields:
        return Next.SKIP, "task expired or unknown"
    if status_of(fields) in FINAL:
        return Next.SKIP, "task already finished"
    attempts = _int(fields.get("attempts"))
    limit = max(1, _int(fields.get("max_attempts")) or 1)
    if attempts >= limit:
        last = fields.get("last_error") or "the worker was lost or timed out"
        return Next.DEAD, f"no result after {attempts} attempt(s); last error: {last}"
    return Next.RUN, ""


def to_read(held: int, concurrency: int, prefetch: int) -> int:
    """How many tasks a worker holding ``held`` (waiting, at the model or being written)
    reads now: 0 until half its prefetch is free, then all the room it has.

    A worker holds at most ``concurrency + prefetch``. Reading as soon as one
    task ends costs a read and a start transaction per task; waiting for half
    the prefetch to be free makes them one per batch, while the other half is
    still queued ahead of the model's slots. A worker with an idle slot (held
    below ``concurrency``) always has that much room.
    """
    room = concurrency + prefetch - held
    return room if room >= max(1, prefetch // 2) else 0


def after_answer(status: int | None, detail: str) -> tuple[Next, str]:
    """What an answer of TF Serving means for the task: (decision, reason).

    ``status`` None: no answer (connection refused, timeout). 2xx is the
    result; 4xx other than 408/429 says the request itself is bad, so every
    attempt would fail alike (a poison task); the rest may pass next time.
    """
    if status is None:
        return Next.RETRY, f"no answer from the model: {detail}"
    if 200 <= status < 300:
        return Next.DONE, ""
    if 400 <= status < 500 and status not in (408, 429):
        return Next.POISON, f"the model refused the task (HTTP {status}): {detail}"
    return Next.RETRY, f"the model failed (HTTP {status}): {detail}"


class _Unportable(Exception):
    """A JSON constant (NaN, Infinity) that strict JSON, and so a result, cannot carry."""


def _refuse_constant(name: str) -> Any:
    raise _Unportable(name)


def read_result(payload: str) -> tuple[Next, Any, str]:
    """A 2xx answer's body as the task's result: (DONE, result, ""), or what to do
    instead and why. TF Serving writes NaN and Infinity for such values, which are not
    JSON: the same input gives them again, so the task is a poison one (failed with the
    reason), never one retried until its attempts run out."""
    try:
        return Next.DONE, json.loads(payload, parse_constant=_refuse_constant), ""
    except _Unportable as exc:
        return Next.POISON, None, (f"the model answered {exc}, which a JSON result cannot "
                                   "carry (a NaN or infinite output)")
    except ValueError:
        return Next.RETRY, None, "the model answered something that is not JSON"


def _decoded(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"status": str(Status.FAILED), "reason": "unreadable outcome"}
    return value if isinstance(value, dict) else None


def _int(raw: str | None) -> int:
    try:
        return int(raw or 0)
    except ValueError:
        return 0


def _float(raw: str | None) -> float | None:
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None
