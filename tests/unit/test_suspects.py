"""Replicas that failed lately: which ones a ranking sees, and for how long."""

from __future__ import annotations

import pytest

from mulambda.policy.ranking import Candidate
from mulambda.sdk.suspects import Suspects
from mulambda.store.records import ExecutorRecord, ReplicaRecord, Snapshot


def record(name: str) -> ExecutorRecord:
    return ExecutorRecord(namespace="ml", name=name, model="m", version=1, type="t",
                          input="i", output="o", accuracy=0.9, rest="http://x:8501", grpc="",
                          state="Ready")


def replicas(eid: str, *pods: str) -> list[ReplicaRecord]:
    return [ReplicaRecord(executor=eid, pod=p, state="Available", heartbeat_at=0.0)
            for p in pods]


def snapshot() -> Snapshot:
    return Snapshot(executors={"ml/a": record("a"), "ml/b": record("b")},
                    replicas={"ml/a": replicas("ml/a", "a-0", "a-1"),
                              "ml/b": replicas("ml/b", "b-0")},
                    latency={}, inflight={}, taken_at=0.0)


def cand(eid: str, pod: str | None) -> Candidate:
    return Candidate(executor_id=eid, score=1.0, expected_latency_ms=1.0, accuracy=0.9,
                     warm=True, record=record(eid.split("/")[1]),
                     replica=None if pod is None else ReplicaRecord(executor=eid, pod=pod))


@pytest.mark.parametrize(("failed", "seen", "suspect"), [
    pytest.param([], {"ml/a": ["a-0", "a-1"], "ml/b": ["b-0"]}, [], id="none"),
    # One replica failed: its executor's other replica serves.
    pytest.param([("ml/a", "a-0")], {"ml/a": ["a-1"], "ml/b": ["b-0"]},
                 [("ml/a", "a-0")], id="one-replica"),
    # Every replica of an executor failed: all of them kept, better retried than lost.
    pytest.param([("ml/b", "b-0")], {"ml/a": ["a-0", "a-1"], "ml/b": ["b-0"]},
                 [("ml/b", "b-0")], id="its-only-replica"),
    pytest.param([("ml/a", "a-0"), ("ml/a", "a-1")], {"ml/a": ["a-0", "a-1"], "ml/b": ["b-0"]},
                 [("ml/a", "a-0"), ("ml/a", "a-1")], id="every-replica"),
    # Through the Service no replica was chosen: the whole executor is suspect.
    pytest.param([("ml/a", None)], {"ml/a": ["a-0", "a-1"], "ml/b": ["b-0"]},
                 [("ml/a", None), ("ml/a", "a-0"), ("ml/a", "a-1")], id="through-the-service"),
])
def test_what_a_ranking_sees_after_failures(failed, seen, suspect):
    now = [100.0]
    s = Suspects(5.0, clock=lambda: now[0])
    for eid, pod in failed:
        s.add(cand(eid, pod))
    view = s.view(snapshot())
    assert {e: [r.pod for r in rs] for e, rs in view.replicas.items()} == seen
    every = [(e, p) for e in ("ml/a", "ml/b") for p in (None, *[r.pod for r in
                                                                 snapshot().replicas[e]])]
    assert [k for k in every if cand(*k) in s] == suspect
    assert bool(s) is bool(failed)
    # suspect_seconds later it is all forgotten.
    now[0] += 5.0
    assert not s and s.view(snapshot()).replicas == snapshot().replicas
    assert not any(cand(*k) in s for k in every)


def test_the_view_keeps_one_replicas_dict_while_nothing_changes():
    # The Ranker keeps its work per replicas dict: a new one per call would redo it all.
    now = [0.0]
    s = Suspects(5.0, clock=lambda: now[0])
    snap = snapshot()
    assert s.view(snap) is snap  # nothing suspect: the very snapshot
    s.add(cand("ml/a", "a-0"))
    first, second = s.view(snap), s.view(snap)
    assert first.replicas is second.replicas and first.replicas is not snap.replicas
    s.add(cand("ml/a", "a-1"))  # another failure: another view
    assert s.view(snap).replicas is not first.replicas
    other = snapshot()  # another snapshot's replicas: filtered anew
    assert s.view(other).replicas["ml/b"] is other.replicas["ml/b"]
