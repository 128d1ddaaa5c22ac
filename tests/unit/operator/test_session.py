"""The bound on kopf's connections to the API server (operator/k8s/session.py)."""

from __future__ import annotations

import pytest

from mulambda.operator.k8s.session import (
    REQUESTS_IN_FLIGHT,
    WATCHES_PER_NAMESPACE,
    connection_limit,
)


@pytest.mark.parametrize(("namespaces", "limit"), [
    # Cluster-wide: the requests plus one namespace's worth of watches (the whole cluster's
    # watch streams are one per kind).
    ((), REQUESTS_IN_FLIGHT + WATCHES_PER_NAMESPACE),
    (("ml",), REQUESTS_IN_FLIGHT + 2 * WATCHES_PER_NAMESPACE),
    (("a", "b", "c"), REQUESTS_IN_FLIGHT + 4 * WATCHES_PER_NAMESPACE),
    # A pattern may match any number of namespaces, each with its watches: no bound.
    (("team-*",), 0),
    (("a", "team-?"), 0),
    (("[ab]-ml",), 0),
    (("!kube-system",), 0),
])
def test_connection_limit_leaves_room_for_every_watch(namespaces: tuple[str, ...],
                                                      limit: int) -> None:
    assert connection_limit(namespaces) == limit
