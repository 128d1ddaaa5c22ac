"""Who may submit, read and cancel tasks, decided by the real API server: the selector's
real task routes behind mulambda.authz, tenants' ServiceAccount tokens from the
TokenRequest API (fixtures of test_selector_auth). A task id names its Client, so a
tenant allowed to use its own Client cannot read or cancel another tenant's task."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mulambda.authz import Authorizer, install
from mulambda.companion.worker import Worker
from mulambda.selector.app import create_app
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, ExecutorRecord, ReplicaRecord
from mulambda.tasks.queue import TaskQueue

from .test_selector_auth import Tenants, bearer, selector_api, tenants  # noqa: F401
from support.controlplane import ControlPlane
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

MODEL = "half_plus_two"


@pytest.fixture
async def api(controlplane: ControlPlane, tenants: Tenants,  # noqa: F811
              store: MetadataStore) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    await store.put_executor(ExecutorRecord(
        namespace="ml", name="hp2", model=MODEL, version=1, type="regression", input="t",
        output="t", accuracy=0.9, rest="http://hp2.ml:8501", grpc="hp2.ml:8500",
        state="Ready", service_time_ms=5))
    await store.put_replica(ReplicaRecord(executor="ml/hp2", pod="hp2-0", state="Available",
                                          version=1), ttl=60)
    for namespace in (tenants.a, tenants.b):
        await store.put_client(ClientRecord(namespace=namespace, name="app", type="regression"))
    app = create_app(store, cache_ttl=0)
    install(app, Authorizer(selector_api(controlplane, tenants.selector_token), ttl=5.0))
    client = TestClient(TestServer(app))
    await client.start_server()
    async with TFServingDouble(MODEL) as double:
        stop = asyncio.Event()
        worker = Worker(TaskQueue(store), executor="ml/hp2", consumer="hp2-0", model=MODEL,
                        serving_url=double.url, concurrency=2, visibility=1.0, drain=1.0,
                        predict_timeout=5.0, ready=lambda: True)
        running = asyncio.create_task(worker.run(stop))
        yield client
        stop.set()
        await asyncio.wait_for(running, 10)
    await client.close()


async def finished(api: TestClient, task_id: str, token: str) -> dict:  # type: ignore[type-arg]
    for _ in range(200):
        resp = await api.get(f"/v1/tasks/{task_id}", headers=bearer(token))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        if body["status"] == "succeeded":
            return dict(body)
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish")


async def test_a_tenant_reads_its_own_results_and_never_another_tenants(
        api, tenants: Tenants):  # noqa: F811
    a_task = await api.post(f"/v1/tasks/{tenants.a}/app", json={"instances": [1.0]},
                            headers=bearer(tenants.a_token))
    b_task = await api.post(f"/v1/tasks/{tenants.b}/app", json={"instances": [2.0]},
                            headers=bearer(tenants.b_token))
    assert a_task.status == b_task.status == 202
    a_id, b_id = (await a_task.json())["id"], (await b_task.json())["id"]
    assert (await finished(api, a_id, tenants.a_token))["result"] == {
        "predictions": [[MODEL]]}
    await finished(api, b_id, tenants.b_token)

    # A's token on B's task: refused before anything is read.
    for method in ("GET", "DELETE"):
        resp = await api.request(method, f"/v1/tasks/{b_id}", headers=bearer(tenants.a_token))
        assert resp.status == 403
        text = await resp.text()
        assert f"{tenants.b}" in text and "predictions" not in text
    # Nor may A queue work on B's Client, or read anything without a token.
    resp = await api.post(f"/v1/tasks/{tenants.b}/app", json={"instances": [1.0]},
                          headers=bearer(tenants.a_token))
    assert resp.status == 403
    resp = await api.get(f"/v1/tasks/{a_id}")
    assert resp.status == 401
    assert "predictions" not in json.dumps(await resp.json())
