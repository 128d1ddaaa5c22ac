"""A submission cut off half-way through its store write (a real redis-server behind a
TCP proxy that drops the connection mid-pipeline)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mulambda.store.metadata import MetadataStore
from mulambda.store.records import StoreUnavailable
from mulambda.tasks.queue import TaskQueue
from mulambda.tasks.records import TaskOptions, new_task_id

from support.procs import RedisServer
from support.tcp_proxy import DroppingProxy

pytestmark = pytest.mark.integration


@pytest.fixture
async def proxy(redis_url: str, redis_server: RedisServer) -> AsyncIterator[DroppingProxy]:
    cutter = await DroppingProxy(redis_server.port).start()
    yield cutter
    await cutter.stop()


async def test_a_submission_cut_half_way_leaves_no_task_and_its_retry_is_queued(
        proxy: DroppingProxy, store: MetadataStore):
    through = MetadataStore.from_url(proxy.url, prefix="test")
    queue = TaskQueue(through)
    options = TaskOptions(ttl_seconds=600)
    try:
        proxy.cut_before(b"XADD")
        first = new_task_id("shop/app")
        with pytest.raises(StoreUnavailable):
            await queue.submit(first, client="shop/app", executor="ml/x", model="m",
                               body="{}", options=options, idempotency_key="k")
        assert proxy.cuts == 1
        # The store holds nothing of it (the HSET before the cut was not applied alone).
        assert not await store.redis.exists(queue.task_key(first))
        # The SDK's retry with the same key gets a task that is queued, not a replay of
        # one that no worker would ever see.
        again = new_task_id("shop/app")
        assert await queue.submit(again, client="shop/app", executor="ml/x", model="m",
                                  body="{}", options=options, idempotency_key="k") == (
            again, True)
        entries = await store.redis.xrange(queue.queue_key("ml/x"))
        assert [fields["task"] for _, fields in entries] == [again]
        assert (await queue.backlog(["ml/x"]))["ml/x"][0] == 1  # (tasks, oldest age)
    finally:
        await through.close()


async def test_a_submission_cut_before_its_task_was_written_gives_its_place_back(
        proxy: DroppingProxy, store: MetadataStore):
    # Cut while taking its Idempotency-Key: nothing was queued, so its place among the
    # Client's open tasks goes back (kept for the task's time to live, a few store
    # hiccups held a Client's whole limit for a day).
    through = MetadataStore.from_url(proxy.url, prefix="test")
    queue = TaskQueue(through)
    options = TaskOptions(ttl_seconds=600, max_open_per_client=1)
    try:
        proxy.cut_before(b"\r\nSET\r\n")  # the command SET, not CLIENT SETINFO
        with pytest.raises(StoreUnavailable):
            await queue.submit(new_task_id("shop/app"), client="shop/app", executor="ml/x",
                               model="m", body="{}", options=options, idempotency_key="k")
        assert proxy.cuts == 1
        assert await store.redis.zcard(queue.open_key("shop/app")) == 0
        again = new_task_id("shop/app")  # the limit of one has room for it
        assert await queue.submit(again, client="shop/app", executor="ml/x", model="m",
                                  body="{}", options=options, idempotency_key="k") == (
            again, True)
    finally:
        await through.close()
