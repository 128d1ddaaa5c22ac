"""The example model served end to end on a real cluster (after ``make up``).

One ModelExecutor built from examples/modelexecutor.yaml, under a unique
name and a unique trait type (so only it can match the test's Client, even
beside the `make up` example), goes Ready, answers half_plus_two predictions
over REST and through the SDK, gets selected by a Client, and leaves nothing
behind when deleted.
Tests depend on each other's order: they share the module's executor.
"""

from __future__ import annotations

import copy
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mulambda.store.metadata import MetadataStore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
READY_TIMEOUT = 420.0  # image pulls (TF Serving is ~500 MB) dominate on a fresh kind cluster
SUFFIX = secrets.token_hex(3)
EXECUTOR = f"e2e-hpt-{SUFFIX}"
CLIENT = f"e2e-client-{SUFFIX}"
TYPE = f"e2e-{SUFFIX}"
# Mirrors tests/e2e/conftest.py (the `e2e` fixture checks they agree).
NAMESPACE = os.environ.get("MULAMBDA_E2E_NAMESPACE", "mulambda")
RELEASE = os.environ.get("MULAMBDA_E2E_RELEASE", "mulambda")
GROUP, VERSION = "mulambda.io", "v1alpha1"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


@pytest.fixture(scope="module")
def custom(kube: Any, e2e: Any) -> Any:
    from kubernetes import client

    assert (e2e.namespace, e2e.release, e2e.group, e2e.version) == (
        NAMESPACE, RELEASE, GROUP, VERSION)
    return client.CustomObjectsApi(kube)


@pytest.fixture(scope="module")
def wait_for(e2e: Any) -> Any:
    return e2e.wait_for


@pytest.fixture(scope="module")
def port_forward(e2e: Any) -> Any:
    return e2e.port_forward


def _get(custom: Any, plural: str, name: str) -> dict[str, Any] | None:
    from kubernetes.client.rest import ApiException

    try:
        return dict(custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _delete(custom: Any, plural: str, name: str) -> None:
    from kubernetes.client.rest import ApiException

    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, name)
    except ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture(scope="module")
def executor(custom: Any, wait_for: Any) -> Iterator[dict[str, Any]]:
    """The example ModelExecutor under a unique name, once Ready."""
    body = copy.deepcopy(_load("modelexecutor.yaml"))
    body["metadata"] = {"name": EXECUTOR, "labels": {"mulambda.io/e2e": "true"}}
    body["spec"]["traits"]["type"] = TYPE
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "modelexecutors", body)
    try:
        def ready() -> dict[str, Any] | None:
            obj = _get(custom, "modelexecutors", EXECUTOR)
            return obj if obj and _condition(obj, "Ready").get("status") == "True" else None

        def status() -> str:
            return f"status: {(_get(custom, 'modelexecutors', EXECUTOR) or {}).get('status')}"

        yield wait_for(f"ModelExecutor {NAMESPACE}/{EXECUTOR} to be Ready", ready,
                       READY_TIMEOUT, describe=status)
    finally:
        _delete(custom, "modelexecutors", EXECUTOR)


@pytest.fixture(scope="module")
def store_url(kube: Any, port_forward: Any) -> Iterator[str]:
    """URL of the release's in-cluster store through a port-forward."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    service = f"{RELEASE}-redis"
    try:
        client.CoreV1Api(kube).read_namespaced_service(service, NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            pytest.skip(f"no in-cluster store Service {service} (redis.enabled=false): "
                        "cannot inspect the store from here")
        raise
    with port_forward(NAMESPACE, f"svc/{service}", 6379) as port:
        yield f"redis://127.0.0.1:{port}/0"


def test_example_executor_becomes_ready(executor: dict[str, Any]) -> None:
    status = executor["status"]
    assert status["observedGeneration"] == executor["metadata"]["generation"]
    assert status["readyReplicas"] >= 1
    assert status["endpoint"]["rest"].startswith("http://")
    assert f".{NAMESPACE}.svc" in status["endpoint"]["rest"]
    assert str(status["model"]["loadedVersion"]) == str(executor["spec"]["model"]["version"])


def test_rest_prediction_is_half_plus_two(executor: dict[str, Any], port_forward: Any) -> None:
    rest = executor["status"]["endpoint"]["rest"]  # http://SERVICE.NS.svc.DOMAIN:PORT
    host, _, port = rest.removeprefix("http://").partition(":")
    service = host.split(".")[0]
    model = executor["spec"]["model"]["name"]
    with port_forward(NAMESPACE, f"svc/{service}", int(port)) as local:
        response = httpx.post(f"http://127.0.0.1:{local}/v1/models/{model}:predict",
                              json={"instances": [1.0, 2.0, 5.0]}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == pytest.approx([2.5, 3.0, 4.5])


class _ToPortForward(httpx.AsyncBaseTransport):
    """Sends requests for in-cluster Service URLs to a local port-forward instead.

    The SDK selects from the real store and calls the endpoint the operator
    published (cluster DNS, unreachable from the laptop); only the last hop is
    redirected, the request itself is the SDK's.
    """

    def __init__(self, routes: dict[tuple[str, int], int]) -> None:
        self.routes = routes
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        local = self.routes.get((request.url.host, request.url.port or 80))
        if local is not None:
            request.url = request.url.copy_with(host="127.0.0.1", port=local)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_sdk_selects_the_executor_and_predicts_half_plus_two(
    executor: dict[str, Any], store_url: str, settings_map: dict[str, str], port_forward: Any,
) -> None:
    from mulambda.sdk import MulambdaClient

    rest = httpx.URL(executor["status"]["endpoint"]["rest"])
    service = rest.host.split(".")[0]
    with port_forward(NAMESPACE, f"svc/{service}", rest.port or 80) as local:
        http = httpx.AsyncClient(transport=_ToPortForward({(rest.host, rest.port or 80): local}),
                                 timeout=30)
        store = MetadataStore.from_url(
            store_url, prefix=settings_map.get("MULAMBDA_KEY_PREFIX", "mulambda"))
        try:
            async with MulambdaClient(store, f"{NAMESPACE}/e2e-sdk-{SUFFIX}", type=TYPE,
                                      http=http) as mu:
                result = await mu.predict([1.0, 2.0, 5.0])
        finally:
            await store.close()
            await http.aclose()
    assert result.executor == f"{NAMESPACE}/{EXECUTOR}"
    assert result.predictions == pytest.approx([2.5, 3.0, 4.5])


def _caller_token(namespace: str) -> str:
    """A token of a ServiceAccount bound to the chart's client-caller role in ``namespace``."""
    for manifest in (["create", "serviceaccount", "e2e-caller"],
                     ["create", "rolebinding", "e2e-caller",
                      f"--clusterrole={RELEASE}-client-caller",
                      f"--serviceaccount={namespace}:e2e-caller"]):
        yaml_text = subprocess.run(["kubectl", "-n", namespace, *manifest, "--dry-run=client",
                                    "-o", "yaml"], check=True, capture_output=True,
                                   text=True).stdout
        subprocess.run(["kubectl", "apply", "-f", "-"], input=yaml_text, check=True,
                       capture_output=True, text=True)
    return subprocess.run(["kubectl", "-n", namespace, "create", "token", "e2e-caller"],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_client_status_and_selector_name_the_executor(
    custom: Any, executor: dict[str, Any], wait_for: Any, port_forward: Any,
) -> None:
    body = copy.deepcopy(_load("client.yaml"))
    body["metadata"] = {"name": CLIENT, "labels": {"mulambda.io/e2e": "true"}}
    body["spec"]["criteria"]["type"] = TYPE
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "clients", body)
    try:
        def selected() -> str | None:
            obj = _get(custom, "clients", CLIENT) or {}
            return ((obj.get("status") or {}).get("selected") or {}).get("executor")

        chosen = wait_for(
            f"Client {CLIENT} to select an executor", selected, 120,
            describe=lambda: f"status: {(_get(custom, 'clients', CLIENT) or {}).get('status')}",
        )
        assert chosen == f"{NAMESPACE}/{EXECUTOR}"
        client_obj = _get(custom, "clients", CLIENT) or {}
        assert _condition(client_obj, "Ready").get("status") == "True", client_obj.get("status")

        # The selector API answers the same for the registered client, to a caller
        # whose ServiceAccount may `select` it (the chart's client-caller role);
        # without a token it refuses.
        token = _caller_token(NAMESPACE)
        with port_forward(NAMESPACE, f"svc/{RELEASE}-selector", 8080) as local:
            url = f"http://127.0.0.1:{local}/select/{NAMESPACE}/{CLIENT}"
            anonymous = httpx.post(url, json={}, timeout=30)
            answer = httpx.post(url, json={}, timeout=30,
                                headers={"Authorization": f"Bearer {token}"})
        assert anonymous.status_code == 401, anonymous.text
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["executor"] == f"{NAMESPACE}/{EXECUTOR}"
        assert answer.json()["endpoint"] == executor["status"]["endpoint"]["rest"]
    finally:
        _delete(custom, "clients", CLIENT)
    wait_for(f"Client {CLIENT} to be deleted", lambda: _get(custom, "clients", CLIENT) is None, 60)


async def test_deleting_executor_removes_children_and_store_record(
    kube: Any, custom: Any, executor: dict[str, Any], settings_map: dict[str, str], store_url: str,
    wait_for: Any,
) -> None:
    from kubernetes import client

    apps, core = client.AppsV1Api(kube), client.CoreV1Api(kube)
    uid = executor["metadata"]["uid"]

    def owned() -> dict[str, list[str]]:
        def mine(items: list[Any]) -> list[str]:
            return [i.metadata.name for i in items
                    if any(ref.uid == uid for ref in i.metadata.owner_references or [])]

        return {"deployments": mine(apps.list_namespaced_deployment(NAMESPACE).items),
                "services": mine(core.list_namespaced_service(NAMESPACE).items)}

    children = owned()
    assert children["deployments"] and children["services"], children
    store = MetadataStore.from_url(store_url, prefix=settings_map.get("MULAMBDA_KEY_PREFIX",
                                                                      "mulambda"))
    try:
        record_id = f"{NAMESPACE}/{EXECUTOR}"
        assert record_id in (await store.snapshot()).executors, "executor was never registered"

        _delete(custom, "modelexecutors", EXECUTOR)
        wait_for(f"ModelExecutor {EXECUTOR} to be gone (finalizer done)",
                 lambda: _get(custom, "modelexecutors", EXECUTOR) is None, 120)
        wait_for("owned Deployments and Services to be garbage-collected",
                 lambda: not any(owned().values()), 120, describe=lambda: f"left: {owned()}")
        assert record_id not in (await store.snapshot()).executors
    finally:
        await store.close()
