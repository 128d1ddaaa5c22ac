"""Kubernetes-native signals on the real control plane: ``kubectl describe modelexecutor``
tells the model's story in Events, once each; ``kubectl get clients`` shows the selection
and its expected latency; ``mulambda top`` reads the API server as the operator.

As in test_client_operator.py, pods are real (Deployment and ReplicaSet
controllers, scheduler, KWOK nodes) and the tests write what companions would
(heartbeats, latency samples) to the real redis-server under the real pods' names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis

from mulambda.operator.main import register_all
from mulambda.settings import Settings
from mulambda.store.records import ReplicaRecord, _dump

from support.cluster import Cluster
from support.controlplane import ControlPlane
from support.identity import Identity
from support.operator_fixtures import release_namespace, sign_as_its_pod
from support.operator_run import OperatorRun

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CL = ("mulambda.io/v1alpha1", "clients")
PREFIX = "signals"
STORY = ("LoadStarted", "Loaded", "ModelServing", "Selected", "VersionSwitched")


@pytest.fixture
def apps(cluster: Cluster) -> Iterator[str]:
    name = f"apps-{uuid.uuid4().hex[:8]}"
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    release_namespace(cluster, name)


@pytest.fixture
def operator(apps: str, run_operator: Callable[..., OperatorRun], redis_url: str) -> OperatorRun:
    settings = Settings(
        redis_url=redis_url, key_prefix=PREFIX, companion_image="mulambda:test",
        reconcile_interval_seconds=0.3, probe_interval_seconds=0.3,
        autoscale_interval_seconds=0.3, retry_max_delay_seconds=1.0,
    )
    return run_operator(lambda registry: register_all(registry, settings))


def heartbeat(cluster: Cluster, redis_url: str, executor_id: str, pod: str, state: str,
              version: int) -> None:
    """What the pod's companion would publish (signed with the executor's key)."""
    record = sign_as_its_pod(cluster, ReplicaRecord(
        executor=executor_id, pod=pod, state=state, version=version,
        expires_at=time.time() + 120))
    redis.Redis.from_url(redis_url).hset(f"{PREFIX}:replicas", f"{executor_id}|{pod}",
                                         _dump(record))


def story(cluster: Cluster, ns: str, name: str) -> Counter[str]:
    return Counter(e["reason"] for e in cluster.events(ns, involved=name)
                   if e["involvedObject"]["kind"] == "ModelExecutor")


def test_describe_tells_the_story_once_and_get_clients_shows_the_latency(
        cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str,
        ns: str, apps: str, operator_identity: Identity) -> None:
    eid = f"{ns}/hp2"
    cluster.create({
        "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
        "metadata": {"name": "hp2", "namespace": ns},
        "spec": {"model": {"name": "hp2", "storageUri": "s3://models/hp2"},
                 "traits": {"type": "sentiment", "input": "text/plain", "output": "label",
                            "accuracy": 0.9, "serviceTimeMs": 5},
                 "scaling": {"minReplicas": 1, "maxReplicas": 2}}})
    pod = cluster.wait_for(
        lambda: next((p["metadata"]["name"] for p in cluster.list("v1", "pods", ns)
                      if p["metadata"]["name"].startswith("hp2-")), None),
        timeout=60, what="hp2's pod")
    heartbeat(cluster, redis_url, eid, pod, "Loading", 1)
    cluster.wait_for(lambda: story(cluster, ns, "hp2")["LoadStarted"], what="LoadStarted")
    heartbeat(cluster, redis_url, eid, pod, "Available", 1)
    cluster.wait_for(lambda: story(cluster, ns, "hp2")["ModelServing"], timeout=60,
                     what="ModelServing (the pod Ready on its KWOK node)")

    shop = f"{apps}/shop"
    redis.Redis.from_url(redis_url).hset(f"{PREFIX}:latency:{shop}", f"{eid}|{pod}", json.dumps(
        {"ms": 3.0, "samples": 5, "at": time.time(), "expires_at": time.time() + 120}))
    cluster.create({"apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
                    "metadata": {"name": "shop", "namespace": apps},
                    "spec": {"criteria": {"type": "sentiment"},
                             "preferences": {"latency": 1, "accuracy": 1}}})
    cluster.wait_for(lambda: story(cluster, ns, "hp2")["Selected"], what="Selected on hp2")
    [selected_event] = [e for e in cluster.events(ns, "Selected", "hp2")]
    assert selected_event["message"] == (f"Client {shop} selected this executor (was none); "
                                         "selected by 1 Client now.")

    # kubectl get clients: the server's own Table of the printer columns.
    out = controlplane.kubectl("get", "clients", "shop", "-n", apps).stdout.splitlines()
    row = dict(zip(out[0].split(), out[1].split(), strict=True))
    status = cluster.get(*CL, apps, "shop")["status"]
    assert row["SELECTED"] == eid
    assert float(row["LATENCY-MS"]) == status["selected"]["expectedLatencyMs"]
    # net 3 + declared service 5 (nothing measured) + nothing ahead
    assert status["selected"]["expectedLatencyMs"] == 8.0
    assert status["candidates"][0]["reason"].startswith("score ")

    # A new version is served: the switch is told (once version 1 is in the status).
    cluster.wait_for(lambda: (cluster.get("mulambda.io/v1alpha1", "modelexecutors", ns, "hp2")
                              .get("status", {}).get("model", {}).get("loadedVersion")) == "1",
                     what="loadedVersion 1 in the status")
    heartbeat(cluster, redis_url, eid, pod, "Available", 2)
    # A refresh tick sees the new heartbeat; on a loaded machine that took over 30 s.
    cluster.wait_for(lambda: story(cluster, ns, "hp2")["VersionSwitched"], timeout=90,
                     what="VersionSwitched")
    # Several refresh ticks and Client reselections later, nothing was told twice.
    time.sleep(3)
    told = story(cluster, ns, "hp2")
    assert {reason: told[reason] for reason in STORY} == dict.fromkeys(STORY, 1), told
    assert all(e.get("count", 1) == 1 for e in cluster.events(ns, involved="hp2"))
    described = controlplane.kubectl("describe", "modelexecutor", "hp2", "-n", ns).stdout
    for reason in STORY:
        assert reason in described
    assert "Serving version 2 (was 1)." in described

    # mulambda top, as the operator's ServiceAccount: desired replicas from the API server.
    env = {**os.environ, "MULAMBDA_REDIS_URL": redis_url, "MULAMBDA_KEY_PREFIX": PREFIX,
           "KUBECONFIG": str(operator_identity.kubeconfig), "COLUMNS": "160"}
    done = subprocess.run([sys.executable, "-m", "mulambda", "top", "--once", "-n", ns],
                          env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    line = next(x.split() for x in done.stdout.splitlines() if x.startswith(eid))
    assert line[1:4] == ["sentiment", "serving", "1/1"], done.stdout
    assert "API server not read" not in done.stdout
