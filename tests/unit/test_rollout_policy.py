"""The pure rollout and experiment decisions (mulambda.policy.rollout)."""

from __future__ import annotations

import random

import pytest

from mulambda.api.modelexecutor import Analysis
from mulambda.bodies import summary
from mulambda.policy.experiment import Experiment, assignment_key, experiment_arm
from mulambda.policy.rollout import (
    BUCKETS,
    CANDIDATE,
    STABLE,
    ArmStats,
    Health,
    Route,
    agree,
    analyse,
    bucket_of,
    candidate_id,
    percentile,
    route_view,
    shadow_url,
    sticky_draw,
)
from mulambda.store.records import ExecutorRecord, LatencySample, ReplicaRecord, Snapshot

EID = "ml/m"


def record(rollout: dict | None = None) -> ExecutorRecord:
    return ExecutorRecord(namespace="ml", name="m", model="m", version=1, type="t", input="i",
                          output="o", accuracy=0.9, rest="http://m.ml.svc:8501",
                          grpc="m.ml.svc:8500", state="Ready", rollout=rollout)


def route(strategy: str = "Canary", weight: int = 30) -> dict:
    return Route("v2-g3", strategy, weight, 2, "http://m-candidate.ml.svc:8501",  # type: ignore[arg-type]
                 "m-candidate.ml.svc:8500").to_record()


def snapshot(rec: ExecutorRecord, candidate_state: str | None = "Available") -> Snapshot:
    replicas = {EID: [ReplicaRecord(EID, "m-1", ip="10.0.0.1", state="Available", version=1)]}
    latency = {EID: {"m-1": LatencySample(1.0, 3, at=0.0)}}
    if candidate_state is not None:
        cid = candidate_id(EID)
        replicas[cid] = [ReplicaRecord(cid, "m-candidate-1", ip="10.0.0.2",
                                       state=candidate_state, version=2)]
        latency[cid] = {"m-candidate-1": LatencySample(2.0, 3, at=0.0)}
    return Snapshot(executors={EID: rec}, replicas=replicas, latency=latency, inflight={},
                    taken_at=0.0)


# -- routing ----------------------------------------------------------------------------

@pytest.mark.parametrize(("strategy", "weight", "candidate", "draw", "arm"), [
    ("Canary", 30, "Available", 0.29, CANDIDATE),
    ("Canary", 30, "Available", 0.30, STABLE),
    ("Canary", 100, "Available", 0.999, CANDIDATE),
    ("Canary", 0, "Available", 0.0, STABLE),
    ("Canary", 30, "Loading", 0.0, STABLE),  # not Ready: never routed to
    ("Canary", 30, "Failed", 0.0, STABLE),
    ("Canary", 30, None, 0.0, STABLE),  # no heartbeat at all
    ("Shadow", 100, "Available", 0.0, STABLE),  # shadow never answers a caller
])
def test_arm_choice(strategy: str, weight: int, candidate: str | None, draw: float,
                    arm: str) -> None:
    snap = snapshot(record(route(strategy, weight)), candidate)
    view, arms = route_view(snap, snap, lambda _: draw)
    assert arms[EID].arm == arm
    served = view.replicas[EID][0].pod
    assert served == ("m-candidate-1" if arm == CANDIDATE else "m-1")
    if arm == CANDIDATE:
        assert view.executors[EID].rest == "http://m-candidate.ml.svc:8501"
        assert view.executors[EID].version == 2
        assert view.latency[EID] is snap.latency[candidate_id(EID)]
    else:
        assert view.executors[EID] is snap.executors[EID]


def test_shadow_names_the_live_candidate_replicas_and_its_pod_address() -> None:
    snap = snapshot(record(route("Shadow", 0)))
    _, arms = route_view(snap, snap, lambda _: 0.5)
    assert [r.pod for r in arms[EID].shadow] == ["m-candidate-1"]
    assert shadow_url(arms[EID], 0.3) == "http://10.0.0.2:8501"
    loading = snapshot(record(route("Shadow", 0)), "Loading")
    _, arms = route_view(loading, loading, lambda _: 0.5)
    assert arms[EID].shadow == () and shadow_url(arms[EID], 0.3) is None


def test_force_stable_keeps_a_request_off_a_candidate_that_failed_it() -> None:
    snap = snapshot(record(route("Canary", 100)))
    _, arms = route_view(snap, snap, lambda _: 0.0, frozenset({EID}))
    assert arms[EID].arm == STABLE


def test_no_rollout_returns_the_same_view_and_no_arms() -> None:
    snap = snapshot(record(None))
    view, arms = route_view(snap, snap, lambda _: 0.0)
    assert view is snap and arms == {}


@pytest.mark.parametrize("bad", [{"strategy": "Blue", "weight": 5, "id": "x", "rest": "",
                                  "grpc": ""}, {"strategy": "Canary"}, {"weight": True}])
def test_malformed_route_keeps_traffic_on_the_stable_arm(bad: dict) -> None:
    snap = snapshot(record(bad))
    view, arms = route_view(snap, snap, lambda _: 0.0)
    assert view is snap and arms == {}


def test_canary_share_is_the_weight() -> None:
    snap = snapshot(record(route("Canary", 20)))
    rng = random.Random(7)
    n = 20_000
    hits = sum(route_view(snap, snap, lambda _: rng.random())[1][EID].arm == CANDIDATE
               for _ in range(n))
    assert abs(hits / n - 0.20) < 0.015


def test_sticky_draw_is_fixed_per_key_and_independent_per_salt() -> None:
    assert sticky_draw("user-1", "exp-a") == sticky_draw("user-1", "exp-a")
    draws = [sticky_draw(f"user-{i}", "exp-a") for i in range(10_000)]
    assert all(0 <= d < 1 for d in draws)
    assert abs(sum(d < 0.3 for d in draws) / len(draws) - 0.3) < 0.02
    other = [sticky_draw(f"user-{i}", "exp-b") for i in range(10_000)]
    both = sum(a < 0.5 and b < 0.5 for a, b in zip(draws, other, strict=True)) / len(draws)
    assert abs(both - 0.25) < 0.02  # independent splits


# -- outcomes -----------------------------------------------------------------------------

@pytest.mark.parametrize(("ms", "bucket"), [(0.0, 0), (0.25, 0), (0.26, 1), (1.0, 8),
                                            (BUCKETS[-1], len(BUCKETS) - 1),
                                            (1e9, len(BUCKETS))])
def test_bucket_of(ms: float, bucket: int) -> None:
    assert bucket_of(ms) == bucket


def test_percentiles_from_the_histogram_are_within_a_bucket_of_the_truth() -> None:
    rng = random.Random(3)
    values = sorted(rng.lognormvariate(3, 0.8) for _ in range(5000))
    counts: dict[int, int] = {}
    for v in values:
        counts[bucket_of(v)] = counts.get(bucket_of(v), 0) + 1
    for q in (0.5, 0.95):
        true = values[int(q * len(values)) - 1]
        got = percentile(counts, q)
        assert got is not None and abs(got / true - 1) < 0.19
    assert percentile({}, 0.5) is None


@pytest.mark.parametrize(("a", "b", "same"), [
    ([2.5, 3.0], [2.5, 3.0], True),
    ([2.5025], [2.5], True),  # within rtol 1e-3
    ([2.51], [2.5], False),
    ([0.0], [1e-7], True),  # within atol
    ([[1.0, 2.0]], [[1.0]], False),  # shape
    ({"y": [1.0]}, {"y": [1.0]}, True),
    ({"y": [1.0]}, {"z": [1.0]}, False),
    (["cat"], ["dog"], False),
    ([True], [1], False),
    ([float("nan")], [float("nan")], True),
])
def test_agreement_tolerance(a: object, b: object, same: bool) -> None:
    assert agree(a, b) is same


def test_arm_summary_shows_counts_rates_and_percentiles() -> None:
    stats = ArmStats(requests=10, errors=1, buckets={bucket_of(4.0): 9})
    summary = stats.summary()
    assert summary["requests"] == 10 and summary["errorRate"] == 0.1
    assert 3.3 < summary["p50Ms"] <= 4.0 and summary["p95Ms"] <= 4.0


NOW = ArmStats(30, 3, {bucket_of(10.0): 20, bucket_of(20.0): 7}, compared=9, disagreed=2)


@pytest.mark.parametrize(("earlier", "since"), [
    (None, NOW),
    ({}, NOW),
    (ArmStats(10, 1, {bucket_of(10.0): 9}, compared=4, disagreed=1).counts(),
     ArmStats(20, 2, {bucket_of(10.0): 11, bucket_of(20.0): 7}, compared=5, disagreed=1)),
    (NOW.counts(), ArmStats()),
    # Not an earlier moment of these counts (another rollout's, or edited): all of them.
    (ArmStats(40, 0, {bucket_of(10.0): 40}).counts(), NOW),
    (ArmStats(5, 0, {bucket_of(50.0): 5}).counts(), NOW),
    ({"requests": "x", "errors": 0, "compared": 0, "disagreed": 0, "buckets": {}}, NOW),
    ({"requests": 1}, NOW),
])
def test_counts_since_an_earlier_moment(earlier: dict | None, since: ArmStats) -> None:
    assert NOW.minus(earlier) == since


# -- analysis -----------------------------------------------------------------------------

T = Analysis(maxErrorRateIncrease=0.05, maxP95Ratio=1.5, minRequests=100, durationSeconds=60,
             maxDisagreementRate=0.1, progressDeadlineSeconds=300)
FAST = {bucket_of(10.0): 100}
SLOW = {bucket_of(20.0): 100}
OK = Health(available=1)


@pytest.mark.parametrize(("stable", "candidate", "health", "step", "total", "last", "want"), [
    (ArmStats(), ArmStats(), Health(0, "ModelNotFound", "no v2"), 0, 0, True,
     ("RollBack", "CandidateFailed")),
    (ArmStats(), ArmStats(), Health(0), 10, 10, True, ("Wait", "WaitingForCandidate")),
    (ArmStats(), ArmStats(), Health(0), 300, 300, True,
     ("RollBack", "ProgressDeadlineExceeded")),
    (ArmStats(100, 0, FAST), ArmStats(99, 99, {}), OK, 600, 600, True, ("Wait", "Analysing")),
    (ArmStats(100, 1, FAST), ArmStats(100, 7, FAST), OK, 0, 0, True,
     ("RollBack", "ErrorRateExceeded")),
    (ArmStats(100, 1, FAST), ArmStats(100, 6, FAST), OK, 0, 0, True, ("Wait", "Analysing")),
    (ArmStats(100, 0, FAST), ArmStats(100, 0, SLOW), OK, 0, 0, True,
     ("RollBack", "LatencyExceeded")),
    (ArmStats(100, 0, FAST), ArmStats(100, 0, FAST, compared=100, disagreed=11), OK, 0, 0,
     True, ("RollBack", "DisagreementExceeded")),
    (ArmStats(100, 0, FAST), ArmStats(100, 0, FAST, compared=100, disagreed=10), OK, 60, 60,
     True, ("Promote", "AnalysisPassed")),
    (ArmStats(100, 0, FAST), ArmStats(100, 0, FAST), OK, 59, 59, True, ("Wait", "Analysing")),
    (ArmStats(100, 0, FAST), ArmStats(100, 0, FAST), OK, 60, 60, False,
     ("Advance", "StepPassed")),
    (ArmStats(), ArmStats(100, 0, FAST), OK, 60, 60, True,  # no baseline latency: no ratio
     ("Promote", "AnalysisPassed")),
])
def test_analysis(stable: ArmStats, candidate: ArmStats, health: Health, step: float,
                  total: float, last: bool, want: tuple[str, str]) -> None:
    verdict = analyse(T, stable, candidate, health, step_seconds=step, total_seconds=total,
                      last_step=last)
    assert (verdict.action, verdict.reason) == want
    assert verdict.message


def test_health_from_heartbeats() -> None:
    beats = [ReplicaRecord("x", "a", state="Failed", reason="VersionNotFound", message="m"),
             ReplicaRecord("x", "b", state="Loading")]
    assert Health.of(beats) == Health(0, "VersionNotFound", "m")
    assert Health.of([*beats, ReplicaRecord("x", "c", state="Available")]) == Health(1)
    assert Health.of([]) == Health(0)


# -- experiments ---------------------------------------------------------------------------

EXP = Experiment("shop/app@g1", (("ml/a", 70.0), ("ml/b", 30.0)), header="X-User")


@pytest.mark.parametrize(("eligible", "available", "draw", "want"), [
    ({"ml/a", "ml/b"}, {"ml/a", "ml/b"}, 0.69, "ml/a"),
    ({"ml/a", "ml/b"}, {"ml/a", "ml/b"}, 0.70, "ml/b"),
    ({"ml/a", "ml/b"}, {"ml/a"}, 0.9, "ml/a"),  # its arm is not serving: another, by weight
    ({"ml/a", "ml/b"}, {"ml/b"}, 0.1, "ml/b"),
    ({"ml/b"}, {"ml/b"}, 0.1, "ml/b"),  # a fails the criteria: b takes all
    ({"ml/a", "ml/b"}, set(), 0.1, None),
])
def test_experiment_arm(eligible: set[str], available: set[str], draw: float,
                        want: str | None) -> None:
    assert experiment_arm(EXP, eligible, available, draw) == want


def test_same_user_gets_the_same_arm_and_the_split_follows_the_weights() -> None:
    both = {"ml/a", "ml/b"}
    arms = {u: experiment_arm(EXP, both, both, sticky_draw(u, EXP.id))
            for u in map(str, range(5000))}
    assert all(experiment_arm(EXP, both, both, sticky_draw(u, EXP.id)) == a
               for u, a in arms.items())
    share = sum(a == "ml/a" for a in arms.values()) / len(arms)
    assert abs(share - 0.7) < 0.03


@pytest.mark.parametrize(("headers", "payload", "exp", "want"), [
    ({"X-User": "u1"}, {}, EXP, "u1"),
    ({}, {"user": "u2"}, Experiment("e", (("a", 1.0),), field="user"), "u2"),
    ({}, {"user": 7}, Experiment("e", (("a", 1.0),), field="user"), "7"),
    ({"X-Mulambda-Key": "k"}, {}, None, "k"),
    ({}, {"user": ["x"]}, Experiment("e", (("a", 1.0),), field="user"), None),
    ({}, {}, None, None),
])
def test_assignment_key(headers: dict, payload: object, exp: Experiment | None,
                        want: str | None) -> None:
    field = exp.field if exp is not None else None
    assert assignment_key(headers, summary(payload, field)[1], exp) == want


def test_experiment_record_round_trip_and_bad_ones() -> None:
    assert Experiment.of(EXP.to_record()) == EXP
    assert Experiment.of({"id": "x", "arms": [["a", 0]]}) is None
    assert Experiment.of({"arms": "nope"}) is None
    assert Experiment.of(None) is None


def test_experiment_status_shows_eligibility_and_outcomes_per_arm() -> None:
    from mulambda.policy.experiment import experiment_status

    shown = experiment_status(
        EXP, ["ml/a"], {"ml/b": "type 'audio' != 'vision'"},
        {"ml/a": ArmStats(10, 1, {bucket_of(4.0): 9})})
    assert shown["id"] == EXP.id
    a, b = shown["arms"]
    assert (a["executor"], a["weight"], a["eligible"], a["requests"], a["errorRate"]) == (
        "ml/a", 70.0, True, 10, 0.1)
    assert "p95Ms" in a and "reason" not in a
    assert (b["eligible"], b["reason"], b["requests"]) == (False, "type 'audio' != 'vision'", 0)
    missing = experiment_status(EXP, [], {}, {})["arms"][1]
    assert missing["reason"] == "no such executor is registered"
