"""The SDK against a real redis-server and TF Serving REST test doubles on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from mulambda.policy.selection import Criteria
from mulambda.sdk import (
    AllCandidatesFailed,
    MissingExtra,
    MulambdaClient,
    MulambdaClientSync,
    MulambdaError,
    NoMatchingModel,
    PredictionRejected,
    StoreUnavailable,
)
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, ExecutorRecord, LatencySample, ReplicaRecord

from support.procs import RedisServer, free_port
from support.tcp_proxy import DroppingProxy
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

CLIENT = "shop/app"


async def register(store: MetadataStore, name: str, rest: str, *, rtt: float,
                   service: float = 5.0, accuracy: float = 0.9) -> str:
    """Register a Ready executor with one live replica measured ``rtt`` ms from CLIENT."""
    rec = ExecutorRecord(
        namespace="ml", name=name, model=f"model-{name}", version=1, type="vision",
        input="image", output="label", accuracy=accuracy, rest=rest, grpc="127.0.0.1:1",
        state="Ready", service_time_ms=service,
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


@pytest.fixture
async def proxied_store(redis_server: RedisServer, redis_url: str) -> AsyncIterator[
    tuple[MetadataStore, DroppingProxy]
]:
    """A store reached through a proxy that can blackhole it (1 s command timeout)."""
    proxy = await DroppingProxy(redis_server.port).start()
    store = MetadataStore.from_url(proxy.url, prefix="test", timeout=1.0)
    yield store, proxy
    proxy.heal()
    await store.close()
    await proxy.stop()


@pytest.fixture
async def doubles() -> AsyncIterator[list[TFServingDouble]]:
    made: list[TFServingDouble] = []
    yield made
    for d in made:
        await d.stop()


async def test_predict_goes_to_the_best_model_over_rest(store, doubles):
    near = await TFServingDouble("near").start()
    far = await TFServingDouble("far").start()
    doubles += [near, far]
    await register(store, "near", near.url, rtt=1)
    await register(store, "far", far.url, rtt=40)

    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        result = await mu.predict([[1, 2], [3, 4]])

    assert result.executor == "ml/near" and result.attempts == 1
    assert result.predictions == [["near"], ["near"]]
    assert near.requests == [{"model": "model-near", "body": {"instances": [[1, 2], [3, 4]]}}]
    assert far.requests == []


async def test_numpy_inputs_are_sent_as_lists_and_what_json_cannot_hold_is_sent_nowhere(
        store, doubles):
    import numpy as np

    near = await TFServingDouble("near").start()
    doubles.append(near)
    await register(store, "near", near.url, rtt=1)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        result = await mu.predict(np.array([[1, 2], [3, 4]], dtype=np.int32))
        assert result.predictions == [["near"], ["near"]]
        with pytest.raises(TypeError, match="'object' cannot be sent as JSON"):
            await mu.predict([object()])
    assert near.requests == [{"model": "model-near", "body": {"instances": [[1, 2], [3, 4]]}}]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
async def test_an_attempt_timeout_must_be_a_positive_time(store, bad):
    # 0 was read as "not given": the attempt had the client's whole timeout.
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        with pytest.raises(ValueError, match="attempt_timeout must be > 0 seconds"):
            await mu.predict([[1]], attempt_timeout=bad)


async def test_failover_when_the_first_endpoint_fails(store, doubles):
    broken = await TFServingDouble("broken", status=503).start()
    backup = await TFServingDouble("backup").start()
    doubles += [broken, backup]
    # RTTs far apart: near-equal candidates are spread at random (policy.selection),
    # and this test is about the order of failover, not about spreading.
    await register(store, "broken", broken.url, rtt=15)
    await register(store, "backup", backup.url, rtt=60)
    await register(store, "down", f"http://127.0.0.1:{free_port()}", rtt=0.5)

    async with MulambdaClient(store, CLIENT, type="vision", suspect_seconds=60) as mu:
        assert (await mu.select()).executor_id == "ml/down"
        result = await mu.predict([[0]])
        assert result.executor == "ml/backup" and result.attempts == 3
        assert len(broken.requests) == 1
        # Failed executors stay out of this process's ranking for a while.
        again = await mu.predict([[0]])
        assert again.attempts == 1 and len(broken.requests) == 1


async def test_a_dead_replica_sends_the_request_to_another_replica_of_its_executor(
        store, doubles):
    # The only executor has two replicas; the nearer one's pod is gone (nothing listens
    # on 127.0.0.2) while its heartbeat has not expired yet.
    live = await TFServingDouble("solo").start()
    doubles.append(live)
    rid = await register(store, "solo", f"http://solo.invalid:{live.port}", rtt=1)
    await store.put_replica(ReplicaRecord(executor=rid, pod="solo-0", ip="127.0.0.2",
                                          state="Available"), ttl=60)
    await store.put_replica(ReplicaRecord(executor=rid, pod="solo-1", ip="127.0.0.1",
                                          state="Available"), ttl=60)
    await store.put_latencies(rid, "solo-1", {CLIENT: LatencySample(ms=5, samples=3)}, ttl=60)

    async with MulambdaClient(store, CLIENT, type="vision", suspect_seconds=60) as mu:
        answers = [await mu.predict([[0]]) for _ in range(3)]
    assert [(a.candidate.replica and a.candidate.replica.pod, a.attempts) for a in answers] == [
        ("solo-1", 2),  # the dead one first (nearer), then its sibling
        ("solo-1", 1), ("solo-1", 1),  # the dead one avoided for suspect_seconds
    ]


async def test_all_candidates_failing_raises_with_every_attempt(store, doubles):
    a = await TFServingDouble("a", status=500).start()
    doubles.append(a)
    await register(store, "a", a.url, rtt=1)
    await register(store, "b", f"http://127.0.0.1:{free_port()}", rtt=20)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        with pytest.raises(AllCandidatesFailed) as err:
            await mu.predict([[0]])
    assert [e for e, _ in err.value.attempts] == ["ml/a", "ml/b"]
    assert "HTTP 500" in err.value.attempts[0][1]
    assert [(await store.executor_load(e))[0] for e in ("ml/a", "ml/b")] == [0, 0]
    assert await store.redis.hgetall(store.inflight_key) == {}  # every lease released


async def test_client_error_is_not_retried_elsewhere(store, doubles):
    picky = await TFServingDouble("picky", status=400).start()
    other = await TFServingDouble("other").start()
    doubles += [picky, other]
    await register(store, "picky", picky.url, rtt=1)
    await register(store, "other", other.url, rtt=20)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        with pytest.raises(PredictionRejected, match="400"):
            await mu.predict([[0]])
    assert other.requests == []


async def test_inflight_counter_is_up_during_the_call_and_back_to_zero(store, doubles):
    seen: list[int] = []

    async def observe() -> None:
        await asyncio.sleep(0.05)  # the SDK publishes its leases in the background
        seen.append((await store.executor_load("ml/slow"))[0])

    slow = await TFServingDouble("slow", on_request=observe).start()
    doubles.append(slow)
    await register(store, "slow", slow.url, rtt=1)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        await asyncio.gather(*(mu.predict([[i]]) for i in range(5)))
        assert max(seen) >= 2  # concurrent calls were counted
        # Released by the calls themselves, not only by close().
        await eventually(lambda: inflight(store, "ml/slow"), 0)
    assert await store.redis.hgetall(store.inflight_key) == {}
    _, arrivals = await store.executor_load("ml/slow", window_seconds=20)
    assert arrivals == pytest.approx(5 / 20)  # 5 requests over two 10 s buckets


async def test_no_matching_model_says_why(store):
    await register(store, "a", "http://127.0.0.1:1", rtt=1)
    async with MulambdaClient(store, CLIENT, type="audio") as mu:
        with pytest.raises(NoMatchingModel, match="wrong type") as err:
            await mu.predict([[0]])
    assert "type='audio'" in err.value.reason


async def test_registered_client_criteria_come_from_the_store(store, doubles):
    d = await TFServingDouble("d").start()
    doubles.append(d)
    await register(store, "d", d.url, rtt=1)
    await store.put_client(ClientRecord(namespace="shop", name="app", type="vision"))
    async with MulambdaClient(store, CLIENT) as mu:
        assert (await mu.select()).executor_id == "ml/d"
        assert mu.criteria == Criteria(type="vision")
    async with MulambdaClient(store, "shop/unknown") as mu:
        with pytest.raises(NoMatchingModel, match="not registered"):
            await mu.select()


async def test_selection_is_cached_and_refreshed(store, redis_url, doubles):
    await register(store, "a", "http://127.0.0.1:1", rtt=5)
    async with MulambdaClient(redis_url, CLIENT, type="vision", cache_ttl=0.2,
                              prefix="test") as mu:
        assert (await mu.select()).executor_id == "ml/a"
        await register(store, "b", "http://127.0.0.1:2", rtt=1)
        assert (await mu.select()).executor_id == "ml/a"  # cached
        await asyncio.sleep(0.25)
        await mu.select()  # stale: served while a background refresh runs
        deadline = time.monotonic() + 2
        while (await mu.select()).executor_id != "ml/b":
            assert time.monotonic() < deadline, "snapshot never refreshed"
            await asyncio.sleep(0.05)


def test_sync_wrapper_predicts(redis_server, redis_url):
    async def setup() -> None:
        s = MetadataStore.from_url(redis_url, prefix="test")
        await register(s, "syncy", "http://127.0.0.1:1", rtt=1)  # nothing listens there
        await s.close()

    asyncio.run(setup())
    with MulambdaClientSync(redis_url, CLIENT, type="vision", prefix="test") as mu:
        assert mu.select().executor_id == "ml/syncy"
        with pytest.raises(AllCandidatesFailed):
            mu.predict([[0]])


def test_sync_wrapper_has_the_task_calls_and_a_refused_start_leaves_no_thread(
        redis_server, redis_url):
    import threading

    def sdk_threads() -> int:
        return sum(t.name == "mulambda-sdk" and t.is_alive() for t in threading.enumerate())

    before = sdk_threads()
    with pytest.raises(TypeError):  # criteria and criteria fields: refused
        MulambdaClientSync(redis_url, CLIENT, Criteria(type="vision"), type="vision")
    assert sdk_threads() == before  # its loop's thread went with it
    with MulambdaClientSync(redis_url, CLIENT, type="vision", prefix="test") as mu:
        for call in ("submit", "result", "status", "cancel"):  # as docs/async.md says
            assert callable(getattr(mu, call))
        assert mu.ranking(items=3, direct=False) is not None  # the async client's arguments


async def test_the_sdk_reads_what_the_operator_injects_into_workloads(
        store, redis_url, monkeypatch):
    # A workload of a platform with its own key prefix: MulambdaClient(url, id) used
    # "mulambda" and found no registered Client.
    await register(store, "near", "http://127.0.0.1:1", rtt=1)
    await store.put_client(ClientRecord(namespace="shop", name="app", type="vision"))
    monkeypatch.setenv("MULAMBDA_KEY_PREFIX", "test")
    async with MulambdaClient(redis_url, CLIENT) as mu:
        assert (await mu.select()).executor_id == "ml/near"
    monkeypatch.setenv("MULAMBDA_REDIS_URL", redis_url)
    monkeypatch.setenv("MULAMBDA_CLIENT", CLIENT)
    async with MulambdaClient.from_env() as mu:
        assert mu.client_id == CLIENT and (await mu.select()).executor_id == "ml/near"
    monkeypatch.delenv("MULAMBDA_REDIS_URL")
    with pytest.raises(MulambdaError, match="uses the selector"):
        MulambdaClient.from_env()


async def test_a_store_outage_is_one_of_the_sdks_errors():
    # StoreUnavailable was a RuntimeError only: code catching MulambdaError missed it.
    async with MulambdaClient(f"redis://127.0.0.1:{free_port()}/0", CLIENT, type="vision",
                              fresh_load=False) as mu:
        with pytest.raises(MulambdaError) as raised:
            await mu.select()
    assert isinstance(raised.value, StoreUnavailable)


async def test_grpc_without_the_extra_raises_a_clear_error(store, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tf(name, *args, **kwargs):
        if name.startswith(("tensorflow", "grpc")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tf)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        with pytest.raises(MissingExtra, match=r"mulambda\[grpc\]"):
            await mu.predict_grpc({"x": [[1.0]]})


async def test_cancelled_prediction_releases_its_inflight_count(store, doubles):
    entered = asyncio.Event()

    async def hang() -> None:
        entered.set()
        await asyncio.sleep(30)

    slow = await TFServingDouble("slow", on_request=hang).start()
    doubles.append(slow)
    await register(store, "slow", slow.url, rtt=1)
    async with MulambdaClient(store, CLIENT, type="vision") as mu:
        call = asyncio.create_task(mu.predict([[0]]))
        await entered.wait()
        await eventually(lambda: inflight(store, "ml/slow"), 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call  # not swallowed
        # Released while the client lives on: nothing left to keep it from idling.
        await eventually(lambda: inflight(store, "ml/slow"), 0)
        assert await store.redis.hgetall(store.inflight_key) == {}


async def test_lost_reply_to_the_inflight_write_does_not_leak(store, proxied_store, doubles):
    via, proxy = proxied_store
    d = await TFServingDouble("d").start()
    doubles.append(d)
    await register(store, "d", d.url, rtt=1)
    # fresh_load=False: the lease write must find the pooled connection idle (a new one
    # would wait forever for the handshake reply the muted proxy drops).
    async with MulambdaClient(via, CLIENT, type="vision", cache_ttl=60,
                              fresh_load=False) as mu:
        await mu.select()  # snapshot cached: the request path needs no store read
        proxy.mute()  # the server applies the +1, the SDK never hears back
        result = await mu.predict([[0]])
        assert result.executor == "ml/d"
        await eventually(lambda: inflight(store, "ml/d"), 1)  # it did land
        proxy.heal()
        await eventually(lambda: inflight(store, "ml/d"), 0)


async def test_failed_release_is_retried_until_the_store_takes_it(store, proxied_store, doubles):
    via, proxy = proxied_store

    async def cut() -> None:
        await eventually(lambda: inflight(store, "ml/d"), 1)
        proxy.blackhole()  # the release cannot get through

    d = await TFServingDouble("d", on_request=cut).start()
    doubles.append(d)
    await register(store, "d", d.url, rtt=1)
    async with MulambdaClient(via, CLIENT, type="vision", cache_ttl=60) as mu:
        await mu.select()
        await mu.predict([[0]])
        await asyncio.sleep(1.5)  # a release attempt or two timed out
        assert await inflight(store, "ml/d") == 1
        proxy.heal()
        await eventually(lambda: inflight(store, "ml/d"), 0)


async def test_a_long_call_keeps_its_lease_and_a_dead_sdk_lease_expires(store, doubles):
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    slow = await TFServingDouble("slow", on_request=hold).start()
    doubles.append(slow)
    await register(store, "slow", slow.url, rtt=1)
    # A 2 s lease (refreshed every third of it): slack for a loaded CI machine.
    mu = MulambdaClient(store, CLIENT, type="vision", inflight_lease_seconds=2.0)
    call = asyncio.create_task(mu.predict([[0]]))
    await eventually(lambda: inflight(store, "ml/slow"), 1)
    for _ in range(10):  # 5 s, well past two leases: refreshed while in flight
        await asyncio.sleep(0.5)
        assert await inflight(store, "ml/slow") == 1
    # The process dies: nothing refreshes or releases its lease any more.
    await mu._leases.stop()
    assert await inflight(store, "ml/slow") == 1
    await asyncio.sleep(2.3)
    assert await inflight(store, "ml/slow") == 0
    assert await store.prune_expired() == 1
    assert await store.redis.hgetall(store.inflight_key) == {}
    release.set()
    await call
    await mu.close()


async def test_blackholed_store_adds_no_latency_to_use_warm_predictions(
    store, proxied_store, doubles
):
    via, proxy = proxied_store
    warm = await TFServingDouble("warm").start()
    doubles.append(warm)
    await register(store, "warm", warm.url, rtt=1, accuracy=0.5)
    await store.put_executor(ExecutorRecord(
        namespace="ml", name="cold", model="model-cold", version=1, type="vision",
        input="image", output="label", accuracy=0.99, rest="http://127.0.0.1:1",
        grpc="127.0.0.1:1", state="ScaledToZero", min_replicas=0, service_time_ms=5.0))
    async with MulambdaClient(via, CLIENT, type="vision", cache_ttl=60, latency_weight=0,
                              accuracy_weight=1) as mu:
        assert (await mu.predict([[0]])).executor == "ml/warm"  # cold best: demand signalled
        proxy.blackhole()
        for _ in range(3):
            started = time.monotonic()
            assert (await mu.predict([[0]])).executor == "ml/warm"
            assert time.monotonic() - started < 0.5  # the store's timeout is 1 s
