"""mulambda.policy.explain: the ranking laid out for people, read off rank() (pure)."""

from __future__ import annotations

import json
import math

import pytest

from mulambda.policy.explain import CRITERIA, UNREADABLE, criterion_of, explain
from mulambda.policy.selection import Criteria, Preferences, rank
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    Snapshot,
)

NOW = 1_700_000_000.0


def executor(name: str, *, type: str = "vision", input: str = "image", output: str = "label",
             accuracy: float | None = 0.8, service: float | None = 10.0, state: str = "Ready",
             min_replicas: int = 1) -> ExecutorRecord:
    return ExecutorRecord(namespace="ml", name=name, model=name, version=1, type=type,
                          input=input, output=output, accuracy=accuracy,
                          rest=f"http://{name}:8501", grpc=f"{name}:8500", state=state,
                          min_replicas=min_replicas, service_time_ms=service)


def snapshot(*records: ExecutorRecord, live: dict[str, int] | None = None,
             rtt: dict[str, float] | None = None, inflight: dict[str, int] | None = None,
             service: dict[str, ServiceStats] | None = None) -> Snapshot:
    """Every Ready executor has one live Available replica unless ``live`` says otherwise."""
    live, rtt = live or {}, rtt or {}
    replicas: dict[str, list[ReplicaRecord]] = {}
    latency: dict[str, dict[str, LatencySample]] = {}
    for e in records:
        for i in range(live.get(e.name, 1 if e.state == "Ready" else 0)):
            pod = f"{e.name}-{i}"
            replicas.setdefault(e.id, []).append(ReplicaRecord(
                executor=e.id, pod=pod, state="Available", expires_at=NOW + 30))
            if e.name in rtt:
                latency.setdefault(e.id, {})[pod] = LatencySample(ms=rtt[e.name], samples=3)
    return Snapshot({e.id: e for e in records}, replicas, latency,
                    {f"ml/{k}": v for k, v in (inflight or {}).items()}, NOW,
                    service={f"ml/{k}": v for k, v in (service or {}).items()})


# One fixed fleet: two candidates (one warm, one cold) and an executor excluded by each
# criterion rank() applies.
FLEET = snapshot(
    executor("fast", accuracy=0.8, service=5),
    executor("sleepy", accuracy=0.99, service=5, state="ScaledToZero", min_replicas=0),
    executor("words", type="nlp"),
    executor("text-in", input="text"),
    executor("boxes", output="box"),
    executor("nan-accuracy", accuracy=math.nan),
    executor("negative-time", service=-1.0),
    executor("broken", state="Failed"),
    executor("no-heartbeat", state="Ready"),
    executor("inaccurate", accuracy=0.5),
    executor("unknown-accuracy", accuracy=None),
    executor("slow", service=500),
    executor("overflow", service=1e308),
    live={"no-heartbeat": 0},
    rtt={"fast": 2.0, "slow": 2.0},
    inflight={"overflow": 3},
)
CRITERIA_OF_FLEET = Criteria(type="vision", input="image", output="label",
                             max_latency_ms=100, min_accuracy=0.7)


@pytest.mark.parametrize(("executor_id", "criterion", "reason_start"), [
    ("ml/words", "type", "wrong type: has 'nlp'"),
    ("ml/text-in", "input", "wrong input: has 'text'"),
    ("ml/boxes", "output", "wrong output: has 'box'"),
    ("ml/nan-accuracy", "record", "invalid record: accuracy"),
    ("ml/negative-time", "record", "invalid record: service"),
    ("ml/broken", "serving", "not serving: state Failed"),
    ("ml/no-heartbeat", "serving", "not serving: Ready but no live"),
    ("ml/inaccurate", "min_accuracy", "below min accuracy: 0.5 < 0.7"),
    ("ml/unknown-accuracy", "min_accuracy", "below min accuracy: accuracy unknown"),
    ("ml/slow", "max_latency", "over max latency: expected"),
    ("ml/overflow", "measurement", "invalid measurement: expected latency is not finite"),
    ("ml/garbage", "record", UNREADABLE),
])
def test_each_excluded_executor_names_the_criterion_that_excluded_it(
        executor_id: str, criterion: str, reason_start: str) -> None:
    found = explain(CRITERIA_OF_FLEET, FLEET, client="apps/shop", unreadable=["ml/garbage"])
    verdict = next(v for v in found.excluded if v.executor == executor_id)
    assert verdict.criterion == criterion
    assert verdict.reason.startswith(reason_start)
    assert verdict.line == f"{executor_id}: excluded by {criterion} ({verdict.reason})"


def test_every_executor_is_accounted_for_once() -> None:
    found = explain(CRITERIA_OF_FLEET, FLEET, unreadable=["ml/garbage", "ml/fast"])
    named = [v.executor for v in found.candidates + found.excluded]
    # An id that decoded (ml/fast is in the snapshot) is never called unreadable.
    assert sorted(named) == sorted([*FLEET.executors, "ml/garbage"])
    assert [v.executor for v in found.candidates] == ["ml/fast", "ml/sleepy"]
    assert [v.executor for v in found.excluded] == sorted(v.executor for v in found.excluded)


def test_candidates_carry_ranks_own_figures_and_their_parts_add_up() -> None:
    found = explain(CRITERIA_OF_FLEET, FLEET)
    ranking = rank(CRITERIA_OF_FLEET, FLEET)
    prefs = Preferences.of(CRITERIA_OF_FLEET)
    assert [(v.executor, v.candidate.score) for v in found.candidates] == [
        (c.executor_id, c.score) for c in ranking]
    for position, verdict in enumerate(found.candidates, start=1):
        c = verdict.candidate
        assert verdict.position == position and verdict.criterion is None
        assert c.network_ms + c.service_ms + c.load_ms + c.cold_start_ms == pytest.approx(
            c.expected_latency_ms)
        # The utilities are the score's two terms: weighed, they give the score back.
        recomposed = ((prefs.latency_weight * c.latency_utility
                       + prefs.accuracy_weight * c.accuracy_utility)
                      / (prefs.latency_weight + prefs.accuracy_weight))
        assert recomposed == pytest.approx(c.score, abs=1e-9)
    cold = found.candidates[1].candidate
    assert not cold.warm and cold.cold_start_ms == 30_000.0
    assert cold.accuracy_utility == 1.0  # the most accurate candidate
    assert found.wake == ["ml/sleepy"]


@pytest.mark.parametrize(("name", "criteria", "records", "options", "winner", "why"), [
    ("only candidate", Criteria(type="vision"),
     [executor("a"), executor("b", type="nlp")], {},
     "ml/a", "ml/a is the only candidate (1 excluded: 1 by type)."),
    ("latency decides", Criteria(type="vision", latency_weight=3, accuracy_weight=1),
     [executor("quick", service=5), executor("slowish", service=60)], {"rtt": {"quick": 1,
                                                                              "slowish": 1}},
     "ml/quick", "decided by latency: latency 6.0 vs 61.0 ms"),
    ("accuracy decides", Criteria(type="vision", latency_weight=1, accuracy_weight=3),
     [executor("rough", accuracy=0.6, service=5), executor("exact", accuracy=0.99,
                                                            service=8)],
     {"rtt": {"rough": 1, "exact": 1}},
     "ml/exact", "decided by accuracy"),
    ("cold runner-up", Criteria(type="vision"),
     [executor("warm"), executor("asleep", state="ScaledToZero", min_replicas=0)], {},
     "ml/warm", "ml/asleep expects 30015.0 ms, over it, so it ranks after every candidate "
     "within it, whatever its accuracy; ml/asleep is cold (its latency includes a 30000 ms "
     "cold start)"),
    ("measured cold start", Criteria(type="vision"),
     [executor("warm", accuracy=0.9), executor("asleep", accuracy=0.9, state="ScaledToZero",
                                               min_replicas=0)],
     {"service": {"asleep": ServiceStats(cold_ms=300.0, cold_count=2)}},
     "ml/warm", "decided by latency: latency 15.0 vs 315.0 ms (utility 0.870 vs 0.241, "
     "weight 50%), accuracy 0.900 vs 0.900 (utility 1.000 vs 1.000, weight 50%); ml/asleep "
     "is cold (its latency includes a 300 ms cold start)."),
    ("tie", Criteria(type="vision"),
     [executor("twin-b"), executor("twin-a")], {"rtt": {"twin-a": 2, "twin-b": 2}},
     "ml/twin-a", "ml/twin-a and ml/twin-b are near-equal"),
    ("ceiling", Criteria(type="vision", latency_weight=0.1, accuracy_weight=10),
     [executor("ok", accuracy=0.5, service=10),
      executor("loaded", accuracy=0.99, service=400)], {"inflight": {"loaded": 4}},
     "ml/ok", "ml/ok is within the latency ceiling (1000 ms); ml/loaded expects"),
])
def test_why_the_winner_won(name: str, criteria: Criteria, records: list[ExecutorRecord],
                            options: dict, winner: str, why: str) -> None:
    found = explain(criteria, snapshot(*records, **options))
    assert found.winner == winner, name
    assert why in found.why, (name, found.why)


def test_a_tie_lists_the_near_equal_candidates_and_is_deterministic() -> None:
    snap = snapshot(executor("twin-b"), executor("twin-a"), executor("far", service=80),
                    rtt={"twin-a": 2, "twin-b": 2, "far": 2})
    first = explain(Criteria(type="vision"), snap)
    assert first.near_equal == ["ml/twin-a", "ml/twin-b"]
    assert first.to_dict() == explain(Criteria(type="vision"), snap).to_dict()


@pytest.mark.parametrize(("records", "unreadable", "why"), [
    ([], [], "no executor is registered (wanted type='vision')"),
    ([executor("a", type="nlp"), executor("b", state="Failed")], [],
     "no executor matches type='vision' among 2 registered"),
    ([executor("a", type="nlp")], ["ml/garbage"],
     "no candidate; excluded: 1 by record, 1 by type"),
])
def test_nothing_matches_says_why(records: list[ExecutorRecord], unreadable: list[str],
                                  why: str) -> None:
    found = explain(Criteria(type="vision"), snapshot(*records), unreadable=unreadable)
    assert found.winner is None and found.candidates == [] and found.near_equal == []
    assert found.why.startswith(why)


def test_json_is_strict_even_with_impossible_records_in_the_snapshot() -> None:
    data = explain(CRITERIA_OF_FLEET, FLEET, client="apps/shop",
                   unreadable=["ml/garbage"]).to_dict()
    text = json.dumps(data, allow_nan=False)  # raises on NaN or an infinity
    back = json.loads(text)
    assert back["winner"] == "ml/fast" and back["client"] == "apps/shop"
    fast = back["candidates"][0]
    assert fast["latency_ms"] == {"network": 2.0, "service": 5.0, "load": 0.0,
                                  "cold_start": 0.0, "expected": 7.0}
    assert fast["accuracy"] == {"declared": 0.8, "assumed": 0.8}
    assert fast["utility"]["latency"] == pytest.approx(100 / 107, abs=1e-3)
    assert {v["executor"]: v["criterion"] for v in back["excluded"]}["ml/nan-accuracy"] == (
        "record")


@pytest.mark.parametrize(("reason", "criterion"), [
    *((f"{start}: something", name) for start, name in CRITERIA.items()),
    ("a reason nobody wrote yet", "other"),
])
def test_criterion_of_reads_the_start_of_a_reason(reason: str, criterion: str) -> None:
    assert criterion_of(reason) == criterion


def test_rollouts_and_the_clients_experiment_are_named_in_routing() -> None:
    canary = executor("canary")
    canary.rollout = {"id": "r1", "strategy": "Canary", "weight": 20, "version": 2,
                      "rest": "http://canary-candidate:8501", "grpc": ""}
    shadow = executor("shadow")
    shadow.rollout = {"id": "r2", "strategy": "Shadow", "weight": 0, "version": None,
                      "rest": "http://shadow-candidate:8501", "grpc": ""}
    snap = snapshot(canary, shadow, executor("plain"), rtt={"canary": 1, "shadow": 1,
                                                           "plain": 1})
    snap.client_record = ClientRecord(
        namespace="apps", name="shop", type="vision",
        experiment={"id": "e1", "arms": [["ml/canary", 3], ["ml/plain", 1]],
                    "header": "X-User"})
    found = explain(Criteria(type="vision"), snap)
    assert found.routing == [
        "ml/canary: Canary rollout of version 2: 20% of its requests go to the candidate",
        "ml/shadow: Shadow rollout of a new version: the stable version answers, a copy of "
        "each request goes to the candidate",
        "experiment e1: each request is assigned an arm (ml/canary 75%, ml/plain 25%; sticky "
        "by header X-User), which goes first while it is a warm candidate",
    ]
    assert found.to_dict()["routing"] == found.routing
    assert explain(Criteria(type="vision"), snapshot(executor("plain"))).routing == []


def test_names_from_the_store_are_shown_not_obeyed() -> None:
    # An executor id is whatever its record's key says: as rich markup, "[/x]" raised
    # (explain ended in a traceback), "[bold]" vanished, an ESC reached the terminal.
    from mulambda.tools.explain import render

    odd = ["ml/[/x]", "ml/rich[bold]B[/bold]", "ml/esc\x1b[2J"]
    found = explain(Criteria(type="vision"), snapshot(), unreadable=odd)
    text = render(found, width=200)
    assert "ml/[/x]" in text and "ml/rich[bold]B[/bold]" in text
    assert "ml/esc\ufffd[2J" in text and "\x1b" not in text
