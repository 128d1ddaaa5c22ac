"""Contract of the selector HTTP API, served on loopback against a real redis-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from mulambda.policy.latency import ServiceTracker
from mulambda.selector.app import create_app
from mulambda.selector.service import SELECTOR_KEY
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    TimedRequest,
)

from support.selector_http import selector_http
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration


async def register(store: MetadataStore, name: str, *, type: str = "vision",
                   accuracy: float = 0.9, service: float = 5.0, rtt: float = 1.0) -> None:
    rec = ExecutorRecord(
        namespace="ml", name=name, model=f"model-{name}", version=3, type=type,
        input="image", output="label", accuracy=accuracy, rest=f"http://{name}.ml:8501",
        grpc=f"{name}.ml:8500", state="Ready", service_time_ms=service,
    )
    await store.put_executor(rec)
    await store.put_replica(ReplicaRecord(executor=rec.id, pod=f"{name}-0", state="Available"),
                            ttl=60)
    await store.put_latencies(rec.id, f"{name}-0", {"shop/app": LatencySample(ms=rtt, samples=1)},
                              ttl=60)


@pytest.fixture
async def api(store: MetadataStore) -> AsyncIterator[httpx.AsyncClient]:
    async with selector_http(create_app(store, cache_ttl=0)) as http:
        yield http


async def test_select_answers_endpoint_and_model(api, store):
    await register(store, "fast", service=2, accuracy=0.7)
    await register(store, "precise", service=40, accuracy=0.99)
    body = {"required": {"type": "vision", "input": "image"},
            "desired": {"latency": 1, "accuracy": 0}, "data_length": 2048}

    resp = await api.post("/select/shop/app", json=body)

    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["endpoint"] == "http://fast.ml:8501"
    assert data["grpc"] == "fast.ml:8500"
    model = data["model"]
    assert model["executor"] == "ml/fast" and model["name"] == "model-fast"
    assert model["version"] == 3 and model["warm"] is True
    assert model["expected_latency_ms"] == pytest.approx(3.0)
    assert [c["executor"] for c in data["candidates"]] == ["ml/fast", "ml/precise"]

    accurate = await api.post("/select/shop%2Fapp",
                              json={"required": {"type": "vision"}, "desired": {"accuracy": 1,
                                                                                "latency": 0}})
    assert accurate.json()["model"]["executor"] == "ml/precise"
    # Every selection is counted as demand for the autoscaler (written in the
    # background, after the answer: poll briefly).
    for _ in range(100):
        if (await store.executor_load("ml/fast", 20))[1] > 0:
            break
        await asyncio.sleep(0.02)
    assert (await store.executor_load("ml/fast", 20))[1] > 0


async def test_registered_client_needs_no_body(api, store):
    await register(store, "only")
    await store.put_client(ClientRecord(namespace="shop", name="app", type="vision"))
    resp = await api.post("/select/shop/app")
    assert resp.status_code == 200 and resp.json()["model"]["executor"] == "ml/only"


async def test_no_match_is_404_with_reason(api, store):
    await register(store, "vis")
    resp = await api.post("/select/shop/app", json={"required": {"type": "audio"}})
    assert resp.status_code == 404
    data = resp.json()
    assert data["error"] == "no matching model"
    assert "wrong type" in data["reason"] and "type='audio'" in data["reason"]


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"required": {"type": "vision"}, "desired": {"latency": "low"}}', "desired.latency"),
    (b'{"required": {"type": "vision"}, "data_length": -1}', "data_length"),
    (b'{"desired": {"latency": 1}}', "required.type"),
    # Python's json accepts these literals; criteria must not.
    (b'{"required": {"type": "vision"}, "desired": {"latency": NaN}}', "desired.latency"),
    (b'{"required": {"type": "vision"}, "desired": {"accuracy": Infinity}}', "desired.accuracy"),
    (b'{"required": {"type": "vision", "max_latency_ms": Infinity}}', "required.max_latency_ms"),
    (b'{"required": {"type": "vision", "min_accuracy": NaN}}', "required.min_accuracy"),
])
async def test_bad_requests_are_400(api, store, payload, message):
    resp = await api.post("/select/shop/app", content=payload,
                          headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert message in resp.json()["error"]


async def test_healthz_and_metrics(api, store):
    health = await api.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    await api.post("/select/shop/app", json={"required": {"type": "nothing"}})
    metrics = await api.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'mulambda_selector_requests_total{outcome="no_match"} 1.0' in metrics.text
    assert "mulambda_selector_selection_seconds_bucket" in metrics.text


async def test_an_answer_that_cannot_be_json_is_500_and_counted_as_an_error(store):
    await register(store, "fast")
    app = create_app(store, cache_ttl=0)

    def not_json(*_: Any) -> str:
        raise ValueError("Out of range float values are not JSON compliant")

    app[SELECTOR_KEY].answers.answer = not_json  # what a NaN that got past validation does
    async with selector_http(app) as http:
        resp = await http.post("/select/shop/app", json={"required": {"type": "vision"}})
        metrics = (await http.get("/metrics")).text
    assert resp.status_code == 500 and "error" in resp.json()
    assert 'mulambda_selector_requests_total{outcome="error"} 1.0' in metrics
    assert 'mulambda_selector_requests_total{outcome="selected"} 0.0' in metrics


async def test_store_outage_is_503(api, store, redis_server):
    redis_server.stop()
    try:
        resp = await api.post("/select/shop/app", json={"required": {"type": "vision"}})
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"  # the store reconnects by itself
        predicted = await api.post("/v1/predict/shop/app", json={"instances": [[1]]})
        assert (predicted.status_code, predicted.headers["retry-after"]) == (503, "1")
        assert (await api.get("/healthz")).status_code == 503
    finally:
        redis_server.start()


# -- the gateway: POST /v1/predict/{namespace}/{client} ---------------------------------

async def serve(store: MetadataStore, name: str, double: TFServingDouble, *, rtt: float,
                service: float = 5.0, accuracy: float = 0.9) -> str:
    """Register an executor whose Service name does not resolve: only its pod IP (from the
    heartbeat) reaches the double, so an answer proves the gateway picked the replica."""
    rec = ExecutorRecord(
        namespace="ml", name=name, model=f"model-{name}", version=1, type="vision",
        input="image", output="label", accuracy=accuracy,
        rest=f"http://{name}.invalid:{double.port}", grpc="", state="Ready",
        service_time_ms=service,
    )
    await store.put_executor(rec)
    await store.put_replica(ReplicaRecord(executor=rec.id, pod=f"{name}-0", ip="127.0.0.1",
                                          state="Available"), ttl=60)
    await store.put_latencies(rec.id, f"{name}-0", {"shop/app": LatencySample(ms=rtt, samples=1)},
                              ttl=60)
    return rec.id


@pytest.fixture
async def doubles() -> AsyncIterator[list[TFServingDouble]]:
    made: list[TFServingDouble] = []
    yield made
    for d in made:
        await d.stop()


@pytest.fixture
async def client(store: MetadataStore) -> None:
    await store.put_client(ClientRecord(namespace="shop", name="app", type="vision",
                                        latency_weight=1, accuracy_weight=0))


def strict(text: str) -> Any:
    """JSON as a strict parser reads it: NaN and Infinity are errors."""
    def refuse(literal: str) -> Any:
        raise ValueError(f"not JSON: {literal}")
    return json.loads(text, parse_constant=refuse)


async def test_predict_forwards_the_body_to_the_best_executor(api, store, client, doubles):
    fast = await TFServingDouble("fast").start()
    slow = await TFServingDouble("slow").start()
    doubles += [fast, slow]
    await serve(store, "fast", fast, rtt=1)
    await serve(store, "slow", slow, rtt=40)

    resp = await api.post("/v1/predict/shop/app", json={"instances": [[1], [2]]})

    assert resp.status_code == 200, resp.text
    assert strict(resp.text) == {"predictions": [["fast"], ["fast"]]}
    assert resp.headers["x-mulambda-executor"] == "ml/fast"
    assert resp.headers["x-mulambda-replica"] == "fast-0"
    assert resp.headers["x-mulambda-attempts"] == "1"
    assert fast.requests == [{"model": "model-fast", "body": {"instances": [[1], [2]]}}]
    assert slow.requests == []


async def test_predict_counts_its_request_ahead_for_the_stay_and_its_margin(
    api, store, client, doubles
):
    # Other routers see the gateway's request in its lease: ahead of theirs until the
    # predicted stay plus the margin of its typical error has passed, as the SDK's are
    # (a request that runs a little over its prediction is still being served).
    gate = asyncio.Event()
    held = await TFServingDouble("held", on_request=gate.wait).start()
    doubles.append(held)
    await serve(store, "held", held, rtt=1, service=5)
    call = asyncio.create_task(api.post("/v1/predict/shop/app", json={"instances": [[0]]}))
    try:
        timed: dict[str, list[TimedRequest]] = {}
        for _ in range(250):
            _, timed = await store.inflight_load()
            if timed.get("ml/held"):
                break
            await asyncio.sleep(0.02)
        [(pod, busy_until, back_by, inflight, items, stay)] = timed["ml/held"]
    finally:
        gate.set()
    assert (await call).status_code == 200
    assert pod == "held-0"
    # Sent with nothing ahead, one item, a stay of 5 ms: what other routers need to
    # raise the model if it is not back when due (policy/selection.py).
    assert (inflight, items, stay) == (0.0, 1.0, pytest.approx(5.0))
    # Stay 5 ms, network 1 ms: back by sent + 6 ms; ahead until sent + 0.5 + 5 + margin,
    # the margin before any answer being the whole prediction's (ServiceTracker).
    margin = ServiceTracker().stay_margin_ms("ml/held", 5.0)
    assert margin > 5.0
    assert busy_until - back_by == pytest.approx((0.5 + 5 + margin - 6) / 1000, abs=1e-4)


async def test_predict_tries_another_executor_after_a_connect_failure_or_a_503(
    api, store, client, doubles
):
    busy = await TFServingDouble("busy", status=503).start()
    ok = await TFServingDouble("ok").start()
    doubles += [busy, ok]
    down = await TFServingDouble("down").start()
    await serve(store, "down", down, rtt=1)
    await down.stop()  # nothing listens there any more
    await serve(store, "busy", busy, rtt=5)
    await serve(store, "ok", ok, rtt=30)

    resp = await api.post("/v1/predict/shop/app", json={"instances": [[0]]})

    assert resp.status_code == 200, resp.text
    assert resp.headers["x-mulambda-executor"] == "ml/ok"
    assert resp.headers["x-mulambda-attempts"] == "3"
    assert len(busy.requests) == 1 and len(ok.requests) == 1


async def test_a_dead_replica_sends_the_request_to_another_replica_of_its_executor(
    api, store, client, doubles
):
    # The only executor of the type has two replicas; the nearer one's pod is gone (nothing
    # listens on 127.0.0.2) while its heartbeat has not expired yet.
    live = await TFServingDouble("solo").start()
    doubles.append(live)
    rec = ExecutorRecord(namespace="ml", name="solo", model="model-solo", version=1,
                         type="vision", input="image", output="label", accuracy=0.9,
                         rest=f"http://solo.invalid:{live.port}", grpc="", state="Ready",
                         service_time_ms=5)
    await store.put_executor(rec)
    for pod, ip, rtt in (("solo-0", "127.0.0.2", 1.0), ("solo-1", "127.0.0.1", 5.0)):
        await store.put_replica(ReplicaRecord(executor=rec.id, pod=pod, ip=ip,
                                              state="Available"), ttl=60)
        await store.put_latencies(rec.id, pod, {"shop/app": LatencySample(ms=rtt, samples=1)},
                                  ttl=60)

    answers = [await api.post("/v1/predict/shop/app", json={"instances": [[0]]})
               for _ in range(4)]

    assert [(r.status_code, r.headers.get("x-mulambda-replica"),
             r.headers.get("x-mulambda-attempts")) for r in answers] == [
        (200, "solo-1", "2"),  # the dead one first (nearer), then its sibling
        *[(200, "solo-1", "1")] * 3,  # the dead one avoided for suspect_seconds
    ]


async def test_predict_passes_other_errors_through_without_retrying(api, store, client, doubles):
    picky = await TFServingDouble("picky", status=400).start()
    broken = await TFServingDouble("broken", status=500).start()
    other = await TFServingDouble("other").start()
    doubles += [picky, broken, other]
    await serve(store, "picky", picky, rtt=1)
    await serve(store, "other", other, rtt=30)
    resp = await api.post("/v1/predict/shop/app", json={"instances": [[0]]})
    assert resp.status_code == 400 and "picky told to fail" in resp.text
    assert other.requests == []

    await store.remove_executor("ml/picky")
    await serve(store, "broken", broken, rtt=1)
    resp = await api.post("/v1/predict/shop/app", json={"instances": [[0]]})
    assert resp.status_code == 500 and other.requests == []


async def test_predict_counts_its_requests_in_flight_and_routes_around_them(
    api, store, client, doubles
):
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    near = await TFServingDouble("near", on_request=hold).start()
    far = await TFServingDouble("far").start()
    doubles += [near, far]
    await serve(store, "near", near, rtt=1)
    await serve(store, "far", far, rtt=4)

    first = asyncio.create_task(api.post("/v1/predict/shop/app", json={"instances": [[1]]}))
    for _ in range(200):
        if near.requests:
            break
        await asyncio.sleep(0.01)
    # Published for everybody (SDKs, other selector replicas, the autoscaler)...
    for _ in range(100):
        if (await store.executor_load("ml/near"))[0] == 1:
            break
        await asyncio.sleep(0.01)
    assert (await store.executor_load("ml/near"))[0] == 1
    # ...and counted here: the next request goes around it.
    second = await api.post("/v1/predict/shop/app", json={"instances": [[2]]})
    assert second.headers["x-mulambda-executor"] == "ml/far"
    release.set()
    assert (await first).headers["x-mulambda-executor"] == "ml/near"


async def test_predict_turns_away_from_a_request_of_its_own_not_back_when_due(
    api, store, client, doubles
):
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        arrived.set()
        await release.wait()

    stalls = await TFServingDouble("stalls", on_request=hold).start()
    steady = await TFServingDouble("steady").start()
    doubles += [stalls, steady]
    await serve(store, "stalls", stalls, rtt=1, service=5)
    await serve(store, "steady", steady, rtt=1, service=40)

    first = asyncio.create_task(api.post("/v1/predict/shop/app", json={"instances": [[1]]}))
    await asyncio.wait_for(arrived.wait(), 10)
    await asyncio.sleep(0.2)  # due back after about 6 ms
    # One request ahead at 5 ms would leave "stalls" at 11 ms against 41; the one it has
    # held for 200 ms raises what the gateway expects of it.
    second = await api.post("/v1/predict/shop/app", json={"instances": [[2]]})
    assert second.headers["x-mulambda-executor"] == "ml/steady"
    release.set()
    assert (await first).headers["x-mulambda-executor"] == "ml/stalls"


async def test_predict_fits_on_the_others_measurements_read_at_each_decision(
    store, client, doubles
):
    # Both declare fast; another router has since measured "a" at 300 ms. The selector's
    # snapshot (an hour's cache here) predates that; its per-decision read does not.
    a = await TFServingDouble("a").start()
    b = await TFServingDouble("b").start()
    doubles += [a, b]
    await serve(store, "a", a, rtt=1, service=5)
    await serve(store, "b", b, rtt=1, service=20)
    async with selector_http(create_app(store, cache_ttl=3600)) as http:
        first = await http.post("/v1/predict/shop/app", json={"instances": [[0]]})
        assert first.headers["x-mulambda-executor"] == "ml/a"
        other = ServiceTracker()
        for _ in range(5):
            other.observe("ml/a", inflight=0, items=1, elapsed_ms=301, network_ms=1,
                          predicted_ms=5, at=0.0)
        await store.publish_inflight("other-sdk", {}, service=other.take_changed())
        second = await http.post("/v1/predict/shop/app", json={"instances": [[0]]})
        assert second.headers["x-mulambda-executor"] == "ml/b"


@pytest.mark.parametrize("client_rtt", [
    1,
    # The client (its probeUrl) 100 ms from the replica, the gateway next to it: less the
    # client's round trip, the 50 ms model was published as taking nothing, into the
    # statistics every router adds up. The gateway takes off its own.
    100,
])
async def test_predict_feeds_measured_times_to_the_latency_model(api, store, client, doubles,
                                                                 client_rtt):
    async def take_50_ms() -> None:
        await asyncio.sleep(0.05)

    slowish = await TFServingDouble("slowish", on_request=take_50_ms).start()
    doubles.append(slowish)
    await serve(store, "slowish", slowish, rtt=client_rtt, service=1)
    for _ in range(3):
        assert (await api.post("/v1/predict/shop/app", json={"instances": [[0]]})).status_code \
            == 200
    for _ in range(100):
        stats = (await store.service_stats()).get("ml/slowish")
        if stats is not None and stats.count == 3:
            break
        await asyncio.sleep(0.02)
    assert stats is not None and stats.count == 3
    # Measured (no longer the declared 1 ms), and not less the client's round trip.
    assert stats.t / stats.w == pytest.approx(50, abs=20)


@pytest.mark.parametrize(("path", "payload", "status", "error"), [
    ("/v1/predict/shop/nobody", b'{"instances": [[0]]}', 404, "unknown client"),
    ("/v1/predict/shop/app", b"{not json", 400, "not valid JSON"),
    ("/v1/predict/shop/app?type=audio", b'{"instances": [[0]]}', 404, "no matching model"),
    ("/v1/predict/shop/app?latency=fast", b'{"instances": [[0]]}', 400, "latency"),
    ("/v1/predict/shop/app?max_latency_ms=nan", b'{"instances": [[0]]}', 400, "finite"),
])
async def test_predict_errors_are_json_with_the_reason(api, store, client, doubles, path, payload,
                                                       status, error):
    d = await TFServingDouble("d").start()
    doubles.append(d)
    await serve(store, "d", d, rtt=1)
    resp = await api.post(path, content=payload, headers={"Content-Type": "application/json"})
    assert resp.status_code == status
    body = strict(resp.text)
    assert error in body["error"] + str(body.get("reason", ""))
    assert d.requests == []


async def test_predict_answers_502_with_every_attempt_when_all_fail(api, store, client, doubles):
    for name in ("a", "b"):
        gone = await TFServingDouble(name).start()
        await serve(store, name, gone, rtt=1)
        await gone.stop()
    resp = await api.post("/v1/predict/shop/app", json={"instances": [[0]]})
    assert resp.status_code == 502
    body = strict(resp.text)
    assert body["error"] == "all candidates failed"
    assert sorted(a["executor"] for a in body["attempts"]) == ["ml/a", "ml/b"]


async def test_an_answer_longer_than_the_limit_is_502_and_the_gateway_goes_on(
        store, client, doubles):
    # The gateway reads an executor's answer whole before passing it on: bounded by
    # --max-answer-bytes, past which the answer is dropped (never held), the request
    # released and counted, and the next prediction served as before.
    wordy = await TFServingDouble("wordy").start()
    doubles.append(wordy)
    await serve(store, "wordy", wordy, rtt=1)
    app = create_app(store, cache_ttl=0, max_answer_bytes=512)
    async with selector_http(app) as api:
        # {"predictions": [["wordy"], ...]}: 100 instances answer about 1 KiB
        resp = await api.post("/v1/predict/shop/app", json={"instances": [[i] for i in range(100)]})
        assert resp.status_code == 502, resp.text
        body = strict(resp.text)
        assert body["error"] == "executor answer too large"
        assert body["executor"] == "ml/wordy" and "512 bytes" in body["detail"]
        assert len(wordy.requests) == 1  # not tried again elsewhere, nor twice
        assert len(app[SELECTOR_KEY].own) == 0  # released
        small = await api.post("/v1/predict/shop/app", json={"instances": [[1]]})
        assert small.status_code == 200 and strict(small.text) == {"predictions": [["wordy"]]}
        metrics = (await api.get("/metrics")).text
    assert 'mulambda_gateway_requests_total{outcome="answer_too_large"} 1.0' in metrics
    assert 'mulambda_gateway_requests_total{outcome="ok"} 1.0' in metrics


async def test_answers_are_strict_json_even_with_impossible_values_in_the_store(api, store):
    await register(store, "good", accuracy=0.7)
    bad = ExecutorRecord(namespace="ml", name="bad", model="m", version=1, type="vision",
                         input="image", output="label", accuracy=0.9, rest="http://bad:8501",
                         grpc="", state="Ready", service_time_ms=1)
    raw = {k: v for k, v in vars(bad).items()}
    for field, value in (("accuracy", "NaN"), ("service_time_ms", "-Infinity")):
        text = json.dumps({**raw, field: value}).replace(f'"{value}"', value)
        await store.redis.hset(store.executors_key, "ml/bad", text)
        await store.put_replica(ReplicaRecord(executor="ml/bad", pod="bad-0", state="Available"),
                                ttl=60)
        resp = await api.post("/select/shop/app", json={"required": {"type": "vision"}})
        assert resp.status_code == 200
        body = strict(resp.text)
        assert body["model"]["executor"] == "ml/good"
        assert [c["executor"] for c in body["candidates"]] == ["ml/good"]


ASLEEP = ExecutorRecord(
    namespace="ml", name="asleep", model="model-asleep", version=1, type="vision",
    input="image", output="label", accuracy=0.9, rest="http://asleep.invalid:8501", grpc="",
    state="ScaledToZero", min_replicas=0, service_time_ms=5.0)  # at zero: only a cold start


async def test_predict_waits_for_a_cold_start_then_answers_503_worth_retrying(store, client):
    """Only an executor at zero: the gateway signals demand for it and waits up to its
    cold-start timeout; the activation goes on, so the answer says to retry."""
    await store.put_executor(ASLEEP)
    async with selector_http(create_app(store, cache_ttl=0, cold_start_timeout=0.3,
                                        demand_interval=0.05)) as http:
        started = asyncio.get_running_loop().time()
        resp = await http.post("/v1/predict/shop/app", json={"instances": [[1]]})
        waited = asyncio.get_running_loop().time() - started
    assert resp.status_code == 503, resp.text
    assert strict(resp.text) == {"error": "cold start not done", "executor": "ml/asleep",
                                 "waited_seconds": 0.3}
    assert resp.headers["retry-after"] == "1"
    assert waited >= 0.3
    assert (await store.executor_load("ml/asleep", 20))[1] > 0  # demand was signalled


async def test_a_store_gone_during_a_cold_start_wait_is_503_not_a_crash(store, client,
                                                                        redis_server):
    await store.put_executor(ASLEEP)
    async with selector_http(create_app(store, cache_ttl=0, cold_start_timeout=1.5)) as http:
        waiting = asyncio.ensure_future(
            http.post("/v1/predict/shop/app", json={"instances": [[1]]}))
        await asyncio.sleep(0.3)  # waiting for the activation
        redis_server.stop()
        try:
            resp = await waiting
        finally:
            redis_server.start()
    assert resp.status_code == 503, resp.text  # was a 500 "Internal Server Error"
    assert strict(resp.text) == {"error": "metadata store unavailable",
                                 "executor": "ml/asleep"}
    assert resp.headers["retry-after"] == "1"
