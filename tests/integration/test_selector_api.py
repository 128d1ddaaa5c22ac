"""Contract of the selector HTTP API, served on loopback against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from mulambda.selector import create_app
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, ExecutorRecord, LatencySample, ReplicaRecord

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
    runner = web.AppRunner(create_app(store, cache_ttl=0))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        yield http
    await runner.cleanup()


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


async def test_store_outage_is_503(api, store, redis_server):
    redis_server.stop()
    try:
        resp = await api.post("/select/shop/app", json={"required": {"type": "vision"}})
        assert resp.status_code == 503
        assert (await api.get("/healthz")).status_code == 503
    finally:
        redis_server.start()
