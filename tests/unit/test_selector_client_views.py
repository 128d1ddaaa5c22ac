"""The selector's per-client parts: the clients due in one turn of the event loop are read
in one round trip (at most max_batch a round trip), each once; a failed read reaches every
waiter; a caller that gives up cancels nobody else's read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mulambda.selector.caches import ClientViews
from mulambda.store.records import ClientRecord, LatencySample, StoreUnavailable


class Store:
    """Stands in for MetadataStore.client_views: records each round trip's clients."""

    def __init__(self, fail: bool = False, delay: float = 0.0) -> None:
        self.trips: list[list[str]] = []
        self.fail = fail
        self.delay = delay

    async def client_views(self, clients: list[str], max_samples: int | None = None
                           ) -> list[Any]:
        self.trips.append(list(clients))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise StoreUnavailable("metadata store unreachable: test")
        return [({"ml/e": {"e-0": LatencySample(ms=1.0, samples=1)}},
                 ClientRecord(type="t", namespace="shop", name=c.split("/")[1]))
                if c.startswith("shop/") else ({}, None) for c in clients]


async def test_clients_due_together_are_read_in_one_round_trip_each_once():
    store = Store()
    views = ClientViews(store, ttl=60)  # type: ignore[arg-type]
    names = [f"shop/c{i}" for i in range(5)] + ["made-up/x"]
    parts = await asyncio.gather(*(views.get(n) for n in names * 3))
    assert store.trips == [names]
    assert [p[1].name if p[1] else None for p in parts[:6]] == ["c0", "c1", "c2", "c3",
                                                                  "c4", None]
    assert parts[6:12] == parts[:6]  # the same parts for the same names
    await views.get("shop/c0")  # kept: no read
    assert len(store.trips) == 1 and not views._pending


async def test_a_round_trip_reads_at_most_max_batch_clients():
    store = Store()
    views = ClientViews(store, ttl=60, max_batch=4)  # type: ignore[arg-type]
    await asyncio.gather(*(views.get(f"shop/c{i}") for i in range(10)))
    assert [len(t) for t in store.trips] == [4, 4, 2]


async def test_a_failed_read_reaches_every_waiter_and_is_not_kept():
    store = Store(fail=True)
    views = ClientViews(store, ttl=60)  # type: ignore[arg-type]
    results = await asyncio.gather(*(views.get(n) for n in ("shop/a", "shop/b", "shop/a")),
                                   return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    store.fail = False
    assert (await views.get("shop/a"))[1] is not None  # read again
    assert len(store.trips) == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_others_read():
    store = Store(delay=0.05)
    views = ClientViews(store, ttl=60)  # type: ignore[arg-type]
    impatient = asyncio.ensure_future(views.get("shop/a"))
    patient = asyncio.ensure_future(views.get("shop/a"))
    await asyncio.sleep(0.01)
    impatient.cancel()
    assert (await patient)[1] is not None
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_closing_cancels_the_waiters():
    views = ClientViews(Store(delay=10), ttl=60)  # type: ignore[arg-type]
    waiter = asyncio.ensure_future(views.get("shop/a"))
    await asyncio.sleep(0.01)
    views.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not views._pending
