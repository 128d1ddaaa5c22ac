"""Model selection: (client criteria, store snapshot) -> ranked candidates.

:func:`rank` is pure: no I/O, no clock (``now`` defaults to the snapshot's
``taken_at``), and randomness only from the ``rng`` the caller passes. The
same input (and seed) gives the same output, so the operator, the SDK, the
selector, its gateway and the simulator agree.

Rules (the constants live in :class:`Policy`)
---------------------------------------------

**Hard criteria** filter: ``type`` must equal the executor's type; ``input``
and ``output`` must equal the executor's formats when the client gives them.

**Bad values never rank.** An executor whose record holds NaN, an infinity,
a negative service time or an accuracy outside [0, 1] is rejected with the
reason (the store's decoder already drops such values; records built in
process are checked here too). A latency sample that is not a finite,
non-negative number is ignored. An expected latency that is not finite
rejects the executor.

**Can it serve?** An executor is a *warm* candidate when it is not
``Failed`` and at least one replica has a live (unexpired) heartbeat in state
``Available``, signed by the executor's key when its record has one
(:mod:`mulambda.store.heartbeats`; others do not count): the heartbeat is
first-hand and seconds old, while the record's state is rewritten only every
reconcile interval. It is a *cold*
(activatable) candidate when it has no live Available replica and is
``ScaledToZero``, or has ``min_replicas == 0`` and is not ``Failed``.
Everything else is rejected with a reason.

**Expected latency** (milliseconds, what one request would see now)::

    expected = network + service + load (+ cold start when cold)
    network  = smoothed RTT from the replica to this client (companion
               samples); over the Service: the mean over live replicas
    service  = base + per_item * items        (the measured model,
    load     = per_inflight * k                mulambda.policy.latency);
               beyond the counts it was measured at, each request ahead
               costs at least a measured service time (ServiceModel.load)
    k        = requests ahead of this one per replica:
               timed + others * stay / (stay + network) + own
    timed    = everybody else's requests whose leases say when each should
               be served and back (``Snapshot.inflight_requests``): one is
               ahead while it will still be served when this one arrives
               (now + network / 2 < busy_until) or when it is late (now >=
               back_by: its stay was longer than its sender expected); per
               replica, or spread over the live replicas when it went to
               the Service
    others   = the executor's other in-flight count (requests without
               timing; everybody's when the caller keeps no own count) / live
               replicas; a request counted in flight is on the wire part of
               the time, and is ahead of a new one only while it has not
               been served: about stay / (stay + network) of the time, with
               stay = service + load(others)
    own      = the caller's own requests still ahead at that replica
               (``Snapshot.replica_inflight``, ``replicas=True``; those it
               sent to the Service, in ``Snapshot.own_inflight`` without a
               pod, spread over the live replicas) or at the executor / live
               replicas (``Snapshot.own_inflight``): a router knows when it
               sent each and how long it should stay
    cold     = measured cold start of the executor (mean of what the SDKs
               and gateways measured), else the last one the operator
               measured (``ExecutorRecord.cold_start_ms``), else
               Policy.default_cold_start_ms

The model is fitted from the response times routers measured; the declared
``serviceTimeMs`` is only its prior (base = serviceTimeMs, per_inflight =
serviceTimeMs / replica_concurrency). A request not back when due says
the model is short: the caller's own (``Snapshot.own_late``) and everybody
else's whose lease says what it was sent with (a late timed request)
raise the model this executor is ranked with until it predicts at least
the time each has been served for (:func:`~mulambda.policy.latency.floored`):
a router learns it from another's late request as soon as from its own.
With ``replicas=True`` each live replica is evaluated and the candidate
carries the best one (:attr:`Candidate.replica`, :attr:`Candidate.url`).

**Missing measurements are normal.** No RTT sample: the median of the
network latencies known for the other candidates, or
``default_network_ms``. No declared service time: the median of the
declared ones among the candidates, or ``default_service_time_ms``. No
accuracy: the lowest known accuracy among the candidates, or 1.0 for all.
Every fallback is named in the candidate's ``reason``.

**Limits**: ``max_latency_ms`` rejects candidates whose expected latency
without a cold start exceeds it; ``min_accuracy`` rejects candidates below
it or of unknown accuracy.

**Score** in [0, 1], higher is better, in absolute terms::

    latency_utility  = B / (B + latency)       B = max_latency_ms, else
                                               Policy.latency_scale_ms (100)
    accuracy_utility = accuracy / best accuracy among candidates
    score = (w_lat * latency_utility + w_acc * accuracy_utility) / (w_lat + w_acc)

``latency`` is the expected latency including a cold start (a client with
``cold_start="Wait"`` ranks by the latency once warm). The latency utility
is 1 at zero, halves at the budget and keeps falling: 20 ms against 60 ms
with no budget is 0.83 against 0.63, not a 3x gap, so equal weights pick a
model that is good on both. Both weights zero means equal weights. The latency
weight is raised to at least ``min_latency_share`` (5 %) of both weights' sum (it
then counts 0.05 / 1.05 of the score): among equally accurate candidates the faster
(less loaded) one wins, even for a client that asked for accuracy only.

**Ceiling**: a candidate whose expected latency exceeds the client's
``max_latency_ms`` (for a cold one: with its cold start), or
``Policy.default_max_latency_ms`` (1 s) without one, ranks after every
candidate within it, whatever its accuracy: load awareness applies to every
client. When none is within (models all slower than the ceiling, or all
loaded past it), the ceiling moves to the fastest candidate's expected
latency plus the ceiling: those beyond it rank after the others, each part
by score. Without that, an accuracy-only client would queue for minutes
behind the most accurate of two 1.5 s models while the other is free.

**Wake**: cold candidates whose score once warm beats the first candidate
are listed in :attr:`Ranking.wake`, so callers signal demand and the
autoscaler activates them; the first candidate is listed when it is cold.

**Spreading** (only with ``rng``): candidates whose score is within the
noise band of the best one are near-equal. The band is what a
``latency_noise`` (10 %) error in the best one's expected latency would
change its score by, at most ``tie_tolerance``. One near-equal candidate is
drawn with probability proportional to how far its score is above the
bottom of the band (its spare capacity: the best gets the most, one at the
edge almost none) and put first; the rest keep their order. A candidate
scoring lower beyond the noise is never put first. Without ``rng`` the order
is by score, then executor id.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from mulambda.store.heartbeats import vouched
from mulambda.store.records import ExecutorRecord, ReplicaRecord, ServiceStats, Snapshot

from .criteria import Criteria
from .latency import Late, ServiceModel, fit, floored
from .ranking import DEFAULT_POLICY, Candidate, Policy, Preferences, Ranking
from .spreading import beyond, near_equal, ranked_latency, spread
from .views import explained, mismatch, overlay, prefilter

# rank's inputs and outputs are defined beside it (.criteria, shared with the store's
# ClientRecord; .ranking), and so are the views of a snapshot it ranks (.views): they
# are part of this module's API.
__all__ = ["DEFAULT_POLICY", "Candidate", "Criteria", "Policy", "Preferences", "Ranking",
           "explained", "mismatch", "near_equal", "overlay", "prefilter", "rank"]


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


def _bad_value(record: ExecutorRecord) -> str | None:
    """The impossible value selection reads from ``record``, if any (chained comparisons
    are False for NaN, so NaN fails them)."""
    acc, svc, cold = record.accuracy, record.service_time_ms, record.cold_start_ms
    if acc is not None and not 0 <= acc <= 1:
        return "invalid record: accuracy is not within [0, 1]"
    if svc is not None and not 0 <= svc < math.inf:
        return "invalid record: serviceTimeMs is not a finite non-negative number"
    if cold is not None and not 0 <= cold < math.inf:
        return "invalid record: the last cold start is not a finite non-negative number"
    return None


def _sound(ms: float) -> bool:
    return 0 <= ms < math.inf


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


_UNSET_PRIOR = ServiceModel(0.0, 0.0)  # set by prepare


@dataclass(slots=True)
class Viable:
    """An executor that meets the hard criteria and limits and can serve, with what its
    expected latency needs that does not depend on load (:func:`prepare`)."""

    eid: str
    rec: ExecutorRecord
    warm: bool
    live: list[ReplicaRecord]
    rtt: dict[str, float]  # pod -> sound RTT sample of a live replica
    net: float = 0.0  # mean RTT, or its fallback
    notes: tuple[str, ...] = ()
    model: ServiceModel | None = None
    service: float = 0.0  # base + per-item part for this request's size
    stats: ServiceStats | None = None
    cold: float = 0.0  # cold start added while cold
    accuracy: float = 0.0  # assumed accuracy (after fallback)
    prior: ServiceModel = _UNSET_PRIOR  # the declared time's (or its fallback's)
    fixed_notes: tuple[str, ...] = ()  # the notes that do not depend on measurements
    accuracy_notes: tuple[str, ...] = ()


def prepare(criteria: Criteria, snapshot: Snapshot, policy: Policy = DEFAULT_POLICY,
            items: float = 1.0) -> tuple[list[Viable], dict[str, str]]:
    """Steps 1-2 of :func:`rank`: the viable executors (hard criteria, sound values,
    ability to serve, min accuracy) with their network, service model, cold start and
    accuracy, and the reasons the others were rejected. Reads the snapshot's
    executors, replicas, latency samples and service statistics, not its load."""
    rejected: dict[str, str] = {}
    viable: list[Viable] = []
    for eid in sorted(snapshot.executors):
        rec = snapshot.executors[eid]
        bad = mismatch(criteria, rec) or _bad_value(rec)
        if bad is not None:
            rejected[eid] = bad
            continue
        available = [r for r in snapshot.replicas.get(eid, ()) if r.state == "Available"]
        live = [r for r in available if vouched(rec.heartbeat_key, r, snapshot.taken_at)]
        warm, why = _serving_state(rec, len(live))
        if warm is None:
            if available and not live:
                # Say so: a rotated operator secret or a forger looks like this.
                why = (f"not serving: {len(available)} Available heartbeat(s), none signed "
                       "with the executor's key (docs/security.md T2)")
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
        samples = snapshot.latency.get(eid) or {}
        rtt = {}
        for r in live:
            s = samples.get(r.pod)
            if s is not None and _sound(s.ms):
                rtt[r.pod] = s.ms
        viable.append(Viable(eid, rec, warm, live, rtt))

    # Fallbacks computed over the viable set.
    net_known = [sum(v.rtt.values()) / len(v.rtt) for v in viable if v.rtt]
    net_fallback = _median(net_known)
    svc_fallback = _median([v.rec.service_time_ms for v in viable
                            if v.rec.service_time_ms is not None])
    acc_known = [v.rec.accuracy for v in viable if v.rec.accuracy is not None]
    acc_fallback = min(acc_known) if acc_known else None
    for v in viable:
        rec = v.rec
        mean_rtt = sum(v.rtt.values()) / len(v.rtt) if v.rtt else None
        v.net, notes = _or_fallback(mean_rtt, net_fallback, policy.default_network_ms,
                                    "RTT sample")
        b0, svc_note = _or_fallback(rec.service_time_ms, svc_fallback,
                                    policy.default_service_time_ms, "service time")
        v.prior = ServiceModel(b0, b0 / policy.replica_concurrency, 0.0)
        v.fixed_notes = notes + svc_note
        acc = rec.accuracy
        if acc is None:
            acc = acc_fallback if acc_fallback is not None else 1.0
            v.accuracy_notes = ("accuracy unknown: lowest known" if acc_fallback is not None
                                else "accuracy unknown",)
        v.accuracy = acc
        measured(v, snapshot.service.get(v.eid), policy, items)
    return viable, rejected


def measured(v: Viable, stats: ServiceStats | None, policy: Policy, items: float) -> None:
    """The part of :func:`prepare` that depends on ``v``'s measured statistics: its service
    model, its service time at this size and its cold start (in place)."""
    v.stats = stats
    v.model = fit(stats, v.prior, policy.fit)
    v.service = v.model.base_ms + v.model.per_item_ms * items
    cold_note: tuple[str, ...] = ()
    if not v.warm:
        cold_ms = stats.cold_ms if stats is not None else None
        if cold_ms is None and v.rec.cold_start_ms is not None:
            cold_ms = v.rec.cold_start_ms
            cold_note = ("cold start as the operator last measured it",)
        if cold_ms is None:
            cold_ms = policy.default_cold_start_ms
            cold_note = ("cold start not measured: default",)
        v.cold = cold_ms
    v.notes = v.fixed_notes + cold_note + v.accuracy_notes


def candidate(v: Viable, criteria: Criteria, snapshot: Snapshot, now: float,
              replicas: bool) -> Candidate | str:
    """Step 3 of :func:`rank`: ``v`` under the snapshot's load, unscored; or why the
    limits reject it. Reads only the snapshot's load (``inflight``,
    ``inflight_requests``, ``own_inflight``, ``replica_inflight``, ``own_late``) of
    ``v``."""
    eid, fitted, net, service = v.eid, v.model, v.net, v.service
    assert fitted is not None
    model, notes = fitted, v.notes
    # Everybody else's requests whose timing is known: ahead while still being
    # served when ours would arrive there, or when late (not back when expected).
    timed = snapshot.inflight_requests.get(eid)
    timed_total = 0.0
    timed_pods: dict[str, float] = {}
    maybe_pods: dict[str, float] = {}
    own_late = snapshot.own_late.get(eid) or ()
    others_late: list[Late] = []
    for t in timed or ():
        late_now = now >= t.back_by
        rtt_s = v.rtt.get(t.pod, net) / 1000
        if late_now or now + rtt_s / 2 < t.busy_until:
            timed_total += 1
            if t.pod:
                timed_pods[t.pod] = timed_pods.get(t.pod, 0.0) + 1
            # Due back before ours would arrive (its sender's way back taken as ours):
            # expected served by then, counted for its sender's margin only.
            if t.pod and not late_now and t.back_by <= now + rtt_s:
                maybe_pods[t.pod] = maybe_pods.get(t.pod, 0.0) + 1
        if late_now and t.inflight >= 0:
            others_late.append(Late(t.inflight, t.items, (now - t.back_by) * 1000 + t.stay_ms))
    if own_late or others_late:  # not back when due, the caller's or another's: model short
        model = floored(fitted, [*own_late, *others_late])
        if model is not fitted:
            service += model.base_ms - fitted.base_ms
            notes += (f"service time raised: {len(own_late)} request(s) of this router and "
                      f"{len(others_late)} of others not back when due",)
    ready = max(len(v.live), 1)
    timed_spread = (timed_total - sum(timed_pods.values())) / ready  # sent to the Service
    # Everybody else's requests only counted (some are on the wire): the share
    # still ahead when this one arrives is about stay / (stay + RTT).
    others = snapshot.inflight.get(eid, 0) / ready
    stay = service + model.load(others)
    replica, uncertain = None, 0.0
    if replicas and v.live:
        own = snapshot.replica_inflight.get(eid) or {}
        # The caller's own requests that went to the Service (no pod: a /select answer
        # in flight) are on one replica or another: spread, as those of everybody else.
        own_spread = max(0.0, snapshot.own_inflight.get(eid, 0.0) - sum(own.values())) / ready
        best = None
        for r in v.live:
            net_r = v.rtt.get(r.pod, net)
            k_r = (own.get(r.pod, 0.0) + own_spread + timed_pods.get(r.pod, 0.0) + timed_spread
                   + _still_there(others, stay, net_r))
            e_r = net_r + model.load(k_r)
            if best is None or e_r < best[0]:
                best = (e_r, r, k_r, net_r)
        assert best is not None
        _, replica, k, net = best
        # Whole requests on this replica only: its answer's time can tell whether such a
        # one was ahead (not a share of one spread over replicas), and only by a model
        # that was not raised for late requests (mulambda.policy.inflight.measured_at).
        if model is fitted:
            uncertain = maybe_pods.get(replica.pod, 0.0)
    else:
        k = ((snapshot.own_inflight.get(eid, 0.0) + timed_total) / ready
             + _still_there(others, stay, net))
    load = model.load(k)
    if k > model.measured_to and model.beyond_ms > model.per_inflight_ms:
        notes += (f"{k:.1f} requests ahead, answers measured up to "
                  f"{model.measured_to:.1f}: a service time ({model.beyond_ms:.1f} ms) per "
                  f"request beyond, not the fitted {model.per_inflight_ms:.1f}",)
    steady = net + service + load
    expected = steady + v.cold
    if not math.isfinite(expected):
        return "invalid measurement: expected latency is not finite"
    if criteria.max_latency_ms is not None and steady > criteria.max_latency_ms:
        return f"over max latency: expected {steady:.1f} ms > {criteria.max_latency_ms:g} ms"
    return Candidate(
        eid, 0.0, expected, v.rec.accuracy, v.warm, v.rec, net, service, load, v.cold, 0.0,
        v.accuracy, k, False, replica, model, v.stats.count if v.stats is not None else 0,
        notes, uncertain=uncertain,
    )


def _still_there(others: float, stay: float, net: float) -> float:
    """How many of ``others`` requests only counted (no timing) are still at the replica
    when a new one arrives: the share ``stay / (stay + net)`` of their time there. A model
    that takes no time over no network has none there (and no load to charge for them:
    a stay of 0 with requests counted means a per-inflight cost of 0)."""
    return others * stay / (stay + net) if others and stay + net > 0 else 0.0


def score(c: Candidate, best_accuracy: float, prefs: Preferences, wait: bool) -> None:
    """Step 4 of :func:`rank`: ``c``'s scores and ceiling, its accuracy relative to the
    best candidate's (in place)."""
    ratio = c.assumed_accuracy / best_accuracy if best_accuracy > 0 else 1.0
    steady = c.expected_latency_ms - c.cold_start_ms
    c.raw_score = round(prefs.score(steady, ratio), 9)
    latency = ranked_latency(c, wait)
    c.score = c.raw_score if wait or c.warm else round(prefs.score(latency, ratio), 9)
    c.latency_utility, c.accuracy_utility = prefs.latency_utility(latency), ratio
    c.over_ceiling = latency > prefs.ceiling_ms


def order_key(c: Candidate) -> tuple[bool, float, str]:
    """The order of :func:`rank` without ``rng``: within the ceiling first, by score,
    then executor id."""
    return (c.over_ceiling, -c.score, c.executor_id)


def finish(cands: list[Candidate], rejected: dict[str, str], criteria: Criteria,
           prefs: Preferences, policy: Policy, rng: random.Random | None) -> Ranking:
    """Step 5 of :func:`rank`: ``cands`` (scored, in :func:`order_key` order) with
    near-equal ones spread and the cold ones worth waking listed."""
    if not cands:
        return Ranking([], rejected, [], criteria)
    wait = criteria.cold_start == "Wait"
    limit = beyond(cands, prefs, wait)
    if limit < math.inf:  # stable: by score within each part
        cands.sort(key=lambda c: ranked_latency(c, wait) > limit)
    if rng is not None and len(cands) > 1:
        spread(cands, prefs, policy, rng, wait)
    first = cands[0]
    wake = [c.executor_id for c in cands if not c.warm and c.raw_score > first.score]
    if not first.warm and first.executor_id not in wake:
        wake.insert(0, first.executor_id)
    return Ranking(cands, rejected, wake, criteria)


def rank(
    criteria: Criteria,
    snapshot: Snapshot,
    *,
    client: str = "",
    now: float | None = None,
    policy: Policy = DEFAULT_POLICY,
    items: float = 1.0,
    rng: random.Random | None = None,
    replicas: bool = False,
) -> Ranking:
    """Rank the executors of ``snapshot`` for ``criteria``; best first.

    The snapshot's latency samples must be the ones of ``client`` (kept for
    callers and logs; the order does not depend on it). ``items`` is the
    request's size (``instances``) for the per-item cost. ``rng`` spreads
    near-equal candidates (see the module docstring); without it the order
    is deterministic. ``replicas=True`` evaluates each live replica and puts
    the best one in :attr:`Candidate.replica` (for a router that addresses
    pods). Returns a :class:`Ranking`; when it is empty, ``explain()`` says why.
    (:class:`~mulambda.policy.ranker.Ranker` gives the same answer, keeping
    what did not change between calls.)
    """
    del client  # kept for callers and logs; the order does not depend on it
    now = snapshot.taken_at if now is None else now
    viable, rejected = prepare(criteria, snapshot, policy, items)
    cands: list[Candidate] = []
    for v in viable:
        found = candidate(v, criteria, snapshot, now, replicas)
        if isinstance(found, str):
            rejected[v.eid] = found
        else:
            cands.append(found)
    if not cands:
        return Ranking([], rejected, [], criteria)
    prefs = Preferences.of(criteria, policy)
    wait = criteria.cold_start == "Wait"
    best_acc = max(c.assumed_accuracy for c in cands)
    for c in cands:
        score(c, best_acc, prefs, wait)
    cands.sort(key=order_key)
    return finish(cands, rejected, criteria, prefs, policy, rng)
