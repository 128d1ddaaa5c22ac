"""The golden path with every real part that runs here, wired the way a cluster wires them.

A ModelExecutor is created on the real control plane (tests/support/controlplane.py)
in a namespace that enforces Pod Security "restricted"; the real operator, as
the chart's ServiceAccount, builds the Deployment; the real Deployment and
ReplicaSet controllers create the pod, the scheduler binds it to a KWOK node and
KWOK reports it Running and Ready with a pod IP. The test then reads THAT POD
from the API server and resolves its companion container's environment the way
the kubelet would (downward API from the pod itself, ``secretKeyRef`` from the
Secret in the namespace), and runs the real ``mulambda companion`` command with
it against a real SeaweedFS and a real redis-server, next to the TF Serving REST
test double (TF Serving itself cannot run here). Then the operator's status, a
Client's selection and the SDK are checked, and deletion cleans up: the
finalizer clears the store, the garbage collector removes the pod, and the
companion, stopped as the kubelet stops it (SIGTERM), removes its heartbeat.

What stands in for the kubelet, and only that: the pod's ``/models`` volume is
a temporary directory, TF Serving's address is the double's, the companion's
HTTP port is a free loopback port, and the pod's readiness comes from KWOK (it
runs no probes) rather than from the companion's ``/readyz``, which the test
checks itself before it looks at the status.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from mulambda.operator.main import register_all
from mulambda.sdk import MulambdaClient
from mulambda.settings import Settings
from mulambda.store.heartbeats import vouched
from mulambda.store.metadata import MetadataStore
from mulambda.tools.push import push_version

from support.cluster import Cluster
from support.operator_run import OperatorRun
from support.procs import free_port
from support.seaweedfs import ADMIN
from support.tfserving_double import TFServingDouble

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ME = ("mulambda.io/v1alpha1", "modelexecutors")
CL = ("mulambda.io/v1alpha1", "clients")
PREFIX = "golden"
NAME = "half-plus-two"

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    *,
    within: float = 30.0,
    what: str,
    explain: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until truthy without blocking the event loop (the TF Serving double
    serves on it): sync checks (API requests) run in a thread."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        if inspect.iscoroutinefunction(check):
            value = await check()
        else:
            value = await asyncio.to_thread(check)
        if value:
            return value  # type: ignore[return-value]
        if asyncio.get_running_loop().time() > deadline:
            detail = await asyncio.to_thread(explain) if explain is not None else ""
            raise AssertionError(f"timed out after {within:g}s waiting for {what}\n{detail}")
        await asyncio.sleep(0.2)


def field_path(pod: dict[str, Any], path: str) -> str:
    """A downward-API ``fieldRef`` resolved from the pod object (dotted paths only)."""
    value: Any = pod
    for part in path.split("."):
        value = value[part]
    return str(value)


def secret_volumes(container: dict[str, Any], pod: dict[str, Any], cluster: Cluster,
                   root: Path) -> dict[str, str]:
    """The container's Secret volumes as the kubelet mounts them, written under ``root``
    from the real Secrets: mount path -> local folder."""
    namespace = pod["metadata"]["namespace"]
    volumes = {v["name"]: v["secret"] for v in pod["spec"].get("volumes") or []
               if "secret" in v}
    mounted = {}
    for mount in container.get("volumeMounts") or []:
        source = volumes.get(mount["name"])
        if source is None:
            continue
        secret = cluster.get("v1", "secrets", namespace, source["secretName"])
        assert secret is not None, f"Secret {source['secretName']} missing: no pod would start"
        items = source.get("items") or [{"key": k, "path": k} for k in secret["data"]]
        folder = root / f"{pod['metadata']['name']}-{mount['name']}"
        folder.mkdir(parents=True, exist_ok=True)
        for item in items:
            (folder / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
        mounted[mount["mountPath"].rstrip("/")] = str(folder)
    return mounted


def resolve_env(container: dict[str, Any], pod: dict[str, Any], cluster: Cluster,
                root: Path | None = None) -> dict[str, str]:
    """The container's env as the kubelet gives it: values, fieldRefs of the pod, and
    secretKeyRefs read from the real Secret in the pod's namespace; with ``root``, Secret
    volumes written there (:func:`secret_volumes`) and paths into them pointed there."""
    env = _env(container, pod, cluster)
    if root is not None:
        for mount, local in secret_volumes(container, pod, cluster, root).items():
            for name, value in env.items():
                if value.startswith(mount + "/"):
                    env[name] = local + value[len(mount):]
    return env


def _env(container: dict[str, Any], pod: dict[str, Any], cluster: Cluster) -> dict[str, str]:
    namespace = pod["metadata"]["namespace"]
    env = {}
    for item in container["env"]:
        source = item.get("valueFrom")
        if source is None:
            env[item["name"]] = item.get("value", "")
        elif "fieldRef" in source:
            env[item["name"]] = field_path(pod, source["fieldRef"]["fieldPath"])
        else:
            assert set(source) == {"secretKeyRef"}, f"unexpected env source {item}"
            ref = source["secretKeyRef"]
            secret = cluster.get("v1", "secrets", namespace, ref["name"])
            assert secret is not None, f"Secret {ref['name']} missing: the pod would not start"
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def running_pod(cluster: Cluster, namespace: str) -> dict[str, Any] | None:
    """The executor's one pod once KWOK runs it: Running, Ready, with a pod IP."""
    pods = cluster.list("v1", "pods", namespace,
                        labelSelector=f"app.kubernetes.io/instance={NAME}")
    for pod in pods:
        status = pod.get("status") or {}
        ready = any(c["type"] == "Ready" and c["status"] == "True"
                    for c in status.get("conditions") or [])
        if (status.get("phase") == "Running" and ready and status.get("podIP")
                and not pod["metadata"].get("deletionTimestamp")):
            return pod
    return None


def warnings(cluster: Cluster, namespace: str) -> str:
    """The namespace's Warning events (a refused pod shows up as FailedCreate)."""
    return "\n".join(f"{e['involvedObject']['kind']}/{e['involvedObject']['name']} "
                     f"{e['reason']}: {e['message']}"
                     for e in cluster.events(namespace) if e.get("type") == "Warning")


def condition(cluster: Cluster, namespace: str, type_: str) -> dict[str, Any]:
    status = (cluster.get(*ME, namespace, NAME) or {}).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


async def test_executor_pod_loads_from_s3_serves_is_selected_and_cleans_up(
    cluster: Cluster, ns: str, run_operator: Callable[..., OperatorRun],
    seaweedfs, s3, bucket: str, half_plus_two: Path, redis_url: str, tmp_path: Path,
) -> None:
    executor_id = f"{ns}/{NAME}"
    push_version(s3, half_plus_two, bucket, "half_plus_two", 1)
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, s3_endpoint=seaweedfs.endpoint,
                        companion_image="mulambda:test", reconcile_interval_seconds=0.3,
                        probe_interval_seconds=0.5, autoscale_interval_seconds=0.5,
                        heartbeat_ttl_seconds=10)
    run_operator(lambda registry: register_all(registry, settings))
    models_dir = tmp_path / "models"
    store = MetadataStore.from_url(redis_url, PREFIX)
    proc: subprocess.Popen[bytes] | None = None
    try:
        # The platform team's S3 Secret, and the executor (no version: the highest).
        await asyncio.to_thread(cluster.create, {
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": settings.s3_secret, "namespace": ns},
            "stringData": {"accessKey": ADMIN.access_key, "secretKey": ADMIN.secret_key}})
        await asyncio.to_thread(cluster.create, {
            "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
            "metadata": {"name": NAME, "namespace": ns},
            "spec": {"model": {"name": "half_plus_two",
                               "storageUri": f"s3://{bucket}/half_plus_two"},
                     "traits": {"type": "regression", "input": "tensor/float32",
                                "output": "tensor/float32", "accuracy": 1.0}},
        })
        # The operator's Deployment; the ReplicaSet controller's pod, admitted under
        # "restricted", scheduled, and run by KWOK.
        await eventually(lambda: cluster.get("apps/v1", "deployments", ns, NAME),
                         what="the Deployment")
        pod = await eventually(lambda: running_pod(cluster, ns), within=60,
                               what="the executor's pod Running on a KWOK node",
                               explain=lambda: warnings(cluster, ns))
        assert pod["spec"]["nodeName"].startswith("kwok-node-")
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
        pod_name, pod_ip = pod["metadata"]["name"], pod["status"]["podIP"]

        [companion] = [c for c in pod["spec"]["containers"] if c["name"] == "companion"]
        assert companion["args"] == ["companion"]
        env = resolve_env(companion, pod, cluster, tmp_path / "secrets")
        assert env["MULAMBDA_S3_ENDPOINT"] == seaweedfs.endpoint
        assert env["MULAMBDA_EXECUTOR"] == executor_id
        assert (env["MULAMBDA_POD_NAME"], env["MULAMBDA_POD_NAMESPACE"]) == (pod_name, ns)
        assert env["MULAMBDA_POD_IP"] == pod_ip
        assert env["MULAMBDA_S3_ACCESS_KEY"] == ADMIN.access_key

        port = free_port()
        async with TFServingDouble("half_plus_two", models_dir=models_dir,
                                   load_delay=0.1) as serving:
            pod_env = {**os.environ, **env, "MULAMBDA_MODELS_DIR": str(models_dir),
                       "MULAMBDA_TFSERVING_URL": serving.url, "MULAMBDA_HTTP_PORT": str(port)}
            # cwd: not the repo root, where ./mulambda would shadow the installed package.
            proc = await asyncio.to_thread(
                subprocess.Popen, [sys.executable, "-m", "mulambda", "companion"],
                env=pod_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

                async def ready() -> bool:
                    assert proc is not None and proc.poll() is None, proc.stdout.read().decode()
                    try:
                        return (await http.get("/readyz")).status_code == 200
                    except httpx.HTTPError:
                        return False

                await eventually(ready, within=30, what="the companion's readiness probe")

            ready_condition = await eventually(
                lambda: condition(cluster, ns, "Ready").get("status") == "True"
                and condition(cluster, ns, "ModelLoaded").get("status") == "True"
                and condition(cluster, ns, "Ready"), within=20,
                what="Ready=True and ModelLoaded=True")
            assert ready_condition["reason"] == "ModelServing"
            assert condition(cluster, ns, "ModelLoaded")["reason"] == "ModelAvailable"
            status = (await asyncio.to_thread(cluster.get, *ME, ns, NAME))["status"]
            assert status["model"]["loadedVersion"] == "1"
            assert status["replicaSummary"] == "1/1"
            # The heartbeat carries the pod's identity as the downward API gave it.
            [replica] = await store.list_replicas(executor_id)
            assert (replica.pod, replica.ip, replica.state) == (pod_name, pod_ip, "Available")
            # Signed with the key the operator made for this executor (from the Secret
            # mounted into the companion only): routers count it as the executor's pod.
            record = (await store.snapshot(f"{ns}/{NAME}")).executors[executor_id]
            assert record.heartbeat_key and replica.sig
            assert vouched(record.heartbeat_key, replica, time.time())
            assert not vouched(record.heartbeat_key, replace(replica, ip="203.0.113.9"),
                               time.time())

            # A developer's Client gets it selected; the SDK agrees.
            await asyncio.to_thread(cluster.create, {
                "apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
                "metadata": {"name": "shop", "namespace": ns},
                "spec": {"criteria": {"type": "regression"}}})
            selected = await eventually(
                lambda: ((cluster.get(*CL, ns, "shop") or {}).get("status") or {}).get(
                    "selected"), what="the Client's selection")
            assert selected["executor"] == executor_id
            assert selected["endpoint"]["rest"] == status["endpoint"]["rest"]
            async with MulambdaClient(store, f"{ns}/shop") as mu:
                chosen = await mu.select()
                assert (chosen.executor_id, chosen.url) == (executor_id, f"http://{pod_ip}:8501")
            # The endpoint is cluster DNS; here the same model answers at the double.
            async with httpx.AsyncClient() as http:
                answer = await http.post(f"{serving.url}/v1/models/half_plus_two:predict",
                                         json={"instances": [1.0, 2.0, 5.0]})
            assert answer.json() == {"predictions": [2.5, 3.0, 4.5]}

            # Deleting: the finalizer clears the store, the garbage collector removes the
            # Deployment and with it the pod; the kubelet stops the pod (SIGTERM).
            await asyncio.to_thread(cluster.delete, *ME, ns, NAME)
            await eventually(lambda: cluster.get(*ME, ns, NAME) is None,
                             what="the executor gone")

            def pod_stopping() -> bool:
                current = cluster.get("v1", "pods", ns, pod_name)
                return current is None or bool(current["metadata"].get("deletionTimestamp"))

            await eventually(pod_stopping, within=60,
                             what="the garbage collector deleting the pod")
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(proc.communicate, timeout=15)
            assert proc.returncode == 0, out.decode()
            await eventually(lambda: cluster.get("apps/v1", "deployments", ns, NAME) is None,
                             what="the Deployment garbage-collected")
            snap = await store.snapshot(f"{ns}/shop")
            assert executor_id not in snap.executors
            assert not snap.replicas.get(executor_id)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        await store.close()
