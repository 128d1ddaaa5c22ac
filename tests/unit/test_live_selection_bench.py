"""bench/live_selection.py's replicas: the state the oracle reads is the state requests meet."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from types import ModuleType

import pytest

from mulambda.tools.simulate.world import Replica, Scenario, World

from support.benches import bench_module


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with bench_module("live_selection.py") as module:
        yield module

def world_of(slots: int) -> World:
    return World(Scenario({
        "seed": 1, "requests": 1, "rate_per_s": 1, "jitter": 0.0, "nodes": ["a"],
        "network_ms": {"a": {"a": 0}},
        "models": {"m": {"service_ms": 20, "per_concurrent_ms": 30, "concurrency": slots,
                         "accuracy": 0.9}},
        "executors": [{"name": "m", "model": "m", "nodes": ["a"]}],
        "clients": [{"name": "c", "node": "a"}]}))


@pytest.mark.parametrize(("slots", "running", "busy", "queued"), [
    # Every request at once: each runs beside those before it and pays for them.
    pytest.param(0, [0, 1, 2], 3, 0, id="all-at-once"),
    # One slot: the others wait in line and each runs alone when its turn comes.
    pytest.param(1, [0, 0, 0], 1, 2, id="one-slot"),
    pytest.param(2, [0, 1, 1], 2, 1, id="two-slots"),
])
async def test_a_replica_runs_queues_and_prices_requests_as_the_simulated_one(
        bench, slots, running, busy, queued):
    world = world_of(slots)
    rep: Replica = world.reps["sim/m"][0]
    seen: list[int] = []
    times = iter([50.0, 200.0, 50.0])  # the second outlasts the first

    def duration(eid, r, factor, u, items) -> float:
        seen.append(r.busy)  # the requests running beside this one as it starts
        return next(times)

    world.duration = duration  # type: ignore[method-assign]
    live = bench.LiveReplica(world, "sim/m", rep, rtt_ms=0.0, rng=random.Random(1))
    held = asyncio.gather(*(live.hold() for _ in range(3)))
    for _ in range(10):  # every request past its (zero) network delay, none done
        await asyncio.sleep(0)
    assert (rep.busy, len(rep.queue), rep.transit) == (busy, queued, 0)
    await held
    assert seen == running
    assert (rep.busy, rep.transit, len(rep.queue), live.waiting) == (0, 0, 0, {})


def test_every_router_the_bench_takes_is_one_it_can_run(bench):
    # The real two it builds itself; every other name is the simulator's router on the
    # doubles' live state (a name the simulator did not know failed only mid-run).
    from mulambda.policy.ranking import Policy
    from mulambda.tools.simulate.routers import Router, router
    from mulambda.tools.simulate.world import records_of

    world = world_of(0)
    simulated = [n for n in bench.KNOWN if n not in ("mulambda-sdk", "mulambda-gateway")]
    assert "oracle" in simulated and "noisy-oracle" in simulated
    for name in simulated:
        assert isinstance(router(name, world.sc, records_of(world.sc), world, Policy()), Router)
