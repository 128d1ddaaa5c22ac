"""The SDK's submit() and result(), async and sync, against the selector's task API on
loopback, a real redis-server, a worker and the TF Serving REST double."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from mulambda.companion.worker import Worker
from mulambda.sdk import MulambdaClient, MulambdaClientSync, NoMatchingModel, TaskError
from mulambda.selector.app import create_app, selector_server_options
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord
from mulambda.tasks.queue import TaskQueue

from .test_tasks_api import EXECUTOR, MODEL, register
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration


class LoseFirstAnswer:
    """Middleware: the first task submission is handled (the task is queued), then the
    connection is cut before the answer leaves, as a dropped reply would be."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []

        @web.middleware
        async def cut(request: web.Request, handler: Any) -> web.StreamResponse:
            response = await handler(request)
            if request.method == "POST" and request.path.startswith("/v1/tasks/"):
                self.keys.append(request.headers.get("Idempotency-Key"))
                if len(self.keys) == 1:
                    assert request.transport is not None
                    request.transport.close()
            return response

        self.middleware = cut


@pytest.fixture
def lose() -> LoseFirstAnswer:
    return LoseFirstAnswer()


@pytest.fixture
async def selector_url(store: MetadataStore, lose: LoseFirstAnswer) -> AsyncIterator[str]:
    runner = web.AppRunner(create_app(store, cache_ttl=0, middlewares=[lose.middleware]),
                           **selector_server_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    await runner.cleanup()


@pytest.fixture
async def serving(store: MetadataStore) -> AsyncIterator[TFServingDouble]:
    async with TFServingDouble(MODEL) as double:
        stop = asyncio.Event()
        worker = Worker(TaskQueue(store), executor=EXECUTOR, consumer="hp2-0", model=MODEL,
                        serving_url=double.url, concurrency=2, visibility=1.0, drain=1.0,
                        predict_timeout=5.0, ready=lambda: True)
        task = asyncio.create_task(worker.run(stop))
        yield double
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_submit_retries_a_lost_answer_with_its_key_and_the_model_runs_once(
        store, selector_url, serving, lose):
    await register(store)
    async with MulambdaClient(store, "shop/app", selector_url=selector_url) as mu:
        task = await mu.submit([1.0, 2.0])
        done = await mu.result(task.id, wait=10)
    assert task.executor == EXECUTOR and task.replayed  # the second try found the first
    assert len(lose.keys) == 2 and lose.keys[0] == lose.keys[1] is not None
    assert (done.status, done.result) == ("succeeded", {"predictions": [[MODEL], [MODEL]]})
    assert len(serving.requests) == 1


async def test_a_numpy_array_is_submitted_as_the_list_it_holds(store, selector_url, serving):
    import numpy as np

    await register(store)
    async with MulambdaClient(store, "shop/app", selector_url=selector_url) as mu:
        task = await mu.submit(np.array([1.0, 2.0]))
        done = await mu.result(task.id, wait=10)
    assert done.status == "succeeded"
    assert [r["body"] for r in serving.requests] == [{"instances": [1.0, 2.0]}]


async def test_each_submission_gets_its_own_key_unless_the_caller_gives_one(
        store, selector_url, serving, lose):
    await register(store)
    async with MulambdaClient(store, "shop/app", selector_url=selector_url) as mu:
        first = await mu.submit([1.0])  # answer lost once, retried with its key
        second = await mu.submit([1.0])
        mine = await mu.submit([1.0], idempotency_key="order-1")
        again = await mu.submit([2.0], idempotency_key="order-1")
        assert len({first.id, second.id, mine.id}) == 3 and again.id == mine.id
        for t in (first, second, mine):
            assert (await mu.result(t.id, wait=10)).status == "succeeded"
    assert len(serving.requests) == 3


async def test_result_without_wait_answers_at_once_and_errors_are_typed(
        store, selector_url, lose):
    await register(store)
    await store.put_client(ClientRecord(namespace="shop", name="vision", type="image"))
    async with MulambdaClient(store, "shop/app", selector_url=selector_url) as mu:
        task = await mu.submit([1.0])  # no worker: stays pending
        assert (await mu.result(task.id)).status == "pending"
        assert (await mu.tasks.cancel(task.id)).status == "cancelled"
        with pytest.raises(TaskError) as unknown:
            await mu.result("shop~app~" + "0" * 32)
        assert unknown.value.status == 404
    async with MulambdaClient(store, "shop/vision", selector_url=selector_url) as mu:
        with pytest.raises(NoMatchingModel, match="type"):
            await mu.submit([1.0])
    # Not registered at all: the selector's "unknown client" is the same kind of error.
    async with MulambdaClient(store, "shop/ghost", selector_url=selector_url) as mu:
        with pytest.raises(NoMatchingModel, match="not registered"):
            await mu.tasks.submit([1.0])


async def test_the_blocking_client_submits_and_waits(store, selector_url, serving, lose):
    await register(store)
    redis_url = store.redis.get_connection_kwargs()
    url = f"redis://{redis_url['host']}:{redis_url['port']}/0"

    def blocking() -> tuple[str, Any]:
        with MulambdaClientSync(url, "shop/app", prefix=store.prefix,
                                selector_url=selector_url) as mu:
            task = mu.submit([3.0])
            done = mu.result(task.id, wait=10)
            return done.status, done.result

    assert await asyncio.to_thread(blocking) == ("succeeded", {"predictions": [[MODEL]]})
