"""Measured service time: what one more request to an executor will cost, learned online.

Pure (no I/O, no clock). The SDK and the selector's gateway time every
request they send, :class:`ServiceTracker` turns those times into
:class:`~mulambda.store.records.ServiceStats` that go to the store
(``P:service``), and :func:`fit` turns everybody's statistics plus the
declared ``serviceTimeMs`` into a :class:`ServiceModel` that selection uses.

Model (per executor: its replicas run the same pod template)::

    service(k, n) = base + per_inflight * k + per_item * n

``k`` is the number of requests in flight per replica when a request is
sent (as the router that sends it counts them; requests on the wire count,
because that is what the router knows when it decides), ``n`` the number of
items in the request (``instances``). A queue in front of one slot gives
``per_inflight`` = one service time; a server that runs every request at
once but slows down with each gives its slowdown per request.

Update rule. One observation is ``(k, n, t)`` with ``t`` = measured response
time - the network RTT the router assumed for that replica (floored at 0).
Before it is added, ``t`` is clipped to ``predicted +- clip * spread *
scale``, where ``predicted`` is what the router's current model said,
``scale`` is ``predicted`` (at least 10 ms) and ``spread`` is an EWMA
(``spread_alpha``) of the relative error ``|t - predicted| / scale``
started at 1: one stall or timeout moves the model by a bounded step, while
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
A request of the router's own that is late (not back one predicted stay
plus round trip after it left) says at once that the model is short, and
by how much at least: selection raises the model it ranks that executor
with until it predicts at least the request's age less the round trip at
the count the request was sent with (:func:`floored`; the answer then
replaces it). Answers alone come last from the replicas where requests
wait longest. Its lease says the same to every other router
(:meth:`OwnRequests.lease`: the count it was sent with, its items and its
expected stay), so they raise their models as soon as its sender does.
Beside it, each router keeps a running median of the same relative error
(a step of ``median_step`` up or down in log space per answer, started at
1): ``1.4826`` x it x scale is the *margin* of a predicted stay, one
standard deviation of the typical error, which :class:`OwnRequests` and the
leases' ``busy_until`` add before they count a request as on its way back.

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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from mulambda.store.records import ServiceStats

__all__ = ["FitSettings", "Late", "LeaseTiming", "OwnRequests", "ServiceModel", "ServiceTracker",
           "add_stats", "fit", "floored", "observe", "stay_window"]


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


DEFAULT_FIT = FitSettings()
# Errors are relative to at least this much: a model declared at 1 ms may take 100.
MIN_SPREAD_MS = 10.0
# Standard deviation of normal errors per median absolute error.
MAD_TO_SIGMA = 1.4826


class ServiceModel(NamedTuple):
    """``base + per_inflight * k + per_item * n`` milliseconds."""

    base_ms: float
    per_inflight_ms: float
    per_item_ms: float = 0.0

    def predict(self, inflight: float, items: float = 1.0) -> float:
        """Expected service time of a request sent with ``inflight`` requests ahead per replica."""
        return self.base_ms + self.per_inflight_ms * inflight + self.per_item_ms * items


def fit(stats: ServiceStats | None, prior: ServiceModel,
        settings: FitSettings = DEFAULT_FIT) -> ServiceModel:
    """The service-time model from ``stats`` and the prior (see the module docstring)."""
    if stats is None or stats.w <= 0:
        return prior
    return _fit(stats.w, stats.k, stats.i, stats.t, stats.kk, stats.ii, stats.ki, stats.kt,
                stats.it, prior, settings.prior_weight, settings.slope_prior_weight)


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
    return ServiceModel(theta[0], theta[1], theta[2])


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
        self._spread: dict[str, float] = {}
        self._median: dict[str, float] = {}  # running median of the relative error
        self._changed: set[str] = set()

    def observe(self, executor: str, *, inflight: float, items: float, elapsed_ms: float,
                network_ms: float, predicted_ms: float) -> bool:
        """Add one answered request; False (and nothing added) for an impossible value.

        ``elapsed_ms`` is the response time the router measured, ``network_ms``
        the RTT it assumed, ``predicted_ms`` the service time its model predicted.
        """
        values = (inflight, items, elapsed_ms, network_ms, predicted_ms)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            return False
        service = max(0.0, elapsed_ms - network_ms)
        scale = max(predicted_ms, MIN_SPREAD_MS)
        spread = self._spread.get(executor, 1.0)  # relative to the prediction
        error = abs(service - predicted_ms) / scale
        self._spread[executor] = spread + self.settings.spread_alpha * (error - spread)
        # A running median (a step up when above it, down when below, in log space): the
        # typical error, which the rare answer with a request ahead that was not counted
        # (ten times the prediction) does not move more than any other.
        median = self._median.get(executor, 1.0)
        step = self.settings.median_step if error > median else -self.settings.median_step
        self._median[executor] = median * math.exp(step)
        bound = self.settings.clip * spread * scale
        service = min(max(service, predicted_ms - bound), predicted_ms + bound)
        current = self.stats.get(executor) or ServiceStats()
        self.stats[executor] = observe(current, inflight, items, max(0.0, service),
                                       self.settings)
        self._changed.add(executor)
        return True

    def stay_margin_ms(self, executor: str, predicted_ms: float) -> float:
        """How much longer than ``predicted_ms`` a stay at ``executor`` typically runs: one
        standard deviation of this router's prediction errors there (robustly, from
        their running median), in ms; what :meth:`OwnRequests.add` and a lease's
        ``busy_until`` add to the predicted stay. Before any answer the error is taken
        as the whole prediction."""
        if not (math.isfinite(predicted_ms) and predicted_ms >= 0):
            return 0.0
        return (MAD_TO_SIGMA * self._median.get(executor, 1.0)
                * max(predicted_ms, MIN_SPREAD_MS))

    def observe_cold_start(self, executor: str, cold_ms: float) -> bool:
        """Add one measured cold start (activation asked for -> first warm answer)."""
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

    def forget(self, executor: str) -> None:
        self.stats.pop(executor, None)
        self._spread.pop(executor, None)
        self._median.pop(executor, None)
        self._changed.discard(executor)


class LeaseTiming(NamedTuple):
    """:meth:`OwnRequests.lease`: ms after the request was sent and what it was sent with."""

    busy_after: float
    back_after: float
    inflight: float  # < 0: not said
    items: float
    stay_ms: float


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
            per = max(per, (t - base - model.per_item_ms * n) / k)
    if base == model.base_ms and per == model.per_inflight_ms:
        return model
    return ServiceModel(base, per, model.per_item_ms)


def stay_window(stay_ms: float, network_ms: float, margin_ms: float) -> tuple[float, float]:
    """When a request sent now stops being ahead of new ones, and when it is due back, in ms
    after it was sent: ``(busy_after, back_after)``, what its lease publishes (added to the
    send time) so other routers count it as :class:`OwnRequests` counts it.

    It reaches the replica after half the round trip and is served ``stay_ms`` later,
    give or take ``margin_ms`` (:meth:`ServiceTracker.stay_margin_ms`); the answer is
    due back one round trip plus the stay after it was sent. Other routers compare
    ``busy_after`` with when their own request would arrive, so it includes the way
    there; :class:`OwnRequests` compares with the time a request leaves the same router,
    so it does not.
    """
    return network_ms / 2 + stay_ms + margin_ms, network_ms + stay_ms


class OwnRequests:
    """A router's own requests in flight: where each went, when, over which network, and
    how long it was expected to stay at the executor (queueing and service).

    A request sent ``age`` ms ago with an expected stay ``stay`` (give or take
    ``margin``, :meth:`ServiceTracker.stay_margin_ms`) over a network of round
    trip ``network`` is, when a new request sent to the same replica now
    arrives there (both cross the same network):

    * still being served, so ahead of the new one, while
      ``age < stay + margin``;
    * on its way back, costing the new one nothing, while
      ``stay + margin <= age < stay + network``;
    * late when it has not come back after ``stay + network``: its stay was
      longer than expected, so it is most likely still being served and
      counts as ahead again. (Counting a late request as gone would let a
      router that underestimates stays pile more requests onto a replica
      that is still busy, and learn a too-small cost from them.)

    The margin is there because a stay is a prediction: about half of all
    requests stay longer than predicted. Without it, a request that ran a
    few ms over (jitter) was counted as on its way back while still being
    served, the next one sent there found it running and paid a whole
    per-inflight cost (for a fast model ten times its time), and stayed as
    long itself, so the replica looked free while busy for a while longer
    (issue 11: seed 11's one-node 0.75 latency-only p95 through the gateway,
    2.5x -> 1.1x the oracle's; bench/README.md). Counting a request for
    a margin after it was in fact served costs only the difference to the
    next best replica. While a router has no answers from an executor, the
    margin is the whole prediction: its requests count until they are back
    or late.

    An answer says when its request was served (half its round trip before it
    came back). A later request to the same replica that counted it ahead but
    reached the replica after that did not have it ahead: :meth:`answered`
    takes its cost (``per_ahead_ms``) off the later one's stay, and
    :meth:`gone_ahead` tells the later one's measurement. Otherwise one false
    count lengthens the next request's predicted stay by a whole request
    ahead, which is then counted ahead of the ones after it for as long, and
    those answers teach the fit a too-small cost per request ahead (issue 11:
    seed 11's mixed 0.5 balanced cell; bench/README.md).

    :meth:`ahead` adds these up per executor and per replica, which is what
    selection's load term wants (``Snapshot.own_inflight``,
    ``Snapshot.replica_inflight``). Times are in milliseconds on the
    caller's clock.
    """

    def __init__(self) -> None:
        self._requests: dict[int, _Own] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, executor: str, pod: str | None, sent_ms: float, stay_ms: float,
            network_ms: float = 0.0, margin_ms: float = 0.0, per_ahead_ms: float = 0.0,
            inflight: float | None = None, items: float = 1.0) -> int:
        """Register a request; returns the token :meth:`remove` takes. It counts as ahead
        until ``stay_ms + margin_ms`` has passed (and again when late). ``per_ahead_ms``
        is what each of this router's requests counted ahead of it at its replica added
        to ``stay_ms``: taken off again when an answer shows one was not (:meth:`answered`).
        ``inflight`` (requests ahead when it was sent) and ``items`` are what :meth:`late`
        says of it once it is late; None: it is not said to be late."""
        self._next += 1
        margin = margin_ms if math.isfinite(margin_ms) and margin_ms > 0 else 0.0
        stay, net = max(stay_ms, 0.0), max(network_ms, 0.0)
        ahead: set[int] = set()
        if pod is not None:
            ahead = {t for t, r in self._requests.items()
                     if r.executor == executor and r.pod == pod and r.is_ahead(sent_ms)}
        per_ahead = per_ahead_ms if math.isfinite(per_ahead_ms) and per_ahead_ms > 0 else 0.0
        k = -1.0  # not said to be late
        if inflight is not None and math.isfinite(inflight) and inflight >= 0:
            k = float(inflight)
        self._requests[self._next] = _Own(executor, pod, sent_ms, stay + margin, stay + net,
                                          net, per_ahead, ahead, k, items)
        return self._next

    def answered(self, token: int, now_ms: float) -> list[int]:
        """The answer of ``token`` is back at ``now_ms``: it was served half its round trip
        earlier. A request of ours that counted it ahead but reached the replica after
        that did not have it ahead: it stops counting its cost (its stay is shortened by
        ``per_ahead_ms``) and :meth:`gone_ahead` says so for its measurement. Returns the
        tokens so shortened: their leases say it too (:meth:`lease`)."""
        done = self._requests.get(token)
        if done is None:
            return []
        served_at = now_ms - done.network / 2
        shortened = []
        for t, r in self._requests.items():
            if token in r.ahead:
                r.ahead.discard(token)
                if served_at <= r.sent + r.network / 2:
                    r.gone += 1
                    r.served_by = max(0.0, r.served_by - r.per_ahead)
                    r.back_by = max(0.0, r.back_by - r.per_ahead)
                    shortened.append(t)
        return shortened

    def lease(self, token: int) -> LeaseTiming | None:
        """What other routers must know of ``token`` to count it as this router does: its
        window (:func:`stay_window`, after the sending time) with the requests it really
        had ahead as far as answers tell, its items and its expected stay."""
        r = self._requests.get(token)
        if r is None:
            return None
        stay = max(0.0, r.back_by - r.network)
        busy_after, back_after = stay_window(stay, r.network, max(0.0, r.served_by - stay))
        return LeaseTiming(busy_after, back_after, max(0.0, r.inflight - r.gone)
                           if r.inflight >= 0 else -1.0, r.items, stay)

    def gone_ahead(self, token: int) -> int:
        """How many of the requests counted ahead of ``token`` when it was sent had in fact
        been served before it arrived (answers say so, :meth:`answered`)."""
        r = self._requests.get(token)
        return r.gone if r is not None else 0

    def remove(self, token: int) -> None:
        self._requests.pop(token, None)

    def late(self, now_ms: float) -> dict[str, list[tuple[float, float, float]]]:
        """Our requests not back after their predicted stay and round trip, per executor,
        each with the least its service time can be (its age less the round trip): what
        selection raises the executor's model to (:func:`floored`)."""
        out: dict[str, list[tuple[float, float, float]]] = {}
        for r in self._requests.values():
            age = now_ms - r.sent
            if r.inflight < 0 or age < r.back_by:
                continue
            out.setdefault(r.executor, []).append(Late(
                max(0.0, r.inflight - r.gone), r.items, age - r.network))
        return out

    def ahead(self, now_ms: float) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Requests still ahead at each executor and at each replica (by pod)."""
        per_executor: dict[str, float] = {}
        per_pod: dict[str, dict[str, float]] = {}
        for r in self._requests.values():
            if not r.is_ahead(now_ms):
                continue  # on its way back
            per_executor[r.executor] = per_executor.get(r.executor, 0.0) + 1
            if r.pod is not None:
                pods = per_pod.setdefault(r.executor, {})
                pods[r.pod] = pods.get(r.pod, 0.0) + 1
        return per_executor, per_pod


class _Own:
    """One request of :class:`OwnRequests` (times in ms; ``served_by``/``back_by`` after
    ``sent``)."""

    __slots__ = ("ahead", "back_by", "executor", "gone", "inflight", "items", "network",
                 "per_ahead", "pod", "sent", "served_by")

    def __init__(self, executor: str, pod: str | None, sent: float, served_by: float,
                 back_by: float, network: float, per_ahead: float, ahead: set[int],
                 inflight: float, items: float) -> None:
        self.executor, self.pod, self.sent = executor, pod, sent
        self.served_by, self.back_by, self.network = served_by, back_by, network
        self.per_ahead, self.ahead, self.gone = per_ahead, ahead, 0
        self.inflight, self.items = inflight, items

    def is_ahead(self, now_ms: float) -> bool:
        """Still ahead of a request sent now (not on its way back)."""
        age = now_ms - self.sent
        return not self.served_by <= age < self.back_by
