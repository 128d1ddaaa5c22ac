"""Parts of a store snapshot that ranking is given: only the executors a criteria can
match (:func:`prefilter`), with a router's own knowledge added (:func:`overlay`), and the
explanation of an empty ranking of such a part (:func:`explained`). Pure.
"""

from __future__ import annotations

from typing import Any, cast

from mulambda.store.records import ExecutorRecord, ServiceStats, Snapshot, TimedRequest

from .criteria import Criteria
from .latency import add_stats
from .ranking import Ranking


def mismatch(criteria: Criteria, record: ExecutorRecord) -> str | None:
    """Why ``record`` fails the hard criteria (type, input, output); None when it meets
    them."""
    if record.type != criteria.type:
        return f"wrong type: has {record.type!r}"
    if criteria.input is not None and record.input != criteria.input:
        return f"wrong input: has {record.input!r}"
    if criteria.output is not None and record.output != criteria.output:
        return f"wrong output: has {record.output!r}"
    return None


def prefilter(criteria: Criteria, snapshot: Snapshot,
              reuse: tuple[Criteria, Snapshot, Snapshot] | None = None) -> Snapshot:
    """The part of ``snapshot`` about executors meeting the hard criteria.

    Ranking it gives the same candidates, in the same order, as ranking the
    whole snapshot (fallback medians are computed over candidates only), at a
    fraction of the cost when many executors are of other types. Only
    ``Ranking.rejected`` is shorter; rank the full snapshot to explain an
    empty result.

    ``reuse`` is the previous call's (criteria, snapshot, result): each part
    of ``snapshot`` that is the very object the previous snapshot had (an
    incremental reader hands out the same dict for a part that did not
    change) is taken from the previous result instead of filtered again.
    """
    previous = (reuse if reuse is not None and reuse[0] == criteria
                and reuse[1].executors is snapshot.executors else None)
    keep = (previous[2].executors if previous is not None else
            {k: v for k, v in snapshot.executors.items() if mismatch(criteria, v) is None})

    def part(name: str) -> dict[str, Any]:
        whole = getattr(snapshot, name)
        if previous is not None and getattr(previous[1], name) is whole:
            return cast(dict[str, Any], getattr(previous[2], name))
        return {k: v for k, v in whole.items() if k in keep}

    return Snapshot(
        executors=keep,
        replicas=part("replicas"),
        latency=part("latency"),
        inflight={k: v for k, v in snapshot.inflight.items() if k in keep},
        taken_at=snapshot.taken_at,
        client_record=snapshot.client_record,
        service=part("service"),
        inflight_requests={k: v for k, v in snapshot.inflight_requests.items() if k in keep},
        own_inflight={k: v for k, v in snapshot.own_inflight.items() if k in keep},
        replica_inflight={k: v for k, v in snapshot.replica_inflight.items() if k in keep},
        own_late={k: v for k, v in snapshot.own_late.items() if k in keep},
    )


def explained(ranking: Ranking, snapshot: Snapshot) -> Ranking:
    """The empty ``ranking`` of a :func:`prefilter` view, with the executors of the whole
    ``snapshot`` that the hard criteria left out added to its rejections, so that
    ``explain()`` names them too. (Ranking the whole snapshot again could find a
    candidate the view's load or limits had ruled out.)"""
    assert not ranking, "only an empty ranking needs explaining"
    rejected = {}
    for eid, record in snapshot.executors.items():
        why = mismatch(ranking.criteria, record)
        if why is not None:
            rejected[eid] = why
    rejected.update(ranking.rejected)
    return Ranking([], rejected, [], ranking.criteria)


def overlay(snapshot: Snapshot, *, own_inflight: dict[str, float] | None = None,
            replica_inflight: dict[str, dict[str, float]] | None = None,
            service: dict[str, ServiceStats] | None = None,
            inflight: dict[str, int] | None = None,
            inflight_requests: dict[str, list[TimedRequest]] | None = None,
            others_service: dict[str, ServiceStats] | None = None,
            own_late: dict[str, list[tuple[float, float, float]]] | None = None,
            ) -> Snapshot:
    """``snapshot`` with a router's own exact knowledge added (a new object).

    ``own_inflight`` / ``replica_inflight``: its own requests still ahead at
    each executor / replica (:class:`~mulambda.policy.inflight.OwnRequests`;
    the snapshot's ``inflight`` must then leave them out, as the store's
    does for the reader's instance); ``service``: its own measured
    statistics (added to everybody else's); ``inflight`` and
    ``inflight_requests``: a fresher view of everybody else's requests than
    the snapshot's (:meth:`~mulambda.store.metadata.MetadataStore.inflight_load`);
    ``others_service``: a fresher view of everybody else's measured statistics
    than the snapshot's (``service`` is added to it); ``own_late``: its own requests
    not back when due (:meth:`~mulambda.policy.inflight.OwnRequests.late`).
    """
    stats = snapshot.service if others_service is None else others_service
    if service:
        stats = dict(stats)
        for e, st in service.items():
            merged = add_stats(stats.get(e), st)
            if merged is not None:
                stats[e] = merged
    return Snapshot(
        snapshot.executors, snapshot.replicas, snapshot.latency,
        snapshot.inflight if inflight is None else inflight, snapshot.taken_at,
        snapshot.client_record, stats,
        snapshot.inflight_requests if inflight_requests is None else inflight_requests,
        snapshot.own_inflight if own_inflight is None else own_inflight,
        snapshot.replica_inflight if replica_inflight is None else replica_inflight,
        snapshot.own_late if own_late is None else own_late,
    )
