"""Ranking on every request at a cost proportional to what changed (:class:`Ranker`).

A router ranks the same executors for the same criteria many times a
second, and between two calls little changes: the snapshot's records,
heartbeats, latency samples and service statistics are the very same dicts
(the incremental store reader and the selector's shared snapshot hand out the
same object for a part that did not change), and only a few executors have
requests in flight. :func:`~mulambda.policy.selection.rank` redoes all of it
per call; :class:`Ranker` keeps, per (criteria, policy, items, replicas):

* what :func:`~mulambda.policy.selection.prepare` derived from those parts,
  while the parts are the same objects and the signed claims it counted on
  hold (a replica's claim runs out at the snapshot's time, not when its dict
  changes); when only the statistics are
  another dict (a router merges its own measurements into a new one for
  every decision), what depends on them is derived again for the executors
  whose statistics are another object, and those are then evaluated on
  every call like a loaded one (all is built again once they are a
  quarter of the viable ones);
* every viable executor's candidate *without load*, scored, in order: for an
  executor with nothing in flight that is exactly what ``rank`` computes.

Per call only the executors with something in flight (in the snapshot's
``inflight``, ``inflight_requests``, ``own_inflight``, ``replica_inflight`` or
``own_late``)
are evaluated again and inserted into the kept order. When the best accuracy
among the candidates changes (the most accurate one went over its latency
limit, or came back), every score is recomputed. The answer is the one
``rank`` gives (tests compare them on random snapshots and loads); callers
must not change the candidates they get (they are shared between answers).
"""

from __future__ import annotations

import bisect
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from mulambda.store.records import Snapshot

from .criteria import Criteria
from .ranking import DEFAULT_POLICY, Candidate, Policy, Preferences, Ranking
from .selection import Viable, candidate, finish, measured, order_key, prepare, score


@dataclass
class _Kept:
    """What one (criteria, policy, items, replicas) ranking keeps between calls."""

    parts: tuple[object, object, object, object]  # the snapshot dicts it was derived from
    viable: dict[str, Viable]
    rejected: dict[str, str]  # by prepare, and by the limits without load
    unloaded: list[Candidate]  # every candidate without load, in order_key order
    by_accuracy: list[Candidate]  # the same, most accurate first
    scored_for: float  # the best accuracy their scores were computed with
    prefs: Preferences  # the criteria's preferences under the Ranker's policy
    # Re-scored copies of ``unloaded`` for another best accuracy (at most a few kept).
    rescored: dict[float, list[Candidate]] = field(default_factory=dict)
    # Per best accuracy, where each executor is in the list scored for it (built when an
    # executor of it is loaded: taking a few out beats filtering the whole list per call).
    positions: dict[float, dict[str, int]] = field(default_factory=dict)
    # Executors whose statistics changed since ``unloaded`` was built: their entries there
    # are out of date, so every call evaluates them as it does a loaded one.
    remeasured: set[str] = field(default_factory=set)
    # Until when ``viable`` holds with the same parts: the first signed claim it counted
    # on runs out then (prepare() drops a replica whose claim no longer holds).
    until: float = math.inf


def _parts(snapshot: Snapshot) -> tuple[object, object, object, object]:
    return (snapshot.executors, snapshot.replicas, snapshot.latency, snapshot.service)


def _loaded(snapshot: Snapshot, among: dict[str, Viable]) -> set[str]:
    """Executors ``among`` whose candidate the snapshot's load can change."""
    ids = {e for e, n in snapshot.inflight.items() if n and e in among}
    ids.update(e for e, r in snapshot.inflight_requests.items() if r and e in among)
    ids.update(e for e, n in snapshot.own_inflight.items() if n and e in among)
    ids.update(e for e, pods in snapshot.replica_inflight.items() if pods and e in among)
    ids.update(e for e, late in snapshot.own_late.items() if late and e in among)
    return ids


class Ranker:
    """:func:`~mulambda.policy.selection.rank` with what did not change kept between
    calls (see the module docstring); at most ``max_entries`` criteria kept."""

    def __init__(self, policy: Policy = DEFAULT_POLICY, max_entries: int = 256) -> None:
        self.policy = policy
        self.max_entries = max_entries
        self._kept: OrderedDict[tuple[Criteria, float, bool, str], _Kept] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def rank(self, criteria: Criteria, snapshot: Snapshot, *, now: float | None = None,
             items: float = 1.0, rng: random.Random | None = None,
             replicas: bool = False, key: str = "") -> Ranking:
        """What ``rank(criteria, snapshot, now=now, policy=self.policy, items=items,
        rng=rng, replicas=replicas)`` returns.

        What is kept is kept per (criteria, items, replicas, ``key``): a router
        ranking for several clients whose snapshots carry each client's own
        latency samples gives each its own key, so that they do not replace
        each other's."""
        now = snapshot.taken_at if now is None else now
        policy = self.policy
        wait = criteria.cold_start == "Wait"
        kept = self._keep((criteria, items, replicas, key), snapshot, wait)
        prefs = kept.prefs

        loaded = _loaded(snapshot, kept.viable) | kept.remeasured
        rejected = kept.rejected
        fresh: list[Candidate] = []
        if loaded:
            rejected = {e: why for e, why in rejected.items() if e not in loaded}
            for eid in sorted(loaded):
                found = candidate(kept.viable[eid], criteria, snapshot, now, replicas)
                if isinstance(found, str):
                    rejected[eid] = found
                else:
                    fresh.append(found)
        best = next((c.assumed_accuracy for c in kept.by_accuracy
                     if c.executor_id not in loaded), None)
        for c in fresh:
            if best is None or c.assumed_accuracy > best:
                best = c.assumed_accuracy
        if best is None:
            return Ranking([], rejected, [], criteria)
        scored = self._scored(kept, best, prefs, wait)
        cands = list(scored)
        if loaded:
            where = kept.positions.get(best)
            if where is None:
                where = kept.positions[best] = {c.executor_id: i for i, c in enumerate(scored)}
            for i in sorted((where[e] for e in loaded if e in where), reverse=True):
                del cands[i]
        for c in fresh:
            score(c, best, prefs, wait)
            bisect.insort(cands, c, key=order_key)
        return finish(cands, rejected, criteria, prefs, policy, rng)

    def _keep(self, key: tuple[Criteria, float, bool, str], snapshot: Snapshot,
              wait: bool) -> _Kept:
        criteria, items, replicas, _ = key
        kept = self._kept.get(key)
        if kept is not None:
            executors, replicas_, latency, service = kept.parts
            if (executors is snapshot.executors and replicas_ is snapshot.replicas
                    and latency is snapshot.latency and snapshot.taken_at <= kept.until):
                if service is not snapshot.service:
                    self._remeasure(kept, snapshot, items)
                # Once a quarter of them is evaluated on every call, build it all again.
                if len(kept.remeasured) * 4 <= len(kept.viable):
                    self._kept.move_to_end(key)
                    return kept
        prefs = Preferences.of(criteria, self.policy)
        viable, rejected = prepare(criteria, snapshot, self.policy, items)
        # Without load, a candidate depends on none of the snapshot's load nor the clock.
        idle = replace(snapshot, inflight={}, inflight_requests={}, own_inflight={},
                       replica_inflight={}, own_late={})
        unloaded = []
        for v in viable:
            found = candidate(v, criteria, idle, 0.0, replicas)
            if isinstance(found, str):
                rejected[v.eid] = found
            else:
                unloaded.append(found)
        best = max((c.assumed_accuracy for c in unloaded), default=0.0)
        for c in unloaded:
            score(c, best, prefs, wait)
        unloaded.sort(key=order_key)
        until = min((r.claim_until for v in viable if v.rec.heartbeat_key for r in v.live),
                    default=math.inf)
        kept = _Kept(_parts(snapshot), {v.eid: v for v in viable}, rejected, unloaded,
                     sorted(unloaded, key=lambda c: -c.assumed_accuracy), best, prefs,
                     until=until)
        self._kept[key] = kept
        while len(self._kept) > self.max_entries:
            self._kept.popitem(last=False)
        return kept

    def _remeasure(self, kept: _Kept, snapshot: Snapshot, items: float) -> None:
        """Only the statistics changed: derive again what depends on them, per executor
        whose statistics are another object. A router merges its own measurements into
        a new dict for every decision, and each answer changes one executor's: deriving
        every executor again made a decision at 1,000 executors cost 20 ms instead of
        0.5 (bench/selection.py)."""
        for eid, v in kept.viable.items():
            stats = snapshot.service.get(eid)
            if stats is not v.stats:
                measured(v, stats, self.policy, items)
                kept.remeasured.add(eid)
        kept.parts = _parts(snapshot)

    @staticmethod
    def _scored(kept: _Kept, best: float, prefs: Preferences, wait: bool) -> list[Candidate]:
        """The unloaded candidates scored against ``best`` accuracy, in order."""
        if best == kept.scored_for:
            return kept.unloaded
        found = kept.rescored.get(best)
        if found is None:
            found = [replace(c) for c in kept.unloaded]
            for c in found:
                score(c, best, prefs, wait)
            found.sort(key=order_key)
            if len(kept.rescored) >= 4:
                kept.rescored.clear()
                kept.positions = {kept.scored_for: kept.positions[kept.scored_for]
                                  } if kept.scored_for in kept.positions else {}
            kept.rescored[best] = found
        return found
