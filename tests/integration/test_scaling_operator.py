"""Serverless scaling through the real operator (KMock + real redis-server).

Demand is written to the store the way the SDK and the selector write it
(in-flight counters, demand buckets); nothing runs pods here, so "the first
replica became ready" is a status patch, as the Deployment controller would make.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mulambda.operator.main import register_all
from mulambda.sdk import MulambdaClient
from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore

from support.kube import Kube
from support.kube_operator import OperatorRun

pytestmark = pytest.mark.integration

ME = ("mulambda.io/v1alpha1", "modelexecutors")
CL = ("mulambda.io/v1alpha1", "clients")
DEP = ("apps/v1", "deployments")
PREFIX = "stest"


@pytest.fixture
def operator(kube: Kube, run_operator: Callable[..., OperatorRun], redis_url: str) -> OperatorRun:
    settings = Settings(
        redis_url=redis_url, key_prefix=PREFIX, companion_image="mulambda:test",
        reconcile_interval_seconds=0.3, probe_interval_seconds=0.3,
        autoscale_interval_seconds=0.25, retry_max_delay_seconds=1.0,
    )
    return run_operator(lambda registry: register_all(registry, settings))


def executor(name: str = "sent", **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {
            "model": {"name": name, "storageUri": f"s3://models/{name}"},
            "traits": {"type": "sentiment", "input": "text", "output": "label",
                       "accuracy": 0.9},
            "scaling": {"minReplicas": 0, "maxReplicas": 3, "targetConcurrency": 2,
                        "scaleDownDelaySeconds": 0, **scaling},
        },
    }


def replicas(kube: Kube, name: str = "sent") -> int | None:
    dep = kube.get(*DEP, "ml", name)
    return None if dep is None else dep["spec"].get("replicas")


def scaling_status(kube: Kube, name: str = "sent") -> dict[str, Any]:
    return ((kube.get(*ME, "ml", name) or {}).get("status") or {}).get("scaling") or {}


def events(kube: Kube, reason: str) -> list[dict[str, Any]]:
    return [e for e in kube.list("v1", "events", "ml") if e.get("reason") == reason]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _with_store(redis_url: str, fn: Callable[[MetadataStore], Any]) -> Any:
    store = MetadataStore.from_url(redis_url, PREFIX)
    try:
        return await fn(store)
    finally:
        await store.close()


def test_min_zero_executor_starts_cold_and_sdk_demand_activates_it(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor())
    kube.wait_for(lambda: replicas(kube) == 0, what="Deployment at zero")
    ready = kube.wait_for(
        lambda: next((c for c in (kube.get(*ME, "ml", "sent").get("status") or {}).get(
            "conditions", []) if c["type"] == "Ready" and c["reason"] == "ScaledToZero"), None),
        what="Ready=False/ScaledToZero")
    assert ready["status"] == "False"

    # A Client that prefers to wait for the best (cold) model. Registering it
    # wakes nothing: only requests are demand.
    kube.create({"apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
                 "metadata": {"name": "shop", "namespace": "ml"},
                 "spec": {"criteria": {"type": "sentiment"}, "coldStart": "Wait"}})
    kube.wait_for(lambda: (kube.get(*CL, "ml", "shop").get("status") or {}).get("selected"),
                  what="the cold executor selected")
    time.sleep(1.5)  # several autoscaler ticks
    assert replicas(kube) == 0

    # The application asks the SDK for a model: the SDK records demand for the
    # cold executor it would pick, and the operator activates it at once.
    async def ask() -> str:
        store = MetadataStore.from_url(redis_url, PREFIX)
        async with MulambdaClient(store, "ml/shop", cold_start_timeout=5) as mu:
            chosen = (await mu.select()).executor_id
            await asyncio.sleep(0.3)  # the demand signal is sent in the background
        await store.close()
        return chosen

    assert run(ask()) == "ml/sent"
    kube.wait_for(lambda: replicas(kube) == 1, timeout=5, what="activated to one replica")
    assert scaling_status(kube).get("reason") == "Activate"
    kube.wait_for(lambda: events(kube, "Activate"), what="an Activate Event")
    assert "activatedAt" in kube.wait_for(lambda: scaling_status(kube).get("activatedAt")
                                          and scaling_status(kube))

    time.sleep(0.5)  # the pod "starts"
    kube.patch(*DEP, "ml", "sent", {"status": {"replicas": 1, "readyReplicas": 1}},
               subresource="status")
    cold = kube.wait_for(lambda: scaling_status(kube).get("lastColdStartSeconds"),
                         what="cold start measured")
    assert 0.5 <= cold < 10
    assert "activatedAt" not in scaling_status(kube)
    kube.wait_for(lambda: events(kube, "ColdStart"), what="a ColdStart Event")
    # The operator runs in this process: its Prometheus histogram saw it too.
    count = REGISTRY.get_sample_value("mulambda_cold_start_seconds_count",
                                      {"executor": "ml/sent"})
    total = REGISTRY.get_sample_value("mulambda_cold_start_seconds_sum",
                                      {"executor": "ml/sent"})
    assert count is not None and count >= 1 and total is not None and total >= 0.5


def test_autoscaler_never_scales_a_deployment_it_does_not_own(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    foreign = {"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "sent", "namespace": "ml"},
               "spec": {"replicas": 5, "selector": {"matchLabels": {"app": "b"}},
                        "template": {"metadata": {"labels": {"app": "b"}},
                                     "spec": {"containers": [{"name": "b", "image": "b"}]}}}}
    kube.create(foreign)
    kube.create(executor(minReplicas=0, idleWindowSeconds=0))
    kube.wait_for(lambda: any(c.get("reason") == "NameConflict" for c in (
        kube.get(*ME, "ml", "sent").get("status") or {}).get("conditions", [])))
    time.sleep(1.5)  # autoscaler ticks with no demand at all
    assert replicas(kube) == 5


def test_idle_executor_scales_to_zero_after_the_idle_window(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor(idleWindowSeconds=1))
    kube.wait_for(lambda: replicas(kube) == 0)
    # As if it had been activated earlier: one replica, serving, no demand since.
    kube.patch(*DEP, "ml", "sent", {"spec": {"replicas": 1}})
    kube.patch(*DEP, "ml", "sent", {"status": {"replicas": 1, "readyReplicas": 1}},
               subresource="status")
    started = time.monotonic()
    kube.wait_for(lambda: replicas(kube) == 0, timeout=10, what="scaled to zero")
    assert time.monotonic() - started >= 1.0  # not before the idle window
    assert scaling_status(kube)["reason"] == "ScaleToZero"
    kube.wait_for(lambda: events(kube, "ScaleToZero"), what="a ScaleToZero Event")


def test_in_flight_demand_scales_up_within_max_replicas(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    # Short windows so the test can also watch it come back down.
    kube.create(executor(minReplicas=1, stableWindowSeconds=2, panicWindowSeconds=1))
    kube.wait_for(lambda: replicas(kube) == 1)
    kube.patch(*DEP, "ml", "sent", {"status": {"replicas": 1, "readyReplicas": 1}},
               subresource="status")

    # 10 requests in flight with a target of 2 per replica: wants 5, max is 3.
    # (What an SDK instance publishes as its in-flight lease.)
    run(_with_store(redis_url, lambda s: s.publish_inflight("test-sdk", {"ml/sent": 10})))
    kube.wait_for(lambda: replicas(kube) == 3, timeout=5, what="scaled to maxReplicas")
    status = kube.wait_for(lambda: scaling_status(kube).get("desiredReplicas") == 3
                           and scaling_status(kube), what="the decision in status")
    assert status["reason"] in {"Bounded", "Panic"}

    # Demand gone: back down once the stable window has passed, to minReplicas, not 0.
    run(_with_store(redis_url, lambda s: s.publish_inflight("test-sdk", {"ml/sent": 0})))
    kube.patch(*DEP, "ml", "sent", {"status": {"replicas": 3, "readyReplicas": 3}},
               subresource="status")
    kube.wait_for(lambda: replicas(kube) == 1, timeout=10, what="back to minReplicas")
    assert scaling_status(kube)["reason"] in {"ScaleDown", "Bounded"}
    time.sleep(1.0)  # and it stays there: never below minReplicas
    assert replicas(kube) == 1


def test_store_outage_holds_replicas(
    kube: Kube, operator: OperatorRun, redis_url: str, redis_server: Any
) -> None:
    kube.create(executor(minReplicas=0, idleWindowSeconds=0))
    kube.wait_for(lambda: replicas(kube) == 0)
    kube.patch(*DEP, "ml", "sent", {"spec": {"replicas": 2}})
    redis_server.stop()
    try:
        time.sleep(1.5)  # several autoscaler ticks without demand data
        assert replicas(kube) == 2  # not knowing the load is no reason to act
    finally:
        redis_server.start()
