"""Where a request's outcome is counted during a rollout or an experiment, and the shadow
copies of a Shadow rollout; shared by the SDK and the gateway.

A shadow copy is sent after the caller has its answer, in the background:
its answer is never returned, and it never delays the caller. At most
``max_inflight`` copies are in flight per process; beyond that a copy is
dropped (counted in :attr:`ShadowCopies.dropped`) rather than queued, so a
slow candidate cannot pile up work or memory. Each copy's latency, error
and agreement with the stable answer (:func:`mulambda.policy.rollout.agree`)
go to the outcome counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from mulambda.bodies import JSON_HEADERS
from mulambda.policy.experiment import Experiment
from mulambda.policy.rollout import CANDIDATE, ArmChoice, agree, shadow_url
from mulambda.store.outcomes import SERVED_RUN, OutcomeRecorder, served_subject

log = logging.getLogger("mulambda.sdk")


def count_outcome(recorder: OutcomeRecorder, executor_id: str, arms: dict[str, ArmChoice],
                  experiment: Experiment | None, *, ok: bool, ms: float) -> None:
    """Count one attempt at ``executor_id``: for the executor's served requests (every
    executor, per minute) and for its rollout arm and its experiment arm."""
    recorder.record(served_subject(time.time()), SERVED_RUN, executor_id, ok=ok,
                    ms=ms if ok else None)
    choice = arms.get(executor_id)
    if choice is not None:
        recorder.record(choice.subject, choice.rollout, choice.arm, ok=ok, ms=ms if ok else None)
    if experiment is not None and any(e == executor_id for e, _ in experiment.arms):
        recorder.record(experiment.subject, experiment.id, executor_id, ok=ok,
                        ms=ms if ok else None)


class ShadowCopies:
    """Bounded fire-and-forget copies of requests to a Shadow rollout's candidate."""

    def __init__(self, recorder: OutcomeRecorder, *, max_inflight: int = 32,
                 timeout: float = 10.0) -> None:
        self.recorder = recorder
        self.max_inflight = max_inflight
        self.timeout = timeout
        self.dropped = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None

    def send(self, choice: ArmChoice, model: str, body: bytes, baseline: Any,
             pick: float) -> bool:
        """Copy ``body`` to the candidate of ``choice`` (a Shadow rollout's stable arm was
        chosen) and compare its predictions with ``baseline``; False when none was sent."""
        url = shadow_url(choice, pick)
        if url is None:
            return False
        if len(self._tasks) >= self.max_inflight:
            self.dropped += 1
            return False
        task = asyncio.get_running_loop().create_task(
            self._copy(choice, f"{url}/v1/models/{model}:predict", body, baseline))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _copy(self, choice: ArmChoice, url: str, body: bytes, baseline: Any) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout)
        started = time.perf_counter()
        try:
            resp = await self._http.post(url, content=body, headers=JSON_HEADERS)
            ms = (time.perf_counter() - started) * 1000
            answer = resp.json().get("predictions") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            log.info("shadow copy failed executor=%s error=%s", choice.executor_id, exc)
            self.recorder.record(choice.subject, choice.rollout, CANDIDATE, ok=False)
            return
        if answer is None:
            self.recorder.record(choice.subject, choice.rollout, CANDIDATE, ok=False)
            return
        self.recorder.record(choice.subject, choice.rollout, CANDIDATE, ok=True, ms=ms,
                             agreed=agree(answer, baseline))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
