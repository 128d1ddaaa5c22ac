"""The emulated-Kubernetes harness behaves like an API server where kopf and operators care.

The first half talks to the emulator directly; the second runs a tiny kopf
operator (written inline) on it and checks what a real cluster would show:
a child adopted, status written, a finalizer that holds the object until
the operator releases it, garbage collection of the child, restarts, and
the request log an RBAC check reads.
"""

from __future__ import annotations

import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import kubernetes.client
import pytest

from support.kube import Kube, KubeAPIError
from support.kube_operator import OperatorErrors, OperatorRun
from support.kube_semantics import match_label_selector, strategic_merge_patch

pytestmark = pytest.mark.integration

ME = ("mulambda.io/v1alpha1", "modelexecutors")


def executor(name: str, model: str = "resnet") -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1",
        "kind": "ModelExecutor",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"name": model, "storageUri": f"s3://models/{model}"},
            "traits": {"type": "classifier", "input": "image", "output": "label"},
        },
    }


def configmap(name: str, **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, **metadata}, "data": {"k": "v"}}


def deployment(name: str, *containers: dict[str, Any]) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": list(containers)}}},
    }


# --- the emulator on its own ---------------------------------------------------------------------


def test_create_fills_in_server_side_metadata(kube: Kube) -> None:
    first = kube.create(executor("a"))
    second = kube.create(configmap("b"), namespace="other")

    assert first["metadata"]["uid"] and first["metadata"]["uid"] != second["metadata"]["uid"]
    assert first["metadata"]["generation"] == 1
    assert first["metadata"]["creationTimestamp"].endswith("Z")
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert second["metadata"]["namespace"] == "other"
    assert "generation" not in second["metadata"]  # ConfigMaps do not track it upstream
    with pytest.raises(KubeAPIError) as conflict:
        kube.create(executor("a"))
    assert conflict.value.status == 409
    with pytest.raises(KubeAPIError) as invalid:
        kube.create(configmap("Not_A_DNS_Name"))
    assert invalid.value.status == 422


async def test_async_helpers_and_memory_snapshot_work_from_an_async_test(kube: Kube) -> None:
    created = await kube.acreate(configmap("a"))
    await kube.apatch("v1", "configmaps", "default", "a", {"data": {"k": "w"}})
    patched = await kube.await_for(lambda: kube.aget("v1", "configmaps", "default", "a"))
    assert patched["data"] == {"k": "w"}
    assert [c["metadata"]["uid"] for c in await kube.alist("v1", "configmaps")] == [
        created["metadata"]["uid"]]

    requests_before = len(kube.requests)
    [stored] = kube.stored("v1", "configmaps", "default", "a")
    assert stored["data"] == {"k": "w"} and len(kube.requests) == requests_before
    assert await kube.adelete("v1", "configmaps", "default", "a") is not None
    assert await kube.aget("v1", "configmaps", "default", "a") is None


def test_status_subresource_and_generation(kube: Kube) -> None:
    kube.create(executor("a"))

    status = kube.patch(*ME, "default", "a", {"status": {"replicas": 1}}, subresource="status")
    assert status["metadata"]["generation"] == 1
    assert status["status"] == {"replicas": 1}

    # A status written through the main resource is dropped, as upstream does.
    spec = kube.patch(*ME, "default", "a", {"spec": {"traits": {"accuracy": 0.9}},
                                             "status": {"replicas": 7}})
    assert spec["metadata"]["generation"] == 2
    assert spec["status"] == {"replicas": 1}

    # Metadata-only changes leave generation alone; a no-op keeps the resourceVersion.
    labelled = kube.patch(*ME, "default", "a", {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 2
    again = kube.patch(*ME, "default", "a", {"metadata": {"labels": {"x": "y"}}})
    assert again["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]


def test_failed_json_patch_test_is_422_and_stale_merge_patch_is_409(kube: Kube) -> None:
    created = kube.create(executor("a"))
    stale: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x.io/f"]}]
    with pytest.raises(KubeAPIError) as failed:
        kube.patch(*ME, "default", "a", stale, patch_type="json")
    assert failed.value.status == 422

    current = created["metadata"]["resourceVersion"]
    fresh = [{**stale[0], "value": current}, stale[1]]
    assert kube.patch(*ME, "default", "a", fresh, patch_type="json")["metadata"]["finalizers"] \
        == ["x.io/f"]
    with pytest.raises(KubeAPIError) as conflict:
        kube.patch(*ME, "default", "a", {"metadata": {"resourceVersion": current}})
    assert conflict.value.status == 409


def test_strategic_merge_patch_merges_builtin_lists_and_is_refused_for_custom_resources(
    kube: Kube,
) -> None:
    kube.create(deployment("d", {"name": "serving", "image": "tf:1"},
                           {"name": "companion", "image": "c:1"}))
    patched = kube.patch("apps/v1", "deployments", "default", "d",
                         {"spec": {"template": {"spec": {"containers": [
                             {"name": "serving", "image": "tf:2"}]}}}},
                         patch_type="strategic")
    containers = patched["spec"]["template"]["spec"]["containers"]
    assert [(c["name"], c["image"]) for c in containers] == [
        ("serving", "tf:2"), ("companion", "c:1")]

    kube.create(executor("a"))
    with pytest.raises(KubeAPIError) as refused:
        kube.patch(*ME, "default", "a", {"spec": {}}, patch_type="strategic")
    assert refused.value.status == 415


def test_deletion_waits_for_finalizers_and_collects_owned_objects(kube: Kube) -> None:
    owner = kube.create({**executor("a"), "metadata": {
        "name": "a", "namespace": "default", "finalizers": ["mulambda.io/test"]}})
    ref = {"apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor", "name": "a",
           "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    kube.create(configmap("owned", ownerReferences=[ref]))
    kube.create(configmap("orphan-proof"))

    kube.delete(*ME, "default", "a")
    pending = kube.get(*ME, "default", "a")
    assert pending is not None and pending["metadata"]["deletionTimestamp"]
    assert kube.get("v1", "configmaps", "default", "owned") is not None
    with pytest.raises(KubeAPIError) as forbidden:  # no new finalizers while deleting
        kube.patch(*ME, "default", "a",
                   {"metadata": {"finalizers": ["mulambda.io/test", "x.io/y"]}})
    assert forbidden.value.status == 422

    kube.patch(*ME, "default", "a", {"metadata": {"finalizers": None}})
    assert kube.get(*ME, "default", "a") is None
    assert kube.get("v1", "configmaps", "default", "owned") is None
    assert kube.get("v1", "configmaps", "default", "orphan-proof") is not None


def test_orphan_propagation_keeps_dependents_without_the_reference(kube: Kube) -> None:
    owner = kube.create(configmap("owner"))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
           "uid": owner["metadata"]["uid"]}
    kube.create(configmap("dependent", ownerReferences=[ref]))

    kube.delete("v1", "configmaps", "default", "owner", propagation_policy="Orphan")

    dependent = kube.get("v1", "configmaps", "default", "dependent")
    assert dependent is not None and "ownerReferences" not in dependent["metadata"]


def test_watch_resumes_from_resource_version_and_filters_by_label(kube: Kube) -> None:
    kube.create(configmap("before", labels={"app": "x"}))
    listed = kube.request("GET", "/api/v1/namespaces/default/configmaps").json()
    since = listed["metadata"]["resourceVersion"]
    kube.create(configmap("after", labels={"app": "x"}))
    kube.create(configmap("other", labels={"app": "y"}))
    kube.delete("v1", "configmaps", "default", "after")

    params = {"watch": "true", "resourceVersion": since, "timeoutSeconds": "0.3",
              "labelSelector": "app=x"}
    with httpx.Client(base_url=kube.url) as client:
        lines = client.get("/api/v1/namespaces/default/configmaps", params=params).text.splitlines()
    events = [httpx.Response(200, content=line).json() for line in lines]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "after"), ("DELETED", "after")]


def test_custom_resources_are_pruned_defaulted_and_validated_by_their_crd(kube: Kube) -> None:
    created = kube.create({**executor("a"), "spec": {**executor("a")["spec"], "bogus": 1}})
    assert "bogus" not in created["spec"]  # pruned: not in the schema
    assert created["spec"]["scaling"]["minReplicas"] == 1  # defaulted from the schema

    status = kube.patch(*ME, "default", "a", {"status": {"replicas": 2, "undeclared": "x"}},
                        subresource="status")
    assert status["status"] == {"replicas": 2}

    with pytest.raises(KubeAPIError) as invalid:
        kube.patch(*ME, "default", "a", {"spec": {"scaling": {"minReplicas": -1}}})
    assert invalid.value.status == 422 and "minReplicas" in str(invalid.value)


def test_builtin_kinds_get_defaults_semantic_checks_and_immutable_fields(kube: Kube) -> None:
    created = kube.create(deployment("d", {"name": "serving", "image": "tf:2.18",
                                           "ports": [{"containerPort": 8501}]}))
    assert created["spec"]["replicas"] == 1
    [container] = created["spec"]["template"]["spec"]["containers"]
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["ports"] == [{"containerPort": 8501, "protocol": "TCP"}]

    mismatched = deployment("e", {"name": "serving", "image": "tf"})
    mismatched["spec"]["selector"] = {"matchLabels": {"app": "other"}}
    with pytest.raises(KubeAPIError, match="does not match template"):
        kube.create(mismatched)
    with pytest.raises(KubeAPIError, match="field is immutable"):
        kube.patch("apps/v1", "deployments", "default", "d",
                   {"spec": {"selector": {"matchLabels": {"app": "x"}}}})

    service = kube.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                           "spec": {"selector": {"app": "d"}, "ports": [{"port": 80}]}})
    assert service["spec"]["clusterIP"] and service["spec"]["ports"][0]["targetPort"] == 80
    assert kube.patch("v1", "services", "default", "s", {"spec": {"clusterIP": None}}
                      )["spec"]["clusterIP"] == service["spec"]["clusterIP"]


def test_scale_subresource_and_simulated_rollout(kube: Kube) -> None:
    kube.create(deployment("d", {"name": "serving", "image": "tf:2"}))

    scale = kube.patch("apps/v1", "deployments", "default", "d", {"spec": {"replicas": 3}},
                       subresource="scale")
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    rolled = kube.simulate_rollout("default", "d", ready=2)
    assert rolled["spec"]["replicas"] == 3
    assert rolled["status"]["readyReplicas"] == 2 and rolled["status"]["replicas"] == 3
    assert rolled["status"]["observedGeneration"] == rolled["metadata"]["generation"]


def test_namespaces_are_served_and_deleting_one_deletes_its_contents(kube: Kube) -> None:
    kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
    kube.create(configmap("c"), namespace="team")
    assert {n["metadata"]["name"] for n in kube.list("v1", "namespaces")} == {"default", "team"}

    kube.delete("v1", "namespaces", None, "team")
    assert kube.get("v1", "configmaps", "team", "c") is None

    kube.emulator.require_namespaces = True
    with pytest.raises(KubeAPIError) as missing:
        kube.create(configmap("c"), namespace="team")
    assert missing.value.status == 404


def test_kubernetes_client_reaches_the_emulator_through_kubeconfig(kube: Kube) -> None:
    kube.create(configmap("seen"))
    names = [cm.metadata and cm.metadata.name for cm in
             kubernetes.client.CoreV1Api().list_namespaced_config_map("default").items]
    assert names == ["seen"]


def test_crd_posted_at_runtime_is_served(kube: Kube) -> None:
    kube.create({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {"type": "object"}}}]},
    })
    kube.create({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert kube.get("example.com/v1", "widgets", "default", "w") is not None

    kube.delete("apiextensions.k8s.io/v1", "customresourcedefinitions", None,
                "widgets.example.com")
    assert kube.request("GET", "/apis/example.com/v1/widgets").status_code == 404
    groups = [g["name"] for g in kube.request("GET", "/apis").json()["groups"]]
    assert "example.com" not in groups and "mulambda.io" in groups


@pytest.mark.parametrize(("patch", "expected"), [
    # containers merge on name, $patch: delete removes one
    ({"containers": [{"name": "b", "image": "b:2"}]},
     {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:2"}]}),
    ({"containers": [{"name": "a", "$patch": "delete"}]},
     {"containers": [{"name": "b", "image": "b:1"}]}),
    # lists without a merge key are replaced; finalizers merge as a set
    ({"args": ["x"]}, {"containers": [{"name": "a", "image": "a:1"},
                                      {"name": "b", "image": "b:1"}], "args": ["x"]}),
])
def test_strategic_merge_patch_follows_merge_keys(patch: dict[str, Any],
                                                  expected: dict[str, Any]) -> None:
    base = {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}],
            "args": ["y"]}
    result = strategic_merge_patch(base, patch)
    assert {k: result[k] for k in expected} == expected
    assert strategic_merge_patch({"finalizers": ["a"]}, {"finalizers": ["b", "a"]}) == {
        "finalizers": ["a", "b"]}


@pytest.mark.parametrize(("selector", "matches"), [
    ("app=x", True), ("app==x,tier", True), ("app!=x", False), ("!tier", False),
    ("app in (x, y)", True), ("tier notin (db)", True), ("app in (y)", False), ("", True),
])
def test_label_selectors(selector: str, matches: bool) -> None:
    assert match_label_selector({"app": "x", "tier": "web"}, selector) is matches


# --- a kopf operator on the emulator -------------------------------------------------------------

HANDLERS = '''
"""A tiny operator: adopt a ConfigMap per executor, write status, hold a finalizer."""
from pathlib import Path

import kopf
import kubernetes.client

RELEASE = Path(__file__).with_name("release")


@kopf.on.create("mulambda.io", "v1alpha1", "modelexecutors")
def create_child(body, name, namespace, patch, **_):
    child = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": f"{name}-model"},
             "data": {"model": body["spec"]["model"]["name"]}}
    kopf.adopt(child)
    kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, child)
    patch.status["observedGeneration"] = body["metadata"]["generation"]
    patch.status["replicaSummary"] = "child created"


@kopf.on.delete("mulambda.io", "v1alpha1", "modelexecutors")
def release(name, **_):
    # Holds the object (via kopf's finalizer) until the test allows it to go.
    if not RELEASE.exists():
        raise kopf.TemporaryError("not released yet", delay=0.1)
'''


@pytest.fixture
def handlers(tmp_path: Path) -> Path:
    path = tmp_path / "handlers.py"
    path.write_text(textwrap.dedent(HANDLERS))
    return path


def test_operator_adopts_child_writes_status_and_finalizes(
    kube: Kube, run_operator: Callable[..., OperatorRun], handlers: Path,
) -> None:
    run_operator(handlers)
    owner = kube.create(executor("resnet"))

    child = kube.wait_for(lambda: kube.get("v1", "configmaps", "default", "resnet-model"),
                          what="the adopted ConfigMap")
    [ref] = child["metadata"]["ownerReferences"]
    assert ref["uid"] == owner["metadata"]["uid"] and ref["controller"] is True
    status = kube.wait_for(lambda: (kube.get(*ME, "default", "resnet") or {}).get("status"),
                           what="the executor's status")
    assert status["observedGeneration"] == 1 and status["replicaSummary"] == "child created"

    kube.delete(*ME, "default", "resnet")
    time.sleep(0.5)  # the delete handler retries every 0.1 s meanwhile
    held = kube.get(*ME, "default", "resnet")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    assert held["metadata"]["finalizers"]  # kopf's own finalizer holds it

    (handlers.parent / "release").touch()
    kube.wait_for(lambda: kube.get(*ME, "default", "resnet") is None, what="the executor gone")
    assert kube.get("v1", "configmaps", "default", "resnet-model") is None  # collected


def test_operator_restart_does_not_recreate_handled_children(
    kube: Kube, run_operator: Callable[..., OperatorRun], handlers: Path,
) -> None:
    operator = run_operator(handlers)
    kube.create(executor("first"))
    kube.wait_for(lambda: kube.get("v1", "configmaps", "default", "first-model"))

    operator.restart()
    kube.create(executor("second"))
    kube.wait_for(lambda: kube.get("v1", "configmaps", "default", "second-model"))
    time.sleep(0.3)  # time enough to (wrongly) handle "first" again

    creates = [r for r in kube.requests
               if (r.plural, r.verb, r.from_harness) == ("configmaps", "create", False)]
    assert len(creates) == 2
    assert operator.starts == 2


def test_request_log_gives_the_rbac_triples_an_operator_used(
    kube: Kube, run_operator: Callable[..., OperatorRun], handlers: Path,
) -> None:
    run_operator(handlers)
    kube.create(executor("a"))
    kube.wait_for(lambda: (kube.get(*ME, "default", "a") or {}).get("status"))

    used = kube.rbac_triples()
    assert {("mulambda.io", "modelexecutors", "watch"),
            ("mulambda.io", "modelexecutors", "patch"),
            ("mulambda.io", "modelexecutors/status", "patch"),
            ("", "configmaps", "create")} <= used
    assert ("mulambda.io", "modelexecutors", "create") not in used  # only the test created one

    rules = [{"apiGroups": ["mulambda.io"], "resources": ["modelexecutors"],
              "verbs": ["list", "watch", "patch"]}]
    assert ("", "configmaps", "create") in kube.rbac_violations(rules)
    assert ("mulambda.io", "modelexecutors", "watch") not in kube.rbac_violations(rules)


def test_handler_exceptions_fail_the_run(
    kube: Kube, tmp_path: Path,
) -> None:
    path = tmp_path / "broken.py"
    path.write_text(textwrap.dedent('''
        import kopf

        @kopf.on.create("mulambda.io", "v1alpha1", "modelexecutors")
        def broken(**_):
            raise KeyError("a bug in a handler")
    '''))
    operator = OperatorRun(kube, path).start()
    kube.create(executor("a"))
    kube.wait_for(lambda: operator.errors, what="the handler's exception in the log")

    with pytest.raises(OperatorErrors, match="a bug in a handler"):
        operator.stop()


def test_each_run_gets_only_its_own_handlers(
    kube: Kube, run_operator: Callable[..., OperatorRun], handlers: Path, tmp_path: Path,
) -> None:
    calls: list[str] = []
    lock = threading.Lock()

    def register(registry: Any) -> None:
        import kopf

        @kopf.on.create("mulambda.io", "v1alpha1", "modelexecutors", registry=registry)
        def count(name: str, **_: Any) -> None:
            with lock:
                calls.append(name)

    # handlers.py was imported by other tests into kopf's default registry; this
    # run must not pick up its create_child handler.
    run_operator(register)
    kube.create(executor("solo"))
    kube.wait_for(lambda: calls, what="the registered handler")
    time.sleep(0.2)
    assert calls == ["solo"]
    assert kube.get("v1", "configmaps", "default", "solo-model") is None
