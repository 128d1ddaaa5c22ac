"""The task API on the selector, its queue on a real redis-server, and the worker
(companion/worker.py) calling the TF Serving REST double."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from mulambda.companion.worker import Worker
from mulambda.selector.app import create_app, selector_server_options
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, ExecutorRecord, ReplicaRecord
from mulambda.tasks.queue import TaskQueue, TooManyTasks
from mulambda.tasks.records import Status, TaskOptions, new_task_id, outcome

from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

EXECUTOR = "ml/hp2"
MODEL = "half_plus_two"
OPTIONS = TaskOptions(max_payload_bytes=4096, ttl_seconds=600, result_ttl_seconds=60,
                      max_attempts=3)


async def register(store: MetadataStore, *, state: str = "Ready", live: bool = True,
                   min_replicas: int = 1) -> None:
    await store.put_executor(ExecutorRecord(
        namespace="ml", name="hp2", model=MODEL, version=1, type="regression",
        input="tensor", output="tensor", accuracy=0.9, rest="http://hp2.ml:8501",
        grpc="hp2.ml:8500", state=state, min_replicas=min_replicas, service_time_ms=5))
    if live:
        await store.put_replica(ReplicaRecord(executor=EXECUTOR, pod="hp2-0",
                                              state="Available", version=1), ttl=60)
    await store.put_client(ClientRecord(namespace="shop", name="app", type="regression"))


async def eventually(check: Callable[[], Any], within: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or check}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def api(store: MetadataStore) -> AsyncIterator[httpx.AsyncClient]:
    runner = web.AppRunner(create_app(store, cache_ttl=0, tasks=OPTIONS),
                           **selector_server_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        yield http
    await runner.cleanup()


@pytest.fixture
async def double() -> AsyncIterator[TFServingDouble]:
    async with TFServingDouble(MODEL) as d:
        yield d


@pytest.fixture
async def worker(store: MetadataStore, double: TFServingDouble) -> AsyncIterator[
    Callable[..., Worker]
]:
    """Factory: a worker for ml/hp2 running in this loop until the test ends."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start(pod: str = "hp2-0", **kw: Any) -> Worker:
        options: dict[str, Any] = {"concurrency": 2, "visibility": 1.0, "drain": 1.0,
                                   "predict_timeout": 5.0, **kw}
        w = Worker(TaskQueue(store), executor=EXECUTOR, consumer=pod, model=MODEL,
                   serving_url=double.url, ready=lambda: True, **options)
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(w.run(stop))))
        return w

    yield start
    for stop, task in running:
        stop.set()
        await asyncio.wait_for(task, 10)


async def status(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    resp = await api.get(f"/v1/tasks/{task_id}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def finished(api: httpx.AsyncClient, task_id: str, within: float = 10.0
                   ) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        s = await status(api, task_id)
        return s if s["status"] in ("succeeded", "failed", "cancelled") else None

    return dict(await eventually(done, within, f"task {task_id} finished"))


async def test_submitted_task_is_answered_by_the_executors_worker(api, store, double, worker):
    await register(store)
    resp = await api.post("/v1/tasks/shop/app", json={"instances": [1.0, 2.0]})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["executor"] == EXECUTOR
    assert body["status_url"] == f"/v1/tasks/{body['id']}" == resp.headers["Location"]
    assert (await status(api, body["id"]))["status"] == "pending"

    worker()
    done = await finished(api, body["id"])

    assert done["status"] == "succeeded"
    assert done["result"] == {"predictions": [[MODEL], [MODEL]]}
    assert done["attempts"] == 1 and done["worker"] == "hp2-0"
    assert [r["body"] for r in double.requests] == [{"instances": [1.0, 2.0]}]
    assert await TaskQueue(store).backlog([EXECUTOR]) == {}


async def test_idempotency_key_returns_the_same_task_and_runs_the_model_once(
        api, store, double, worker):
    await register(store)
    headers = {"Idempotency-Key": "order-17"}
    first = await api.post("/v1/tasks/shop/app", json={"instances": [1.0]}, headers=headers)
    again = await api.post("/v1/tasks/shop/app", json={"instances": [1.0]}, headers=headers)
    other = await api.post("/v1/tasks/shop/app", json={"instances": [1.0]},
                           headers={"Idempotency-Key": "order-18"})
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json()["id"] == again.json()["id"] != other.json()["id"]
    assert (first.headers["Idempotent-Replayed"], again.headers["Idempotent-Replayed"]) == (
        "false", "true")

    worker()
    await finished(api, first.json()["id"])
    await finished(api, other.json()["id"])
    assert len(double.requests) == 2


async def test_a_replay_answers_with_its_tasks_executor_whatever_is_selected_now(
        api, store):
    await register(store)
    headers = {"Idempotency-Key": "order-19"}
    first = await api.post("/v1/tasks/shop/app", json={"instances": [1.0]}, headers=headers)
    assert first.json()["executor"] == EXECUTOR
    # A better executor now, then none at all: the replay names the task's own.
    await store.put_executor(ExecutorRecord(
        namespace="ml", name="better", model=MODEL, version=1, type="regression",
        input="tensor", output="tensor", accuracy=0.99, rest="http://better.ml:8501",
        grpc="", state="Ready", service_time_ms=1))
    await store.put_replica(ReplicaRecord(executor="ml/better", pod="better-0",
                                          state="Available", version=1), ttl=60)
    again = await api.post("/v1/tasks/shop/app", json={"instances": [1.0]}, headers=headers)
    fresh = await api.post("/v1/tasks/shop/app", json={"instances": [1.0]})
    assert fresh.json()["executor"] == "ml/better"  # what selection picks now
    await store.remove_executor("ml/better")
    await store.remove_executor(EXECUTOR)
    gone = await api.post("/v1/tasks/shop/app", json={"instances": [1.0]}, headers=headers)
    for replay in (again, gone):
        assert replay.status_code == 202, replay.text
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.json() == first.json()


async def test_concurrent_retries_with_one_key_make_one_task(api, store, double, worker):
    await register(store)
    answers = await asyncio.gather(*(
        api.post("/v1/tasks/shop/app", json={"instances": [1.0]},
                 headers={"Idempotency-Key": "burst-1"}) for _ in range(10)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert [a.headers["Idempotent-Replayed"] for a in answers].count("false") == 1
    worker()
    await finished(api, answers[0].json()["id"])
    assert len(double.requests) == 1
    assert await TaskQueue(store).backlog([EXECUTOR]) == {}


async def test_a_retry_racing_its_original_waits_for_the_originals_task(store):
    queue = TaskQueue(store)
    earlier = new_task_id("shop/app")
    # The original submission took the key; its task lands 30 ms later.
    await store.redis.set(queue.idempotency_key("shop/app", "k"), earlier)

    async def original_lands() -> None:
        await asyncio.sleep(0.03)
        await store.redis.hset(queue.task_key(earlier), mapping={"client": "shop/app"})

    got, _ = await asyncio.gather(
        queue.submit(new_task_id("shop/app"), client="shop/app", executor=EXECUTOR,
                     model=MODEL, body="{}", options=OPTIONS, idempotency_key="k"),
        original_lands())
    assert got == (earlier, False)
    assert await queue.backlog([EXECUTOR]) == {}  # nothing queued twice


async def test_a_key_whose_task_is_gone_starts_over(store):
    queue = TaskQueue(store)
    gone = new_task_id("shop/app")
    await store.redis.set(queue.idempotency_key("shop/app", "k"), gone)
    fresh = new_task_id("shop/app")
    got = await queue.submit(fresh, client="shop/app", executor=EXECUTOR, model=MODEL,
                             body="{}", options=OPTIONS, idempotency_key="k")
    assert got == (fresh, True)
    assert await store.redis.get(queue.idempotency_key("shop/app", "k")) == fresh


async def test_payload_over_the_limit_is_413_with_a_json_error(api, store):
    await register(store)
    resp = await api.post("/v1/tasks/shop/app", content=b'{"instances": [' + b"1," * 4096
                          + b"1]}", headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    assert "4096 bytes" in resp.json()["error"]
    assert await TaskQueue(store).backlog([EXECUTOR]) == {}


@pytest.mark.parametrize(("body", "headers", "code", "words"), [
    (b"{not json", {}, 400, "not valid JSON"),
    (b'{"instances": [1]}', {"Idempotency-Key": "x" * 300}, 400, "Idempotency-Key"),
    # JSON, but not a predict request: refused now, not failed by a worker later
    *[(body, {}, 400, "not a TF Serving predict request")
      for body in (b"[]", b"1", b'"x"', b"{}", b"null", b'{"instance": [1]}')],
])
async def test_bad_submissions_are_400(api, store, body, headers, code, words):
    await register(store)
    resp = await api.post("/v1/tasks/shop/app", content=body,
                          headers={"Content-Type": "application/json", **headers})
    assert resp.status_code == code
    assert words in resp.json()["error"]
    assert await TaskQueue(store).backlog([EXECUTOR]) == {}


async def test_a_client_whose_criteria_match_no_executor_fails_fast_with_the_reason(
        api, store):
    await register(store)
    await store.put_client(ClientRecord(namespace="shop", name="vision", type="image"))
    started = time.perf_counter()
    resp = await api.post("/v1/tasks/shop/vision", json={"instances": [1.0]})
    assert resp.status_code == 404
    assert time.perf_counter() - started < 1.0
    assert resp.json()["error"] == "no matching model"
    assert "type" in resp.json()["reason"]
    unknown = await api.post("/v1/tasks/shop/nobody", json={"instances": [1.0]})
    assert unknown.status_code == 404 and "not registered" in unknown.json()["reason"]
    assert await TaskQueue(store).backlog([EXECUTOR]) == {}


async def test_cancel_takes_a_pending_task_out_of_the_backlog(api, store, double, worker):
    await register(store)
    task_id = (await api.post("/v1/tasks/shop/app", json={"instances": [1.0]})).json()["id"]
    assert (await TaskQueue(store).backlog([EXECUTOR]))[EXECUTOR][0] == 1

    resp = await api.delete(f"/v1/tasks/{task_id}")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert (await status(api, task_id))["status"] == "cancelled"
    assert await TaskQueue(store).backlog([EXECUTOR]) == {}

    worker()
    done = (await api.post("/v1/tasks/shop/app", json={"instances": [2.0]})).json()["id"]
    await finished(api, done)
    assert len(double.requests) == 1  # the cancelled one never reached the model
    conflict = await api.delete(f"/v1/tasks/{done}")
    assert conflict.status_code == 409 and conflict.json()["status"] == "succeeded"


async def test_unknown_and_malformed_task_ids_are_404(api, store):
    assert (await api.get("/v1/tasks/shop~app~" + "0" * 32)).status_code == 404
    assert (await api.delete("/v1/tasks/shop~app~" + "0" * 32)).status_code == 404
    for bad in ("nope", "shop~app~xyz", "../../etc", "shop~app~" + "A" * 32):
        resp = await api.get(f"/v1/tasks/{bad}")
        assert resp.status_code == 404
        assert resp.json()["error"]  # JSON, as every error (no route took it)
    wrong = await api.put("/v1/tasks/shop~app~" + "0" * 32)
    assert wrong.status_code == 405
    assert wrong.json() == {"error": "method not allowed", "method": "PUT",
                            "allowed": ["DELETE", "GET", "HEAD"]}
    assert wrong.headers["Allow"] == "DELETE, GET, HEAD"


async def test_poison_task_goes_to_the_dead_letter_stream_with_the_models_reason(
        api, store, double, worker):
    await register(store)
    double.status = 400
    task_id = (await api.post("/v1/tasks/shop/app", json={"instances": ["x"]})).json()["id"]
    worker()
    done = await finished(api, task_id)
    assert done["status"] == "failed"
    assert "HTTP 400" in done["reason"] and "told to fail" in done["reason"]
    assert len(double.requests) == 1  # refused by the model: never retried
    dead = await TaskQueue(store).dead_letters()
    assert [(d["task"], d["executor"]) for d in dead] == [(task_id, EXECUTOR)]
    assert "HTTP 400" in dead[0]["reason"]


async def test_an_answer_over_the_result_limit_fails_the_task_at_once(
        api, store, double, worker):
    # The worker holds an answer whole and stores it as the result: bounded by
    # MULAMBDA_TASK_MAX_RESULT_BYTES. The same input would answer as much again, so the
    # task is failed at once with the limit named, not retried.
    await register(store)
    small = (await api.post("/v1/tasks/shop/app", json={"instances": [1.0]})).json()["id"]
    large = (await api.post("/v1/tasks/shop/app",
                            json={"instances": [float(i) for i in range(200)]})).json()["id"]
    worker(max_result_bytes=256)
    done = await finished(api, large)
    assert done["status"] == "failed" and "result" not in done
    assert "larger than 256 bytes" in done["reason"]
    assert "MULAMBDA_TASK_MAX_RESULT_BYTES" in done["reason"]
    assert (await finished(api, small))["status"] == "succeeded"
    assert len(double.requests) == 2  # each called once: never retried
    dead = await TaskQueue(store).dead_letters()
    assert [d["task"] for d in dead] == [large]


async def test_failing_model_is_retried_up_to_the_limit_then_dead_lettered(
        api, store, double, worker):
    await register(store)
    double.status = 503
    task_id = (await api.post("/v1/tasks/shop/app", json={"instances": [1.0]})).json()["id"]
    worker(visibility=0.4)
    done = await finished(api, task_id)
    assert done["status"] == "failed"
    assert done["reason"].startswith("no result after 3 attempt(s)")
    assert "HTTP 503" in done["reason"]
    assert len(double.requests) == OPTIONS.max_attempts
    dead = await TaskQueue(store).dead_letters()
    assert [d["task"] for d in dead] == [task_id] and dead[0]["attempts"] == "3"


async def test_a_task_for_an_executor_at_zero_waits_in_its_backlog(api, store, double, worker):
    await register(store, state="ScaledToZero", live=False, min_replicas=0)
    resp = await api.post("/v1/tasks/shop/app", json={"instances": [1.0]})
    assert resp.status_code == 202 and resp.json()["executor"] == EXECUTOR
    depth, age = (await TaskQueue(store).backlog([EXECUTOR]))[EXECUTOR]
    assert depth == 1 and 0 <= age < 5
    # The selector also signals demand for the cold executor (written in the background).
    async def demand() -> bool:
        return (await store.executor_load(EXECUTOR, 20))[1] > 0

    await eventually(demand, what="demand for the cold executor")
    worker()  # the executor came up
    assert (await finished(api, resp.json()["id"]))["status"] == "succeeded"


async def test_metrics_count_task_requests(api, store):
    await register(store)
    await api.post("/v1/tasks/shop/app", json={"instances": [1.0]})
    await api.get("/v1/tasks/shop~app~" + "0" * 32)
    text = (await api.get("/metrics")).text
    assert 'mulambda_task_requests_total{outcome="queued",route="submit"} 1.0' in text
    assert 'mulambda_task_requests_total{outcome="unknown",route="status"} 1.0' in text


async def test_a_late_failure_of_a_task_that_succeeded_is_no_dead_letter(store):
    # A stale delivery fails after another one succeeded: the success stands, nothing is
    # dead-lettered or counted as such, and the result keeps its own time to live.
    queue = TaskQueue(store)
    task_id, _ = await queue.submit(new_task_id("shop/app"), client="shop/app",
                                    executor=EXECUTOR, model=MODEL, body="{}", options=OPTIONS)
    [(entry, _fields)] = await store.redis.xrange(queue.queue_key(EXECUTOR))
    succeeded = outcome(Status.SUCCEEDED, worker="pod-a", at=time.time(), result=[1],
                        attempts=1)
    assert await queue.finish(EXECUTOR, entry, task_id, succeeded, result_ttl=60)
    assert not await queue.dead_letter(EXECUTOR, entry, task_id, "the model failed (HTTP 500)",
                                       attempts=2, worker="pod-b", result_ttl=3600)
    assert await queue.dead_letters() == []
    assert 0 < await store.redis.ttl(queue.task_key(task_id)) <= 60
    assert (await queue.get(task_id))["outcome"] == succeeded


async def test_a_dead_pods_task_behind_many_live_ones_is_reclaimed(store):
    # XAUTOCLAIM looks at no more than 10 x COUNT pending entries per call: a dead pod's
    # task behind 30 that a live pod renews is found by the calls that follow, each
    # going on where the last stopped.
    queue = TaskQueue(store)
    for _ in range(31):
        await queue.submit(new_task_id("shop/app"), client="shop/app", executor=EXECUTOR,
                           model=MODEL, body="{}", options=OPTIONS)
    live = await queue.read(EXECUTOR, "pod-live", 30, 100)
    dead = await queue.read(EXECUTOR, "pod-dead", 1, 100)
    await asyncio.sleep(0.3)
    await queue.touch(EXECUTOR, "pod-live", [entry for entry, _ in live])
    found = []
    for _ in range(3):  # 31 entries, 20 looked at per call
        found += await queue.reclaim(EXECUTOR, "pod-new", 200, 2)
    assert found == dead


async def test_a_client_at_its_open_task_limit_gets_429_until_one_ends(store, double, worker):
    # One tenant cannot fill the shared store: MULAMBDA_TASK_MAX_OPEN_PER_CLIENT tasks
    # queued or running at most. Ending one (cancelled or answered) makes room; another
    # Client is not held back.
    options = TaskOptions(max_payload_bytes=4096, ttl_seconds=600, result_ttl_seconds=60,
                          max_attempts=3, max_open_per_client=2)
    await register(store)
    await store.put_client(ClientRecord(namespace="shop", name="other", type="regression"))
    runner = web.AppRunner(create_app(store, cache_ttl=0, tasks=options),
                           **selector_server_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
            body = {"instances": [1.0]}
            first, second = [await api.post("/v1/tasks/shop/app", json=body) for _ in range(2)]
            assert first.status_code == second.status_code == 202
            refused = await api.post("/v1/tasks/shop/app", json=body)
            assert refused.status_code == 429
            assert refused.json()["error"] == "too many open tasks"
            assert refused.json()["limit"] == 2 and refused.headers["Retry-After"] == "5"
            assert (await api.post("/v1/tasks/shop/other", json=body)).status_code == 202
            assert (await api.delete(first.json()["status_url"])).status_code == 200
            third = await api.post("/v1/tasks/shop/app", json=body)
            assert third.status_code == 202  # the cancelled one made room
            assert (await api.post("/v1/tasks/shop/app", json=body)).status_code == 429
            worker()
            await finished(api, second.json()["id"])
            await finished(api, third.json()["id"])
            for _ in range(2):  # both answered: room for two again
                assert (await api.post("/v1/tasks/shop/app", json=body)).status_code == 202
            metrics = (await api.get("/metrics")).text
        assert 'mulambda_task_requests_total{outcome="too_many",route="submit"} 2.0' in metrics
    finally:
        await runner.cleanup()


async def test_a_task_past_its_time_to_live_no_longer_counts_as_open(store):
    queue = TaskQueue(store)
    options = TaskOptions(ttl_seconds=10, max_open_per_client=1)
    await queue.submit(new_task_id("shop/app"), client="shop/app", executor=EXECUTOR,
                       model=MODEL, body="{}", options=options, now=1000.0)
    with pytest.raises(TooManyTasks):
        await queue.submit(new_task_id("shop/app"), client="shop/app", executor=EXECUTOR,
                           model=MODEL, body="{}", options=options, now=1009.0)
    later = new_task_id("shop/app")
    assert await queue.submit(later, client="shop/app", executor=EXECUTOR, model=MODEL,
                              body="{}", options=options, now=1011.0) == (later, True)


async def test_submissions_racing_each_other_cannot_pass_the_open_task_limit(store):
    # The count and the queueing are one step in the store: forty submissions of one
    # Client sent at once get exactly its limit of tasks, the rest are refused. A
    # refused one leaves no trace, not even its Idempotency-Key.
    queue = TaskQueue(store)
    options = TaskOptions(ttl_seconds=60, max_open_per_client=5)

    async def one(i: int) -> str:
        try:
            task_id, _ = await queue.submit(new_task_id("shop/app"), client="shop/app",
                                            executor=EXECUTOR, model=MODEL, body="{}",
                                            options=options, idempotency_key=f"k{i}")
        except TooManyTasks:
            return "refused"
        return task_id

    outcomes = await asyncio.gather(*(one(i) for i in range(40)))
    queued = [o for o in outcomes if o != "refused"]
    assert len(queued) == 5
    assert await store.redis.zcard(queue.open_key("shop/app")) == 5
    assert await store.redis.xlen(queue.queue_key(EXECUTOR)) == 5
    refused_keys = [i for i, o in enumerate(outcomes) if o == "refused"]
    assert not any([await store.redis.exists(queue.idempotency_key("shop/app", f"k{i}"))
                    for i in refused_keys])


async def test_with_the_store_away_every_route_is_503_worth_retrying(api, store, redis_server):
    await register(store)
    queued = await api.post("/v1/tasks/shop/app", json={"instances": [[1.0]]})
    task = queued.json()["id"]
    redis_server.stop()
    try:
        answers = [await api.post("/v1/tasks/shop/app", json={"instances": [[1.0]]}),
                   await api.get(f"/v1/tasks/{task}"),
                   await api.delete(f"/v1/tasks/{task}")]
    finally:
        redis_server.start()
    for answer in answers:
        assert (answer.status_code, answer.headers.get("retry-after")) == (503, "1")
        assert answer.json() == {"error": "metadata store unavailable"}
