"""The autoscaler's step for one executor (``mulambda.policy.scaling.decide``), without I/O.

Every ``MULAMBDA_AUTOSCALE_INTERVAL_SECONDS`` the operator's fleet-wide tick
(``fleet.py``) samples every executor's demand from the store in one pipelined
read (in-flight leases the SDK publishes, and the arrival rate, which counts
selector requests and activation signals for executors at zero; concurrency is
at least rate x service time, Little's law) plus its backlog of asynchronous
tasks (``mulambda.tasks``: queued or running, one XLEN and XRANGE per executor
in one more pipeline; a queued task wakes an executor at zero;
``status.scaling.queueDepth`` and ``oldestTaskAgeSeconds`` show it), asks the
pure decision function for the desired replicas, patches the Deployment when
that differs, and records the decision in ``status.scaling`` with an Event.
The demand window and the decision state live in memory: a restarted operator
starts a fresh state that counts the current replicas as just wanted and its
idle clock from now, so a restart errs towards keeping replicas, never towards
dropping them.

Cold start: when an executor is activated from zero, the time until its
first ready replica is measured, shown in ``status.scaling.lastColdStartSeconds``
and exported as the ``mulambda_cold_start_seconds`` histogram.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from mulambda.api.modelexecutor import ModelExecutorSpec
from mulambda.policy.scaling import (
    DemandWindow,
    Reason,
    Sample,
    ScalingState,
    decide,
    record_sample,
    window_horizon,
)
from mulambda.policy.selection import DEFAULT_POLICY

from ..k8s.children import owned_by
from ..k8s.objects import ObjectRef
from ..status import Event, StatusUpdate

COLD_START = Histogram(
    "mulambda_cold_start_seconds", "Time from activation at zero to the first ready replica",
    ["executor"], buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
DESIRED = Gauge("mulambda_executor_desired_replicas", "Replicas the autoscaler wants",
                ["executor"])
READY = Gauge("mulambda_executor_ready_replicas",
              "Ready replicas of the executor's Deployment at the last autoscaler tick",
              ["executor"])
DECISIONS = Counter("mulambda_scaling_decisions_total", "Replica changes by reason",
                    ["executor", "reason"])
QUEUE_DEPTH = Gauge("mulambda_task_queue_depth",
                    "Asynchronous tasks queued or running for the executor (mulambda.tasks)",
                    ["executor"])
OLDEST_TASK = Gauge("mulambda_task_oldest_age_seconds",
                    "Age of the executor's oldest task not finished yet", ["executor"])


class Windows:
    """Per-executor demand windows and decision states, kept in the operator's memory."""

    def __init__(self) -> None:
        self.windows: dict[str, DemandWindow] = {}
        self.states: dict[str, ScalingState] = {}

    def forget(self, executor: str) -> None:
        self.windows.pop(executor, None)
        self.states.pop(executor, None)
        for metric in (DESIRED, READY, COLD_START, QUEUE_DEPTH, OLDEST_TASK):
            try:
                metric.remove(executor)
            except KeyError:
                pass  # never observed
        for reason in Reason:
            try:
                DECISIONS.remove(executor, str(reason))
            except KeyError:
                pass


# Requests at once a sample may say (see plan).
MAX_DEMAND = 1e9


def plan(
    memory: Windows, executor: ObjectRef, spec: ModelExecutorSpec, previous: Mapping[str, Any],
    deployment: dict[str, Any] | None, load: tuple[int, float], now: float,
    backlog: tuple[int, float] = (0, 0.0),
) -> tuple[StatusUpdate, int | None]:
    """One autoscaling step for one executor, without I/O: ``status.scaling`` with the
    Events of what happened, and the replicas to patch the Deployment to (None: keep).

    ``deployment`` is the executor's Deployment as the watch cache has it
    (``None``: not created yet, nothing to scale); ``load`` its (in-flight
    requests, arrivals per second) from the store; ``backlog`` its asynchronous tasks
    (queued or running, age of the oldest in seconds).
    """
    eid = executor.id
    policy = spec.scaling
    if deployment is None or not owned_by(deployment, executor):
        return StatusUpdate(), None  # not created yet, or someone else's (NameConflict)
    current = int(deployment.get("spec", {}).get("replicas") or 0)
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    scaling_status = dict(previous.get("scaling") or {})
    inflight, rate = load
    # Little's law: arrivals that nobody reports as in flight (selector users)
    # still occupy rate x service time of capacity.
    service_s = (spec.traits.service_time_ms or DEFAULT_POLICY.default_service_time_ms) / 1000
    # The task backlog is demand too (a queued task wakes an executor at zero), but
    # not head for head: with the arrival rate (task submissions count as arrivals)
    # and the service time it is sized to drain (scaling.effective_concurrency).
    depth, oldest = backlog
    # Bounded (far above any maxReplicas x targetConcurrency): a rate forged in the
    # demand counters times a long declared service time was infinite, which the
    # sample refuses.
    concurrency = min(max(float(inflight), rate * service_s) + depth, MAX_DEMAND)
    QUEUE_DEPTH.labels(eid).set(depth)
    OLDEST_TASK.labels(eid).set(oldest)
    window = record_sample(memory.windows.get(eid, DemandWindow()),
                           Sample(now, concurrency, rate, float(depth), service_s),
                           horizon_seconds=window_horizon(policy))
    memory.windows[eid] = window
    state = memory.states.get(eid)
    if state is None:
        # First tick of this operator process: a fresh state whose idle clock
        # starts now and which counts the current replicas as just wanted, so
        # a (re)started operator never scales down or to zero before a whole
        # scale-down delay / idle window of its own observation.
        state = ScalingState(last_demand_at=now, recent=((now, current),))
    cold_start = float(scaling_status.get("lastColdStartSeconds")
                       or DEFAULT_POLICY.default_cold_start_ms / 1000)
    decision = decide(policy, window, current_replicas=current, ready_replicas=ready,
                      state=state, now=now, cold_start_seconds=cold_start)
    memory.states[eid] = decision.state
    DESIRED.labels(eid).set(decision.desired_replicas)
    READY.labels(eid).set(ready)

    events: list[Event] = []
    new_status = {**scaling_status, **decision.to_status(), "currentReplicas": current,
                  "readyReplicas": ready, "queueDepth": depth,
                  "oldestTaskAgeSeconds": round(oldest)}
    target: int | None = None
    if decision.desired_replicas != current:
        target = decision.desired_replicas
        DECISIONS.labels(eid, str(decision.reason)).inc()
        new_status["lastScaleTime"] = _iso(now)
        if current == 0 and decision.desired_replicas > 0:
            new_status["activatedAt"] = now
        events.append(Event.normal(
            reason=str(decision.reason),
            message=f"Scaled {current} -> {decision.desired_replicas}: {decision.message}"))
    activated = scaling_status.get("activatedAt")
    if activated is not None and ready > 0:
        cold = max(0.0, now - float(activated))
        COLD_START.labels(eid).observe(cold)
        new_status["activatedAt"] = None  # a merge patch deletes a key set to null
        new_status["lastColdStartSeconds"] = round(cold, 3)
        events.append(Event.normal(reason="ColdStart",
                                   message=f"First replica ready {cold:.1f}s after activation"))
    if _meaningful(new_status) == _meaningful(scaling_status):
        return StatusUpdate(events=events), target
    return StatusUpdate({"scaling": new_status}, events), target


def demand_window(spec: ModelExecutorSpec) -> float:
    """How far back the arrival rate is read: two demand buckets at least, so a signal
    late in the previous bucket still counts."""
    return max(20.0, float(spec.scaling.panic_window_seconds))


def _meaningful(s: dict[str, Any]) -> dict[str, Any]:
    """What is worth a status patch: not the per-tick concurrency figures."""
    return {k: v for k, v in s.items() if v is not None
            and k not in {"stableConcurrency", "panicConcurrency", "message"}}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
