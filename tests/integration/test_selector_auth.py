"""Who may call the selector and the gateway, decided by the real API server.

The chart's RBAC (rendered by the real ``helm``, applied by ``kubectl``) gives
the selector's ServiceAccount its reviews and defines the caller role tenants
bind; tokens come from the TokenRequest API. A tiny aiohttp app carries
:mod:`mulambda.authz`'s middleware in front of a handler that answers who
called, on the selector's and the gateway's route shapes. What the selector
asked the API server is read from the server's audit log, by its user.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mulambda.authz import CALLER, ApiServer, Authorizer, install

from support import identity
from support.cluster import Cluster
from support.controlplane import ControlPlane, free_port
from support.operator_fixtures import release_namespace

pytestmark = pytest.mark.integration

SELECTOR_SA = f"{identity.RELEASE}-selector"
SELECTOR_USER = f"system:serviceaccount:{identity.NAMESPACE}:{SELECTOR_SA}"
CALLER_ROLE = f"{identity.RELEASE}-client-caller"
REVIEWS = ("tokenreviews", "subjectaccessreviews")


@dataclass
class Tenants:
    """Namespace ``a`` (its ServiceAccount ``caller`` bound to the caller role there) and
    ``b`` (``intruder``, bound in ``b`` only); the selector's own token."""

    a: str
    b: str
    selector_token: str
    a_token: str
    b_token: str


def bind_caller_role(cluster: Cluster, namespace: str, account: str, role: str) -> None:
    cluster.create({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": account, "namespace": namespace}})
    cluster.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": f"{account}-{role}", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
    })


@pytest.fixture(scope="module")
def tenants(controlplane: ControlPlane, cluster: Cluster) -> Iterator[Tenants]:
    if cluster.get("v1", "namespaces", None, identity.NAMESPACE) is None:
        cluster.create({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": identity.NAMESPACE}})
    docs = identity.render_rbac(controlplane)
    assert any(d["metadata"]["name"] == CALLER_ROLE for d in docs)
    controlplane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    a, b = (f"t-auth-{uuid.uuid4().hex[:6]}" for _ in range(2))
    for name in (a, b):
        cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    bind_caller_role(cluster, a, "caller", CALLER_ROLE)
    bind_caller_role(cluster, b, "intruder", CALLER_ROLE)
    yield Tenants(a, b, identity.request_token(cluster, identity.NAMESPACE, SELECTOR_SA),
                  identity.request_token(cluster, a, "caller"),
                  identity.request_token(cluster, b, "intruder"))
    for name in (a, b):
        release_namespace(cluster, name)


async def whoever(request: web.Request) -> web.Response:
    return web.json_response({"caller": request[CALLER].username,
                              "route": request.match_info.route.resource.canonical})


async def ok(_request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def selector_api(controlplane: ControlPlane, token: str) -> ApiServer:
    return ApiServer(server=controlplane.server, ca_file=str(controlplane.pki / "ca.crt"),
                     token=token)


async def serve(authorizer: Authorizer) -> TestClient:  # type: ignore[type-arg]
    app = web.Application()
    install(app, authorizer)
    # The selector's and the gateway's route shapes.
    app.router.add_post("/select/{client:.+}", whoever)
    app.router.add_post("/v1/predict/{namespace}/{client}", whoever)
    app.router.add_post("/v1/explain/{namespace}/{client}", whoever)
    app.router.add_get("/v1/tasks/{namespace}/{client}", whoever)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/metrics", ok)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def app(controlplane: ControlPlane, tenants: Tenants,
              clock: Clock) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    authorizer = Authorizer(selector_api(controlplane, tenants.selector_token), ttl=5.0,
                            clock=clock)
    client = await serve(authorizer)
    yield client
    await client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def reviews(cluster: Cluster, since: int) -> list[str]:
    """The reviews the selector's ServiceAccount sent since ``since``, as 'resource code'."""
    return [f"{e.resource} {e.code}" for e in cluster.audit(user=SELECTOR_USER, since=since)
            if e.resource in REVIEWS]


async def test_a_caller_bound_in_its_namespace_may_select_and_predict_its_client(
        app: TestClient, tenants: Tenants) -> None:  # type: ignore[type-arg]
    user = f"system:serviceaccount:{tenants.a}:caller"
    for method, path in (("POST", f"/select/{tenants.a}/c1"), ("POST", f"/select/{tenants.a}%2Fc1"),
                         ("POST", f"/v1/predict/{tenants.a}/c1"),
                         ("POST", f"/v1/explain/{tenants.a}/c1"),
                         ("GET", f"/v1/tasks/{tenants.a}/c1")):
        resp = await app.request(method, path, headers=bearer(tenants.a_token))
        assert resp.status == 200, (path, await resp.text())
        assert (await resp.json())["caller"] == user


async def test_another_namespaces_service_account_is_refused_with_403(
        app: TestClient, tenants: Tenants) -> None:  # type: ignore[type-arg]
    for path in (f"/select/{tenants.a}/c1", f"/v1/predict/{tenants.a}/c1"):
        resp = await app.post(path, headers=bearer(tenants.b_token))
        assert resp.status == 403
        error = (await resp.json())["error"]
        assert f"system:serviceaccount:{tenants.b}:intruder may not select" in error
        assert repr(tenants.a) in error
    # The same token is good for its own namespace: the refusal is about namespace a.
    resp = await app.post(f"/select/{tenants.b}/c1", headers=bearer(tenants.b_token))
    assert resp.status == 200


async def test_no_token_is_401_and_health_stays_open(
        app: TestClient, tenants: Tenants) -> None:  # type: ignore[type-arg]
    for headers in ({}, {"Authorization": f"Basic {tenants.a_token}"}):
        resp = await app.post(f"/select/{tenants.a}/c1", headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert "token is required" in (await resp.json())["error"]
    assert (await app.get("/healthz")).status == 200
    assert (await app.get("/nowhere")).status == 404


async def test_metrics_are_for_whoever_may_get_them(
        app: TestClient, tenants: Tenants, cluster: Cluster) -> None:  # type: ignore[type-arg]
    # They name every tenant's Clients and executors, with their latencies: open, any
    # tenant that could reach the selector read them.
    assert (await app.get("/metrics")).status == 401
    resp = await app.get("/metrics", headers=bearer(tenants.a_token))
    assert resp.status == 403
    assert (f"system:serviceaccount:{tenants.a}:caller may not get /metrics"
            in (await resp.json())["error"])
    # A Prometheus bound to the chart's ClusterRole.
    cluster.create({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "prometheus", "namespace": tenants.b}})
    cluster.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": f"prometheus-{tenants.b}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": f"{identity.RELEASE}-metrics-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "prometheus", "namespace": tenants.b}],
    })
    try:
        token = identity.request_token(cluster, tenants.b, "prometheus")
        resp = await app.get("/metrics", headers=bearer(token))
        assert resp.status == 200, await resp.text()
    finally:
        cluster.delete("rbac.authorization.k8s.io/v1", "clusterrolebindings", None,
                       f"prometheus-{tenants.b}")


async def test_a_garbage_token_is_401(app: TestClient, tenants: Tenants,
                                      cluster: Cluster) -> None:  # type: ignore[type-arg]
    mark = cluster.audit_mark()
    resp = await app.post(f"/select/{tenants.a}/c1", headers=bearer("not a token"))
    assert resp.status == 401
    assert reviews(cluster, mark) == [], "a token of the wrong shape costs no review"
    # Shaped like a JWT, signed by no one the API server trusts: the TokenReview says no.
    header, payload, _ = tenants.a_token.split(".")
    for forged in (f"{header}.{payload}.AAAA", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.x"):
        resp = await app.post(f"/select/{tenants.a}/c1", headers=bearer(forged))
        assert resp.status == 401
        assert (await resp.json())["error"] == "the token was not accepted"
    assert reviews(cluster, mark) == ["tokenreviews 201", "tokenreviews 201"]


async def test_decisions_are_cached_within_the_ttl_and_asked_again_after(
        app: TestClient, tenants: Tenants, cluster: Cluster,
        clock: Clock) -> None:  # type: ignore[type-arg]
    path = f"/v1/predict/{tenants.a}/c1"
    mark = cluster.audit_mark()
    assert (await app.post(path, headers=bearer(tenants.a_token))).status == 200
    assert reviews(cluster, mark) == ["tokenreviews 201", "subjectaccessreviews 201"]
    mark = cluster.audit_mark()
    clock.now += 4.0  # within the 5 s TTL
    for _ in range(3):
        assert (await app.post(path, headers=bearer(tenants.a_token))).status == 200
    assert (await app.post(f"/select/{tenants.a}/c1",
                           headers=bearer(tenants.b_token))).status == 403
    assert (await app.post(f"/select/{tenants.a}/c1",
                           headers=bearer(tenants.b_token))).status == 403
    # Only the new caller's first question reached the API server.
    assert reviews(cluster, mark) == ["tokenreviews 201", "subjectaccessreviews 201"]
    mark = cluster.audit_mark()
    clock.now += 2.0  # past the TTL of the first decision
    assert (await app.post(path, headers=bearer(tenants.a_token))).status == 200
    assert reviews(cluster, mark) == ["tokenreviews 201", "subjectaccessreviews 201"]


async def test_a_burst_of_one_new_caller_costs_one_review_of_each_kind(
        app: TestClient, tenants: Tenants, cluster: Cluster) -> None:  # type: ignore[type-arg]
    token = identity.request_token(cluster, tenants.a, "caller")  # not cached yet
    mark = cluster.audit_mark()
    answers = await asyncio.gather(*(
        app.post(f"/select/{tenants.a}/c1", headers=bearer(token)) for _ in range(30)))
    assert [r.status for r in answers] == [200] * 30
    assert reviews(cluster, mark) == ["tokenreviews 201", "subjectaccessreviews 201"]


async def test_namespace_editors_hold_the_caller_role_through_aggregation(
        app: TestClient, tenants: Tenants, cluster: Cluster) -> None:  # type: ignore[type-arg]
    bind_caller_role(cluster, tenants.a, "editor", "edit")
    token = identity.request_token(cluster, tenants.a, "editor")
    edit = lambda: cluster.get("rbac.authorization.k8s.io/v1", "clusterroles", None, "edit")  # noqa: E731
    cluster.wait_for(lambda: any("select" in rule.get("verbs", [])
                                 for rule in (edit() or {}).get("rules") or []),
                     what="the caller role aggregated into edit")
    resp = await app.post(f"/select/{tenants.a}/c1", headers=bearer(token))
    assert resp.status == 200, await resp.text()


async def test_a_token_for_another_audience_is_refused_when_audiences_are_required(
        controlplane: ControlPlane, tenants: Tenants, cluster: Cluster) -> None:
    scoped = cluster.request(
        "POST", f"/api/v1/namespaces/{tenants.a}/serviceaccounts/caller/token",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
              "spec": {"audiences": ["mulambda-selector"], "expirationSeconds": 3600}})
    assert scoped is not None
    authorizer = Authorizer(selector_api(controlplane, tenants.selector_token),
                            audiences=["mulambda-selector"])
    client = await serve(authorizer)
    try:
        resp = await client.post(f"/select/{tenants.a}/c1",
                                 headers=bearer(scoped["status"]["token"]))
        assert resp.status == 200, await resp.text()
        # The default token (the API server's audience) would let a selector replay it there.
        resp = await client.post(f"/select/{tenants.a}/c1", headers=bearer(tenants.a_token))
        assert resp.status == 401
    finally:
        await client.close()


async def test_api_server_unreachable_or_refusing_the_selector_is_503(
        controlplane: ControlPlane, tenants: Tenants) -> None:
    # Nothing listens there.
    down = ApiServer(server=f"https://127.0.0.1:{free_port()}",
                     ca_file=str(controlplane.pki / "ca.crt"), token=tenants.selector_token)
    # A ServiceAccount without the chart's review role: the server refuses the reviews.
    unprivileged = selector_api(controlplane, tenants.b_token)
    for api in (down, unprivileged):
        client = await serve(Authorizer(api, timeout=5.0))
        try:
            resp = await client.post(f"/select/{tenants.a}/c1", headers=bearer(tenants.a_token))
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert "Kubernetes API is unavailable" in (await resp.json())["error"]
            # Not cached: the next request asks again (and is refused again).
            resp = await client.post(f"/select/{tenants.a}/c1", headers=bearer(tenants.a_token))
            assert resp.status == 503
        finally:
            await client.close()


async def test_many_distinct_tokens_stay_within_the_cache_bound(
        controlplane: ControlPlane, tenants: Tenants) -> None:
    authorizer = Authorizer(selector_api(controlplane, tenants.selector_token), max_entries=8)
    client = await serve(authorizer)
    try:
        header, payload, _ = tenants.a_token.split(".")
        async with asyncio.timeout(60):
            for i in range(40):
                resp = await client.post(f"/select/{tenants.a}/c1",
                                         headers=bearer(f"{header}.{payload}.forged{i}"))
                assert resp.status == 401
        assert len(authorizer._tokens) == 8
        assert authorizer.reviews["tokenreviews"] == 40
    finally:
        await client.close()

