"""Ranker keeps what did not change between calls and answers exactly what rank answers."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from mulambda.policy.ranker import Ranker
from mulambda.policy.selection import Criteria, explained, prefilter, rank
from mulambda.store.heartbeats import Signer, executor_seed, public_key
from mulambda.store.records import (
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    Snapshot,
    TimedRequest,
)

NOW = 1_700_000_000.0
STATES = ("Ready", "Ready", "Ready", "ScaledToZero", "Failed", "Loading")


def _world(rng: random.Random, n: int) -> Snapshot:
    """A random store: mixed types, states, accuracies (some unknown), declared and
    measured service times, RTT samples, cold starts."""
    executors, replicas, latency, service = {}, {}, {}, {}
    for i in range(n):
        rec = ExecutorRecord(
            namespace="ml", name=f"e{i:03d}", model=f"m{i}", version=1,
            type=rng.choice(("vision", "vision", "nlp")), input="image", output="label",
            accuracy=None if rng.random() < 0.1 else round(rng.uniform(0.5, 0.99), 2),
            rest=f"http://e{i}:8501", grpc=f"e{i}:8500", state=rng.choice(STATES),
            min_replicas=rng.choice((0, 1)),
            service_time_ms=None if rng.random() < 0.1 else rng.uniform(2, 80))
        executors[rec.id] = rec
        pods = [f"e{i:03d}-{r}" for r in range(rng.choice((0, 1, 1, 2, 3)))]
        replicas[rec.id] = [ReplicaRecord(executor=rec.id, pod=p, state="Available",
                                          expires_at=NOW + 30) for p in pods]
        latency[rec.id] = {p: LatencySample(ms=rng.uniform(1, 40), samples=3)
                           for p in pods if rng.random() < 0.7}
        if rng.random() < 0.4:
            w = rng.uniform(1, 50)
            service[rec.id] = ServiceStats(
                w=w, k=w * rng.uniform(0, 3), i=w, t=w * rng.uniform(5, 90),
                kk=w * rng.uniform(0, 9), ii=w, ki=w, kt=w * rng.uniform(0, 200),
                count=int(w), cold_ms=rng.choice((None, rng.uniform(500, 5000))))
    return Snapshot(executors=executors, replicas=replicas, latency=latency, inflight={},
                    taken_at=NOW, service=service)


def _load(rng: random.Random, snap: Snapshot, share: float) -> Snapshot:
    """``snap`` with requests in flight at a random ``share`` of its executors (every kind
    of load rank reads), the other parts the very same objects."""
    inflight, timed, own, per_pod, late = {}, {}, {}, {}, {}
    for eid, pods in snap.replicas.items():
        if rng.random() >= share:
            continue
        kind = rng.randrange(5)
        if kind == 0:
            inflight[eid] = rng.randint(1, 30)
        elif kind == 1:
            # some from older writers (no count sent), some that say what they were
            # sent with (and raise the model when late)
            timed[eid] = [TimedRequest(rng.choice([r.pod for r in pods] + [""]),
                                       NOW + rng.uniform(-0.5, 0.5), NOW + rng.uniform(-0.5, 1.0),
                                       *((float(rng.randint(0, 4)), 1.0, rng.uniform(5, 300))
                                         if rng.random() < 0.5 else ()))
                          for _ in range(rng.randint(1, 5))]
        elif kind == 2:
            own[eid] = rng.uniform(0.5, 8)
        elif kind == 3 and pods:
            per_pod[eid] = {r.pod: rng.uniform(0.5, 8) for r in pods}
        elif kind == 4:  # own requests not back when due: (ahead when sent, items, >= ms)
            late[eid] = [(float(rng.randint(0, 4)), 1.0, rng.uniform(5, 900))
                         for _ in range(rng.randint(1, 3))]
    return replace(snap, inflight=inflight, inflight_requests=timed, own_inflight=own,
                   replica_inflight=per_pod, own_late=late)


def _remeasured(rng: random.Random, snap: Snapshot) -> dict[str, ServiceStats]:
    """``snap``'s statistics in a new dict, as a router's merge makes one for every decision:
    most the very same objects, a few new (an answer came) or gone (expired)."""
    service = dict(snap.service)
    for eid in rng.sample(sorted(snap.executors), 4):
        if rng.random() < 0.2:
            service.pop(eid, None)
        else:
            w = rng.uniform(1, 50)
            service[eid] = ServiceStats(w=w, k=w * rng.uniform(0, 3), i=w,
                                        t=w * rng.uniform(5, 300), kk=w * rng.uniform(0, 9),
                                        ii=w, ki=w, kt=w * rng.uniform(0, 900), count=int(w),
                                        cold_ms=rng.choice((None, rng.uniform(500, 5000))))
    return service


CRITERIA = [
    Criteria(type="vision"),
    Criteria(type="vision", latency_weight=0.0, accuracy_weight=1.0),
    Criteria(type="vision", latency_weight=1.0, accuracy_weight=0.0, max_latency_ms=60),
    Criteria(type="vision", max_latency_ms=90, min_accuracy=0.6, cold_start="Wait"),
    Criteria(type="nlp", output="label", accuracy_weight=3.0),
    Criteria(type="speech"),
]


def _same(got, want) -> None:
    assert list(got) == list(want)
    assert [c.replica for c in got] == [c.replica for c in want]
    assert [c.reason for c in got] == [c.reason for c in want]
    assert got.rejected == want.rejected
    assert got.wake == want.wake


@pytest.mark.parametrize("criteria", CRITERIA, ids=lambda c: repr(c)[:60])
@pytest.mark.parametrize("replicas", [False, True])
def test_answers_what_rank_answers_as_load_changes(criteria: Criteria, replicas: bool):
    rng = random.Random(hash((criteria, replicas)) & 0xFFFF)
    ranker = Ranker()
    snap = _world(rng, 60)
    for call in range(40):
        if call % 10 == 9:  # the store changed: new dicts
            snap = _world(rng, 60)
        elif call % 3 == 2:  # only measurements changed: a new dict, some new statistics
            snap = replace(snap, service=_remeasured(rng, snap))
        loaded = _load(rng, snap, share=rng.choice((0.0, 0.05, 0.3, 1.0)))
        now = NOW + rng.uniform(-0.3, 0.6)
        items = rng.choice((1, 1, 4))
        seed = rng.random()
        got = ranker.rank(criteria, loaded, now=now, items=items, replicas=replicas,
                          rng=random.Random(seed))
        want = rank(criteria, loaded, now=now, items=items, replicas=replicas,
                    rng=random.Random(seed))
        _same(got, want)


def test_keeps_the_unloaded_candidates_while_the_snapshot_parts_are_the_same():
    rng = random.Random(3)
    snap = _world(rng, 40)
    ranker = Ranker()
    crit = Criteria(type="vision")
    first = ranker.rank(crit, snap)
    again = ranker.rank(crit, replace(snap, taken_at=NOW + 1))  # a new Snapshot, same parts
    assert [id(c) for c in again] == [id(c) for c in first]
    changed = replace(snap, replicas=dict(snap.replicas))  # a new dict: derived again
    assert [id(c) for c in ranker.rank(crit, changed)] != [id(c) for c in first]
    _same(ranker.rank(crit, changed), rank(crit, changed))


def test_a_signed_claim_running_out_is_seen_with_the_same_parts():
    """The store reader hands out the same replicas dict until a heartbeat expires, but a
    signed claim can run out before: from then on rank() no longer counts the replica
    (docs/security.md T2), and neither does the Ranker."""
    seed = executor_seed(b"operator-secret-0123456789", "ml", "a", "uid-1")
    rec = ExecutorRecord(namespace="ml", name="a", model="a", version=1, type="vision",
                         input="image", output="label", accuracy=0.9, rest="http://a",
                         grpc="a", state="Ready", min_replicas=1, service_time_ms=10.0,
                         heartbeat_key=public_key(seed))
    beat = Signer(seed).sign(ReplicaRecord(executor=rec.id, pod="a-0", ip="10.0.0.7",
                                           state="Available", expires_at=NOW + 3600), NOW)
    snap = Snapshot(executors={rec.id: rec}, replicas={rec.id: [beat]}, latency={},
                    inflight={}, taken_at=NOW)
    crit = Criteria(type="vision")
    ranker = Ranker()
    assert [c.executor_id for c in ranker.rank(crit, snap)] == ["ml/a"]
    for at, serving in ((beat.claim_until, True), (beat.claim_until + 5, False)):
        later = replace(snap, taken_at=at)  # the same parts, as a reader hands them out
        got = ranker.rank(crit, later)
        assert bool(got) is serving
        _same(got, rank(crit, later))
        if not serving:
            assert "none signed" in got.rejected["ml/a"]


def test_the_most_accurate_going_over_its_limit_rescores_the_others():
    """Accuracy counts relative to the best candidate: when load pushes the most accurate
    one over max latency, every other score changes, as rank's do."""
    recs = [ExecutorRecord(namespace="ml", name=n, model=n, version=1, type="vision",
                           input="image", output="label", accuracy=acc, rest=f"http://{n}",
                           grpc=n, state="Ready", service_time_ms=10.0)
            for n, acc in (("a", 0.9), ("b", 0.6), ("c", 0.5))]
    snap = Snapshot(
        executors={r.id: r for r in recs},
        replicas={r.id: [ReplicaRecord(executor=r.id, pod=f"{r.name}-0", state="Available",
                                       expires_at=NOW + 30)] for r in recs},
        latency={}, inflight={}, taken_at=NOW)
    crit = Criteria(type="vision", max_latency_ms=50)
    ranker = Ranker()
    idle = ranker.rank(crit, snap)
    busy_snap = replace(snap, inflight={"ml/a": 40})
    busy = ranker.rank(crit, busy_snap)
    assert "ml/a" in busy.rejected and "over max latency" in busy.rejected["ml/a"]
    assert busy[0].accuracy_utility == 1.0 and idle[1].accuracy_utility < 1.0
    _same(busy, rank(crit, busy_snap))
    _same(ranker.rank(crit, snap), idle)


def test_bounded_whatever_the_criteria_callers_send():
    rng = random.Random(5)
    snap = _world(rng, 20)
    ranker = Ranker(max_entries=8)
    for i in range(50):
        ranker.rank(Criteria(type="vision", max_latency_ms=100 + i), snap)
    assert len(ranker) == 8


def test_an_empty_view_is_explained_with_every_executor():
    rng = random.Random(7)
    snap = _world(rng, 30)
    crit = Criteria(type="vision", max_latency_ms=0.001)
    view = prefilter(crit, snap)
    empty = Ranker().rank(crit, view)
    assert not empty
    why = explained(empty, snap)
    assert not why
    assert set(why.rejected) == set(snap.executors)
    assert "wrong type" in why.explain() and "over max latency" in why.explain()
