"""The golden path with every real part that runs here, wired the way a cluster wires them.

A ModelExecutor is applied to the emulated API; the real operator builds the
Deployment; the companion container's environment is taken from that
Deployment and resolved the way the kubelet would (downward API, the S3
Secret read from the API); the real ``mulambda companion`` command runs with
it against a real SeaweedFS and a real redis-server, next to the TF Serving
REST test double (TF Serving itself cannot run here). Then the operator's
status, a Client's selection and the SDK are checked, and deletion cleans up.

What stands in for the cluster, and only that: the pod's ``/models`` volume
is a temporary directory, TF Serving's address is the double's, and the
Deployment controller's "1 replica ready" is a status write after the
companion's readiness probe answered 200.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mulambda.operator.main import register_all
from mulambda.sdk import MulambdaClient
from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.tools.models import push_version

from support.kube import Kube, running_kube
from support.kube_operator import OperatorRun
from support.procs import free_port
from support.seaweedfs import ADMIN
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

ME = ("mulambda.io/v1alpha1", "modelexecutors")
CL = ("mulambda.io/v1alpha1", "clients")
PREFIX = "golden"
POD = "half-plus-two-7d9f-abcde"


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Kube]:
    with running_kube(tmp_path) as api:
        yield api


def resolve_env(container: dict[str, Any], kube: Kube, namespace: str) -> dict[str, str]:
    """The container's env as the kubelet would give it (fieldRef and secretKeyRef)."""
    fields = {"metadata.name": POD, "metadata.namespace": namespace, "status.podIP": "127.0.0.1"}
    env = {}
    for item in container["env"]:
        source = item.get("valueFrom")
        if source is None:
            env[item["name"]] = item["value"]
        elif "fieldRef" in source:
            env[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:
            ref = source["secretKeyRef"]
            secret = kube.get("v1", "secrets", namespace, ref["name"])
            assert secret is not None, f"Secret {ref['name']} missing: the pod would not start"
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def condition(kube: Kube, type_: str) -> dict[str, Any]:
    status = (kube.get(*ME, "ml", "half-plus-two") or {}).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


async def test_executor_loads_from_s3_serves_is_selected_and_cleans_up(
    kube: Kube, seaweedfs, s3, bucket: str, half_plus_two: Path, redis_url: str,
    tmp_path: Path,
) -> None:
    push_version(s3, half_plus_two, bucket, "half_plus_two", 1)
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, s3_endpoint=seaweedfs.endpoint,
                        companion_image="mulambda:test", reconcile_interval_seconds=0.3,
                        probe_interval_seconds=0.5, autoscale_interval_seconds=0.5,
                        heartbeat_ttl_seconds=10)
    operator = OperatorRun(kube, lambda registry: register_all(registry, settings)).start()
    models_dir = tmp_path / "models"
    proc: subprocess.Popen[bytes] | None = None
    try:
        # The platform team's S3 Secret, and the executor (no version: the highest).
        await kube.acreate({"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": "mulambda-s3", "namespace": "ml"},
                            "stringData": {"accessKey": ADMIN.access_key,
                                           "secretKey": ADMIN.secret_key}})
        await kube.acreate({
            "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
            "metadata": {"name": "half-plus-two", "namespace": "ml"},
            "spec": {"model": {"name": "half_plus_two",
                               "storageUri": f"s3://{bucket}/half_plus_two"},
                     "traits": {"type": "regression", "input": "tensor/float32",
                                "output": "tensor/float32", "accuracy": 1.0}},
        })
        dep = await kube.await_for(lambda: kube.get("apps/v1", "deployments", "ml",
                                                    "half-plus-two"), what="the Deployment")
        companion = dep["spec"]["template"]["spec"]["containers"][1]
        assert companion["args"] == ["companion"]
        env = resolve_env(companion, kube, "ml")
        assert env["MULAMBDA_S3_ENDPOINT"] == seaweedfs.endpoint

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

                await kube.await_for(ready, timeout=30, what="the companion's readiness probe")
            # The readiness probe passed: the Deployment controller reports the pod ready.
            await asyncio.to_thread(kube.simulate_rollout, "ml", "half-plus-two")

            ready = await kube.await_for(lambda: condition(kube, "Ready").get("status") == "True"
                                         and condition(kube, "Ready"), timeout=10,
                                         what="Ready=True")
            assert ready["reason"] == "ModelServing"
            assert condition(kube, "ModelLoaded")["reason"] == "ModelAvailable"
            status = kube.get(*ME, "ml", "half-plus-two")["status"]
            assert status["model"]["loadedVersion"] == "1"

            # A developer's Client gets it selected; the SDK agrees.
            await kube.acreate({"apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
                                "metadata": {"name": "shop", "namespace": "ml"},
                                "spec": {"criteria": {"type": "regression"}}})
            selected = await kube.await_for(
                lambda: ((kube.get(*CL, "ml", "shop") or {}).get("status") or {}).get(
                    "selected"), what="the Client's selection")
            assert selected["executor"] == "ml/half-plus-two"
            assert selected["endpoint"]["rest"] == status["endpoint"]["rest"]
            store = MetadataStore.from_url(redis_url, PREFIX)
            async with MulambdaClient(store, "ml/shop") as mu:
                assert (await mu.select()).executor_id == "ml/half-plus-two"
            # The endpoint is cluster DNS; here the same model answers at the double.
            async with httpx.AsyncClient() as http:
                answer = await http.post(f"{serving.url}/v1/models/half_plus_two:predict",
                                         json={"instances": [1.0, 2.0, 5.0]})
            assert answer.json() == {"predictions": [2.5, 3.0, 4.5]}

            # Deleting: the kubelet stops the pod (SIGTERM), the finalizer clears the store.
            await kube.adelete(*ME, "ml", "half-plus-two")
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(proc.communicate, timeout=15)
            assert proc.returncode == 0, out.decode()
            await kube.await_for(lambda: kube.get(*ME, "ml", "half-plus-two") is None,
                                 what="the executor gone")
            snap = await store.snapshot("ml/shop")
            assert "ml/half-plus-two" not in snap.executors
            assert not snap.replicas.get("ml/half-plus-two")
            await store.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        operator.stop()
