"""What a router learns of an executor's cold start from the snapshots it reads."""

from __future__ import annotations

import pytest

from mulambda.policy.latency import ServiceTracker
from mulambda.sdk.waking import ColdStarts
from mulambda.store.records import ReplicaRecord, Snapshot


def snap(live: bool) -> Snapshot:
    replicas = {"ml/x": [ReplicaRecord(executor="ml/x", pod="x-0", state="Available")]}
    return Snapshot(executors={}, replicas=replicas if live else {}, latency={}, inflight={},
                    taken_at=0.0)


@pytest.mark.parametrize(("reads", "learned"), [
    # Snapshots every second while it starts: up between 11 and 12 s after the ask.
    pytest.param([(t, False) for t in range(1, 12)] + [(12, True)], 12_000.0, id="watched"),
    # Read again only 3 s after the last one that showed it down, of a 12 s start:
    # within a quarter of it.
    pytest.param([(9, False), (12, True)], 12_000.0, id="a-few-seconds-blind"),
    # Asked, then nothing read for ten minutes: when it came up is not known.
    pytest.param([(600, True)], None, id="quiet-for-ten-minutes"),
    pytest.param([(5, False), (60, True)], None, id="blind-for-most-of-it"),
    pytest.param([(1, False)], None, id="not-up-yet"),
])
def test_a_cold_start_is_learned_only_when_snapshots_saw_it_come_up(reads, learned):
    now = [100.0]
    published: list[bool] = []
    tracker = ServiceTracker()
    cold = ColdStarts(tracker, timeout=60, published=lambda: published.append(True),
                      clock=lambda: now[0])
    cold.ask(["ml/x"])
    for at, live in reads:
        now[0] = 100.0 + at
        cold.note_woken(snap(live))
    stats = tracker.stats.get("ml/x")
    assert (stats.cold_ms if stats is not None else None) == learned
    assert bool(published) is (learned is not None)
    assert ("ml/x" in cold.asked) is (not reads[-1][1])  # forgotten once up
