"""The real operator on the emulated Kubernetes API with a real redis-server.

There is no kube-controller-manager here: nothing runs pods, so a test that
needs "replicas became ready" patches the Deployment's status itself, as the
Deployment controller would.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from mulambda.operator.main import FINALIZER, register_all
from mulambda.settings import Settings

from support.kube import Kube
from support.kube_operator import OperatorRun
from support.printer import printer_row
from support.procs import RedisServer

pytestmark = pytest.mark.integration

ME = ("mulambda.io/v1alpha1", "modelexecutors")
DEP = ("apps/v1", "deployments")
SVC = ("v1", "services")
PREFIX = "itest"


def executor(name: str = "hp2", version: int = 1, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "mulambda.io/v1alpha1",
        "kind": "ModelExecutor",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {
            "model": {"name": "half_plus_two", "storageUri": "s3://models/half_plus_two",
                      "version": version},
            "traits": {"type": "regression", "input": "tensor/float32",
                       "output": "tensor/float32", "accuracy": 0.9},
            "scaling": {"minReplicas": 1, "maxReplicas": 3},
        },
    }
    body["spec"].update(spec)
    return body


def settings_for(redis_url: str) -> Settings:
    return Settings(
        redis_url=redis_url, key_prefix=PREFIX, companion_image="mulambda:test",
        reconcile_interval_seconds=0.5, probe_interval_seconds=0.5,
        autoscale_interval_seconds=0.5, retry_max_delay_seconds=1.0, heartbeat_ttl_seconds=30,
    )


@pytest.fixture
def operator(
    kube: Kube, run_operator: Callable[..., OperatorRun], redis_url: str
) -> OperatorRun:
    settings = settings_for(redis_url)
    return run_operator(lambda registry: register_all(registry, settings))


def record(redis_url: str, executor_id: str = "ml/hp2") -> dict[str, Any] | None:
    raw = redis.Redis.from_url(redis_url).hget(f"{PREFIX}:executors", executor_id)
    return None if raw is None else json.loads(raw)


def status_of(kube: Kube, name: str = "hp2") -> dict[str, Any]:
    return (kube.get(*ME, "ml", name) or {}).get("status") or {}


def condition(kube: Kube, type_: str, name: str = "hp2") -> dict[str, Any]:
    for c in status_of(kube, name).get("conditions", []):
        if c["type"] == type_:
            return c
    return {}


def events(kube: Kube, reason: str) -> list[dict[str, Any]]:
    return [e for e in kube.list("v1", "events", "ml") if e.get("reason") == reason]


def test_create_gives_deployment_service_metadata_and_status(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    owner = kube.create(executor())

    dep = kube.wait_for(lambda: kube.get(*DEP, "ml", "hp2"), what="the Deployment")
    svc = kube.wait_for(lambda: kube.get(*SVC, "ml", "hp2"), what="the Service")
    for child in (dep, svc):
        [ref] = child["metadata"]["ownerReferences"]
        assert ref["uid"] == owner["metadata"]["uid"] and ref["kind"] == "ModelExecutor"
    assert [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]] == [
        "serving", "companion"]
    assert dep["spec"]["replicas"] == 1

    rec = kube.wait_for(lambda: record(redis_url), what="the store record")
    assert rec["model"] == "half_plus_two" and rec["type"] == "regression"
    assert rec["rest"] == "http://hp2.ml.svc.cluster.local:8501"
    assert rec["state"] == "Pending"

    kube.wait_for(lambda: condition(kube, "Registered").get("status") == "True",
                  what="Registered=True")
    status = status_of(kube)
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == {"rest": "http://hp2.ml.svc.cluster.local:8501",
                                  "grpc": "hp2.ml.svc.cluster.local:8500"}
    assert condition(kube, "Ready")["reason"] == "WaitingForReplicas"
    assert FINALIZER in kube.get(*ME, "ml", "hp2")["metadata"]["finalizers"]
    kube.wait_for(lambda: events(kube, "CreatedDeployment"), what="a CreatedDeployment Event")


def test_ready_replicas_and_companion_heartbeats_show_in_status(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor())
    kube.wait_for(lambda: kube.get(*DEP, "ml", "hp2"))
    # What the Deployment controller and a companion would report:
    kube.patch(*DEP, "ml", "hp2", {"status": {"replicas": 1, "readyReplicas": 1,
                                              "updatedReplicas": 1}}, subresource="status")
    heartbeat = {"executor": "ml/hp2", "pod": "hp2-abc", "ip": "10.0.0.5", "state": "Available",
                 "version": 1, "reason": "", "message": "", "heartbeat_at": time.time(),
                 "expires_at": time.time() + 60}
    redis.Redis.from_url(redis_url).hset(f"{PREFIX}:replicas", "ml/hp2|hp2-abc",
                                         json.dumps(heartbeat))

    kube.wait_for(lambda: condition(kube, "Ready").get("status") == "True", what="Ready=True")
    status = status_of(kube)
    assert condition(kube, "Ready")["reason"] == "ModelServing"
    assert condition(kube, "ModelLoaded")["status"] == "True"
    assert status["model"]["loadedVersion"] == "1"
    assert (status["readyReplicas"], status["replicaSummary"]) == (1, "1/1")
    assert kube.wait_for(lambda: (record(redis_url) or {}).get("state") == "Ready")
    kube.wait_for(lambda: [e for e in events(kube, "ModelServing") if e["type"] == "Normal"],
                  what="a Ready Event")
    # `kubectl get modelexecutors` columns, evaluated by kubectl on the operator's object.
    row = printer_row(kube.get(*ME, "ml", "hp2"))
    assert row == {"MODEL": "half_plus_two", "VERSION": "1", "TYPE": "regression",
                   "READY": "True", "REPLICAS": "1/1", "REASON": "ModelServing",
                   "ENDPOINT": "http://hp2.ml.svc.cluster.local:8501"}


def test_failed_model_load_reported_by_a_companion_is_shown(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor())
    kube.wait_for(lambda: kube.get(*DEP, "ml", "hp2"))
    failed = {"executor": "ml/hp2", "pod": "hp2-x", "state": "Failed", "reason": "ModelNotFound",
              "message": "s3://models/half_plus_two/1/ has no objects",
              "expires_at": time.time() + 60}
    redis.Redis.from_url(redis_url).hset(f"{PREFIX}:replicas", "ml/hp2|hp2-x",
                                         json.dumps(failed))
    kube.wait_for(lambda: condition(kube, "ModelLoaded").get("reason") == "ModelNotFound",
                  what="ModelLoaded=False/ModelNotFound")
    assert condition(kube, "Ready")["status"] == "False"
    assert condition(kube, "Ready")["reason"] == "ModelNotFound"
    assert "has no objects" in status_of(kube)["lastFailure"]


def test_new_version_failing_while_old_pods_serve_is_reported(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor())
    kube.wait_for(lambda: kube.get(*DEP, "ml", "hp2"))
    now = time.time()
    r = redis.Redis.from_url(redis_url)
    r.hset(f"{PREFIX}:replicas", "ml/hp2|old", json.dumps(
        {"executor": "ml/hp2", "pod": "old", "state": "Available", "version": 1,
         "expires_at": now + 60}))
    r.hset(f"{PREFIX}:replicas", "ml/hp2|new", json.dumps(
        {"executor": "ml/hp2", "pod": "new", "state": "Failed", "reason": "NotASavedModel",
         "message": "s3://models/half_plus_two/2/ has no saved_model.pb", "expires_at": now + 60}))
    progressing = kube.wait_for(
        lambda: condition(kube, "Progressing").get("reason") == "NewVersionFailed"
        and condition(kube, "Progressing"), what="Progressing=False/NewVersionFailed")
    assert progressing["status"] == "False" and "no saved_model.pb" in progressing["message"]
    assert condition(kube, "ModelLoaded")["status"] == "True"  # version 1 still serves
    assert "keeps serving" in status_of(kube)["lastFailure"]
    kube.wait_for(lambda: events(kube, "NewVersionFailed"), what="a NewVersionFailed Event")


def test_labels_added_by_others_are_kept(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor())
    kube.wait_for(lambda: kube.get(*DEP, "ml", "hp2"))
    kube.patch(*DEP, "ml", "hp2", {"metadata": {"labels": {"cost-center": "ml-42"}}})
    time.sleep(1.5)  # three reconcile rounds
    labels = kube.get(*DEP, "ml", "hp2")["metadata"]["labels"]
    assert labels["cost-center"] == "ml-42"
    assert labels["app.kubernetes.io/managed-by"] == "mulambda-operator"
    assert not events(kube, "UpdatedDeployment")


def test_spec_change_patches_deployment_and_updates_metadata(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor(version=1))
    first = kube.wait_for(lambda: kube.get(*DEP, "ml", "hp2"))
    kube.wait_for(lambda: (record(redis_url) or {}).get("version") == 1)

    kube.patch(*ME, "ml", "hp2", {"spec": {"model": {"version": 2},
                                           "traits": {"accuracy": 0.95}}})

    def rolled() -> dict[str, Any] | None:
        dep = kube.get(*DEP, "ml", "hp2")
        env = {e["name"]: e.get("value") for e in
               dep["spec"]["template"]["spec"]["containers"][1]["env"]}
        return dep if env["MULAMBDA_MODEL_VERSION"] == "2" else None

    second = kube.wait_for(rolled, what="the Deployment rolled to version 2")
    assert second["metadata"]["uid"] == first["metadata"]["uid"]  # patched, not recreated
    rec = kube.wait_for(lambda: (r := record(redis_url)) and r["version"] == 2 and r)
    assert rec["accuracy"] == 0.95
    kube.wait_for(lambda: status_of(kube).get("observedGeneration") == 2)
    kube.wait_for(lambda: events(kube, "UpdatedDeployment"), what="an UpdatedDeployment Event")


def test_nothing_changes_when_nothing_changed(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor())
    kube.wait_for(lambda: condition(kube, "Registered").get("status") == "True")
    time.sleep(0.3)  # let the first status patches settle
    before = len([r for r in kube.requests if r.verb == "patch" and r.plural == "deployments"])
    time.sleep(2.0)  # four timer rounds
    after = [r for r in kube.requests if r.verb == "patch" and not r.from_harness
             and r.plural in ("deployments", "services")]
    assert len(after) == before == 0
    assert len(kube.list(*DEP, "ml")) == 1 and len(kube.list(*SVC, "ml")) == 1


def test_deleting_executor_removes_metadata_and_children(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor())
    kube.wait_for(lambda: record(redis_url), what="the store record")
    kube.wait_for(lambda: kube.get(*DEP, "ml", "hp2"))

    kube.delete(*ME, "ml", "hp2")

    kube.wait_for(lambda: kube.get(*ME, "ml", "hp2") is None, what="the executor gone")
    assert record(redis_url) is None
    assert kube.get(*DEP, "ml", "hp2") is None and kube.get(*SVC, "ml", "hp2") is None


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"scaling": {"minReplicas": 4, "maxReplicas": 2}}, "must not exceed"),
        ({"serving": {"resources": {"limits": {"cpu": "lots"}}}}, "not a Kubernetes quantity"),
    ],
)
def test_invalid_spec_gives_false_condition_event_and_no_children(
    kube: Kube, operator: OperatorRun, redis_url: str, change: dict[str, Any], needle: str,
) -> None:
    # The emulator does not run the CRD's CEL rules: like an older API server.
    kube.create(executor(**change))

    ready = kube.wait_for(lambda: condition(kube, "Ready").get("reason") == "InvalidSpec"
                          and condition(kube, "Ready"), what="Ready=False/InvalidSpec")
    assert ready["status"] == "False" and needle in ready["message"]
    warning = kube.wait_for(lambda: events(kube, "InvalidSpec"), what="an InvalidSpec Event")
    assert warning[0]["type"] == "Warning" and needle in warning[0]["message"]
    time.sleep(1.0)  # two timer rounds: still nothing built, one Event only
    assert kube.get(*DEP, "ml", "hp2") is None and kube.get(*SVC, "ml", "hp2") is None
    assert record(redis_url) is None
    assert len(events(kube, "InvalidSpec")) == 1


def test_fixing_an_invalid_spec_converges(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor(scaling={"minReplicas": 4, "maxReplicas": 2}))
    kube.wait_for(lambda: condition(kube, "Ready").get("reason") == "InvalidSpec")
    kube.patch(*ME, "ml", "hp2", {"spec": {"scaling": {"maxReplicas": 5}}})
    dep = kube.wait_for(lambda: kube.get(*DEP, "ml", "hp2"), what="the Deployment after the fix")
    assert dep["spec"]["replicas"] == 4
    kube.wait_for(lambda: condition(kube, "Registered").get("status") == "True")


def test_operator_restart_gives_no_duplicate_children(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor())
    kube.wait_for(lambda: condition(kube, "Registered").get("status") == "True")

    operator.restart()
    kube.create(executor("second"))
    kube.wait_for(lambda: condition(kube, "Registered", "second").get("status") == "True")
    time.sleep(1.0)  # resume handlers and timers ran for "hp2" meanwhile

    creates = [r for r in kube.requests if r.verb == "create" and not r.from_harness
               and r.plural in ("deployments", "services")]
    assert len(creates) == 4  # one Deployment and one Service per executor, ever
    assert sorted(d["metadata"]["name"] for d in kube.list(*DEP, "ml")) == ["hp2", "second"]


def test_deleted_child_is_recreated_by_the_timer(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    kube.create(executor())
    first = kube.wait_for(lambda: kube.get(*SVC, "ml", "hp2"))
    kube.delete(*SVC, "ml", "hp2")
    again = kube.wait_for(lambda: kube.get(*SVC, "ml", "hp2"), what="the Service recreated")
    assert again["metadata"]["uid"] != first["metadata"]["uid"]


def test_foreign_object_with_the_childs_name_is_not_overwritten(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    foreign = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "hp2", "namespace": "ml", "labels": {"owner": "team-b"}},
               "spec": {"ports": [{"port": 80}], "selector": {"app": "b"}}}
    kube.create(foreign)
    kube.create(executor())
    ready = kube.wait_for(lambda: condition(kube, "Ready").get("reason") == "NameConflict"
                          and condition(kube, "Ready"), what="Ready=False/NameConflict")
    assert "not owned by ModelExecutor hp2" in ready["message"]
    svc = kube.get(*SVC, "ml", "hp2")
    assert svc["spec"]["selector"] == {"app": "b"} and svc["metadata"]["labels"] == {
        "owner": "team-b"}


def test_redis_down_during_create_is_retried_and_converges(
    kube: Kube, operator: OperatorRun, redis_url: str, redis_server: RedisServer
) -> None:
    redis_server.stop()
    try:
        kube.create(executor())
        # Children do not wait for the store; the executor says what is wrong.
        kube.wait_for(lambda: kube.get(*DEP, "ml", "hp2"), what="the Deployment")
        registered = kube.wait_for(
            lambda: condition(kube, "Registered").get("reason") == "StoreUnavailable"
            and condition(kube, "Registered"), what="Registered=False/StoreUnavailable")
        assert registered["status"] == "False" and "retrying" in registered["message"]
        kube.wait_for(lambda: events(kube, "StoreUnavailable"), what="a StoreUnavailable Event")
        time.sleep(1.5)  # several retries while the store is down: still there, no crash
        assert kube.get(*ME, "ml", "hp2") is not None
    finally:
        redis_server.start()

    kube.wait_for(lambda: condition(kube, "Registered").get("status") == "True", timeout=15,
                  what="Registered=True once Redis is back")
    assert record(redis_url)["model"] == "half_plus_two"


def test_redis_down_during_delete_keeps_the_executor_until_metadata_is_removed(
    kube: Kube, operator: OperatorRun, redis_url: str, redis_server: RedisServer
) -> None:
    kube.create(executor())
    kube.wait_for(lambda: record(redis_url))
    redis_server.stop()
    try:
        kube.delete(*ME, "ml", "hp2")
        time.sleep(1.5)
        held = kube.get(*ME, "ml", "hp2")
        assert held is not None and FINALIZER in held["metadata"]["finalizers"]
    finally:
        redis_server.start()
    # redis-server restarted empty (no persistence): the delete completes all the same.
    kube.wait_for(lambda: kube.get(*ME, "ml", "hp2") is None, timeout=15,
                  what="the executor gone once Redis is back")


def test_operator_uses_exactly_the_rbac_rules_it_declares(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    from mulambda.operator.rbac import REQUIRED_RULES

    # Everything the operator does: executors created, changed, deleted;
    # a Client whose workload is created, then dropped, then the Client deleted.
    kube.create(executor())
    kube.wait_for(lambda: condition(kube, "Registered").get("status") == "True")
    kube.patch(*ME, "ml", "hp2", {"spec": {"model": {"version": 2}}})
    kube.wait_for(lambda: status_of(kube).get("observedGeneration") == 2)
    # Drift on a child is corrected by a patch.
    kube.patch(*SVC, "ml", "hp2", {"spec": {"selector": {"app": "someone-else"}}})
    kube.wait_for(lambda: kube.get(*SVC, "ml", "hp2")["spec"]["selector"].get("app") is None,
                  what="the Service selector restored")
    cl = ("mulambda.io/v1alpha1", "clients")
    template = {"spec": {"containers": [{"name": "app", "image": "example/app:1"}]}}
    kube.create({"apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
                 "metadata": {"name": "shop", "namespace": "ml"},
                 "spec": {"criteria": {"type": "regression"},
                          "workload": {"template": template}}})
    kube.wait_for(lambda: kube.get(*DEP, "ml", "shop-workload"))
    kube.patch(*cl, "ml", "shop", [{"op": "remove", "path": "/spec/workload"}],
               patch_type="json")
    kube.wait_for(lambda: kube.get(*DEP, "ml", "shop-workload") is None, what="workload removed")
    kube.delete(*cl, "ml", "shop")
    kube.delete(*ME, "ml", "hp2")
    kube.wait_for(lambda: kube.get(*ME, "ml", "hp2") is None and kube.get(*cl, "ml", "shop")
                  is None)

    assert kube.rbac_violations(copy.deepcopy(REQUIRED_RULES)) == set()  # nothing undeclared
    declared = {(g, r, v) for rule in REQUIRED_RULES for g in rule["apiGroups"]
                for r in rule["resources"] for v in rule["verbs"]}
    unused = sorted(declared - kube.rbac_triples())
    assert unused == [], unused  # nothing granted that is never used


async def test_store_record_round_trip_is_what_selection_reads(
    kube: Kube, operator: OperatorRun, redis_url: str
) -> None:
    from mulambda.store.metadata import MetadataStore

    await asyncio.to_thread(kube.create, executor())
    store = MetadataStore.from_url(redis_url, PREFIX)
    try:
        for _ in range(100):
            snap = await store.snapshot()
            if "ml/hp2" in snap.executors:
                break
            await asyncio.sleep(0.05)
        assert snap.executors["ml/hp2"].grpc == "hp2.ml.svc.cluster.local:8500"
    finally:
        await store.close()
