"""Replay a day of uneven load through three scaling policies, in simulated time.

Run: ``python bench/autoscale.py`` (``--hours 2`` for a compressed day).

What is simulated, the same for every policy:

* **Load.** A seeded 24-hour trace: a two-humped working day peaking near
  500 requests/s, quiet nights near zero, per-minute noise and three sharp
  bursts (one in the morning ramp, one in the evening, one at night from
  idle). Arrivals are Poisson draws per 0.5 s tick from that rate curve;
  every policy sees the very same arrivals.
* **Replicas.** Each serves at most ``slots_per_replica`` requests at once
  (TF Serving's worker pool). A new replica serves only after a
  ``cold_start_s`` delay (pull, model download, load). Scale-down removes
  starting pods first; a removed ready pod finishes (drains) its in-flight
  requests and is paid for until it has.
* **Queueing.** Requests that find no free slot wait in one FIFO queue (the
  load balancer / activator) and are admitted as slots free up; waits are
  measured per request cohort, in ticks. Service times are 0.5/1.0/1.5/2.0 s
  (probabilities .30/.45/.20/.05, mean 1.0 s), drawn as requests start.
* **Cost.** Replica-hours of every pod that exists (starting, ready or
  draining).

Policies compared on that trace:

a. ``mulambda``: :func:`mulambda.policy.scaling.decide` fed a demand sample every
   second (in-flight plus queued requests, arrival rate), deciding every 2 s,
   minReplicas 0 and the CRD's default windows and burstCapacity (spare
   capacity ahead of demand, rule 9); ``mulambda-d300`` is the
   same with a 300 s scale-down delay, the HPA's stabilisation, so the two
   can be compared at equal patience.
b. ``static-peak``: a fixed fleet sized so the trace's busiest minute runs at
   the same target concurrency per replica as the others; ready from t=0.
c. ``hpa``: a plain utilisation rule in the style of Kubernetes' HPA: every
   15 s, ``desired = ceil(ready * utilisation / target utilisation)`` with the
   mean slot utilisation of the ready pods over the last 15 s, a 10 %
   tolerance, the default scale-up limit (max of +100 % and +4 pods per
   sync), 5-minute scale-down stabilisation, min 1 replica. Utilisation
   cannot see the queue, which is the point of the comparison.

The SLO is queueing delay (time waiting for a slot, on top of service): the
figure printed is the share of requests that waited longer than
``slo_wait_s``. Requests still waiting when the trace ends count if they
had already waited longer.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from mulambda.api.modelexecutor import Scaling
from mulambda.policy.scaling import (
    QUEUE_DRAIN_SECONDS,
    DemandWindow,
    Sample,
    ScalingState,
    decide,
    record_sample,
    window_horizon,
)
from mulambda.tools.plots import ScalingPoint, plot_scaling_day

DAY_S = 86_400

# Service time classes in ticks of 0.5 s and their probabilities (mean 1.0 s).
SERVICE_TICKS = (1, 2, 3, 4)
SERVICE_P = (0.30, 0.45, 0.20, 0.05)


@dataclass(frozen=True)
class SimConfig:
    """Knobs shared by every policy in one comparison."""

    tick_s: float = 0.5
    slots_per_replica: int = 10
    #: Concurrency per replica every dynamic policy aims for (70 % of the slots).
    target_concurrency: float = 7.0
    cold_start_s: float = 30.0
    slo_wait_s: float = 2.0
    #: The queue case: a task may wait this long; each new pod loads a model this big.
    task_wait_s: float = 10.0
    model_gb: float = 1.0
    max_replicas: int = 200
    #: Sample/decide cadence of the mulambda autoscaler.
    sample_every_s: float = 1.0
    decide_every_s: float = 2.0
    #: HPA-style rule.
    hpa_sync_s: float = 15.0
    hpa_tolerance: float = 0.1
    hpa_downscale_window_s: float = 300.0


@dataclass(frozen=True)
class Burst:
    """Extra load on top of the curve: ``extra_rps`` for ``duration_s`` from ``at_hour``."""

    at_hour: float
    duration_s: float
    extra_rps: float


DEFAULT_BURSTS = (
    Burst(at_hour=9.0, duration_s=180, extra_rps=250),  # morning ramp: a batch client starts
    Burst(at_hour=19.5, duration_s=90, extra_rps=350),  # evening: a viral moment
    Burst(at_hour=3.0, duration_s=60, extra_rps=40),  # night, from idle: a cron job
)


# -- the trace ---------------------------------------------------------------------------


def load_curve(
    duration_s: int = DAY_S,
    peak_rps: float = 500.0,
    seed: int = 7,
    bursts: tuple[Burst, ...] = DEFAULT_BURSTS,
) -> list[float]:
    """Request rate per second over one day squeezed into ``duration_s``.

    The diurnal shape scales with ``duration_s``; bursts keep their absolute
    length so a compressed day still has sharp ones.
    """
    rng = random.Random(seed)
    # Minute-to-minute wobble: an AR(1) walk in log space (about 10 % spread),
    # so neighbouring minutes are alike as in real traffic, not white noise.
    noise, level = [], 0.0
    for _ in range(duration_s // 60 + 2):
        level = 0.8 * level + rng.gauss(0.0, 0.06)
        noise.append(math.exp(level))

    def shape(hour: float) -> float:
        morning = 0.80 * math.exp(-(((hour - 11.0) / 2.3) ** 2))
        afternoon = 1.00 * math.exp(-(((hour - 15.5) / 2.2) ** 2))
        evening = 0.22 * math.exp(-(((hour - 20.5) / 1.8) ** 2))
        return morning + afternoon + evening

    top = max(shape(h / 100) for h in range(2400))
    rates = []
    for s in range(duration_s):
        hour = 24.0 * s / duration_s
        rates.append(peak_rps * shape(hour) / top * noise[s // 60])
    for b in bursts:
        start = int(b.at_hour / 24.0 * duration_s)
        for s in range(start, min(duration_s, start + int(b.duration_s))):
            rates[s] += b.extra_rps
    return rates


def poisson(rng: random.Random, lam: float) -> int:
    """One Poisson draw (Knuth below 30, Hörmann's PTRS above, as numpy does)."""
    if lam <= 0.0:
        return 0
    if lam < 30.0:
        limit, k, p = math.exp(-lam), 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        return k
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    while True:
        u = rng.random() - 0.5
        v = rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if (math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)) <= (
            -lam + k * loglam - math.lgamma(k + 1)
        ):
            return k


def arrivals_per_tick(rates: list[float], tick_s: float, seed: int = 11) -> list[int]:
    """Poisson arrivals per tick from a per-second rate curve."""
    rng = random.Random(seed)
    per_second = round(1 / tick_s)
    return [poisson(rng, r * tick_s) for r in rates for _ in range(per_second)]


# -- policies ----------------------------------------------------------------------------


class Controller(Protocol):
    """A scaling policy as the simulator drives it."""

    @property
    def name(self) -> str: ...
    @property
    def interval_s(self) -> float: ...
    @property
    def initial_replicas(self) -> int: ...

    def observe(self, now: float, busy: int, queued: int, arrived: int, ready: int) -> None: ...

    def desired(self, now: float, current: int, ready: int) -> int: ...


@dataclass
class Static:
    """A fixed fleet, ready from the start."""

    replicas: int
    name: str = "static-peak"
    interval_s: float = 3600.0

    @property
    def initial_replicas(self) -> int:
        return self.replicas

    def observe(self, now: float, busy: int, queued: int, arrived: int, ready: int) -> None:
        pass

    def desired(self, now: float, current: int, ready: int) -> int:
        return self.replicas


@dataclass
class Mulambda:
    """Our autoscaler: samples every ``sample_every_s``, decides every ``interval_s``."""

    policy: Scaling
    tick_s: float
    sample_every_s: float = 1.0
    interval_s: float = 2.0
    name: str = "mulambda"
    initial_replicas: int = 0
    window: DemandWindow = field(default_factory=DemandWindow)
    state: ScalingState = field(default_factory=ScalingState)
    reasons: dict[str, int] = field(default_factory=dict)
    #: Mean service time and measured cold start (traits.serviceTimeMs and
    #: status.scaling.lastColdStartSeconds for the operator): with them the
    #: backlog is sized to drain (scaling.effective_concurrency) instead of head for head.
    service_s: float | None = None
    cold_start_s: float | None = None
    drain_s: float = QUEUE_DRAIN_SECONDS
    _conc_sum: float = 0.0
    _queued_sum: float = 0.0
    _arrived: int = 0
    _ticks: int = 0

    def observe(self, now: float, busy: int, queued: int, arrived: int, ready: int) -> None:
        # The queue-proxy/activator view: what is in flight including what waits.
        self._conc_sum += busy + queued
        self._queued_sum += queued
        self._arrived += arrived
        self._ticks += 1
        if self._ticks * self.tick_s >= self.sample_every_s - 1e-9:
            span = self._ticks * self.tick_s
            sample = Sample(now, self._conc_sum / self._ticks, self._arrived / span,
                            self._queued_sum / self._ticks if self.service_s else 0.0,
                            self.service_s)
            self.window = record_sample(
                self.window, sample, horizon_seconds=window_horizon(self.policy)
            )
            self._conc_sum, self._queued_sum, self._arrived, self._ticks = 0.0, 0.0, 0, 0

    def desired(self, now: float, current: int, ready: int) -> int:
        d = decide(
            self.policy, self.window, current_replicas=current, ready_replicas=ready,
            state=self.state, now=now, drain_seconds=self.drain_s,
            cold_start_seconds=self.cold_start_s,
        )
        self.state = d.state
        self.reasons[d.reason] = self.reasons.get(d.reason, 0) + 1
        return d.desired_replicas


@dataclass
class Hpa:
    """Utilisation rule in the style of the Kubernetes HPA (see the module docstring)."""

    slots_per_replica: int
    target_utilisation: float
    max_replicas: int
    interval_s: float = 15.0
    tolerance: float = 0.1
    downscale_window_s: float = 300.0
    min_replicas: int = 1
    name: str = "hpa"
    initial_replicas: int = 1
    _busy: float = 0.0
    _capacity: float = 0.0
    _recent: deque[tuple[float, int]] = field(default_factory=deque)

    def observe(self, now: float, busy: int, queued: int, arrived: int, ready: int) -> None:
        # Like metrics-server: only ready pods report, and a pod cannot be busier
        # than its slots, so the queue is invisible here.
        if ready:
            self._busy += min(busy, ready * self.slots_per_replica)
            self._capacity += ready * self.slots_per_replica

    def desired(self, now: float, current: int, ready: int) -> int:
        busy, capacity = self._busy, self._capacity
        self._busy = self._capacity = 0.0
        if capacity == 0 or ready == 0:
            recommendation = current  # no metrics: HPA does nothing
        else:
            utilisation = busy / capacity
            ratio = utilisation / self.target_utilisation
            if abs(ratio - 1.0) <= self.tolerance:
                recommendation = current
            else:
                # Pods still starting count as idle for scale-up (as in the HPA), so
                # the formula runs over the ready ones only.
                recommendation = math.ceil(ready * ratio - 1e-9)
        recommendation = max(self.min_replicas, min(self.max_replicas, recommendation))
        # Default scale-up policy: at most +100 % or +4 pods per period, whichever is more.
        recommendation = min(recommendation, max(2 * current, current + 4))
        self._recent.append((now, recommendation))
        while self._recent and self._recent[0][0] <= now - self.downscale_window_s:
            self._recent.popleft()
        if recommendation < current:
            # Scale-down stabilisation: the highest recommendation of the last 5 minutes.
            recommendation = min(current, max(n for _, n in self._recent))
        return recommendation


# -- the simulator ------------------------------------------------------------------------


@dataclass
class Result:
    """What one policy did over the trace."""

    name: str
    requests: int
    served: int
    left_waiting: int
    replica_hours: float
    slo_misses: int
    mean_wait_s: float
    p99_wait_s: float
    p999_wait_s: float
    max_wait_s: float
    max_queue: int
    scale_changes: int
    pods_started: int
    peak_replicas: int
    cold_starts_from_zero: int
    #: SLO misses by the trace hour the request arrived in (24 buckets).
    misses_by_hour: list[int] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    #: One (hour, demand req/s, desired, ready, waiting) per minute of the day (--plot).
    timeline: list[ScalingPoint] = field(default_factory=list)

    @property
    def miss_share(self) -> float:
        return self.slo_misses / self.requests if self.requests else 0.0


def _split_service(rng: random.Random, n: int) -> list[int]:
    """Split ``n`` starting requests over the service-time classes.

    Expected counts rounded down, the few left over drawn one by one by the
    class probabilities: exact for single requests (quiet hours), and
    cheap for hundreds per tick where multinomial spread is negligible.
    """
    counts = [int(n * p) for p in SERVICE_P]
    for _ in range(n - sum(counts)):
        counts[rng.choices(range(len(SERVICE_P)), weights=SERVICE_P)[0]] += 1
    return counts


def simulate(
    arrivals: list[int], controller: Controller, cfg: SimConfig, seed: int = 3
) -> Result:
    """Run one policy over per-tick arrivals; a FIFO queue in front of the replicas."""
    rng = random.Random(seed)
    tick = cfg.tick_s
    slots = cfg.slots_per_replica
    cold_ticks = round(cfg.cold_start_s / tick)
    decide_every = max(1, round(controller.interval_s / tick))
    slo_ticks = cfg.slo_wait_s / tick
    ring = [0] * (max(SERVICE_TICKS) + 1)

    ready = controller.initial_replicas
    starting: deque[int] = deque()  # ready-at tick of each starting pod, oldest first
    busy = 0
    queue: deque[list[int]] = deque()  # [arrival tick, count], oldest first
    queued = 0
    wait_hist: dict[int, int] = {}
    misses = served = 0
    misses_by_hour = [0] * 24
    hour_of = len(arrivals) / 24  # ticks per trace hour
    pod_ticks = 0
    max_queue = changes = peak = from_zero = started = 0
    timeline: list[ScalingPoint] = []
    sample_ticks = max(1, len(arrivals) // (24 * 60))  # a minute of the (compressed) day
    window_arrivals = 0

    for t, arrived in enumerate(arrivals):
        while starting and starting[0] <= t:
            starting.popleft()
            ready += 1
        slot = t % len(ring)
        busy -= ring[slot]
        ring[slot] = 0
        if arrived:
            queue.append([t, arrived])
            queued += arrived
        # Draining pods may leave busy above capacity: admit nothing until they finish.
        free = ready * slots - busy
        if free > 0 and queued:
            admit = min(free, queued)
            queued -= admit
            busy += admit
            left = admit
            while left:
                cohort = queue[0]
                take = min(left, cohort[1])
                waited = t - cohort[0]
                wait_hist[waited] = wait_hist.get(waited, 0) + take
                if waited > slo_ticks:
                    misses += take
                    misses_by_hour[int(cohort[0] / hour_of)] += take
                served += take
                left -= take
                cohort[1] -= take
                if cohort[1] == 0:
                    queue.popleft()
            for d, k in zip(SERVICE_TICKS, _split_service(rng, admit), strict=True):
                if k:
                    ring[(t + d) % len(ring)] += k
        max_queue = max(max_queue, queued)

        now = (t + 1) * tick
        controller.observe(now, busy, queued, arrived, ready)
        current = ready + len(starting)
        if (t + 1) % decide_every == 0:
            want = controller.desired(now, current, ready)
            if want != current:
                changes += 1
                if current == 0:
                    from_zero += 1
            if want > current:
                started += want - current
                starting.extend([t + 1 + cold_ticks] * (want - current))
            elif want < current:
                drop = current - want
                # Kubernetes removes pods that are not ready yet first.
                unstarted = min(drop, len(starting))
                for _ in range(unstarted):
                    starting.pop()
                ready -= drop - unstarted
            current = want
        peak = max(peak, current)
        # A removed pod is paid for until its in-flight requests finish.
        pod_ticks += max(current, -(-busy // slots))
        window_arrivals += arrived
        if (t + 1) % sample_ticks == 0:
            timeline.append(ScalingPoint(t / hour_of, window_arrivals / (sample_ticks * tick),
                                         current, ready, queued))
            window_arrivals = 0

    # Requests still queued at the end: count the ones already past the SLO.
    end = len(arrivals)
    for arrived_at, count in queue:
        if end - arrived_at > slo_ticks:
            misses += count
            misses_by_hour[int(arrived_at / hour_of)] += count
    total = sum(arrivals)
    waits = sorted(wait_hist.items())
    mean_wait = sum(w * n for w, n in waits) * tick / served if served else 0.0

    def quantile(q: float) -> float:
        seen = 0
        for w, n in waits:
            seen += n
            if seen >= q * served:
                return w * tick
        return 0.0

    extra = dict(getattr(controller, "reasons", {}))
    return Result(
        name=controller.name,
        requests=total,
        served=served,
        left_waiting=queued,
        replica_hours=pod_ticks * tick / 3600.0,
        slo_misses=misses,
        mean_wait_s=mean_wait,
        p99_wait_s=quantile(0.99),
        p999_wait_s=quantile(0.999),
        max_wait_s=(waits[-1][0] * tick) if waits else 0.0,
        max_queue=max_queue,
        scale_changes=changes,
        pods_started=started,
        peak_replicas=peak,
        cold_starts_from_zero=from_zero,
        misses_by_hour=misses_by_hour,
        extra=extra,
        timeline=timeline,
    )


def mean_service_s(cfg: SimConfig) -> float:
    """Mean service time of the simulated model (what its traits.serviceTimeMs declares)."""
    return sum(d * cfg.tick_s * p for d, p in zip(SERVICE_TICKS, SERVICE_P, strict=True))


def static_peak_replicas(rates: list[float], cfg: SimConfig) -> int:
    """Replicas that carry the busiest minute at the target concurrency per replica."""
    minutes = [sum(rates[i : i + 60]) / len(rates[i : i + 60]) for i in range(0, len(rates), 60)]
    return math.ceil(max(minutes) * mean_service_s(cfg) / cfg.target_concurrency)


def mulambda_policy(cfg: SimConfig, **overrides: float) -> Scaling:
    """The executor scaling spec used for our autoscaler in the benchmark."""
    values: dict[str, float] = {
        "minReplicas": 0,
        "maxReplicas": cfg.max_replicas,
        "targetConcurrency": cfg.target_concurrency,
        "idleWindowSeconds": 300,
        "stableWindowSeconds": 60,
        "panicWindowSeconds": 6,
        "scaleDownDelaySeconds": 30,
    }
    values.update(overrides)
    return Scaling.model_validate(values)


def compare(
    duration_s: int = DAY_S, peak_rps: float = 500.0, seed: int = 7, cfg: SimConfig | None = None
) -> tuple[dict[str, Result], int]:
    """Run the three policies on one trace; returns results and the static fleet size."""
    cfg = cfg or SimConfig()
    rates = load_curve(duration_s, peak_rps, seed)
    arrivals = arrivals_per_tick(rates, cfg.tick_s, seed + 1)
    static_n = static_peak_replicas(rates, cfg)
    service_s = mean_service_s(cfg)
    controllers: list[Controller] = [
        Static(static_n),
        Mulambda(mulambda_policy(cfg), cfg.tick_s, cfg.sample_every_s, cfg.decide_every_s,
                 service_s=service_s, cold_start_s=cfg.cold_start_s),
        # Same scale-down patience as the HPA's 5-minute stabilisation, to show
        # what the comparison owes to the shorter default delay.
        Mulambda(
            mulambda_policy(cfg, scaleDownDelaySeconds=cfg.hpa_downscale_window_s),
            cfg.tick_s, cfg.sample_every_s, cfg.decide_every_s, name="mulambda-d300",
            service_s=service_s, cold_start_s=cfg.cold_start_s,
        ),
        Hpa(
            cfg.slots_per_replica,
            cfg.target_concurrency / cfg.slots_per_replica,
            cfg.max_replicas,
            interval_s=cfg.hpa_sync_s,
            tolerance=cfg.hpa_tolerance,
            downscale_window_s=cfg.hpa_downscale_window_s,
        ),
    ]
    return {c.name: simulate(arrivals, c, cfg, seed + 2) for c in controllers}, static_n


def compare_queue(
    duration_s: int = DAY_S, peak_rps: float = 500.0, seed: int = 7, cfg: SimConfig | None = None
) -> tuple[dict[str, Result], int, SimConfig]:
    """The queue signal's sizing case: the same day as asynchronous tasks of a heavy
    model (about 1 s per item), judged by the share waiting longer than the tasks'
    wait budget. Static peak provisioning and the synchronous policy against
    ``mulambda-queue``: the backlog (operator: ``mulambda.tasks`` stream depth) sized
    to drain within twice the wait budget, with replicas running all their slots (a
    task waiting in the queue needs no latency headroom at the replica)."""
    cfg = replace(cfg or SimConfig(), slo_wait_s=(cfg or SimConfig()).task_wait_s)
    rates = load_curve(duration_s, peak_rps, seed)
    arrivals = arrivals_per_tick(rates, cfg.tick_s, seed + 1)
    static_n = static_peak_replicas(rates, cfg)
    service_s = mean_service_s(cfg)
    controllers: list[Controller] = [
        Static(static_n),
        Mulambda(mulambda_policy(cfg), cfg.tick_s, cfg.sample_every_s, cfg.decide_every_s,
                 service_s=service_s, cold_start_s=cfg.cold_start_s),
        Mulambda(mulambda_policy(cfg, targetConcurrency=cfg.slots_per_replica), cfg.tick_s,
                 cfg.sample_every_s, cfg.decide_every_s, name="mulambda-queue",
                 drain_s=2 * cfg.task_wait_s, service_s=service_s,
                 cold_start_s=cfg.cold_start_s),
    ]
    return ({c.name: simulate(arrivals, c, cfg, seed + 2) for c in controllers}, static_n,
            cfg)


def _report(results: dict[str, Result], static_n: int, cfg: SimConfig, hours: float) -> str:
    base = results["static-peak"]
    lines = [
        f"trace: {hours:g} h, {base.requests:,} requests; replicas: {cfg.slots_per_replica} slots, "
        f"target {cfg.target_concurrency:g} in flight, {cfg.cold_start_s:g} s cold start; "
        f"static fleet {static_n}; SLO: wait > {cfg.slo_wait_s:g} s",
        f"{'policy':<13} {'replica-h':>10} {'x static':>9} {'miss >SLO':>10} {'x static':>9} "
        f"{'mean wait':>10} {'p99 wait':>9} {'p99.9':>7} {'max wait':>9} {'max queue':>10} "
        f"{'changes':>8} {'started':>8} {'loads GB':>9} {'peak':>5} {'x static':>9} "
        f"{'from 0':>7}",
    ]
    for r in results.values():
        miss_ratio = f"{r.miss_share / base.miss_share:9.2f}" if base.miss_share else f"{'n/a':>9}"
        lines.append(
            f"{r.name:<13} {r.replica_hours:10.1f} {r.replica_hours / base.replica_hours:9.3f} "
            f"{100 * r.miss_share:9.3f}% {miss_ratio} {r.mean_wait_s:9.3f}s {r.p99_wait_s:8.1f}s "
            f"{r.p999_wait_s:6.1f}s {r.max_wait_s:8.1f}s {r.max_queue:10d} {r.scale_changes:8d} "
            f"{r.pods_started:8d} {r.pods_started * cfg.model_gb:9.0f} {r.peak_replicas:5d} "
            f"{r.peak_replicas / static_n:9.2f} {r.cold_starts_from_zero:7d}"
        )
    for r in results.values():
        if r.slo_misses:
            worst = sorted(range(24), key=lambda h: -r.misses_by_hour[h])[:4]
            where = ", ".join(
                f"h{h:02d} {r.misses_by_hour[h]:,}" for h in worst if r.misses_by_hour[h]
            )
            lines.append(f"{r.name} SLO misses by trace hour (worst): {where}")
    for r in results.values():
        if r.extra:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(r.extra.items()))
            lines.append(f"{r.name} decisions by reason: {reasons}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=24.0, help="compress the day into this")
    parser.add_argument("--peak", type=float, default=500.0, help="peak requests per second")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-queue", action="store_true",
                        help="skip the queue-signal case (asynchronous tasks)")
    parser.add_argument("--plot", metavar="DIR", type=Path,
                        help="also write DIR/autoscale-day.png, and DIR/autoscale-tasks.png for "
                             "the queue-signal case (needs matplotlib)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cfg = SimConfig()
    results, static_n = compare(int(args.hours * 3600), args.peak, args.seed, cfg)
    print(_report(results, static_n, cfg, args.hours))
    if args.plot is not None:
        picture = plot_scaling_day({name: r.timeline for name, r in results.items()},
                                   args.plot / "autoscale-day.png",
                                   title=f"One simulated day ({args.hours:g} h), peak "
                                         f"{args.peak:g} req/s: demand, replicas, waiting")
        print(f"wrote {picture}")
    if not args.no_queue:
        tasks, static_q, qcfg = compare_queue(int(args.hours * 3600), args.peak, args.seed, cfg)
        print(f"\nqueue signal: the same day as asynchronous tasks of a {qcfg.model_gb:g} GB model "
              f"(about {mean_service_s(qcfg):g} s per item), wait budget {qcfg.task_wait_s:g} s")
        print(_report(tasks, static_q, qcfg, args.hours))
        if args.plot is not None:
            picture = plot_scaling_day(
                {name: r.timeline for name, r in tasks.items()}, args.plot / "autoscale-tasks.png",
                title=f"The same day as asynchronous tasks ({qcfg.model_gb:g} GB model): demand, "
                      "replicas, tasks waiting", waiting="tasks waiting")
            print(f"wrote {picture}")
    print(f"simulated in {time.perf_counter() - started:.1f} s wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
