"""A Client's status from a ranking: the sticky selection, top candidates, every reason
docs/design.md lists for Ready and Registered, and the Events."""

from __future__ import annotations

import time
from typing import Any

import pytest

from mulambda.operator.client.status import (
    TOP_CANDIDATES,
    client_status,
    failure,
    selection_events,
    sticky_choice,
)
from mulambda.operator.status import NORMAL, WARNING, Problem, store_unavailable
from mulambda.policy.selection import Criteria, Ranking, rank
from mulambda.store.records import ExecutorRecord, LatencySample, ReplicaRecord, Snapshot

NOW = "2026-12-01T00:00:00Z"
LATER = "2026-12-01T00:05:00Z"
CRITERIA = Criteria(type="t", input="i")


def ranking(latencies: dict[str, float], other_type: tuple[str, ...] = ()) -> Ranking:
    """A ranking of executors ml/NAME (type t) with the given RTTs, plus executors of
    another type that selection turns down."""
    now = time.time()
    executors, replicas, latency = {}, {}, {}
    for name in [*latencies, *other_type]:
        rec = ExecutorRecord(namespace="ml", name=name, model=name, version=1,
                             type="t" if name in latencies else "u", input="i", output="o",
                             accuracy=0.9, rest=f"http://{name}:8501", grpc=f"{name}:8500",
                             state="Ready", service_time_ms=5)
        executors[rec.id] = rec
        replicas[rec.id] = [ReplicaRecord(executor=rec.id, pod="p", state="Available",
                                          expires_at=now + 60)]
        if name in latencies:
            latency[rec.id] = {"p": LatencySample(ms=latencies[name], samples=3,
                                                  expires_at=now + 60)}
    return rank(CRITERIA, Snapshot(executors, replicas, latency, {}, now), client="apps/c")


def derive(ranked: Ranking, previous: dict[str, Any] | None = None, generation: int = 1,
           now: str = NOW):
    return client_status("apps/c", ranked, previous or {}, generation, now)


def conditions(fields: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in fields["conditions"]}


@pytest.mark.parametrize(("ranked", "ready"), [
    pytest.param(ranking({"a": 2.0}), ("True", "Selected"), id="a-match"),
    pytest.param(ranking({}, other_type=("x",)), ("False", "NoMatchingExecutor"),
                 id="none-matches"),
    pytest.param(ranking({}), ("False", "NoMatchingExecutor"), id="nothing-registered"),
])
def test_ready_says_whether_an_executor_is_selected(ranked, ready):
    assert conditions(derive(ranked).fields) == {"Ready": ready,
                                                 "Registered": ("True", "Registered")}


def test_no_match_explains_each_refusal_and_warns_once():
    turned_down = ranking({}, other_type=("x",))
    update = derive(turned_down)
    ready = next(c for c in update.fields["conditions"] if c["type"] == "Ready")
    assert "ml/x" in ready["message"] and "selected" not in update.fields
    assert [(e.type, e.reason) for e in update.events] == [(WARNING, "NoMatchingExecutor")]
    assert derive(turned_down, previous={**update.fields}).events == []


def test_the_selection_carries_endpoint_score_and_since():
    update = derive(ranking({"a": 1.0, "b": 40.0}))
    selected = update.fields["selected"]
    assert selected["executor"] == "ml/a" and selected["since"] == NOW
    assert selected["endpoint"] == {"rest": "http://a:8501", "grpc": "a:8500"}
    assert [(e.type, e.reason, e.message.split(":")[0]) for e in update.events] == [
        (NORMAL, "SelectionChanged", "Selected ml/a (was none)")]
    assert update.fields["observedGeneration"] == 1


def test_an_equal_executor_does_not_take_over_but_a_better_one_does():
    tie = ranking({"a": 2.0, "b": 2.0})
    other = next(c.executor_id for c in tie if c.executor_id != tie[0].executor_id)
    assert sticky_choice(tie, other).executor_id == other
    previous = {"selected": {"executor": other, "score": round(tie[0].score, 3),
                             "since": NOW}}
    kept = derive(tie, previous=previous, now=LATER)
    assert "selected" not in kept.fields and kept.events == []
    better = ranking({"a": 1.0, "b": 40.0})
    moved = derive(better, previous={"selected": {"executor": "ml/b", "since": NOW}},
                   now=LATER)
    assert moved.fields["selected"]["executor"] == "ml/a"
    assert moved.fields["selected"]["since"] == LATER
    assert "ml/a (was ml/b)" in moved.events[0].message


def test_losing_every_match_warns_even_if_ready_was_already_no_match():
    previous = {"selected": {"executor": "ml/a", "score": 0.9},
                "conditions": [{"type": "Ready", "status": "False",
                                "reason": "NoMatchingExecutor", "message": "old"}]}
    update = derive(ranking({}), previous=previous)
    assert [e.reason for e in update.events] == ["NoMatchingExecutor"]


def test_candidates_are_the_top_few_and_only_rewritten_when_they_change():
    ranked = ranking({name: float(i + 1) for i, name in enumerate("abcde")})
    update = derive(ranked)
    assert [c["executor"] for c in update.fields["candidates"]] == [
        c.executor_id for c in ranked[:TOP_CANDIDATES]]
    again = derive(ranked, previous=dict(update.fields))
    assert (again.fields, again.events) == ({}, [])


def test_selection_and_candidates_carry_expected_latency_and_a_one_line_reason():
    ranked = ranking({"a": 1.0, "b": 2.0})
    fields = derive(ranked).fields
    best = ranked[0]
    assert fields["selected"]["expectedLatencyMs"] == round(best.expected_latency_ms, 1)
    first = fields["candidates"][0]
    assert first["expectedLatencyMs"] == round(best.expected_latency_ms, 1)
    assert first["reason"].startswith(f"score {best.score:.3f}, ")
    assert "\n" not in first["reason"] and first["reason"].endswith("warm")


@pytest.mark.parametrize(("was", "now", "others", "told"), [
    ("ml/a", "ml/a", {}, []),
    (None, "ml/a", {"apps/x": "ml/a"}, [
        ("ml/a", "Selected", "Client apps/shop selected this executor (was none); selected by "
                             "2 Clients now.")]),
    ("ml/a", "ml/b", {"apps/x": "ml/a"}, [
        ("ml/b", "Selected", "Client apps/shop selected this executor (was ml/a); selected by "
                             "1 Client now."),
        ("ml/a", "Deselected", "Client apps/shop moved to ml/b; selected by 1 Client now.")]),
    ("ml/a", None, {}, [
        ("ml/a", "Deselected", "Client apps/shop moved to no executor; selected by 0 Clients "
                               "now.")]),
])
def test_a_change_of_selection_is_told_to_both_executors_once(was, now, others, told):
    selections = {**others, **({"apps/shop": now} if now else {})}
    got = selection_events("apps/shop", was, now, selections)
    assert [(e, ev.reason, ev.message) for e, ev in got] == told
    assert all(ev.type == NORMAL for _, ev in got)


def test_store_outage_is_registered_false_and_leaves_ready_alone():
    selected = derive(ranking({"a": 1.0})).fields
    problem = Problem("store down; retrying in 1s.", retry_after=1.0)
    update = store_unavailable(selected, 1, problem, now=NOW)
    assert conditions(update.fields) == {"Ready": ("True", "Selected"),
                                         "Registered": ("False", "StoreUnavailable")}
    assert update.problem == problem
    assert [(e.type, e.reason) for e in update.events] == [(WARNING, "StoreUnavailable")]
    assert store_unavailable({**selected, **update.fields}, 1, problem, now=NOW).events == []


@pytest.mark.parametrize("reason", ["InvalidSpec", "NameConflict", "Rejected"])
def test_what_the_operator_cannot_act_on_sets_ready_false(reason):
    update = failure(reason, "what is wrong", {}, 2, NOW)
    assert conditions(update.fields) == {"Ready": ("False", reason)}
    assert update.problem == Problem("what is wrong")
    assert [(e.type, e.reason) for e in update.events] == [(WARNING, reason)]
    assert failure(reason, "what is wrong", update.fields, 2, NOW).events == []


def workload(replicas: int, ready: int, failure: str | None = None) -> dict[str, Any]:
    conditions = [] if failure is None else [
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": failure}]
    return {"spec": {"replicas": replicas},
            "status": {"readyReplicas": ready, "conditions": conditions}}


REFUSED = ('pods "shop-workload-x" is forbidden: violates PodSecurity "restricted:latest": '
           "allowPrivilegeEscalation != false")


@pytest.mark.parametrize(("deployment", "status", "reason", "says"), [
    pytest.param(workload(2, 2), "True", "WorkloadAvailable", "2/2 workload pods ready",
                 id="available"),
    pytest.param(workload(2, 1), "False", "WorkloadStarting", "1/2 workload pods ready",
                 id="starting"),
    pytest.param(workload(0, 0), "True", "WorkloadAvailable", "0/0", id="scaled-to-zero"),
    pytest.param(workload(1, 0, REFUSED), "False", "WorkloadFailed", "violates PodSecurity",
                 id="pods-refused"),
])
def test_workload_ready_tells_what_the_workload_deployment_reports(deployment, status, reason,
                                                                   says):
    update = client_status("apps/c", ranking({"a": 2.0}), {}, 1, NOW, workload=deployment)
    [cond] = [c for c in update.fields["conditions"] if c["type"] == "WorkloadReady"]
    assert (cond["status"], cond["reason"]) == (status, reason) and says in cond["message"]
    warned = [e for e in update.events if e.reason == "WorkloadFailed"]
    assert [e.type for e in warned] == ([WARNING] if reason == "WorkloadFailed" else [])


def test_a_refused_workload_warns_once_and_the_condition_goes_with_the_workload():
    first = client_status("apps/c", ranking({"a": 2.0}), {}, 1, NOW,
                          workload=workload(1, 0, REFUSED))
    again = client_status("apps/c", ranking({"a": 2.0}), first.fields, 1, LATER,
                          workload=workload(1, 0, REFUSED))
    assert not [e for e in again.events if e.reason == "WorkloadFailed"]
    gone = client_status("apps/c", ranking({"a": 2.0}), first.fields, 2, LATER)
    assert "WorkloadReady" not in conditions(gone.fields)
