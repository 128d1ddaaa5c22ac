"""T2 (docs/security.md): a holder of the companions' store credential forges heartbeats
for an executor whose pods sign theirs, against a real redis-server with the store's
ACLs, a real companion heartbeat, the SDK and the gateway: no request reaches the
forger's endpoint."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from aiohttp import web

from mulambda.companion.heartbeat import Heartbeat
from mulambda.companion.server import ModelState
from mulambda.sdk import MulambdaClient
from mulambda.selector.app import create_app, selector_server_options
from mulambda.store.heartbeats import Signer, executor_seed, public_key
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ExecutorRecord, ReplicaRecord

from support.acl_store import role_stores
from support.procs import RedisServer
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

P = "t2"
SEED = executor_seed(b"operator-secret-for-this-test", "ml", "hp2", "uid-1")
OTHER = executor_seed(b"operator-secret-for-this-test", "ml", "evil", "uid-2")
PORT = 8501  # the record's REST port: routers address pods there


def _ip() -> str:
    return "127." + ".".join(str(random.randrange(1, 255)) for _ in range(3))


@pytest.fixture
async def stores(acl_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
    dict[str, MetadataStore]
]:
    acl_redis.flush()
    out = role_stores(acl_redis.url, P, monkeypatch, ("operator", "companion", "selector", "sdk"))
    yield out
    for s in out.values():
        await s.close()


async def test_forged_heartbeats_draw_no_request(stores):
    real_ip, evil_ip = _ip(), _ip()
    real = await TFServingDouble("half_plus_two", host=real_ip, port=PORT).start()
    evil = await TFServingDouble("half_plus_two", host=evil_ip, port=PORT).start()
    app = create_app(stores["selector"])
    runner = web.AppRunner(app, **selector_server_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    gateway = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        # The operator's record, with the executor's public key.
        rec = ExecutorRecord(namespace="ml", name="hp2", model="half_plus_two", version=1,
                             type="regression", input="tensor", output="tensor", accuracy=0.9,
                             rest="http://hp2.ml:8501", grpc="hp2.ml:8500", state="Ready",
                             service_time_ms=5.0, heartbeat_key=public_key(SEED))
        await stores["operator"].put_executor(rec)
        # The executor's own pod: the companion's heartbeat, signed.
        state = ModelState()
        state.state, state.version = "Available", 1
        beat = Heartbeat(stores["companion"], state, executor=rec.id, pod="hp2-0",
                         ip=real_ip, ttl=30, interval=10, signer=Signer(SEED))
        assert await beat.publish()
        [signed] = await stores["operator"].list_replicas(rec.id)
        # The forger: the same companion credential, heartbeats of "pods" of hp2 that
        # point at its own endpoint, more of them than the real one.
        forged = [
            ReplicaRecord(executor=rec.id, pod="hp2-x", ip=evil_ip, state="Available",
                          version=1),  # unsigned
            replace(signed, pod="hp2-y", ip=evil_ip),  # the real signature, moved
            Signer(OTHER).sign(ReplicaRecord(executor=rec.id, pod="hp2-z", ip=evil_ip,
                                             state="Available", version=1), time.time()),
        ]
        for r in forged:
            await stores["companion"].put_replica(r, ttl=30)
        assert len(await stores["operator"].list_replicas(rec.id)) == 4  # ACLs let it

        async with MulambdaClient(stores["sdk"], "apps/shop", type="regression") as mu:
            for _ in range(20):
                result = await mu.predict([1.0, 2.0])
                assert result.executor == rec.id
        async with httpx.AsyncClient(base_url=gateway) as http:
            for _ in range(20):
                resp = await http.post("/v1/predict/apps/shop?type=regression",
                                       json={"instances": [1.0, 2.0]})
                assert resp.status_code == 200, resp.text
                assert resp.headers["X-Mulambda-Replica"] == "hp2-0"
        assert len(real.requests) == 40
        assert evil.requests == []

        # Without the real pod's heartbeat the executor has no live replica: nothing is
        # sent anywhere (its traffic waits or moves on; none reaches the forger).
        await stores["companion"].remove_replica(rec.id, "hp2-0")
        async with MulambdaClient(stores["sdk"], "apps/shop", type="regression",
                                  cache_ttl=0) as mu:
            ranking = await mu.ranking()
            assert not ranking and "none signed" in ranking.rejected[rec.id]
        await asyncio.sleep(0)
        assert evil.requests == []
    finally:
        await runner.cleanup()
        await real.stop()
        await evil.stop()
