"""The SDK's gRPC path against a real redis-server and TF Serving gRPC test doubles.

Needs the optional extra ``mulambda[grpc]`` (TensorFlow): the whole module
is skipped without it, as in CI.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

pytest.importorskip(
    "tensorflow_serving.apis",
    reason="optional extra 'grpc' (tensorflow-serving-api, ~2 GB) not installed; "
           "CI runs without it",
)

import grpc
import numpy as np

from mulambda.sdk import (
    AllCandidatesFailed,
    MulambdaClient,
    MulambdaClientSync,
    PredictionRejected,
)
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ExecutorRecord, LatencySample, ReplicaRecord

from support.grpc_serving_double import TFServingGRPCDouble
from support.procs import free_port

pytestmark = pytest.mark.integration

CLIENT = "shop/app"


async def register(store: MetadataStore, name: str, grpc_target: str, *, rtt: float,
                   service: float = 5.0, accuracy: float = 0.9) -> str:
    """Register a Ready executor whose gRPC endpoint is ``grpc_target``, ``rtt`` ms from CLIENT.

    Its REST endpoint points where nothing listens: these tests must never use it.
    """
    rec = ExecutorRecord(
        namespace="ml", name=name, model=f"model-{name}", version=1, type="vision",
        input="image", output="label", accuracy=accuracy, rest="http://127.0.0.1:1",
        grpc=grpc_target, state="Ready", service_time_ms=service,
    )
    await store.put_executor(rec)
    await store.put_replica(ReplicaRecord(executor=rec.id, pod=f"{name}-0", state="Available"),
                            ttl=60)
    await store.put_latencies(rec.id, f"{name}-0", {CLIENT: LatencySample(ms=rtt, samples=3)},
                              ttl=60)
    return rec.id


async def inflight(store: MetadataStore, executor: str) -> int:
    return (await store.executor_load(executor))[0]


async def eventually(read: Callable[[], Awaitable[Any]], want: Any, within: float = 5.0) -> None:
    """Poll ``read()`` until it returns ``want``; fail with the last value after ``within`` s."""
    deadline = time.monotonic() + within
    while (got := await read()) != want:
        assert time.monotonic() < deadline, f"still {got!r} after {within}s, wanted {want!r}"
        await asyncio.sleep(0.02)


async def no_leases_left(store: MetadataStore, *executors: str) -> None:
    for ex in executors:
        await eventually(lambda ex=ex: inflight(store, ex), 0)
    assert await store.redis.hgetall(store.inflight_key) == {}


@pytest.fixture
async def doubles() -> AsyncIterator[list[TFServingGRPCDouble]]:
    made: list[TFServingGRPCDouble] = []
    yield made
    for d in made:
        await d.stop()


async def test_predict_grpc_returns_half_plus_two_from_the_best_model(store, doubles):
    near = await TFServingGRPCDouble("near").start()
    far = await TFServingGRPCDouble("far").start()
    doubles += [near, far]
    await register(store, "near", near.target, rtt=1)
    await register(store, "far", far.target, rtt=40)

    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        result = await mu.predict_grpc({"x": [[1.0], [2.0], [5.0]]})
        again = await mu.predict_grpc({"x": np.array([0.0, -4.0])}, signature_name="other")

    assert result.executor == "ml/near" and result.attempts == 1
    assert set(result.predictions) == {"y"}
    y = result.predictions["y"]
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (3, 1)
    np.testing.assert_allclose(y, [[2.5], [3.0], [4.5]])
    np.testing.assert_allclose(again.predictions["y"], [2.0, 0.0])
    assert [(r["model"], r["signature"]) for r in near.requests] == [
        ("model-near", "serving_default"), ("model-near", "other")]
    np.testing.assert_array_equal(near.requests[0]["inputs"]["x"], [[1.0], [2.0], [5.0]])
    assert far.requests == []
    await no_leases_left(store, "ml/near", "ml/far")


async def test_grpc_failover_from_unavailable_to_a_healthy_model(store, doubles):
    broken = await TFServingGRPCDouble("broken", fail=grpc.StatusCode.UNAVAILABLE).start()
    backup = await TFServingGRPCDouble("backup").start()
    doubles += [broken, backup]
    await register(store, "down", f"127.0.0.1:{free_port()}", rtt=0.5)  # nothing listens
    await register(store, "broken", broken.target, rtt=1)
    await register(store, "backup", backup.target, rtt=30)

    async with MulambdaClient(store, CLIENT, type="vision", suspect_seconds=60) as mu:
        assert (await mu.select()).executor_id == "ml/down"
        result = await mu.predict_grpc({"x": [1.0]})
        assert result.executor == "ml/backup" and result.attempts == 3
        np.testing.assert_allclose(result.predictions["y"], [2.5])
        assert len(broken.requests) == 1 and len(backup.requests) == 1
        # Failed executors stay out of this process's ranking for a while.
        again = await mu.predict_grpc({"x": [1.0]})
        assert again.executor == "ml/backup" and again.attempts == 1
        assert len(broken.requests) == 1
    await no_leases_left(store, "ml/down", "ml/broken", "ml/backup")


async def test_grpc_deadline_exceeded_fails_over(store, doubles):
    async def stall() -> None:
        await asyncio.sleep(5)

    slow = await TFServingGRPCDouble("slow", on_request=stall).start()
    backup = await TFServingGRPCDouble("backup").start()
    doubles += [slow, backup]
    await register(store, "slow", slow.target, rtt=1)
    await register(store, "backup", backup.target, rtt=30)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        started = time.monotonic()
        result = await mu.predict_grpc({"x": [0.0]}, attempt_timeout=0.3)
        assert time.monotonic() - started < 3
    assert result.executor == "ml/backup" and result.attempts == 2
    await no_leases_left(store, "ml/slow", "ml/backup")


async def test_all_grpc_candidates_failing_raises_with_every_attempt(store, doubles):
    a = await TFServingGRPCDouble("a", fail=grpc.StatusCode.UNAVAILABLE).start()
    doubles.append(a)
    await register(store, "a", a.target, rtt=1)
    await register(store, "b", f"127.0.0.1:{free_port()}", rtt=2)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        with pytest.raises(AllCandidatesFailed) as err:
            await mu.predict_grpc({"x": [0.0]})
    assert [e for e, _ in err.value.attempts] == ["ml/a", "ml/b"]
    assert all("gRPC UNAVAILABLE" in msg for _, msg in err.value.attempts)
    assert "a told to fail" in err.value.attempts[0][1]
    await no_leases_left(store, "ml/a", "ml/b")


@pytest.mark.parametrize("told_to_fail", [True, False], ids=["told-to-fail", "missing-input"])
async def test_grpc_invalid_argument_is_not_retried_elsewhere(store, doubles, told_to_fail):
    fail = grpc.StatusCode.INVALID_ARGUMENT if told_to_fail else None
    picky = await TFServingGRPCDouble("picky", fail=fail).start()
    other = await TFServingGRPCDouble("other").start()
    doubles += [picky, other]
    await register(store, "picky", picky.target, rtt=1)
    await register(store, "other", other.target, rtt=20)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        with pytest.raises(PredictionRejected, match="INVALID_ARGUMENT") as err:
            await mu.predict_grpc({"x" if told_to_fail else "wrong": [0.0]})
    assert err.value.executor == "ml/picky" and err.value.status == "INVALID_ARGUMENT"
    assert len(picky.requests) == 1 and other.requests == []
    await no_leases_left(store, "ml/picky", "ml/other")


async def test_grpc_inflight_lease_is_up_during_the_call_and_back_to_zero(store, doubles):
    seen: list[int] = []

    async def observe() -> None:
        await asyncio.sleep(0.05)  # the SDK publishes its leases in the background
        seen.append(await inflight(store, "ml/slow"))

    slow = await TFServingGRPCDouble("slow", on_request=observe).start()
    doubles.append(slow)
    await register(store, "slow", slow.target, rtt=1)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        results = await asyncio.gather(*(mu.predict_grpc({"x": [float(i)]}) for i in range(5)))
        assert [r.predictions["y"].tolist() for r in results] == [
            [0.5 * i + 2] for i in range(5)]
        assert len(seen) == 5 and max(seen) >= 2  # concurrent calls were counted
        # Released by the calls themselves, not only by close().
        await no_leases_left(store, "ml/slow")
    _, arrivals = await store.executor_load("ml/slow", window_seconds=20)
    assert arrivals == pytest.approx(5 / 20)


def test_sync_wrapper_predicts_over_grpc(redis_server, redis_url):
    # The double runs on its own event-loop thread: this test blocks its caller.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def on_loop(coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    async def setup() -> TFServingGRPCDouble:
        d = await TFServingGRPCDouble("syncy").start()
        s = MetadataStore.from_url(redis_url, prefix="test")
        await register(s, "syncy", d.target, rtt=1)
        await s.close()
        return d

    double = on_loop(setup())
    try:
        with MulambdaClientSync(redis_url, CLIENT, type="vision", prefix="test") as mu:
            result = mu.predict_grpc({"x": [[4.0]]})
        assert result.executor == "ml/syncy"
        np.testing.assert_allclose(result.predictions["y"], [[4.0]])
        assert len(double.requests) == 1
    finally:
        on_loop(double.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
