"""A worker's batched store writes against a real redis-server: a delivered batch is
started in one script, outcomes are written by group commit, and each task keeps its own
guarantees (skipped when final, dead when out of attempts, its outcome written once)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from mulambda.companion.worker import OutcomeWriter, Worker
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import StoreUnavailable
from mulambda.tasks.queue import GROUP, Finished, TaskQueue
from mulambda.tasks.records import Next, Status, TaskOptions, new_task_id, outcome

from support.procs import free_port
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

EXECUTOR, CLIENT, MODEL = "ml/hpt", "shop/app", "half_plus_two"


async def calls(r: aioredis.Redis) -> dict[str, int]:
    """Commands the server ran, by name (a NOSCRIPT refusal is not one)."""
    stats = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) - int(v.get("failed_calls", 0))
            for k, v in stats.items()}


async def submit(queue: TaskQueue, body: str = '{"instances": [1.0]}',
                 max_attempts: int = 3) -> str:
    task_id, _ = await queue.submit(new_task_id(CLIENT), client=CLIENT, executor=EXECUTOR,
                                    model=MODEL, body=body,
                                    options=TaskOptions(max_attempts=max_attempts))
    return task_id


def final(at: float = 1.0) -> str:
    return outcome(Status.SUCCEEDED, worker="pod-0", at=at, result={"predictions": [at]})


async def test_a_batch_is_begun_in_one_command_each_task_decided_on_its_own(
        store: MetadataStore):
    queue = TaskQueue(store)
    runs, done, spent = await submit(queue), await submit(queue), await submit(queue,
                                                                                max_attempts=1)
    await store.redis.hset(queue.task_key(done), "outcome", final())
    await store.redis.hset(queue.task_key(spent), "attempts", "1")
    gone = new_task_id(CLIENT)  # expired: no hash
    before = await calls(store.redis)

    begun = await queue.begin_many([runs, done, spent, gone], "pod-0", now=5.0)

    assert [decision for decision, _, _ in begun] == [Next.RUN, Next.SKIP, Next.DEAD, Next.SKIP]
    assert begun[0][2]["attempts"] == "1" and begun[0][2]["body"] == '{"instances": [1.0]}'
    assert "after 1 attempt" in begun[2][1]
    after = await calls(store.redis)
    assert after["evalsha"] - before.get("evalsha", 0) == 1  # the whole batch
    # Only the task that runs keeps the marks; the others are as they were.
    marked = await queue.get(runs)
    assert (marked["attempts"], marked["started_at"], marked["worker"]) == ("1", "5.0", "pod-0")
    for task_id, attempts in ((done, "0"), (spent, "1")):
        fields = await queue.get(task_id)
        assert fields["attempts"] == attempts and "started_at" not in fields
    assert not await store.redis.exists(queue.task_key(gone))


async def test_a_batch_of_outcomes_is_written_once_and_its_entries_acknowledged(
        store: MetadataStore):
    queue = TaskQueue(store)
    ids = [await submit(queue) for _ in range(3)]
    taken = await queue.read(EXECUTOR, "pod-0", 10, 100)
    await queue.begin_many(ids, "pod-0")
    await store.redis.hset(queue.task_key(ids[1]), "outcome", final(9.0))  # another delivery

    written = await queue.finish_many(EXECUTOR, [
        Finished(entry, task_id, final(float(i)), 60) for i, (entry, task_id) in enumerate(taken)])

    assert written == [True, False, True]
    assert json.loads((await queue.get(ids[1]))["outcome"])["finished_at"] == 9.0  # kept
    assert 0 < await store.redis.ttl(queue.task_key(ids[0])) <= 60
    assert await store.redis.xlen(queue.queue_key(EXECUTOR)) == 0
    assert (await store.redis.xpending(queue.queue_key(EXECUTOR), GROUP))["pending"] == 0
    assert await queue.finish_many(EXECUTOR, []) == []


async def test_the_scripts_are_loaded_again_when_the_store_forgot_them(store: MetadataStore):
    queue = TaskQueue(store)
    task_id = await submit(queue)
    [(entry, _)] = await queue.read(EXECUTOR, "pod-0", 10, 100)
    await store.redis.script_flush()  # what a restarted store knows of them
    [(decision, _, _)] = await queue.begin_many([task_id], "pod-0")
    await store.redis.script_flush()
    assert decision is Next.RUN
    assert await queue.finish(EXECUTOR, entry, task_id, final(), 60)


async def test_outcomes_ready_together_are_written_together(store: MetadataStore):
    queue = TaskQueue(store)
    ids = [await submit(queue) for _ in range(5)]
    taken = await queue.read(EXECUTOR, "pod-0", 10, 100)
    await queue.begin_many(ids, "pod-0")
    writer = OutcomeWriter(queue, EXECUTOR)
    before = await calls(store.redis)

    written = await asyncio.gather(*(writer.write(Finished(entry, task_id, final(), 60))
                                     for entry, task_id in taken[:4]))
    assert written == [True] * 4
    assert (await calls(store.redis))["evalsha"] - before.get("evalsha", 0) == 1
    # One alone is written at once, not held back for company.
    entry, task_id = taken[4]
    assert await asyncio.wait_for(writer.write(Finished(entry, task_id, final(), 60)), 5)
    assert (await calls(store.redis))["evalsha"] - before.get("evalsha", 0) == 2
    assert await store.redis.xlen(queue.queue_key(EXECUTOR)) == 0


async def test_a_failed_outcome_write_fails_every_task_in_it_and_acknowledges_none():
    dead = MetadataStore.from_url(f"redis://127.0.0.1:{free_port()}", prefix="test",
                                  timeout=0.5)
    writer = OutcomeWriter(TaskQueue(dead), EXECUTOR)
    try:
        results = await asyncio.gather(
            *(writer.write(Finished(f"1-{i}", f"t{i}", final(), 60)) for i in range(3)),
            return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        # The writer is not stuck: the next outcome is tried again.
        with pytest.raises(StoreUnavailable):
            await writer.write(Finished("1-9", "t9", final(), 60))
    finally:
        await dead.close()


@pytest.fixture
async def slow_model() -> AsyncIterator[dict[str, Any]]:
    """A TF Serving double; from the ``hold``-th request on, answers wait on ``gate``."""
    state: dict[str, Any] = {"n": 0, "hold": 0, "gate": asyncio.Event(),
                             "held": asyncio.Event()}

    async def on_request() -> None:
        state["n"] += 1
        if state["hold"] and state["n"] >= state["hold"]:
            state["held"].set()
            await state["gate"].wait()

    async with TFServingDouble(MODEL, on_request=on_request) as double:
        state["url"] = double.url
        yield state
    state["gate"].set()


def worker(store: MetadataStore, url: str, registry: CollectorRegistry,
           drain: float = 5.0) -> Worker:
    return Worker(TaskQueue(store), executor=EXECUTOR, consumer="pod-0", model=MODEL,
                  serving_url=url, concurrency=2, visibility=30, drain=drain,
                  predict_timeout=10, ready=lambda: True, registry=registry)


async def test_a_worker_batches_its_store_writes_and_serves_every_task(
        store: MetadataStore, slow_model: dict[str, Any]):
    queue = TaskQueue(store)
    ids = [await submit(queue) for _ in range(20)]
    registry = CollectorRegistry()
    stop = asyncio.Event()
    before = await calls(store.redis)
    run = asyncio.create_task(worker(store, slow_model["url"], registry).run(stop))
    try:
        async with asyncio.timeout(20):
            while registry.get_sample_value("mulambda_companion_tasks_total",  # noqa: ASYNC110
                                            {"outcome": "succeeded"}) != 20:
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await run
    for task_id in ids:
        done = json.loads((await queue.get(task_id))["outcome"])
        assert (done["status"], done["result"], done["attempts"]) == (
            "succeeded", {"predictions": [[MODEL]]}, 1)
    assert await queue.backlog([EXECUTOR]) == {}
    spent = {k: v - before.get(k, 0) for k, v in (await calls(store.redis)).items()}
    # Two scripts per batch at most (start, outcomes), fewer than one per task each.
    assert spent["evalsha"] < 2 * 20 and spent.get("multi", 0) == 0


async def test_a_stopped_worker_writes_what_the_model_answered_and_returns_the_rest(
        store: MetadataStore, slow_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch):
    queue = TaskQueue(store)
    ids = {await submit(queue), await submit(queue)}
    slow_model["hold"] = 2  # the first answer comes at once, the second never
    registry = CollectorRegistry()
    w = worker(store, slow_model["url"], registry, drain=0.2)
    writing, release = asyncio.Event(), asyncio.Event()
    finish_many = w.queue.finish_many

    async def slow_finish(executor: str, finished: list[Finished]) -> list[bool]:
        writing.set()
        await release.wait()  # the store is slow to take this outcome
        return await finish_many(executor, finished)

    monkeypatch.setattr(w.queue, "finish_many", slow_finish)
    stop = asyncio.Event()
    run = asyncio.create_task(w.run(stop))
    async with asyncio.timeout(10):
        await writing.wait()  # one task answered: its outcome is on its way
        await slow_model["held"].wait()  # the other is at the model
        stop.set()
        await asyncio.sleep(0.5)  # past the drain time: the one at the model is cut
        release.set()
        await run
    fields = {task_id: await queue.get(task_id) for task_id in ids}
    [answered] = [t for t in ids if "outcome" in fields[t]]
    [cut] = ids - {answered}
    done = json.loads(fields[answered]["outcome"])
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert fields[cut]["attempts"] == "0" and "started_at" not in fields[cut]
    assert registry.get_sample_value("mulambda_companion_tasks_total",
                                     {"outcome": "returned"}) == 1
    assert registry.get_sample_value("mulambda_companion_tasks_total",
                                     {"outcome": "succeeded"}) == 1
    assert await store.redis.xlen(queue.queue_key(EXECUTOR)) == 1  # the cut one, queued
