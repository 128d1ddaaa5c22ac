"""``mulambda explain`` and ``GET /v1/explain/NAMESPACE/CLIENT`` against a real redis-server.

The store holds one fleet with an executor excluded by each criterion and a
value that does not decode; the command reads it as a user that may only
read (an ACL user with read commands on every key family), the selector
route through the real selector application, and the route's authorization
is decided by the real API server (the chart's RBAC, TokenRequest tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from mulambda.authz import ApiServer, Authorizer, install
from mulambda.selector.app import create_app
from mulambda.store.acl import FAMILIES, Role, acl_file, acl_line
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import (
    ClientRecord,
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
)
from mulambda.tools.explain import explain_client, render

from support import identity
from support.cluster import Cluster
from support.controlplane import ControlPlane
from support.operator_fixtures import release_namespace
from support.procs import RedisServer
from support.selector_http import selector_http

pytestmark = pytest.mark.integration

P = "explain"
VIEWER = Role("viewer", "mulambda-viewer", "reads every key family, writes nothing",
              read=FAMILIES, write=(),
              commands=("hget", "hgetall", "hkeys", "hscan", "hmget", "xrange", "xrevrange"))
VIEWER_PASSWORD = "viewer-pw-0123456789"
CLIENT = "apps/shop"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    s = RedisServer(acl=acl_file(P, {}) + acl_line(VIEWER, P, VIEWER_PASSWORD) + "\n")
    s.start()
    yield s
    s.stop()


def executor(name: str, *, type: str = "vision", input: str = "image", output: str = "label",
             accuracy: float | None = 0.8, service: float = 10.0, state: str = "Ready",
             min_replicas: int = 1) -> ExecutorRecord:
    return ExecutorRecord(namespace="ml", name=name, model=name, version=1, type=type,
                          input=input, output=output, accuracy=accuracy,
                          rest=f"http://{name}.ml:8501", grpc=f"{name}.ml:8500", state=state,
                          min_replicas=min_replicas, service_time_ms=service)


def admin_store(server: RedisServer) -> MetadataStore:
    """The harness's own user, whatever MULAMBDA_REDIS_USERNAME says."""
    return MetadataStore(aioredis.Redis.from_url(
        server.url, username=RedisServer.ADMIN_USER, password=server.admin_password,
        decode_responses=True), prefix=P)


@pytest.fixture
async def fleet(server: RedisServer) -> AsyncIterator[None]:
    """The fleet, written as the store's admin (the operator and companions would)."""
    admin = admin_store(server)
    server.flush()
    await admin.put_client(ClientRecord(namespace="apps", name="shop", type="vision",
                                        input="image", latency_weight=2, accuracy_weight=1,
                                        max_latency_ms=100, min_accuracy=0.7))
    for rec in (executor("fast", service=5), executor("accurate", accuracy=0.95, service=30),
                executor("asleep", accuracy=0.99, state="ScaledToZero", min_replicas=0),
                executor("words", type="nlp"), executor("text-in", input="text"),
                executor("broken", state="Failed"), executor("rough", accuracy=0.5),
                executor("slow", service=400)):
        await admin.put_executor(rec)
        if rec.state == "Ready":
            await admin.put_replica(ReplicaRecord(executor=rec.id, pod=f"{rec.name}-0",
                                                  state="Available"), ttl=600)
            await admin.put_latencies(rec.id, f"{rec.name}-0",
                                      {CLIENT: LatencySample(ms=2.0, samples=3)}, ttl=600)
    # What a broken writer might leave: never a candidate, named as unreadable.
    await admin.redis.hset(admin.executors_key, "ml/garbage", '{"name": NaN')
    await admin.close()
    yield


@pytest.fixture
async def viewer(server: RedisServer, fleet: None,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MetadataStore]:
    monkeypatch.setenv("MULAMBDA_REDIS_USERNAME", VIEWER.username)
    monkeypatch.setenv("MULAMBDA_REDIS_PASSWORD", VIEWER_PASSWORD)
    store = MetadataStore.from_url(server.url, prefix=P)
    yield store
    await store.close()


EXPECTED_EXCLUSIONS = {
    "ml/words": "type", "ml/text-in": "input", "ml/broken": "serving",
    "ml/rough": "min_accuracy", "ml/slow": "max_latency", "ml/garbage": "record",
}


async def test_explain_reads_the_store_and_accounts_for_every_executor(
        viewer: MetadataStore) -> None:
    found = await explain_client(viewer, CLIENT)
    assert found is not None
    assert [v.executor for v in found.candidates] == ["ml/fast", "ml/accurate", "ml/asleep"]
    assert {v.executor: v.criterion for v in found.excluded} == EXPECTED_EXCLUSIONS
    fast = found.candidates[0].candidate
    assert fast is not None
    assert (fast.network_ms, fast.service_ms, fast.cold_start_ms) == (2.0, 5.0, 0.0)
    asleep = found.candidates[2].candidate
    assert asleep is not None and not asleep.warm and asleep.cold_start_ms == 30_000
    assert found.why.startswith("ml/fast scores")
    text = render(found)
    for executor_id in [*EXPECTED_EXCLUSIONS, "ml/fast", "ml/asleep"]:
        assert executor_id in text
    assert "winner: ml/fast" in text


async def test_an_unregistered_client_has_no_explanation(viewer: MetadataStore) -> None:
    assert await explain_client(viewer, "apps/nobody") is None


def run_cli(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MULAMBDA_REDIS_URL": server.url, "MULAMBDA_KEY_PREFIX": P,
           "MULAMBDA_REDIS_USERNAME": VIEWER.username, "MULAMBDA_REDIS_PASSWORD": VIEWER_PASSWORD}
    return subprocess.run([sys.executable, "-m", "mulambda", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd="/")


def test_the_command_prints_the_table_or_json_as_a_read_only_user(
        server: RedisServer, fleet: None) -> None:
    server.command("CONFIG", "RESETSTAT")
    done = run_cli(server, "explain", CLIENT, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["winner"] == "ml/fast"
    assert {e["executor"]: e["criterion"] for e in data["excluded"]} == EXPECTED_EXCLUSIONS
    text = run_cli(server, "explain", CLIENT)
    assert text.returncode == 0 and "candidates (best first)" in text.stdout
    missing = run_cli(server, "explain", "apps/nobody")
    assert missing.returncode == 2 and "not registered" in missing.stderr
    stats = server.command("INFO", "commandstats").decode()
    used = {line.split(":", 1)[0].removeprefix("cmdstat_") for line in stats.splitlines()
            if line.startswith("cmdstat_")}
    assert used and used <= {"hget", "hgetall", "hkeys", "hscan", "auth", "client|setinfo",
                             "info", "config|resetstat", "ping", "select", "hello"}, used


@pytest.fixture
async def api(server: RedisServer, fleet: None,
              viewer: MetadataStore) -> AsyncIterator[httpx.AsyncClient]:
    """The real selector application over the fleet (as the read-only user: explain
    must not need to write)."""
    async with selector_http(create_app(viewer, cache_ttl=0)) as http:
        yield http


async def test_the_selector_route_gives_the_same_explanation(
        api: httpx.AsyncClient, viewer: MetadataStore) -> None:
    resp = await api.get(f"/v1/explain/{CLIENT}")
    assert resp.status_code == 200, resp.text
    data = resp.json()
    local = await explain_client(viewer, CLIENT)
    assert local is not None
    assert data["winner"] == local.winner
    assert [c["executor"] for c in data["candidates"]] == [v.executor for v in local.candidates]
    # The selector cannot list undecodable ids (its store user may not HKEYS): the rest agree.
    assert {e["executor"]: e["criterion"] for e in data["excluded"]} == {
        k: v for k, v in EXPECTED_EXCLUSIONS.items() if k != "ml/garbage"}
    # Query parameters override the registered criteria, as the gateway's do.
    what_if = (await api.get(f"/v1/explain/{CLIENT}", params={"type": "nlp"})).json()
    assert what_if["winner"] == "ml/words"


@pytest.mark.parametrize(("path", "params", "status", "error"), [
    ("/v1/explain/apps/nobody", {}, 404, "unknown client"),
    (f"/v1/explain/{CLIENT}", {"latency": "fast"}, 400, "query parameter latency must be a number"),
    (f"/v1/explain/{CLIENT}", {"min_accuracy": "2"}, 400, "min_accuracy must be within [0, 1]"),
])
async def test_bad_requests_get_a_json_error(api: httpx.AsyncClient, path: str,
                                             params: dict[str, str], status: int,
                                             error: str) -> None:
    resp = await api.get(path, params=params)
    assert resp.status_code == status
    assert error in resp.json()["error"]


async def test_the_route_answers_503_when_the_store_is_gone(fleet: None) -> None:
    gone = MetadataStore.from_url("redis://127.0.0.1:1/0", prefix=P, timeout=0.5)
    try:
        async with selector_http(create_app(gone, cache_ttl=0)) as http:
            resp = await http.get(f"/v1/explain/{CLIENT}")
        assert resp.status_code == 503
        assert resp.json() == {"error": "metadata store unavailable"}
    finally:
        await gone.close()


# -- authorization: the real API server decides -------------------------------------------

CALLER_ROLE = f"{identity.RELEASE}-client-caller"
SELECTOR_SA = f"{identity.RELEASE}-selector"


@pytest.fixture(scope="module")
def tokens(controlplane: ControlPlane, cluster: Cluster) -> Iterator[dict[str, str]]:
    """The selector's token, and a caller allowed to select Clients in ``apps-X`` only."""
    if cluster.get("v1", "namespaces", None, identity.NAMESPACE) is None:
        cluster.create({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": identity.NAMESPACE}})
    controlplane.kubectl("apply", "-f", "-",
                         input=yaml.safe_dump_all(identity.render_rbac(controlplane)))
    ns = f"t-explain-{uuid.uuid4().hex[:6]}"
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    cluster.create({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "caller", "namespace": ns}})
    cluster.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "caller", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": CALLER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": "caller", "namespace": ns}]})
    yield {"namespace": ns,
           "selector": identity.request_token(cluster, identity.NAMESPACE, SELECTOR_SA),
           "caller": identity.request_token(cluster, ns, "caller")}
    release_namespace(cluster, ns)


async def test_explain_is_authorized_like_select(
        controlplane: ControlPlane, tokens: dict[str, str], viewer: MetadataStore,
        server: RedisServer) -> None:
    ns = tokens["namespace"]
    admin = admin_store(server)
    await admin.put_client(ClientRecord(namespace=ns, name="shop", type="vision"))
    await admin.close()
    app = create_app(viewer, cache_ttl=0)
    install(app, Authorizer(ApiServer(server=controlplane.server,
                                      ca_file=str(controlplane.pki / "ca.crt"),
                                      token=tokens["selector"])))
    bearer = {"Authorization": f"Bearer {tokens['caller']}"}
    async with selector_http(app) as http:
        mine = await http.get(f"/v1/explain/{ns}/shop", headers=bearer)
        assert mine.status_code == 200, mine.text
        assert mine.json()["winner"] == "ml/fast"
        theirs = await http.get(f"/v1/explain/{CLIENT}", headers=bearer)
        assert theirs.status_code == 403
        assert "may not select" in theirs.json()["error"]
        anonymous = await http.get(f"/v1/explain/{ns}/shop")
        assert anonymous.status_code == 401
