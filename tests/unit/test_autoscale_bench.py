"""The autoscaling benchmark: its queue is real and our autoscaler beats static-peak on cost."""

from __future__ import annotations

import random
from collections.abc import Iterator
from types import ModuleType

import pytest

from support.benches import bench_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with bench_module("autoscale.py") as module:
        yield module

@pytest.fixture(scope="module")
def two_hours(bench: ModuleType):
    return bench.compare(duration_s=2 * 3600, peak_rps=500.0, seed=7)


def test_autoscaler_uses_fewer_replica_hours_than_static_peak_within_the_slo(two_hours):
    results, static_n = two_hours
    static, ours, hpa = results["static-peak"], results["mulambda"], results["hpa"]

    assert static.peak_replicas == static_n
    assert ours.replica_hours < 0.6 * static.replica_hours
    # The compressed day ramps twelve times faster and bursts still cost a
    # 30 s cold start: a few percent of requests wait, far fewer than with
    # the utilisation rule that cannot see the queue.
    assert ours.miss_share < 0.05
    assert ours.miss_share < hpa.miss_share
    assert ours.cold_starts_from_zero >= 1  # the night really was idle


def test_every_request_is_accounted_for(two_hours):
    results, _ = two_hours
    for r in results.values():
        assert r.served + r.left_waiting == r.requests, r.name
        assert sum(r.misses_by_hour) == r.slo_misses


def test_the_queue_answers_to_capacity(bench: ModuleType):
    """An honest simulator: fewer replicas make requests wait, more do not."""
    cfg = bench.SimConfig()
    rates = [120.0] * 600  # 120 requests/s at ~1 s each: about 12 replicas busy
    arrivals = bench.arrivals_per_tick(rates, cfg.tick_s, seed=1)
    starved = bench.simulate(arrivals, bench.Static(10), cfg)
    roomy = bench.simulate(arrivals, bench.Static(20), cfg)
    assert starved.miss_share > 0.5  # 100 slots for ~120 in flight: the queue grows
    assert starved.left_waiting > 1000
    assert roomy.miss_share == 0.0
    assert roomy.replica_hours == pytest.approx(20 * 600 / 3600)


def test_a_burst_waits_behind_full_slots(bench: ModuleType):
    cfg = bench.SimConfig()
    # 25 requests at once on one 10-slot replica: 10 start, the rest wait for slots.
    r = bench.simulate([25] + [0] * 40, bench.Static(1), cfg)
    assert r.served == 25 and r.left_waiting == 0
    assert r.max_wait_s >= 1.0
    assert r.mean_wait_s > 0


def test_cold_start_delays_the_first_request_after_idle(bench: ModuleType):
    cfg = bench.SimConfig()
    ours = bench.Mulambda(bench.mulambda_policy(cfg), cfg.tick_s)
    r = bench.simulate([0] * 20 + [1] + [0] * 200, ours, cfg)
    assert r.cold_starts_from_zero == 1
    # Waits for the 30 s start (plus up to one decision interval), misses the SLO.
    assert 30.0 <= r.max_wait_s <= 33.0
    assert r.slo_misses == 1


def test_poisson_draws_have_the_right_mean(bench: ModuleType):
    rng = random.Random(5)
    for lam in (0.3, 4.0, 250.0):
        draws = [bench.poisson(rng, lam) for _ in range(20_000)]
        mean = sum(draws) / len(draws)
        var = sum((d - mean) ** 2 for d in draws) / len(draws)
        assert mean == pytest.approx(lam, rel=0.03)
        assert var == pytest.approx(lam, rel=0.08)


def test_trace_is_deterministic_and_shaped_like_a_day(bench: ModuleType):
    a = bench.load_curve(86_400, 500.0, seed=7)
    assert a == bench.load_curve(86_400, 500.0, seed=7)
    night = sum(a[1 * 3600 : 5 * 3600 - 1]) / (4 * 3600)
    afternoon = max(a[14 * 3600 : 17 * 3600])
    assert night < 0.5
    assert 400 < afternoon < 700
