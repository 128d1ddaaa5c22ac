"""How a Client's status is derived from a ranking: pure functions, no I/O.

Conditions the operator sets:

- ``Registered``: the Client's record is in the metadata store.
- ``Ready``: an executor is selected (``Selected``) or none matches
  (``NoMatchingExecutor``, the message says why each was turned down). While
  the store is down Ready keeps its last value: nothing new is known.
- ``WorkloadReady`` (only with ``spec.workload``): the workload Deployment has
  all its replicas ready (``WorkloadAvailable``), is on its way
  (``WorkloadStarting``), or its pods are refused (``WorkloadFailed``, with the
  ReplicaSet controller's sentence: a template that breaks the namespace's
  Pod Security level, an exceeded quota).

``status.selected`` is sticky (:func:`sticky_choice`) and, like
``status.candidates`` (the top three, each with its expected latency and a
one-line reason from :mod:`mulambda.policy.explain`), written only when the
choice or a rounded score changes: scores carry measured latencies that move
every probe, so ``expectedLatencyMs`` is as of the last such write.

A change of selection is also told on the executors' side
(:func:`selection_events`): ``Selected`` on the new one and ``Deselected``
on the old one, each saying how many Clients select it now.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mulambda.policy.explain import candidate_summary
from mulambda.policy.selection import DEFAULT_POLICY, Candidate, Ranking

from ..k8s.conditions import (
    FALSE,
    TRUE,
    condition,
    conditions_equal,
    get_condition,
    merge_conditions,
    now_iso,
)
from ..status import Event, StatusUpdate, failed

TOP_CANDIDATES = 3


def sticky_choice(ranking: Ranking, current: str | None) -> Candidate:
    """The best candidate, but keep the current one while it is as good (within the
    tie tolerance): the SDK spreads ties per request; the Client's status should
    not flap between equals every probe interval."""
    best = ranking[0]
    if current is None or current == best.executor_id:
        return best
    for c in ranking:
        if c.executor_id == current:
            if best.score - c.score <= DEFAULT_POLICY.tie_tolerance and c.warm == best.warm:
                return c
            break
    return best


def _summary(entry: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    """What makes a selection or candidate worth a status write: who, and the score to 0.01."""
    if not entry:
        return None
    return entry.get("executor"), round(float(entry.get("score") or 0), 2)


def workload_condition(deployment: Mapping[str, Any]) -> dict[str, str]:
    """``WorkloadReady`` from the workload Deployment as the API server reports it."""
    want = int((deployment.get("spec") or {}).get("replicas") or 0)
    status = deployment.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    failure = next((c for c in status.get("conditions") or []
                    if c.get("type") == "ReplicaFailure" and c.get("status") == "True"), None)
    if failure is not None:
        return condition("WorkloadReady", FALSE, "WorkloadFailed",
                         f"{ready}/{want} workload pods ready; "
                         f"{failure.get('reason') or 'ReplicaFailure'}: "
                         f"{failure.get('message') or 'the ReplicaSet cannot create pods'}")
    if ready >= want:
        return condition("WorkloadReady", TRUE, "WorkloadAvailable",
                         f"{ready}/{want} workload pods ready.")
    return condition("WorkloadReady", FALSE, "WorkloadStarting",
                     f"{ready}/{want} workload pods ready.")


def client_status(
    client_id: str, ranking: Ranking, previous: Mapping[str, Any], generation: int,
    now: str | None = None, workload: Mapping[str, Any] | None = None,
) -> StatusUpdate:
    """Selection, top candidates, Registered and Ready from a fresh ranking, and
    WorkloadReady from the workload Deployment when there is one."""
    stamp = now or now_iso()
    old_conditions = previous.get("conditions")
    if workload is None and get_condition(old_conditions, "WorkloadReady") is not None:
        # spec.workload is gone, and the Deployment with it: so is what was said of it.
        old_conditions = [c for c in old_conditions or [] if c.get("type") != "WorkloadReady"]
    old_selected = previous.get("selected") or {}
    current = old_selected.get("executor")
    updates = [condition("Registered", TRUE, "Registered",
                         f"Registered in the metadata store as {client_id}.")]
    events: list[Event] = []
    if workload is not None:
        verdict = workload_condition(workload)
        updates.append(verdict)
        was = get_condition(old_conditions, "WorkloadReady") or {}
        if verdict["reason"] == "WorkloadFailed" and was.get("reason") != "WorkloadFailed":
            events.append(Event.warning(reason="WorkloadFailed", message=verdict["message"]))
    selected: dict[str, Any] | None = None
    if ranking:
        best = sticky_choice(ranking, current)
        kept = current == best.executor_id
        selected = {
            "executor": best.executor_id,
            "endpoint": {"rest": best.record.rest, "grpc": best.record.grpc},
            "score": round(best.score, 3),
            "expectedLatencyMs": round(best.expected_latency_ms, 1),
            "reason": best.reason,
            "since": old_selected.get("since") if kept else stamp,
        }
        updates.append(condition("Ready", TRUE, "Selected", f"Selected {best.executor_id}."))
        if not kept:
            events.append(Event.normal(
                reason="SelectionChanged",
                message=f"Selected {best.executor_id} (was {current or 'none'}): {best.reason}"))
    else:
        explain = ranking.explain()
        updates.append(condition("Ready", FALSE, "NoMatchingExecutor", explain))
        old_ready = get_condition(old_conditions, "Ready") or {}
        if current is not None or old_ready.get("reason") != "NoMatchingExecutor":
            events.append(Event.warning(reason="NoMatchingExecutor", message=explain))
    candidates = [{"executor": c.executor_id, "score": round(c.score, 3),
                   "expectedLatencyMs": round(c.expected_latency_ms, 1),
                   "reason": candidate_summary(c)}
                  for c in ranking[:TOP_CANDIDATES]]

    fields: dict[str, Any] = {}
    conditions = merge_conditions(old_conditions, updates, generation, stamp)
    if not conditions_equal(previous.get("conditions"), conditions):
        fields["conditions"] = conditions
    if _summary(previous.get("selected")) != _summary(selected):
        fields["selected"] = selected
    if ([_summary(c) for c in previous.get("candidates") or []]
            != [_summary(c) for c in candidates]):
        fields["candidates"] = candidates
    if previous.get("observedGeneration") != generation:
        fields["observedGeneration"] = generation
    return StatusUpdate(fields, events)


def failure(
    reason: str, detail: str, previous: Mapping[str, Any], generation: int,
    now: str | None = None,
) -> StatusUpdate:
    """Ready False with ``reason`` (``InvalidSpec``, ``NameConflict``, ``Rejected``): the
    operator cannot act on the Client as it is."""
    return failed(previous, generation, reason, detail, ("Ready",), now)


def selection_events(client_id: str, was: str | None, now: str | None,
                     selections: Mapping[str, str]) -> list[tuple[str, Event]]:
    """(executor id, Event) for the executors a change of ``client_id``'s selection from
    ``was`` to ``now`` concerns; ``selections`` is every Client's choice after the change
    (client id -> executor id). Nothing when the selection did not change."""
    if was == now:
        return []

    def chosen_by(executor: str) -> str:
        n = sum(1 for e in selections.values() if e == executor)
        return f"selected by {n} Client{'' if n == 1 else 's'} now"

    out = []
    if now is not None:
        out.append((now, Event.normal(
            reason="Selected",
            message=f"Client {client_id} selected this executor (was {was or 'none'}); "
                    f"{chosen_by(now)}.")))
    if was is not None:
        out.append((was, Event.normal(
            reason="Deselected",
            message=f"Client {client_id} moved to {now or 'no executor'}; "
                    f"{chosen_by(was)}.")))
    return out
