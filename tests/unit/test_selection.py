"""Selection rules of mulambda.policy.selection.rank (pure, no I/O)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import replace

import pytest

from mulambda.policy.latency import ServiceModel, ServiceTracker, observe
from mulambda.policy.selection import Criteria, Policy, Preferences, overlay, prefilter, rank
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    Snapshot,
    TimedRequest,
    _load,
)

NOW = 1_700_000_000.0


def executor(
    name: str, *, type: str = "vision", accuracy: float | None = 0.8,
    service: float | None = 10.0, state: str = "Ready", min_replicas: int = 1,
    input: str = "image", output: str = "label",
) -> ExecutorRecord:
    return ExecutorRecord(
        namespace="ml", name=name, model=name, version=1, type=type, input=input,
        output=output, accuracy=accuracy, rest=f"http://{name}:8501", grpc=f"{name}:8500",
        state=state, min_replicas=min_replicas, service_time_ms=service,
    )


def snapshot(
    *executors: ExecutorRecord, replicas: dict[str, int] | None = None,
    rtt: dict[str, float] | None = None, inflight: dict[str, int] | None = None,
) -> Snapshot:
    """A snapshot where every Ready executor has one live replica unless told otherwise."""
    replicas = replicas or {}
    rtt = rtt or {}
    recs = {e.id: e for e in executors}
    live: dict[str, list[ReplicaRecord]] = {}
    lat: dict[str, dict[str, LatencySample]] = {}
    for e in executors:
        n = replicas.get(e.name, 1 if e.state == "Ready" else 0)
        for i in range(n):
            pod = f"{e.name}-{i}"
            live.setdefault(e.id, []).append(
                ReplicaRecord(executor=e.id, pod=pod, state="Available", expires_at=NOW + 30)
            )
            if e.name in rtt:
                lat.setdefault(e.id, {})[pod] = LatencySample(ms=rtt[e.name], samples=3)
    return Snapshot(
        executors=recs, replicas=live, latency=lat,
        inflight={f"ml/{k}": v for k, v in (inflight or {}).items()}, taken_at=NOW,
    )


def ids(ranking) -> list[str]:
    return [c.executor_id for c in ranking]


def test_no_match_says_why():
    snap = snapshot(
        executor("a", type="nlp"), executor("b", state="Failed"), executor("c", output="box"),
    )
    ranking = rank(Criteria(type="vision", output="label"), snap)
    assert list(ranking) == []
    why = ranking.explain()
    assert "wrong type" in why and "Failed" in why and "wrong output" in why
    assert ranking.rejected["ml/a"] == "wrong type: has 'nlp'"


def test_empty_store_explains_nothing_is_registered():
    ranking = rank(Criteria(type="vision"), snapshot())
    assert "no executor is registered" in ranking.explain()


def test_faster_model_wins_when_latency_is_preferred():
    snap = snapshot(executor("slow", service=50), executor("fast", service=5),
                    rtt={"slow": 2, "fast": 2})
    ranking = rank(Criteria(type="vision", latency_weight=1, accuracy_weight=0), snap)
    assert ids(ranking) == ["ml/fast", "ml/slow"]
    best = ranking[0]
    assert best.expected_latency_ms == pytest.approx(7.0)
    assert best.warm and "net 2.0 + service 5.0 + load 0.0" in best.reason


def test_more_accurate_model_wins_when_accuracy_is_preferred():
    snap = snapshot(executor("rough", accuracy=0.6, service=5),
                    executor("precise", accuracy=0.95, service=50))
    ranking = rank(Criteria(type="vision", latency_weight=0, accuracy_weight=1), snap)
    assert ids(ranking)[0] == "ml/precise"


def test_network_latency_is_mean_over_live_replicas():
    e = executor("a")
    snap = snapshot(e, replicas={"a": 2})
    snap.latency = {"ml/a": {"a-0": LatencySample(ms=2, samples=1),
                             "a-1": LatencySample(ms=6, samples=1),
                             "gone-pod": LatencySample(ms=1000, samples=1)}}
    [c] = rank(Criteria(type="vision"), snap)
    assert c.network_ms == pytest.approx(4.0)


def test_missing_latency_uses_median_of_known_then_default():
    snap = snapshot(executor("a"), executor("b"), executor("c"), executor("d"),
                    rtt={"a": 2, "b": 4, "c": 30})
    by_id = {c.executor_id: c for c in rank(Criteria(type="vision"), snap)}
    assert by_id["ml/d"].network_ms == pytest.approx(4.0)
    assert "no RTT sample: median of others" in by_id["ml/d"].reason

    [only] = rank(Criteria(type="vision"), snapshot(executor("a")))
    assert only.network_ms == Policy().default_network_ms
    assert "no RTT sample: default" in only.reason


def test_missing_service_time_and_accuracy_never_raise():
    snap = snapshot(executor("a", service=None, accuracy=None), executor("b", accuracy=0.7))
    by_id = {c.executor_id: c for c in rank(Criteria(type="vision"), snap)}
    assert by_id["ml/a"].service_ms == 10.0  # median of the known one
    assert "accuracy unknown" in by_id["ml/a"].reason
    [only] = rank(Criteria(type="vision"), snapshot(executor("x", service=None)))
    assert only.service_ms == Policy().default_service_time_ms


def test_zero_weights_mean_equal_weights():
    snap = snapshot(executor("a", accuracy=0.9, service=20), executor("b", accuracy=0.6, service=5),
                    rtt={"a": 1, "b": 1})
    zero = rank(Criteria(type="vision", latency_weight=0, accuracy_weight=0), snap)
    equal = rank(Criteria(type="vision", latency_weight=3, accuracy_weight=3), snap)
    assert [(c.executor_id, c.score) for c in zero] == [(c.executor_id, c.score) for c in equal]


@pytest.mark.parametrize(("latency", "accuracy", "share"), [
    # Raised to 5 % of both weights' sum: 0.05 / 1.05 of the score.
    pytest.param(0, 1, 0.05 / 1.05, id="accuracy-only-raised-to-the-minimum"),
    pytest.param(0.01, 1, 0.0505 / 1.0505, id="below-the-minimum-raised"),
    pytest.param(0, 100, 0.05 / 1.05, id="scale-does-not-matter"),
    pytest.param(1, 3, 0.25, id="above-the-minimum-kept"),
    pytest.param(1, 0, 1.0, id="latency-only"),
    pytest.param(1e308, 1e308, 0.5, id="huge-weights-do-not-overflow"),
    pytest.param(1e308, 1e-308, 1.0, id="extreme-ratio"),
])
def test_latency_weighs_what_the_weights_say_and_at_least_its_minimum(latency, accuracy,
                                                                       share):
    prefs = Preferences.of(Criteria(type="vision", latency_weight=latency,
                                    accuracy_weight=accuracy))
    total = prefs.latency_weight + prefs.accuracy_weight
    assert math.isfinite(total)
    assert prefs.latency_weight / total == pytest.approx(share)
    assert 0 <= prefs.score(20, 0.9) <= 1


def test_huge_weights_rank_as_their_ratio():
    snap = snapshot(executor("a", accuracy=0.9, service=20), executor("b", accuracy=0.6, service=5),
                    rtt={"a": 1, "b": 1})
    huge = rank(Criteria(type="vision", latency_weight=1e308, accuracy_weight=1e308), snap,
                rng=random.Random(1))
    equal = rank(Criteria(type="vision", latency_weight=1, accuracy_weight=1), snap)
    assert [(c.executor_id, c.score) for c in huge] == [(c.executor_id, c.score) for c in equal]


def test_a_model_of_no_time_over_no_network_ranks_with_others_in_flight():
    # Declared 0 ms (the CRD allows it) and an RTT sample of 0: the share of the others'
    # untimed requests still there, stay / (stay + RTT), was 0 / 0.
    snap = snapshot(executor("a", service=0.0), executor("b", service=10.0),
                    rtt={"a": 0.0, "b": 0.0}, inflight={"a": 2})
    for replicas in (False, True):
        ranking = rank(Criteria(type="vision"), snap, replicas=replicas)
        assert [(c.executor_id, c.expected_latency_ms) for c in ranking] == [
            ("ml/a", 0.0), ("ml/b", 10.0)]


def test_limits_filter_candidates():
    snap = snapshot(executor("slow", service=200, accuracy=0.99),
                    executor("fast", service=5, accuracy=0.5),
                    executor("unknown", service=5, accuracy=None), rtt={"slow": 1, "fast": 1})
    r = rank(Criteria(type="vision", max_latency_ms=50), snap)
    assert "ml/slow" not in ids(r)
    assert r.rejected["ml/slow"].startswith("over max latency")
    r = rank(Criteria(type="vision", min_accuracy=0.9), snap)
    assert ids(r) == ["ml/slow"]
    assert r.rejected["ml/unknown"] == "below min accuracy: accuracy unknown"
    r = rank(Criteria(type="vision", max_latency_ms=50, min_accuracy=0.9), snap)
    assert list(r) == [] and "over max latency" in r.explain()


def test_overload_pushes_traffic_to_the_second_model():
    snap = snapshot(executor("fast", service=5), executor("second", service=12),
                    rtt={"fast": 1, "second": 1})
    crit = Criteria(type="vision", latency_weight=1, accuracy_weight=0)
    assert ids(rank(crit, snap))[0] == "ml/fast"
    snap.inflight = {"ml/fast": 4}  # 4 in flight, each costing a declared service time
    ranking = rank(crit, snap)
    assert ids(ranking)[0] == "ml/second"
    # A request counted in flight is ahead for its stay (5 + 20 ms) out of stay + RTT (1 ms).
    assert ranking[1].inflight == pytest.approx(4 * 25 / 26)
    assert ranking[1].load_ms == pytest.approx(5 * 4 * 25 / 26)


def test_more_replicas_absorb_load():
    snap = snapshot(executor("fast", service=5), executor("second", service=12),
                    replicas={"fast": 4}, rtt={"fast": 1, "second": 1}, inflight={"fast": 4})
    crit = Criteria(type="vision", latency_weight=1, accuracy_weight=0)
    assert ids(rank(crit, snap))[0] == "ml/fast"


def test_not_ready_executors_are_not_candidates():
    snap = snapshot(executor("pending", state="Pending"), executor("ghost"),
                    replicas={"ghost": 0})
    r = rank(Criteria(type="vision"), snap)
    assert list(r) == []
    assert "no live Available replica" in r.rejected["ml/ghost"]
    assert r.rejected["ml/pending"] == "not serving: state Pending"


def test_warm_executor_preferred_unless_cold_one_is_much_better():
    warm = executor("warm", service=12, accuracy=0.8)
    cold = executor("cold", service=10, accuracy=0.8, state="ScaledToZero", min_replicas=0)
    snap = snapshot(warm, cold, rtt={"warm": 1})
    r = rank(Criteria(type="vision"), snap)
    assert ids(r) == ["ml/warm", "ml/cold"]
    assert r[0].warm and not r[1].warm
    assert r[1].cold_start_ms == Policy().default_cold_start_ms
    assert "cold start not measured: default" in r[1].reason
    assert r.wake == ["ml/cold"]  # better once warm: worth activating

    # Much more accurate but cold: a warm model serves meanwhile (the cold start is over
    # the latency ceiling) and the cold one is woken; a client that waits gets it first.
    precise = executor("cold", service=10, accuracy=0.99, state="ScaledToZero", min_replicas=0)
    rough = executor("warm", service=12, accuracy=0.3)
    snap = snapshot(rough, precise, rtt={"warm": 1})
    r = rank(Criteria(type="vision", latency_weight=1, accuracy_weight=3), snap)
    assert ids(r) == ["ml/warm", "ml/cold"] and r.wake == ["ml/cold"]
    r = rank(Criteria(type="vision", latency_weight=1, accuracy_weight=3, cold_start="Wait"),
             snap)
    assert ids(r)[0] == "ml/cold" and r.wake == ["ml/cold"]


def test_measured_cold_start_replaces_the_default():
    cold = executor("cold", service=10, state="ScaledToZero", min_replicas=0)
    snap = snapshot(cold)
    snap.service = {"ml/cold": ServiceStats(cold_ms=4000.0, cold_count=3)}
    [c] = rank(Criteria(type="vision"), snap)
    assert c.cold_start_ms == 4000.0 and not c.warm
    assert c.expected_latency_ms == pytest.approx(c.network_ms + 10 + 4000)
    assert "cold start 4000" in c.reason and "cold start not measured" not in c.reason


def test_the_operators_last_cold_start_when_no_router_measured_one():
    cold = replace(executor("cold", service=10, state="ScaledToZero", min_replicas=0),
                   cold_start_ms=8000.0)
    snap = snapshot(cold)
    [c] = rank(Criteria(type="vision"), snap)
    assert c.cold_start_ms == 8000.0
    assert "cold start as the operator last measured it" in c.reason
    # What routers measured themselves, when there is some, comes first.
    snap.service = {"ml/cold": ServiceStats(cold_ms=4000.0, cold_count=3)}
    [c] = rank(Criteria(type="vision"), snap)
    assert c.cold_start_ms == 4000.0 and "operator" not in c.reason


def test_cold_executor_is_used_when_no_warm_one_exists():
    cold = executor("cold", state="ScaledToZero", min_replicas=0)
    r = rank(Criteria(type="vision"), snapshot(cold))
    assert ids(r) == ["ml/cold"] and not r[0].warm
    idle = executor("idle", state="Pending", min_replicas=0)
    assert ids(rank(Criteria(type="vision"), snapshot(idle))) == ["ml/idle"]


def test_wait_cold_start_ranks_best_model_first_even_if_cold():
    warm = executor("warm", service=12, accuracy=0.8)
    cold = executor("cold", service=10, accuracy=0.8, state="ScaledToZero", min_replicas=0)
    r = rank(Criteria(type="vision", cold_start="Wait"), snapshot(warm, cold, rtt={"warm": 1}))
    assert ids(r)[0] == "ml/cold"


def test_equal_candidates_share_the_traffic():
    twins = [executor(f"twin{i}") for i in range(4)]
    snap = snapshot(*twins, rtt={f"twin{i}": 3 for i in range(4)})
    rng = random.Random(1)
    firsts = Counter(ids(rank(Criteria(type="vision"), snap, rng=rng))[0] for _ in range(2000))
    assert set(firsts) == {f"ml/twin{i}" for i in range(4)}
    assert min(firsts.values()) > 400  # about a quarter each


def test_near_equal_candidates_share_in_proportion_to_their_headroom():
    # Latency only; 100 ms scale: b is 0.5 ms slower than a, c is 6 ms slower (beyond the
    # noise band of ~10 % of the best latency).
    snap = snapshot(executor("a", service=10), executor("b", service=10.5),
                    executor("c", service=16), rtt={"a": 1, "b": 1, "c": 1})
    crit = Criteria(type="vision", latency_weight=1, accuracy_weight=0)
    rng = random.Random(2)
    firsts = Counter(ids(rank(crit, snap, rng=rng))[0] for _ in range(3000))
    assert firsts["ml/c"] == 0  # lower beyond the noise: never first
    assert firsts["ml/a"] > firsts["ml/b"] > 300


def test_a_candidate_scoring_lower_beyond_noise_is_never_first():
    snap = snapshot(*[executor(f"e{i}", service=5 + 3 * i, accuracy=0.9 - i / 20)
                      for i in range(6)], rtt={f"e{i}": 2 for i in range(6)})
    for weights in ((1, 0), (1, 1), (0, 1), (2, 1)):
        crit = Criteria(type="vision", latency_weight=weights[0], accuracy_weight=weights[1])
        plain = rank(crit, snap)
        band = Preferences.of(crit).band(plain[0].expected_latency_ms, Policy())
        rng = random.Random(3)
        for _ in range(300):
            first = rank(crit, snap, rng=rng)[0]
            assert plain[0].score - first.score <= band + 1e-9


def test_without_a_random_source_the_order_is_by_score_then_name():
    twins = [executor(f"twin{i}") for i in range(3)]
    snap = snapshot(*twins, rtt={f"twin{i}": 3 for i in range(3)})
    assert ids(rank(Criteria(type="vision"), snap)) == ["ml/twin0", "ml/twin1", "ml/twin2"]


def test_ranking_is_deterministic():
    snap = snapshot(*[executor(f"e{i}", service=5 + i % 3, accuracy=0.7 + (i % 4) / 20)
                      for i in range(20)], rtt={f"e{i}": 1 + i % 5 for i in range(20)})
    crit = Criteria(type="vision", latency_weight=2, accuracy_weight=1)
    first = rank(crit, snap, client="ns/app")
    for _ in range(5):
        again = rank(crit, snap, client="ns/app")
        assert [(c.executor_id, c.score, c.reason) for c in again] == [
            (c.executor_id, c.score, c.reason) for c in first
        ]


def test_criteria_from_client_record_and_request():
    rec = ClientRecord(namespace="ns", name="app", type="vision", input="image",
                       latency_weight=2, accuracy_weight=0.5, max_latency_ms=100)
    base = rec.criteria
    assert base == Criteria(type="vision", input="image", latency_weight=2,
                            accuracy_weight=0.5, max_latency_ms=100)
    merged = Criteria.from_request({"output": "label", "minAccuracy": 0.8}, {"latency": 1}, base)
    assert merged.type == "vision" and merged.output == "label" and merged.min_accuracy == 0.8
    assert merged.latency_weight == 1 and merged.accuracy_weight == 0.5
    with pytest.raises(ValueError, match=r"required\.type"):
        Criteria.from_request({}, {})
    with pytest.raises(ValueError, match=r"desired\.latency"):
        Criteria.from_request({"type": "x"}, {"latency": "fast"})
    with pytest.raises(ValueError, match="non-negative"):
        Criteria(type="x", latency_weight=-1)


def test_prefilter_keeps_the_same_ranking():
    snap = snapshot(*[executor(f"v{i}", service=5 + i) for i in range(5)],
                    *[executor(f"n{i}", type="nlp") for i in range(5)],
                    rtt={f"v{i}": 1 + i for i in range(5)}, inflight={"v0": 3, "n1": 2})
    crit = Criteria(type="vision")
    small = prefilter(crit, snap)
    assert set(small.executors) == {f"ml/v{i}" for i in range(5)}
    assert small.inflight == {"ml/v0": 3}
    full, fast = rank(crit, snap, client="c"), rank(crit, small, client="c")
    assert [(c.executor_id, c.score) for c in full] == [(c.executor_id, c.score) for c in fast]


def test_live_available_replica_makes_a_not_yet_rewritten_record_warm():
    # Right after a cold start the record still says Pending or ScaledToZero
    # until the next reconcile; the replica's heartbeat already says Available.
    for state in ("Pending", "ScaledToZero", "Unavailable"):
        snap = snapshot(executor("fresh", state=state, min_replicas=0), replicas={"fresh": 1})
        [c] = rank(Criteria(type="vision"), snap)
        assert c.warm, state
    failed = snapshot(executor("broken", state="Failed"), replicas={"broken": 1})
    r = rank(Criteria(type="vision"), failed)
    assert list(r) == [] and r.rejected["ml/broken"] == "not serving: state Failed"


@pytest.mark.parametrize("field", ["latency_weight", "accuracy_weight", "max_latency_ms",
                                   "min_accuracy"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_criteria_reject_nan_and_infinity(field, value):
    with pytest.raises(ValueError, match="finite"):
        Criteria(type="vision", **{field: value})


def test_request_criteria_reject_nan_and_infinity():
    with pytest.raises(ValueError, match=r"desired\.latency must be a finite number"):
        Criteria.from_request({"type": "x"}, {"latency": float("nan")})
    with pytest.raises(ValueError, match=r"required\.max_latency_ms must be a finite number"):
        Criteria.from_request({"type": "x", "maxLatencyMs": float("inf")})


# -- scoring in absolute terms ---------------------------------------------------------

def test_latency_utility_is_absolute_not_a_ratio():
    prefs = Preferences.of(Criteria(type="vision", latency_weight=1, accuracy_weight=0))
    assert prefs.latency_utility(20) == pytest.approx(100 / 120)
    assert prefs.latency_utility(60) == pytest.approx(100 / 160)
    budget = Preferences.of(Criteria(type="vision", max_latency_ms=400))
    assert budget.latency_utility(400) == pytest.approx(0.5)  # halves at the budget
    assert budget.ceiling_ms == 400 and prefs.ceiling_ms == Policy().default_max_latency_ms


@pytest.mark.parametrize(("weights", "budget", "winner"), [
    pytest.param((1, 0), None, "fast", id="latency-only"),
    pytest.param((0, 1), None, "precise", id="accuracy-only"),
    pytest.param((0.5, 0.5), None, "precise", id="balanced-20-vs-60-ms"),
    pytest.param((0.5, 0.5), 1000, "precise", id="balanced-loose-budget"),
    pytest.param((3, 1), None, "fast", id="latency-first"),
])
def test_equal_weights_pick_a_model_that_is_good_on_both(weights, budget, winner):
    # 20 ms at 0.6 against 60 ms at 0.9: a ratio would call the fast one 3x better.
    snap = snapshot(executor("fast", service=19, accuracy=0.6),
                    executor("precise", service=59, accuracy=0.9), rtt={"fast": 1, "precise": 1})
    crit = Criteria(type="vision", latency_weight=weights[0], accuracy_weight=weights[1],
                    max_latency_ms=budget)
    assert ids(rank(crit, snap))[0] == f"ml/{winner}"


def test_balanced_client_leaves_a_slow_model_for_a_fast_one_of_nearly_equal_accuracy():
    snap = snapshot(executor("fast", service=19, accuracy=0.88),
                    executor("slow", service=299, accuracy=0.9), rtt={"fast": 1, "slow": 1})
    assert ids(rank(Criteria(type="vision", latency_weight=1, accuracy_weight=1), snap))[0] \
        == "ml/fast"


def test_accuracy_only_client_gets_the_less_loaded_of_equally_accurate_models():
    snap = snapshot(executor("a", service=20, accuracy=0.9),
                    executor("b", service=20, accuracy=0.9), rtt={"a": 1, "b": 1},
                    inflight={"a": 3})
    crit = Criteria(type="vision", latency_weight=0, accuracy_weight=1)
    assert ids(rank(crit, snap))[0] == "ml/b"


def test_accuracy_only_client_never_gets_a_replica_beyond_the_ceiling():
    # The most accurate model is buried under 60 requests (expected > 1 s).
    snap = snapshot(executor("best", service=20, accuracy=0.95),
                    executor("good", service=20, accuracy=0.8), rtt={"best": 1, "good": 1},
                    inflight={"best": 60})
    crit = Criteria(type="vision", latency_weight=0, accuracy_weight=1)
    r = rank(crit, snap)
    assert ids(r) == ["ml/good", "ml/best"]
    assert r[1].over_ceiling and "over the latency ceiling" in r[1].reason
    # With a budget the budget is the ceiling (and a hard limit).
    tight = rank(Criteria(type="vision", latency_weight=0, accuracy_weight=1,
                          max_latency_ms=200), snap)
    assert ids(tight) == ["ml/good"] and tight.rejected["ml/best"].startswith("over max latency")
    # When every candidate is over the ceiling they still rank (by score): never nothing.
    snap.inflight = {"ml/best": 60, "ml/good": 80}
    assert ids(rank(crit, snap))[0] == "ml/best"


@pytest.mark.parametrize(("weights", "inflight", "first"), [
    # Two models both slower than the 1 s ceiling: accuracy decides while the more
    # accurate one is within a ceiling of the fastest...
    pytest.param((0, 1), {}, "ml/big", id="accuracy-both-free"),
    pytest.param((0.5, 0.5), {}, "ml/big", id="balanced-both-free"),
    # ... and load once it is further: not minutes behind the accurate one.
    pytest.param((0, 1), {"big": 1}, "ml/other", id="accuracy-one-ahead"),  # 3 s against 1.5
    pytest.param((0, 1), {"big": 200}, "ml/other", id="accuracy-buried"),
    pytest.param((0.5, 0.5), {"big": 5}, "ml/other", id="balanced-five-ahead"),
])
def test_when_every_candidate_is_over_the_ceiling_load_still_counts(weights, inflight, first):
    snap = snapshot(executor("big", service=1500, accuracy=0.95),
                    executor("other", service=1490, accuracy=0.90),
                    rtt={"big": 1, "other": 1}, inflight=inflight)
    crit = Criteria(type="vision", latency_weight=weights[0], accuracy_weight=weights[1])
    ranked = rank(crit, snap)
    assert ids(ranked)[0] == first
    assert all(c.over_ceiling for c in ranked)
    # Spreading never puts a candidate beyond the moved ceiling first.
    rng = random.Random(1)
    assert {ids(rank(crit, snap, rng=rng))[0] for _ in range(50)} == {first}


# -- the measured model -------------------------------------------------------------------

def test_measured_service_times_replace_the_declared_ones():
    # Both declare 5 ms; "fast" really costs 80 ms per request ahead.
    tracker = ServiceTracker()
    for i in range(40):
        k = i % 3
        tracker.observe("ml/fast", inflight=k, items=1, elapsed_ms=1 + 5 + 80 * k,
                        network_ms=1, predicted_ms=5, at=0.0)
    snap = snapshot(executor("fast", service=5), executor("other", service=15),
                    rtt={"fast": 1, "other": 1}, inflight={"fast": 1})
    crit = Criteria(type="vision", latency_weight=1, accuracy_weight=0)
    declared = rank(crit, snap)
    measured = rank(crit, overlay(snap, service=tracker.stats))
    by_id = {c.executor_id: c for c in measured}
    assert by_id["ml/fast"].model is not None
    assert by_id["ml/fast"].model.per_inflight_ms == pytest.approx(80, rel=0.1)
    assert by_id["ml/fast"].measured == 40
    assert "measured over 40 requests" in by_id["ml/fast"].reason
    assert "declared, not measured" in by_id["ml/other"].reason
    assert ids(declared)[0] == "ml/fast" and ids(measured)[0] == "ml/other"


def test_per_item_cost_makes_large_requests_go_to_the_cheaper_model():
    # a: 5 ms + 1 ms per item; b: 30 ms + 0.1 ms per item (both declared 10 ms).
    tracker = ServiceTracker()
    for i in range(300):
        n = (1, 50, 100)[i % 3]
        tracker.observe("ml/a", inflight=0, items=n, elapsed_ms=1 + 5 + n, network_ms=1,
                        predicted_ms=5 + n, at=0.0)
        tracker.observe("ml/b", inflight=0, items=n, elapsed_ms=1 + 30 + n / 10, network_ms=1,
                        predicted_ms=30 + n / 10, at=0.0)
    snap = overlay(snapshot(executor("a", service=10), executor("b", service=10),
                            rtt={"a": 1, "b": 1}), service=tracker.stats)
    crit = Criteria(type="vision", latency_weight=1, accuracy_weight=0)
    small, large = rank(crit, snap, items=1), rank(crit, snap, items=200)
    by = {c.executor_id: c for c in large}
    assert by["ml/a"].service_ms == pytest.approx(205, rel=0.1)
    assert by["ml/b"].service_ms == pytest.approx(50, rel=0.1)
    assert ids(small)[0] == "ml/a" and ids(large)[0] == "ml/b"


def test_own_requests_count_while_they_are_ahead_and_others_for_their_share():
    e = executor("a", service=10)
    snap = snapshot(e, rtt={"a": 30})
    snap.inflight = {"ml/a": 2}  # everybody else's, two on the wire or at the model
    snap.own_inflight = {"ml/a": 1.0}
    [c] = rank(Criteria(type="vision"), snap)
    stay = 10 + 10 * 2  # service + per-inflight prior * others
    assert c.inflight == pytest.approx(1 + 2 * stay / (stay + 30))


def test_own_requests_not_back_when_due_raise_what_their_executor_is_expected_to_cost():
    snap = snapshot(executor("a", service=10), executor("b", service=20),
                    rtt={"a": 5, "b": 5})
    snap.own_inflight = {"ml/a": 1.0}
    assert ids(rank(Criteria(type="vision"), snap))[0] == "ml/a"  # 5 + 10 + 10 * 1 < 25
    # The one we sent there with nobody ahead has taken 60 ms at least: base 60.
    snap.own_late = {"ml/a": [(0.0, 1.0, 60.0)]}
    by = {c.executor_id: c for c in rank(Criteria(type="vision"), snap)}
    assert ids(rank(Criteria(type="vision"), snap))[0] == "ml/b"
    assert by["ml/a"].service_ms == pytest.approx(60)
    assert by["ml/a"].model == ServiceModel(60.0, 10.0, 0.0)
    assert ("service time raised: 1 request(s) of this router and 0 of others not back "
            "when due") in by["ml/a"].reason


@pytest.mark.parametrize(("lease", "base", "per_inflight"), [
    # sent with nobody ahead, due back 50 ms ago with a 20 ms stay: served for 70 at least
    pytest.param(TimedRequest("a-0", NOW - 0.080, NOW - 0.050, 0.0, 1.0, 20.0), 70.0, 10.0,
                 id="late-with-nobody-ahead: base"),
    # sent with two ahead: each of them took (70 - 10) / 2 at least
    pytest.param(TimedRequest("a-0", NOW - 0.080, NOW - 0.050, 2.0, 1.0, 20.0), 10.0, 30.0,
                 id="late-with-two-ahead: per request ahead"),
    # not due yet: says nothing about the model
    pytest.param(TimedRequest("a-0", NOW + 0.080, NOW + 0.100, 0.0, 1.0, 20.0), 10.0, 10.0,
                 id="not-due"),
    # an older writer's lease (no count sent): counted, but says nothing about the model
    pytest.param(TimedRequest("a-0", NOW - 0.080, NOW - 0.050), 10.0, 10.0,
                 id="late-from-an-older-writer"),
])
def test_other_routers_requests_not_back_when_due_raise_the_model_as_own_ones_do(
        lease, base, per_inflight):
    snap = snapshot(executor("a", service=10), rtt={"a": 10})
    snap.inflight_requests = {"ml/a": [lease]}
    [c] = rank(Criteria(type="vision"), snap, now=NOW)
    assert c.model is not None
    # (epoch seconds near 1.7e9 keep about a microsecond: approx)
    assert tuple(c.model[:3]) == pytest.approx((base, per_inflight, 0.0), abs=1e-3)
    assert ("service time raised: 0 request(s) of this router and 1 of others"
            in c.reason) is (base != 10.0 or per_inflight != 10.0)


def test_a_router_that_picks_replicas_gets_the_best_replica_and_its_address():
    e = executor("a", service=10)
    snap = snapshot(e, replicas={"a": 2})
    snap.latency = {"ml/a": {"a-0": LatencySample(ms=40, samples=1),
                             "a-1": LatencySample(ms=5, samples=1)}}
    snap.replicas["ml/a"][0].ip = "10.1.0.7"
    snap.replicas["ml/a"][1].ip = "10.1.0.8"
    [c] = rank(Criteria(type="vision"), snap, replicas=True)
    assert c.replica is not None and c.replica.pod == "a-1" and c.network_ms == 5
    assert c.url == "http://10.1.0.8:8501" and c.endpoint == "http://a:8501"
    # Our own requests on the near replica push the next one to the far one.
    snap.replica_inflight = {"ml/a": {"a-1": 5}}
    [c] = rank(Criteria(type="vision"), snap, replicas=True)
    assert c.replica is not None and c.replica.pod == "a-0" and c.url == "http://10.1.0.7:8501"
    # Without replica routing: the Service, and the mean RTT.
    [c] = rank(Criteria(type="vision"), snap)
    assert c.replica is None and c.url == "http://a:8501" and c.network_ms == 22.5


@pytest.mark.parametrize(("own_inflight", "replica_inflight", "ahead"), [
    # every own request has its pod: the replica's own count
    pytest.param({"ml/a": 3.0}, {"ml/a": {"a-0": 2.0, "a-1": 1.0}}, {"a-0": 2.0, "a-1": 1.0},
                 id="all-with-pods"),
    # two went to the Service (a /select answer in flight): one each per replica
    pytest.param({"ml/a": 2.0}, {}, {"a-0": 1.0, "a-1": 1.0}, id="all-to-the-service"),
    pytest.param({"ml/a": 4.0}, {"ml/a": {"a-0": 2.0}}, {"a-0": 3.0, "a-1": 1.0},
                 id="mixed"),
    # a replica count without its executor total (a hand-built snapshot): no negative share
    pytest.param({}, {"ml/a": {"a-1": 1.0}}, {"a-0": 0.0, "a-1": 1.0}, id="no-total"),
])
def test_own_requests_sent_to_the_service_count_on_every_replica(own_inflight,
                                                                  replica_inflight, ahead):
    # A gateway that answered /select (clients send to the Service) and routes /v1/predict
    # to replicas: the answers in flight load some replica, so each counts for its share.
    e = executor("a", service=10)
    snap = snapshot(e, replicas={"a": 2})
    snap.latency = {"ml/a": {"a-0": LatencySample(ms=5, samples=1),
                             "a-1": LatencySample(ms=5, samples=1)}}
    snap.own_inflight = own_inflight
    snap.replica_inflight = replica_inflight
    [c] = rank(Criteria(type="vision"), snap, replicas=True)
    assert c.replica is not None
    assert c.inflight == pytest.approx(min(ahead.values()))
    assert c.replica.pod == min(sorted(ahead), key=lambda pod: ahead[pod])


def test_replica_without_an_ip_is_reached_through_the_service():
    snap = snapshot(executor("a"), rtt={"a": 1})
    [c] = rank(Criteria(type="vision"), snap, replicas=True)
    assert c.replica is not None and c.url == "http://a:8501"


# -- bad values never rank -------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("accuracy", math.nan), ("accuracy", 1.5), ("accuracy", -0.1), ("accuracy", math.inf),
    ("service_time_ms", math.nan), ("service_time_ms", math.inf), ("service_time_ms", -1.0),
    ("cold_start_ms", math.nan), ("cold_start_ms", -1.0),
])
def test_an_impossible_value_in_a_record_never_ranks(field, value):
    bad = executor("bad", service=1, accuracy=1.0)
    setattr(bad, field, value)
    snap = snapshot(bad, executor("good", service=50, accuracy=0.5), rtt={"bad": 1, "good": 1})
    r = rank(Criteria(type="vision"), snap)
    assert ids(r) == ["ml/good"]
    assert r.rejected["ml/bad"].startswith("invalid record")
    assert all(math.isfinite(c.score) and math.isfinite(c.expected_latency_ms) for c in r)


@pytest.mark.parametrize("ms", [math.nan, math.inf, -5.0])
def test_an_impossible_rtt_sample_is_ignored(ms):
    snap = snapshot(executor("a"), executor("b"), rtt={"a": 1, "b": 3})
    snap.latency["ml/a"]["a-0"] = LatencySample(ms=ms, samples=1)
    by = {c.executor_id: c for c in rank(Criteria(type="vision"), snap)}
    assert by["ml/a"].network_ms == 3.0 and "no RTT sample" in by["ml/a"].reason


@pytest.mark.parametrize(("record", "why"), [
    ({"accuracy": float("nan")}, "'accuracy' is not a finite number"),
    ({"accuracy": 2}, "'accuracy' is outside [0, 1]"),
    ({"service_time_ms": -3}, "'service_time_ms' is negative"),
    ({"service_time_ms": float("inf")}, "'service_time_ms' is not a finite number"),
    ({"cold_start_ms": -1}, "'cold_start_ms' is negative"),
])
def test_the_decoder_rejects_impossible_values_with_the_reason(record, why):
    good = executor("x")
    raw = json.loads(json.dumps({k: v for k, v in vars(good).items()}))
    raw.update(record)
    with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
        _load(ExecutorRecord, json.dumps(raw))
    for cls, fields in ((LatencySample, {"ms": float("nan"), "samples": 1}),
                        (LatencySample, {"ms": -1, "samples": 1}),
                        (ServiceStats, {"w": float("inf")}),
                        (ServiceStats, {"t": -2})):
        with pytest.raises(ValueError):
            _load(cls, json.dumps(fields))


def test_the_fitted_model_is_used_at_face_value_only_when_finite():
    snap = snapshot(executor("a"), executor("b"), rtt={"a": 1, "b": 1})
    snap.service = {"ml/a": ServiceStats(w=1, t=math.inf, count=1)}
    r = rank(Criteria(type="vision"), snap)
    assert ids(r) == ["ml/b"] and "not finite" in r.rejected["ml/a"]
    assert ServiceModel(1, 2, 3).predict(2, 10) == 1 + 4 + 30


def test_a_hostile_late_lease_can_only_push_its_executor_back():
    # Any holder of an SDK credential can write leases (docs/security.md T3): one that
    # claims an absurd stay makes that executor look slow or not finite, nothing more.
    snap = snapshot(executor("a", service=10), executor("b", service=20),
                    rtt={"a": 5, "b": 5})
    for stay in (1e12, 1.7e308):
        snap.inflight_requests = {"ml/a": [TimedRequest("a-0", NOW - 1, NOW - 0.5, 0.0, 1.0,
                                                        stay)]}
        r = rank(Criteria(type="vision"), snap, now=NOW)
        assert ids(r) == ["ml/b", "ml/a"]
        assert r[1].expected_latency_ms >= stay and r[1].over_ceiling
        json.dumps(r[1].expected_latency_ms, allow_nan=False)  # still a valid JSON number


@pytest.mark.parametrize(("busy_until", "back_by", "ahead", "uncertain"), [
    pytest.param(NOW + 0.100, NOW + 0.130, 1, 0, id="still-being-served-when-ours-arrives"),
    pytest.param(NOW + 0.004, NOW + 0.034, 0, 0, id="served-before-ours-arrives"),
    pytest.param(NOW - 0.010, NOW + 0.020, 0, 0, id="on-its-way-back"),
    pytest.param(NOW - 0.050, NOW - 0.010, 1, 0, id="late-so-still-being-served"),
    # Due back at NOW + 8 ms (so served about 5 ms earlier, its way back taken as ours),
    # before ours arrives at NOW + 5 ms; counted until NOW + 20 ms for its sender's margin.
    pytest.param(NOW + 0.020, NOW + 0.008, 1, 1, id="counted-for-its-margin-only"),
    pytest.param(NOW + 0.020, NOW + 0.010, 1, 1, id="due-back-as-ours-would-be"),
    pytest.param(NOW + 0.020, NOW + 0.011, 1, 0, id="due-back-after-ours-would-be"),
])
def test_other_routers_requests_count_while_they_are_ahead(busy_until, back_by, ahead,
                                                           uncertain):
    # Our RTT to the replica is 10 ms: a request of ours sent now arrives at NOW + 5 ms.
    snap = snapshot(executor("a", service=10), rtt={"a": 10})
    snap.inflight_requests = {"ml/a": [TimedRequest("a-0", busy_until, back_by)]}
    for replicas in (True, False):
        [c] = rank(Criteria(type="vision"), snap, now=NOW, replicas=replicas)
        assert c.inflight == ahead
        # Those its answer's time must tell about (mulambda.policy.inflight.measured_at):
        # whole requests at the replica it goes to, so none through the Service.
        assert c.uncertain == (uncertain if replicas else 0)


def test_requests_counted_for_their_margin_are_told_per_replica():
    # Two replicas, RTT 10 ms: a-0 has one request counted for its sender's margin only
    # and one still being served; a-1 has one counted for its margin only: the
    # request goes to a-1, and only that one is uncertain.
    snap = snapshot(executor("a", service=10), replicas={"a": 2}, rtt={"a": 10})
    margin_only = (NOW + 0.020, NOW + 0.008)
    snap.inflight_requests = {"ml/a": [TimedRequest("a-0", *margin_only),
                                       TimedRequest("a-0", NOW + 0.100, NOW + 0.130),
                                       TimedRequest("a-1", *margin_only)]}
    [c] = rank(Criteria(type="vision"), snap, now=NOW, replicas=True)
    assert c.replica is not None and c.replica.pod == "a-1"
    assert (c.inflight, c.uncertain) == (1, 1)
    # Through the Service: the replicas' requests spread over both, none told by the
    # answer (which replica served it is not known).
    [c] = rank(Criteria(type="vision"), snap, now=NOW)
    assert (c.inflight, c.uncertain) == (1.5, 0)
    # A request sent to the Service (no pod) is a share on each replica: not told either.
    snap.inflight_requests = {"ml/a": [TimedRequest("", *margin_only)]}
    [c] = rank(Criteria(type="vision"), snap, now=NOW, replicas=True)
    assert (c.inflight, c.uncertain) == (0.5, 0)
    # Nor by a model raised for a late request: its prediction is a floor, not the model.
    late = TimedRequest("a-0", NOW - 0.050, NOW - 0.010, 0.0, 1.0, 20.0)
    snap.inflight_requests = {"ml/a": [TimedRequest("a-1", *margin_only), late,
                                       TimedRequest("a-0", NOW + 0.100, NOW + 0.130)]}
    [c] = rank(Criteria(type="vision"), snap, now=NOW, replicas=True)
    assert c.replica is not None and c.replica.pod == "a-1"
    assert (c.inflight, c.uncertain) == (1, 0)


def test_a_lease_with_a_malformed_timing_is_refused():
    from mulambda.store.records import InflightLease
    for requests in ([["p", 1, 2]], [["p", 1, 2, 0, 3, 20.5]]):
        ok = _load(InflightLease, json.dumps({"n": 1, "expires_at": 1, "requests": requests}))
        assert ok.requests == requests
    for requests in ([["p", 1]], [[1, 2, 3]], [["p", "soon", 2]], "x", [["p", 1, "NaN"]],
                     [["p", 1, 2, 0, 3]], [["p", 1, 2, -1, 3, 20]], [["p", 1, 2, 0, 3, "NaN"]]):
        text = json.dumps({"n": 1, "expires_at": 1, "requests": requests})
        with pytest.raises(ValueError):
            _load(InflightLease, text.replace('"NaN"', "NaN"))


@pytest.mark.parametrize("criteria", [
    Criteria(type="vision"),
    Criteria(type="nlp", input="text", output="label", latency_weight=0.0,
             accuracy_weight=2.5, max_latency_ms=80.0, min_accuracy=0.7, cold_start="Wait"),
    Criteria(type="vision", output="box", latency_weight=3.0, accuracy_weight=0.0),
])
def test_criteria_survive_the_selector_request_body(criteria: Criteria):
    """What a read-only SDK sends the selector to wake executors is its own criteria."""
    body = json.loads(json.dumps(criteria.to_request()))
    assert Criteria.from_request(body["required"], body["desired"]) == criteria


def test_requests_ahead_beyond_what_answers_measured_cost_at_least_a_service_time():
    # "burst" answered with nothing or one ahead, about 50 ms either way: measured, a
    # request ahead costs almost nothing. Ten of the caller's own are in flight there:
    # beyond the two or so answers reach, each costs a measured service time (about
    # 50 ms), and the idle "steady" (120 ms) wins instead.
    snap = snapshot(executor("burst", service=50), executor("steady", service=120),
                    rtt={"burst": 1, "steady": 1})
    stats = ServiceStats()
    for k in (0, 1, 0, 1):
        stats = observe(stats, k, 1, 50.0)
    snap.service = {"ml/burst": stats}
    snap.own_inflight = {"ml/burst": 10.0}
    ranking = rank(Criteria(type="vision", latency_weight=1, accuracy_weight=0), snap, now=NOW)
    burst = next(c for c in ranking if c.executor_id == "ml/burst")
    assert burst.model is not None and burst.model.per_inflight_ms < 5
    reach = burst.model.measured_to
    assert 2 < reach < 3
    assert burst.model.beyond_ms == pytest.approx(50.0, rel=0.05)
    assert burst.load_ms == pytest.approx(burst.model.per_inflight_ms * reach
                                          + burst.model.beyond_ms * (10 - reach))
    # one request fewer ahead saves a service time; all of them, the whole load
    assert burst.saving(1) == pytest.approx(burst.model.beyond_ms)
    assert burst.saving(10) == pytest.approx(burst.load_ms)
    assert ids(ranking)[0] == "ml/steady"


def test_a_load_beyond_what_answers_measured_is_named_in_the_reason():
    snap = snapshot(executor("burst", service=50), rtt={"burst": 1})
    stats = ServiceStats()
    for k in (0, 1, 0, 1):
        stats = observe(stats, k, 1, 50.0)
    snap.service = {"ml/burst": stats}
    snap.own_inflight = {"ml/burst": 10.0}
    [burst] = rank(Criteria(type="vision"), snap, now=NOW)
    assert any("answers measured up to 2." in n and "a service time (" in n
               for n in burst.notes), burst.notes
    assert "answers measured up to" in burst.reason
    snap.own_inflight = {"ml/burst": 1.0}  # within: nothing to say
    [burst] = rank(Criteria(type="vision"), snap, now=NOW)
    assert not any("answers measured" in n for n in burst.notes)
