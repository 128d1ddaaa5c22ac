"""The backlog the autoscaler reads, against a real redis-server: only queues that may hold
tasks are read, so an idle fleet costs the store one command per tick."""

from __future__ import annotations

import redis.asyncio as aioredis

from mulambda.store.metadata import MetadataStore
from mulambda.tasks.queue import GROUP, TaskQueue
from mulambda.tasks.records import TaskOptions

FLEET = [f"ml/e{i}" for i in range(200)]


async def calls(r: aioredis.Redis) -> dict[str, int]:
    stats = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def submit(queue: TaskQueue, executor: str, task: str) -> None:
    await queue.submit(task, client="apps/c", executor=executor, model="m", body="{}",
                       options=TaskOptions())


async def drain(store: MetadataStore, queue: TaskQueue, executor: str) -> None:
    """What a worker leaves behind once every task's outcome is written."""
    key = queue.queue_key(executor)
    entries = await store.redis.xrange(key)
    await store.redis.xack(key, GROUP, *[e for e, _ in entries])
    await store.redis.xdel(key, *[e for e, _ in entries])


async def test_an_idle_fleet_costs_one_command_and_busy_queues_are_read(store: MetadataStore):
    queue = TaskQueue(store)
    before = await calls(store.redis)
    assert await queue.backlog(FLEET, now=0.0) == {}
    spent = {k: v - before.get(k, 0) for k, v in (await calls(store.redis)).items()}
    assert spent.get("smembers") == 1
    assert spent.get("xlen", 0) == spent.get("xrange", 0) == 0

    await submit(queue, "ml/e7", "t1")
    await submit(queue, "ml/e7", "t2")
    await submit(queue, "ml/e9", "t3")
    found = await queue.backlog(FLEET)
    assert {e: depth for e, (depth, _age) in found.items()} == {"ml/e7": 2, "ml/e9": 1}
    assert all(age >= 0 for _depth, age in found.values())
    assert set(await queue.backlog(["ml/e9", "ml/x"])) == {"ml/e9"}  # only those asked


async def test_a_drained_queue_leaves_the_set_and_a_new_task_brings_it_back(
    store: MetadataStore,
):
    queue = TaskQueue(store)
    await submit(queue, "ml/e1", "t1")
    await drain(store, queue, "ml/e1")
    assert await queue.backlog(FLEET) == {}
    assert await store.redis.smembers(queue.active_key) == set()
    await submit(queue, "ml/e1", "t2")
    assert (await queue.backlog(FLEET))["ml/e1"][0] == 1


async def test_a_task_queued_between_the_read_and_the_removal_is_not_lost(
    store: MetadataStore,
):
    """The removal reads the queue once more after it: a submission racing it is seen."""
    queue = TaskQueue(store)
    await submit(queue, "ml/e1", "t1")
    await drain(store, queue, "ml/e1")
    original = queue._depths
    raced = False

    async def racing(names: list[str]) -> dict[str, tuple[int, int]]:
        nonlocal raced
        if not raced and await store.redis.sismember(queue.active_key, "ml/e1") == 0:
            raced = True  # removed from the set: a submission lands right now
            await submit(queue, "ml/e1", "t2")
            await store.redis.srem(queue.active_key, "ml/e1")  # its SADD came too early
        return await original(names)

    queue._depths = racing  # type: ignore[method-assign]
    found = await queue.backlog(FLEET)
    assert raced and found["ml/e1"][0] == 1
    assert await store.redis.sismember(queue.active_key, "ml/e1") == 1


async def test_a_read_only_reader_leaves_the_set_alone(store: MetadataStore):
    queue = TaskQueue(store)
    await submit(queue, "ml/e1", "t1")
    await drain(store, queue, "ml/e1")
    assert await queue.backlog(FLEET, tidy=False) == {}
    assert await store.redis.smembers(queue.active_key) == {"ml/e1"}
