"""Rollouts end to end on the real control plane, with steady traffic through the SDK and the
gateway: a canary promoted, a shadow compared and promoted, a new version that answers with
errors and one that fails to load rolled back, with no failed request caused by the rollout.

Every part is real except TF Serving (the REST test double) and what stands in for
the kubelet (:class:`Kubelet`): for each pod of the namespace that KWOK runs, the
test resolves the companion container's environment from the pod as the kubelet
would and runs the real ``mulambda companion`` with it, next to a TF Serving double
listening on a loopback address of its own at TF Serving's port 8501 (the pod IP a
router addresses); when the pod is deleted, the companion gets SIGTERM. The operator
(kopf in this process, as the chart's ServiceAccount), redis-server and SeaweedFS
are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from companion.test_golden_path import eventually, resolve_env
from integration.test_crd_validation import (
    CLIENT,
    EXECUTOR,
    with_,
)
from integration.test_crd_validation import (
    test_the_api_server_refuses_it_with_the_reason as refused_with_the_reason,
)

from mulambda.operator.main import register_all
from mulambda.policy.rollout import candidate_id
from mulambda.sdk import MulambdaClient
from mulambda.selector.app import create_app, selector_server_options
from mulambda.settings import Settings
from mulambda.storage.s3 import ModelStorage
from mulambda.store.metadata import MetadataStore
from mulambda.store.outcomes import read_outcomes
from mulambda.store.records import ReplicaRecord
from mulambda.tools.push import push_version

from support.cluster import Cluster
from support.operator_run import OperatorRun
from support.procs import free_port
from support.seaweedfs import ADMIN, SeaweedFS
from support.tfserving_double import TFServingDouble

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
HALF_PLUS_TWO = REPO / "examples" / "models" / "half_plus_two" / "1"
ME = ("mulambda.io/v1alpha1", "modelexecutors")
DEP = ("apps/v1", "deployments")
NAME, MODEL, PREFIX = "hp2", "half_plus_two", "rollout"
REST_PORT = 8501  # the port a router addresses on a replica's pod IP (build.py)


@pytest.fixture
def bucket(seaweedfs: SeaweedFS) -> str:
    """A bucket with half_plus_two versions 1 and 2 (3 is never pushed)."""
    storage = ModelStorage.from_env(seaweedfs.env())
    name = f"models-{uuid.uuid4().hex[:12]}"
    storage.make_bucket(name)
    for version in (1, 2):
        push_version(storage, HALF_PLUS_TWO, name, MODEL, version)
    storage.close()
    return name


@dataclass
class Pod:
    proc: subprocess.Popen[bytes]
    serving: TFServingDouble


@dataclass
class Kubelet:
    """Runs the real companion for every Running pod in ``namespace`` (see the module
    docstring); ``failing`` versions' TF Serving answers predictions with 500."""

    cluster: Cluster
    namespace: str
    root: Path
    failing: set[str] = field(default_factory=set)
    pods: dict[str, Pod] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Kubelet:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        # All at once: one after another, a loaded machine's companions (each allowed
        # 15 s to exit) once held this teardown past the test timeout.
        await asyncio.gather(*(self._stop(name) for name in list(self.pods)))

    async def _run(self) -> None:
        while True:
            pods = await asyncio.to_thread(self.cluster.list, "v1", "pods", self.namespace)
            live = {}
            for pod in pods:
                status = pod.get("status") or {}
                if (status.get("phase") == "Running" and status.get("podIP")
                        and not pod["metadata"].get("deletionTimestamp")):
                    live[pod["metadata"]["name"]] = pod
            for name in set(self.pods) - set(live):
                await self._stop(name)
            for name, pod in live.items():
                if name not in self.pods:
                    await self._start(pod)
            await asyncio.sleep(0.3)

    async def _start(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        [container] = [c for c in pod["spec"]["containers"] if c["name"] == "companion"]
        env = await asyncio.to_thread(resolve_env, container, pod, self.cluster,
                                      self.root / "secrets")
        ip = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{random.randrange(2, 255)}"
        models = self.root / name
        models.mkdir(parents=True)
        serving = TFServingDouble(MODEL, models_dir=models, load_delay=0.1, host=ip,
                                  port=REST_PORT,
                                  status=500 if env["MULAMBDA_MODEL_VERSION"] in self.failing
                                  else 200)
        await serving.start()
        proc = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "mulambda", "companion"],
            env={**os.environ, **env, "MULAMBDA_POD_IP": ip, "MULAMBDA_MODELS_DIR": str(models),
                 "MULAMBDA_TFSERVING_URL": serving.url,
                 "MULAMBDA_HTTP_PORT": str(free_port())},
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pods[name] = Pod(proc, serving)

    async def _stop(self, name: str) -> None:
        pod = self.pods.pop(name)
        pod.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(pod.proc.wait, 15)
        except subprocess.TimeoutExpired:
            pod.proc.kill()
        await pod.serving.stop()


@dataclass
class Traffic:
    """Steady predictions through the SDK and the gateway; every failure is kept."""

    sdk: MulambdaClient
    gateway: httpx.AsyncClient
    client: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    # (the rollout strategy routers followed, the version that answered) -> answers
    answers: dict[tuple[str | None, int | None], int] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._sdk()), asyncio.create_task(self._gateway())]
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sdk(self) -> None:
        for i in itertools.count():
            try:
                p = await self.sdk.predict([1.0, 2.0], key=f"user-{i % 50}")
                assert p.predictions == [2.5, 3.0], p.predictions
                self.ok += 1
                record = p.candidate.record
                seen = ((record.rollout or {}).get("strategy"), record.version)
                self.answers[seen] = self.answers.get(seen, 0) + 1
            except Exception as exc:  # every failure counts: the assertion is on none
                self.failures.append(f"sdk: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.02)

    async def _gateway(self) -> None:
        ns, name = self.client.split("/")
        while True:
            try:
                resp = await self.gateway.post(f"/v1/predict/{ns}/{name}",
                                               json={"instances": [5.0]})
                if resp.status_code != 200 or resp.json() != {"predictions": [4.5]}:
                    self.failures.append(f"gateway: {resp.status_code} {resp.text[:200]}")
                else:
                    self.ok += 1
            except httpx.HTTPError as exc:
                self.failures.append(f"gateway: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def world(cluster: Cluster, ns: str, run_operator: Callable[..., OperatorRun],
                seaweedfs: SeaweedFS, bucket: str, redis_url: str,
                tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Operator, S3 Secret, a registered Client, the gateway and an SDK; yields them."""
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, s3_endpoint=seaweedfs.endpoint,
                        companion_image="mulambda:test", reconcile_interval_seconds=0.5,
                        probe_interval_seconds=1, autoscale_interval_seconds=0.5,
                        heartbeat_ttl_seconds=10)
    run_operator(lambda registry: register_all(registry, settings))
    await asyncio.to_thread(cluster.create, {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": settings.s3_secret, "namespace": ns},
        "stringData": {"accessKey": ADMIN.access_key, "secretKey": ADMIN.secret_key}})
    await asyncio.to_thread(cluster.create, {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
        "metadata": {"name": "shop", "namespace": ns},
        "spec": {"criteria": {"type": "regression"}}})
    store = MetadataStore.from_url(redis_url, PREFIX)
    runner = web.AppRunner(create_app(store, cache_ttl=0.2), **selector_server_options())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with (httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as gateway,
                MulambdaClient(store, f"{ns}/shop", cache_ttl=0.2) as sdk,
                Kubelet(cluster, ns, tmp_path / "pods") as kubelet):
        yield {"store": store, "gateway": gateway, "sdk": sdk, "kubelet": kubelet,
               "client": f"{ns}/shop", "bucket": bucket}
    await runner.cleanup()
    await store.close()


def executor(ns: str, bucket: str, version: int, strategy: str, name: str = NAME,
             **rollout: Any) -> dict:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"model": {"name": MODEL, "storageUri": f"s3://{bucket}/{MODEL}",
                           "version": version},
                 "traits": {"type": "regression", "input": "tensor/float32",
                            "output": "tensor/float32", "serviceTimeMs": 2},
                 "rollout": {"strategy": strategy, "drainSeconds": 2, **rollout}},
    }


def rollout_status(cluster: Cluster, ns: str) -> dict[str, Any]:
    return ((cluster.get(*ME, ns, NAME) or {}).get("status") or {}).get("rollout") or {}


def events(cluster: Cluster, ns: str) -> list[str]:
    return [e["reason"] for e in sorted(cluster.events(ns),
                                        key=lambda e: e.get("lastTimestamp") or "")
            if e["involvedObject"]["name"] == NAME and e["reason"].startswith("Rollout")]


async def serving(world: dict[str, Any], executor_id: str, version: int) -> None:
    store: MetadataStore = world["store"]

    async def available() -> bool:
        beats = await store.list_replicas(executor_id)
        return any(r.state == "Available" and r.version == version for r in beats)

    await eventually(available, within=60, what=f"{executor_id} serving version {version}")


async def start_stable(cluster: Cluster, ns: str, world: dict[str, Any], strategy: str,
                       **rollout: Any) -> Traffic:
    await asyncio.to_thread(cluster.create, executor(ns, world["bucket"], 1, strategy,
                                                     **rollout))
    await serving(world, f"{ns}/{NAME}", 1)
    await eventually(lambda: rollout_status(cluster, ns).get("phase") == "Stable",
                     what="phase Stable")
    traffic = Traffic(world["sdk"], world["gateway"], world["client"]).start()
    await eventually(lambda: traffic.ok > 20, within=30, what="traffic flowing",
                     explain=lambda: "\n".join(traffic.failures[-5:]))
    return traffic


async def change_version(cluster: Cluster, ns: str, version: int) -> None:
    await asyncio.to_thread(cluster.patch, *ME, ns, NAME,
                            {"spec": {"model": {"version": version}}})


def stable_version(cluster: Cluster, ns: str) -> str:
    deployment = cluster.get(*DEP, ns, NAME) or {}
    [companion] = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                   if c["name"] == "companion"]
    return next(e["value"] for e in companion["env"] if e["name"] == "MULAMBDA_MODEL_VERSION")


ANALYSIS = {"minRequests": 30, "durationSeconds": 3, "maxErrorRateIncrease": 0.05,
            "maxP95Ratio": 20, "progressDeadlineSeconds": 90}


async def test_canary_is_promoted_under_steady_traffic_without_a_failed_request(
    cluster: Cluster, ns: str, world: dict[str, Any],
) -> None:
    traffic = await start_stable(cluster, ns, world, "Canary", weight=50, analysis=ANALYSIS)
    try:
        await change_version(cluster, ns, 2)
        progressing = await eventually(
            lambda: rollout_status(cluster, ns).get("phase") == "Progressing"
            and rollout_status(cluster, ns), what="phase Progressing")
        assert (progressing["stableVersion"], progressing["candidateVersion"]) == (1, 2)
        await eventually(lambda: cluster.get(*DEP, ns, f"{NAME}-candidate"),
                         what="the candidate Deployment")
        assert stable_version(cluster, ns) == "1"  # the old version keeps serving beside it
        await serving(world, candidate_id(f"{ns}/{NAME}"), 2)
        await eventually(lambda: traffic.answers.get(("Canary", 2), 0) > 5, within=30,
                         what="the canary's share of the SDK's traffic",
                         explain=lambda: f"{traffic.answers} {traffic.failures[-3:]}")
        await eventually(lambda: rollout_status(cluster, ns).get("phase") == "Promoted",
                         within=120, what="phase Promoted",
                         explain=lambda: str(rollout_status(cluster, ns)))
        await eventually(lambda: cluster.get(*DEP, ns, f"{NAME}-candidate") is None,
                         what="the candidate Deployment removed")
        assert stable_version(cluster, ns) == "2"
        await asyncio.sleep(1)  # traffic on the promoted version alone
    finally:
        await traffic.stop()
    status = rollout_status(cluster, ns)
    arms = status["arms"]
    assert arms["candidate"]["requests"] >= ANALYSIS["minRequests"]
    assert arms["stable"]["requests"] > 0 and {"p50Ms", "p95Ms"} <= set(arms["candidate"])
    assert status["reason"] == "AnalysisPassed"
    assert traffic.failures == [], traffic.failures[:5]
    record = (await world["store"].snapshot()).executors[f"{ns}/{NAME}"]
    assert record.rollout is None and record.version == 2
    assert events(cluster, ns)[:1] == ["RolloutStarted"]
    assert {"RolloutPromoting", "RolloutPromoted"} <= set(events(cluster, ns))


async def test_candidate_answering_errors_is_rolled_back_and_no_caller_sees_one(
    cluster: Cluster, ns: str, world: dict[str, Any],
) -> None:
    world["kubelet"].failing.add("2")
    traffic = await start_stable(cluster, ns, world, "Canary", weight=50, analysis=ANALYSIS)
    try:
        await change_version(cluster, ns, 2)
        await eventually(lambda: rollout_status(cluster, ns).get("phase") == "RolledBack",
                         within=120, what="phase RolledBack",
                         explain=lambda: str(rollout_status(cluster, ns)))
        await eventually(lambda: cluster.get(*DEP, ns, f"{NAME}-candidate") is None,
                         what="the candidate Deployment removed")
    finally:
        await traffic.stop()
    status = rollout_status(cluster, ns)
    assert status["reason"] == "ErrorRateExceeded", status
    assert status["arms"]["candidate"]["errorRate"] > 0.05
    assert stable_version(cluster, ns) == "1"
    assert traffic.failures == [], traffic.failures[:5]
    assert {"RolloutRollingBack", "RolloutRolledBack"} <= set(events(cluster, ns))


async def test_candidate_that_fails_to_load_is_rolled_back(
    cluster: Cluster, ns: str, world: dict[str, Any],
) -> None:
    traffic = await start_stable(cluster, ns, world, "Canary", weight=50, analysis=ANALYSIS)
    try:
        await change_version(cluster, ns, 3)  # never pushed: the companion reports Failed
        await eventually(lambda: rollout_status(cluster, ns).get("phase") == "RolledBack",
                         within=120, what="phase RolledBack",
                         explain=lambda: str(rollout_status(cluster, ns)))
    finally:
        await traffic.stop()
    status = rollout_status(cluster, ns)
    assert status["reason"] == "CandidateFailed" and "VersionNotFound" in status["message"]
    assert stable_version(cluster, ns) == "1"
    assert traffic.failures == [], traffic.failures[:5]
    await eventually(lambda: cluster.get(*DEP, ns, f"{NAME}-candidate") is None,
                     what="the candidate Deployment removed")


async def test_shadow_gets_copies_compared_never_answers_and_is_promoted(
    cluster: Cluster, ns: str, world: dict[str, Any],
) -> None:
    traffic = await start_stable(cluster, ns, world, "Shadow", analysis=ANALYSIS)
    try:
        await change_version(cluster, ns, 2)
        await serving(world, candidate_id(f"{ns}/{NAME}"), 2)
        await eventually(lambda: rollout_status(cluster, ns).get("phase") == "Promoting",
                         within=120, what="phase Promoting",
                         explain=lambda: str(rollout_status(cluster, ns)))
        await eventually(lambda: rollout_status(cluster, ns).get("phase") == "Promoted",
                         within=120, what="phase Promoted")
    finally:
        await traffic.stop()
    # While routers followed the Shadow route, every caller was answered by version 1.
    assert traffic.answers.get(("Shadow", 1), 0) > 0, traffic.answers
    assert ("Shadow", 2) not in traffic.answers, traffic.answers
    arms = rollout_status(cluster, ns)["arms"]
    assert arms["candidate"]["compared"] >= ANALYSIS["minRequests"]
    assert arms["candidate"]["disagreed"] == 0
    assert traffic.failures == [], traffic.failures[:5]
    assert stable_version(cluster, ns) == "2"


async def test_ab_experiment_keeps_users_on_their_arm_through_sdk_and_gateway(
    cluster: Cluster, ns: str, world: dict[str, Any],
) -> None:
    for name in ("hp2-a", "hp2-b"):
        await asyncio.to_thread(cluster.create, executor(ns, world["bucket"], 1, "Immediate",
                                                         name=name))
    for name in ("hp2-a", "hp2-b"):
        await serving(world, f"{ns}/{name}", 1)
    await asyncio.to_thread(cluster.patch, "mulambda.io/v1alpha1", "clients", ns, "shop", {
        "spec": {"experiment": {"arms": [{"executor": "hp2-a", "weight": 50},
                                         {"executor": "hp2-b", "weight": 50},
                                         {"executor": "hp2-gone", "weight": 50}],
                                "stickyHeader": "X-User"}}})
    store: MetadataStore = world["store"]

    async def published() -> dict | None:
        record = (await store.snapshot(world["client"])).client_record
        return record.experiment if record is not None else None

    experiment = await eventually(published, what="the experiment in the Client's record")
    sdk: MulambdaClient = world["sdk"]
    gateway: httpx.AsyncClient = world["gateway"]
    arms: dict[str, set[str]] = {}
    for _ in range(3):
        for user in range(30):
            answer = await sdk.predict([1.0], key=f"u{user}")
            assert answer.predictions == [2.5]
            arms.setdefault(f"u{user}", set()).add(answer.executor)
            resp = await gateway.post(f"/v1/predict/{ns}/shop", json={"instances": [1.0]},
                                      headers={"X-User": f"u{user}"})
            assert resp.status_code == 200, resp.text
            # The SDK hashes the key as the gateway hashes the header: the same arm.
            arms[f"u{user}"].add(resp.headers["X-Mulambda-Executor"])
    assert all(len(a) == 1 for a in arms.values()), arms
    assert {next(iter(a)) for a in arms.values()} == {f"{ns}/hp2-a", f"{ns}/hp2-b"}
    subject, run = f"experiment/{experiment['id']}", experiment["id"]

    async def counted() -> dict | None:
        outcomes = await read_outcomes(store, subject, run)
        return outcomes if sum(o.requests for o in outcomes.values()) == 180 else None

    outcomes = await eventually(counted, what="180 requests counted per arm")
    assert all(o.errors == 0 and o.p95 is not None for o in outcomes.values())

    # The Client's status shows the arms: who can get traffic, and what they got.
    def shown() -> list[dict[str, Any]] | None:
        status = (cluster.get("mulambda.io/v1alpha1", "clients", ns, "shop") or {}).get(
            "status") or {}
        arms = (status.get("experiment") or {}).get("arms") or []
        return arms if sum(a.get("requests", 0) for a in arms) == 180 else None

    a, b, gone = await eventually(shown, what="status.experiment with the outcomes")
    assert a["eligible"] and b["eligible"] and a["requests"] + b["requests"] == 180
    assert not gone["eligible"] and gone["reason"] and gone["requests"] == 0


async def test_a_forged_candidate_heartbeat_does_not_hold_a_dead_canary(
    cluster: Cluster, ns: str, run_operator: Callable[..., OperatorRun], redis_url: str,
) -> None:
    # The candidate's pods can never be scheduled; a holder of the companions' store
    # credential writes an Available heartbeat for one of them, unsigned (it has no key).
    # Counted, it kept the rollout Analysing past its progress deadline, forever.
    settings = Settings(redis_url=redis_url, key_prefix=PREFIX, companion_image="mulambda:test",
                        reconcile_interval_seconds=0.3, probe_interval_seconds=0.3,
                        autoscale_interval_seconds=0.25, heartbeat_ttl_seconds=10)
    run_operator(lambda registry: register_all(registry, settings))
    body = {"apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
            "metadata": {"name": NAME, "namespace": ns},
            "spec": {"model": {"name": MODEL, "storageUri": "s3://models/half_plus_two",
                               "version": 1},
                     "traits": {"type": "regression", "input": "vector", "output": "vector"},
                     "nodeSelector": {"mulambda.io/test-node": "none"},
                     "rollout": {"strategy": "Canary", "weight": 50,
                                 "analysis": {"progressDeadlineSeconds": 4,
                                              "minRequests": 10}}}}
    await asyncio.to_thread(cluster.create, body)
    await eventually(lambda: rollout_status(cluster, ns).get("stableVersion") == 1,
                     what="version 1 stable")
    await change_version(cluster, ns, 2)
    store = MetadataStore.from_url(redis_url, PREFIX)
    forged = candidate_id(f"{ns}/{NAME}")
    try:
        async def forge() -> bool:
            await store.put_replica(ReplicaRecord(
                executor=forged, pod=f"{NAME}-candidate-forged", ip="10.9.9.9",
                state="Available", version=2, expires_at=time.time() + 60), ttl=60)
            status = await asyncio.to_thread(rollout_status, cluster, ns)
            return status.get("phase") == "RolledBack"

        await eventually(forge, within=60, what="phase RolledBack",
                         explain=lambda: str(rollout_status(cluster, ns)))
    finally:
        await store.close()
    assert rollout_status(cluster, ns)["reason"] == "ProgressDeadlineExceeded"


@pytest.mark.parametrize(("body", "says"), [
    pytest.param(with_(EXECUTOR, "spec.rollout", {"strategy": "BlueGreen"}),
                 "spec.rollout.strategy: Unsupported value", id="strategy"),
    pytest.param(with_(EXECUTOR, "spec.rollout", {"weight": 150}),
                 "spec.rollout.weight: Invalid value", id="weight-over-100"),
    pytest.param(with_(EXECUTOR, "spec.rollout", {"steps": [0, 50]}),
                 "spec.rollout.steps[0]: Invalid value", id="step-zero"),
    pytest.param(with_(EXECUTOR, "spec.rollout", {"analysis": {"maxP95Ratio": 0.5}}),
                 "spec.rollout.analysis.maxP95Ratio: Invalid value", id="p95-ratio-below-1"),
    pytest.param(with_(CLIENT, "spec.experiment", {"arms": [{"executor": "a"}]}),
                 "spec.experiment.arms in body should have at least 2 items", id="one-arm"),
    pytest.param(with_(CLIENT, "spec.experiment", {
        "arms": [{"executor": "a"}, {"executor": "b"}], "stickyHeader": "X-User",
        "stickyField": "user"}), "set stickyHeader or stickyField, not both", id="two-keys"),
])
def test_the_api_server_refuses_bad_rollouts_and_experiments(
    cluster: Cluster, ns: str, body: dict[str, Any], says: str,
) -> None:
    refused_with_the_reason(cluster, ns, body, says)
