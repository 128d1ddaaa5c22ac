"""The pure autoscaler decision: steady load, bursts, idle, bounds, delay, flapping."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from mulambda.api.modelexecutor import Scaling
from mulambda.policy.scaling import (
    Decision,
    DemandWindow,
    Reason,
    Sample,
    ScalingState,
    decide,
    record_sample,
    window_horizon,
)


def _policy(**overrides: float) -> Scaling:
    values: dict[str, float] = {
        "minReplicas": 0,
        "maxReplicas": 50,
        "targetConcurrency": 4,
        "idleWindowSeconds": 300,
        "stableWindowSeconds": 60,
        "panicWindowSeconds": 6,
        "scaleDownDelaySeconds": 30,
        # Rules 1-8 alone; the spare capacity (rule 9) has its own tests.
        "burstCapacity": 0,
    }
    values.update(overrides)
    return Scaling.model_validate(values)


@dataclass
class Loop:
    """A tiny control loop: sample every second, decide every ``every`` seconds.

    Pods become ready ``start_delay`` seconds after they are asked for, so
    tests can see the autoscaler against cold starts, not only instant pods.
    """

    policy: Scaling
    replicas: int = 0
    start_delay: float = 0.0
    every: float = 2.0
    now: float = 0.0
    window: DemandWindow = field(default_factory=DemandWindow)
    state: ScalingState = field(default_factory=ScalingState)
    starting: list[float] = field(default_factory=list)  # ready-at times of starting pods
    ready: int = 0
    decisions: list[Decision] = field(default_factory=list)
    history: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ready = self.replicas

    def run(self, seconds: float, concurrency: Callable[[float], float]) -> Loop:
        end = self.now + seconds
        while self.now < end:
            self.now += 1.0
            self.ready += sum(1 for t in self.starting if t <= self.now)
            self.starting = [t for t in self.starting if t > self.now]
            c = concurrency(self.now)
            sample = Sample(self.now, c, rate=c)
            horizon = window_horizon(self.policy)
            self.window = record_sample(self.window, sample, horizon_seconds=horizon)
            if self.now % self.every == 0:
                self.step()
        return self

    def step(self, activation: bool = False) -> Decision:
        d = decide(
            self.policy, self.window, current_replicas=self.replicas,
            ready_replicas=self.ready, state=self.state, now=self.now, activation=activation,
        )
        self.state = d.state
        self.decisions.append(d)
        if d.desired_replicas > self.replicas:
            n = d.desired_replicas - self.replicas
            if self.start_delay:
                self.starting += [self.now + self.start_delay] * n
            else:
                self.ready += n
        elif d.desired_replicas < self.replicas:
            drop = self.replicas - d.desired_replicas
            unstarted = min(drop, len(self.starting))
            self.starting = self.starting[: len(self.starting) - unstarted]
            self.ready -= drop - unstarted
        self.replicas = d.desired_replicas
        self.history.append(self.replicas)
        return d

    @property
    def changes(self) -> int:
        return sum(1 for a, b in itertools.pairwise(self.history) if a != b)


def test_steady_load_holds_the_right_count():
    loop = Loop(_policy(), replicas=1).run(600, lambda t: 18.0)

    assert loop.replicas == math.ceil(18 / 4)
    # Once there, nothing moves.
    assert set(loop.history[60:]) == {5}
    assert loop.decisions[-1].reason == Reason.HOLD


def test_burst_triggers_panic_scale_up_within_seconds():
    loop = Loop(_policy(), replicas=3).run(300, lambda t: 10.0)
    assert loop.replicas == 3
    burst_at = loop.now

    loop.run(4, lambda t: 100.0)

    assert loop.replicas >= 15, "the 6 s panic window must chase a 10x burst at once"
    assert all(d.reason == Reason.PANIC for d in loop.decisions[-2:])
    assert loop.state.panic_since is not None and loop.state.panic_since > burst_at
    # The stable window alone would still ask for fewer than 6 replicas.
    assert math.ceil((loop.decisions[-1].stable_concurrency or 0) / 4) <= 6

    loop.run(2, lambda t: 100.0)
    assert loop.replicas == 25


def test_panic_never_scales_down_and_lasts_a_stable_window():
    loop = Loop(_policy(), replicas=3, start_delay=30).run(300, lambda t: 10.0)
    loop.run(10, lambda t: 120.0)
    peak = loop.replicas
    assert loop.decisions[-1].panicking

    # Load drops back at once: panic holds the count while it lasts...
    loop.run(40, lambda t: 10.0)
    assert loop.decisions[-1].panicking
    assert min(loop.history[-20:]) == peak

    # ...then ends after a stable window without crossing the threshold, and
    # the count comes down (after the scale-down delay) to what load needs.
    loop.run(300, lambda t: 10.0)
    assert not loop.decisions[-1].panicking
    assert loop.state.panic_since is None
    assert loop.replicas == 3


def test_idle_scales_to_zero_only_after_the_idle_window():
    loop = Loop(_policy(idleWindowSeconds=300), replicas=1).run(120, lambda t: 2.0)
    last_demand = loop.now

    loop.run(280, lambda t: 0.0)
    assert loop.replicas == 1, "one replica stays warm inside the idle window"
    assert "idle window" in loop.decisions[-1].message

    loop.run(30, lambda t: 0.0)
    assert loop.replicas == 0
    to_zero = next(d for d in loop.decisions if d.desired_replicas == 0)
    assert to_zero.reason == Reason.SCALE_TO_ZERO
    assert to_zero.state.last_demand_at == last_demand
    first_zero = loop.history.index(0)
    assert (first_zero + 1) * loop.every - 120 >= 300

    loop.run(60, lambda t: 0.0)
    assert loop.replicas == 0
    assert loop.decisions[-1].reason == Reason.HOLD


def test_idle_never_scales_to_zero_when_min_replicas_is_positive():
    loop = Loop(_policy(minReplicas=1, idleWindowSeconds=10), replicas=4)
    loop.run(60, lambda t: 14.0).run(3600, lambda t: 0.0)

    assert loop.replicas == 1
    assert min(loop.history) == 1


def test_fresh_state_does_not_scale_to_zero_at_once():
    """An operator restart loses the idle clock; it restarts rather than firing."""
    window = DemandWindow((Sample(995.0, 0.0), Sample(1000.0, 0.0)))
    d = decide(
        _policy(idleWindowSeconds=300), window, current_replicas=2, ready_replicas=2,
        state=ScalingState(), now=1000.0,
    )
    assert d.desired_replicas == 1
    assert d.state.last_demand_at == 1000.0


def test_never_below_min_nor_above_max():
    policy = _policy(minReplicas=2, maxReplicas=6)
    loop = Loop(policy, replicas=2)
    loop.run(120, lambda t: 500.0)
    assert loop.replicas == 6
    assert loop.decisions[-1].reason == Reason.BOUNDED
    assert "maxReplicas=6" in loop.decisions[-1].message

    loop.run(900, lambda t: 0.0)
    assert loop.replicas == 2
    assert all(2 <= n <= 6 for n in loop.history)


def test_replicas_above_a_lowered_max_come_down_even_without_samples():
    d = decide(
        _policy(maxReplicas=3), DemandWindow(), current_replicas=8, ready_replicas=8,
        state=ScalingState(), now=50.0,
    )
    assert (d.desired_replicas, d.reason) == (3, Reason.BOUNDED)


def test_no_samples_holds_instead_of_guessing():
    d = decide(
        _policy(), DemandWindow((Sample(0.0, 40.0),)), current_replicas=5, ready_replicas=5,
        state=ScalingState(), now=500.0,
    )
    assert (d.desired_replicas, d.reason) == (5, Reason.HOLD)
    assert "no demand samples" in d.message


def test_scale_down_waits_for_the_delay():
    loop = Loop(_policy(scaleDownDelaySeconds=120), replicas=10).run(120, lambda t: 40.0)
    assert loop.replicas == 10
    dropped_at = loop.now

    # The stable average needs ~60 s to fall; the delay adds 120 s on top of
    # when the recommendation first went lower.
    loop.run(600, lambda t: 8.0)
    first_down = next(i for i, n in enumerate(loop.history) if n < 10)
    down_at = (first_down + 1) * loop.every
    last_high_rec = max(
        (i + 1) * loop.every for i, d in enumerate(loop.decisions)
        if (i + 1) * loop.every < down_at and (d.stable_concurrency or 0) > 36
    )
    assert last_high_rec > dropped_at
    assert down_at - last_high_rec >= 120
    assert loop.replicas == 2
    assert any(
        d.reason == Reason.HOLD and "scale-down waits" in d.message for d in loop.decisions
    )


def test_scale_up_is_not_delayed():
    loop = Loop(_policy(scaleDownDelaySeconds=600), replicas=2).run(120, lambda t: 8.0)
    loop.run(60, lambda t: 20.0)
    assert loop.replicas == 5


@pytest.mark.parametrize(
    ("high_s", "low_s"), [(2, 2), (3, 3), (5, 5), (4, 8), (10, 10), (15, 15), (20, 40), (30, 30)]
)
def test_flapping_load_does_not_thrash(high_s: int, low_s: int):
    period = high_s + low_s

    def flapping(t: float) -> float:
        return 40.0 if t % period < high_s else 0.0

    loop = Loop(_policy(), replicas=1, start_delay=10).run(1800, flapping)

    # Whatever it settles on, it settles: a handful of moves while it finds the
    # level, none in the last 25 minutes...
    assert loop.changes <= 4, loop.history
    assert len(set(loop.history[150:])) == 1
    mean = 40.0 * high_s / period
    assert loop.replicas >= math.ceil(mean / 4)
    # ...where a rule without windows (react to each sample) would move on every flip.
    naive = [math.ceil(flapping(t) / 4) for t in range(1, 1801, 2)]
    assert sum(1 for a, b in itertools.pairwise(naive) if a != b) > 10 * max(loop.changes, 1)


def test_a_delay_as_long_as_the_flap_period_holds_slower_square_waves():
    """20 s on / 20 s off leaves a ripple in the 60 s average; the delay absorbs it."""
    loop = Loop(_policy(scaleDownDelaySeconds=60), replicas=1, start_delay=10)
    loop.run(1800, lambda t: 40.0 if t % 40 < 20 else 0.0)
    assert loop.changes <= 2, loop.history
    assert len(set(loop.history[150:])) == 1


def test_activation_from_zero_gives_a_replica_at_once():
    window = DemandWindow((Sample(990.0, 0.0), Sample(1000.0, 0.0)))
    state = ScalingState(last_demand_at=0.0, desired=0)
    d = decide(
        _policy(), window, current_replicas=0, ready_replicas=0, state=state,
        now=1000.0, activation=True,
    )
    assert (d.desired_replicas, d.reason) == (1, Reason.ACTIVATE)
    assert d.state.last_demand_at == 1000.0

    # One queued request shows up as in-flight demand: same answer without the flag.
    window = record_sample(window, Sample(1001.0, 1.0), horizon_seconds=60)
    d = decide(
        _policy(), window, current_replicas=0, ready_replicas=0, state=state, now=1001.0,
    )
    assert (d.desired_replicas, d.reason) == (1, Reason.ACTIVATE)


def test_activation_into_a_burst_asks_for_what_the_burst_needs():
    loop = Loop(_policy(), replicas=0).run(30, lambda t: 0.0)
    loop.run(2, lambda t: 60.0)
    assert loop.decisions[-1].reason == Reason.ACTIVATE
    # Two of six panic-window samples carry the burst: 20 in flight -> 5 now...
    assert loop.replicas == 5
    # ...and panic keeps chasing it while those pods start.
    loop.run(4, lambda t: 60.0)
    assert loop.replicas == 15


def test_no_demand_at_zero_stays_at_zero():
    state = ScalingState(desired=0, last_demand_at=0.0, recent=((990.0, 5),))
    window = DemandWindow((Sample(999.0, 0.0),))
    d = decide(
        _policy(), window, current_replicas=0, ready_replicas=0, state=state, now=1000.0,
    )
    assert (d.desired_replicas, d.reason) == (0, Reason.HOLD)


def test_same_inputs_same_decision():
    def wavy(t: float) -> float:
        return 30 + 25 * math.sin(t / 37.0) + (17 if int(t) % 97 < 5 else 0)

    a = Loop(_policy(), replicas=1, start_delay=20).run(3000, wavy)
    b = Loop(_policy(), replicas=1, start_delay=20).run(3000, wavy)
    assert a.decisions == b.decisions
    assert a.history == b.history

    # And decide itself is a function of its inputs: replaying one call agrees.
    d = decide(
        _policy(), a.window, current_replicas=a.replicas, ready_replicas=a.ready,
        state=a.state, now=a.now + 2,
    )
    assert d == decide(
        _policy(), a.window, current_replicas=a.replicas, ready_replicas=a.ready,
        state=a.state, now=a.now + 2,
    )


def test_delay_queue_stays_short_and_the_status_is_json():
    loop = Loop(_policy(), replicas=2, start_delay=5).run(400, lambda t: 30.0 if t < 300 else 3)
    # The max-queue behind the scale-down delay stays short, whatever the history.
    assert len(loop.state.recent) <= 30 / 2 + 1
    status = loop.decisions[-1].to_status()
    assert status["reason"] in {r.value for r in Reason}
    json.dumps(status)


@pytest.mark.parametrize(("before", "after", "shared"), [
    pytest.param(Sample(1.0, 0.0, 0.0, 0.0, 0.02), Sample(3.0, 0.0, 0.0, 0.0, 0.02),
                 {"concurrency", "rate", "queued", "service_s"}, id="idle-shares-all"),
    pytest.param(Sample(1.0, 2.0, 5.0, 0.0, 0.02), Sample(3.0, 3.0, 5.0, 0.0, None),
                 {"rate", "queued"}, id="changed-values-own"),
    pytest.param(Sample(1.0, 2.0, 5.0, 1.0, 0.02), Sample(3.0, 3.0, 4.0, 2.0, 0.03),
                 set(), id="nothing-equal"),
])
def test_a_sample_holds_the_previous_ones_values_where_they_are_equal(
    before: Sample, after: Sample, shared: set[str]
) -> None:
    # Values computed as the autoscaler computes them: equal floats, distinct objects.
    fresh = Sample(after.at, *(None if v is None else float(str(v)) for v in
                               (after.concurrency, after.rate, after.queued, after.service_s)))
    window = record_sample(DemandWindow((before,)), fresh, horizon_seconds=60)
    newest = window.samples[-1]
    assert newest == after  # the same sample
    fields = ("concurrency", "rate", "queued", "service_s")
    assert {f for f in fields if getattr(newest, f) is getattr(before, f)} == shared


def test_record_sample_keeps_a_bounded_sorted_window():
    w = DemandWindow()
    for t in range(100):
        w = record_sample(w, Sample(float(t), 1.0), horizon_seconds=10)
    assert [s.at for s in w.samples] == [float(t) for t in range(90, 100)]

    late = record_sample(w, Sample(95.5, 7.0), horizon_seconds=10)
    assert [s.at for s in late.samples][-6:] == [95.0, 95.5, 96.0, 97.0, 98.0, 99.0]

    capped = DemandWindow()
    for t in range(50):
        capped = record_sample(capped, Sample(t / 10, 0.0), horizon_seconds=60, max_samples=8)
    assert len(capped.samples) == 8
    assert capped.samples[-1].at == 4.9


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_samples_reject_nonsense(bad: float):
    with pytest.raises(ValueError):
        Sample(0.0, bad)
