"""A router's own requests in flight (mulambda.policy.inflight, pure, no I/O)."""

from __future__ import annotations

import math

import pytest

from mulambda.policy.inflight import OwnRequests, measured_at
from mulambda.policy.latency import Late, ServiceModel


@pytest.mark.parametrize(("age", "ahead"), [
    pytest.param(0, 1, id="just-sent"),
    pytest.param(19, 1, id="still-being-served"),
    pytest.param(20, 0, id="on-its-way-back"),
    pytest.param(49, 0, id="still-on-its-way-back"),
    pytest.param(50, 1, id="late-so-still-being-served"),
])
def test_own_request_is_ahead_unless_it_is_probably_on_its_way_back(age, ahead):
    own = OwnRequests()
    own.add("e", "pod-a", sent_ms=1000, stay_ms=20, network_ms=30)
    per_executor, per_pod = own.ahead(1000 + age)
    assert per_executor.get("e", 0) == ahead
    assert per_pod.get("e", {}).get("pod-a", 0) == ahead


@pytest.mark.parametrize(("margin", "age", "ahead"), [
    # stay 20 ms, RTT 30 ms: with a 5 ms margin it counts until 25 ms, then is on its way back
    pytest.param(5, 22, 1, id="past-the-stay-within-its-error"),
    pytest.param(5, 25, 0, id="past-the-stay-and-its-error"),
    pytest.param(5, 49, 0, id="on-its-way-back"),
    pytest.param(5, 50, 1, id="late"),
    # a margin as long as the way back: counted until it is back (or late)
    pytest.param(30, 45, 1, id="margin-covers-the-way-back"),
    pytest.param(math.nan, 20, 0, id="nan-margin-is-none"),
    pytest.param(-3, 20, 0, id="negative-margin-is-none"),
])
def test_own_request_counts_for_its_margin_after_the_predicted_stay(margin, age, ahead):
    own = OwnRequests()
    own.add("e", "pod-a", sent_ms=1000, stay_ms=20, network_ms=30, margin_ms=margin)
    per_executor, per_pod = own.ahead(1000 + age)
    assert per_executor.get("e", 0) == ahead
    assert per_pod.get("e", {}).get("pod-a", 0) == ahead


def test_own_requests_count_per_replica_and_are_forgotten_when_removed():
    own = OwnRequests()
    a = own.add("e", "pod-a", 0, 100, 1)
    own.add("e", "pod-b", 0, 100, 1)
    own.add("f", None, 0, 100, 1)
    assert own.ahead(10) == ({"e": 2, "f": 1}, {"e": {"pod-a": 1, "pod-b": 1}})
    own.remove(a)
    own.remove(a)  # twice is harmless
    assert own.ahead(10) == ({"e": 1, "f": 1}, {"e": {"pod-b": 1}})
    assert len(own) == 2


@pytest.mark.parametrize(("first_pod", "first_back_at", "second_sent", "gone", "ahead"), [
    # RTT 30 ms. The first (stay 15) answered at 39 was served at 24; the second, sent at
    # 10, reached the replica at 25: it did not have the first ahead.
    pytest.param("pod-a", 39, 10, 1, 0, id="served-before-the-second-arrived"),
    pytest.param("pod-a", 40, 10, 1, 0, id="served-as-the-second-arrived"),
    # answered at 50, served at 35: still running when the second arrived at 25
    pytest.param("pod-a", 50, 10, 0, 1, id="served-after-the-second-arrived"),
    # another replica: never counted ahead of the second
    pytest.param("pod-b", 39, 10, 0, 1, id="other-replica"),
    # on its way back when the second was sent (age 20 of 15..45): not counted, nothing
    # to undo
    pytest.param("pod-a", 39, 20, 0, 1, id="not-counted-ahead"),
])
def test_an_answer_shows_whether_a_request_counted_ahead_was(first_pod, first_back_at,
                                                           second_sent, gone, ahead):
    own = OwnRequests()
    first = own.add("e", first_pod, sent_ms=0, stay_ms=15, network_ms=30)
    # the second's stay: 15 of its own and 70 for the one request counted ahead
    second = own.add("e", "pod-a", sent_ms=second_sent, stay_ms=85, network_ms=30,
                     saving=lambda g: 70 * g)
    own.answered(first, first_back_at)
    own.remove(first)
    assert own.gone_ahead(second) == gone
    # 30 ms after it was sent the second is still ahead unless its stay lost the 70 ms
    assert own.ahead(second_sent + 30)[1].get("e", {}).get("pod-a", 0) == ahead
    own.answered(first, first_back_at)  # after removal: harmless
    assert own.gone_ahead(second) == gone
    assert own.gone_ahead(12345) == 0


@pytest.mark.parametrize(("inflight", "age", "late"), [
    # sent with 2 ahead and 3 items, a stay of 20 ms over a 30 ms round trip: due at 50
    pytest.param(2.0, 49.0, None, id="not-due-yet"),
    pytest.param(2.0, 50.0, Late(2.0, 3.0, 20.0), id="due-and-not-back"),
    # 130 ms out: served for at least 100 of them
    pytest.param(2.0, 130.0, Late(2.0, 3.0, 100.0), id="long-late"),
    # a /select answer counted without a count of what was ahead: nothing to go by
    pytest.param(None, 130.0, None, id="count-unknown"),
])
def test_a_late_request_says_the_least_its_time_can_be(inflight, age, late):
    own = OwnRequests()
    own.add("e", "pod-a", sent_ms=1000, stay_ms=20, network_ms=30, margin_ms=5,
            inflight=inflight, items=3)
    assert own.late(1000 + age) == ({"e": [late]} if late is not None else {})


def test_a_late_request_leaves_out_the_requests_ahead_that_answers_showed_gone():
    own = OwnRequests()
    first = own.add("e", "pod-a", sent_ms=0, stay_ms=15, network_ms=30, inflight=0)
    # counted the first ahead: 15 ms of its own and 70 for the one ahead
    own.add("e", "pod-a", sent_ms=10, stay_ms=85, network_ms=30, saving=lambda g: 70 * g,
            inflight=1)
    own.answered(first, 39)  # served at 24, before the second arrived at 25
    own.remove(first)
    assert own.late(10 + 44) == {}  # due at 15 + 30 once the 70 ms are taken off
    assert own.late(10 + 45) == {"e": [Late(0.0, 1.0, 15.0)]}


@pytest.mark.parametrize(("inflight", "uncertain", "gone", "measured", "want"), [
    # Sent with 2 counted ahead: 10 ms of its own and 100 per request ahead, so 210 ms;
    # the prediction's error is 5 ms (one standard deviation).
    # Nothing uncertain: measured at the count, whatever it took.
    pytest.param(2, 0, 0, 10, (2, 210), id="nothing-uncertain"),
    pytest.param(2, 0, 1, 10, (1, 110), id="own-answers-showed-one-gone"),
    # One of the two another router's, due back before it arrived: its time tells.
    pytest.param(2, 1, 0, 112, (1, 110), id="uncertain-one-was-served-already"),
    pytest.param(2, 1, 0, 205, (2, 210), id="uncertain-one-was-ahead"),
    # In between: the nearer whole request
    pytest.param(2, 1, 0, 170, (2, 210), id="nearer-to-met"),
    pytest.param(2, 1, 0, 150, (1, 110), id="nearer-to-served"),
    # Never outside what was counted: not fewer than the sure ones, not more than all.
    pytest.param(2, 2, 0, 1, (0, 10), id="faster-than-alone-is-none-ahead"),
    pytest.param(2, 1, 0, 900, (2, 210), id="slower-than-all-is-all-counted"),
    # The uncertain ones are among those still counted after the own gone ones.
    pytest.param(2, 2, 1, 500, (1, 110), id="uncertain-capped-by-what-is-left"),
    # Only whole requests are told: a share of one stays counted.
    pytest.param(2, 0.5, 0, 112, (2, 210), id="a-share-of-one-stays-counted"),
    pytest.param(2, 1.5, 0, 112, (1, 110), id="the-whole-one-of-one-and-a-half-is-told"),
    # Nothing to judge by: as counted.
    pytest.param(2, 1, 0, math.nan, (2, 210), id="no-time"),
    pytest.param(2, math.nan, 0, 10, (2, 210), id="nan-uncertain"),
])
def test_an_answer_is_measured_at_the_requests_ahead_it_met(inflight, uncertain, gone,
                                                           measured, want):
    k, predicted = measured_at(inflight, uncertain, gone, lambda k: 10.0 + 100.0 * k, measured,
                               lambda ms: 5.0)
    assert (k, predicted) == pytest.approx(want)


@pytest.mark.parametrize(("per_ahead", "error", "measured", "want"), [
    # A request ahead costs 100 ms: an error of 33 ms (100 >= 3 x 33) lets the time tell,
    pytest.param(100.0, 33.0, 12.0, (0, 10), id="cost-well-above-the-noise"),
    # 34 ms does not: a count read from the time would follow the noise.
    pytest.param(100.0, 34.0, 12.0, (1, 110), id="noise-comparable-to-the-cost"),
    # Without an error to go by, it never does.
    pytest.param(100.0, None, 12.0, (1, 110), id="no-error-known"),
    # No cost per request ahead: nothing to tell by.
    pytest.param(0.0, 1.0, 500.0, (1, 110), id="no-cost-per-request-ahead"),
    # A vanishing cost: no overflow, as counted (too small against any noise).
    pytest.param(5e-324, 1.0, 1e10, (1, 110), id="vanishing-cost"),
])
def test_an_answer_tells_only_when_a_request_ahead_costs_more_than_the_noise(
        per_ahead, error, measured, want):
    err = None if error is None else (lambda ms: error)
    k, predicted = measured_at(1, 1, 0, lambda k: 110.0 + per_ahead * (k - 1), measured, err)
    assert (k, predicted) == pytest.approx(want)


@pytest.mark.parametrize(("measured", "want"), [
    # 4 ms per request ahead measured up to one ahead, 100 beyond: the second one ahead
    # costs 100 ms, so a 20 ms answer did not meet it (judged at 4 ms, it could not tell)
    pytest.param(20.0, (1, 14), id="fast-so-not-met"),
    pytest.param(110.0, (2, 114), id="slow-so-met"),
])
def test_an_uncertain_request_is_judged_by_what_the_last_one_ahead_costs(measured, want):
    model = ServiceModel(10.0, 4.0, 0.0, measured_to=1.0, beyond_ms=100.0)
    k, predicted = measured_at(2, 1, 0, lambda ahead: model.predict(ahead, 0), measured,
                               lambda ms: 5.0)
    assert (k, predicted) == pytest.approx(want)


def test_requests_shown_gone_shorten_a_stay_to_what_fewer_ahead_would_take():
    # The fourth request counted three of this router's own ahead, one beyond a fit's
    # reach of two: 10 ms alone, 4 per request ahead within the reach and 20 beyond (10 +
    # 4 x 2 + 20 = 38 ms). As each answer shows one was served before it arrived, its
    # stay falls to what one fewer ahead takes: 18, 14, 10 ms (not 38 less 20 each time).
    model = ServiceModel(10.0, 4.0, measured_to=2.0, beyond_ms=20.0)
    own = OwnRequests()
    firsts = [own.add("e", "pod-a", sent_ms=0, stay_ms=10, network_ms=100) for _ in range(3)]
    last = own.add("e", "pod-a", sent_ms=1, stay_ms=model.predict(3, 0), network_ms=100,
                   saving=lambda g: model.load(3) - model.load(3 - g))
    for first, stay in zip(firsts, (18.0, 14.0, 10.0), strict=True):
        own.answered(first, 60)  # served at 10, before the fourth arrived at 51
        # (the first three are on their way back: only the fourth can be ahead)
        assert own.ahead(1 + stay - 0.5)[1]["e"]["pod-a"] == 1
        assert own.ahead(1 + stay + 0.5)[1] == {}
    assert own.gone_ahead(last) == 3
