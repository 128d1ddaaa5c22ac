"""Asynchronous inference from the SDK: submit a task, fetch its result later by id.

Tasks go through the selector's task API (``mulambda.tasks``), not the store:
the selector checks the caller (its ServiceAccount token) may use the
Client, and tenants' store credentials cannot read any task. Every
submission carries an ``Idempotency-Key`` (a random one unless the caller
passes its own), and a submission whose answer is lost (connection error,
timeout, 502/503/504) is sent again with the same key, so a retry never runs
the model twice::

    async with MulambdaClient(store_url, "shop/app", selector_url=URL) as mu:
        task = await mu.submit([[1.0, 2.0]])
        done = await mu.result(task.id, wait=60)
        print(done.status, done.result)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mulambda.bodies import JSON_HEADERS, json_body
from mulambda.policy.criteria import Criteria

from .errors import MulambdaError, NoMatchingModel

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
FINAL = frozenset({"succeeded", "failed", "cancelled"})
_RETRY_STATUS = frozenset({502, 503, 504})


class TaskError(MulambdaError):
    """The selector refused a call; ``status`` is the HTTP status, ``body`` its answer."""

    def __init__(self, what: str, status: int, body: Any) -> None:
        error = body.get("error", body) if isinstance(body, dict) else body
        super().__init__(f"{what} failed ({status}): {error}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Task:
    """A queued task: its id and where its status is."""

    id: str
    status_url: str
    executor: str
    replayed: bool = False


@dataclass(frozen=True)
class TaskStatus:
    """What ``GET /v1/tasks/ID`` said: ``status`` is pending, running, succeeded (with
    ``result``), failed (with ``reason``) or cancelled."""

    id: str
    status: str
    result: Any = None
    reason: str | None = None
    attempts: int = 0
    executor: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.status in FINAL


class TaskClient:
    """The task API of one selector for one Client (``NAMESPACE/NAME``), and its
    selection as a demand signal (:meth:`wake`).

    ``token``: a bearer token; by default the pod's ServiceAccount token, read
    again for every call (kubelets rotate it), or none outside a pod.
    """

    def __init__(self, selector_url: str, client_id: str, *, token: str | None = None,
                 token_file: Path | None = SERVICE_ACCOUNT_TOKEN,
                 http: httpx.AsyncClient | None = None, timeout: float = 30.0,
                 submit_attempts: int = 3) -> None:
        namespace, _, name = client_id.partition("/")
        if not namespace or not name:
            raise ValueError(f"client id must be NAMESPACE/NAME, got {client_id!r}")
        self.client_id = client_id
        self.base = selector_url.rstrip("/")
        self.token = token
        self.token_file = token_file
        self.submit_attempts = max(1, submit_attempts)
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def _headers(self) -> dict[str, str]:
        token = self.token
        if token is None and self.token_file is not None and self.token_file.is_file():
            token = self.token_file.read_text().strip()
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def wake(self, criteria: Criteria | None = None) -> str:
        """Have the selector select for this client: it signals demand for the executor
        it picks and for the cold ones worth waking (how an SDK whose store user may
        not write wakes executors at zero). Returns the executor it picked; raises
        :class:`NoMatchingModel` or :class:`TaskError`."""
        body = criteria.to_request() if criteria is not None else {}
        resp = await self._http.post(f"{self.base}/select/{self.client_id}", json=body,
                                     headers=self._headers())
        answer = _body(resp)
        if resp.status_code == 404 and isinstance(answer, dict):
            raise NoMatchingModel(self.client_id, str(answer.get("reason", "")))
        if resp.status_code != 200 or not isinstance(answer, dict):
            raise TaskError("select", resp.status_code, answer)
        model = answer.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("executor"), str):
            raise TaskError("select", resp.status_code, {"error": "malformed answer",
                                                         "answer": answer})
        return model["executor"]

    async def submit(self, instances: Sized | None = None, *,
                     body: dict[str, Any] | None = None, idempotency_key: str | None = None,
                     params: dict[str, str] | None = None) -> Task:
        """Queue a prediction (``instances``, or a whole TF Serving ``body``)."""
        if (instances is None) == (body is None):
            raise TypeError("pass either instances or body")
        encoded = json_body(body if body is not None else {"instances": instances})
        key = idempotency_key or uuid.uuid4().hex
        namespace, _, name = self.client_id.partition("/")
        url = f"{self.base}/v1/tasks/{namespace}/{name}"
        last: Exception | None = None
        for attempt in range(self.submit_attempts):
            if attempt:
                await asyncio.sleep(min(2.0, 0.2 * 2 ** attempt))
            try:
                resp = await self._http.post(url, content=encoded, params=params, headers={
                    **self._headers(), **JSON_HEADERS, "Idempotency-Key": key})
            except httpx.TransportError as exc:  # the answer may be lost: same key again
                last = exc
                continue
            if resp.status_code in _RETRY_STATUS:
                last = TaskError("submit", resp.status_code, _body(resp))
                continue
            answer = _body(resp)
            if resp.status_code == 404 and isinstance(answer, dict) and answer.get(
                    "error") in ("no matching model", "unknown client"):
                raise NoMatchingModel(self.client_id, str(answer.get("reason", "")))
            if resp.status_code != 202:
                raise TaskError("submit", resp.status_code, answer)
            if not (isinstance(answer, dict) and all(
                    isinstance(answer.get(k), str) for k in ("id", "status_url", "executor"))):
                raise TaskError("submit", resp.status_code, {"error": "malformed answer",
                                                             "answer": answer})
            return Task(answer["id"], answer["status_url"], answer["executor"],
                        resp.headers.get("Idempotent-Replayed") == "true")
        assert last is not None
        raise last

    async def status(self, task_id: str) -> TaskStatus:
        resp = await self._http.get(f"{self.base}/v1/tasks/{task_id}", headers=self._headers())
        answer = _body(resp)
        if resp.status_code != 200 or not isinstance(answer, dict):
            raise TaskError("status", resp.status_code, answer)
        attempts = answer.get("attempts") or 0
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise TaskError("status", resp.status_code, {"error": "malformed answer",
                                                         "answer": answer})
        return TaskStatus(id=task_id, status=str(answer.get("status")),
                          result=answer.get("result"), reason=answer.get("reason"),
                          attempts=attempts, executor=answer.get("executor"), raw=answer)

    async def result(self, task_id: str, wait: float = 0.0) -> TaskStatus:
        """The task's status, waiting up to ``wait`` seconds for it to finish (polled,
        from 0.1 s apart up to 2 s)."""
        deadline = time.monotonic() + wait
        delay = 0.1
        while True:
            current = await self.status(task_id)
            left = deadline - time.monotonic()
            if current.done or left <= 0:
                return current
            await asyncio.sleep(min(delay, left))
            delay = min(2.0, delay * 1.5)

    async def cancel(self, task_id: str) -> TaskStatus:
        """Cancel a pending task; :class:`TaskError` 409 when it already runs or ended."""
        resp = await self._http.delete(f"{self.base}/v1/tasks/{task_id}",
                                       headers=self._headers())
        answer = _body(resp)
        if resp.status_code != 200 or not isinstance(answer, dict):
            raise TaskError("cancel", resp.status_code, answer)
        return TaskStatus(id=task_id, status=str(answer.get("status")), raw=answer)


def _body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text[:500]

