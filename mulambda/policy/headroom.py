"""Spare capacity kept ahead of demand: replicas ready for a burst before it comes.

:func:`mulambda.policy.scaling.decide` asks this module for the replicas that
carry the stable demand *and* ``burstCapacity`` more requests in flight at
``targetConcurrency`` each (the policy's ``burst_capacity``), so that a burst
meets ready replicas instead of queueing behind a cold start. It is Knative's
target burst capacity, except that here the spare is provisioned as replicas
rather than used to decide whether the activator stays in the request path.

Why (``bench/autoscale.py``, a 30 s cold start): a purely reactive rule
starts pods at the first sign of a burst, but everything that arrives during
their cold start beyond what the ready replicas take waits, whatever the
count asked for. Only capacity that is there before the burst serves it. The
spare is paid for in every hour with demand, which is the trade-off the knob
sets.

The spare is at most the demand itself: a quiet executor (one request now and
then) does not keep a fleet for a burst that is many times its load; a busy
one keeps the full ``burstCapacity``. Nothing is kept without demand, so the
idle window and scale to zero are unchanged, and the spare never asks for more
than ``maxReplicas`` (it is not a reason to report ``Bounded``).
"""

from __future__ import annotations

import math

__all__ = ["headroom_replicas", "spare_concurrency"]

# ceil(2.0000000001) must stay 2: sums of floats carry rounding noise.
_EPSILON = 1e-9


def spare_concurrency(concurrency: float, burst_capacity: float) -> float:
    """Requests in flight kept spare on top of ``concurrency``: ``burst_capacity``,
    at most ``concurrency`` itself, none without demand."""
    if burst_capacity < 0:
        raise ValueError(f"burst_capacity must be >= 0, got {burst_capacity}")
    return max(0.0, min(burst_capacity, concurrency))


def headroom_replicas(
    concurrency: float, *, target: float, burst_capacity: float, max_replicas: int
) -> int:
    """Replicas that carry ``concurrency`` plus its spare at ``target`` each, at most
    ``max_replicas``; 0 without demand or without burst capacity."""
    if target <= 0:
        raise ValueError(f"target must be > 0, got {target}")
    spare = spare_concurrency(concurrency, burst_capacity)
    if spare <= 0:
        return 0
    return min(max_replicas, max(0, math.ceil((concurrency + spare) / target - _EPSILON)))
