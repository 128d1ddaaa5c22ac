"""Measured service time: what one more request to an executor will cost, learned online.

Pure (no I/O, no clock). The SDK and the selector's gateway time every
request they send, :class:`ServiceTracker` turns those times into
:class:`~mulambda.store.records.ServiceStats` that go to the store
(``P:service``), and :func:`fit` turns everybody's statistics plus the
declared ``serviceTimeMs`` into a :class:`ServiceModel` that selection uses.

Model (per executor: its replicas run the same pod template)::

    service(k, n) = base + per_inflight * k + per_item * n   (k within reach, below)

``k`` is the number of requests in flight per replica when a request is
sent (as the router that sends it counts them; requests on the wire count,
because that is what the router knows when it decides), ``n`` the number of
items in the request (``instances``). An answer is measured at the requests
it met as far as the router can tell: less its own requests that their
answers showed served before it arrived, and less the other routers'
requests counted only for their senders' margin that its own time shows
served already (:func:`mulambda.policy.inflight.measured_at`); errors in
``k`` flatten the fitted slope. A queue in front of one slot gives
``per_inflight`` = one service time; a server that runs every request at
once but slows down with each gives its slowdown per request.

Update rule. One observation is ``(k, n, t)`` with ``t`` = measured response
time (on the wire: :class:`mulambda.sdk.counting.Wire`) - the network RTT the
router assumed for that replica (floored at 0).
Before it is added, ``t`` is clipped to ``predicted +- clip * spread *
scale``, where ``predicted`` is what the router's current model said,
``scale`` is ``predicted`` (at least 10 ms) and ``spread`` is an EWMA
(``spread_alpha``) of the relative error ``|t - predicted| / scale``
started at 1, one for answers with nothing ahead and one for answers with
requests ahead: one stall or timeout moves the model by a bounded step, while
a model that is wrong by 10x still gets there in a handful of observations
because the spread grows with the errors. The spread is relative because
errors grow with the time predicted (jitter is a share of the service time,
and a request behind k others waits for k of them): most answers of a fast
model find no request ahead and miss by a few ms, and an absolute spread
learned from them clipped the rare answer with a request ahead (10x the
base) to a fraction of its time, so the cost of a request ahead was
learned far too small, and routers kept sending to busy replicas of
exactly the models where that costs most. Then every sum is multiplied by
``decay = 1 - 1/memory`` and the observation is added with weight 1 (an
exponentially weighted window of about ``memory`` observations per writer).
Weights also fade with time: a router halves its statistics of an executor
for every ``idle_half_life_s`` (60 s) without an answer from it, and
publishes them again (:meth:`ServiceTracker.fade`), so measurements nobody
adds to give way to the prior within minutes (``w`` 200 -> 1 in about eight
half-lives) and the executor is tried and measured again; an executor that
answers keeps its window.
A request of the router's own that is late (not back one predicted stay
plus round trip after it left) says at once that the model is short, and
by how much at least: selection raises the model it ranks that executor
with until it predicts at least the request's age less the round trip at
the count the request was sent with (:func:`floored`; the answer then
replaces it). Answers alone come last from the replicas where requests
wait longest. Its lease says the same to every other router (the count it
was sent with, its items and its expected stay:
:meth:`~mulambda.policy.inflight.OwnRequests.lease`), so they raise their
models as soon as its sender does. Beside it, each router keeps a running
median of the same relative error (a step of ``median_step`` up or down in
log space per answer, started at 1, never below ``MIN_TYPICAL_ERROR``): ``1.4826`` x it
x scale is the
*margin* of a predicted stay, one standard deviation of the typical error,
which :class:`~mulambda.policy.inflight.OwnRequests` and the leases'
``busy_until`` add before they count a request as on its way back.

Fit. Exponentially weighted least squares with a ridge prior::

    minimise  sum_j w_j (t_j - b - s k_j - a n_j)^2
              + lb (b - b0)^2 + ls (s - s0)^2 + la a^2

    b0 = declared serviceTimeMs (else the fallbacks of selection)
    s0 = b0 / replica_concurrency   (each request ahead costs a service time)
    lb = prior_weight (1), ls = slope_prior_weight (0.1),
    la = 10 * prior_weight * max(1, mean n)^2

The base prior weighs as one observation: measurements take over after a
few requests. The slope prior is ten times weaker: a declared service time
says nothing about what a request running beside another costs (for fast
models it was 5-12x the declared time), so the first few requests that
find others ahead of them decide it; it only keeps the fit defined while
``k`` has not varied yet. ``la`` keeps a constant batch size in ``base``
rather than in ``per_item`` (scaled by the mean ``n`` so that moving the
prediction at the usual size costs the same). When all observations share
one ``k`` the excess over the declared base goes to ``per_inflight``. The
three normal equations are solved directly; a negative coefficient is fixed
and the others solved again (times never shrink with load): ``base`` and
``per_item`` at 0, ``per_inflight`` at its prior ``s0``. Times that fall as
``k`` grows mean the counts were wrong (a request still being served was
counted as on its way back, typically while the model was learning), not
that load is free; fixed at 0, a router would see no cost in sending
request after request to one replica until their answers came back (a
queue of a hundred on a model whose request ahead costs 400 ms, in the
simulator).

Reach. The fitted ``per_inflight`` is measured only over the counts its
observations were sent at; further out it is a guess. :func:`fit` says how
far it reaches (``measured_to``: twice the root mean square of the
observations' ``k``, from ``kk / w``, and one request more; counts spread
evenly from 0 to ``m`` reach about ``1.15 m + 1``), and beyond that each
request ahead costs at least one measured service time per slot (the fitted
``base`` / ``replica_concurrency``, as the prior's ``per_inflight`` is the
declared time's: :meth:`ServiceModel.load`): a request that finds every slot
taken waits for one to free. Measured, not declared: with the declared time,
fast models declared at ten times their time were held back beyond the
reach (seed 11's one-node 0.75 latency-only p95 through the gateway 28.7 ->
84.6 ms). Why a reach at all: a slope read from a few answers at one or
two requests ahead is extrapolated to twenty when routers decide at once.
In the simulator one answer miscounted at ``k = 1`` made a model whose
request ahead costs 213 ms look like 4 ms; four SDK processes sent it 14
requests within 70 ms, predicting 392-447 ms for each, and they took
2.4-5.2 s. The statistics reach further as answers at higher counts come
in, so a replica is loaded about one request beyond what was measured at a
time, faster when it proves cheap.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from mulambda.store.records import ServiceStats

__all__ = ["FitSettings", "Late", "ServiceModel", "ServiceTracker", "add_stats", "fit", "floored",
           "observe", "scaled"]


@dataclass(frozen=True)
class FitSettings:
    """Constants of the online fit (documented in the module docstring)."""

    memory: float = 200.0
    prior_weight: float = 1.0
    slope_prior_weight: float = 0.1
    clip: float = 5.0
    spread_alpha: float = 0.1
    cold_alpha: float = 0.3
    median_step: float = 0.1
    idle_half_life_s: float = 60.0


DEFAULT_FIT = FitSettings()
# Errors are relative to at least this much: a model declared at 1 ms may take 100.
MIN_SPREAD_MS = 10.0
# Standard deviation of normal errors per median absolute error.
MAD_TO_SIGMA = 1.4826
# The typical relative error never counts as less (0.1 ms of a 10 ms stay).
MIN_TYPICAL_ERROR = 0.01
# The counts a fit measured reach this many root mean squares of them (and one more).
REACH_SPREADS = 2.0
# Fading stops below this weight: a hundredth of the prior's, the fit is the prior's.
FADED_WEIGHT = 0.01


class ServiceModel(NamedTuple):
    """``base + load(k) + per_item * n`` milliseconds: ``load(k) = per_inflight * k`` up to
    ``measured_to`` requests ahead, and beyond it each one costs at least ``beyond_ms``
    (see "Reach" in the module docstring)."""

    base_ms: float
    per_inflight_ms: float
    per_item_ms: float = 0.0
    measured_to: float = math.inf
    beyond_ms: float = 0.0

    def load(self, inflight: float) -> float:
        """What ``inflight`` requests ahead per replica add to a request's service time."""
        over = inflight - self.measured_to
        if over <= 0:
            return self.per_inflight_ms * inflight
        return (self.per_inflight_ms * self.measured_to
                + max(self.per_inflight_ms, self.beyond_ms) * over)

    def predict(self, inflight: float, items: float = 1.0) -> float:
        """Expected service time of a request sent with ``inflight`` requests ahead per replica."""
        return self.base_ms + self.load(inflight) + self.per_item_ms * items


def fit(stats: ServiceStats | None, prior: ServiceModel,
        settings: FitSettings = DEFAULT_FIT) -> ServiceModel:
    """The service-time model from ``stats`` and the prior (see the module docstring)."""
    if stats is None or stats.w <= 0:
        return prior
    return _fit(stats.w, stats.k, stats.i, stats.t, stats.kk, stats.ii, stats.ki, stats.kt,
                stats.it, prior, settings.prior_weight, settings.slope_prior_weight)


def _reach(w: float, kk: float) -> float:
    """Up to how many requests ahead observations of weight ``w`` and weighted sum of
    squared counts ``kk`` measured the cost of one: twice the root mean square of
    their counts, and one more (see "Reach" in the module docstring)."""
    return REACH_SPREADS * math.sqrt(max(kk / w, 0.0)) + 1.0


@functools.lru_cache(maxsize=4096)  # a snapshot's statistics are ranked many times
def _fit(w: float, k: float, i: float, t: float, kk: float, ii: float, ki: float, kt: float,
         it: float, prior: ServiceModel, weight: float, slope_weight: float) -> ServiceModel:
    lam = (weight, slope_weight, 10 * weight * max(1.0, i / w) ** 2)
    a = ((w + lam[0], k, i), (k, kk + lam[1], ki), (i, ki, ii + lam[2]))
    rhs = (t + lam[0] * prior.base_ms, kt + lam[1] * prior.per_inflight_ms,
           it + lam[2] * prior.per_item_ms)
    free = [0, 1, 2]
    theta = [0.0, 0.0, 0.0]
    while free:
        sol = _solve([[a[r][c] for c in free] for r in free],
                     [rhs[r] - sum(a[r][c] * theta[c] for c in range(3) if c not in free)
                      for r in free])
        negative = [f for f, v in zip(free, sol, strict=True) if v < 0]
        if not negative:
            for f, v in zip(free, sol, strict=True):
                theta[f] = v
            break
        # Fix the most negative coefficient and solve for the rest: base and per-item
        # at 0; per-inflight at the prior's, because times that shrink with load mean
        # the counts of requests ahead were wrong (requests still served counted as
        # gone), not that load is free, and a per-inflight cost of 0 would let a
        # router pile requests onto one replica until their answers came back.
        worst = min(negative, key=lambda f: sol[free.index(f)])
        theta[worst] = prior.per_inflight_ms if worst == 1 else 0.0
        free.remove(worst)
    # Beyond the reach a request ahead costs at least a measured service time per slot:
    # the fitted base at the prior's ratio (serviceTimeMs / replica_concurrency).
    beyond = (theta[0] * prior.per_inflight_ms / prior.base_ms if prior.base_ms > 0
              else prior.per_inflight_ms)
    return ServiceModel(theta[0], theta[1], theta[2], _reach(w, kk), beyond)


def _solve(m: list[list[float]], v: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the (at most 3x3) normal equations."""
    n = len(v)
    m = [[*row, v[r]] for r, row in enumerate(m)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return [0.0] * n  # singular: cannot happen with positive prior weights
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][c] * out[c] for c in range(r + 1, n))) / m[r][r]
    return out


def observe(stats: ServiceStats, inflight: float, items: float, service_ms: float,
            settings: FitSettings = DEFAULT_FIT) -> ServiceStats:
    """``stats`` decayed by one step with the observation ``(k, n, t)`` added (a new object)."""
    d = 1.0 - 1.0 / settings.memory
    k, n, t = float(inflight), float(items), float(service_ms)
    return replace(
        stats, w=stats.w * d + 1, k=stats.k * d + k, i=stats.i * d + n, t=stats.t * d + t,
        kk=stats.kk * d + k * k, ii=stats.ii * d + n * n, ki=stats.ki * d + k * n,
        kt=stats.kt * d + k * t, it=stats.it * d + n * t, count=stats.count + 1,
    )


def scaled(stats: ServiceStats, factor: float) -> ServiceStats:
    """``stats`` with every observation's weight multiplied by ``factor`` (a new object);
    the fit from them alone is the same, weighed against the prior and other writers'
    it counts ``factor`` times as much."""
    f = factor
    return replace(stats, w=stats.w * f, k=stats.k * f, i=stats.i * f, t=stats.t * f,
                   kk=stats.kk * f, ii=stats.ii * f, ki=stats.ki * f, kt=stats.kt * f,
                   it=stats.it * f)


def add_stats(a: ServiceStats | None, b: ServiceStats | None) -> ServiceStats | None:
    """Statistics of both writers (None when neither has any)."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class ServiceTracker:
    """One router's own measurements, per executor: what it publishes to ``P:service``.

    Not thread-safe; one per SDK instance or gateway, used from its event loop.
    """

    def __init__(self, settings: FitSettings = DEFAULT_FIT) -> None:
        self.settings = settings
        self.stats: dict[str, ServiceStats] = {}
        self._spread: dict[tuple[str, bool], float] = {}
        self._median: dict[str, float] = {}  # running median of the relative error
        self._changed: set[str] = set()
        # executor -> when its statistics were last answered or faded (the caller's clock,
        # seconds), for those that still fade; each of them is once in ``_due`` (when it
        # fades next, unless answered meanwhile): a fleet's idle executors fade one by one
        # without every decision going through all of them.
        self._aged_from: dict[str, float] = {}
        self._due: list[tuple[float, str]] = []

    def observe(self, executor: str, *, inflight: float, items: float, elapsed_ms: float,
                network_ms: float, predicted_ms: float, at: float) -> bool:
        """Add one answered request; False (and nothing added) for an impossible value.

        ``elapsed_ms`` is the response time the router measured, ``network_ms``
        the RTT it assumed, ``predicted_ms`` the service time its model predicted,
        ``at`` when the answer came (seconds, on the clock :meth:`fade` is given).
        """
        values = (inflight, items, elapsed_ms, network_ms, predicted_ms)
        if not all(math.isfinite(v) and v >= 0 for v in values) or not math.isfinite(at):
            return False
        service = max(0.0, elapsed_ms - network_ms)
        scale = max(predicted_ms, MIN_SPREAD_MS)
        # Kept apart for answers with requests ahead: those without are most of a fast
        # model's and miss by little, and their spread clipped the first answers with a
        # request ahead (the very ones the cost of one is learned from) to a few ms over
        # the prediction (a two-slot model, 94 ms with one beside it, learned at 23).
        key = (executor, inflight >= 0.5)
        spread = self._spread.get(key, 1.0)  # relative to the prediction
        error = abs(service - predicted_ms) / scale
        self._spread[key] = spread + self.settings.spread_alpha * (error - spread)
        # A running median (a step up when above it, down when below, in log space): the
        # typical error, which the rare answer with a request ahead that was not counted
        # (ten times the prediction) does not move more than any other.
        median = self._median.get(executor, 1.0)
        step = self.settings.median_step if error > median else -self.settings.median_step
        # Floored: answers exactly as predicted (a model declared at 0 ms, answering within
        # the RTT) shrank it toward 1e-323, and as many answers were then needed to grow
        # it back, all with no margin.
        self._median[executor] = max(median * math.exp(step), MIN_TYPICAL_ERROR)
        bound = self.settings.clip * spread * scale
        service = min(max(service, predicted_ms - bound), predicted_ms + bound)
        current = self.stats.get(executor) or ServiceStats()
        self.stats[executor] = observe(current, inflight, items, max(0.0, service),
                                       self.settings)
        self._changed.add(executor)
        if executor not in self._aged_from:
            heapq.heappush(self._due, (at + self.settings.idle_half_life_s, executor))
        self._aged_from[executor] = at
        return True

    def fade(self, now: float) -> bool:
        """Halve the weight of an executor's statistics for every ``idle_half_life_s``
        without an answer from it (``now`` on the clock of :meth:`observe`'s ``at``);
        True when some changed (they are then published again). Cheap when none is due.

        Why: the weights decay per answer, so statistics a router stopped adding to never
        aged. A burst of stalled answers (the clip lets most of them through once the
        spread has grown with the first) made a 20 ms model look like 240 ms, the
        routers then sent it nothing, and nothing ever corrected it. Faded, the
        measurements give way to the declared prior within minutes, so the executor
        is tried again and measured anew.
        """
        half_life = self.settings.idle_half_life_s
        changed = False
        while self._due and self._due[0][0] <= now:
            _, executor = heapq.heappop(self._due)
            since = self._aged_from[executor]
            halvings = math.floor((now - since) / half_life)
            if halvings >= 1:  # else answered since it was due: due again a half-life on
                stats = scaled(self.stats[executor], 0.5 ** halvings)
                self.stats[executor] = stats
                self._changed.add(executor)
                changed = True
                if stats.w < FADED_WEIGHT:
                    del self._aged_from[executor]  # the prior's now: nothing left to fade
                    continue
                since += halvings * half_life
                self._aged_from[executor] = since
            heapq.heappush(self._due, (since + half_life, executor))
        return changed

    def stay_margin_ms(self, executor: str, predicted_ms: float) -> float:
        """How much longer than ``predicted_ms`` a stay at ``executor`` typically runs: one
        standard deviation of this router's prediction errors there (robustly, from
        their running median), in ms; what
        :meth:`~mulambda.policy.inflight.OwnRequests.add` and a lease's ``busy_until`` add
        to the predicted stay. Before any answer the error is taken as the whole
        prediction."""
        if not (math.isfinite(predicted_ms) and predicted_ms >= 0):
            return 0.0
        return (MAD_TO_SIGMA * self._median.get(executor, 1.0)
                * max(predicted_ms, MIN_SPREAD_MS))

    def observe_cold_start(self, executor: str, cold_ms: float) -> bool:
        """Add one measured cold start (asked to wake -> the first snapshot showing a live
        replica, ``mulambda.sdk.waking.ColdStarts.note_woken``)."""
        if not (math.isfinite(cold_ms) and cold_ms >= 0):
            return False
        current = self.stats.get(executor) or ServiceStats()
        a = self.settings.cold_alpha
        smoothed = cold_ms if current.cold_ms is None else current.cold_ms + a * (
            cold_ms - current.cold_ms)
        self.stats[executor] = replace(current, cold_ms=smoothed,
                                       cold_count=current.cold_count + 1)
        self._changed.add(executor)
        return True

    def take_changed(self) -> dict[str, ServiceStats]:
        """Statistics changed since the last call (to publish), and forget that they changed."""
        out = {e: self.stats[e] for e in self._changed if e in self.stats}
        self._changed.clear()
        return out

    def mark_changed(self, executors: set[str] | list[str]) -> None:
        """Publish these again (a write that failed)."""
        self._changed.update(e for e in executors if e in self.stats)


class Late(NamedTuple):
    """A request of ours not back when due: sent with ``inflight`` requests ahead and
    ``items`` items, its service time at least ``at_least_ms`` (:func:`floored`)."""

    inflight: float
    items: float
    at_least_ms: float


def floored(model: ServiceModel, late: Sequence[tuple[float, float, float]]) -> ServiceModel:
    """``model`` raised until it predicts at least the least time each late request
    (:class:`Late`) can take: ``per_inflight`` for one sent with at least one request
    ahead, ``base`` for one sent with less (a share of one, from other routers' counts:
    divided by it, a late request would make every request ahead cost without bound).
    Never lowered: a late request is a lower bound, and fitted as a point it pulled
    ``base`` up and ``per_inflight`` down (late requests of a model with many ahead are
    late by less than their requests ahead cost)."""
    base, per = model.base_ms, model.per_inflight_ms
    for k, n, t in late:
        if k < 1:
            base = max(base, t - per * k - model.per_item_ms * n)
    for k, n, t in late:
        if k >= 1:
            per = _least_per(model._replace(base_ms=base, per_inflight_ms=per), k,
                             t - base - model.per_item_ms * n)
    if base == model.base_ms and per == model.per_inflight_ms:
        return model
    return model._replace(base_ms=base, per_inflight_ms=per)


def _least_per(model: ServiceModel, k: float, need: float) -> float:
    """The least ``per_inflight`` (not below the model's) with which ``k >= 1`` requests
    ahead cost at least ``need``: beyond the reach each costs the larger of it and
    ``beyond_ms`` already, so only the part within is raised while that suffices."""
    per = model.per_inflight_ms
    if model.load(k) >= need:
        return per
    within = min(k, model.measured_to)
    over = k - within
    if over > 0:
        # per_inflight up to beyond_ms: over * beyond_ms of the need is met already
        p = (need - model.beyond_ms * over) / within
        if p <= model.beyond_ms:
            return max(per, p)
    return need / k
