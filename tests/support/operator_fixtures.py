"""Fixtures for operator tests on the real control plane (imported by tests/conftest.py).

``cluster``: admin access (session). ``operator_identity``: the chart's
ServiceAccount, RBAC and a token (session). ``ns``: a fresh namespace per
test, labelled ``pod-security.kubernetes.io/enforce=restricted`` like a
production namespace should be. ``run_operator``: starts kopf in-process as
the chart's ServiceAccount, cluster-wide; stopped at teardown, where a crash
or a logged exception fails the test.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mulambda.store.heartbeats import Signer, executor_seed
from mulambda.store.records import ReplicaRecord

from support import identity
from support.cluster import ApiError, Cluster
from support.controlplane import ControlPlane
from support.identity import Identity
from support.operator_run import OperatorRun, Target

MULAMBDA_KINDS = (("mulambda.io/v1alpha1", "modelexecutors"), ("mulambda.io/v1alpha1", "clients"))
CRDS = Path(__file__).resolve().parents[2] / "crds"
# The operator secret of every test operator (what executors' heartbeat keys derive from).
HEARTBEAT_SECRET = "test-heartbeat-secret-0123456789abcdef"


@pytest.fixture(scope="session")
def cluster(controlplane: ControlPlane) -> Iterator[Cluster]:
    """Admin access to the session's control plane, with the project's CRDs installed."""
    controlplane.kubectl("apply", "--server-side", "-k", str(CRDS))
    api = Cluster(controlplane)
    for name in ("modelexecutors.mulambda.io", "clients.mulambda.io"):
        api.wait_for(lambda n=name: established(api, n), what=f"CRD {name} Established")
    for api_version, plural in MULAMBDA_KINDS:
        # Established comes before the server's watch cache: lists answer 429
        # "storage is (re)initializing" for a moment after.
        api.wait_for(lambda a=api_version, p=plural: servable(api, a, p),
                     what=f"{plural} servable")
    yield api
    api.close()


def servable(cluster: Cluster, api_version: str, plural: str) -> bool:
    try:
        cluster.list(api_version, plural)
    except ApiError as exc:
        if exc.status == 429:
            return False
        raise
    return True


def established(cluster: Cluster, name: str) -> bool:
    crd = cluster.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, name)
    return any(
        c["type"] == "Established" and c["status"] == "True"
        for c in ((crd or {}).get("status") or {}).get("conditions") or []
    )


@pytest.fixture(scope="session")
def operator_identity(
    controlplane: ControlPlane, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Identity:
    return identity.operator_identity(controlplane, cluster, tmp_path_factory.mktemp("identity"))


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    """A fresh restricted namespace; its mulambda objects lose their finalizers at teardown
    (the operator is stopped by then) so the namespace can go."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            },
        }
    )
    cluster.wait_for(
        lambda: cluster.get("v1", "serviceaccounts", name, "default"),
        what="the namespace's default ServiceAccount",
    )
    yield name
    release_namespace(cluster, name)


def release_namespace(cluster: Cluster, namespace: str) -> None:
    """Delete a test namespace without waiting for an operator that no longer runs.

    Its ModelExecutors and Clients lose their finalizers and are deleted first,
    and gone before this returns: the next test's operator (cluster-wide, like
    the chart's default) must never meet a leftover in a terminating namespace.
    """
    for api_version, plural in MULAMBDA_KINDS:
        with contextlib.suppress(ApiError):
            for obj in cluster.list(api_version, plural, namespace):
                name = obj["metadata"]["name"]
                with contextlib.suppress(ApiError):
                    cluster.patch(api_version, plural, namespace, name,
                                  {"metadata": {"finalizers": None}})
                cluster.delete(api_version, plural, namespace, name)
        cluster.wait_for(lambda a=api_version, p=plural: not cluster.list(a, p, namespace),
                         what=f"{plural} of {namespace} gone")
    cluster.delete("v1", "namespaces", None, namespace)


@pytest.fixture
def run_operator(
    cluster: Cluster,
    operator_identity: Identity,
    ns: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., OperatorRun]]:
    """Start a kopf operator as the chart's ServiceAccount: ``run_operator(target, **options)``.

    It watches the whole cluster, as the chart's default does (``namespaces=``
    for a namespaced run: kopf then lists namespaces, see operator/rbac.py).
    Returns the started :class:`OperatorRun` (``.stop()``, ``.start()``,
    ``.restart()``, ``.records``, ``.errors``).
    """
    # kopf's login and the operator's own Kubernetes client both read KUBECONFIG.
    monkeypatch.setenv("KUBECONFIG", str(operator_identity.kubeconfig))
    # As deployed: executors' heartbeats are signed (the chart's Secret, operator.yaml).
    monkeypatch.setenv("MULAMBDA_HEARTBEAT_SECRET", HEARTBEAT_SECRET)
    # The kubernetes client reads KUBECONFIG once, when it is imported.
    monkeypatch.setattr("kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION",
                        str(operator_identity.kubeconfig))
    runs: list[OperatorRun] = []

    def run(target: Target, **options: Any) -> OperatorRun:
        operator = OperatorRun(cluster, operator_identity.user, target, **options)
        runs.append(operator)
        return operator.start()

    yield run
    failures = []
    for operator in runs:
        try:
            operator.stop()
        except Exception as exc:  # stop every run before failing
            failures.append(exc)
    if failures:
        raise failures[0]


def sign_as_its_pod(cluster: Cluster, replica: ReplicaRecord) -> ReplicaRecord:
    """``replica`` signed with the key the operator made for its executor (the one its
    pods mount): what a test writing a companion's heartbeat itself must send."""
    namespace, _, name = replica.executor.partition("/")
    uid = cluster.get("mulambda.io/v1alpha1", "modelexecutors", namespace, name)[
        "metadata"]["uid"]
    seed = executor_seed(HEARTBEAT_SECRET.encode(), namespace, name, uid)
    return Signer(seed).sign(replica, time.time())
