"""Rollout and experiment routing in the SDK and the gateway against a real redis-server and
TF Serving REST test doubles: A/B experiments (sticky arms, weights, hard criteria), per-arm
outcomes in the store, shadow copies bounded and never on the caller's path."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from mulambda.policy.experiment import Experiment
from mulambda.policy.rollout import CANDIDATE, STABLE, Route, candidate_id
from mulambda.sdk import MulambdaClient
from mulambda.selector.app import create_app, selector_server_options
from mulambda.store.acl import ROLES, acl_file
from mulambda.store.metadata import MetadataStore
from mulambda.store.outcomes import OutcomeRecorder, drop_outcomes, read_outcomes
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
)

from support.procs import RedisServer
from support.tcp_proxy import DroppingProxy
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

CLIENT = "shop/app"
EXPERIMENT = Experiment(f"{CLIENT}@g1", (("ml/a", 70.0), ("ml/b", 30.0)), header="X-User")


async def register(store: MetadataStore, name: str, double: TFServingDouble, *,
                   type_: str = "vision", rollout: dict | None = None,
                   pod_id: str | None = None) -> str:
    """An executor reached only through its replica's address (the Service does not
    resolve): an answer proves which replica the router chose."""
    rec = ExecutorRecord(namespace="ml", name=name, model="m", version=1, type=type_,
                         input="image", output="label", accuracy=0.9,
                         rest=f"http://{name}.invalid:{double.port}", grpc="", state="Ready",
                         service_time_ms=2, rollout=rollout)
    await store.put_executor(rec)
    await heartbeat(store, pod_id or rec.id, f"{name}-0", double)
    return rec.id


async def heartbeat(store: MetadataStore, executor: str, pod: str,
                    double: TFServingDouble) -> None:
    await store.put_replica(ReplicaRecord(executor=executor, pod=pod, ip=double.host,
                                          state="Available"), ttl=60)
    await store.put_latencies(executor, pod, {CLIENT: LatencySample(ms=1, samples=3)}, ttl=60)


@pytest.fixture
async def doubles() -> AsyncIterator[list[TFServingDouble]]:
    made: list[TFServingDouble] = []
    yield made
    for d in made:
        await d.stop()


async def double(doubles: list[TFServingDouble], name: str, host: str, **kw: object
                 ) -> TFServingDouble:
    """A double on its own loopback address (a pod IP) and a free port."""
    d = await TFServingDouble(name, host=host, **kw).start()  # type: ignore[arg-type]
    doubles.append(d)
    return d


@pytest.fixture
async def gateway(store: MetadataStore) -> AsyncIterator[httpx.AsyncClient]:
    runner = web.AppRunner(create_app(store, cache_ttl=0), **selector_server_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        yield http
    await runner.cleanup()


async def experiment_world(store: MetadataStore, doubles: list[TFServingDouble]) -> None:
    a = await double(doubles, "a", "127.0.0.11")
    b = await double(doubles, "b", "127.0.0.12")
    other = await double(doubles, "other", "127.0.0.13")
    await register(store, "a", a)
    await register(store, "b", b)
    await register(store, "other", other, type_="audio")  # fails the hard criteria
    await store.put_client(ClientRecord(
        namespace="shop", name="app", type="vision",
        experiment=Experiment(EXPERIMENT.id, (*EXPERIMENT.arms, ("ml/other", 50.0)),
                              header="X-User").to_record()))


async def test_sdk_experiment_keeps_each_user_on_one_arm_and_splits_by_weight(store, doubles):
    await experiment_world(store, doubles)
    async with MulambdaClient(store, CLIENT, seed=1) as mu:
        first = {u: (await mu.predict([1], key=f"user-{u}")).executor for u in range(300)}
        again = {u: (await mu.predict([1], key=f"user-{u}")).executor for u in range(300)}
    assert first == again
    counts = Counter(first.values())
    assert set(counts) == {"ml/a", "ml/b"}  # never the arm that fails the criteria
    assert 0.6 < counts["ml/a"] / 300 < 0.8
    outcomes = await eventually_outcomes(store, EXPERIMENT.subject, EXPERIMENT.id, 600)
    assert outcomes["ml/a"].requests == 2 * counts["ml/a"]
    assert outcomes["ml/a"].errors == 0 and outcomes["ml/a"].p95 is not None


async def test_gateway_experiment_is_sticky_by_the_header(store, doubles, gateway):
    await experiment_world(store, doubles)
    seen: dict[str, set[str]] = {}
    for _ in range(3):
        for u in range(40):
            resp = await gateway.post(f"/v1/predict/{CLIENT}", json={"instances": [1]},
                                      headers={"X-User": f"u{u}"})
            assert resp.status_code == 200, resp.text
            seen.setdefault(f"u{u}", set()).add(resp.headers["X-Mulambda-Executor"])
    assert all(len(arms) == 1 for arms in seen.values())
    assert {next(iter(a)) for a in seen.values()} == {"ml/a", "ml/b"}


async def test_canary_arm_outcomes_are_counted_and_a_failing_candidate_costs_no_error(
    store, doubles, gateway,
):
    stable = await double(doubles, "stable", "127.0.0.21")
    broken = await double(doubles, "broken", "127.0.0.22", status=500)
    route = Route("v2-g2", "Canary", 50, 2, f"http://m-candidate.invalid:{broken.port}", "")
    eid = await register(store, "m", stable, rollout=route.to_record())
    await heartbeat(store, candidate_id(eid), "m-candidate-0", broken)
    await store.put_client(ClientRecord(namespace="shop", name="app", type="vision"))
    async with MulambdaClient(store, CLIENT, seed=2) as mu:
        for _ in range(60):
            answer = await mu.predict([1])
            assert answer.candidate.record.version == 1  # the stable arm answered
    for _ in range(60):
        resp = await gateway.post(f"/v1/predict/{CLIENT}", json={"instances": [1]})
        assert resp.status_code == 200, resp.text
    outcomes = await eventually_outcomes(store, f"executor/{eid}", route.id, 120, STABLE)
    # Every request reached the stable arm; about half tried the candidate first.
    assert outcomes[STABLE].requests == 120 and outcomes[STABLE].errors == 0
    assert outcomes[CANDIDATE].errors == outcomes[CANDIDATE].requests
    assert 30 < outcomes[CANDIDATE].requests < 90
    assert len(broken.requests) == outcomes[CANDIDATE].requests


async def test_shadow_copies_are_compared_bounded_and_never_slow_the_caller(store, doubles):
    stable = await double(doubles, "stable", "127.0.0.31")

    async def slow() -> None:
        await asyncio.sleep(1.0)

    shadow = await double(doubles, "shadow", "127.0.0.32", on_request=slow)
    route = Route("v2-g2", "Shadow", 0, 2, f"http://m-candidate.invalid:{shadow.port}", "")
    eid = await register(store, "m", stable, rollout=route.to_record())
    await heartbeat(store, candidate_id(eid), "m-candidate-0", shadow)
    await store.put_client(ClientRecord(namespace="shop", name="app", type="vision"))
    async with MulambdaClient(store, CLIENT, max_shadow_inflight=5) as mu:
        started = time.perf_counter()
        for _ in range(20):
            answer = await mu.predict([1])
            assert answer.predictions == [["stable"]]
        elapsed = time.perf_counter() - started
        # Each copy takes 1 s: a caller that waited for one would take 20 s in all.
        assert elapsed < 5.0
        assert mu._shadow.dropped == 15  # 5 in flight at most, the rest dropped
        await asyncio.sleep(1.5)
    outcomes = await eventually_outcomes(store, f"executor/{eid}", route.id, 20 + 5)
    assert outcomes[CANDIDATE].compared == 5
    # The shadow double answers [["shadow"]]: a different answer from the stable one.
    assert outcomes[CANDIDATE].disagreed == 5
    assert len(shadow.requests) == 5


async def test_outcomes_survive_a_store_outage(redis_server: RedisServer, store):
    proxy = await DroppingProxy(redis_server.port).start()
    flaky = MetadataStore.from_url(proxy.url, prefix="test", timeout=0.5)
    recorder = OutcomeRecorder(flaky, interval=0.1)
    try:
        proxy.blackhole()
        for _ in range(10):
            recorder.record("executor/ml/m", "r1", STABLE, ok=True, ms=3.0)
        recorder.record("executor/ml/m", "r1", CANDIDATE, ok=False)
        await asyncio.sleep(1.0)  # writes fail meanwhile; the counts are kept
        proxy.heal()
        outcomes = await eventually_outcomes(store, "executor/ml/m", "r1", 11)
        assert outcomes[STABLE].requests == 10 and outcomes[CANDIDATE].errors == 1
    finally:
        proxy.heal()
        await recorder.close()
        await flaky.close()
        await proxy.stop()


async def eventually_outcomes(store: MetadataStore, subject: str, run: str, total: int,
                              arm: str | None = None, within: float = 10.0) -> dict:
    """The outcomes once ``total`` requests are counted (over all arms, or ``arm``'s);
    writers flush every second."""
    deadline = time.monotonic() + within
    while True:
        outcomes = await read_outcomes(store, subject, run)
        counted = sum(s.requests for a, s in outcomes.items() if arm in (None, a))
        if counted >= total or time.monotonic() > deadline:
            assert counted == total, outcomes
            return outcomes
        await asyncio.sleep(0.1)


async def test_outcomes_acl_routers_write_the_operator_reads_and_deletes_tenants_cannot(
    monkeypatch: pytest.MonkeyPatch,
):
    passwords = {name: f"{name}-pw-0123456789" for name in ROLES}
    server = RedisServer(acl=acl_file("acl", passwords))
    server.start()
    stores: dict[str, MetadataStore] = {}
    try:
        for role in ("sdk", "selector", "operator", "client", "companion"):
            monkeypatch.setenv("MULAMBDA_REDIS_USERNAME", ROLES[role].username)
            monkeypatch.setenv("MULAMBDA_REDIS_PASSWORD", passwords[role])
            stores[role] = MetadataStore.from_url(server.url, prefix="acl", timeout=2)
        for role in ("sdk", "selector"):
            recorder = OutcomeRecorder(stores[role])
            recorder.record("executor/ml/m", "r1", STABLE, ok=True, ms=2.0)
            await recorder.flush()
        assert (await read_outcomes(stores["operator"], "executor/ml/m", "r1"))[
            STABLE].requests == 2
        for role in ("client", "companion"):
            refused = OutcomeRecorder(stores[role])
            refused.record("executor/ml/m", "r1", STABLE, ok=False)
            await refused.flush()  # refused once: it stops counting rather than retrying
            assert refused.refused
            refused.record("executor/ml/m", "r1", STABLE, ok=False)
            assert not refused._pending
        await drop_outcomes(stores["operator"], "executor/ml/m")
        assert await read_outcomes(stores["operator"], "executor/ml/m", "r1") == {}
    finally:
        for store in stores.values():
            await store.close()
        server.stop()
