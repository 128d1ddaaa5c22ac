"""The selector's per-criteria views: filtered once per snapshot change, bounded, and
counting what the hard criteria left out as ranking everything would."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from mulambda.policy.selection import Criteria, rank
from mulambda.selector.caches import NO_SAMPLES, MatchingViews
from mulambda.selector.decisions import rejections
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    Snapshot,
)

NOW = 1_700_000_000.0


def _snapshot() -> Snapshot:
    executors, replicas = {}, {}
    for i, (type_, output) in enumerate([("vision", "label")] * 3 + [("vision", "box")] * 2
                                        + [("nlp", "label")] * 4):
        rec = ExecutorRecord(namespace="ml", name=f"e{i}", model=f"m{i}", version=1,
                             type=type_, input="image", output=output, accuracy=0.8,
                             rest=f"http://e{i}", grpc=f"e{i}", state="Ready",
                             service_time_ms=10.0)
        executors[rec.id] = rec
        replicas[rec.id] = [ReplicaRecord(executor=rec.id, pod=f"e{i}-0", state="Available",
                                          expires_at=NOW + 30)]
    return Snapshot(executors=executors, replicas=replicas, latency={}, inflight={},
                    taken_at=NOW)


def test_the_view_holds_the_matching_executors_and_the_clients_own_part():
    shared = _snapshot()
    views = MatchingViews()
    crit = Criteria(type="vision", output="label")
    samples = {"ml/e0": {"e0-0": LatencySample(ms=3.0, samples=2)}}
    record = ClientRecord(type="vision", output="label", namespace="ml", name="c")
    view, left_out = views.get(crit, replace(shared, latency=samples, client_record=record))
    assert sorted(view.executors) == ["ml/e0", "ml/e1", "ml/e2"]
    assert view.latency is samples and view.client_record is record
    assert left_out == Counter(wrong_type=4, wrong_output=2)
    # What ranking the whole snapshot counts for the same executors.
    assert rejections(rank(crit, shared)) == left_out


def test_filtered_again_only_when_the_shared_parts_change():
    shared = _snapshot()
    views = MatchingViews()
    crit = Criteria(type="vision")
    first, _ = views.get(crit, replace(shared, latency={}))
    second, _ = views.get(crit, replace(shared, client_record=None))  # another client
    assert second.executors is first.executors and second.replicas is first.replicas
    assert second.latency is NO_SAMPLES  # every client without samples: one object
    moved = replace(shared, replicas={**shared.replicas, "ml/e0": []})
    third, _ = views.get(crit, moved)
    assert third.executors is first.executors  # records unchanged: kept
    assert third.replicas is not first.replicas and third.replicas["ml/e0"] == []


def test_bounded_whatever_criteria_callers_send():
    shared = _snapshot()
    views = MatchingViews(max_entries=4)
    for i in range(20):
        views.get(Criteria(type=f"t{i}"), shared)
    assert len(views) == 4
    assert views.left_out(Criteria(type="t19")) == Counter(wrong_type=9)
    assert views.left_out(Criteria(type="t0")) == Counter()  # forgotten
