"""The serverless autoscaler's decision: a pure, deterministic function.

Modelled on Knative's KPA. The operator samples demand for each executor
(requests in flight, counting those queued in front of its replicas or held
while it is scaled to zero, and the arrival rate), keeps the samples in a
bounded :class:`DemandWindow`, and calls :func:`decide` with the executor's
``spec.scaling``, the replica counts, the :class:`ScalingState` it kept
from the previous call and ``now``. :func:`decide` does no I/O and reads no
clock: the same inputs always give the same :class:`Decision`.

The rule, in the order it is applied:

1. **Stable desire.** ``ceil(mean concurrency over the last
   stableWindowSeconds / targetConcurrency)``. Averaging over a minute is
   what keeps noisy or flapping load from moving the replica count.
2. **Panic.** The same figure over the (shorter) panicWindowSeconds reacts
   to bursts. When it reaches twice the ready replicas (at least one), the
   executor is *panicking*: the recommendation becomes the larger of the
   panic and stable desires and never drops below the current replicas, so
   a burst is chased at once and nothing is taken away mid-burst. Panic ends
   only after a whole stable window in which the threshold was not crossed
   and the panic desire did not reach twice the stable desire (load that
   keeps bursting keeps its burst capacity instead of cycling in and out).
3. **Scale-down delay.** The recommendation actually used is the maximum of
   all recommendations over the last scaleDownDelaySeconds: scaling up is
   immediate, scaling down happens only once demand has stayed low for the
   whole delay. (A monotonic max-queue in the state makes this cheap.)
4. **Idle and scale to zero.** While the recommendation is zero (no
   concurrency in the stable window) one replica stays warm. The executor
   goes to zero only when minReplicas is 0 *and* there has been no demand
   at all (no in-flight request, no arrival, no activation) for
   idleWindowSeconds.
5. **Activation.** Demand while at zero (an activation request or any
   sample with demand) gives at least one replica at once, or more if the
   panic-window demand asks for more; the delay does not apply to it.
6. **Bounds.** The result is clamped to [minReplicas, maxReplicas]; a
   clamp that changed the answer is reported as ``Bounded``.
7. **No data.** With no sample in the stable window (metrics collection
   failing) the count is held: not knowing the load is no reason to act.
8. **Backlog.** A sample that says how much of its concurrency waits
   (``queued``) and the service time counts the waiting requests by what
   drains them within ``QUEUE_DRAIN_SECONDS`` (35 s), on top of the arrival
   rate times the service time, not head for head. The panic desire is at
   least what :func:`mulambda.policy.backlog.drain_replicas` asks for: the
   work queued now plus what arrives during one cold start and the drain
   horizon, served by the ready replicas, by those already starting from the
   end of their cold start and by new ones for the drain horizon. So the
   first decision of a burst starts the pods it needs at once, and later ones
   add none that the pods already starting will make useless. Head for head, a
   queue that grows while new pods start asked for more pods every tick: a
   burst behind a 30 s cold start took the fleet to maxReplicas, twice what
   the peak needs (``bench/autoscale.py``).
9. **Spare capacity.** While there is demand, the recommendation is at least
   what carries the stable window's offered load plus ``burstCapacity`` more
   requests in flight (at most the load itself again, never above
   maxReplicas): :func:`mulambda.policy.headroom.headroom_replicas`. A burst
   then meets ready replicas; rules 1-8 only react, and what arrives during a
   cold start beyond what the ready replicas take waits however many pods
   they start. The spare is paid for all day; 0 turns it off.

Reasons (CamelCase, for conditions and Events): ``Activate``,
``ScaleToZero``, ``Bounded``, ``Panic``, ``ScaleUp``, ``ScaleDown``,
``Hold``.

Samples are assumed to arrive at a roughly regular interval (the mean is
over samples, not time-weighted); the operator samples on a timer. The
operator keeps the window and the state in memory only
(:mod:`mulambda.operator.modelexecutor.autoscale`): a restart loses them,
which only restarts the idle clock and the scale-down delay and so errs
towards keeping replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from .backlog import QUEUE_DRAIN_SECONDS, backlog_replicas
from .demand import (
    DEFAULT_MAX_SAMPLES,
    DemandWindow,
    Sample,
    effective_concurrency,
    offered_concurrency,
    record_sample,
)
from .headroom import headroom_replicas

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "PANIC_THRESHOLD",
    "QUEUE_DRAIN_SECONDS",
    "Decision",
    "DemandWindow",
    "Reason",
    "Sample",
    "ScalingPolicy",
    "ScalingState",
    "decide",
    "effective_concurrency",
    "record_sample",
    "window_horizon",
]

#: Panic when the panic-window desire is this many times the ready replicas (Knative: 200%).
PANIC_THRESHOLD = 2.0

# ceil(2.0000000001) must stay 2: averages of floats carry rounding noise.
_EPSILON = 1e-9


class Reason(StrEnum):
    """Why the decision is what it is; values are CamelCase condition reasons."""

    ACTIVATE = "Activate"
    SCALE_TO_ZERO = "ScaleToZero"
    BOUNDED = "Bounded"
    PANIC = "Panic"
    SCALE_UP = "ScaleUp"
    SCALE_DOWN = "ScaleDown"
    HOLD = "Hold"


class ScalingPolicy(Protocol):
    """What :func:`decide` reads from a spec; :class:`mulambda.api.modelexecutor.Scaling` fits."""

    @property
    def min_replicas(self) -> int: ...
    @property
    def max_replicas(self) -> int: ...
    @property
    def target_concurrency(self) -> float: ...
    @property
    def idle_window_seconds(self) -> int: ...
    @property
    def stable_window_seconds(self) -> int: ...
    @property
    def panic_window_seconds(self) -> int: ...
    @property
    def scale_down_delay_seconds(self) -> int: ...
    @property
    def burst_capacity(self) -> float: ...


def window_horizon(policy: ScalingPolicy) -> float:
    """Seconds of samples :func:`decide` looks at (the longer of the two windows)."""
    return float(max(policy.stable_window_seconds, policy.panic_window_seconds))


# -- state kept between decisions ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScalingState:
    """What :func:`decide` remembers between calls (all times in the caller's clock).

    ``recent`` holds ``(at, recommendation)`` pairs of the scale-down delay
    window as a monotonic max-queue: each value is larger than every later
    one, so the first is the window's maximum and the list stays short.
    """

    desired: int | None = None
    last_change_at: float | None = None
    last_scale_up_at: float | None = None
    last_demand_at: float | None = None
    panic_since: float | None = None
    panic_last_at: float | None = None
    recent: tuple[tuple[float, int], ...] = field(default=())
    starting_since: float | None = None
    decided_at: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The autoscaler's answer for one executor at one instant."""

    desired_replicas: int
    reason: Reason
    message: str
    state: ScalingState
    stable_concurrency: float | None = None
    panic_concurrency: float | None = None
    panicking: bool = False

    def to_status(self) -> dict[str, Any]:
        """The part worth showing in ``status.scaling`` (camelCase)."""
        out: dict[str, Any] = {
            "desiredReplicas": self.desired_replicas,
            "reason": str(self.reason),
            "message": self.message,
            "panicking": self.panicking,
        }
        if self.stable_concurrency is not None:
            out["stableConcurrency"] = round(self.stable_concurrency, 3)
        if self.panic_concurrency is not None:
            out["panicConcurrency"] = round(self.panic_concurrency, 3)
        return out


# -- the decision ----------------------------------------------------------------------


def _replicas_for(concurrency: float, target: float) -> int:
    return max(0, math.ceil(concurrency / target - _EPSILON))


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _push_max(
    recent: tuple[tuple[float, int], ...], now: float, value: int, window: float
) -> tuple[tuple[float, int], ...]:
    """Add ``value`` to the max-queue and drop entries older than ``window``."""
    kept = [(at, n) for at, n in recent if at > now - window]
    while kept and kept[-1][1] <= value:
        kept.pop()
    kept.append((now, value))
    return tuple(kept)


def decide(
    policy: ScalingPolicy,
    window: DemandWindow,
    *,
    current_replicas: int,
    ready_replicas: int,
    state: ScalingState,
    now: float,
    activation: bool = False,
    drain_seconds: float = QUEUE_DRAIN_SECONDS,
    cold_start_seconds: float | None = None,
) -> Decision:
    """Desired replicas for one executor; pure and deterministic (see the module docstring).

    ``current_replicas`` is what the Deployment currently asks for (starting
    pods included), ``ready_replicas`` how many serve; ``activation`` is an
    explicit wake-up request (e.g. a client that chose to wait for a cold
    start) on top of whatever the samples show. A backlog the samples name
    (``Sample.queued``) is sized to drain within ``drain_seconds`` after one
    ``cold_start_seconds`` (the executor's measured cold start; 0 when unknown),
    counting what arrives meanwhile and what the replicas already starting will
    serve (rule 8).
    """
    if current_replicas < 0 or ready_replicas < 0:
        raise ValueError("replica counts must be >= 0")
    lo, hi = policy.min_replicas, policy.max_replicas
    stable_w = float(policy.stable_window_seconds)
    panic_w = float(min(policy.panic_window_seconds, policy.stable_window_seconds))
    target = float(policy.target_concurrency)
    burst_capacity = float(policy.burst_capacity)

    visible = [s for s in window.samples if s.at <= now]
    stable = [s for s in visible if s.at > now - stable_w]
    panic = [s for s in stable if s.at > now - panic_w]

    # The idle clock: the latest moment anything asked for this executor. A
    # fresh state starts it now, so a restarted operator never scales to zero early.
    last_demand = state.last_demand_at
    seen = [s.at for s in visible if s.has_demand]
    if activation:
        seen.append(now)
    if seen:
        last_demand = max(seen) if last_demand is None else max(last_demand, *seen)
    if last_demand is None:
        last_demand = now
    idle_for = max(0.0, now - last_demand)

    if not stable and not activation:
        held = min(max(current_replicas, lo), hi)
        reason = Reason.BOUNDED if held != current_replicas else Reason.HOLD
        message = f"no demand samples in the last {stable_w:g}s; holding {held} replica(s)"
        new_state = replace(state, last_demand_at=last_demand)
        return _finish(held, reason, message, new_state, current_replicas, now)

    stable_c = _mean([effective_concurrency(s, drain_seconds) for s in stable]) if stable else 0.0
    panic_c = (_mean([effective_concurrency(s, drain_seconds) for s in panic]) if panic
               else stable_c)
    # Replicas asked for but not ready yet: since when (the backlog sizing's clock;
    # pods added while others start are counted as old as the first ones).
    starting_since = (None if current_replicas <= ready_replicas else
                      state.starting_since if state.starting_since is not None else now)
    want_backlog = backlog_replicas(
        panic, since=state.decided_at, target=target,
        ready=ready_replicas, current=current_replicas,
        starting_for=0.0 if starting_since is None else now - starting_since,
        cold_start_seconds=cold_start_seconds or 0.0, drain_seconds=drain_seconds)
    want_stable = _replicas_for(stable_c, target)
    # The spare rides on the load that arrives, not on a backlog being drained:
    # draining is transient and rule 8 sizes it already.
    offered_c = _mean([offered_concurrency(s) for s in stable]) if stable else 0.0
    want_spare = headroom_replicas(offered_c, target=target, burst_capacity=burst_capacity,
                                   max_replicas=hi)
    want_panic = max(_replicas_for(panic_c, target), want_backlog)
    demand_in_window = activation or any(s.has_demand for s in stable)

    # Panic bookkeeping: the threshold is relative to what serves now, so a
    # burst on a small executor panics even while new pods are still starting.
    over = want_panic >= PANIC_THRESHOLD * max(ready_replicas, 1)
    # While panicking, bursts that still reach twice the stable desire keep
    # the panic alive: otherwise load that bursts every few tens of seconds
    # would scale up in panic, relax once the new pods are ready, scale down
    # after the delay, and panic again on the next burst, round and round.
    still_bursty = (
        state.panic_last_at is not None
        and now - state.panic_last_at < stable_w
        and want_panic >= PANIC_THRESHOLD * max(want_stable, 1)
    )
    panic_last: float | None = now if over or still_bursty else state.panic_last_at
    panicking = panic_last is not None and now - panic_last < stable_w
    panic_since: float | None
    if panicking:
        panic_since = state.panic_since if state.panic_since is not None else now
        recommendation = max(want_panic, want_stable, current_replicas)
    else:
        panic_since = panic_last = None
        recommendation = want_stable
    # Spare capacity (rule 9) is added after the panic bookkeeping, which keeps
    # judging the demand itself: the spare is not a burst.
    recommendation = max(recommendation, want_spare)
    if demand_in_window:
        # Requests too short to show as in-flight still need a replica to land on.
        recommendation = max(recommendation, 1)

    delay = float(policy.scale_down_delay_seconds)
    if delay > 0:
        recent = _push_max(state.recent, now, recommendation, delay)
        delayed = recent[0][1]
    else:
        recent, delayed = (), recommendation

    wanted = delayed
    warm_note = ""
    if current_replicas == 0:
        # Activation skips the delay window: it only ever adds replicas. With
        # no demand, stale recommendations must not wake an executor at zero.
        wanted = max(1, want_panic, want_stable, want_spare) if demand_in_window else 0
    elif wanted == 0 and current_replicas > 0:
        if lo == 0 and idle_for >= policy.idle_window_seconds:
            wanted = 0
        else:
            wanted = 1
            if lo == 0:
                warm_note = (
                    f"no demand for {idle_for:.0f}s; keeping 1 warm until the "
                    f"{policy.idle_window_seconds}s idle window passes"
                )
    desired = min(max(wanted, lo), hi)

    stats = (
        f"concurrency {stable_c:.2f} over {stable_w:g}s, {panic_c:.2f} over {panic_w:g}s, "
        f"target {target:g}/replica"
        + (f", backlog needs {want_backlog}" if want_backlog else "")
        + (f", {want_spare} with burstCapacity {burst_capacity:g} spare"
           if want_spare > want_stable else "")
    )
    if current_replicas == 0 and desired > 0 and demand_in_window:
        reason = Reason.ACTIVATE
        message = f"demand while scaled to zero: activating {desired} replica(s) ({stats})"
    elif desired != wanted:
        reason = Reason.BOUNDED
        bound = f"maxReplicas={hi}" if wanted > hi else f"minReplicas={lo}"
        message = f"demand asks for {wanted} replica(s), held at {bound} ({stats})"
    elif desired == 0 and current_replicas > 0:
        reason = Reason.SCALE_TO_ZERO
        message = (
            f"no demand for {idle_for:.0f}s (idle window {policy.idle_window_seconds}s): "
            "scaling to zero"
        )
    elif panicking and desired >= current_replicas:
        reason = Reason.PANIC
        message = (
            f"panic: {want_panic} replica(s) wanted over {panic_w:g}s vs {ready_replicas} "
            f"ready; {desired} replica(s), no scale-down until the burst passes ({stats})"
        )
    elif desired > current_replicas:
        reason = Reason.SCALE_UP
        message = f"scaling up {current_replicas} -> {desired} ({stats})"
    elif desired < current_replicas:
        reason = Reason.SCALE_DOWN
        message = f"scaling down {current_replicas} -> {desired} ({stats})"
    else:
        reason = Reason.HOLD
        if warm_note:
            message = warm_note
        elif recommendation < desired:
            message = (
                f"holding {desired}: demand asks for {recommendation}, scale-down waits until "
                f"it has stayed lower for {delay:g}s ({stats})"
            )
        elif desired == 0:
            message = f"scaled to zero; no demand for {idle_for:.0f}s"
        else:
            message = f"holding {desired} replica(s) ({stats})"

    new_state = ScalingState(
        desired=state.desired,
        last_change_at=state.last_change_at,
        last_scale_up_at=state.last_scale_up_at,
        last_demand_at=last_demand,
        panic_since=panic_since,
        panic_last_at=panic_last,
        recent=recent,
        # Pods asked for now start now: their cold start runs from this decision.
        starting_since=(starting_since if starting_since is not None
                        else now if desired > current_replicas else None),
        decided_at=state.decided_at,
    )
    return _finish(
        desired, reason, message, new_state, current_replicas, now,
        stable_c=stable_c, panic_c=panic_c, panicking=panicking,
    )


def _finish(
    desired: int,
    reason: Reason,
    message: str,
    state: ScalingState,
    current_replicas: int,
    now: float,
    *,
    stable_c: float | None = None,
    panic_c: float | None = None,
    panicking: bool = False,
) -> Decision:
    """Stamp the change bookkeeping into the state and build the Decision."""
    changed = state.desired is None or desired != state.desired
    state = replace(
        state,
        desired=desired,
        last_change_at=now if changed else state.last_change_at,
        last_scale_up_at=now if desired > current_replicas else state.last_scale_up_at,
        decided_at=now,
    )
    return Decision(desired, reason, message, state, stable_c, panic_c, panicking)
