"""The real operator on a real Kubernetes control plane, with a real redis-server.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK
(support/controlplane.py): the Deployment and ReplicaSet controllers make an
executor's pods, the scheduler binds them to KWOK's fake nodes and KWOK marks
them Running and Ready. No container runs, so what a companion would report
(heartbeats) is written to redis by the test. The operator authenticates with
a TokenRequest token of the Helm chart's ServiceAccount, so the chart's RBAC
is enforced by the server; what the operator asked the server for is read
back from the API server's audit log. Each test has its own namespace
(``ns``, Pod Security ``restricted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis

from mulambda.operator import handling
from mulambda.operator import main as operator_main
from mulambda.operator.k8s import session
from mulambda.operator.k8s.api import KubeApi
from mulambda.operator.main import FINALIZER, register_all
from mulambda.operator.rbac import REQUIRED_RULES
from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ReplicaRecord, _dump
from mulambda.tasks.queue import TaskQueue
from mulambda.tasks.records import TaskOptions, new_task_id

from support.cluster import ApiError, AuditEvent, Cluster
from support.identity import Identity
from support.operator_fixtures import sign_as_its_pod
from support.operator_run import OperatorRun
from support.procs import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ME = ("mulambda.io/v1alpha1", "modelexecutors")
CL = ("mulambda.io/v1alpha1", "clients")
DEP = ("apps/v1", "deployments")
SVC = ("v1", "services")
RBAC = "rbac.authorization.k8s.io/v1"
PREFIX = "itest"
GC_TIMEOUT = 60.0  # see test_deleting_executor_removes_metadata_and_children
CHILDREN = ("deployments", "services")
# STALE_TIMER_BODY: kopf applies a handler's status patch after the handler
# returns, so after the per-object lock is released; the timer tick queued on
# that lock then runs on the body from before the patch (the watch event with
# the new status arrives later), sees no Ready condition yet and posts the same
# Ready or InvalidSpec Event a second time. Seen on the real server, never on
# the emulator; an operator bug (operator/handling.py), tolerated here as one
# repeat at most, never one per round.
# Pods with this node selector are never scheduled: no replica becomes Ready,
# as when a companion fails to load the model and its readiness probe fails
# (KWOK would otherwise report every pod Ready whatever the companion says).
NO_NODE = {"nodeSelector": {"mulambda.io/test-node": "none"}}
# A workload container that Pod Security "restricted" admits.
RESTRICTED_APP = {
    "name": "app", "image": "example/app:1",
    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"}},
}


def executor(namespace: str, name: str = "hp2", version: int = 1, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "mulambda.io/v1alpha1",
        "kind": "ModelExecutor",
        "metadata": {"name": name, "namespace": namespace},
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


@dataclass
class Env:
    """One test's view: the admin client, its namespace, the store, the operator's user."""

    cluster: Cluster
    ns: str
    redis_url: str
    user: str
    mark: int  # the audit log's position before the operator started

    def create(self, name: str = "hp2", **kwargs: Any) -> dict[str, Any]:
        return self.cluster.create(executor(self.ns, name, **kwargs))

    def get(self, what: tuple[str, str], name: str = "hp2") -> dict[str, Any] | None:
        return self.cluster.get(*what, self.ns, name)

    def patch(self, what: tuple[str, str], patch: Any, name: str = "hp2",
              **kwargs: Any) -> dict[str, Any]:
        return self.cluster.patch(*what, self.ns, name, patch, **kwargs)

    def status(self, name: str = "hp2") -> dict[str, Any]:
        return (self.get(ME, name) or {}).get("status") or {}

    def condition(self, type_: str, name: str = "hp2") -> dict[str, Any]:
        for c in self.status(name).get("conditions", []):
            if c["type"] == type_:
                return dict(c)
        return {}

    def events(self, reason: str, name: str = "hp2") -> list[dict[str, Any]]:
        return self.cluster.events(self.ns, reason, involved=name)

    def id(self, name: str = "hp2") -> str:
        return f"{self.ns}/{name}"

    def record(self, name: str = "hp2") -> dict[str, Any] | None:
        raw = redis.Redis.from_url(self.redis_url).hget(f"{PREFIX}:executors", self.id(name))
        return None if raw is None else json.loads(raw)

    def host(self, name: str = "hp2") -> str:
        return f"{name}.{self.ns}.svc.cluster.local"

    def heartbeat(self, pod: str, name: str = "hp2", **fields: Any) -> None:
        """What the companion in ``pod`` would write to the store (signed as it would)."""
        record = sign_as_its_pod(self.cluster, ReplicaRecord(
            executor=self.id(name), pod=pod, expires_at=time.time() + 60, **fields))
        redis.Redis.from_url(self.redis_url).hset(f"{PREFIX}:replicas", f"{self.id(name)}|{pod}",
                                                  _dump(record))

    def forged_heartbeat(self, pod: str, name: str = "hp2", **fields: Any) -> None:
        """A heartbeat for ``pod`` that its executor's key did not sign."""
        record = ReplicaRecord(executor=self.id(name), pod=pod, expires_at=time.time() + 60,
                               **fields)
        redis.Redis.from_url(self.redis_url).hset(f"{PREFIX}:replicas", f"{self.id(name)}|{pod}",
                                                  _dump(record))

    def requests(self, since: int | None = None) -> list[AuditEvent]:
        """The operator's requests (the API server's audit log) since ``since`` (default:
        since the operator started)."""
        return self.cluster.audit(self.user, since=self.mark if since is None else since)

    def writes(self, verb: str, since: int | None = None) -> list[AuditEvent]:
        """The operator's ``verb`` requests on Deployments and Services of this namespace."""
        return [e for e in self.requests(since) if e.verb == verb and e.resource in CHILDREN
                and e.namespace == self.ns]

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
        return self.cluster.wait_for(check, timeout=timeout, what=what)


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
def env(cluster: Cluster, ns: str, redis_url: str, operator_identity: Identity) -> Env:
    return Env(cluster, ns, redis_url, operator_identity.user, cluster.audit_mark())


def start(run_operator: Callable[..., OperatorRun], env: Env, **options: Any) -> OperatorRun:
    settings = settings_for(env.redis_url)
    return run_operator(lambda registry: register_all(registry, settings), **options)


@pytest.fixture
def operator(env: Env, run_operator: Callable[..., OperatorRun]) -> OperatorRun:
    return start(run_operator, env)


def pods_of(env: Env, name: str = "hp2") -> list[dict[str, Any]]:
    return env.cluster.list("v1", "pods", env.ns,
                            labelSelector=f"app.kubernetes.io/instance={name}")


def ready_replicas(env: Env, name: str = "hp2") -> int:
    return int(((env.get(DEP, name) or {}).get("status") or {}).get("readyReplicas") or 0)


def timer_rounds(operator: OperatorRun, rounds: int, timer: str = "refresh") -> None:
    """Wait until the operator's fleet-wide ``timer`` loop has run ``rounds`` more ticks
    (by its log; was kopf's per-executor timer, whose ticks the fleet's replace)."""
    def ran() -> int:
        return sum(1 for r in operator.records
                   if r.getMessage().startswith(f"{timer} tick done "))

    before = ran()
    Cluster.wait_for(lambda: ran() >= before + rounds, what=f"{rounds} rounds of {timer}")


def printed_rows(table: str) -> list[dict[str, str]]:
    """kubectl's table as dicts, cut at the header's column starts (cells may be empty)."""
    header, *lines = table.rstrip("\n").splitlines()
    names = header.split()
    starts = [header.index(f" {n} ") + 1 if i else 0 for i, n in enumerate(names[:-1])]
    starts.append(header.rindex(f" {names[-1]}") + 1)
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)}
            for line in lines]


def test_create_gives_deployment_service_metadata_and_status(
    env: Env, operator: OperatorRun
) -> None:
    owner = env.create()

    dep = env.wait(lambda: env.get(DEP), what="the Deployment")
    svc = env.wait(lambda: env.get(SVC), what="the Service")
    for child in (dep, svc):
        [ref] = child["metadata"]["ownerReferences"]
        assert ref["uid"] == owner["metadata"]["uid"] and ref["kind"] == "ModelExecutor"
        assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
    assert [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]] == [
        "serving", "companion"]
    assert dep["spec"]["replicas"] == 1

    rec = env.wait(env.record, what="the store record")
    assert rec["model"] == "half_plus_two" and rec["type"] == "regression"
    assert rec["rest"] == f"http://{env.host()}:8501"

    env.wait(lambda: env.condition("Registered").get("status") == "True",
             what="Registered=True")
    status = env.status()
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == {"rest": f"http://{env.host()}:8501",
                                  "grpc": f"{env.host()}:8500"}
    assert FINALIZER in env.get(ME)["metadata"]["finalizers"]
    [created] = env.wait(lambda: env.events("CreatedChildren"), what="a CreatedChildren Event")
    assert created["message"] == f"Created Deployment {env.ns}/hp2, Service {env.ns}/hp2"
    assert not env.events("CreatedDeployment") and not env.events("CreatedService")
    # Real pods follow within seconds (the emulator never had any): the real
    # ReplicaSet's pod, admitted by Pod Security "restricted", is Ready on a KWOK node;
    # status follows. The first Ready state, "waiting for replicas", is no Event of
    # its own (CreatedChildren tells it); becoming Ready is.
    assert rec["state"] in ("Pending", "Ready")
    env.wait(lambda: env.status().get("replicaSummary") == "1/1", what="1/1 replicas")
    assert env.condition("Ready")["reason"] == "ModelServing"
    env.wait(lambda: env.events("ModelServing"), what="a ModelServing Event")
    assert not env.events("WaitingForReplicas")
    [pod] = pods_of(env)
    assert pod["status"]["phase"] == "Running"
    env.wait(lambda: (env.record() or {}).get("state") == "Ready", what="the record Ready")


def test_ready_replicas_and_companion_heartbeats_show_in_status(
    env: Env, operator: OperatorRun
) -> None:
    env.create()
    # No faked Deployment status: the Deployment controller counts KWOK's Ready pod.
    env.wait(lambda: ready_replicas(env) == 1, what="the Deployment's pod Ready")
    [pod] = pods_of(env)
    # What the companion in that pod would report.
    env.heartbeat(pod["metadata"]["name"], ip=pod["status"].get("podIP", ""),
                  state="Available", version=1, reason="", message="", heartbeat_at=time.time())

    env.wait(lambda: env.condition("ModelLoaded").get("status") == "True",
             what="ModelLoaded=True")
    status = env.status()
    assert env.condition("Ready")["status"] == "True"
    assert env.condition("Ready")["reason"] == "ModelServing"
    assert status["model"]["loadedVersion"] == "1"
    assert (status["readyReplicas"], status["replicaSummary"]) == (1, "1/1")
    env.wait(lambda: (env.record() or {}).get("state") == "Ready", what="the record Ready")
    env.wait(lambda: [e for e in env.events("ModelServing") if e["type"] == "Normal"],
             what="a Ready Event")
    # `kubectl get modelexecutors -o wide`: the columns as the API server prints them.
    table = env.cluster.cp.kubectl("get", "modelexecutors", "-n", env.ns, "-o", "wide").stdout
    [row] = printed_rows(table)
    assert row.pop("AGE")
    assert row == {"NAME": "hp2", "MODEL": "half_plus_two", "VERSION": "1",
                   "TYPE": "regression", "READY": "True", "REPLICAS": "1/1",
                   "REASON": "ModelServing", "ROLLOUT": "Stable",
                   "ENDPOINT": f"http://{env.host()}:8501"}


def test_a_heartbeat_its_key_did_not_sign_is_not_a_replica(
    env: Env, operator: OperatorRun
) -> None:
    """What routers do not count, the status does not count either: a forged Available
    heartbeat leaves the executor loading; its pod's signed one makes it serve."""
    env.create()
    env.wait(lambda: ready_replicas(env) == 1, what="the Deployment's pod Ready")
    [pod] = pods_of(env)
    name = pod["metadata"]["name"]
    env.forged_heartbeat(name, state="Available", version=1)
    timer_rounds(operator, 2)
    assert env.condition("ModelLoaded").get("status") != "True"
    assert env.status().get("model", {}).get("loadedVersion") is None
    env.heartbeat(name, state="Available", version=1)
    env.wait(lambda: env.condition("ModelLoaded").get("status") == "True",
             what="ModelLoaded=True from the signed heartbeat")


def test_failed_model_load_reported_by_a_companion_is_shown(
    env: Env, operator: OperatorRun
) -> None:
    env.create(**NO_NODE)
    env.wait(lambda: env.get(DEP), what="the Deployment")
    env.heartbeat("hp2-x", state="Failed", reason="ModelNotFound",
                  message="s3://models/half_plus_two/1/ has no objects")
    env.wait(lambda: env.condition("ModelLoaded").get("reason") == "ModelNotFound",
             what="ModelLoaded=False/ModelNotFound")
    env.wait(lambda: env.condition("Ready").get("reason") == "ModelNotFound",
             what="Ready=False/ModelNotFound")
    assert env.condition("Ready")["status"] == "False"
    assert "has no objects" in env.status()["lastFailure"]
    [pod] = env.wait(lambda: pods_of(env), what="the pod")  # real, but no node fits it
    assert pod["status"]["phase"] == "Pending" and ready_replicas(env) == 0
    env.wait(lambda: [e for e in env.events("ModelNotFound") if e["type"] == "Warning"],
             what="a ModelNotFound Warning Event")


def test_new_version_failing_while_old_pods_serve_is_reported(
    env: Env, operator: OperatorRun
) -> None:
    env.create()
    env.wait(lambda: env.get(DEP), what="the Deployment")
    env.heartbeat("old", state="Available", version=1)
    env.heartbeat("new", state="Failed", reason="NotASavedModel",
                  message="s3://models/half_plus_two/2/ has no saved_model.pb")
    progressing = env.wait(
        lambda: env.condition("Progressing").get("reason") == "NewVersionFailed"
        and env.condition("Progressing"), what="Progressing=False/NewVersionFailed")
    assert progressing["status"] == "False" and "no saved_model.pb" in progressing["message"]
    assert env.condition("ModelLoaded")["status"] == "True"  # version 1 still serves
    assert "keeps serving" in env.status()["lastFailure"]
    env.wait(lambda: env.events("NewVersionFailed"), what="a NewVersionFailed Event")


def test_labels_added_by_others_are_kept(env: Env, operator: OperatorRun) -> None:
    env.create()
    env.wait(lambda: env.get(DEP), what="the Deployment")
    env.patch(DEP, {"metadata": {"labels": {"cost-center": "ml-42"}}})
    timer_rounds(operator, 3)
    labels = env.get(DEP)["metadata"]["labels"]
    assert labels["cost-center"] == "ml-42"
    assert labels["app.kubernetes.io/managed-by"] == "mulambda-operator"
    assert not env.events("UpdatedDeployment")
    assert env.writes("patch") == []


def test_spec_change_patches_deployment_and_updates_metadata(
    env: Env, operator: OperatorRun
) -> None:
    env.create(version=1)
    first = env.wait(lambda: env.get(DEP), what="the Deployment")
    env.wait(lambda: (env.record() or {}).get("version") == 1, what="version 1 recorded")

    env.patch(ME, {"spec": {"model": {"version": 2}, "traits": {"accuracy": 0.95}}})

    def rolled() -> dict[str, Any] | None:
        dep = env.get(DEP)
        env_vars = {e["name"]: e.get("value") for e in
                    dep["spec"]["template"]["spec"]["containers"][1]["env"]}
        return dep if env_vars["MULAMBDA_MODEL_VERSION"] == "2" else None

    second = env.wait(rolled, what="the Deployment rolled to version 2")
    assert second["metadata"]["uid"] == first["metadata"]["uid"]  # patched, not recreated
    rec = env.wait(lambda: (r := env.record()) and r["version"] == 2 and r,
                   what="version 2 recorded")
    assert rec["accuracy"] == 0.95
    env.wait(lambda: env.status().get("observedGeneration") == 2, what="observedGeneration 2")
    env.wait(lambda: env.events("UpdatedDeployment"), what="an UpdatedDeployment Event")
    # The real Deployment controller rolls the new template out: a new ReplicaSet
    # whose pod becomes Ready, and the operator reports the rollout complete.
    env.wait(lambda: env.condition("Progressing").get("reason") == "RolloutComplete"
             and env.status().get("replicaSummary") == "1/1", what="RolloutComplete")
    assert len(env.cluster.list("apps/v1", "replicasets", env.ns)) == 2


def test_nothing_changes_when_nothing_changed(env: Env, operator: OperatorRun) -> None:
    env.create()
    # Settled: the pod Ready (KWOK), and that reported everywhere the operator
    # reports it: conditions, the autoscaler's status (it reads the Deployment
    # from its watch cache, a moment later), and the Ready Event (posted in the
    # background after the status patch).
    env.wait(lambda: env.condition("Ready").get("status") == "True"
             and env.condition("Progressing").get("reason") == "RolloutComplete"
             and env.status().get("scaling", {}).get("readyReplicas") == 1
             and env.events("ModelServing"), what="Ready=True everywhere")
    settled = env.cluster.audit_mark()
    timer_rounds(operator, 4)
    # Four refresh rounds ran and none read anything from the API server: the
    # children come from the watch caches (was: each round GOT the Deployment).
    assert [(e.verb, e.resource) for e in env.requests(settled) if e.verb == "get"] == []
    # From start to end: one create per child, never a patch; after settling no
    # write at all, not even to status.
    assert [(e.resource, e.name, e.code) for e in env.writes("create")] == [
        ("deployments", "hp2", 201), ("services", "hp2", 201)]
    assert env.writes("patch") == []
    assert [(e.verb, e.resource, e.subresource) for e in env.requests(settled)
            if e.verb not in ("get", "list", "watch")] == []
    assert len(env.cluster.list(*DEP, env.ns)) == 1 and len(env.cluster.list(*SVC, env.ns)) == 1


async def queue_a_task(env: Env) -> str:
    store = MetadataStore.from_url(env.redis_url, prefix=PREFIX)
    try:
        task_id, _ = await TaskQueue(store).submit(
            new_task_id("shop/app"), client="shop/app", executor=env.id(), model="hp2",
            body='{"instances": [1]}', options=TaskOptions())
        return task_id
    finally:
        await store.close()


def test_deleting_executor_removes_metadata_and_children(
    env: Env, operator: OperatorRun
) -> None:
    env.create()
    env.wait(env.record, what="the store record")
    env.wait(lambda: env.get(DEP) and env.get(SVC), what="the Deployment and Service")
    queued = asyncio.run(queue_a_task(env))

    env.cluster.delete(*ME, env.ns, "hp2")

    env.wait(lambda: env.get(ME) is None, what="the executor gone")
    assert env.record() is None  # the finalizer removed it before the executor went
    # Its queued task is failed, not left pending until it expires, and its queue gone.
    raw = redis.Redis.from_url(env.redis_url, decode_responses=True)
    done = json.loads(raw.hget(f"{PREFIX}:task:{queued}", "outcome") or "{}")
    assert done.get("status") == "failed"
    assert f"executor {env.id()} was deleted" in done.get("reason", "")
    assert not raw.exists(f"{PREFIX}:tasks:queue:{env.id()}")
    # The garbage collector removes the children through their ownerReferences;
    # the operator deletes nothing. Not at once: the collector learns of a CRD's
    # kind at its next discovery sync (every 30 s), so an owner of a CRD installed
    # moments ago can take that long to be noticed gone.
    env.wait(lambda: env.get(DEP) is None and env.get(SVC) is None, timeout=GC_TIMEOUT,
             what="Deployment and Service garbage-collected")
    env.wait(lambda: not pods_of(env), what="the pods garbage-collected")
    assert env.writes("delete") == []


def test_server_rejects_min_above_max_replicas(env: Env, operator: OperatorRun) -> None:
    # The CRD's CEL rule: the API server refuses it, on create and on update; the
    # emulator accepted it and the operator answered InvalidSpec instead.
    with pytest.raises(ApiError) as rejected:
        env.create(scaling={"minReplicas": 4, "maxReplicas": 2})
    assert rejected.value.status == 422
    assert "scaling.minReplicas must not exceed scaling.maxReplicas" in rejected.value.message
    assert env.get(ME) is None

    env.create()
    env.wait(lambda: env.condition("Registered").get("status") == "True", what="Registered")
    with pytest.raises(ApiError) as rejected:
        env.patch(ME, {"spec": {"scaling": {"minReplicas": 4}}})
    assert rejected.value.status == 422
    assert "scaling.minReplicas must not exceed scaling.maxReplicas" in rejected.value.message
    assert env.get(ME)["spec"]["scaling"]["minReplicas"] == 1
    assert env.get(DEP)["spec"]["replicas"] == 1


LOTS = {"serving": {"resources": {"limits": {"cpu": "lots"}}}}


def test_invalid_spec_gives_false_condition_event_and_no_children(
    env: Env, operator: OperatorRun
) -> None:
    # Not caught by the schema (resources preserve unknown fields): the operator
    # reports it.
    env.create(**LOTS)

    ready = env.wait(lambda: env.condition("Ready").get("reason") == "InvalidSpec"
                     and env.condition("Ready"), what="Ready=False/InvalidSpec")
    assert ready["status"] == "False" and "not a Kubernetes quantity" in ready["message"]
    warning = env.wait(lambda: env.events("InvalidSpec"), what="an InvalidSpec Event")
    assert warning[0]["type"] == "Warning"
    assert "not a Kubernetes quantity" in warning[0]["message"]
    # One Event, not one per timer round: the count stays as it is over further
    # rounds. (The first timer tick may repeat it once, see STALE_TIMER_BODY.)
    timer_rounds(operator, 3)
    posted = len(env.events("InvalidSpec"))
    assert posted in (1, 2)
    timer_rounds(operator, 3)
    assert env.get(DEP) is None and env.get(SVC) is None
    assert env.writes("create") == []
    assert env.record() is None
    assert len(env.events("InvalidSpec")) == posted


def test_fixing_an_invalid_spec_converges(env: Env, operator: OperatorRun) -> None:
    # (minReplicas > maxReplicas, the emulator's case, cannot be stored any more.)
    env.create(**LOTS)
    env.wait(lambda: env.condition("Ready").get("reason") == "InvalidSpec",
             what="Ready=False/InvalidSpec")
    env.patch(ME, {"spec": {"serving": {"resources": {"limits": {"cpu": "2"}}},
                            "scaling": {"minReplicas": 2, "maxReplicas": 5}}})
    dep = env.wait(lambda: env.get(DEP), what="the Deployment after the fix")
    assert dep["spec"]["replicas"] == 2
    [serving] = [c for c in dep["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "serving"]
    assert serving["resources"]["limits"]["cpu"] == "2"
    env.wait(lambda: env.condition("Registered").get("status") == "True", what="Registered")
    env.wait(lambda: env.condition("Ready").get("status") == "True"
             and env.status().get("replicaSummary") == "2/2", what="Ready with 2/2")


def test_operator_restart_gives_no_duplicate_children_and_retries_conflicts(
    env: Env, operator: OperatorRun, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.create()
    # Restart mid-reconcile: as soon as the first child exists.
    env.wait(lambda: env.get(DEP), what="the Deployment")
    operator.restart()
    env.wait(lambda: env.condition("Registered").get("status") == "True", what="Registered")

    # A race, answered by the real server: the operator reads "no such Deployment",
    # then a create lands before its own (an earlier operator process's in-flight
    # request). The server answers the operator's create 409 AlreadyExists; the
    # operator converges on the object that is there, owned by the same executor.
    real_create = KubeApi.create
    raced: list[str] = []

    other = Cluster(cluster.cp)  # the other writer, with its own connection

    async def create_after_a_racing_one(self: KubeApi, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        if body["kind"] == "Deployment" and name == "third" and not raced:
            raced.append(name)
            await asyncio.to_thread(other.create, copy.deepcopy(body))
        return await real_create(self, body)

    monkeypatch.setattr(KubeApi, "create", create_after_a_racing_one)
    try:
        operator.restart()
        env.create("second")
        env.create("third")
        for name in ("hp2", "second", "third"):
            env.wait(lambda n=name: env.condition("Registered", n).get("status") == "True",
                     what=f"{name} Registered")
            env.wait(lambda n=name: env.condition("Ready", n).get("status") == "True",
                     what=f"{name} Ready")
    finally:
        other.close()
    assert raced == ["third"]

    creates = sorted((e.resource, e.name, e.code) for e in env.writes("create"))
    assert creates == [
        ("deployments", "hp2", 201), ("deployments", "second", 201),
        ("deployments", "third", 409),  # lost the race, and converged
        ("services", "hp2", 201), ("services", "second", 201), ("services", "third", 201),
    ]
    assert sorted(d["metadata"]["name"] for d in env.cluster.list(*DEP, env.ns)) == [
        "hp2", "second", "third"]
    third = env.get(DEP, "third")
    assert third["metadata"]["ownerReferences"][0]["uid"] == env.get(ME, "third")[
        "metadata"]["uid"]
    assert [s["metadata"]["name"] for s in env.cluster.list(*SVC, env.ns)] == [
        "hp2", "second", "third"]
    assert env.writes("delete") == []
    assert operator.starts == 3 and not operator.errors


def test_deleted_child_is_recreated_by_the_timer(env: Env, operator: OperatorRun) -> None:
    env.create()
    first = env.wait(lambda: env.get(SVC), what="the Service")
    env.cluster.delete(*SVC, env.ns, "hp2")
    again = env.wait(lambda: (s := env.get(SVC)) and s["metadata"]["uid"] !=
                     first["metadata"]["uid"] and s, what="the Service recreated")
    assert again["metadata"]["ownerReferences"][0]["name"] == "hp2"


def test_a_child_deleted_while_no_operator_ran_is_recreated_after_a_start(
    env: Env, operator: OperatorRun
) -> None:
    # After a start, kopf's resume handler leaves a concluded executor to the fleet
    # refresh, whose first tick re-checks every executor: drift from while no
    # operator ran is repaired all the same.
    env.create()
    env.wait(lambda: env.status().get("observedGeneration") == 1, what="handled")
    first = env.wait(lambda: env.get(SVC), what="the Service")
    operator.stop()
    env.cluster.delete(*SVC, env.ns, "hp2")
    operator.start()
    again = env.wait(lambda: (s := env.get(SVC)) and s["metadata"]["uid"] !=
                     first["metadata"]["uid"] and s, what="the Service recreated")
    assert again["metadata"]["ownerReferences"][0]["name"] == "hp2"
    assert not operator.errors


def test_foreign_object_with_the_childs_name_is_not_overwritten(
    env: Env, operator: OperatorRun
) -> None:
    foreign = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "hp2", "namespace": env.ns, "labels": {"owner": "team-b"}},
               "spec": {"ports": [{"port": 80}], "selector": {"app": "b"}}}
    env.cluster.create(foreign)
    env.create()
    ready = env.wait(lambda: env.condition("Ready").get("reason") == "NameConflict"
                     and env.condition("Ready"), what="Ready=False/NameConflict")
    assert "not owned by ModelExecutor hp2" in ready["message"]
    svc = env.get(SVC)
    assert svc["spec"]["selector"] == {"app": "b"}
    assert svc["metadata"]["labels"] == {"owner": "team-b"}
    assert "ownerReferences" not in svc["metadata"]
    assert [e.name for e in env.writes("patch") if e.resource == "services"] == []


def test_a_rollout_whose_candidate_cannot_be_made_still_publishes_the_spec(
    env: Env, operator: OperatorRun
) -> None:
    # Someone else's Service holds the name of the new version's (hp2-candidate): the
    # rollout cannot go on, the stable version serves on, and the record follows the
    # spec (it kept the traits of before: the conflict was raised before it was written).
    env.create(rollout={"strategy": "Canary", "weight": 50})
    env.wait(lambda: (env.record() or {}).get("version") == 1, what="version 1 registered")
    env.cluster.create({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "hp2-candidate", "namespace": env.ns},
                        "spec": {"ports": [{"port": 80}], "selector": {"app": "b"}}})
    env.patch(ME, {"spec": {"model": {"version": 2}, "traits": {"accuracy": 0.95}}})
    ready = env.wait(lambda: env.condition("Ready").get("reason") == "NameConflict"
                     and env.condition("Ready"), what="Ready=False/NameConflict")
    assert "hp2-candidate" in ready["message"]
    record = env.wait(lambda: (r := env.record()) and r.get("accuracy") == 0.95 and r,
                      what="the new traits in the store record")
    assert record["version"] == 1  # the stable version's, until a candidate has passed


def test_redis_down_during_create_is_retried_and_converges(
    env: Env, operator: OperatorRun, redis_server: RedisServer
) -> None:
    redis_server.stop()
    try:
        env.create()
        # Children do not wait for the store; the executor says what is wrong.
        env.wait(lambda: env.get(DEP), what="the Deployment")
        registered = env.wait(
            lambda: env.condition("Registered").get("reason") == "StoreUnavailable"
            and env.condition("Registered"), what="Registered=False/StoreUnavailable")
        assert registered["status"] == "False" and "retrying" in registered["message"]
        env.wait(lambda: env.events("StoreUnavailable"), what="a StoreUnavailable Event")
        time.sleep(1.5)  # several retries while the store is down: still there, no crash
        assert env.get(ME) is not None and operator.running
    finally:
        redis_server.start()

    env.wait(lambda: env.condition("Registered").get("status") == "True",
             what="Registered=True once Redis is back")
    assert env.record()["model"] == "half_plus_two"


def test_redis_down_during_delete_keeps_the_executor_until_metadata_is_removed(
    env: Env, operator: OperatorRun, redis_server: RedisServer
) -> None:
    env.create()
    env.wait(env.record, what="the store record")
    redis_server.stop()
    try:
        env.cluster.delete(*ME, env.ns, "hp2")
        time.sleep(1.5)
        held = env.get(ME)
        assert held is not None and FINALIZER in held["metadata"]["finalizers"]
        assert held["metadata"]["deletionTimestamp"]
    finally:
        redis_server.start()
    # redis-server restarted empty (no persistence): the delete completes all the same.
    env.wait(lambda: env.get(ME) is None, what="the executor gone once Redis is back")
    env.wait(lambda: env.get(DEP) is None, timeout=GC_TIMEOUT,
             what="the Deployment garbage-collected")


def rule_triples(rules: list[dict[str, list[str]]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def handle_a_backlog(env: Env, run_operator: Callable[..., OperatorRun], backlog: int,
                     timeout: float) -> None:
    """Create ``backlog`` scale-to-zero executors, then start the operator and wait until
    it handled them all."""
    for i in range(backlog):
        env.create(f"mx-{i}", scaling={"minReplicas": 0, "maxReplicas": 1})
    start(run_operator, env)
    env.wait(lambda: sum(1 for i in range(backlog)
                         if env.status(f"mx-{i}").get("observedGeneration") == 1) == backlog,
             what=f"all {backlog} executors handled", timeout=timeout)


def test_a_backlog_shares_a_bounded_set_of_api_connections(
    env: Env, run_operator: Callable[..., OperatorRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    # kopf patches every object of a backlog at once; on its own session each patch
    # opened a TLS connection (0.3 MiB each: peak RSS grew with the backlog). Through
    # the operator's login they queue for a few connections, and the backlog completes.
    monkeypatch.setattr(session, "REQUESTS_IN_FLIGHT", 2)
    opened: list[int] = []
    real_session = aiohttp.ClientSession

    def counting_session(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()

        async def connection_opened(*_: Any) -> None:
            opened.append(1)

        trace.on_connection_create_end.append(connection_opened)
        return real_session(*args, trace_configs=[trace], **kwargs)

    monkeypatch.setattr(session.aiohttp, "ClientSession", counting_session)
    backlog = 40
    handle_a_backlog(env, run_operator, backlog, timeout=90)
    assert 0 < len(opened) <= session.connection_limit(()) == 2 + session.WATCHES_PER_NAMESPACE
    # Each executor's children were made once, by its create handler: the fleet refresh
    # leaves executors kopf has yet to conclude alone (no GET of a missing child, no
    # Secret created twice).
    calls = [(e.verb, e.resource, e.code) for e in env.requests()
             if e.namespace == env.ns and e.resource in ("deployments", "services", "secrets")]
    made = [c for c in calls if c[0] == "create"]
    assert sorted(set(made)) == [("create", r, 201) for r in ("deployments", "secrets",
                                                                 "services")]
    assert len(made) == 3 * backlog
    assert not [c for c in calls if c[2] in (404, 409)]


def test_a_backlog_larger_than_the_worker_pool_is_handled_a_pool_at_a_time(
    env: Env, run_operator: Callable[..., OperatorRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unbounded, kopf started a worker for every listed object at once, each holding
    # its body until done (720 MiB for a backlog of 5,000). Capped, a worker that
    # patched waits for its patched version while the watcher may wait for a free
    # slot: the backlog must still complete, never more than the cap in handlers.
    monkeypatch.setattr(operator_main, "WORKER_LIMIT", 4)
    active, most = 0, 0
    real_reconcile = handling.reconcile

    async def counting_reconcile(*args: Any, **kwargs: Any) -> None:
        nonlocal active, most
        if not kwargs.get("spec_changed"):  # the fleet refresh, not a kopf handler
            return await real_reconcile(*args, **kwargs)
        active += 1
        most = max(most, active)
        try:
            return await real_reconcile(*args, **kwargs)
        finally:
            active -= 1

    monkeypatch.setattr(handling, "reconcile", counting_reconcile)
    handle_a_backlog(env, run_operator, 24, timeout=120)
    assert 1 <= most <= 4


def test_operator_uses_exactly_the_rbac_rules_it_declares(
    env: Env, operator: OperatorRun
) -> None:
    # Everything the operator does: executors created, changed, deleted;
    # a Client whose workload is created, then dropped, then the Client deleted.
    env.create()
    env.wait(lambda: env.condition("Registered").get("status") == "True", what="Registered")
    env.patch(ME, {"spec": {"model": {"version": 2}}})
    env.wait(lambda: env.status().get("observedGeneration") == 2, what="observedGeneration 2")
    # Drift on a child is corrected by a patch.
    env.patch(SVC, {"spec": {"selector": {"app": "someone-else"}}})
    env.wait(lambda: env.get(SVC)["spec"]["selector"].get("app") is None,
             what="the Service selector restored")
    template = {"spec": {"containers": [RESTRICTED_APP]}}
    env.cluster.create({"apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
                        "metadata": {"name": "shop", "namespace": env.ns},
                        "spec": {"criteria": {"type": "regression"},
                                 "workload": {"template": template}}})
    env.wait(lambda: env.get(DEP, "shop-workload") and env.get(SVC, "shop-workload"),
             what="the Client's workload")
    env.patch(CL, [{"op": "remove", "path": "/spec/workload"}], name="shop", patch_type="json")
    env.wait(lambda: env.get(DEP, "shop-workload") is None
             and env.get(SVC, "shop-workload") is None, what="the workload removed")
    env.cluster.delete(*CL, env.ns, "shop")
    env.cluster.delete(*ME, env.ns, "hp2")
    env.wait(lambda: env.get(ME) is None and env.get(CL, "shop") is None,
             what="executor and Client gone")

    requests = [e for e in env.requests() if e.resource]  # not discovery (/api, /apis)
    # The server allowed every request: nothing the chart's role does not grant.
    assert [e for e in requests if e.code == 403] == []
    used = {(e.group, f"{e.resource}/{e.subresource}" if e.subresource else e.resource, e.verb)
            for e in requests}
    declared = rule_triples(REQUIRED_RULES)
    assert sorted(used - declared) == []  # nothing undeclared
    assert sorted(declared - used) == []  # nothing granted that is never used


@contextlib.contextmanager
def role_without(
    cluster: Cluster, identity: Identity, ns: str, resource: str, verb: str
) -> Iterator[None]:
    """The chart's operator ClusterRole without ``verb`` on ``resource`` (core group) while
    the block runs; the chart's rules again after it."""
    [name] = [r for r in identity.cluster_roles
              if any(resource in rule["resources"]
                     for rule in cluster.get(RBAC, "clusterroles", None, r)["rules"])]
    original = cluster.get(RBAC, "clusterroles", None, name)["rules"]
    reduced = copy.deepcopy(original)
    for rule in reduced:
        if resource in rule["resources"]:
            rule["verbs"].remove(verb)

    def allowed() -> bool:
        review = cluster.request(
            "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            body={"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                  "spec": {"user": identity.user,
                           "groups": ["system:serviceaccounts", "system:authenticated",
                                      f"system:serviceaccounts:{identity.namespace}"],
                           "resourceAttributes": {"namespace": ns, "verb": verb,
                                                  "resource": resource}}})
        return bool((review or {}).get("status", {}).get("allowed"))

    cluster.patch(RBAC, "clusterroles", None, name, {"rules": reduced})
    try:
        cluster.wait_for(lambda: not allowed(), what=f"the authorizer to deny {verb} {resource}")
        yield
    finally:
        cluster.patch(RBAC, "clusterroles", None, name, {"rules": original})
        cluster.wait_for(allowed, what=f"the authorizer to allow {verb} {resource} again")


def test_a_missing_rbac_verb_fails_visibly_and_recovers_once_granted(
    env: Env, run_operator: Callable[..., OperatorRun], operator_identity: Identity,
) -> None:
    with role_without(env.cluster, operator_identity, env.ns, "services", "create"):
        operator = start(run_operator, env, allow_errors=True)
        env.create()
        # The server refuses the Service: a 403 in the audit log ...
        denied = env.wait(lambda: [e for e in env.writes("create") if e.code == 403],
                          what="the operator's create of the Service refused")
        # (a refused create names no object in the audit log: the body is never read)
        assert {(e.resource, e.namespace) for e in denied} == {("services", env.ns)}

        # ... in the executor's status, where a user looks first: Ready and Progressing
        # False/Forbidden with the server's sentence and what to do ...
        ready = env.wait(lambda: env.condition("Ready").get("reason") == "Forbidden"
                         and env.condition("Ready"), what="Ready=False/Forbidden")
        assert ready["status"] == "False"
        assert 'cannot create resource "services"' in ready["message"], ready
        assert "operator/rbac.py" in ready["message"]
        assert env.condition("Progressing").get("reason") == "Forbidden"
        # ... as a Warning Event (`kubectl describe`), once, not per retry ...
        [event] = env.wait(lambda: [e for e in env.cluster.events(env.ns, "Forbidden")],
                           what="a Forbidden Event")
        assert event["type"] == "Warning"
        # ... and in the operator's log, with a retry (an admin can grant it).
        env.wait(lambda: [m for m in operator.messages(logging.WARNING)
                          if "refused the operator" in m and "Retrying" in m],
                 what="the 403 and the retry in the operator's log")
        assert env.get(SVC) is None and env.record() is None
        assert len(env.cluster.events(env.ns, "Forbidden")) == 1
    # The chart's role again: kopf retries the handler, the Service comes, it registers.
    env.wait(lambda: env.get(SVC), what="the Service once create is granted")
    env.wait(lambda: env.condition("Registered").get("status") == "True", what="Registered")


async def test_store_record_round_trip_is_what_selection_reads(
    env: Env, operator: OperatorRun
) -> None:
    from mulambda.store.metadata import MetadataStore

    await asyncio.to_thread(env.create)
    store = MetadataStore.from_url(env.redis_url, PREFIX)
    try:
        deadline = time.monotonic() + 30
        while env.id() not in (snap := await store.snapshot()).executors:
            assert time.monotonic() < deadline, "no executor record in the store"
            await asyncio.sleep(0.1)
        assert snap.executors[env.id()].grpc == f"{env.host()}:8500"
        assert snap.executors[env.id()].rest == f"http://{env.host()}:8501"
    finally:
        await store.close()
