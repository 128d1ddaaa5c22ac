"""Client lifecycle and selection status: the real operator on the real control plane
(kube-apiserver, controller manager, scheduler, KWOK nodes) with a real redis-server.

Executors are real ModelExecutors reconciled by the same operator; their
pods are created by the real Deployment and ReplicaSet controllers, admitted
by Pod Security (restricted namespaces), scheduled onto KWOK nodes and made
Ready there. What a cluster cannot add without real containers (companion
heartbeats and latency samples) the tests write to the store themselves, as
the companions in those pods would, under the real pods' names.

Executors live in the ``ns`` namespace (the old tests' "ml") and Clients in a
second fresh namespace (the old "apps"): selection across namespaces is part
of what is checked.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from mulambda.operator.main import register_all
from mulambda.settings import Settings
from mulambda.store.records import ReplicaRecord, _dump

from support.cluster import ApiError, Cluster
from support.controlplane import ControlPlane
from support.operator_fixtures import release_namespace, sign_as_its_pod
from support.operator_run import OperatorRun

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ME = ("mulambda.io/v1alpha1", "modelexecutors")
CL = ("mulambda.io/v1alpha1", "clients")
DEP = ("apps/v1", "deployments")
SVC = ("v1", "services")
PREFIX = "ctest"
# A user's pod template that Pod Security "restricted" admits (the namespaces enforce it).
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000,
                  "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


@pytest.fixture
def apps(cluster: Cluster) -> Iterator[str]:
    """The Clients' namespace: fresh and restricted like ``ns``, released after the
    operator stopped (the ``operator`` fixture depends on it)."""
    name = f"apps-{uuid.uuid4().hex[:8]}"
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted",
                                 "pod-security.kubernetes.io/enforce-version": "latest"}}})
    cluster.wait_for(lambda: cluster.get("v1", "serviceaccounts", name, "default"),
                     what=f"{name}'s default ServiceAccount")
    yield name
    release_namespace(cluster, name)


@pytest.fixture
def operator(
    apps: str, run_operator: Callable[..., OperatorRun], redis_url: str
) -> OperatorRun:
    settings = Settings(
        redis_url=redis_url, key_prefix=PREFIX, companion_image="mulambda:test",
        reconcile_interval_seconds=0.3, probe_interval_seconds=0.3,
        autoscale_interval_seconds=0.3, retry_max_delay_seconds=1.0,
    )
    return run_operator(lambda registry: register_all(registry, settings))


def executor(ns: str, name: str, accuracy: float, **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"name": name, "storageUri": f"s3://models/{name}"},
            "traits": {"type": "sentiment", "input": "text/plain", "output": "label",
                       "accuracy": accuracy, "serviceTimeMs": 5},
            "scaling": {"minReplicas": 1, "maxReplicas": 2, **scaling},
        },
    }


def client(apps: str, name: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
        "metadata": {"name": name, "namespace": apps},
        "spec": {"criteria": {"type": "sentiment", "input": "text/plain"},
                 "preferences": {"latency": 1, "accuracy": 0}, **spec},
    }


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions", [])}
    return conditions.get("Ready") == "True" and not pod["metadata"].get("deletionTimestamp")


def pods(cluster: Cluster, namespace: str, app: str, instance: str) -> list[dict[str, Any]]:
    return cluster.list("v1", "pods", namespace, labelSelector=(
        f"app.kubernetes.io/name={app},app.kubernetes.io/instance={instance}"))


def ready_pods(
    cluster: Cluster, cp: ControlPlane, namespace: str, app: str, instance: str, count: int
) -> list[dict[str, Any]]:
    """Wait for exactly ``count`` pods of the app, every one Ready on a KWOK node."""
    def check() -> list[dict[str, Any]] | None:
        found = pods(cluster, namespace, app, instance)
        if len(found) == count and all(is_ready(p) for p in found):
            return found
        return None

    found = cluster.wait_for(check, timeout=60, what=f"{count} Ready pod(s) of {instance}")
    for pod in found:
        assert pod["spec"]["nodeName"] in cp.node_names  # scheduled by the real scheduler
        assert pod["status"]["phase"] == "Running"  # KWOK's pod stages
    return found


def make_ready(
    cluster: Cluster, cp: ControlPlane, redis_url: str, ns: str, name: str
) -> str:
    """A serving executor: its real pod Ready on a KWOK node (the Deployment controller
    reports it), and the heartbeat its companion would send. Returns the pod's name."""
    # Was: a patched Deployment status. Now the real pod is admitted, scheduled, made Ready.
    pod = ready_pods(cluster, cp, ns, "modelexecutor", name, 1)[0]["metadata"]["name"]
    heartbeat = sign_as_its_pod(cluster, ReplicaRecord(
        executor=f"{ns}/{name}", pod=pod, state="Available", version=1,
        expires_at=time.time() + 120))
    redis.Redis.from_url(redis_url).hset(f"{PREFIX}:replicas", f"{ns}/{name}|{pod}",
                                         _dump(heartbeat))
    cluster.wait_for(lambda: stored_executor(redis_url, ns, name).get("state") == "Ready",
                     what=f"{name} Ready in the store")
    return str(pod)


def stored_executor(redis_url: str, ns: str, name: str) -> dict[str, Any]:
    raw = redis.Redis.from_url(redis_url).hget(f"{PREFIX}:executors", f"{ns}/{name}")
    return json.loads(raw) if raw else {}


def latency(redis_url: str, executor_id: str, pod: str, ms: float, client_id: str) -> None:
    """A companion's smoothed latency sample from executor ``executor_id`` to the client."""
    sample = {"ms": ms, "samples": 5, "at": time.time(), "expires_at": time.time() + 120}
    redis.Redis.from_url(redis_url).hset(f"{PREFIX}:latency:{client_id}", f"{executor_id}|{pod}",
                                         json.dumps(sample))


def selected(cluster: Cluster, apps: str, name: str = "shop") -> str | None:
    status = (cluster.get(*CL, apps, name) or {}).get("status") or {}
    return (status.get("selected") or {}).get("executor")


def ready_condition(cluster: Cluster, apps: str, name: str = "shop") -> dict[str, Any]:
    status = (cluster.get(*CL, apps, name) or {}).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})


def kubectl_row(cp: ControlPlane, plural: str, namespace: str, name: str) -> dict[str, str]:
    """Column -> cell of ``kubectl get`` as the real server's Table prints it."""
    out = cp.kubectl("get", plural, name, "-n", namespace).stdout.splitlines()
    header, row = out[0].split(), out[1].split()
    return dict(zip(header, row, strict=True))


def test_client_selects_the_fastest_executor_and_follows_latency_changes(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str,
    ns: str, apps: str,
) -> None:
    cluster.create(executor(ns, "alpha", 0.8))
    cluster.create(executor(ns, "beta", 0.9))
    alpha = make_ready(cluster, controlplane, redis_url, ns, "alpha")
    beta = make_ready(cluster, controlplane, redis_url, ns, "beta")
    shop = f"{apps}/shop"
    latency(redis_url, f"{ns}/alpha", alpha, 40.0, shop)
    latency(redis_url, f"{ns}/beta", beta, 2.0, shop)

    cluster.create(client(apps))
    cluster.wait_for(lambda: selected(cluster, apps) == f"{ns}/beta", what="beta selected")
    status = cluster.get(*CL, apps, "shop")["status"]
    assert status["selected"]["endpoint"]["rest"] == f"http://beta.{ns}.svc.cluster.local:8501"
    assert [c["executor"] for c in status["candidates"]] == [f"{ns}/beta", f"{ns}/alpha"]
    assert ready_condition(cluster, apps)["reason"] == "Selected"

    # The network changes: alpha is now the fast one. Shows within a probe interval
    # (5 s: the old bound, on a loaded machine with a real API server).
    latency(redis_url, f"{ns}/alpha", alpha, 1.0, shop)
    latency(redis_url, f"{ns}/beta", beta, 60.0, shop)
    cluster.wait_for(lambda: selected(cluster, apps) == f"{ns}/alpha", timeout=5,
                     what="alpha selected")
    # kopf posts Events in the background: the initial selection's SelectionChanged
    # ("(was none)") can be the only one listed for a moment, so wait for this one.
    cluster.wait_for(lambda: any(f"{ns}/alpha (was {ns}/beta)" in e["message"]
                                 for e in cluster.events(apps, "SelectionChanged")),
                     what="a SelectionChanged Event to alpha")
    # Was: kubectl's JSONPath evaluated offline. Now the server's own Table, via kubectl.
    row = kubectl_row(controlplane, "clients", apps, "shop")
    assert row["SELECTED"] == f"{ns}/alpha" and row["READY"] == "True"


def test_losing_the_selected_executor_moves_the_client(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str,
    ns: str, apps: str,
) -> None:
    cluster.create(executor(ns, "alpha", 0.8))
    cluster.create(executor(ns, "beta", 0.9))
    alpha = make_ready(cluster, controlplane, redis_url, ns, "alpha")
    beta = make_ready(cluster, controlplane, redis_url, ns, "beta")
    latency(redis_url, f"{ns}/alpha", alpha, 1.0, f"{apps}/shop")
    latency(redis_url, f"{ns}/beta", beta, 30.0, f"{apps}/shop")
    cluster.create(client(apps))
    cluster.wait_for(lambda: selected(cluster, apps) == f"{ns}/alpha", what="alpha selected")

    cluster.delete(*ME, ns, "alpha")
    cluster.wait_for(lambda: selected(cluster, apps) == f"{ns}/beta", timeout=5,
                     what="failover to beta")


def test_no_matching_executor_is_a_false_condition_with_the_reason(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str,
    ns: str, apps: str,
) -> None:
    cluster.create(executor(ns, "alpha", 0.8))
    make_ready(cluster, controlplane, redis_url, ns, "alpha")
    cluster.create(client(apps, criteria={"type": "sentiment", "input": "audio/wav"}))

    ready = cluster.wait_for(
        lambda: ready_condition(cluster, apps).get("reason") == "NoMatchingExecutor"
        and ready_condition(cluster, apps), what="NoMatchingExecutor")
    assert ready["status"] == "False" and "audio/wav" in ready["message"]
    warned = cluster.wait_for(lambda: cluster.events(apps, "NoMatchingExecutor"),
                              what="a NoMatchingExecutor Event")
    assert warned[0]["type"] == "Warning"
    assert selected(cluster, apps) is None


def test_workload_runs_with_identity_and_a_probe_target_and_is_cleaned_up(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str,
    apps: str,
) -> None:
    # The namespace enforces Pod Security "restricted": the user's own template must
    # comply, and the container the operator adds must too, or no pod is admitted.
    template = {"spec": {"securityContext": RESTRICTED_POD, "containers": [
        {"name": "app", "image": "example/app:1", "securityContext": RESTRICTED_CONTAINER}]}}
    cluster.create(client(apps, workload={"replicas": 2, "template": template}))

    dep = cluster.wait_for(lambda: cluster.get(*DEP, apps, "shop-workload"), what="workload")
    assert dep["spec"]["replicas"] == 2
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["app", "mulambda-ping"]
    env = {e["name"]: e.get("value") for e in containers[0]["env"]}
    assert env["MULAMBDA_CLIENT"] == f"{apps}/shop" and env["MULAMBDA_KEY_PREFIX"] == PREFIX
    assert cluster.wait_for(lambda: cluster.get(*SVC, apps, "shop-workload"), what="Service")

    # New on the real server: the ReplicaSet controller's pods, with the operator's
    # ping sidecar, are admitted by Pod Security and become Ready on KWOK nodes.
    running = ready_pods(cluster, controlplane, apps, "client-workload", "shop", 2)
    for pod in running:
        assert [c["name"] for c in pod["spec"]["containers"]] == ["app", "mulambda-ping"]
        statuses = {c["name"]: c["ready"] for c in pod["status"]["containerStatuses"]}
        assert statuses == {"app": True, "mulambda-ping": True}
    assert cluster.wait_for(
        lambda: (cluster.get(*DEP, apps, "shop-workload")["status"].get("readyReplicas") == 2),
        what="the workload's Deployment reporting 2 ready replicas")

    # ... and the Client says so.
    workload_ready = cluster.wait_for(
        lambda: next((c for c in (cluster.get(*CL, apps, "shop") or {}).get("status", {})
                      .get("conditions", []) if c["type"] == "WorkloadReady"
                      and c["status"] == "True"), None), what="WorkloadReady=True")
    assert workload_ready["reason"] == "WorkloadAvailable"

    raw = cluster.wait_for(lambda: redis.Redis.from_url(redis_url).hget(
        f"{PREFIX}:clients", f"{apps}/shop"), what="the Client's store record")
    assert json.loads(raw)["probe_url"] == (
        f"http://shop-workload.{apps}.svc.cluster.local:8079/ping")

    cluster.delete(*CL, apps, "shop")
    cluster.wait_for(lambda: cluster.get(*CL, apps, "shop") is None, what="client gone")
    assert redis.Redis.from_url(redis_url).hget(f"{PREFIX}:clients", f"{apps}/shop") is None
    # Was: gone at once (the emulator collected synchronously). The real garbage
    # collector follows ownerReferences in the background: Deployment, Service, pods.
    # The collector learns a new kind (Client) at its discovery resync, up to 30 s
    # after the CRDs were installed: allow for that when this test runs early.
    cluster.wait_for(lambda: cluster.get(*DEP, apps, "shop-workload") is None
                     and cluster.get(*SVC, apps, "shop-workload") is None, timeout=75,
                     what="workload Deployment and Service garbage-collected")
    cluster.wait_for(lambda: not pods(cluster, apps, "client-workload", "shop"),
                     what="the workload's pods gone")


def test_a_workload_whose_pods_pod_security_refuses_is_a_false_condition_and_an_event(
    cluster: Cluster, operator: OperatorRun, apps: str,
) -> None:
    # No securityContext: the namespace enforces "restricted", so the ReplicaSet
    # controller's every pod is refused; the Client must say so, not only the
    # ReplicaSet's Events (found on the real server; the emulator admitted anything).
    template = {"spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}
    cluster.create(client(apps, workload={"replicas": 1, "template": template}))

    def workload_condition() -> dict[str, Any] | None:
        status = (cluster.get(*CL, apps, "shop") or {}).get("status") or {}
        return next((c for c in status.get("conditions", [])
                     if c["type"] == "WorkloadReady" and c["reason"] == "WorkloadFailed"), None)

    failed = cluster.wait_for(workload_condition, timeout=60, what="WorkloadReady=False")
    assert failed["status"] == "False"
    assert "violates PodSecurity" in failed["message"], failed
    [event] = cluster.wait_for(lambda: cluster.events(apps, "WorkloadFailed"),
                               what="a WorkloadFailed Event")
    assert event["type"] == "Warning" and "violates PodSecurity" in event["message"]
    assert not pods(cluster, apps, "client-workload", "shop")


def test_external_client_registers_its_probe_url_and_updates(
    cluster: Cluster, operator: OperatorRun, redis_url: str, apps: str
) -> None:
    cluster.create(client(apps, probeUrl="http://edge.example:8079/ping"))

    def registered() -> dict[str, Any] | None:
        raw = redis.Redis.from_url(redis_url).hget(f"{PREFIX}:clients", f"{apps}/shop")
        return json.loads(raw) if raw else None

    rec = cluster.wait_for(registered, what="the Client's store record")
    assert rec["probe_url"] == "http://edge.example:8079/ping" and rec["latency_weight"] == 1
    cluster.patch(*CL, apps, "shop", {"spec": {"preferences": {"accuracy": 3}}})
    cluster.wait_for(lambda: (registered() or {}).get("accuracy_weight") == 3,
                     what="the new weight in the store")
    assert cluster.get(*DEP, apps, "shop-workload") is None  # no workload asked for


def test_schema_rejects_negative_weights_before_the_operator_sees_them(
    cluster: Cluster, operator: OperatorRun, redis_url: str, apps: str
) -> None:
    with pytest.raises(ApiError) as err:
        cluster.create(client(apps, preferences={"latency": -1}))
    # The real server's OpenAPI validation: 422 Invalid, the field named.
    assert err.value.status == 422 and "spec.preferences.latency" in err.value.message
    assert cluster.get(*CL, apps, "shop") is None


def test_invalid_workload_gives_false_condition_event_and_no_children(
    cluster: Cluster, operator: OperatorRun, redis_url: str, apps: str
) -> None:
    # A pod template is schemaless in the CRD: only the operator can check it.
    cluster.create(client(apps, workload={"template": {"spec": {"containers": []}}}))
    ready = cluster.wait_for(
        lambda: ready_condition(cluster, apps).get("reason") == "InvalidSpec"
        and ready_condition(cluster, apps), what="InvalidSpec")
    assert "at least one container" in ready["message"]
    cluster.wait_for(lambda: cluster.events(apps, "InvalidSpec"), what="an InvalidSpec Event")
    assert redis.Redis.from_url(redis_url).hget(f"{PREFIX}:clients", f"{apps}/shop") is None
    assert cluster.get(*DEP, apps, "shop-workload") is None
