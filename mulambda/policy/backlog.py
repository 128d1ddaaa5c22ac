"""Replicas for a backlog: the work due within a horizon, and who is there to serve it.

:func:`mulambda.policy.scaling.decide` asks this module how many replicas a
backlog needs once a sample names one (``Sample.queued``) with a service time.
The answer counts work, not heads: everything queued now, plus everything that
arrives until a replica started now is ready (one cold start) and for
``drain_seconds`` after, must be served by then. Replicas serve
``target / service_s`` requests a second each, but not all for the same time:
the ready ones for the whole horizon, those already starting from the end of
their cold start, and any added now only for the last ``drain_seconds``. The
answer is the fewest replicas that do the work, taken in that order.

Why it is shaped this way (``bench/autoscale.py``, a 30 s cold start):

* Counting the requests that arrive during the cold start asks, at the first
  sign of a burst, for what the backlog will be when the new pods are ready.
  Sizing the backlog seen so far asks again every tick as the queue grows,
  and each of those pods is ready one decision later than it could have been.
* Counting what starting replicas will serve keeps a backlog that those
  replicas will drain anyway from asking for more: a pod started late in a
  cold start is ready after the queue is gone, and only adds to the peak.
* The arrival rate is the mean since the previous decision, not over a window
  that reaches back before the burst: that mean lags a step by the window's
  length and under-asks at the moment that matters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

__all__ = ["QUEUE_DRAIN_SECONDS", "BacklogSample", "backlog_replicas", "drain_replicas"]

#: A backlog is sized to drain within this many seconds once new replicas are ready.
QUEUE_DRAIN_SECONDS = 35.0

# ceil(2.0000000001) must stay 2: products of floats carry rounding noise.
_EPSILON = 1e-9


class BacklogSample(Protocol):
    """What :func:`backlog_replicas` reads from a demand sample (``scaling.Sample``)."""

    @property
    def at(self) -> float: ...
    @property
    def rate(self) -> float: ...
    @property
    def queued(self) -> float: ...
    @property
    def service_s(self) -> float | None: ...


def drain_replicas(
    *,
    rate: float,
    queued: float,
    service_s: float,
    target: float,
    ready: int,
    starting: int,
    starting_for: float,
    cold_start_seconds: float,
    drain_seconds: float = QUEUE_DRAIN_SECONDS,
) -> int:
    """Fewest replicas that serve ``queued`` requests and the arrivals behind them
    within one cold start plus ``drain_seconds``.

    ``ready`` replicas serve for the whole horizon; ``starting`` ones (started
    ``starting_for`` seconds ago) from the end of their cold start; replicas
    added now for ``drain_seconds``. Each serves ``target / service_s``
    requests a second. The result counts the ready and starting replicas it
    uses, so it is directly comparable with the replica count.
    """
    if service_s <= 0 or target <= 0 or drain_seconds <= 0:
        raise ValueError("service_s, target and drain_seconds must be > 0")
    if min(rate, queued, starting_for, cold_start_seconds) < 0 or min(ready, starting) < 0:
        raise ValueError("rate, queued, replica counts and durations must be >= 0")
    horizon = cold_start_seconds + drain_seconds
    per_second = target / service_s
    still_cold = max(0.0, cold_start_seconds - starting_for)
    tiers: Sequence[tuple[float, float]] = (
        (ready, horizon),
        (starting, horizon - still_cold),
        (math.inf, drain_seconds),
    )
    work = queued + rate * horizon
    replicas = 0
    for count, seconds in tiers:
        if work <= _EPSILON:
            break
        each = per_second * seconds
        take = min(count, max(0, math.ceil(work / each - _EPSILON)))
        replicas += int(take)
        work -= take * each
    return replicas


def backlog_replicas(
    samples: Sequence[BacklogSample],
    *,
    since: float | None,
    target: float,
    ready: int,
    current: int,
    starting_for: float,
    cold_start_seconds: float,
    drain_seconds: float = QUEUE_DRAIN_SECONDS,
) -> int:
    """Replicas the latest sample's backlog needs (:func:`drain_replicas`); 0 when
    it names no backlog or no service time.

    ``samples`` are the recent ones, oldest first (the panic window); the
    arrival rate is their mean after ``since``, the previous decision (all of
    them without one). ``current - ready`` replicas are starting, for
    ``starting_for`` seconds.
    """
    latest = samples[-1] if samples else None
    if latest is None or not latest.queued or latest.service_s is None:
        return 0
    rates = [s.rate for s in samples if since is None or s.at > since]
    return drain_replicas(
        rate=math.fsum(rates) / len(rates) if rates else latest.rate, queued=latest.queued,
        service_s=latest.service_s, target=target, ready=ready,
        starting=max(0, current - ready), starting_for=starting_for,
        cold_start_seconds=cold_start_seconds, drain_seconds=drain_seconds)
