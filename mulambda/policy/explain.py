"""Why a client gets the executor it gets: :func:`rank`'s own answer, laid out for people.

:func:`explain` is pure. It ranks the snapshot with :func:`~.selection.rank`
(no ``rng``: the order the operator uses; the SDK and the gateway spread
requests over the near-equal candidates it names) and reads every figure
off the ranking: nothing here scores or estimates latency itself, so the
explanation cannot drift from what routes requests.

For every executor in the snapshot it says either which criterion excluded
it (:data:`CRITERIA`, from the reason ``rank`` gives) or, for a candidate,
its expected latency broken into network, service, load (the requests
ahead of this one) and cold start, its accuracy, the two utilities its
score weighs and the score. :attr:`Explanation.why` says why the winner
won (or why nothing matched). Records a store reader could not decode are
not in a snapshot at all; a caller that knows their ids passes them as
``unreadable`` and they are listed as excluded by ``record``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mulambda.store.records import Snapshot

from .criteria import Criteria
from .experiment import Experiment
from .ranking import DEFAULT_POLICY, Candidate, Policy, Preferences, Ranking
from .rollout import Route
from .selection import near_equal, rank

__all__ = ["CRITERIA", "Explanation", "Verdict", "candidate_line", "candidate_summary",
           "criterion_of", "explain"]

# The start of each reason rank() rejects an executor with -> the criterion that did it.
CRITERIA = {
    "wrong type": "type",
    "wrong input": "input",
    "wrong output": "output",
    "invalid record": "record",
    "not serving": "serving",
    "below min accuracy": "min_accuracy",
    "invalid measurement": "measurement",
    "over max latency": "max_latency",
}
UNREADABLE = ("invalid record: the store holds a value that does not decode "
              "(skipped by every reader)")


def criterion_of(reason: str) -> str:
    """The criterion a rejection ``reason`` of :func:`rank` names (``other`` if none)."""
    return CRITERIA.get(reason.split(":", 1)[0], "other")


@dataclass(frozen=True)
class Verdict:
    """One executor as selection saw it: excluded (``criterion`` set) or a candidate."""

    executor: str
    criterion: str | None  # None for a candidate
    reason: str  # rank's rejection reason, or the candidate's full reason
    candidate: Candidate | None = None
    position: int | None = None  # 1-based place among the candidates

    @property
    def line(self) -> str:
        """One line for a status field or a terminal."""
        if self.candidate is None:
            return f"{self.executor}: excluded by {self.criterion} ({self.reason})"
        return f"#{self.position} {candidate_line(self.candidate)}"

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        if c is None:
            return {"executor": self.executor, "criterion": self.criterion,
                    "reason": self.reason, "line": self.line}
        return {
            "executor": self.executor, "position": self.position, "warm": c.warm,
            "score": _num(c.score), "score_warm": _num(c.raw_score),
            "latency_ms": {"network": _num(c.network_ms), "service": _num(c.service_ms),
                           "load": _num(c.load_ms), "cold_start": _num(c.cold_start_ms),
                           "expected": _num(c.expected_latency_ms)},
            "inflight_per_replica": _num(c.inflight),
            "accuracy": {"declared": _num(c.accuracy), "assumed": _num(c.assumed_accuracy)},
            "utility": {"latency": _num(c.latency_utility),
                        "accuracy": _num(c.accuracy_utility)},
            "over_ceiling": c.over_ceiling, "measured_requests": c.measured,
            "replica": c.replica.pod if c.replica is not None else None,
            "notes": list(c.notes), "reason": c.reason, "line": self.line,
        }


@dataclass(frozen=True)
class Explanation:
    """The ranking for one client, every executor accounted for."""

    client: str
    criteria: Criteria
    preferences: Preferences
    candidates: list[Verdict]  # best first
    excluded: list[Verdict]  # by executor id
    near_equal: list[str]  # the first place, shared: the SDK and gateway spread over these
    wake: list[str]  # cold executors worth activating
    why: str
    taken_at: float
    # How routers split requests beyond the ranking: rollouts of candidates, the Client's
    # experiment (mulambda.policy.rollout), one sentence each.
    routing: list[str] = field(default_factory=list)

    @property
    def winner(self) -> str | None:
        return self.candidates[0].executor if self.candidates else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (finite numbers, rounded to 0.001)."""
        c, p = self.criteria, self.preferences
        return {
            "client": self.client, "winner": self.winner, "why": self.why,
            "criteria": {"type": c.type, "input": c.input, "output": c.output,
                         "max_latency_ms": c.max_latency_ms, "min_accuracy": c.min_accuracy,
                         "cold_start": c.cold_start},
            "preferences": {"latency_weight": _num(p.latency_weight),
                            "accuracy_weight": _num(p.accuracy_weight),
                            "latency_scale_ms": _num(p.scale_ms),
                            "ceiling_ms": _num(p.ceiling_ms)},
            "candidates": [v.to_dict() for v in self.candidates],
            "excluded": [v.to_dict() for v in self.excluded],
            "near_equal": self.near_equal, "wake": self.wake, "routing": self.routing,
            "taken_at": _num(self.taken_at),
        }


def candidate_line(c: Candidate) -> str:
    """``executor: score, latency (parts), accuracy, state`` on one line."""
    return f"{c.executor_id}: {candidate_summary(c)}"


def candidate_summary(c: Candidate) -> str:
    """``score, latency (parts), accuracy, state``: why a candidate ranks where it does."""
    parts = f"net {c.network_ms:.1f} + service {c.service_ms:.1f} + load {c.load_ms:.1f}"
    if c.cold_start_ms:
        parts += f" + cold start {c.cold_start_ms:.0f}"
    state = "warm" if c.warm else "cold"
    if c.over_ceiling:
        state += ", over the latency ceiling"
    return (f"score {c.score:.3f}, {c.expected_latency_ms:.1f} ms ({parts}), "
            f"accuracy {c.assumed_accuracy:.3f}, {state}")


def explain(criteria: Criteria, snapshot: Snapshot, *, client: str = "",
            policy: Policy = DEFAULT_POLICY, now: float | None = None,
            unreadable: Iterable[str] = ()) -> Explanation:
    """Rank ``snapshot`` for ``criteria`` and say, for every executor, why it ranks where it
    does; ``unreadable`` are executor ids whose store record did not decode."""
    ranking = rank(criteria, snapshot, client=client, policy=policy, now=now)
    prefs = Preferences.of(criteria, policy)
    candidates = [Verdict(c.executor_id, None, c.reason, c, i)
                  for i, c in enumerate(ranking, start=1)]
    rejected = dict(ranking.rejected)
    for eid in unreadable:
        if eid not in snapshot.executors:
            rejected[eid] = UNREADABLE
    excluded = [Verdict(eid, criterion_of(why), why) for eid, why in sorted(rejected.items())]
    shared = [c.executor_id for c in near_equal(ranking, criteria, policy)[0]] if ranking else []
    return Explanation(client, criteria, prefs, candidates, excluded, shared,
                       list(ranking.wake), _why(ranking, rejected, shared, prefs),
                       snapshot.taken_at if now is None else now,
                       _routing(ranking, snapshot))


def _routing(ranking: Ranking, snapshot: Snapshot) -> list[str]:
    """What the SDK and the gateway do per request beyond the order: rollout arms of the
    candidates, and the Client's experiment."""
    out = []
    for c in ranking:
        route = Route.of(c.record)
        if route is None:
            continue
        version = f"version {route.version}" if route.version is not None else "a new version"
        if route.strategy == "Shadow":
            out.append(f"{c.executor_id}: Shadow rollout of {version}: the stable version "
                       "answers, a copy of each request goes to the candidate")
        else:
            out.append(f"{c.executor_id}: Canary rollout of {version}: {route.weight}% of "
                       "its requests go to the candidate")
    record = snapshot.client_record
    experiment = Experiment.of(record.experiment if record is not None else None)
    if experiment is not None:
        total = sum(w for _, w in experiment.arms)
        arms = ", ".join(f"{e} {w / total:.0%}" for e, w in experiment.arms)
        key = (f"header {experiment.header}" if experiment.header
               else f"field {experiment.field}" if experiment.field else "X-Mulambda-Key")
        out.append(f"experiment {experiment.id}: each request is assigned an arm ({arms}; "
                   f"sticky by {key}), which goes first while it is a warm candidate")
    return out


def _why(ranking: Ranking, rejected: dict[str, str], shared: list[str],
         prefs: Preferences) -> str:
    if not ranking:
        if any(r == UNREADABLE for r in rejected.values()):
            counts = Counter(criterion_of(r) for r in rejected.values())
            return "no candidate; excluded: " + _counts(counts)
        return ranking.explain()
    win = ranking[0]
    out = _excluded_note(rejected)
    if len(ranking) == 1:
        return f"{win.executor_id} is the only candidate{out}."
    if len(shared) > 1:
        others = ", ".join(shared[1:])
        return (f"{win.executor_id} and {others} are near-equal (scores within the noise of "
                f"the best, {win.score:.3f}): the SDK and the gateway spread requests over "
                f"them by headroom; ranked without spreading, {win.executor_id} is first "
                f"(higher score, then executor id){out}.")
    second = ranking[1]
    cold = (f"; {second.executor_id} is cold (its latency includes a "
            f"{second.cold_start_ms:.0f} ms cold start)" if not second.warm
            and second.cold_start_ms else "")
    if second.over_ceiling and not win.over_ceiling:
        return (f"{win.executor_id} is within the latency ceiling ({prefs.ceiling_ms:g} ms); "
                f"{second.executor_id} expects {second.expected_latency_ms:.1f} ms, over it, "
                f"so it ranks after every candidate within it, whatever its accuracy"
                f"{cold}{out}.")
    total = prefs.latency_weight + prefs.accuracy_weight
    lat_share, acc_share = prefs.latency_weight / total, prefs.accuracy_weight / total
    lat_gain = lat_share * (win.latency_utility - second.latency_utility)
    acc_gain = acc_share * (win.accuracy_utility - second.accuracy_utility)
    decided = "latency" if lat_gain >= acc_gain else "accuracy"
    return (f"{win.executor_id} scores {win.score:.3f} against {second.executor_id}'s "
            f"{second.score:.3f}, decided by {decided}: latency {win.expected_latency_ms:.1f} "
            f"vs {second.expected_latency_ms:.1f} ms (utility {win.latency_utility:.3f} vs "
            f"{second.latency_utility:.3f}, weight {lat_share:.0%}), accuracy "
            f"{win.assumed_accuracy:.3f} vs {second.assumed_accuracy:.3f} (utility "
            f"{win.accuracy_utility:.3f} vs {second.accuracy_utility:.3f}, weight "
            f"{acc_share:.0%}){cold}{out}.")


def _excluded_note(rejected: dict[str, str]) -> str:
    if not rejected:
        return ""
    return f" ({len(rejected)} excluded: {_counts(Counter(map(criterion_of, rejected.values())))})"


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n} by {what}" for what, n in sorted(counts.items()))


def _num(value: float | None) -> float | None:
    """A finite number rounded for JSON; rank never ranks a non-finite one."""
    if value is None:
        return None
    return round(value, 3) if math.isfinite(value) else None
