"""Client lifecycle and selection status: the real operator on KMock with a real redis-server.

Executors are real ModelExecutors reconciled by the same operator; what a
cluster would add (ready pods, companion heartbeats and latency samples) the
tests write themselves, as the Deployment controller and companions would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from mulambda.operator.main import register_all
from mulambda.settings import Settings

from support.kube import Kube, KubeAPIError
from support.kube_operator import OperatorRun
from support.printer import printer_row

pytestmark = pytest.mark.integration

ME = ("mulambda.io/v1alpha1", "modelexecutors")
CL = ("mulambda.io/v1alpha1", "clients")
DEP = ("apps/v1", "deployments")
SVC = ("v1", "services")
PREFIX = "ctest"


@pytest.fixture
def operator(kube: Kube, run_operator: Callable[..., OperatorRun], redis_url: str) -> OperatorRun:
    settings = Settings(
        redis_url=redis_url, key_prefix=PREFIX, companion_image="mulambda:test",
        reconcile_interval_seconds=0.3, probe_interval_seconds=0.3,
        autoscale_interval_seconds=0.3, retry_max_delay_seconds=1.0,
    )
    return run_operator(lambda registry: register_all(registry, settings))


def executor(name: str, accuracy: float, **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {
            "model": {"name": name, "storageUri": f"s3://models/{name}"},
            "traits": {"type": "sentiment", "input": "text/plain", "output": "label",
                       "accuracy": accuracy, "serviceTimeMs": 5},
            "scaling": {"minReplicas": 1, "maxReplicas": 2, **scaling},
        },
    }


def client(name: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
        "metadata": {"name": name, "namespace": "apps"},
        "spec": {"criteria": {"type": "sentiment", "input": "text/plain"},
                 "preferences": {"latency": 1, "accuracy": 0}, **spec},
    }


def make_ready(kube: Kube, redis_url: str, name: str) -> None:
    """What the Deployment controller and a companion report for a serving executor."""
    kube.wait_for(lambda: kube.get(*DEP, "ml", name), what=f"Deployment {name}")
    kube.patch(*DEP, "ml", name, {"status": {"replicas": 1, "readyReplicas": 1,
                                             "updatedReplicas": 1}}, subresource="status")
    heartbeat = {"executor": f"ml/{name}", "pod": f"{name}-0", "state": "Available",
                 "version": 1, "expires_at": time.time() + 120}
    redis.Redis.from_url(redis_url).hset(f"{PREFIX}:replicas", f"ml/{name}|{name}-0",
                                         json.dumps(heartbeat))
    kube.wait_for(lambda: stored_executor(redis_url, name).get("state") == "Ready",
                  what=f"{name} Ready in the store")


def stored_executor(redis_url: str, name: str) -> dict[str, Any]:
    raw = redis.Redis.from_url(redis_url).hget(f"{PREFIX}:executors", f"ml/{name}")
    return json.loads(raw) if raw else {}


def latency(redis_url: str, name: str, ms: float, client_id: str = "apps/shop") -> None:
    """A companion's smoothed latency sample from executor ``name`` to the client."""
    sample = {"ms": ms, "samples": 5, "at": time.time(), "expires_at": time.time() + 120}
    redis.Redis.from_url(redis_url).hset(f"{PREFIX}:latency:{client_id}", f"ml/{name}|{name}-0",
                                         json.dumps(sample))


def selected(kube: Kube, name: str = "shop") -> str | None:
    status = (kube.get(*CL, "apps", name) or {}).get("status") or {}
    return (status.get("selected") or {}).get("executor")


def ready_condition(kube: Kube, name: str = "shop") -> dict[str, Any]:
    status = (kube.get(*CL, "apps", name) or {}).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})


def events(kube: Kube, reason: str) -> list[dict[str, Any]]:
    return [e for e in kube.list("v1", "events", "apps") if e.get("reason") == reason]


def test_client_selects_the_fastest_executor_and_follows_latency_changes(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor("alpha", 0.8))
    kube.create(executor("beta", 0.9))
    make_ready(kube, redis_url, "alpha")
    make_ready(kube, redis_url, "beta")
    latency(redis_url, "alpha", 40.0)
    latency(redis_url, "beta", 2.0)

    kube.create(client())
    kube.wait_for(lambda: selected(kube) == "ml/beta", what="beta selected")
    status = kube.get(*CL, "apps", "shop")["status"]
    assert status["selected"]["endpoint"]["rest"] == "http://beta.ml.svc.cluster.local:8501"
    assert [c["executor"] for c in status["candidates"]] == ["ml/beta", "ml/alpha"]
    assert ready_condition(kube)["reason"] == "Selected"

    # The network changes: alpha is now the fast one. Shows within a probe interval.
    latency(redis_url, "alpha", 1.0)
    latency(redis_url, "beta", 60.0)
    kube.wait_for(lambda: selected(kube) == "ml/alpha", timeout=5, what="alpha selected")
    changed = kube.wait_for(lambda: events(kube, "SelectionChanged"))
    assert any("ml/alpha (was ml/beta)" in e["message"] for e in changed)
    row = printer_row(kube.get(*CL, "apps", "shop"))
    assert row["SELECTED"] == "ml/alpha" and row["READY"] == "True"


def test_losing_the_selected_executor_moves_the_client(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor("alpha", 0.8))
    kube.create(executor("beta", 0.9))
    make_ready(kube, redis_url, "alpha")
    make_ready(kube, redis_url, "beta")
    latency(redis_url, "alpha", 1.0)
    latency(redis_url, "beta", 30.0)
    kube.create(client())
    kube.wait_for(lambda: selected(kube) == "ml/alpha")

    kube.delete(*ME, "ml", "alpha")
    kube.wait_for(lambda: selected(kube) == "ml/beta", timeout=5, what="failover to beta")


def test_no_matching_executor_is_a_false_condition_with_the_reason(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor("alpha", 0.8))
    make_ready(kube, redis_url, "alpha")
    kube.create(client(criteria={"type": "sentiment", "input": "audio/wav"}))

    ready = kube.wait_for(lambda: ready_condition(kube).get("reason") == "NoMatchingExecutor"
                          and ready_condition(kube), what="NoMatchingExecutor")
    assert ready["status"] == "False" and "audio/wav" in ready["message"]
    assert kube.wait_for(lambda: events(kube, "NoMatchingExecutor"))[0]["type"] == "Warning"
    assert selected(kube) is None


def test_workload_runs_with_identity_and_a_probe_target_and_is_cleaned_up(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    template = {"spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}
    kube.create(client(workload={"replicas": 2, "template": template}))

    dep = kube.wait_for(lambda: kube.get(*DEP, "apps", "shop-workload"), what="workload")
    assert dep["spec"]["replicas"] == 2
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["app", "mulambda-ping"]
    env = {e["name"]: e["value"] for e in containers[0]["env"]}
    assert env["MULAMBDA_CLIENT"] == "apps/shop" and env["MULAMBDA_KEY_PREFIX"] == PREFIX
    assert kube.wait_for(lambda: kube.get(*SVC, "apps", "shop-workload"))

    raw = kube.wait_for(lambda: redis.Redis.from_url(redis_url).hget(f"{PREFIX}:clients",
                                                                     "apps/shop"))
    assert json.loads(raw)["probe_url"] == (
        "http://shop-workload.apps.svc.cluster.local:8079/ping")

    kube.delete(*CL, "apps", "shop")
    kube.wait_for(lambda: kube.get(*CL, "apps", "shop") is None, what="client gone")
    assert redis.Redis.from_url(redis_url).hget(f"{PREFIX}:clients", "apps/shop") is None
    assert kube.get(*DEP, "apps", "shop-workload") is None  # garbage-collected


def test_external_client_registers_its_probe_url_and_updates(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(client(probeUrl="http://edge.example:8079/ping"))

    def registered() -> dict[str, Any] | None:
        raw = redis.Redis.from_url(redis_url).hget(f"{PREFIX}:clients", "apps/shop")
        return json.loads(raw) if raw else None

    rec = kube.wait_for(registered)
    assert rec["probe_url"] == "http://edge.example:8079/ping" and rec["latency_weight"] == 1
    kube.patch(*CL, "apps", "shop", {"spec": {"preferences": {"accuracy": 3}}})
    kube.wait_for(lambda: (registered() or {}).get("accuracy_weight") == 3)
    assert kube.get(*DEP, "apps", "shop-workload") is None  # no workload asked for


def test_schema_rejects_negative_weights_before_the_operator_sees_them(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    with pytest.raises(KubeAPIError) as err:
        kube.create(client(preferences={"latency": -1}))
    assert err.value.status == 422 and "spec.preferences.latency" in str(err.value)


def test_invalid_workload_gives_false_condition_event_and_no_children(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    # A pod template is schemaless in the CRD: only the operator can check it.
    kube.create(client(workload={"template": {"spec": {"containers": []}}}))
    ready = kube.wait_for(lambda: ready_condition(kube).get("reason") == "InvalidSpec"
                          and ready_condition(kube), what="InvalidSpec")
    assert "at least one container" in ready["message"]
    kube.wait_for(lambda: events(kube, "InvalidSpec"))
    assert redis.Redis.from_url(redis_url).hget(f"{PREFIX}:clients", "apps/shop") is None
    assert kube.get(*DEP, "apps", "shop-workload") is None
