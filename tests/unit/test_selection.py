"""Selection rules of mulambda.policy.selection.rank (pure, no I/O)."""

from __future__ import annotations

from collections import Counter

import pytest

from mulambda.policy.selection import Criteria, Policy, prefilter, rank
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    Snapshot,
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
    snap.inflight = {"ml/fast": 4}  # 4 queued ahead: 1 + 5 + 20 ms
    ranking = rank(crit, snap)
    assert ids(ranking)[0] == "ml/second"
    assert ranking[1].load_ms == pytest.approx(20.0)


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
    assert r[0].warm and not r[1].warm and "cold: -0.25" in r[1].reason
    assert r.wake == ["ml/cold"]  # better on its own merits: worth activating

    much_worse_warm = executor("warm", service=200, accuracy=0.3)
    r = rank(Criteria(type="vision"), snapshot(much_worse_warm, cold, rtt={"warm": 1}))
    assert ids(r)[0] == "ml/cold" and r.wake[0] == "ml/cold"


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


def test_ties_spread_over_clients_and_time():
    twins = [executor(f"twin{i}") for i in range(4)]
    snap = snapshot(*twins, rtt={f"twin{i}": 3 for i in range(4)})
    crit = Criteria(type="vision")
    firsts = Counter(ids(rank(crit, snap, client=f"ns/c{n}"))[0] for n in range(200))
    assert set(firsts) == {f"ml/twin{i}" for i in range(4)}
    assert min(firsts.values()) > 20  # roughly even, not all on one
    over_time = {ids(rank(crit, snap, client="ns/c0", now=NOW + 10 * k))[0] for k in range(50)}
    assert len(over_time) > 1


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
