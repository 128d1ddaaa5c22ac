"""Replicas for a backlog (mulambda.policy.backlog): the work due within one cold start
plus the drain horizon, served by ready, starting and new replicas in that order."""

from __future__ import annotations

import pytest

from mulambda.policy.backlog import backlog_replicas, drain_replicas
from mulambda.policy.scaling import Sample

# (rate, queued, ready, starting, starting for) -> replicas; a 1 s model at 7 per
# replica, 30 s cold start, drained within 35 s after it (65 s of work in all).
DRAIN = [
    # No backlog and the ready replicas have room: fewer than are ready do the work.
    (50.0, 0.0, 12, 0, 0.0, 8),
    # A burst on 15 ready replicas: 15 serve 6,825 of the 300 + 450 x 65 requests due;
    # new ones serve 245 each in the last 35 s: 93 more, all in this one decision.
    (450.0, 300.0, 15, 0, 0.0, 15 + 93),
    # 2 s later the queue has grown as foreseen and the 93 started 2 s ago serve 37 s
    # each: nothing to add (106 do the work), so later ticks do not pile on pods.
    (450.0, 900.0, 15, 93, 2.0, 106),
    # Late in the cold start a deep queue that the starting pods will drain asks for
    # none of the pods that would be ready only after it is gone.
    (450.0, 9000.0, 15, 93, 28.0, 87),
    # Starting for longer than a cold start: counted as serving the whole horizon.
    (450.0, 9000.0, 15, 93, 60.0, 85),
    # The ready ones keep up with a small queue: no new replica.
    (60.0, 50.0, 10, 0, 0.0, 9),
]


@pytest.mark.parametrize(("rate", "queued", "ready", "starting", "starting_for", "expected"),
                         DRAIN)
def test_drain_replicas(rate, queued, ready, starting, starting_for, expected):
    assert drain_replicas(rate=rate, queued=queued, service_s=1.0, target=7.0, ready=ready,
                          starting=starting, starting_for=starting_for,
                          cold_start_seconds=30.0, drain_seconds=35.0) == expected


# (cold start, drain, service) -> replicas for 40 req/s and 400 queued, one ready at 4
HORIZONS = [
    (30.0, 35.0, 1.0, 1 + 20),  # 400 + 40 x 65 = 3,000 due; one serves 260, new ones 140
    (0.0, 35.0, 1.0, 1 + 12),  # no cold start known: 400 + 40 x 35, all serve 35 s
    (30.0, 70.0, 1.0, 1 + 15),  # a longer drain horizon asks for fewer
    (30.0, 35.0, 0.5, 1 + 9),  # half the service time: each serves twice as many
]


@pytest.mark.parametrize(("cold", "drain", "service", "expected"), HORIZONS)
def test_drain_replicas_horizons(cold, drain, service, expected):
    assert drain_replicas(rate=40.0, queued=400.0, service_s=service, target=4.0, ready=1,
                          starting=0, starting_for=0.0, cold_start_seconds=cold,
                          drain_seconds=drain) == expected


@pytest.mark.parametrize("bad", [{"drain_seconds": 0.0}, {"service_s": 0.0}, {"rate": -1.0},
                                 {"ready": -1}])
def test_drain_replicas_rejects_impossible_inputs(bad):
    args = {"rate": 1.0, "queued": 1.0, "service_s": 1.0, "target": 1.0, "ready": 1,
            "starting": 0, "starting_for": 0.0, "cold_start_seconds": 30.0,
            "drain_seconds": 35.0} | bad
    with pytest.raises(ValueError):
        drain_replicas(**args)


def _samples(rates: list[float], queued: list[float], service: float | None = 1.0):
    return [Sample(float(i), q + 1.0, r, q, service)
            for i, (r, q) in enumerate(zip(rates, queued, strict=True))]


BURST = _samples([100.0] * 4 + [450.0] * 2, [0.0] * 4 + [300.0, 600.0])

# (samples, previous decision) -> replicas, 15 ready, nothing starting, a 1 s model at 7
RATES = [
    # The rate since the previous decision: the burst, not the window's diluted mean.
    (BURST, 3.0, drain_replicas(rate=450.0, queued=600.0, service_s=1.0, target=7.0,
                                ready=15, starting=0, starting_for=0.0,
                                cold_start_seconds=30.0)),
    # No previous decision (a fresh state): the window's mean.
    (BURST, None, drain_replicas(rate=1300.0 / 6, queued=600.0, service_s=1.0, target=7.0,
                                 ready=15, starting=0, starting_for=0.0,
                                 cold_start_seconds=30.0)),
    # A decision after the latest sample: the latest sample's rate.
    (BURST, 9.0, drain_replicas(rate=450.0, queued=600.0, service_s=1.0, target=7.0,
                                ready=15, starting=0, starting_for=0.0,
                                cold_start_seconds=30.0)),
    # No backlog in the latest sample, or no service time to size it with: nothing.
    (_samples([450.0] * 3, [300.0, 100.0, 0.0]), 0.0, 0),
    (_samples([450.0] * 3, [300.0] * 3, service=None), 0.0, 0),
    ([], None, 0),
]


@pytest.mark.parametrize(("samples", "since", "expected"), RATES)
def test_backlog_replicas_sizes_with_the_rate_since_the_previous_decision(samples, since,
                                                                           expected):
    assert backlog_replicas(samples, since=since, target=7.0, ready=15, current=15,
                            starting_for=0.0, cold_start_seconds=30.0) == expected
