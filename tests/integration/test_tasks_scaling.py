"""The task backlog as demand, through the real operator on the real control plane with a
real redis-server: a queued task wakes an executor at zero, and status.scaling and the
operator's /metrics show the queue depth and the oldest task's age."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mulambda.operator.main import register_all
from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.tasks.queue import TaskQueue
from mulambda.tasks.records import Status, TaskOptions, new_task_id, outcome

from support.cluster import Cluster
from support.controlplane import ControlPlane
from support.operator_run import OperatorRun

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ME = ("mulambda.io/v1alpha1", "modelexecutors")
DEP = ("apps/v1", "deployments")
PREFIX = "ttest"


@pytest.fixture
def operator(run_operator: Callable[..., OperatorRun], redis_url: str) -> OperatorRun:
    settings = Settings(
        redis_url=redis_url, key_prefix=PREFIX, companion_image="mulambda:test",
        reconcile_interval_seconds=0.3, probe_interval_seconds=0.3,
        autoscale_interval_seconds=0.25, retry_max_delay_seconds=1.0,
    )
    return run_operator(lambda registry: register_all(registry, settings))


def executor(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
        "metadata": {"name": "heavy", "namespace": ns},
        "spec": {
            "model": {"name": "heavy", "storageUri": "s3://models/heavy"},
            "traits": {"type": "vision", "input": "image", "output": "label",
                       "serviceTimeMs": 1000},
            "scaling": {"minReplicas": 0, "maxReplicas": 3, "targetConcurrency": 2},
        },
    }


def scaling(cluster: Cluster, ns: str) -> dict[str, Any]:
    return ((cluster.get(*ME, ns, "heavy") or {}).get("status") or {}).get("scaling") or {}


def replicas(cluster: Cluster, ns: str) -> int | None:
    dep = cluster.get(*DEP, ns, "heavy")
    return None if dep is None else dep["spec"].get("replicas")


async def _queue(redis_url: str, fn: Callable[[TaskQueue], Any]) -> Any:
    store = MetadataStore.from_url(redis_url, PREFIX)
    try:
        return await fn(TaskQueue(store))
    finally:
        await store.close()


def test_a_queued_task_wakes_an_executor_at_zero_and_status_shows_the_backlog(
    cluster: Cluster, controlplane: ControlPlane, operator: OperatorRun, redis_url: str, ns: str
) -> None:
    eid = f"{ns}/heavy"
    cluster.create(executor(ns))
    cluster.wait_for(lambda: replicas(cluster, ns) == 0, what="Deployment at zero")

    task_id = new_task_id(f"{ns}/shop")
    asyncio.run(_queue(redis_url, lambda q: q.submit(
        task_id, client=f"{ns}/shop", executor=eid, model="heavy", body="{}",
        options=TaskOptions())))

    cluster.wait_for(lambda: replicas(cluster, ns) == 1, timeout=10,
                     what="activated by the queued task")
    cluster.wait_for(lambda: cluster.events(ns, "Activate"), what="an Activate Event")
    shown = cluster.wait_for(lambda: scaling(cluster, ns).get("queueDepth") == 1
                             and scaling(cluster, ns), what="queueDepth 1 in status.scaling")
    assert shown["oldestTaskAgeSeconds"] >= 0
    labels = {"executor": eid}
    assert REGISTRY.get_sample_value("mulambda_task_queue_depth", labels) == 1
    assert REGISTRY.get_sample_value("mulambda_task_oldest_age_seconds", labels) >= 0

    async def serve(q: TaskQueue) -> None:  # what a worker of the woken pod does
        [(entry, got)] = await q.read(eid, "heavy-0", 1, 1000)
        assert got == task_id
        await q.begin(got, "heavy-0")
        assert await q.finish(eid, entry, got, outcome(Status.SUCCEEDED, worker="heavy-0",
                                                       at=0.0, result={}), 60)

    asyncio.run(_queue(redis_url, serve))
    cluster.wait_for(lambda: scaling(cluster, ns).get("queueDepth") == 0,
                     what="the backlog drained in status.scaling")
    assert REGISTRY.get_sample_value("mulambda_task_queue_depth", labels) == 0
