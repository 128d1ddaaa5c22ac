"""The real control plane (support/controlplane.py) does what the emulator cannot:
CRD schemas and CEL rules, Pod Security admission, the Deployment/ReplicaSet
controllers with the scheduler and KWOK nodes, garbage collection, /version."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from support.controlplane import ControlPlane

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CRDS = Path(__file__).resolve().parents[2] / "crds"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def crds(controlplane: ControlPlane) -> list[str]:
    """The project's CRDs, applied and Established."""
    files = sorted(CRDS.glob("*.mulambda.io.yaml"))
    controlplane.kubectl("apply", *[f"--filename={f}" for f in files])
    names = [f.name.removesuffix(".yaml") for f in files]
    controlplane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        *[f"crd/{n}" for n in names],
    )  # fmt: skip
    return names


def test_version_is_the_pinned_release(controlplane: ControlPlane) -> None:
    version = controlplane.get_json("/version")
    assert version["gitVersion"] == "v1.36.3"
    assert (version["major"], version["minor"]) == ("1", "36")
    client_version = controlplane.kubectl("version", "--client", "-o", "json").stdout
    assert '"gitVersion": "v1.36.3"' in client_version


def test_crds_are_established(controlplane: ControlPlane, crds: list[str]) -> None:
    assert crds == ["clients.mulambda.io", "modelexecutors.mulambda.io"]
    with controlplane.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        for name in crds:
            conditions = {
                c.type: c.status
                for c in ext.read_custom_resource_definition(name).status.conditions
            }
            assert conditions["Established"] == "True"
            assert conditions["NamesAccepted"] == "True"
    # The server prints the CRD's columns.
    header = controlplane.kubectl("get", "modelexecutors", "-A").stderr
    assert "No resources found" in header


def _executor(name: str, **scaling: int) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1",
        "kind": "ModelExecutor",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "half_plus_two", "storageUri": "s3://models/half_plus_two"},
            "traits": {"type": "regression", "input": "tensor/float32", "output": "tensor/float32"},
            "scaling": scaling,
        },
    }


def test_server_rejects_invalid_modelexecutor_by_cel(
    controlplane: ControlPlane, crds: list[str], cp_namespace: str
) -> None:
    with controlplane.api_client() as api:
        custom = client.CustomObjectsApi(api)
        args = ("mulambda.io", "v1alpha1", cp_namespace, "modelexecutors")
        with pytest.raises(client.ApiException) as rejected:
            custom.create_namespaced_custom_object(
                *args, _executor("too-few", minReplicas=3, maxReplicas=2)
            )
        assert rejected.value.status == 422
        message = json.loads(rejected.value.body)["message"]
        assert "scaling.minReplicas must not exceed scaling.maxReplicas" in message
        # The same object within bounds is accepted, with the schema's defaults.
        created = custom.create_namespaced_custom_object(
            *args, _executor("fine", minReplicas=2, maxReplicas=3)
        )
        assert created["spec"]["scaling"]["targetConcurrency"] == 4
        # Schema (not CEL): a pattern violation is refused too.
        bad_uri = _executor("bad-uri")
        bad_uri["spec"]["model"]["storageUri"] = "http://not-s3"
        with pytest.raises(client.ApiException) as rejected:
            custom.create_namespaced_custom_object(*args, bad_uri)
        assert rejected.value.status == 422
        assert "spec.model.storageUri" in json.loads(rejected.value.body)["message"]


RESTRICTED_CONTAINER = {
    "name": "app",
    "image": "registry.example/app:1",
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
}


def _deployment(name: str, container: dict[str, Any], replicas: int = 2) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def test_restricted_namespace_runs_compliant_pods_on_kwok_and_refuses_others(
    controlplane: ControlPlane, cp_restricted_namespace: str
) -> None:
    ns = cp_restricted_namespace
    with controlplane.api_client() as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)

        apps.create_namespaced_deployment(ns, _deployment("good", RESTRICTED_CONTAINER))

        def good_ready() -> Any:
            d = apps.read_namespaced_deployment("good", ns)
            return d.status.ready_replicas == 2 and d.status.available_replicas == 2

        wait_for("Deployment good to have 2 ready replicas", good_ready)
        pods = core.list_namespaced_pod(ns, label_selector="app=good").items
        assert len(pods) == 2
        for pod in pods:
            assert pod.spec.node_name in controlplane.node_names  # the real scheduler
            assert pod.status.phase == "Running"  # KWOK's pod-ready stage
            assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"
            assert pod.metadata.owner_references[0].kind == "ReplicaSet"

        # A pod that runs as root with the default capabilities: the ReplicaSet
        # controller's creates are refused by Pod Security admission.
        plain = {"name": "app", "image": "registry.example/app:1"}
        apps.create_namespaced_deployment(ns, _deployment("bad", plain, replicas=1))

        def failed_create() -> Any:
            for rs in apps.list_namespaced_replica_set(ns, label_selector="app=bad").items:
                for c in rs.status.conditions or []:
                    if c.type == "ReplicaFailure" and c.status == "True":
                        return c.message
            return None

        message = wait_for("ReplicaFailure on the bad ReplicaSet", failed_create)
        assert 'violates PodSecurity "restricted:latest"' in message
        assert not core.list_namespaced_pod(ns, label_selector="app=bad").items

        # And directly: 403 Forbidden with the same reason.
        with pytest.raises(client.ApiException) as refused:
            core.create_namespaced_pod(
                ns, {"metadata": {"name": "direct"}, "spec": {"containers": [plain]}}
            )
        assert refused.value.status == 403
        reason = json.loads(refused.value.body)["message"]
        assert 'violates PodSecurity "restricted:latest"' in reason
        assert "runAsNonRoot != true" in reason


def test_garbage_collector_deletes_owned_objects(
    controlplane: ControlPlane, cp_namespace: str
) -> None:
    ns = cp_namespace
    with controlplane.api_client() as api:
        core = client.CoreV1Api(api)
        owner = core.create_namespaced_config_map(ns, {"metadata": {"name": "owner"}})
        ref = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": "owner",
            "uid": owner.metadata.uid,
        }
        core.create_namespaced_config_map(
            ns, {"metadata": {"name": "child", "ownerReferences": [ref]}, "data": {"k": "v"}}
        )
        core.create_namespaced_config_map(ns, {"metadata": {"name": "bystander"}})
        core.delete_namespaced_config_map("owner", ns, propagation_policy="Background")

        def child_gone() -> bool:
            names = {cm.metadata.name for cm in core.list_namespaced_config_map(ns).items}
            return "child" not in names

        wait_for("the garbage collector to delete the owned ConfigMap", child_gone)
        assert core.read_namespaced_config_map("bystander", ns).metadata.name == "bystander"


def test_service_account_identity_is_held_to_rbac(
    controlplane: ControlPlane, cp_namespace: str
) -> None:
    """A TokenRequest token authenticates as the ServiceAccount, which RBAC
    allows nothing until a Role grants it."""
    ns = cp_namespace
    with controlplane.api_client() as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_service_account(ns, {"metadata": {"name": "robot"}})
    kubeconfig = controlplane.service_account_kubeconfig(ns, "robot")

    def as_robot(*args: str) -> Any:
        return controlplane.kubectl(*args, kubeconfig=kubeconfig, check=False)

    whoami = as_robot("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    assert whoami.stdout == f"system:serviceaccount:{ns}:robot"
    denied = as_robot("-n", ns, "get", "configmaps")
    assert denied.returncode == 1
    assert "Forbidden" in denied.stderr

    controlplane.kubectl(
        "-n", ns, "create", "role", "read-cm", "--verb=get,list", "--resource=configmaps"
    )
    controlplane.kubectl(
        "-n", ns, "create", "rolebinding", "robot-read-cm", "--role=read-cm",
        f"--serviceaccount={ns}:robot",
    )  # fmt: skip
    allowed = wait_for(
        "the RoleBinding to take effect",
        lambda: as_robot("-n", ns, "get", "configmaps", "-o", "name").returncode == 0,
        timeout=10,
    )
    assert allowed
    assert as_robot("-n", ns, "delete", "configmap", "kube-root-ca.crt").returncode == 1
