"""Counting a router's own request in flight while it runs, and measuring it when answered.

One helper for both routers that send requests: the SDK
(:meth:`mulambda.sdk.client.MulambdaClient._counted`) and the selector's gateway
(:meth:`mulambda.selector.service.Selector.forward`). They must count alike: a
router that counted its requests for less time than the other would pile more
requests onto the replicas both use (issue 11).

While a request runs it is, at once:

* in this router's :class:`~mulambda.policy.inflight.OwnRequests` (its own
  rankings count it as ahead until its predicted stay plus margin has passed,
  less what its answer shows of requests counted ahead of it that were not);
* a lease in :class:`~mulambda.store.leases.InflightLeases` whose timing
  (:meth:`~mulambda.policy.inflight.OwnRequests.lease`) tells every other router
  the same thing, rewritten when an answer shortens it, and one more demand;
* timed, so that an answer feeds :class:`~mulambda.policy.latency.ServiceTracker`
  (only an answer: a failure's time says nothing about the model), on the wire
  when the transport says when it was (:class:`Wire`).

Counting and releasing are local and synchronous (no await between them and
the request), so a cancellation cannot skip the release.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from mulambda.policy.inflight import OwnRequests, measure
from mulambda.policy.latency import ServiceTracker
from mulambda.policy.ranking import Candidate
from mulambda.store.records import ServiceStats

__all__ = ["CountedRequest", "InflightCounter", "Leases", "Wire"]


class Wire:
    """When one request's body left the router and its answer's headers came back
    (seconds on the transport's clock, ``time.perf_counter``; set by its trace hooks):
    its time on the network and at the replica.

    What the router measures of a request beside that is its own work (building and
    writing the request, waiting for a pooled connection or opening one, reading
    and decoding the answer), which keeps no replica busy. Measured in, it made the
    service time learned on real parts twice the replica's (8.6 ms learned at 19-21
    in bench/live_selection.py), so each request was counted as ahead of new ones
    for about 10 ms after it had been served, and answers counted one request
    ahead that met none taught the fit that a request ahead of a two-slot model
    costs 14-42 ms where it cost 85.
    """

    __slots__ = ("back", "sent")

    def __init__(self) -> None:
        self.sent: float | None = None
        self.back: float | None = None

    def ms(self) -> float | None:
        """Body sent -> answer's headers back, in ms; None unless both were seen in order."""
        if self.sent is None or self.back is None or self.back < self.sent:
            return None
        return (self.back - self.sent) * 1000


class Leases(Protocol):
    """What :class:`InflightCounter` needs of :class:`~mulambda.store.leases.InflightLeases`."""

    def start(self, executor: str, at: float | None = None, publish: bool = True,
              timing: Sequence[str | float] | None = None) -> int: ...

    def retime(self, executor: str, token: int, timing: Sequence[str | float]) -> None: ...

    def finish(self, executor: str, publish: bool = True, token: int | None = None) -> None: ...

    def kick(self) -> None: ...


class CountedRequest:
    """One request being counted; :meth:`answered` measures it."""

    def __init__(self, counter: InflightCounter, candidate: Candidate, items: int,
                 started: float, token: int, counted_ms: float) -> None:
        self._counter = counter
        self._candidate = candidate
        self._items = items
        self._started = started
        self._token = token
        self._counted_ms = counted_ms  # on the monotonic clock, as OwnRequests has it

    def elapsed_ms(self) -> float:
        """Milliseconds since the request was counted."""
        return (self._counter.perf() - self._started) * 1000

    def answered(self, elapsed_ms: float | None = None,
                 network_ms: float | None = None) -> bool:
        """The executor answered: add its response time to the service-time model, against
        what the ranking predicted. ``elapsed_ms``: its time on the wire (:meth:`Wire.ms`)
        when the transport traced it, else (None) :meth:`elapsed_ms`; ``network_ms``: the
        router's own round trip in it, when not the client's (the gateway's). False when
        the tracker refused an impossible value."""
        own = self._counter.own
        elapsed = self.elapsed_ms() if elapsed_ms is None else elapsed_ms
        # Measured at the requests it really met ahead, or the fit learns a request
        # ahead as cheaper than it is (issue 11): not those of ours that answers showed
        # served before it arrived, nor those of others its time shows were.
        observed = measure(self._counter.tracker, self._candidate, self._items,
                           own.gone_ahead(self._token), elapsed, self._counter.monotonic(),
                           network_ms)
        # When it would have come back had it left as it was counted: the requests of
        # ours counted after it are compared with their own counting times, so the
        # router's work on both sides of the wire cancels out.
        for token in own.answered(self._token, self._counted_ms + elapsed):
            self._counter.retime(token)
        return observed


class InflightCounter:
    """A router's requests in flight: its own view, its leases and its measurements.

    ``clock`` stamps leases (wall seconds: other processes read them),
    ``monotonic`` this router's own requests, ``perf`` response times; tests
    pass their own.
    """

    def __init__(self, tracker: ServiceTracker, own: OwnRequests, leases: Leases, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 perf: Callable[[], float] = time.perf_counter) -> None:
        self.tracker = tracker
        self.own = own
        self.leases = leases
        self.clock = clock
        self.monotonic = monotonic
        self.perf = perf
        # own token -> (executor, lease token, pod, wall time sent) of each request counted
        self._leased: dict[int, tuple[str, int, str, float]] = {}

    def measurements(self) -> dict[str, ServiceStats]:
        """This router's own measured statistics as they count now: faded where no answer
        came for a while (:meth:`~mulambda.policy.latency.ServiceTracker.fade`), and then
        published again for the other routers."""
        if self.tracker.fade(self.monotonic()):
            self.leases.kick()
        return self.tracker.stats

    @contextmanager
    def count(self, candidate: Candidate, items: int = 1) -> Iterator[CountedRequest]:
        """Count a request to ``candidate`` (its replica, when it has one) for the ``with``
        block; released however the block ends."""
        executor = candidate.executor_id
        pod = candidate.replica.pod if candidate.replica is not None else None
        stay, net = candidate.service_ms + candidate.load_ms, candidate.network_ms
        # Ahead of new requests until the stay has passed give or take its typical error
        # (policy/latency.py ServiceTracker.stay_margin_ms): about half of all requests
        # stay longer than predicted.
        margin = self.tracker.stay_margin_ms(executor, stay)
        sent, counted_ms = self.clock(), self.monotonic() * 1000
        token = self.own.add(executor, pod, counted_ms, stay, net, margin,
                             candidate.saving, candidate.inflight, items)
        lease = self.leases.start(executor, timing=self._timing(token, pod or "", sent))
        self._leased[token] = (executor, lease, pod or "", sent)
        try:
            yield CountedRequest(self, candidate, items, self.perf(), token, counted_ms)
        finally:
            self._leased.pop(token, None)
            self.own.remove(token)
            self.leases.finish(executor, token=lease)

    def _timing(self, token: int, pod: str, sent: float) -> list[str | float]:
        """The lease of own request ``token`` (store/records.py InflightLease) as it counts
        it now: other routers count it as this one does."""
        t = self.own.lease(token)
        assert t is not None
        return t.entry(pod, sent * 1000).item()

    def retime(self, token: int) -> None:
        """Own request ``token`` will be served sooner than its lease says (an answer showed
        a request counted ahead of it was not): say so to the other routers."""
        leased = self._leased.get(token)
        if leased is not None:
            executor, lease, pod, sent = leased
            self.leases.retime(executor, lease, self._timing(token, pod, sent))
