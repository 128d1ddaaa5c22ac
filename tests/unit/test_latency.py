"""The measured service-time model of mulambda.policy.latency (pure, no I/O)."""

from __future__ import annotations

import math
import random

import pytest

from mulambda.policy.inflight import OwnRequests, measured_at
from mulambda.policy.latency import (
    FitSettings,
    ServiceModel,
    ServiceTracker,
    add_stats,
    fit,
    floored,
    observe,
)
from mulambda.store.records import ServiceStats

PRIOR = ServiceModel(10.0, 10.0, 0.0)


def stats_from(points: list[tuple[float, float, float]]) -> ServiceStats:
    st = ServiceStats()
    for k, n, t in points:
        st = observe(st, k, n, t)
    return st


def test_without_measurements_the_declared_time_is_the_model():
    assert fit(None, PRIOR) == PRIOR
    assert fit(ServiceStats(), PRIOR) == PRIOR


@pytest.mark.parametrize(("truth", "ks", "items"), [
    # a fast model whose requests running beside each other cost 8x its base time
    pytest.param(ServiceModel(12.0, 96.0, 0.0), (0, 1, 2, 3), (1,), id="steep-per-inflight"),
    # a slow model that barely slows down under load
    pytest.param(ServiceModel(180.0, 20.0, 0.0), (0, 1, 2), (1,), id="flat"),
    # per-item cost visible because request sizes vary
    pytest.param(ServiceModel(20.0, 30.0, 2.0), (0, 1, 2), (1, 10, 50), id="per-item"),
])
def test_fit_recovers_the_true_model_from_noisy_measurements(truth, ks, items):
    rng = random.Random(4)
    points = []
    for _ in range(400):
        k, n = rng.choice(ks), rng.choice(items)
        t = truth.predict(k, n) * rng.lognormvariate(0, 0.1) + rng.uniform(-3, 3)
        points.append((k, n, max(0.0, t)))
    model = fit(stats_from(points), PRIOR)
    for k in ks:
        for n in items:
            assert model.predict(k, n) == pytest.approx(truth.predict(k, n), rel=0.1, abs=3)


def test_a_declared_time_ten_times_too_low_is_corrected_within_a_few_requests():
    truth = ServiceModel(10.0, 100.0)  # declared 10 ms per request ahead; it is 100
    tracker = ServiceTracker()
    model = PRIOR
    for i in range(30):
        k = i % 3
        predicted = model.predict(k)
        tracker.observe("e", inflight=k, items=1, elapsed_ms=truth.predict(k) + 5,
                        network_ms=5, predicted_ms=predicted, at=0.0)
        model = fit(tracker.stats["e"], PRIOR)
    assert model.per_inflight_ms == pytest.approx(100, rel=0.1)
    assert model.base_ms == pytest.approx(10, abs=5)


@pytest.mark.parametrize("ahead", [0, 1])
def test_one_stall_moves_the_model_by_a_bounded_step(ahead):
    tracker = ServiceTracker()
    for _ in range(100):
        tracker.observe("e", inflight=ahead, items=1, elapsed_ms=25, network_ms=5,
                        predicted_ms=20, at=0.0)
    before = fit(tracker.stats["e"], PRIOR).predict(ahead)
    tracker.observe("e", inflight=ahead, items=1, elapsed_ms=60_000, network_ms=5,
                    predicted_ms=20, at=0.0)
    after = fit(tracker.stats["e"], PRIOR).predict(ahead)
    # Unclipped, one 60 s answer in ~100 would add ~600 ms; clipped it adds at most a few.
    assert after - before < 5


@pytest.mark.parametrize(("ahead", "rel"), [
    # One in twenty finds a request ahead, over 400 answers.
    pytest.param([1 if i % 20 == 19 else 0 for i in range(400)], 0.15, id="rarely"),
    # 200 answers with nothing ahead, then the first with one: with the spread of the
    # others it taught 14 ms, and each next one a little more (38, 55, 64, 69), while
    # routers kept sending to busy replicas.
    pytest.param([0] * 200 + [1], 0.2, id="for-the-first-time"),
])
def test_answers_with_a_request_ahead_are_not_clipped_to_the_noise_of_the_others(ahead, rel):
    # A fast model: 10 ms alone, a request beside another costs 90 ms more. Answers
    # with nothing ahead miss by a millisecond.
    truth = ServiceModel(10.0, 90.0)
    rng = random.Random(3)
    tracker = ServiceTracker()
    model = PRIOR
    for k in ahead:
        tracker.observe("e", inflight=k, items=1,
                        elapsed_ms=truth.predict(k) + rng.uniform(-1, 1) + 5,
                        network_ms=5, predicted_ms=model.predict(k), at=0.0)
        model = fit(tracker.stats["e"], PRIOR)
    assert model.per_inflight_ms == pytest.approx(90, rel=rel)


def test_times_that_fall_with_load_keep_the_prior_cost_of_a_request_ahead():
    # Faster under load (miscounted requests ahead, a warming cache, noise): the
    # slope is not negative, and not 0 either (a router would then pile requests
    # onto one replica): the prior's. The base takes the rest.
    st = stats_from([(0, 1, 50), (1, 1, 40), (2, 1, 30), (3, 1, 20)] * 10)
    model = fit(st, PRIOR)
    assert model.per_inflight_ms == PRIOR.per_inflight_ms
    assert model.base_ms > 0 and model.per_item_ms >= 0
    assert model.predict(1.5) == pytest.approx(35, abs=PRIOR.per_inflight_ms)


def test_measurements_of_one_load_level_put_the_excess_into_the_per_inflight_cost():
    st = stats_from([(2, 1, 110)] * 50)  # always two ahead, 110 ms; declared base 10
    model = fit(st, PRIOR)
    assert model.predict(2) == pytest.approx(110, rel=0.02)
    assert model.base_ms == pytest.approx(10, abs=5)


def test_old_measurements_fade():
    settings = FitSettings(memory=50)
    st = ServiceStats()
    for _ in range(300):
        st = observe(st, 0, 1, 100, settings)
    for _ in range(300):
        st = observe(st, 0, 1, 20, settings)
    assert fit(st, PRIOR, settings).base_ms == pytest.approx(20, abs=1)


def test_a_burst_of_stalls_gives_way_to_the_prior_once_no_answer_comes():
    # The attack review's burst: a 20 ms model answers 200 times, then eight answers
    # stall for 5 s. Routers then send it nothing: without fading, its model stays
    # where the stalls put it for ever.
    prior = ServiceModel(20.0, 20.0)
    tracker = ServiceTracker()
    for i in range(200):
        tracker.observe("e", inflight=0, items=1, elapsed_ms=25, network_ms=5,
                        predicted_ms=20, at=i * 0.1)
    for _ in range(8):
        tracker.observe("e", inflight=0, items=1, elapsed_ms=5005, network_ms=5,
                        predicted_ms=fit(tracker.stats["e"], prior).base_ms, at=20.0)
    tracker.take_changed()
    poisoned = fit(tracker.stats["e"], prior).base_ms
    assert poisoned > 100
    half_life = tracker.settings.idle_half_life_s
    assert tracker.fade(20.0 + half_life * 0.99) is False  # not an idle minute yet
    assert tracker.fade(20.0 + half_life * 8) is True
    assert tracker.take_changed().keys() == {"e"}  # published again
    assert fit(tracker.stats["e"], prior).base_ms < (poisoned + prior.base_ms) / 2
    tracker.fade(20.0 + half_life * 16)
    assert fit(tracker.stats["e"], prior).base_ms == pytest.approx(20, abs=1)


@pytest.mark.parametrize(("idle_half_lives", "weight"), [
    (0.5, 1.0), (1.0, 0.5), (2.5, 0.25), (3.0, 0.125),
])
def test_statistics_halve_for_every_idle_half_life(idle_half_lives, weight):
    tracker = ServiceTracker()
    tracker.observe("e", inflight=1, items=2, elapsed_ms=45, network_ms=5, predicted_ms=30,
                    at=100.0)
    before = tracker.stats["e"]
    tracker.fade(100.0 + idle_half_lives * tracker.settings.idle_half_life_s)
    after = tracker.stats["e"]
    assert (after.w, after.k, after.i, after.t, after.kk, after.kt) == pytest.approx(
        tuple(weight * v for v in (before.w, before.k, before.i, before.t, before.kk,
                                   before.kt)))
    assert after.count == before.count  # how many answers it has seen is not faded


def test_fading_counts_from_the_last_answer_and_each_half_life_once():
    tracker = ServiceTracker()
    half_life = tracker.settings.idle_half_life_s
    for at in (0.0, half_life * 0.9):  # answered again before a half-life passed
        tracker.observe("e", inflight=0, items=1, elapsed_ms=25, network_ms=5,
                        predicted_ms=20, at=at)
    w = tracker.stats["e"].w
    assert tracker.fade(half_life * 1.5) is False
    assert tracker.fade(half_life * 2.0) is True
    assert tracker.stats["e"].w == pytest.approx(w / 2)
    # Asked again within the same half-life: nothing more.
    assert tracker.fade(half_life * 2.5) is False
    assert tracker.stats["e"].w == pytest.approx(w / 2)


def test_each_executor_fades_on_its_own_clock():
    tracker = ServiceTracker(FitSettings(idle_half_life_s=60.0))
    answers = {"a": (0.0,), "b": (30.0,), "c": (0.0, 100.0)}
    for executor, times in answers.items():
        for at in times:
            tracker.observe(executor, inflight=0, items=1, elapsed_ms=25, network_ms=5,
                            predicted_ms=20, at=at)
    full = {e: st.w for e, st in tracker.stats.items()}
    # now -> how many times each one has halved by then
    for now, halved in [(59.0, {"a": 0, "b": 0, "c": 0}), (60.0, {"a": 1, "b": 0, "c": 0}),
                        (90.0, {"a": 1, "b": 1, "c": 0}), (130.0, {"a": 2, "b": 1, "c": 0}),
                        (160.0, {"a": 2, "b": 2, "c": 1}), (400.0, {"a": 6, "b": 6, "c": 5})]:
        tracker.fade(now)
        assert {e: tracker.stats[e].w for e in answers} == pytest.approx(
            {e: full[e] / 2 ** n for e, n in halved.items()}), now


def test_faded_to_nothing_it_stops_changing():
    tracker = ServiceTracker()
    tracker.observe("e", inflight=0, items=1, elapsed_ms=25, network_ms=5, predicted_ms=20,
                    at=0.0)
    half_life = tracker.settings.idle_half_life_s
    assert tracker.fade(half_life * 10) is True  # 1/1024 of one answer
    tracker.take_changed()
    assert tracker.fade(half_life * 1000) is False  # nothing republished for ever
    assert tracker.take_changed() == {}


@pytest.mark.parametrize("bad", [
    {"elapsed_ms": math.nan}, {"elapsed_ms": math.inf}, {"elapsed_ms": -1.0},
    {"network_ms": math.nan}, {"inflight": -1.0}, {"items": math.inf},
    {"predicted_ms": math.nan}, {"at": math.nan},
])
def test_impossible_measurements_are_not_recorded(bad):
    tracker = ServiceTracker()
    kwargs = {"inflight": 0.0, "items": 1.0, "elapsed_ms": 30.0, "network_ms": 5.0,
              "predicted_ms": 20.0, "at": 0.0, **bad}
    assert tracker.observe("e", **kwargs) is False
    assert tracker.stats == {} and tracker.take_changed() == {}
    assert tracker.observe_cold_start("e", math.nan) is False


def test_tracker_hands_out_what_changed_once_and_again_after_a_failed_write():
    tracker = ServiceTracker()
    tracker.observe("a", inflight=0, items=1, elapsed_ms=30, network_ms=5, predicted_ms=20, at=0.0)
    tracker.observe_cold_start("b", 12_000)
    changed = tracker.take_changed()
    assert set(changed) == {"a", "b"} and changed["b"].cold_ms == 12_000
    assert tracker.take_changed() == {}
    tracker.mark_changed(list(changed))
    assert set(tracker.take_changed()) == {"a", "b"}


def test_cold_starts_are_smoothed_and_writers_add_up():
    tracker = ServiceTracker()
    tracker.observe_cold_start("e", 10_000)
    tracker.observe_cold_start("e", 20_000)
    mine = tracker.stats["e"]
    assert mine.cold_count == 2 and mine.cold_ms == pytest.approx(13_000)
    theirs = ServiceStats(w=2, t=40, count=2, cold_ms=30_000, cold_count=1)
    both = add_stats(mine, theirs)
    assert both is not None
    assert both.cold_count == 3 and both.cold_ms == pytest.approx((13_000 * 2 + 30_000) / 3)
    assert both.w == mine.w + 2 and both.count == mine.count + 2
    assert add_stats(None, theirs) is theirs and add_stats(None, None) is None


def test_stay_margin_comes_back_quickly_after_answers_exactly_as_predicted():
    # Declared 0 ms and every answer within the assumed RTT: an error of exactly 0, many
    # times over. Then the executor slows to 200 ms.
    tracker = ServiceTracker()
    for _ in range(20_000):
        tracker.observe("e", inflight=0, items=1, elapsed_ms=1.0, network_ms=5.0,
                        predicted_ms=0.0, at=0.0)
    assert tracker.stay_margin_ms("e", 20.0) == pytest.approx(1.4826 * 0.01 * 20.0)
    answers = 0
    while tracker.stay_margin_ms("e", 20.0) < 20.0:
        tracker.observe("e", inflight=0, items=1, elapsed_ms=205.0, network_ms=5.0,
                        predicted_ms=20.0, at=0.0)
        answers += 1
    assert answers < 50  # unfloored it took 7,424


def test_stay_margin_is_the_whole_prediction_before_any_answer():
    tracker = ServiceTracker()
    assert tracker.stay_margin_ms("e", 40) == pytest.approx(1.4826 * 40)
    assert tracker.stay_margin_ms("e", 2) == pytest.approx(1.4826 * 10)  # at least 10 ms
    assert tracker.stay_margin_ms("e", math.nan) == 0.0


@pytest.mark.parametrize(("noise", "low", "high"), [
    # answers within +-1 ms of a 10 ms prediction: a margin of about a ms or two
    pytest.param(1.0, 0.5, 2.0, id="jitter-1ms"),
    pytest.param(3.0, 1.5, 5.0, id="jitter-3ms"),
])
def test_stay_margin_learns_the_typical_error_and_ignores_rare_collisions(noise, low, high):
    rng = random.Random(7)
    tracker = ServiceTracker()
    for i in range(400):
        t = 10 + rng.uniform(-noise, noise)
        if i % 25 == 0:
            t += 90  # one answer in 25 found a request ahead that nobody counted
        tracker.observe("e", inflight=0, items=1, elapsed_ms=t + 5, network_ms=5,
                        predicted_ms=10, at=0.0)
    assert low <= tracker.stay_margin_ms("e", 10) <= high


@pytest.mark.parametrize(("late", "want"), [
    pytest.param([], ServiceModel(10.0, 5.0, 1.0), id="none: unchanged"),
    # sent with 2 ahead and 4 items, at least 100 ms: 10 + 2 s + 4 >= 100 -> s = 43
    pytest.param([(2.0, 4.0, 100.0)], ServiceModel(10.0, 43.0, 1.0), id="raises-per-inflight"),
    # within what the model predicts already (10 + 5 + 1 = 16)
    pytest.param([(1.0, 1.0, 12.0)], ServiceModel(10.0, 5.0, 1.0), id="never-lowered"),
    # sent with none ahead: base (10 -> 39), and per-inflight against the new base
    pytest.param([(0.0, 1.0, 40.0), (1.0, 1.0, 50.0)], ServiceModel(39.0, 10.0, 1.0),
                 id="base-then-per-inflight"),
    # sent with a share of a request ahead (other routers' counts): base, not 40 / 0.25
    pytest.param([(0.25, 1.0, 60.0)], ServiceModel(57.75, 5.0, 1.0), id="a-share-ahead"),
    # the tightest of several
    pytest.param([(1.0, 0.0, 30.0), (3.0, 0.0, 130.0)], ServiceModel(10.0, 40.0, 1.0),
                 id="the-largest-need"),
])
def test_late_requests_raise_the_model_to_what_they_show(late, want):
    assert floored(ServiceModel(10.0, 5.0, 1.0), late) == pytest.approx(want)


def _measured_at(*counts: float) -> ServiceStats:
    stats = ServiceStats()
    for k in counts:
        stats = observe(stats, k, 1, 10.0)
    return stats


@pytest.mark.parametrize(("counts", "want"), [
    # Only answers with nothing ahead: the slope is measured for no request ahead; the
    # first one ahead is taken at it, further ones at no less than the prior's.
    pytest.param((0, 0, 0), 1.0, id="none-ahead"),
    # Half at 0 and half at 1: RMS 0.71 -> 2.41
    pytest.param((0, 1), 2 * math.sqrt(0.5) + 1, id="zero-and-one"),
    # All at 4: 2 x 4 + 1
    pytest.param((4, 4, 4), 9.0, id="all-at-four"),
    # Evenly from 0 to 6 (RMS 3.61): about 1.2 x the largest, and one more
    pytest.param(tuple(range(7)), 2 * math.sqrt(13) + 1, id="spread-to-six"),
])
def test_a_fit_reaches_about_as_far_as_the_counts_it_was_measured_at(counts, want):
    model = fit(_measured_at(*counts), PRIOR)
    # (approximately: the older observations weigh a little less)
    assert model.measured_to == pytest.approx(want, rel=0.01)
    # beyond it, a measured service time per slot (PRIOR: one slot)
    assert model.beyond_ms == pytest.approx(model.base_ms)


@pytest.mark.parametrize(("k", "load"), [
    # 4 ms per request ahead measured up to 2.5 ahead, at least 57 beyond
    pytest.param(0.0, 0.0, id="none-ahead"),
    pytest.param(2.0, 8.0, id="within-the-reach"),
    pytest.param(2.5, 10.0, id="at-the-reach"),
    pytest.param(3.5, 10.0 + 57.0, id="one-beyond"),
    pytest.param(20.0, 10.0 + 57.0 * 17.5, id="far-beyond"),
])
def test_beyond_its_reach_a_request_ahead_costs_at_least_the_prior(k, load):
    model = ServiceModel(50.0, 4.0, 1.0, measured_to=2.5, beyond_ms=57.0)
    assert model.load(k) == pytest.approx(load)
    assert model.predict(k, 2) == pytest.approx(50.0 + load + 2.0)


def test_a_slope_measured_steeper_than_the_prior_holds_beyond_its_reach():
    model = ServiceModel(10.0, 300.0, measured_to=2.0, beyond_ms=57.0)
    assert model.load(5.0) == pytest.approx(1500.0)


def test_a_slope_read_at_one_or_two_counts_is_not_extrapolated_to_many():
    # The simulator's case (seed 13, all-on-all 0.75): a model declared at 57 ms whose
    # request ahead costs 213; the first answers came back with nothing ahead and one
    # miscounted at one ahead, and the fit took a request ahead as about 5 ms (4 with
    # the other routers' answers). Extrapolated, twenty ahead looked like 156 ms.
    prior = ServiceModel(57.0, 57.0)
    stats = observe(observe(ServiceStats(), 0, 1, 58.5), 1, 1, 55.0)
    model = fit(stats, prior)
    assert model.per_inflight_ms < 10
    assert model.base_ms + model.per_inflight_ms * 20 < 300  # what it was used as
    # beyond the reach no less than a measured service time (about the declared 57)
    assert model.predict(20) > 55 + 55 * 17
    # Answers at higher counts take the reach further, and the fitted slope with it.
    for k in range(1, 8):
        stats = observe(stats, k, 1, 57 + 213 * k)
    model = fit(stats, prior)
    assert model.measured_to > 7
    assert model.predict(7) == pytest.approx(57 + 213 * 7, rel=0.2)


def test_beyond_its_reach_a_model_costs_what_it_measured_not_what_was_declared():
    # Declared at 100 ms, measured at 10 alone and 2 more per request ahead: beyond the
    # counts measured, a request ahead costs a measured service time (about 10 ms), not
    # the declaration (fast models declared ten times too slow were held back).
    prior = ServiceModel(100.0, 100.0)
    stats = ServiceStats()
    for i in range(300):
        k = i % 3
        stats = observe(stats, k, 1, 10.0 + 2.0 * k)
    model = fit(stats, prior)
    assert model.base_ms == pytest.approx(10, rel=0.2)  # (the prior still pulls a little)
    assert model.beyond_ms == pytest.approx(model.base_ms)
    assert model.predict(10) < 15 + 15 * 10  # with the declared cost: over 700


@pytest.mark.parametrize(("late", "per"), [
    # 10 ms alone, 4 per request ahead up to 2.4 ahead, 57 beyond: 10 ahead predict 452.8.
    # Late at 400 with 10 ahead: predicted already, nothing raised.
    pytest.param((10.0, 0.0, 400.0), 4.0, id="predicted-already"),
    # Late at 460: the part within the reach pays for the 7.2 ms more (7 / 2.4 = 3 more),
    # not every request ahead (46 each: 100 ms predicted with 2 ahead instead of 18).
    pytest.param((10.0, 0.0, 460.0), 4.0 + 7.2 / 2.4, id="within-the-reach-pays"),
    # Late at 800 with 10 ahead: more than 57 each; a straight line from there.
    pytest.param((10.0, 0.0, 800.0), 79.0, id="beyond-the-prior"),
    # Within the reach, as without one.
    pytest.param((2.0, 0.0, 110.0), 50.0, id="within-the-reach"),
])
def test_late_requests_raise_a_model_with_a_reach_as_little_as_they_need(late, per):
    model = ServiceModel(10.0, 4.0, 0.0, measured_to=2.4, beyond_ms=57.0)
    raised = floored(model, [late])
    assert raised.per_inflight_ms == pytest.approx(per)
    assert (raised.base_ms, raised.measured_to, raised.beyond_ms) == (10.0, 2.4, 57.0)
    k, n, t = late
    assert raised.predict(k, n) >= t - 1e-9


def test_a_fit_that_learned_a_request_ahead_as_free_is_raised_by_its_late_requests():
    tracker = ServiceTracker()
    # Early answers: alone, 10 ms; "one ahead" but the one ahead was in fact done: 12 ms.
    for _ in range(20):
        tracker.observe("e", inflight=0, items=1, elapsed_ms=15, network_ms=5,
                        predicted_ms=10, at=0.0)
    for _ in range(3):
        tracker.observe("e", inflight=1, items=1, elapsed_ms=17, network_ms=5,
                        predicted_ms=20, at=0.0)
    model = fit(tracker.stats["e"], PRIOR)
    assert model.predict(1) < 15  # a request ahead looks nearly free
    own = OwnRequests()
    for _ in range(3):  # three sent with one ahead, none back 100 ms later
        own.add("e", None, sent_ms=0, stay_ms=model.predict(1), network_ms=5, inflight=1)
    assert floored(model, own.late(100.0)["e"]).predict(1) >= 95


def test_requests_of_others_counted_ahead_but_served_already_do_not_flatten_the_fit():
    # A fast model, 10 ms alone and 100 ms more per request ahead. Other routers'
    # requests due back just before ours arrives are counted (their senders' margin);
    # half were in fact served already. Measured at the count, half the answers say a
    # request ahead costs nothing; measured at what each answer's time shows, it is
    # learned right.
    truth = ServiceModel(10.0, 100.0)
    rng = random.Random(11)
    counted, shown = ServiceTracker(), ServiceTracker()
    for i in range(400):
        uncertain = i % 2  # every other request had one counted for its margin only
        met = uncertain and rng.random() < 0.5
        took = truth.predict(met) + rng.uniform(-3, 3)
        predicted = truth.predict(uncertain)
        counted.observe("e", inflight=uncertain, items=1, elapsed_ms=took, network_ms=0,
                        predicted_ms=predicted, at=0.0)
        k, predicted = measured_at(uncertain, uncertain, 0, truth.predict, took,
                                   lambda ms: 3.0)
        shown.observe("e", inflight=k, items=1, elapsed_ms=took, network_ms=0,
                      predicted_ms=predicted, at=0.0)
    assert fit(counted.stats["e"], PRIOR).per_inflight_ms < 70
    assert fit(shown.stats["e"], PRIOR).per_inflight_ms == pytest.approx(100, rel=0.05)


def test_where_noise_is_comparable_to_a_request_ahead_answers_do_not_steepen_the_fit():
    # A model whose request ahead costs 5 ms, with answers off by 5 ms (one standard
    # deviation): read from each answer's time, the count follows the noise (the fit
    # learned 8.1 for a true 5). Judged only where a request ahead costs three of the
    # router's own standard deviations (its stay margin), the count stays as counted.
    truth = ServiceModel(10.0, 5.0)
    rng = random.Random(5)
    tracker = ServiceTracker()
    model = PRIOR
    for i in range(600):
        uncertain = i % 2  # counted for its sender's margin; every one was in fact ahead
        took = max(0.0, truth.predict(uncertain) + rng.gauss(0, 5))
        k, predicted = measured_at(uncertain, uncertain, 0, model.predict, took,
                                   lambda ms: tracker.stay_margin_ms("e", ms))
        tracker.observe("e", inflight=k, items=1, elapsed_ms=took, network_ms=0,
                        predicted_ms=predicted, at=0.0)
        model = fit(tracker.stats["e"], PRIOR)
    assert model.per_inflight_ms == pytest.approx(5, rel=0.3)
