"""Rollouts and A/B experiments as pure decisions (no I/O, randomness only from the caller).

* **Arms.** While a ModelExecutor rolls out a new model version, the new
  version runs as a second Deployment whose companions heartbeat as
  :func:`candidate_id` (``NAMESPACE/NAME-candidate``); the executor's record
  carries a :class:`Route` to it. :func:`route_view` turns a selection
  snapshot into the one a request sees: for a Canary, ``weight`` percent of
  draws see the executor served by the candidate's replicas (its endpoint,
  version, heartbeats and latency samples), the rest the stable ones; a
  Shadow keeps every request on the stable arm and names the candidate's
  replicas as the shadow target. An arm without a live ``Available``
  replica is never chosen: traffic only goes where a model serves.
* **Sticky draws.** :func:`sticky_draw` hashes an assignment key (an end
  user, a session) with a salt into [0, 1): the same key always lands in
  the same arm of one rollout or experiment, different experiments split
  independently.
* **Outcomes.** Routers count per arm: requests, errors, and answered
  requests' latencies in a fixed histogram of :data:`BUCKETS` (geometric,
  ratio 2^(1/4): a percentile read from it is within 19 % of the true
  value), plus, for shadow copies, how many answers were compared with the
  stable arm's and how many disagreed (:func:`agree`). :class:`ArmStats`
  adds them up and gives error rate, p50 and p95.
* **Analysis.** :func:`analyse` decides from the two arms' outcomes and
  the candidate's health whether to wait, advance a step, promote or roll
  back (rules in its docstring).

A/B experiments, which use the same sticky draws and outcomes, are
:mod:`mulambda.policy.experiment`.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mulambda.api.modelexecutor import Analysis
from mulambda.store.records import ExecutorRecord, ReplicaRecord, Snapshot

STABLE, CANDIDATE = "stable", "candidate"
CANDIDATE_SUFFIX = "-candidate"

# Latency histogram: bucket i holds latencies in (BUCKETS[i-1], BUCKETS[i]] ms;
# bucket 0 everything up to BUCKETS[0], the last one everything above BUCKETS[-1].
_RATIO = 2 ** 0.25
BUCKETS: tuple[float, ...] = tuple(0.25 * 2 ** (i / 4) for i in range(77))  # 0.25 ms .. 181 s

# ArmStats' counters besides the latency buckets (what a status field keeps of them).
_COUNTERS = ("requests", "errors", "compared", "disagreed")

# Shadow answers agree with the stable arm's when every number is within
# rtol * |stable| + atol of it and everything else is equal.
AGREE_RTOL = 1e-3
AGREE_ATOL = 1e-6


def candidate_name(executor_name: str) -> str:
    """Name of the candidate's Deployment and Service."""
    return f"{executor_name}{CANDIDATE_SUFFIX}"


def candidate_id(executor_id: str) -> str:
    """Store id the candidate's companions heartbeat under (``NAMESPACE/NAME-candidate``)."""
    return f"{executor_id}{CANDIDATE_SUFFIX}"


@dataclass(frozen=True)
class Route:
    """What routers need to reach a rollout's candidate arm (``ExecutorRecord.rollout``)."""

    id: str  # outcomes are counted per rollout id
    strategy: Literal["Canary", "Shadow"]
    weight: int  # percent of draws that go to the candidate (Canary)
    version: int | None
    rest: str
    grpc: str

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "strategy": self.strategy, "weight": self.weight,
                "version": self.version, "rest": self.rest, "grpc": self.grpc}

    @classmethod
    def of(cls, record: ExecutorRecord) -> Route | None:
        """The record's route, or None (also for a malformed one: routing stays stable)."""
        raw = record.rollout
        if not raw:
            return None
        try:
            strategy, weight = raw["strategy"], raw["weight"]
            if strategy not in ("Canary", "Shadow") or isinstance(weight, bool):
                return None
            version = raw.get("version")
            return cls(str(raw["id"]), strategy, max(0, min(100, int(weight))),
                       int(version) if isinstance(version, int) else None,
                       str(raw["rest"]), str(raw["grpc"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class ArmChoice:
    """Where one request to a rolled-out executor went, for counting its outcome."""

    executor_id: str
    rollout: str
    arm: str  # STABLE | CANDIDATE
    # Shadow: the candidate's live replicas and its route (copy the request there).
    shadow: tuple[ReplicaRecord, ...] = ()
    route: Route | None = field(default=None, compare=False)

    @property
    def subject(self) -> str:
        """Whose outcomes these are (:mod:`mulambda.store.outcomes`)."""
        return f"executor/{self.executor_id}"


def sticky_draw(key: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``key`` and ``salt``."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def _live(replicas: Iterable[ReplicaRecord]) -> tuple[ReplicaRecord, ...]:
    return tuple(r for r in replicas if r.state == "Available")


# Records are ranked many times per snapshot: their route, parsed, and the record as
# the candidate arm shows it, by record object (the record is kept to check identity).
_ARMS: dict[int, tuple[ExecutorRecord, Route | None, ExecutorRecord | None]] = {}
_ARMS_MAX = 8192


def _arms(record: ExecutorRecord) -> tuple[Route | None, ExecutorRecord | None]:
    known = _ARMS.get(id(record))
    if known is not None and known[0] is record:
        return known[1], known[2]
    route = Route.of(record)
    shown = (replace(record, rest=route.rest, grpc=route.grpc, version=route.version)
             if route is not None else None)
    if len(_ARMS) >= _ARMS_MAX:
        _ARMS.clear()
    _ARMS[id(record)] = (record, route, shown)
    return route, shown


def route_view(view: Snapshot, source: Snapshot, draw: Callable[[str], float],
               force_stable: frozenset[str] = frozenset()) -> tuple[Snapshot, dict[str, ArmChoice]]:
    """The snapshot one request sees, and the arm chosen per rolled-out executor.

    ``view`` is what will be ranked (possibly prefiltered); ``source`` the full
    snapshot holding the candidates' heartbeats and latency samples;
    ``draw(route_id)`` a number in [0, 1) (random, or :func:`sticky_draw` of
    the request's key). ``force_stable``: executors whose candidate just
    failed this request. Without any rollout the view is returned as is.
    """
    choices: dict[str, ArmChoice] = {}
    executors: dict[str, ExecutorRecord] | None = None
    replicas = latency = None
    for eid, record in view.executors.items():
        if record.rollout is None:
            continue
        route, shown = _arms(record)
        if route is None or shown is None:
            continue
        cid = candidate_id(eid)
        canary = (route.strategy == "Canary" and eid not in force_stable
                  and draw(route.id) * 100 < route.weight)
        live = _live(source.replicas.get(cid, ())) if canary or route.strategy == "Shadow" else ()
        if canary and live:
            if executors is None:
                executors, replicas, latency = (dict(view.executors), dict(view.replicas),
                                                dict(view.latency))
            assert replicas is not None and latency is not None
            executors[eid] = shown
            replicas[eid] = list(source.replicas.get(cid, ()))
            latency[eid] = source.latency.get(cid, {})
            choices[eid] = ArmChoice(eid, route.id, CANDIDATE, route=route)
        else:
            shadow = live if route.strategy == "Shadow" else ()
            choices[eid] = ArmChoice(eid, route.id, STABLE, shadow, route)
    if executors is None:
        return view, choices
    assert replicas is not None and latency is not None
    return replace(view, executors=executors, replicas=replicas, latency=latency), choices


def shadow_url(choice: ArmChoice, pick: float) -> str | None:
    """Where to copy a request of a Shadow rollout: one of the candidate's live replicas
    (``pick`` in [0, 1)), its pod address on the REST port, else its Service."""
    if not choice.shadow or choice.route is None:
        return None
    replica = choice.shadow[min(len(choice.shadow) - 1, int(pick * len(choice.shadow)))]
    rest = choice.route.rest
    if not replica.ip:
        return rest
    scheme, _, rest_host = rest.partition("://")
    port = rest_host.rsplit(":", 1)[1] if ":" in rest_host else "8501"
    host = f"[{replica.ip}]" if ":" in replica.ip else replica.ip
    return f"{scheme or 'http'}://{host}:{port}"


# -- outcomes ----------------------------------------------------------------------


def bucket_of(ms: float) -> int:
    """Histogram bucket of a latency in ms."""
    return min(len(BUCKETS), bisect_left(BUCKETS, ms))


def percentile(counts: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a bucket histogram, interpolated geometrically inside
    its bucket; None when it is empty."""
    total = sum(n for n in counts.values() if n > 0)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i in sorted(counts):
        n = counts[i]
        if n <= 0:
            continue
        if seen + n >= rank:
            low = BUCKETS[i - 1] if 0 < i <= len(BUCKETS) else (BUCKETS[0] / _RATIO if i == 0
                                                                 else BUCKETS[-1])
            high = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1] * _RATIO
            share = (rank - seen) / n
            return float(low * (high / low) ** share)
        seen += n
    return BUCKETS[-1]


@dataclass(frozen=True)
class ArmStats:
    """One arm's outcomes: requests, errors, answered latencies (bucket -> count), and
    for shadow copies the answers compared with the stable arm's and those that differed."""

    requests: int = 0
    errors: int = 0
    buckets: Mapping[int, int] = field(default_factory=dict)
    compared: int = 0
    disagreed: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def disagreement_rate(self) -> float:
        return self.disagreed / self.compared if self.compared else 0.0

    @property
    def p50(self) -> float | None:
        return percentile(self.buckets, 0.5)

    @property
    def p95(self) -> float | None:
        return percentile(self.buckets, 0.95)

    def counts(self) -> dict[str, Any]:
        """The counts as a status field keeps them, for :meth:`minus` later."""
        return {**{k: getattr(self, k) for k in _COUNTERS},
                "buckets": {str(i): n for i, n in sorted(self.buckets.items()) if n > 0}}

    def minus(self, earlier: Mapping[str, Any] | None) -> ArmStats:
        """What was counted since ``earlier`` (:meth:`counts`); all of it when there is
        none, or when it is not the counts of an earlier moment of the same rollout (a
        malformed one, or one with more of something than now)."""
        try:
            then = {k: int(earlier[k]) for k in _COUNTERS}  # type: ignore[index]
            then_buckets = {int(i): int(n) for i, n in dict(earlier["buckets"]).items()}  # type: ignore[index]
        except (KeyError, TypeError, ValueError):  # None, {}, or not numbers
            return self
        since = {k: getattr(self, k) - then[k] for k in _COUNTERS}
        buckets = {i: n - then_buckets.get(i, 0) for i, n in self.buckets.items()}
        if (min([*since.values(), *buckets.values(), 0]) < 0
                or set(then_buckets) - set(self.buckets)):
            return self
        return ArmStats(buckets={i: n for i, n in buckets.items() if n > 0}, **since)

    def summary(self) -> dict[str, Any]:
        """What ``status.rollout.arms.ARM`` shows."""
        out: dict[str, Any] = {"requests": self.requests, "errors": self.errors,
                               "errorRate": round(self.error_rate, 4)}
        for name, value in (("p50Ms", self.p50), ("p95Ms", self.p95)):
            if value is not None:
                out[name] = round(value, 2)
        if self.compared:
            out["compared"], out["disagreed"] = self.compared, self.disagreed
        return out


def agree(a: Any, b: Any, rtol: float = AGREE_RTOL, atol: float = AGREE_ATOL) -> bool:
    """Whether a shadow answer ``a`` matches the stable answer ``b``: same shape, numbers
    within ``rtol * |b| + atol``, everything else equal."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if not (math.isfinite(a) and math.isfinite(b)):
            return a == b or (math.isnan(a) and math.isnan(b))
        return abs(a - b) <= rtol * abs(b) + atol
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(agree(x, y, rtol, atol) for x, y in zip(a, b,
                                                                                strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(agree(a[k], b[k], rtol, atol) for k in a)
    return bool(a == b)


# -- analysis ----------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """The candidate's replicas as their heartbeats say."""

    available: int = 0
    failed_reason: str = ""  # a Failed replica's reason, when none is Available
    failed_message: str = ""

    @classmethod
    def of(cls, heartbeats: Iterable[ReplicaRecord]) -> Health:
        beats = list(heartbeats)
        available = sum(1 for r in beats if r.state == "Available")
        failed = next((r for r in beats if r.state == "Failed"), None)
        if available or failed is None:
            return cls(available)
        return cls(0, failed.reason or "LoadFailed", failed.message)


Action = Literal["Wait", "Advance", "Promote", "RollBack"]


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str  # CamelCase, shown in status and the Event
    message: str


def analyse(thresholds: Analysis, stable: ArmStats, candidate: ArmStats, health: Health, *,
            step_seconds: float, total_seconds: float, last_step: bool,
            recent: tuple[ArmStats, ArmStats] | None = None) -> Verdict:
    """What to do with a rollout now. ``stable`` and ``candidate``: the arms' outcomes in
    this step; ``recent``: theirs in the recent window (since it was last judged).

    1. A candidate replica Failed and none Available: roll back (its reason).
    2. Nothing Available after ``progressDeadlineSeconds``: roll back.
    3. With at least ``minRequests`` to the candidate in the recent window: roll
       back when those break a threshold (below). A failure that starts late in
       a step is not diluted by the step's earlier good traffic: counted over
       the whole rollout, a candidate failing every request for the last 15 s
       of its last step was promoted.
    4. With at least ``minRequests`` to the candidate in this step: roll back
       when its error rate exceeds the stable one's by more than
       ``maxErrorRateIncrease``, when its p95 exceeds the stable p95 times
       ``maxP95Ratio``, or (shadow) when more than ``maxDisagreementRate`` of
       compared answers differed; else, once the step has lasted
       ``durationSeconds``, advance (promote after the last step).
    5. Otherwise wait.
    """
    t = thresholds
    if health.failed_reason:
        return Verdict("RollBack", "CandidateFailed",
                       f"the new version failed: {health.failed_reason}"
                       + (f": {health.failed_message}" if health.failed_message else ""))
    if not health.available:
        if total_seconds >= t.progress_deadline_seconds:
            return Verdict("RollBack", "ProgressDeadlineExceeded",
                           f"no replica of the new version served within "
                           f"{t.progress_deadline_seconds}s")
        return Verdict("Wait", "WaitingForCandidate", "the new version is not serving yet")
    if recent is not None and recent[1].requests >= t.min_requests:
        breach = _breach(t, *recent, "since the last analysis")
        if breach is not None:
            return breach
    if candidate.requests < t.min_requests:
        return Verdict("Wait", "Analysing", f"{candidate.requests}/{t.min_requests} requests "
                       "to the new version in this step so far")
    breach = _breach(t, stable, candidate, "in this step")
    if breach is not None:
        return breach
    if step_seconds < t.duration_seconds:
        return Verdict("Wait", "Analysing", f"within thresholds for {step_seconds:.0f}/"
                       f"{t.duration_seconds}s over {candidate.requests} requests")
    if last_step:
        return Verdict("Promote", "AnalysisPassed",
                       f"within thresholds for {t.duration_seconds}s over "
                       f"{candidate.requests} requests")
    return Verdict("Advance", "StepPassed", f"within thresholds for {t.duration_seconds}s")


def baseline(window: ArmStats, whole: ArmStats, min_requests: int) -> ArmStats:
    """The stable arm's outcomes a candidate's window is compared with: the same window's
    when it holds at least ``min_requests``, else the whole rollout's. A 100 % step sends
    the stable arm nothing: its empty window read as a 0 % error rate rolled back a
    candidate as good as the stable version, and left no p95 to compare latency with."""
    return window if window.requests >= min_requests else whole


def _breach(t: Analysis, stable: ArmStats, candidate: ArmStats, when: str) -> Verdict | None:
    """A roll back when the candidate's outcomes break a threshold, else None."""
    over = f"over {candidate.requests} requests {when}"
    increase = candidate.error_rate - stable.error_rate
    if increase > t.max_error_rate_increase:
        return Verdict("RollBack", "ErrorRateExceeded",
                       f"error rate {candidate.error_rate:.1%} vs {stable.error_rate:.1%} "
                       f"(+{increase:.1%} > +{t.max_error_rate_increase:.1%}) {over}")
    c95, s95 = candidate.p95, stable.p95
    if c95 is not None and s95 is not None and c95 > s95 * t.max_p95_ratio:
        return Verdict("RollBack", "LatencyExceeded",
                       f"p95 {c95:.1f} ms vs {s95:.1f} ms (x{c95 / s95:.2f} > "
                       f"x{t.max_p95_ratio:g}) {over}")
    if (t.max_disagreement_rate is not None and candidate.compared
            and candidate.disagreement_rate > t.max_disagreement_rate):
        return Verdict("RollBack", "DisagreementExceeded",
                       f"{candidate.disagreement_rate:.1%} of {candidate.compared} answers "
                       f"differ from the stable version's (> {t.max_disagreement_rate:.1%}) "
                       f"{when}")
    return None
