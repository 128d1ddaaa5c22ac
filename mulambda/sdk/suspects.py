"""Replicas that failed a request lately, avoided for a while (the SDK's and the gateway's).

A connect failure or a 503 tells about the replica that gave it, not about its
executor: while it is suspect the executor's other replicas serve, and only an
executor whose every live replica failed is offered whole again (better
retried than given up). A failure through the executor's Service (no replica
chosen) makes the whole executor suspect.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

from mulambda.policy.ranking import Candidate
from mulambda.store.records import ReplicaRecord, Snapshot

SERVICE = ""  # the "pod" of a request sent to the executor's Service


def pod_of(candidate: Candidate) -> str:
    return candidate.replica.pod if candidate.replica is not None else SERVICE


class Suspects:
    """(executor, pod) pairs that failed, each for ``seconds`` after its failure."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._until: dict[tuple[str, str], float] = {}
        # Checked per candidate on every request: pruned only once the first one is due,
        # and the replicas among them rebuilt only on a failure or an expiry.
        self._next_expiry = math.inf
        self._pods: frozenset[tuple[str, str]] = frozenset()
        # (the replicas dict filtered, the suspect pods, the result): kept while both are
        # the same, so the Ranker, which keeps its work per replicas dict, keeps it.
        self._kept: tuple[dict[str, list[ReplicaRecord]], frozenset[tuple[str, str]],
                          dict[str, list[ReplicaRecord]]] | None = None

    def add(self, candidate: Candidate) -> None:
        self._until[(candidate.executor_id, pod_of(candidate))] = self.clock() + self.seconds
        self._rebuild()

    def _rebuild(self) -> None:
        self._pods = frozenset(k for k in self._until if k[1] != SERVICE)
        self._next_expiry = min(self._until.values(), default=math.inf)

    def _prune(self) -> None:
        now = self.clock()
        if self._next_expiry <= now:
            self._until = {k: t for k, t in self._until.items() if t > now}
            self._rebuild()

    def __contains__(self, candidate: Candidate) -> bool:
        if not self._until:
            return False
        self._prune()
        eid = candidate.executor_id
        return (eid, pod_of(candidate)) in self._until or (eid, SERVICE) in self._until

    def __bool__(self) -> bool:
        if self._until:
            self._prune()
        return bool(self._until)

    def view(self, snap: Snapshot) -> Snapshot:
        """``snap`` without the suspect replicas (all of an executor's kept when every one
        of them is suspect)."""
        if self._until:
            self._prune()
        pods = self._pods
        if not pods:
            return snap
        kept = self._kept
        if kept is None or kept[0] is not snap.replicas or kept[1] != pods:
            replicas = dict(snap.replicas)
            for eid in {e for e, _pod in pods}:
                live = snap.replicas.get(eid, [])
                healthy = [r for r in live if (eid, r.pod) not in pods]
                if healthy and len(healthy) < len(live):
                    replicas[eid] = healthy
            kept = self._kept = (snap.replicas, pods, replicas)
        return replace(snap, replicas=kept[2])
