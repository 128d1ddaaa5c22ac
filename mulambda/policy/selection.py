"""Model selection: (client criteria, store snapshot) -> ranked candidates.

:func:`rank` is pure: no I/O, no clock (``now`` defaults to the snapshot's
``taken_at``), no global random state. The same input always gives the same
output, so the operator, the SDK, the selector API and the simulator agree.

Rules (the defaults live in :class:`Policy`)
--------------------------------------------

**Hard criteria** filter: ``type`` must equal the executor's type; ``input``
and ``output`` must equal the executor's formats when the client gives them.

**Can it serve?** An executor is a *warm* candidate when it is not
``Failed`` and at least one replica has a live (unexpired) heartbeat in state
``Available``: the heartbeat is first-hand and seconds old, while the
record's state is rewritten only every reconcile interval, so a record that
still says ``Pending`` or ``ScaledToZero`` right after a cold start does not
hide a replica that is serving. It is a *cold* (activatable) candidate when
it has no live Available replica and is ``ScaledToZero``, or has
``min_replicas == 0`` and is not ``Failed``. Everything else (Failed;
Pending, Unavailable or Ready without a live Available replica) is rejected
with a reason.

**Expected latency** (milliseconds, what one request would see now)::

    expected = network + service + load
    network  = mean of the smoothed RTT samples from the executor's live
               Available replicas to this client (the Kubernetes Service
               spreads requests over replicas, so the mean is the expectation;
               replicas without a sample are left out of the mean)
    service  = ExecutorRecord.service_time_ms
    load     = service * inflight / (ready * Policy.replica_concurrency)
               inflight = snapshot.inflight[executor], ready = live Available
               replicas (1 for a cold executor, which starts with one)

The load term is a queueing estimate: each request already in flight on a
replica delays a new one by about one service time. It is what keeps every
client from piling onto the single fastest model.

**Missing measurements are normal.** No RTT sample for an executor: the
median of the network latencies known for the other candidates of this
ranking, or ``Policy.default_network_ms`` when none is known. No service
time: the median of the known ones among the candidates, or
``Policy.default_service_time_ms``. No accuracy: the lowest known accuracy
among the candidates (pessimistic, but no penalty to zero), or 1.0 for all
when none is known (then accuracy does not discriminate). A ``min_accuracy``
limit rejects an executor whose accuracy is unknown (it cannot be shown to
meet it). Every fallback is named in the candidate's ``reason``.

**Limits**: ``max_latency_ms`` rejects candidates whose expected latency
(including load, excluding a cold start) exceeds it; ``min_accuracy`` rejects
candidates below it. Weights and limits must be finite numbers (JSON parsers
accept ``NaN`` and ``Infinity``; :class:`Criteria` rejects them).

**Score** in [0, 1], higher is better, from scale-free ratios so two close
models do not get 0 and 1 as min-max normalisation would give them::

    latency_score  = best expected latency among candidates / expected
    accuracy_score = accuracy / best accuracy among candidates
    score = (w_lat * latency_score + w_acc * accuracy_score) / (w_lat + w_acc)

Both weights zero means "no preference": they are treated as 1 and 1.

**Warm preference**: a cold executor needs seconds to start, so its ranking
score is its score minus ``Policy.cold_margin`` (default 0.25): it ranks
first only when it is that much better than every warm candidate, or when
there is no warm candidate at all. A client with ``cold_start="Wait"``
prefers the best model even when cold: no margin. Cold executors that would
beat the first candidate without the margin are listed in
:attr:`Ranking.wake` so callers can signal demand and have them activated.

**Ties** spread load: candidates whose ranking scores are within
``Policy.tie_tolerance`` of the best of their group are ordered by a stable
hash (BLAKE2b, not Python's salted ``hash``) of ``(client, executor, time
bucket)`` where the bucket is ``now // Policy.tie_bucket_seconds``. Different
clients therefore prefer different members of a tie, and one client rotates
among them from bucket to bucket, while the result stays reproducible.
"""

from __future__ import annotations

import functools
import hashlib
import statistics
from collections import Counter
from dataclasses import dataclass, field

from mulambda.store.records import ExecutorRecord, Snapshot

from .criteria import Criteria

# Criteria (defined in .criteria, shared with the store's ClientRecord) is rank's input.
__all__ = ["Candidate", "Criteria", "Policy", "Ranking", "prefilter", "rank"]


@dataclass(frozen=True)
class Policy:
    """Tunable constants of :func:`rank`; the defaults are documented above."""

    default_network_ms: float = 5.0
    default_service_time_ms: float = 20.0
    replica_concurrency: float = 1.0
    cold_margin: float = 0.25
    tie_tolerance: float = 0.02
    tie_bucket_seconds: float = 10.0


DEFAULT_POLICY = Policy()


@dataclass(slots=True)
class Candidate:
    """One executor that can serve the client, with its score and why.

    ``reason`` is built on first access: ranking runs on every request and
    most reasons are never read.
    """

    executor_id: str
    score: float  # ranking score in [-cold_margin, 1]; the list is sorted by it
    expected_latency_ms: float
    accuracy: float | None
    warm: bool
    record: ExecutorRecord = field(repr=False, compare=False)
    network_ms: float = 0.0
    service_ms: float = 0.0
    load_ms: float = 0.0
    raw_score: float = 0.0  # before the cold margin
    assumed_accuracy: float = 0.0  # accuracy used for scoring (after fallback)
    cold_margin: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """Human-readable explanation of the score."""
        parts = [
            f"score {self.raw_score:.3f}",
            f"latency {self.expected_latency_ms:.1f} ms = net {self.network_ms:.1f}"
            f" + service {self.service_ms:.1f} + load {self.load_ms:.1f}",
            f"accuracy {self.assumed_accuracy:.3f}",
        ]
        if not self.warm:
            parts.append(f"cold: -{self.cold_margin:g}" if self.cold_margin else "cold")
        parts.extend(self.notes)
        return "; ".join(parts)

    @property
    def endpoint(self) -> str:
        """REST endpoint of the executor."""
        return self.record.rest


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


def _serving_state(record: ExecutorRecord, live: int) -> tuple[bool | None, str]:
    """(warm?, why) -- warm True/False for candidates, None when it cannot serve."""
    if record.state == "Failed":
        return None, "not serving: state Failed"
    if live > 0:
        # A live Available heartbeat beats a state the operator has not rewritten yet.
        return True, ""
    if record.state == "ScaledToZero" or record.min_replicas == 0:
        return False, ""
    if record.state == "Ready":
        return None, "not serving: Ready but no live Available replica heartbeat"
    return None, f"not serving: state {record.state}"


@functools.lru_cache(maxsize=65536)  # same keys for a whole time bucket: hash once
def _tie_key(client: str, executor: str, bucket: int) -> bytes:
    return hashlib.blake2b(f"{client}|{executor}|{bucket}".encode(), digest_size=8).digest()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _or_fallback(value: float | None, median: float | None, default: float,
                 what: str) -> tuple[float, tuple[str, ...]]:
    """``value``, else the median over the other candidates, else the default; and why."""
    if value is not None:
        return value, ()
    if median is not None:
        return median, (f"no {what}: median of others",)
    return default, (f"no {what}: default",)


def matches(criteria: Criteria, record: ExecutorRecord) -> bool:
    """Whether ``record`` meets the hard criteria (type, input, output)."""
    return (record.type == criteria.type
            and (criteria.input is None or record.input == criteria.input)
            and (criteria.output is None or record.output == criteria.output))


def prefilter(criteria: Criteria, snapshot: Snapshot) -> Snapshot:
    """The part of ``snapshot`` about executors meeting the hard criteria.

    Ranking it gives the same candidates, in the same order, as ranking the
    whole snapshot (fallback medians are computed over candidates only), at a
    fraction of the cost when many executors are of other types. Only
    ``Ranking.rejected`` is shorter; rank the full snapshot to explain an
    empty result.
    """
    keep = {k: v for k, v in snapshot.executors.items() if matches(criteria, v)}
    return Snapshot(
        executors=keep,
        replicas={k: v for k, v in snapshot.replicas.items() if k in keep},
        latency={k: v for k, v in snapshot.latency.items() if k in keep},
        inflight={k: v for k, v in snapshot.inflight.items() if k in keep},
        taken_at=snapshot.taken_at,
    )


def rank(
    criteria: Criteria,
    snapshot: Snapshot,
    *,
    client: str = "",
    now: float | None = None,
    policy: Policy = DEFAULT_POLICY,
) -> Ranking:
    """Rank the executors of ``snapshot`` for ``criteria``; best first.

    ``client`` is the client id: it seeds the tie-break so clients spread
    over equally good executors (the snapshot's latency samples must be the
    ones of this client). ``now`` defaults to ``snapshot.taken_at``. Returns
    a :class:`Ranking` (a list of :class:`Candidate`); when it is empty,
    ``Ranking.explain()`` says why.
    """
    now = snapshot.taken_at if now is None else now
    rejected: dict[str, str] = {}

    # 1. hard criteria and ability to serve
    viable: list[tuple[str, ExecutorRecord, bool, int]] = []
    for eid in sorted(snapshot.executors):
        rec = snapshot.executors[eid]
        if rec.type != criteria.type:
            rejected[eid] = f"wrong type: has {rec.type!r}"
            continue
        if criteria.input is not None and rec.input != criteria.input:
            rejected[eid] = f"wrong input: has {rec.input!r}"
            continue
        if criteria.output is not None and rec.output != criteria.output:
            rejected[eid] = f"wrong output: has {rec.output!r}"
            continue
        live = sum(1 for r in snapshot.replicas.get(eid, ()) if r.state == "Available")
        warm, why = _serving_state(rec, live)
        if warm is None:
            rejected[eid] = why
            continue
        if criteria.min_accuracy is not None:
            if rec.accuracy is None:
                rejected[eid] = "below min accuracy: accuracy unknown"
                continue
            if rec.accuracy < criteria.min_accuracy:
                rejected[eid] = (
                    f"below min accuracy: {rec.accuracy:g} < {criteria.min_accuracy:g}"
                )
                continue
        viable.append((eid, rec, warm, live))

    # 2. measurements, with fallbacks computed over the viable set
    network: dict[str, float | None] = {}
    for eid, _rec, _warm, live in viable:
        samples = snapshot.latency.get(eid)
        known = None
        if samples and live:
            known = [samples[r.pod].ms for r in snapshot.replicas[eid]
                     if r.state == "Available" and r.pod in samples]
        network[eid] = sum(known) / len(known) if known else None
    net_fallback = _median([v for v in network.values() if v is not None])
    svc_fallback = _median(
        [r.service_time_ms for _, r, _, _ in viable if r.service_time_ms is not None]
    )
    acc_known = [r.accuracy for _, r, _, _ in viable if r.accuracy is not None]
    acc_fallback = min(acc_known) if acc_known else None

    # 3. expected latency and limits
    measured: list[tuple[str, ExecutorRecord, bool, float, float, float, float, float,
                         tuple[str, ...]]] = []
    for eid, rec, warm, live in viable:
        net, net_note = _or_fallback(network[eid], net_fallback, policy.default_network_ms,
                                     "RTT sample")
        svc, svc_note = _or_fallback(rec.service_time_ms, svc_fallback,
                                     policy.default_service_time_ms, "service time")
        notes = net_note + svc_note
        inflight = snapshot.inflight.get(eid, 0)
        load = svc * inflight / (max(live, 1) * policy.replica_concurrency)
        expected = net + svc + load
        if criteria.max_latency_ms is not None and expected > criteria.max_latency_ms:
            rejected[eid] = (
                f"over max latency: expected {expected:.1f} ms > {criteria.max_latency_ms:g} ms"
            )
            continue
        acc = rec.accuracy
        if acc is None:
            acc = acc_fallback if acc_fallback is not None else 1.0
            notes += ("accuracy unknown: lowest known" if acc_fallback is not None
                      else "accuracy unknown",)
        measured.append((eid, rec, warm, net, svc, load, expected, acc, notes))

    if not measured:
        return Ranking([], rejected, [], criteria)

    # 4. scores
    w_lat, w_acc = criteria.latency_weight, criteria.accuracy_weight
    if w_lat == 0 and w_acc == 0:
        w_lat = w_acc = 1.0  # no preference at all: weigh both equally
    w_sum = w_lat + w_acc
    best_lat = min(m[6] for m in measured)
    best_acc = max(m[7] for m in measured)
    margin = 0.0 if criteria.cold_start == "Wait" else policy.cold_margin
    cands: list[Candidate] = []
    for eid, rec, warm, net, svc, load, expected, acc, notes in measured:
        lat_score = best_lat / expected if expected > 0 else 1.0
        acc_score = acc / best_acc if best_acc > 0 else 1.0
        score = (w_lat * lat_score + w_acc * acc_score) / w_sum
        cands.append(Candidate(
            eid, round(score if warm else score - margin, 9), expected, rec.accuracy, warm,
            rec, net, svc, load, score, acc, margin, notes,
        ))

    # 5. order, spreading ties with a stable per-client, per-time-bucket hash
    bucket = int(now // policy.tie_bucket_seconds) if policy.tie_bucket_seconds > 0 else 0
    cands.sort(key=lambda c: (-c.score, c.executor_id))
    ordered: list[Candidate] = []
    i = 0
    while i < len(cands):
        j = i + 1
        while j < len(cands) and cands[i].score - cands[j].score <= policy.tie_tolerance:
            j += 1
        group = cands[i:j]
        if len(group) > 1:
            group.sort(key=lambda c: _tie_key(client, c.executor_id, bucket))
        ordered.extend(group)
        i = j

    first = ordered[0].raw_score
    wake = [c.executor_id for c in ordered if not c.warm and c.raw_score > first]
    if not ordered[0].warm:
        wake.insert(0, ordered[0].executor_id)
    return Ranking(ordered, rejected, wake, criteria)
