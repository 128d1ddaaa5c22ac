"""A router's own requests in flight: when each is ahead of a new one, when it is late, and
what its lease tells the other routers.

Pure (no I/O, no clock: times are the caller's, in milliseconds). The SDK and the
selector's gateway keep one :class:`OwnRequests` each
(:class:`~mulambda.sdk.counting.InflightCounter` fills it), and selection counts what
:meth:`OwnRequests.ahead` and :meth:`OwnRequests.late` say; the lease of each request
(:meth:`OwnRequests.lease`, :func:`stay_window`) says the same to every other router.
The service times that predict each stay are :mod:`mulambda.policy.latency`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from mulambda.store.records import TimedRequest

from .latency import Late

if TYPE_CHECKING:
    from .latency import ServiceTracker
    from .ranking import Candidate

__all__ = ["LeaseTiming", "OwnRequests", "measure", "measured_at", "stay_window"]


class LeaseTiming(NamedTuple):
    """:meth:`OwnRequests.lease`: ms after the request was sent and what it was sent with."""

    busy_after: float
    back_after: float
    inflight: float  # < 0: not said
    items: float
    stay_ms: float

    def entry(self, pod: str, sent_ms: float) -> TimedRequest:
        """The lease entry of a request sent to ``pod`` at ``sent_ms`` (epoch ms), as
        readers decode it (store/records.py InflightLease)."""
        busy_until, back_by = (sent_ms + self.busy_after) / 1000, (sent_ms + self.back_after) / 1000
        if self.inflight < 0:
            return TimedRequest(pod, busy_until, back_by)
        return TimedRequest(pod, busy_until, back_by, self.inflight, self.items, self.stay_ms)


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


def measure(tracker: ServiceTracker, sent: Candidate, items: float, gone: float,
            elapsed_ms: float, at: float, network_ms: float | None = None) -> bool:
    """Add the answer of a request sent to ``sent`` (with ``items``) that took
    ``elapsed_ms`` to ``tracker``, at the requests ahead it met (:func:`measured_at`;
    ``gone``: :meth:`OwnRequests.gone_ahead`). ``network_ms``: the part of it that was
    the sender's own round trip to the replica, when it is not the client's the
    ranking used (the gateway's, mulambda/selector/handshakes.py). False when the
    tracker refused an impossible value. How the SDK, the gateway and the simulator
    measure alike."""
    model = sent.model
    net = sent.network_ms if network_ms is None else network_ms
    k, predicted = measured_at(
        sent.inflight, sent.uncertain, gone,
        lambda ahead: sent.service_ms + (model.load(ahead) if model is not None else 0.0),
        elapsed_ms - net,
        lambda ms: tracker.stay_margin_ms(sent.executor_id, ms))
    return tracker.observe(sent.executor_id, inflight=k, items=items, elapsed_ms=elapsed_ms,
                           network_ms=net, predicted_ms=predicted, at=at)


# An answer tells whether a request was ahead only when one costs at least this many
# standard deviations of the prediction's error: at that cost about 7 % of answers are
# misread each way (fewer above it). The error is the router's whole prediction error
# (ServiceTracker.stay_margin_ms, at the request's own time with nothing ahead), an
# upper bound of the noise: 4 left most corrections undone in the simulator, 2 let a
# 5 ms cost in 5 ms of noise be learned 60 % too steep (tests/unit/test_latency.py).
TELLING_SIGMAS = 3.0


def measured_at(inflight: float, uncertain: float, gone: float,
                predict: Callable[[float], float], measured_ms: float,
                error_ms: Callable[[float], float] | None = None) -> tuple[float, float]:
    """The requests ahead to measure an answered request at, and the service time its model
    predicted there: ``(k, predicted)`` for
    :meth:`~mulambda.policy.latency.ServiceTracker.observe`.

    It was sent with ``inflight`` requests counted ahead; ``predict(k)`` is the
    service time its model predicts with ``k`` ahead (the candidate's);
    ``measured_ms`` is the service time it took. ``gone`` of those
    ahead were the router's own and its answers showed them served before it
    arrived (:meth:`OwnRequests.gone_ahead`): not ahead. ``uncertain`` of them
    (whole requests) were other routers' requests at its replica due back
    before it would arrive, counted for their senders' margin only
    (``Candidate.uncertain``): no answer of theirs reaches this router, so its
    own time tells. Of those it met as many as its time beyond the sure ones'
    prediction pays for, to the nearest whole request; but only when a request
    ahead costs at least ``TELLING_SIGMAS`` standard deviations of the
    prediction's error (``error_ms`` of its own predicted time with nothing
    ahead, the router's
    :meth:`~mulambda.policy.latency.ServiceTracker.stay_margin_ms`; without it,
    never): where noise is comparable to that cost, the answer's time says
    more about the noise, and a count read from it follows the noise and makes
    the fit steeper than the truth (a model whose request ahead costs nothing
    would be learned at about 1.6 noise deviations).

    Why: counted as met, every uncertain request that was in fact served already
    is an answer as fast as with one request fewer ahead, and the fit learns a
    request ahead as cheaper than it is (errors in ``k`` flatten the slope).
    With several SDK processes most requests ahead are other routers' (in the
    unit test where half of such requests had been served, 48 ms learned for a
    true 100: tests/unit/test_latency.py). In the simulator such requests are
    few and the figures moved within chance (bench/README.md,
    bench/service_fit.py). Rounded, not the exact quotient: an observation
    placed on the model's own line would only confirm it.
    """
    gone = min(max(gone, 0.0), inflight)
    k = inflight - gone
    predicted = predict(k)
    unsure = float(math.floor(min(max(uncertain, 0.0), k))) if math.isfinite(uncertain) else 0.0
    if unsure <= 0 or error_ms is None:
        return k, max(0.0, predicted)
    sure = predict(k - unsure)  # with none of the uncertain ones ahead
    per = (predicted - sure) / unsure  # what each of them costs
    if not (math.isfinite(per) and per > 0):
        return k, max(0.0, predicted)
    met = (measured_ms - sure) / per
    if not (math.isfinite(met) and per >= TELLING_SIGMAS * error_ms(max(0.0, predict(0)))):
        return k, max(0.0, predicted)
    met = float(round(min(max(met, 0.0), unsure)))
    return k - unsure + met, max(0.0, predict(k - unsure + met))


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
    takes its cost (what one request fewer ahead saves) off the later one's stay, and
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
            network_ms: float = 0.0, margin_ms: float = 0.0,
            saving: Callable[[float], float] | None = None,
            inflight: float | None = None, items: float = 1.0) -> int:
        """Register a request; returns the token :meth:`remove` takes. It counts as ahead
        until ``stay_ms + margin_ms`` has passed (and again when late). ``saving(g)`` is
        what ``g`` fewer requests counted ahead would take off ``stay_ms`` (the candidate's
        :meth:`~mulambda.policy.ranking.Candidate.saving`): when an answer shows one of
        this router's requests counted ahead at its replica was not (:meth:`answered`),
        the stay is shortened to what it would have been with one fewer.
        ``inflight`` (requests ahead when it was sent) and ``items`` are what :meth:`late`
        says of it once it is late; None: it is not said to be late."""
        self._next += 1
        margin = margin_ms if math.isfinite(margin_ms) and margin_ms > 0 else 0.0
        stay, net = max(stay_ms, 0.0), max(network_ms, 0.0)
        ahead: set[int] = set()
        if pod is not None:
            ahead = {t for t, r in self._requests.items()
                     if r.executor == executor and r.pod == pod and r.is_ahead(sent_ms)}
        saved = _savings(saving, len(ahead))
        k = -1.0  # not said to be late
        if inflight is not None and math.isfinite(inflight) and inflight >= 0:
            k = float(inflight)
        self._requests[self._next] = _Own(executor, pod, sent_ms, stay + margin, stay + net,
                                          net, saved, ahead, k, items)
        return self._next

    def answered(self, token: int, now_ms: float) -> list[int]:
        """The answer of ``token`` is back at ``now_ms``: it was served half its round trip
        earlier. (``now_ms`` as if the request had left when it was counted: the time it
        was counted plus its time on the wire, so that the router's own work on both
        sides of the wire, the same for every request, cancels out;
        :meth:`mulambda.sdk.counting.CountedRequest.answered`.) A request of ours that
        counted it ahead but reached the replica after that did not have it ahead: it
        stops counting its cost (its stay is shortened to one with a request fewer
        ahead) and :meth:`gone_ahead` says so for its measurement. Returns the tokens so
        shortened: their leases say it too (:meth:`lease`)."""
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
                    fewer = r.saved[r.gone - 1] - (r.saved[r.gone - 2] if r.gone > 1 else 0.0)
                    r.served_by = max(0.0, r.served_by - fewer)
                    r.back_by = max(0.0, r.back_by - fewer)
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


def _savings(saving: Callable[[float], float] | None, ahead: int) -> tuple[float, ...]:
    """``saving(g)`` for g = 1 .. ``ahead``, made finite, non-negative and non-decreasing
    (the stay never grows when a request ahead turns out gone)."""
    out: list[float] = []
    last = 0.0
    for g in range(1, ahead + 1):
        value = saving(float(g)) if saving is not None else 0.0
        last = max(last, value) if math.isfinite(value) else last
        out.append(last)
    return tuple(out)


class _Own:
    """One request of :class:`OwnRequests` (times in ms; ``served_by``/``back_by`` after
    ``sent``)."""

    __slots__ = ("ahead", "back_by", "executor", "gone", "inflight", "items", "network",
                 "pod", "saved", "sent", "served_by")

    def __init__(self, executor: str, pod: str | None, sent: float, served_by: float,
                 back_by: float, network: float, saved: tuple[float, ...], ahead: set[int],
                 inflight: float, items: float) -> None:
        self.executor, self.pod, self.sent = executor, pod, sent
        self.served_by, self.back_by, self.network = served_by, back_by, network
        # saved[g - 1]: what g of ``ahead`` gone take off the stay (never less for more)
        self.saved, self.ahead, self.gone = saved, ahead, 0
        self.inflight, self.items = inflight, items

    def is_ahead(self, now_ms: float) -> bool:
        """Still ahead of a request sent now (not on its way back)."""
        age = now_ms - self.sent
        return not self.served_by <= age < self.back_by
