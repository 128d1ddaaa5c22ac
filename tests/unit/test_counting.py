"""The in-flight accounting the SDK and the gateway share (mulambda.sdk.counting)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from mulambda.policy.inflight import OwnRequests, stay_window
from mulambda.policy.latency import ServiceModel, ServiceTracker
from mulambda.policy.ranking import Candidate
from mulambda.sdk.counting import InflightCounter, Wire
from mulambda.store.records import ExecutorRecord, ReplicaRecord


@pytest.mark.parametrize(("stay", "net", "margin", "busy_after", "back_after"), [
    # served half a round trip plus the stay after it left, give or take the margin
    pytest.param(20, 30, 0, 35, 50, id="no-margin"),
    pytest.param(20, 30, 5, 40, 50, id="margin"),
    # a margin longer than the way back: still ahead when it is due back (late)
    pytest.param(20, 30, 40, 75, 50, id="margin-past-the-way-back"),
    pytest.param(20, 0, 3, 23, 20, id="no-network"),
])
def test_stay_window(stay, net, margin, busy_after, back_after):
    assert stay_window(stay, net, margin) == (busy_after, back_after)


class FakeLeases:
    """Records what InflightLeases would publish."""

    def __init__(self) -> None:
        self.open: dict[int, tuple[str, list[str | float] | None]] = {}
        self.next = 0
        self.kicks = 0  # asked to publish soon

    def start(self, executor: str, at: float | None = None, publish: bool = True,
              timing: Sequence[str | float] | None = None) -> int:
        self.next += 1
        self.open[self.next] = (executor, list(timing) if timing is not None else None)
        return self.next

    def retime(self, executor: str, token: int, timing: Sequence[str | float]) -> None:
        assert self.open[token][0] == executor
        self.open[token] = (executor, list(timing))

    def finish(self, executor: str, publish: bool = True, token: int | None = None) -> None:
        assert token is not None and self.open.pop(token)[0] == executor

    def kick(self) -> None:
        self.kicks += 1


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def candidate(pod: str | None) -> Candidate:
    rec = ExecutorRecord(namespace="ml", name="e", model="e", version=1, type="t",
                         input="i", output="o", accuracy=0.9, rest="http://e:8501", grpc="",
                         state="Ready")
    replica = ReplicaRecord(executor="ml/e", pod=pod) if pod is not None else None
    return Candidate(executor_id="ml/e", score=1.0, expected_latency_ms=62.0, accuracy=0.9,
                     warm=True, record=rec, network_ms=30.0, service_ms=12.0, load_ms=8.0,
                     inflight=1.0, replica=replica)


@pytest.mark.parametrize(("pod", "outcome", "measured"), [
    pytest.param("e-0", "answered", 1, id="answered-at-a-replica"),
    pytest.param(None, "answered", 1, id="answered-through-the-service"),
    pytest.param("e-0", "failed", 0, id="failed: released, not measured"),
    pytest.param("e-0", "unanswered", 0, id="left without an answer (a 503)"),
])
def test_a_counted_request_is_ahead_while_it_runs_and_released_after(pod, outcome, measured):
    tracker, own, leases = ServiceTracker(), OwnRequests(), FakeLeases()
    wall, mono, perf = Clock(1000.0), Clock(50.0), Clock(7.0)
    counter = InflightCounter(tracker, own, leases, clock=wall, monotonic=mono, perf=perf)
    cand = candidate(pod)
    margin = tracker.stay_margin_ms("ml/e", 20.0)  # stay = service 12 + load 8

    def run() -> Any:
        with counter.count(cand, items=3) as request:
            # Ahead of new requests of this router, at its replica when it has one.
            per_executor, per_pod = own.ahead(50_000.0 + 1)
            assert per_executor == {"ml/e": 1}
            assert per_pod == ({"ml/e": {pod: 1}} if pod else {})
            # Published with the same window (wall seconds) for the other routers.
            [(executor, timing)] = leases.open.values()
            assert executor == "ml/e" and timing is not None
            assert timing[0] == (pod or "")
            assert timing[1] == pytest.approx(1000.0 + (15 + 20 + margin) / 1000)
            assert timing[2] == pytest.approx(1000.0 + 50 / 1000)
            # and what it was sent with: 1 ahead, 3 items, a stay of 20 ms
            assert timing[3:] == [1.0, 3.0, pytest.approx(20.0)]
            perf.at += 0.045
            assert request.elapsed_ms() == pytest.approx(45.0)
            if outcome == "failed":
                raise ConnectionError("refused")
            if outcome == "answered":
                assert request.answered()

    if outcome == "failed":
        with pytest.raises(ConnectionError):
            run()
    else:
        run()
    assert own.ahead(50_000.0 + 1) == ({}, {})
    assert leases.open == {}
    stats = tracker.stats.get("ml/e")
    assert (stats.count if stats is not None else 0) == measured
    if measured:
        # Measured as k = 1 ahead, 3 items, 45 - 30 ms network = 15 ms of service.
        assert stats is not None
        assert (stats.k, stats.i, stats.t) == pytest.approx((1.0, 3.0, 15.0))


def test_an_answer_timed_by_the_caller_is_measured_as_given():
    tracker = ServiceTracker()
    counter = InflightCounter(tracker, OwnRequests(), FakeLeases())
    with counter.count(candidate("e-0")) as request:
        assert request.answered(elapsed_ms=40.0)
    stats = tracker.stats["ml/e"]
    assert stats.t == pytest.approx(10.0)  # 40 - 30 ms of network


@pytest.mark.parametrize(("elapsed", "k"), [
    # 30 ms of network, 12 of its own, 100 for the one request counted ahead (more than
    # three times the error a tracker with no answers yet assumes: 1.48 x 12 ms)
    pytest.param(42.0, 0.0, id="as-fast-as-alone: the uncertain one was served already"),
    pytest.param(140.0, 1.0, id="as-slow-as-with-it-ahead"),
])
def test_an_answer_tells_whether_another_routers_request_was_ahead(elapsed, k):
    """The one request counted ahead was another router's, due back before this one
    arrived (Candidate.uncertain): no answer of its own says when it was served, so this
    one's time does (mulambda.policy.inflight.measured_at)."""
    tracker = ServiceTracker()
    counter = InflightCounter(tracker, OwnRequests(), FakeLeases())
    cand = replace(candidate("e-0"), load_ms=100.0, uncertain=1.0,
                   model=ServiceModel(12.0, 100.0))
    with counter.count(cand) as request:
        assert request.answered(elapsed_ms=elapsed)
    stats = tracker.stats["ml/e"]
    assert (stats.k, stats.t) == pytest.approx((k, elapsed - 30.0))


def test_sdk_and_gateway_count_through_the_shared_helper():
    """The duplicated copies are gone: both routers hold an InflightCounter over their own
    tracker, requests and leases."""
    import inspect

    from mulambda.sdk import client
    from mulambda.selector import service

    for source in (inspect.getsource(client.MulambdaClient._counted),
                   inspect.getsource(service.Selector.forward)):
        assert ".count(candidate, items)" in source
        assert "stay_margin_ms" not in source and "own.add" not in source


@pytest.mark.parametrize(("first_back_ms", "k_measured", "second_lease"), [
    # RTT 30 ms: the first answered 39 ms after both left was served at 24, before the
    # second arrived at 15 + 10: the second had nothing ahead, and its lease says so
    # (served 15 + 12 + margin after it left instead of 15 + 82 + margin, back after
    # 30 + 12, sent with 0 ahead)
    pytest.param(39.0, 0.0, (15 + 12, 30 + 12, 0.0), id="counted-ahead-but-served-before"),
    # answered at 60, served at 45: it was ahead of the second; its lease is as sent
    pytest.param(60.0, 1.0, (15 + 82, 30 + 82, 1.0), id="counted-ahead-and-ahead"),
])
def test_a_request_is_measured_at_the_requests_ahead_it_met(first_back_ms, k_measured,
                                                            second_lease):
    from mulambda.policy.latency import ServiceModel

    tracker = ServiceTracker()
    mono, wall = Clock(0.0), Clock(1000.0)
    leases = FakeLeases()
    counter = InflightCounter(tracker, OwnRequests(), leases, monotonic=mono, clock=wall)
    model = ServiceModel(12.0, 70.0)
    first = replace(candidate("e-0"), inflight=0.0, load_ms=0.0, model=model)
    second = replace(candidate("e-0"), inflight=1.0, load_ms=70.0, model=model)
    with counter.count(first) as one:
        mono.at = 0.010
        margin = tracker.stay_margin_ms("ml/e", 82.0)
        with counter.count(second) as two:
            mono.at = first_back_ms / 1000
            assert one.answered(elapsed_ms=first_back_ms)
            # what the other routers read of the second from now on
            _, timing = leases.open[2]
            assert timing is not None
            served, back, ahead = second_lease
            assert timing[1:4] == [pytest.approx(1000 + (served + margin) / 1000),
                                   pytest.approx(1000 + back / 1000), ahead]
            mono.at = 0.1
            assert two.answered(elapsed_ms=90.0)
    stats = tracker.stats["ml/e"]
    assert stats.count == 2
    assert stats.k == pytest.approx(k_measured)  # the first was measured at k = 0


def test_a_counted_request_not_back_when_due_says_what_it_was_sent_with():
    own = OwnRequests()
    mono = Clock(0.0)
    counter = InflightCounter(ServiceTracker(), own, FakeLeases(), monotonic=mono)
    with counter.count(candidate("e-0"), items=3):  # 1 ahead, stay 12 + 8, RTT 30
        assert own.late(49.0) == {}
        # 120 ms out, due at 50: served for at least 90 of them
        assert own.late(120.0) == {"ml/e": [(1.0, 3.0, 90.0)]}
    assert own.late(120.0) == {}


def test_measurements_fade_on_the_counter_clock_and_are_published_again():
    # What a router ranks with: its own statistics, faded for the time no answer came
    # (ServiceTracker.fade), on the clock it times its requests with; a fade is
    # published (the leases are kicked) so the other routers fit on it too.
    tracker, leases, mono = ServiceTracker(), FakeLeases(), Clock(100.0)
    counter = InflightCounter(tracker, OwnRequests(), leases, monotonic=mono,
                              perf=Clock(0.0))
    with counter.count(candidate("e-0")) as request:
        request.answered(50.0)
    tracker.take_changed()
    answered = counter.measurements()["ml/e"]
    assert leases.kicks == 0  # nothing to fade yet
    mono.at += 2 * tracker.settings.idle_half_life_s
    faded = counter.measurements()["ml/e"]
    assert faded.w == pytest.approx(answered.w / 4)
    assert leases.kicks == 1 and tracker.take_changed() == {"ml/e": faded}


@pytest.mark.parametrize(("sent", "back", "ms"), [
    pytest.param(1.0, 1.25, 250.0, id="sent-then-back"),
    pytest.param(None, 1.25, None, id="never-sent"),  # failed before its body left
    pytest.param(1.0, None, None, id="never-back"),
    pytest.param(1.25, 1.0, None, id="out-of-order"),
])
def test_the_wire_time_of_a_request(sent, back, ms):
    wire = Wire()
    wire.sent, wire.back = sent, back
    assert wire.ms() == (pytest.approx(ms) if ms is not None else None)


def test_an_answer_timed_on_the_wire_says_when_it_was_served_as_if_sent_when_counted():
    # Both requests were counted at once; the first was on the wire 39 ms (RTT 30: served
    # by 24 after it left) but reached the router's answer code only at 70 ms (its own
    # work before and after). The second, counted at 10 ms, reached the replica after
    # 10 + 15: it did not have the first ahead, as the wire time says and the 70 would not.
    from mulambda.policy.latency import ServiceModel

    tracker = ServiceTracker()
    mono = Clock(0.0)
    counter = InflightCounter(tracker, OwnRequests(), FakeLeases(), monotonic=mono)
    model = ServiceModel(12.0, 70.0)
    with counter.count(replace(candidate("e-0"), inflight=0.0, load_ms=0.0,
                               model=model)) as one:
        mono.at = 0.010
        with counter.count(replace(candidate("e-0"), inflight=1.0, load_ms=70.0,
                                   model=model)) as two:
            mono.at = 0.070
            assert one.answered(elapsed_ms=39.0)
            assert two.answered(elapsed_ms=45.0)
    stats = tracker.stats["ml/e"]
    assert stats.count == 2
    assert stats.k == pytest.approx(0.0)  # neither met a request ahead
    # each on the wire less the 30 ms RTT (the first decayed by one step since)
    assert stats.t == pytest.approx(9.0 * (1 - 1 / tracker.settings.memory) + 15.0)
