"""The fresh in-flight read (mulambda.store.leases.InflightReader) when the process, not
the store, is slow: a read that came back is used even if its caller woke up after its
timer; a read that did not come back still gives up at once and backs off."""

from __future__ import annotations

import asyncio
import time

from mulambda.store.leases import InflightReader
from mulambda.store.metadata import MetadataStore

LOAD = ({"ml/a": 2}, {"ml/b": [("b-0", 1e10, 2e10)]})


class BusyProcess:
    """A mirror whose read comes back at once, and then the process is busy with other
    requests past the caller's timeout (a saturated event loop)."""

    def __init__(self, busy: float) -> None:
        self.busy = busy
        self.reads = 0

    async def load(self) -> tuple[dict[str, int], dict[str, list[tuple[str, float, float]]]]:
        self.reads += 1
        await asyncio.sleep(0)
        time.sleep(self.busy)  # noqa: ASYNC251 - on purpose: the event loop runs nothing else
        return LOAD


class SlowStore:
    """A mirror whose read does not come back within the timeout."""

    async def load(self) -> tuple[dict[str, int], dict[str, list[tuple[str, float, float]]]]:
        await asyncio.sleep(10)
        return LOAD


def reader(mirror: object, timeout: float = 0.02) -> InflightReader:
    # Never connects: the mirror is replaced before any read.
    found = InflightReader(MetadataStore.from_url("redis://127.0.0.1:9"), "me", ttl=0.0,
                           timeout=timeout, backoff=5.0)
    found._mirror = mirror  # type: ignore[assignment]
    return found


async def test_a_read_that_came_back_is_used_when_the_caller_woke_up_late():
    mirror = BusyProcess(busy=0.06)
    fresh = reader(mirror)
    assert await fresh.read() == LOAD
    assert await fresh.read() == LOAD  # not backing off: read again
    assert mirror.reads == 2
    fresh.close()


async def test_a_read_that_did_not_come_back_gives_up_at_once_and_backs_off():
    fresh = reader(SlowStore())
    started = time.monotonic()
    assert await fresh.read() is None
    assert await fresh.read() is None  # backing off: no second wait
    assert time.monotonic() - started < 0.5
    fresh.close()
