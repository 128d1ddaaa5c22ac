"""What :func:`mulambda.policy.selection.rank` takes and gives: its tunable constants
(:class:`Policy`), the client's preferences, and the ranked :class:`Candidate` list with
the reasons others were rejected (:class:`Ranking`)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mulambda.store.records import ExecutorRecord, ReplicaRecord

from .criteria import Criteria
from .latency import DEFAULT_FIT, FitSettings, ServiceModel


@dataclass(frozen=True)
class Policy:
    """Tunable constants of :func:`rank`; the defaults are documented above."""

    default_network_ms: float = 5.0
    default_service_time_ms: float = 20.0
    default_cold_start_ms: float = 30_000.0
    replica_concurrency: float = 1.0
    latency_scale_ms: float = 100.0
    default_max_latency_ms: float = 1000.0
    min_latency_share: float = 0.05
    latency_noise: float = 0.1
    tie_tolerance: float = 0.02
    fit: FitSettings = DEFAULT_FIT


DEFAULT_POLICY = Policy()


@dataclass(frozen=True)
class Preferences:
    """A client's weights and latency scale, as :func:`rank` scores with them."""

    latency_weight: float
    accuracy_weight: float
    scale_ms: float
    ceiling_ms: float

    @classmethod
    def of(cls, criteria: Criteria, policy: Policy = DEFAULT_POLICY) -> Preferences:
        w_lat, w_acc = criteria.latency_weight, criteria.accuracy_weight
        if w_lat == 0 and w_acc == 0:
            w_lat = w_acc = 1.0  # no preference at all: weigh both equally
        if not math.isfinite(w_lat + w_acc):
            # Only their ratio counts: two huge weights whose sum overflows would make
            # every score inf / inf = NaN.
            top = max(w_lat, w_acc)
            w_lat, w_acc = w_lat / top, w_acc / top
        # Raised to that share of both weights' sum: an accuracy-only client's latency counts
        # 0.05 / 1.05 (4.8 %) of its score.
        w_lat = max(w_lat, policy.min_latency_share * (w_lat + w_acc))
        budget = criteria.max_latency_ms
        return cls(w_lat, w_acc, budget or policy.latency_scale_ms,
                   budget or policy.default_max_latency_ms)

    def latency_utility(self, latency_ms: float) -> float:
        return self.scale_ms / (self.scale_ms + max(0.0, latency_ms))

    def score(self, latency_ms: float, accuracy_ratio: float) -> float:
        """Score in [0, 1] of a latency and an accuracy relative to the best one."""
        return ((self.latency_weight * self.latency_utility(latency_ms)
                 + self.accuracy_weight * accuracy_ratio)
                / (self.latency_weight + self.accuracy_weight))

    def band(self, latency_ms: float, policy: Policy) -> float:
        """How much a ``latency_noise`` error in ``latency_ms`` moves the score (capped)."""
        share = self.latency_weight / (self.latency_weight + self.accuracy_weight)
        drop = (self.latency_utility(latency_ms)
                - self.latency_utility(latency_ms * (1 + policy.latency_noise)))
        return min(policy.tie_tolerance, share * drop)


@dataclass(slots=True)
class Candidate:
    """One executor that can serve the client, with its score and why.

    ``reason`` is built on first access: ranking runs on every request and
    most reasons are never read.
    """

    executor_id: str
    score: float  # ranking score in [0, 1]; the list is sorted by it (see the ceiling)
    expected_latency_ms: float  # network + service + load (+ cold start when cold)
    accuracy: float | None
    warm: bool
    record: ExecutorRecord = field(repr=False, compare=False)
    network_ms: float = 0.0
    service_ms: float = 0.0  # base + per-item part for this request's size
    load_ms: float = 0.0  # model.load(inflight)
    cold_start_ms: float = 0.0  # added to the expected latency while cold
    raw_score: float = 0.0  # score once warm (without the cold start)
    assumed_accuracy: float = 0.0  # accuracy used for scoring (after fallback)
    inflight: float = 0.0  # requests in flight per replica counted by the load term
    over_ceiling: bool = False
    replica: ReplicaRecord | None = field(default=None, repr=False, compare=False)
    model: ServiceModel | None = field(default=None, repr=False, compare=False)
    measured: int = 0  # requests the service-time model was measured on
    notes: tuple[str, ...] = ()
    # The two terms of the score (mulambda.policy.explain shows them): latency utility of
    # the latency the score ranks by, and accuracy relative to the best candidate's.
    latency_utility: float = 0.0
    accuracy_utility: float = 0.0
    # Of ``inflight``, other routers' requests at ``replica`` (whole ones; none through
    # the Service or with a model raised for late requests) due back before this one
    # would arrive: counted for their senders' margin only, most likely served already.
    # The answer's time tells whether they were ahead (mulambda.policy.inflight.measured_at).
    uncertain: float = 0.0

    @property
    def reason(self) -> str:
        """Human-readable explanation of the score."""
        parts = [
            f"score {self.score:.3f}",
            f"latency {self.expected_latency_ms:.1f} ms = net {self.network_ms:.1f}"
            f" + service {self.service_ms:.1f} + load {self.load_ms:.1f}"
            + (f" + cold start {self.cold_start_ms:.0f}" if self.cold_start_ms else ""),
            f"accuracy {self.assumed_accuracy:.3f}",
            f"{self.inflight:g} in flight per replica",
            (f"service time measured over {self.measured} requests" if self.measured
             else "service time declared, not measured yet"),
        ]
        if not self.warm:
            parts.append("cold")
        if self.over_ceiling:
            parts.append("over the latency ceiling")
        if self.replica is not None:
            parts.append(f"replica {self.replica.pod}")
        parts.extend(self.notes)
        return "; ".join(parts)

    def saving(self, fewer: float) -> float:
        """What ``fewer`` of the requests counted ahead would take off this one's stay."""
        if self.model is None:
            return 0.0
        return self.load_ms - self.model.load(max(self.inflight - fewer, 0.0))

    @property
    def endpoint(self) -> str:
        """REST endpoint of the executor (its Service)."""
        return self.record.rest

    @property
    def url(self) -> str:
        """Where to send a request: the chosen replica's pod IP on the executor's REST
        port when the replica published one, else the executor's Service."""
        if self.replica is None or not self.replica.ip:
            return self.record.rest
        parts = urlsplit(self.record.rest)
        port = parts.port or (443 if parts.scheme == "https" else 8501)
        host = f"[{self.replica.ip}]" if ":" in self.replica.ip else self.replica.ip
        return f"{parts.scheme or 'http'}://{host}:{port}"


class Ranking(list[Candidate]):
    """Candidates best first, plus why the others were left out.

    ``rejected`` maps executor id -> reason for every executor that is not a
    candidate; ``wake`` lists cold executors worth activating.
    """

    def __init__(
        self, candidates: list[Candidate], rejected: dict[str, str], wake: list[str],
        criteria: Criteria,
    ) -> None:
        super().__init__(candidates)
        self.rejected = rejected
        self.wake = wake
        self.criteria = criteria

    def explain(self) -> str:
        """Why nothing matched, for a user (meaningful when the ranking is empty)."""
        c = self.criteria
        want = f"type={c.type!r}"
        if c.input:
            want += f" input={c.input!r}"
        if c.output:
            want += f" output={c.output!r}"
        if not self.rejected:
            return f"no executor is registered (wanted {want})"
        counts = Counter(r.split(":", 1)[0] for r in self.rejected.values())
        summary = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
        examples = "; ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items())[:3])
        return (
            f"no executor matches {want} among {len(self.rejected)} registered "
            f"({summary}); e.g. {examples}"
        )
