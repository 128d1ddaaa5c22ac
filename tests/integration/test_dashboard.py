"""Every query of the Grafana dashboard against a real Prometheus scraping the real parts.

A real ``prometheus`` (Debian package) scrapes, every second:

* the operator: kopf in this process as the chart's ServiceAccount on the
  real control plane, its default registry served by
  ``prometheus_client.start_http_server`` as ``mulambda operator`` serves it;
* the selector: a ``mulambda selector`` process;
* two companions: ``mulambda companion`` processes with a real redis-server
  and a real S3 (SeaweedFS) beside the TF Serving REST test double. One loads
  the half_plus_two model (and runs a task with its worker); the other's
  model is missing (load failures).

The test drives a little traffic the way a fleet would: a selection wakes the
executor at zero (the operator activates it, KWOK makes its pod Ready, the
cold start is measured), its companion loads the model and probes the
clients, predictions go through the gateway to the replica and a task through
the task API to the companion's worker. Then every
dashboard query (Grafana's variables replaced) must parse and return at least
one series, and every variable's label values must be non-empty.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import prometheus_client
import pytest

from mulambda.operator.main import register_all
from mulambda.operator.modelexecutor.build import heartbeat_secret_name
from mulambda.settings import Settings
from mulambda.storage.s3 import ModelStorage
from mulambda.store.heartbeats import executor_seed
from mulambda.store.metadata import MetadataStore
from mulambda.tools.push import push_version

from support.cluster import Cluster
from support.operator_fixtures import HEARTBEAT_SECRET
from support.operator_run import OperatorRun
from support.procs import free_port, stop
from support.prometheus import (
    Prometheus,
    dashboard_queries,
    dashboard_variables,
    grafana_expr,
    label_values_queries,
    load_dashboard,
    wait_for_series,
)
from support.seaweedfs import SeaweedFS
from support.tfserving_double import TFServingDouble

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parents[2]
HALF_PLUS_TWO = REPO / "examples" / "models" / "half_plus_two" / "1"
MODEL = "half_plus_two"
PREFIX = "dash"
ME = ("mulambda.io/v1alpha1", "modelexecutors")
DEP = ("apps/v1", "deployments")
REST_PORT = 8501  # operator/modelexecutor/build.py: the gateway calls POD_IP:8501


@pytest.fixture
def bucket(seaweedfs: SeaweedFS) -> str:
    """A bucket holding half_plus_two version 1, pushed as `mulambda models push` does."""
    storage = ModelStorage.from_env(seaweedfs.env())
    name = f"models-{random.randrange(16**8):08x}"
    storage.make_bucket(name)
    push_version(storage, HALF_PLUS_TWO, name, MODEL, 1)
    storage.close()
    return name


@pytest.fixture
def operator_metrics() -> Iterator[int]:
    """The operator's /metrics, served from this process's default registry (where the
    in-process operator's metrics live) the way `mulambda operator` serves it."""
    port = free_port()
    server, thread = prometheus_client.start_http_server(port, addr="127.0.0.1")
    yield port
    server.shutdown()
    thread.join(5)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``mulambda ARGS`` processes; all are stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "mulambda", *args], env={**os.environ, **env},
            stdout=log, stderr=subprocess.STDOUT,
            # Not the repo root: there `mulambda/` would shadow the installed package.
            cwd=tmp_path)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop(proc)


def companion_env(executor: str, pod: str, ip: str, port: int, models: Path, serving: str,
                  redis_url: str, model_uri: str) -> dict[str, str]:
    return {
        "MULAMBDA_EXECUTOR": executor, "MULAMBDA_POD_NAME": pod, "MULAMBDA_POD_IP": ip,
        "MULAMBDA_MODEL_URI": model_uri, "MULAMBDA_MODELS_DIR": str(models),
        "MULAMBDA_TFSERVING_URL": serving, "MULAMBDA_HTTP_HOST": "127.0.0.1",
        "MULAMBDA_HTTP_PORT": str(port), "MULAMBDA_REDIS_URL": redis_url,
        "MULAMBDA_KEY_PREFIX": PREFIX, "MULAMBDA_HEARTBEAT_INTERVAL_SECONDS": "0.3",
        "MULAMBDA_PROBE_INTERVAL_SECONDS": "0.5", "MULAMBDA_SERVING_POLL_SECONDS": "0.1",
        "MULAMBDA_FAILED_RETRY_SECONDS": "0.5", "MULAMBDA_RETRY_BASE_DELAY_SECONDS": "0.05",
    }


def heartbeat_key_file(cluster: Cluster, ns: str, name: str, folder: Path) -> str:
    """The executor's heartbeat key as its pods mount it, from the Secret the operator
    created (what the kubelet would do for the companion started by hand here)."""
    uid = cluster.get("mulambda.io/v1alpha1", "modelexecutors", ns, name)["metadata"]["uid"]
    seed = executor_seed(HEARTBEAT_SECRET.encode(), ns, name, uid)
    secret = cluster.get("v1", "secrets", ns, heartbeat_secret_name(name, seed))
    assert secret is not None, "the operator created no heartbeat key"
    path = folder / f"{name}-heartbeat-key"
    path.write_bytes(base64.b64decode(secret["data"]["key"]))
    return str(path)


def executor(ns: str, name: str, uri: str, **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"model": {"name": MODEL, "storageUri": uri},
                 "traits": {"type": "regression", "input": "number", "output": "number",
                            "accuracy": 0.9, "serviceTimeMs": 5},
                 "scaling": {"maxReplicas": 2, **scaling}},
    }


def client(ns: str, name: str, probe: str) -> dict[str, Any]:
    return {"apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"criteria": {"type": "regression"}, "probeUrl": probe}}


async def until(check: Callable[[], Any], what: str, within: float = 30.0) -> Any:
    """Await ``check()`` (sync or async) until it is truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what}: not within {within}s")
        await asyncio.sleep(0.2)


@pytest.fixture
async def doubles() -> AsyncIterator[list[TFServingDouble]]:
    made: list[TFServingDouble] = []
    yield made
    for d in made:
        await d.stop()


async def test_every_dashboard_query_returns_series_from_the_real_components(
    cluster: Cluster, run_operator: Callable[..., OperatorRun], ns: str, redis_url: str,
    seaweedfs: SeaweedFS, bucket: str, operator_metrics: int,
    processes: Callable[..., subprocess.Popen[bytes]], doubles: list[TFServingDouble],
    tmp_path: Path,
) -> None:
    settings = Settings(
        redis_url=redis_url, key_prefix=PREFIX, companion_image="mulambda:test",
        reconcile_interval_seconds=0.3, probe_interval_seconds=0.5,
        autoscale_interval_seconds=0.25, retry_max_delay_seconds=1.0)
    await asyncio.to_thread(run_operator, lambda registry: register_all(registry, settings))

    selector_port, companion_ports = free_port(), (free_port(), free_port())
    processes("selector", ["selector", "--host", "127.0.0.1", "--port", str(selector_port),
                           "--redis-url", redis_url, "--key-prefix", PREFIX,
                           "--cache-ttl", "0.2", "--cold-start-timeout", "30"],
              {"MULAMBDA_SELECTOR_AUTH": "false"})
    prom = Prometheus(tmp_path / "prometheus", {
        "operator": [f"127.0.0.1:{operator_metrics}"],
        "selector": [f"127.0.0.1:{selector_port}"],
        "companion": [f"127.0.0.1:{p}" for p in companion_ports],
    })
    await asyncio.to_thread(prom.start)
    try:
        await drive_traffic(cluster, ns, bucket, redis_url, seaweedfs, selector_port,
                            companion_ports, processes, doubles, tmp_path)
        await asyncio.to_thread(prom.wait_for_targets)
        board = load_dashboard()
        exprs = {grafana_expr(expr): title for title, expr in dashboard_queries(board)}
        counts = await asyncio.to_thread(wait_for_series, prom, exprs, 30.0)
        empty = [(exprs[e], e) for e, n in counts.items() if n == 0]
        assert empty == [], f"queries without series: {empty}"
        assert len(counts) == len(exprs) >= 30
        for name, query in dashboard_variables(board):
            found = label_values_queries(query)
            assert found is not None, query
            values = await asyncio.to_thread(prom.label_values, found[1], found[0])
            assert values, f"variable {name}: {query} has no values"
        # The series carry what the panels show: the executor this test drove.
        decisions = await asyncio.to_thread(
            prom.query, "sum by (executor, reason) (mulambda_selector_decisions_total)")
        assert {d["metric"]["executor"] for d in decisions} == {f"{ns}/hpt"}
        ready = await asyncio.to_thread(
            prom.query, f'mulambda_executor_ready_replicas{{executor="{ns}/hpt"}}')
        assert [float(r["value"][1]) for r in ready] == [1.0]
    finally:
        await asyncio.to_thread(prom.stop)


async def drive_traffic(
    cluster: Cluster, ns: str, bucket: str, redis_url: str, seaweedfs: SeaweedFS,
    selector_port: int, companion_ports: tuple[int, int],
    processes: Callable[..., subprocess.Popen[bytes]], doubles: list[TFServingDouble],
    tmp_path: Path,
) -> None:
    selector = f"http://127.0.0.1:{selector_port}"
    # Companions probe clients' URLs; the selector's /healthz answers like a ping sidecar.
    await asyncio.to_thread(cluster.create, client(ns, "app", f"{selector}/healthz"))
    await asyncio.to_thread(cluster.create, client(ns, "gone", f"http://127.0.0.1:{free_port()}/"))
    await asyncio.to_thread(cluster.create, executor(ns, "hpt", f"s3://{bucket}/{MODEL}",
                                                     minReplicas=0))
    await asyncio.to_thread(cluster.create, executor(ns, "lost", f"s3://{bucket}/nothing"))

    def at_zero() -> bool:
        dep = cluster.get(*DEP, ns, "hpt")
        return dep is not None and dep["spec"].get("replicas") == 0

    await until(lambda: asyncio.to_thread(at_zero), "hpt's Deployment at zero")
    store = MetadataStore.from_url(redis_url, PREFIX)
    async with httpx.AsyncClient(base_url=selector, timeout=40) as http:
        try:
            # 1. A selection finds hpt cold: its demand wakes it, the operator activates it
            # and measures the cold start once KWOK has its pod Ready.
            async def select() -> dict[str, Any] | None:
                try:
                    resp = await http.post(f"/select/{ns}/app")
                except httpx.ConnectError:
                    return None  # the selector process is still starting
                return resp.json() if resp.status_code == 200 else None

            chosen = await until(select, "hpt registered and selectable")
            assert chosen["model"]["executor"] == f"{ns}/hpt"

            def cold_start() -> Any:
                status = (cluster.get(*ME, ns, "hpt") or {}).get("status") or {}
                return (status.get("scaling") or {}).get("lastColdStartSeconds")

            await until(lambda: asyncio.to_thread(cold_start), "cold start measured")

            # 2. The pod's companion: TF Serving (double) on the pod IP's port 8501, the
            # model from S3. The other executor's companion finds no model.
            ip = "127." + ".".join(str(random.randrange(1, 255)) for _ in range(3))
            models = tmp_path / "models-hpt"
            serving = await TFServingDouble(MODEL, models_dir=models, load_delay=0.1,
                                            host=ip, port=REST_PORT).start()
            doubles.append(serving)
            lost = await TFServingDouble(MODEL, models_dir=tmp_path / "models-lost").start()
            doubles.append(lost)
            for name, port, pod_ip, double, uri in (
                    ("hpt", companion_ports[0], ip, serving, f"s3://{bucket}/{MODEL}"),
                    ("lost", companion_ports[1], "127.0.0.1", lost, f"s3://{bucket}/nothing")):
                processes(f"companion-{name}", ["companion"], {
                    **seaweedfs.env(), **companion_env(
                        f"{ns}/{name}", f"{name}-0", pod_ip, port, tmp_path / f"models-{name}",
                        double.url, redis_url, uri),
                    "MULAMBDA_HEARTBEAT_KEY_FILE": heartbeat_key_file(cluster, ns, name,
                                                                      tmp_path)})

            async def serving_replica() -> bool:
                return any(r.executor == f"{ns}/hpt" and r.state == "Available"
                           for r in await store.list_replicas())

            await until(serving_replica, "hpt's companion Available", within=40)

            # 3. Traffic: predictions through the gateway to the replica, selections, and
            # one that matches nothing.
            for _ in range(5):
                resp = await http.post(f"/v1/predict/{ns}/app",
                                       json={"instances": [1.0, 2.0, 5.0]})
                assert resp.status_code == 200, resp.text
                assert resp.json() == {"predictions": [2.5, 3.0, 4.5]}
                assert resp.headers["X-Mulambda-Replica"] == "hpt-0"
                assert (await http.post(f"/select/{ns}/app")).status_code == 200
            nothing = await http.post(f"/select/{ns}/app", json={"required": {"type": "audio"}})
            assert nothing.status_code == 404
            # An asynchronous task: queued by the selector, run by hpt's companion worker.
            queued = await http.post(f"/v1/tasks/{ns}/app", json={"instances": [4.0]})
            assert queued.status_code == 202, queued.text

            async def task_done() -> dict[str, Any] | None:
                answer = (await http.get(queued.json()["status_url"])).json()
                return answer if answer["status"] in ("succeeded", "failed") else None

            done = await until(task_done, "the task run by the companion's worker")
            assert done["status"] == "succeeded", done
        finally:
            await store.close()
