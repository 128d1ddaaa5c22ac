"""Serverless scaling through the real operator on the real control plane, with a real
redis-server.

Demand is written to the store the way the SDK and the selector write it
(in-flight leases, demand buckets). Replicas are real: the operator patches
the Deployment, the real Deployment and ReplicaSet controllers create and
delete pods, the scheduler binds them to KWOK nodes and KWOK makes them
Ready. So scale to zero means the pods go away, activation means a pod comes
back Ready, and the cold start the operator measures ends when that pod is
Ready (it was a status patch on the emulator).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mulambda.operator.main import register_all
from mulambda.sdk import MulambdaClient
from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import MAX_LEASE_SECONDS

from support.cluster import Cluster, path_of
from support.controlplane import ControlPlane
from support.operator_run import OperatorRun
from support.procs import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ME = ("mulambda.io/v1alpha1", "modelexecutors")
CL = ("mulambda.io/v1alpha1", "clients")
DEP = ("apps/v1", "deployments")
PREFIX = "stest"
AUTOSCALE_INTERVAL = 0.25
# The operator's fleet-wide autoscaler logs each tick (it covers every executor, in
# every namespace, whose lock no handler holds): was kopf's per-executor timer line.
TICK_STARTED = "autoscaler tick started"
TICK = "autoscaler tick done "


@pytest.fixture(autouse=True)
def fleet_log_lines() -> Iterator[None]:
    """The fleet-wide loops log their ticks at INFO under ``mulambda.operator`` (the
    operator's entry point sets the level from MULAMBDA_LOG_LEVEL; in-process, set it
    here): the tests count ticks by those lines."""
    logger = logging.getLogger("mulambda.operator")
    saved = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(saved)


@pytest.fixture
def operator(run_operator: Callable[..., OperatorRun], redis_url: str) -> OperatorRun:
    settings = Settings(
        redis_url=redis_url, key_prefix=PREFIX, companion_image="mulambda:test",
        reconcile_interval_seconds=0.3, probe_interval_seconds=0.3,
        autoscale_interval_seconds=AUTOSCALE_INTERVAL, retry_max_delay_seconds=1.0,
    )
    return run_operator(lambda registry: register_all(registry, settings))


def executor(ns: str, name: str = "sent", **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"name": name, "storageUri": f"s3://models/{name}"},
            "traits": {"type": "sentiment", "input": "text", "output": "label",
                       "accuracy": 0.9},
            "scaling": {"minReplicas": 0, "maxReplicas": 3, "targetConcurrency": 2,
                        "scaleDownDelaySeconds": 0, **scaling},
        },
    }


def replicas(cluster: Cluster, ns: str, name: str = "sent") -> int | None:
    dep = cluster.get(*DEP, ns, name)
    return None if dep is None else dep["spec"].get("replicas")


def scaling_status(cluster: Cluster, ns: str, name: str = "sent") -> dict[str, Any]:
    return ((cluster.get(*ME, ns, name) or {}).get("status") or {}).get("scaling") or {}


def pods(cluster: Cluster, ns: str, name: str = "sent") -> list[dict[str, Any]]:
    """Every pod of the executor, terminating ones included."""
    return cluster.list("v1", "pods", ns, labelSelector=(
        f"app.kubernetes.io/name=modelexecutor,app.kubernetes.io/instance={name}"))


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions", [])}
    return conditions.get("Ready") == "True" and not pod["metadata"].get("deletionTimestamp")


def ready_pods(
    cluster: Cluster, cp: ControlPlane, ns: str, count: int, name: str = "sent",
    timeout: float = 60,
) -> list[dict[str, Any]]:
    """Wait until the executor has exactly ``count`` pods, each Ready on a KWOK node."""
    def check() -> list[dict[str, Any]] | None:
        found = pods(cluster, ns, name)
        return found if len(found) == count and all(map(is_ready, found)) else None

    found = cluster.wait_for(check, timeout=timeout, what=f"{count} Ready pod(s) of {name}")
    for pod in found:
        assert pod["spec"]["nodeName"] in cp.node_names
    return found


def no_pods(cluster: Cluster, ns: str, name: str = "sent") -> None:
    """Wait until the executor's pods are gone (deleted, not just terminating)."""
    cluster.wait_for(lambda: not pods(cluster, ns, name), timeout=60,
                     what=f"the pods of {name} gone")


def autoscaler_ticks(operator: OperatorRun, ns: str) -> int:
    """Autoscaler ticks the operator completed so far (each covers the executors in ``ns``
    too: one tick for the whole fleet)."""
    return sum(1 for r in list(operator.records) if r.getMessage().startswith(TICK))


def autoscaler_timeline(operator: OperatorRun, ns: str) -> tuple[list[tuple[float, float]],
                                                                    list[float]]:
    """From the operator's log, for executors in ``ns``: (invoked, finished) wall times of
    each autoscaler tick, and when it logged a scale to zero."""
    ticks: list[tuple[float, float]] = []
    to_zero: list[float] = []
    invoked = 0.0
    for r in list(operator.records):
        message = r.getMessage()
        if message == TICK_STARTED:
            invoked = r.created
        elif message.startswith(TICK):
            ticks.append((invoked, r.created))
        elif message.startswith(f"scaled executor={ns}/") and " to=0 " in message:
            to_zero.append(r.created)
    return ticks, to_zero


def let_autoscaler_tick(cluster: Cluster, operator: OperatorRun, ns: str, n: int = 6) -> None:
    """Wait for ``n`` more autoscaler ticks (was a fixed sleep: a loaded machine may
    tick less often than the interval says, so count them)."""
    start = autoscaler_ticks(operator, ns)
    cluster.wait_for(lambda: autoscaler_ticks(operator, ns) >= start + n, timeout=30,
                     what=f"{n} autoscaler ticks")


def history(
    cluster: Cluster, api_version: str, plural: str, ns: str, name: str, since: str
) -> list[dict[str, Any]]:
    """Every version of an object stored after resourceVersion ``since``: a watch from
    that version replays them all, so no intermediate state is missed by polling."""
    params = {"watch": "1", "resourceVersion": since, "timeoutSeconds": "1",
              "fieldSelector": f"metadata.name={name}"}
    found = []
    with cluster.http.stream("GET", path_of(api_version, plural, ns), params=params) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.strip():
                event = json.loads(line)
                assert event["type"] != "ERROR", event
                found.append(event["object"])
    return found


def epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_store(redis_url: str, fn: Callable[[MetadataStore], Any]) -> Any:
    store = MetadataStore.from_url(redis_url, PREFIX)
    try:
        return await fn(store)
    finally:
        await store.close()


def inflight(redis_url: str, ns: str, count: int) -> None:
    """An SDK instance's in-flight lease for the executor (0 drops it). The lease lives
    for the longest a router may set (minutes, not the SDK's 30 s), so a slow machine
    cannot end the demand early."""
    run(_with_store(redis_url, lambda s: s.publish_inflight(
        "test-sdk", {f"{ns}/sent": count}, ttl=MAX_LEASE_SECONDS)))


def test_min_zero_executor_starts_cold_and_sdk_demand_activates_it(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str, ns: str
) -> None:
    sent = f"{ns}/sent"
    cluster.create(executor(ns))
    cluster.wait_for(lambda: replicas(cluster, ns) == 0, what="Deployment at zero")
    ready = cluster.wait_for(
        lambda: next((c for c in (cluster.get(*ME, ns, "sent").get("status") or {}).get(
            "conditions", []) if c["type"] == "Ready" and c["reason"] == "ScaledToZero"), None),
        what="Ready=False/ScaledToZero")
    assert ready["status"] == "False"
    assert not pods(cluster, ns)  # the Deployment controller started none

    # A Client that prefers to wait for the best (cold) model. Registering it
    # wakes nothing: only requests are demand.
    cluster.create({"apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
                    "metadata": {"name": "shop", "namespace": ns},
                    "spec": {"criteria": {"type": "sentiment"}, "coldStart": "Wait"}})
    cluster.wait_for(lambda: (cluster.get(*CL, ns, "shop").get("status") or {}).get("selected"),
                     what="the cold executor selected")
    let_autoscaler_tick(cluster, operator, ns)
    assert replicas(cluster, ns) == 0 and not pods(cluster, ns)

    # The application asks the SDK for a model: the SDK records demand for the
    # cold executor it would pick, and the operator activates it at once.
    async def ask() -> str:
        store = MetadataStore.from_url(redis_url, PREFIX)
        async with MulambdaClient(store, f"{ns}/shop", cold_start_timeout=5) as mu:
            chosen = (await mu.select()).executor_id
            await asyncio.sleep(0.3)  # the demand signal is sent in the background
        await store.close()
        return chosen

    before = cluster.get(*ME, ns, "sent")["metadata"]["resourceVersion"]
    asked = time.monotonic()
    assert run(ask()) == sent
    cluster.wait_for(lambda: replicas(cluster, ns) == 1, timeout=5, what="activated to one replica")
    cluster.wait_for(lambda: cluster.events(ns, "Activate"), what="an Activate Event")

    # The real Deployment controller brings a pod up; KWOK makes it Ready; the
    # operator sees readyReplicas and measures the cold start up to that moment.
    pod = ready_pods(cluster, controlplane, ns, 1)[0]
    cold = cluster.wait_for(lambda: scaling_status(cluster, ns).get("lastColdStartSeconds"),
                            what="cold start measured")
    waited = time.monotonic() - asked
    assert 0 < cold < waited
    assert "activatedAt" not in scaling_status(cluster, ns)
    cold_event = cluster.wait_for(lambda: cluster.events(ns, "ColdStart"),
                                  what="a ColdStart Event")[0]

    # Was: polled once, racing the next tick. Now the server's history of the
    # executor: the activation was recorded (reason and timestamp) before the pod
    # existed, and the cold start spans the pod's whole start until it was Ready.
    versions = [(v.get("status") or {}).get("scaling") or {}
                for v in history(cluster, *ME, ns, "sent", before)]
    activated = next(s for s in versions if s.get("activatedAt") is not None)
    assert activated["reason"] == "Activate"
    activated_at = float(activated["activatedAt"])
    ready_at = epoch(next(c["lastTransitionTime"] for c in pod["status"]["conditions"]
                          if c["type"] == "Ready"))
    created_at = epoch(pod["metadata"]["creationTimestamp"])
    # (The server's timestamps are whole seconds, truncated.)
    assert math.floor(activated_at) <= created_at <= ready_at < activated_at + cold + 1e-3
    observed_at = epoch(cold_event.get("eventTime") or cold_event["firstTimestamp"])
    assert ready_at <= observed_at + 1e-3

    # The operator runs in this process: its Prometheus histogram saw it too.
    count = REGISTRY.get_sample_value("mulambda_cold_start_seconds_count", {"executor": sent})
    total = REGISTRY.get_sample_value("mulambda_cold_start_seconds_sum", {"executor": sent})
    assert count is not None and count >= 1
    assert total is not None and total >= cold - 0.001  # status rounds to milliseconds

    # The executor's store record carries it: what routers expect of its next cold start
    # until they measure one themselves.
    async def recorded() -> float | None:
        store = MetadataStore.from_url(redis_url, PREFIX)
        try:
            rec = (await store.snapshot()).executors.get(sent)
            return rec.cold_start_ms if rec is not None else None
        finally:
            await store.close()

    cluster.wait_for(lambda: run(recorded()) == round(cold * 1000, 3),
                     what="the cold start in the executor's store record")


def test_autoscaler_never_scales_a_deployment_it_does_not_own(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str, ns: str
) -> None:
    # Restricted-compliant: the namespace would refuse its pods otherwise.
    foreign = {"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "sent", "namespace": ns},
               "spec": {"replicas": 5, "selector": {"matchLabels": {"app": "b"}},
                        "template": {"metadata": {"labels": {"app": "b"}}, "spec": {
                            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                                "seccompProfile": {"type": "RuntimeDefault"}},
                            "containers": [{"name": "b", "image": "b", "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}}}]}}}}
    cluster.create(foreign)
    cluster.create(executor(ns, minReplicas=0, idleWindowSeconds=0))
    cluster.wait_for(lambda: any(c.get("reason") == "NameConflict" for c in (
        cluster.get(*ME, ns, "sent").get("status") or {}).get("conditions", [])),
        what="NameConflict")
    let_autoscaler_tick(cluster, operator, ns)  # ticks with no demand at all
    assert replicas(cluster, ns) == 5
    # And the foreign pods run on, all five.
    cluster.wait_for(lambda: (cluster.get(*DEP, ns, "sent").get("status") or {}).get(
        "readyReplicas") == 5, timeout=60, what="the foreign Deployment's 5 pods Ready")
    assert replicas(cluster, ns) == 5


def test_idle_executor_scales_to_zero_after_the_idle_window(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str, ns: str
) -> None:
    idle_window = 2
    cluster.create(executor(ns, idleWindowSeconds=idle_window, stableWindowSeconds=1))
    cluster.wait_for(lambda: replicas(cluster, ns) == 0, what="Deployment at zero")
    # Was: spec.replicas and a Ready status patched in "as if activated earlier",
    # which on a real cluster races the idle clock (it runs from the operator's
    # first tick, seconds before a real pod is up). Now a real activation: an SDK
    # in-flight lease, a pod that becomes Ready, then the demand ends.
    inflight(redis_url, ns, 1)
    cluster.wait_for(lambda: replicas(cluster, ns) == 1, timeout=10, what="activated")
    ready_pods(cluster, controlplane, ns, 1)
    cluster.wait_for(lambda: scaling_status(cluster, ns).get("readyReplicas") == 1,
                     what="the operator seeing the ready replica")
    assert replicas(cluster, ns) == 1  # demand holds it

    idle_since = time.time()
    inflight(redis_url, ns, 0)
    cluster.wait_for(lambda: replicas(cluster, ns) == 0, timeout=15, what="scaled to zero")
    # Not before the idle window. The idle clock starts at the last tick that saw
    # the lease: at the latest tick that finished before the lease was dropped,
    # or later. (Was: the test's clock from the status patch, which a slow tick
    # on a loaded machine can make look early.)
    # (The tick logs its decision just after the replica patch the test already saw.)
    cluster.wait_for(lambda: autoscaler_timeline(operator, ns)[1], what="the scale logged")
    ticks, to_zero = autoscaler_timeline(operator, ns)
    saw_demand = max(invoked for invoked, finished in ticks if finished < idle_since)
    assert len(to_zero) == 1 and to_zero[0] >= saw_demand + idle_window
    cluster.wait_for(lambda: scaling_status(cluster, ns).get("reason") == "ScaleToZero",
                     what="ScaleToZero in status")
    cluster.wait_for(lambda: cluster.events(ns, "ScaleToZero"), what="a ScaleToZero Event")
    no_pods(cluster, ns)  # the real ReplicaSet controller deleted the pod


def test_in_flight_demand_scales_up_within_max_replicas(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str, ns: str
) -> None:
    # Short windows so the test can also watch it come back down.
    cluster.create(executor(ns, minReplicas=1, stableWindowSeconds=2, panicWindowSeconds=1))
    cluster.wait_for(lambda: replicas(cluster, ns) == 1, what="one replica")
    ready_pods(cluster, controlplane, ns, 1)  # was a patched status

    # 10 requests in flight with a target of 2 per replica: wants 5, max is 3.
    # (What an SDK instance publishes as its in-flight lease.)
    inflight(redis_url, ns, 10)
    cluster.wait_for(lambda: replicas(cluster, ns) == 3, timeout=5, what="scaled to maxReplicas")
    status = cluster.wait_for(lambda: scaling_status(cluster, ns).get("desiredReplicas") == 3
                              and scaling_status(cluster, ns), what="the decision in status")
    assert status["reason"] in {"Bounded", "Panic"}
    ready_pods(cluster, controlplane, ns, 3)  # three real pods serve

    # Demand gone: back down once the stable window has passed, to minReplicas, not 0.
    inflight(redis_url, ns, 0)
    cluster.wait_for(lambda: replicas(cluster, ns) == 1, timeout=15, what="back to minReplicas")
    # (The status patch follows the replica patch at the end of the same tick.)
    cluster.wait_for(lambda: scaling_status(cluster, ns).get("reason") in {"ScaleDown", "Bounded"},
                     what="the scale-down in status")
    ready_pods(cluster, controlplane, ns, 1)  # two pods deleted, one serving
    let_autoscaler_tick(cluster, operator, ns)  # and it stays there: never below minReplicas
    assert replicas(cluster, ns) == 1
    assert len(ready_pods(cluster, controlplane, ns, 1, timeout=0)) == 1


def test_an_executor_the_operator_cannot_parse_does_not_stop_the_others_scaling(
    cluster: Cluster, operator: OperatorRun, redis_url: str, ns: str
) -> None:
    # Another team's executor with a quantity the API server takes (resources keep
    # unknown fields) and that overflowed the operator's parser: every autoscaler tick
    # raised, nothing in the cluster scaled from zero, and the bad one had no status.
    cluster.create(executor(ns))
    cluster.wait_for(lambda: replicas(cluster, ns) == 0, what="Deployment at zero")
    bad = executor(ns, "bad")
    bad["spec"]["serving"] = {"resources": {"limits": {"cpu": "1e9999999999"}}}
    cluster.create(bad)

    def ready(name: str) -> dict[str, Any] | None:
        status = (cluster.get(*ME, ns, name) or {}).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)

    condition = cluster.wait_for(lambda: (ready("bad") or {}).get("reason") == "InvalidSpec"
                                 and ready("bad"), what="InvalidSpec on the bad executor")
    assert "spec.serving.resources.limits.cpu" in condition["message"]
    inflight(redis_url, ns, 4)
    cluster.wait_for(lambda: (replicas(cluster, ns) or 0) >= 1, timeout=10,
                     what="the good executor activated")
    assert not any(m.startswith("autoscaler tick failed") for m in operator.messages())
    assert REGISTRY.get_sample_value("mulambda_operator_errors_total",
                                     {"target": "executor", "loop": "autoscale"}) == 0


@pytest.mark.parametrize("restart", [False, True], ids=["same-operator", "after-a-restart"])
def test_an_invalid_edit_keeps_an_executor_at_zero_activatable(
    cluster: Cluster, operator: OperatorRun, redis_url: str, ns: str, restart: bool
) -> None:
    # The edit is refused by the operator (InvalidSpec), not by the API server. The store
    # still offers the executor as ScaledToZero, so clients wait for its cold start:
    # the autoscaler goes on with the spec it last knew valid (it skipped the executor,
    # and the waiting requests got nothing). Restarted after the edit, the operator
    # knows none: it scales by the spec the Deployment was last built from (its
    # annotation; before, it held the executor at zero).
    cluster.create(executor(ns))
    cluster.wait_for(lambda: replicas(cluster, ns) == 0, what="Deployment at zero")
    let_autoscaler_tick(cluster, operator, ns)
    cluster.patch(*ME, ns, "sent", {"spec": {"serving": {
        "resources": {"limits": {"cpu": "1e9999999999"}}}}})

    def ready_reason() -> str | None:
        status = (cluster.get(*ME, ns, "sent") or {}).get("status") or {}
        return next((c["reason"] for c in status.get("conditions", [])
                     if c["type"] == "Ready"), None)

    cluster.wait_for(lambda: ready_reason() == "InvalidSpec", what="InvalidSpec")
    if restart:
        operator.restart()
    inflight(redis_url, ns, 4)
    cluster.wait_for(lambda: (replicas(cluster, ns) or 0) >= 1, timeout=10,
                     what="activated with the last valid spec")
    assert ready_reason() == "InvalidSpec"  # still said: the edit is still refused


def test_store_outage_holds_replicas(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str,
    redis_server: RedisServer, ns: str,
) -> None:
    cluster.create(executor(ns, minReplicas=0, idleWindowSeconds=0))
    cluster.wait_for(lambda: replicas(cluster, ns) == 0, what="Deployment at zero")
    # The store goes first (was: after the patch, racing a tick that would scale
    # an idle executor with idleWindowSeconds 0 straight back to zero).
    redis_server.stop()
    try:
        cluster.patch(*DEP, ns, "sent", {"spec": {"replicas": 2}})
        # Pods are managed normally meanwhile: the real controllers run both.
        ready_pods(cluster, controlplane, ns, 2)
        let_autoscaler_tick(cluster, operator, ns)  # ticks without demand data
        assert any("demand unavailable" in m for m in operator.messages())
        assert replicas(cluster, ns) == 2  # not knowing the load is no reason to act
        assert len(ready_pods(cluster, controlplane, ns, 2, timeout=0)) == 2
    finally:
        redis_server.start()
