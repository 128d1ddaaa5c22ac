"""Spare capacity ahead of demand (mulambda.policy.headroom, rule 9 of scaling.decide):
burstCapacity requests in flight on top of the stable demand, at most the demand itself,
none without demand, never above maxReplicas."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mulambda.api.modelexecutor import Scaling
from mulambda.policy.headroom import headroom_replicas, spare_concurrency
from mulambda.policy.scaling import DemandWindow, Reason, Sample, ScalingState, decide

from support.burst import run_burst

REPO = Path(__file__).resolve().parents[2]

# (concurrency, burst capacity, max replicas) -> replicas at a target of 7
HEADROOM = [
    # A busy executor keeps the whole burst capacity spare: (80 + 35) / 7.
    (80.0, 35.0, 200, 17),
    # At the peak the spare is the same absolute amount, not a share of the load.
    (609.0, 35.0, 200, 92),
    # A quiet one keeps at most its own demand spare: (3 + 3) / 7.
    (3.0, 35.0, 200, 1),
    (10.0, 35.0, 200, 3),
    # No demand: nothing kept (the idle window and scale to zero decide).
    (0.0, 35.0, 200, 0),
    # Turned off.
    (80.0, 0.0, 200, 0),
    # Never asks beyond maxReplicas.
    (600.0, 35.0, 90, 90),
    # Exactly on a boundary stays there (no rounding up by float noise).
    (35.0, 35.0, 200, 10),
]


@pytest.mark.parametrize(("concurrency", "burst", "hi", "expected"), HEADROOM)
def test_headroom_replicas(concurrency, burst, hi, expected):
    assert headroom_replicas(concurrency, target=7.0, burst_capacity=burst,
                             max_replicas=hi) == expected


@pytest.mark.parametrize(("concurrency", "burst", "expected"),
                         [(80.0, 35.0, 35.0), (3.0, 35.0, 3.0), (0.0, 35.0, 0.0),
                          (80.0, 0.0, 0.0)])
def test_spare_is_the_burst_capacity_at_most_the_demand(concurrency, burst, expected):
    assert spare_concurrency(concurrency, burst) == expected


@pytest.mark.parametrize("bad", [{"burst_capacity": -1.0}, {"target": 0.0}])
def test_headroom_rejects_impossible_inputs(bad):
    args = {"target": 7.0, "burst_capacity": 35.0, "max_replicas": 10, **bad}
    with pytest.raises(ValueError):
        headroom_replicas(10.0, **args)


def _policy(**overrides: float) -> Scaling:
    values: dict[str, float] = {"minReplicas": 0, "maxReplicas": 200, "targetConcurrency": 7,
                                "idleWindowSeconds": 300, "stableWindowSeconds": 60,
                                "panicWindowSeconds": 6, "scaleDownDelaySeconds": 30}
    values.update(overrides)
    return Scaling.model_validate(values)


def _steady(concurrency: float, seconds: int = 60) -> DemandWindow:
    return DemandWindow(tuple(Sample(float(t), concurrency, rate=concurrency)
                              for t in range(1, seconds + 1)))


# (burst capacity, concurrency, replicas now, max) -> (desired, reason)
DECISIONS = [
    # Steady 80 in flight: 12 replicas carry it, 17 keep 35 spare.
    (0.0, 80.0, 12, 200, 12, Reason.HOLD),
    (35.0, 80.0, 12, 200, 17, Reason.SCALE_UP),
    (35.0, 80.0, 17, 200, 17, Reason.HOLD),
    # The spare stops at maxReplicas and is no reason to report Bounded.
    (35.0, 80.0, 14, 14, 14, Reason.HOLD),
    # Demand alone above maxReplicas still is.
    (35.0, 120.0, 14, 14, 14, Reason.BOUNDED),
]


@pytest.mark.parametrize(("burst", "concurrency", "current", "hi", "desired", "reason"),
                         DECISIONS)
def test_decide_keeps_the_burst_capacity_ready(burst, concurrency, current, hi, desired,
                                                reason):
    d = decide(_policy(burstCapacity=burst, maxReplicas=hi), _steady(concurrency),
               current_replicas=current, ready_replicas=current, state=ScalingState(), now=60.0)
    assert (d.desired_replicas, d.reason) == (desired, reason)
    assert not d.panicking, "spare capacity is not a burst"


def test_spare_capacity_does_not_keep_an_idle_executor_up():
    idle = DemandWindow(tuple(Sample(float(t), 0.0) for t in range(1, 400)))
    d = decide(_policy(burstCapacity=35), idle, current_replicas=1, ready_replicas=1,
               state=ScalingState(last_demand_at=0.0), now=399.0)
    assert (d.desired_replicas, d.reason) == (0, Reason.SCALE_TO_ZERO)


def test_activation_with_demand_starts_the_spare_too():
    d = decide(_policy(burstCapacity=35), _steady(20.0, seconds=6), current_replicas=0,
               ready_replicas=0, state=ScalingState(), now=6.0)
    assert (d.desired_replicas, d.reason) == (6, Reason.ACTIVATE)  # (20 + 20) / 7


def test_the_crd_default_is_the_api_default():
    crd = yaml.safe_load((REPO / "crds" / "modelexecutors.mulambda.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    field = spec["properties"]["scaling"]["properties"]["burstCapacity"]
    assert field["default"] == Scaling().burst_capacity
    assert Scaling.model_validate({"burstCapacity": 0}).burst_capacity == 0


def test_the_spare_rides_on_arrivals_not_on_a_backlog_being_drained():
    # 400 tasks queued and nothing arriving: rule 8 drains them; no spare on top.
    backlog = DemandWindow(tuple(Sample(float(t), 400.0, rate=0.0, queued=400.0, service_s=1.0)
                                 for t in range(1, 61)))
    d = decide(_policy(burstCapacity=35, targetConcurrency=4), backlog, current_replicas=3,
               ready_replicas=3, state=ScalingState(), now=60.0, cold_start_seconds=30.0)
    assert d.desired_replicas == 3


def _burst_queue(burst_capacity: float) -> tuple[int, float]:
    """Replicas ready when 100 requests/s of a 1 s model jump to 450 (10 slots a
    replica, 30 s cold start), and the most requests waiting over the burst."""
    steps = run_burst(_policy(burstCapacity=burst_capacity, minReplicas=1),
                      lambda second: 100.0 if second <= 200 else 450.0, range(1, 301))
    at_burst = next(s.ready for s in steps if s.second == 200)
    return at_burst, max(s.queued for s in steps)


def test_a_burst_meets_the_spare_replicas_and_queues_less():
    without, with_spare = _burst_queue(0.0), _burst_queue(35.0)
    assert (without[0], with_spare[0]) == (15, 20)  # 100 / 7 and (100 + 35) / 7
    # The 5 spare replicas take 50 of the 350 extra requests a second during the cold start.
    assert with_spare[1] < 0.9 * without[1]
