"""What we ship, installed on a real Kubernetes control plane with the real helm and kubectl.

* charts/mulambda: ``helm install`` into a namespace that enforces Pod Security
  "restricted" (the CRDs from crds/, the RBAC, every Deployment Available on
  KWOK nodes and the post-install bucket Job completed), ``helm upgrade``
  (replicas, log level, namespaced watch) and ``helm uninstall`` (every object
  of the release gone; the CRDs stay, as Helm documents for crds/).
* manifests/: ``kubectl apply -k`` of the base (through manifests/) and of the
  dev overlay, client-side and ``--server-side``, CRDs included; every pod
  template both render is admitted under "restricted".
* ``kubectl get modelexecutors,clients``: the printer columns as the server
  prints them.

These tests run on a control plane of their own (started once for this module,
10-30 s): the shipped manifests create cluster-scoped objects with fixed names
(CRDs, and the ClusterRoles and bindings ``mulambda-operator`` that the
session's operator identity, rendered from the chart as release "mulambda",
uses too), and a fresh cluster is what shows that helm and kustomize really
create the CRDs instead of finding them.
"""

from __future__ import annotations

import copy
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.cluster import ApiError, Cluster
from support.controlplane import BinariesMissing, ControlPlane

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mulambda"
MANIFESTS = REPO / "manifests"
CRD_NAMES = ("modelexecutors.mulambda.io", "clients.mulambda.io")
RELEASE = "shipped"
FULLNAME = f"{RELEASE}-mulambda"
POD_CONTROLLERS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


# -- a control plane for this module ----------------------------------------------------------


class _LogsOnFailure:
    """Attaches the module's control-plane log tails to its failing tests' reports."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        report = yield
        if report.failed and item.module is not None and item.module.__name__ == __name__:
            report.sections.append(("shipping controlplane logs", self.plane.log_tail(40)))
        return report


@pytest.fixture(scope="module")
def plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    try:
        cp = ControlPlane(nodes=2)
    except BinariesMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    cp.start()
    reporter = _LogsOnFailure(cp)
    request.config.pluginmanager.register(reporter)
    failed_before = request.session.testsfailed
    try:
        yield cp
    finally:
        request.config.pluginmanager.unregister(reporter)
        if request.session.testsfailed > failed_before:
            cp.stop()  # keep the logs: they explain the failure
        else:
            cp.cleanup()


@pytest.fixture(scope="module")
def admin(plane: ControlPlane) -> Iterator[Cluster]:
    api = Cluster(plane)
    yield api
    api.close()


@pytest.fixture
def restricted_ns(plane: ControlPlane, admin: Cluster) -> Iterator[str]:
    name = f"ship-{uuid.uuid4().hex[:8]}"
    admin.create({"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": name, "labels": RESTRICTED}})
    admin.wait_for(lambda: admin.get("v1", "serviceaccounts", name, "default"),
                   what="the namespace's default ServiceAccount")
    yield name
    admin.delete("v1", "namespaces", None, name)


# -- helpers ----------------------------------------------------------------------------------


def no_crds(plane: ControlPlane, admin: Cluster) -> None:
    """A cluster without mulambda's CRDs, so an install has to create them.

    A CRD deleted while the API server (re)initialises its storage can stay
    Terminating for the CRD informer's resync, 5 minutes (seen in CI): the CRD
    finalizer's LIST of instances fails with "storage is (re)initializing", its
    retry works from a stale copy, loses a conflict and gives up expecting an
    update event, and the status update it lost to changes only the Terminating
    condition, which the finalizer ignores (apiextensions-apiserver v0.36
    crd_finalizer.go, sync and updateCustomResourceDefinition). Any other change
    to the CRD queues it again, so a CRD still there after a few seconds gets an
    annotation. docs/install.md "Uninstall" tells users the same.
    """
    plane.kubectl("delete", "crd", *CRD_NAMES, "--ignore-not-found", "--wait=false")
    started = time.monotonic()

    def gone() -> bool:
        left = [name for name in CRD_NAMES if admin.get(
            "apiextensions.k8s.io/v1", "customresourcedefinitions", None, name) is not None]
        if left and time.monotonic() - started > 5:
            for name in left:
                plane.kubectl("annotate", "--overwrite", "crd", name,
                              f"mulambda.io/requeue={time.monotonic_ns()}", check=False)
        return not left

    admin.wait_for(gone, timeout=60, interval=2, what=f"{' and '.join(CRD_NAMES)} deleted")


def established(admin: Cluster, name: str) -> dict[str, Any] | None:
    crd = admin.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, name)
    conditions = {c["type"]: c["status"] for c in ((crd or {}).get("status") or {}).get(
        "conditions") or []}
    return crd if conditions.get("Established") == "True" else None


def available(admin: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    """The Deployment once its controller reports the current template fully rolled out
    and available (KWOK makes pods Ready)."""
    dep = admin.get("apps/v1", "deployments", namespace, name)
    status = (dep or {}).get("status") or {}
    if dep is None or status.get("observedGeneration", 0) < dep["metadata"]["generation"]:
        return None
    want = dep["spec"]["replicas"]
    done = (status.get("updatedReplicas"), status.get("availableReplicas"),
            status.get("replicas")) == (want, want, want)
    return dep if done else None


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def ref(doc: dict[str, Any]) -> str:
    """``kind.group/name``, as kubectl takes it."""
    group = doc["apiVersion"].rpartition("/")[0]
    return f"{doc['kind']}{'.' + group if group else ''}/{doc['metadata']['name']}"


def pod_templates(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(``Kind/name``, pod template) of every pod-creating object in ``docs``."""
    found = []
    for doc in docs:
        if doc["kind"] in POD_CONTROLLERS:
            found.append((f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]))
        elif doc["kind"] == "CronJob":
            found.append((f"CronJob/{doc['metadata']['name']}",
                          doc["spec"]["jobTemplate"]["spec"]["template"]))
    return found


def admit_as_pod(admin: Cluster, namespace: str, template: dict[str, Any]) -> None:
    """Create the template as a Pod with ``dryRun=All``: every admission plugin runs
    (PodSecurity included), nothing is stored. Raises ApiError when refused."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "admission-check-", "namespace": namespace,
                        "labels": (template.get("metadata") or {}).get("labels") or {}},
           "spec": template["spec"]}
    admin.request("POST", f"/api/v1/namespaces/{namespace}/pods", body=pod,
                  params={"dryRun": "All"})


def refused_templates(admin: Cluster, namespace: str, docs: list[dict[str, Any]]) -> list[str]:
    refused = []
    for what, template in pod_templates(docs):
        try:
            admit_as_pod(admin, namespace, template)
        except ApiError as exc:
            refused.append(f"{what}: {exc.status} {exc.message}")
    return refused


def tables(text: str) -> list[tuple[list[str], list[dict[str, str]]]]:
    """kubectl's human-readable output: (headers, rows as header -> cell) per resource kind.
    Cells are cut at the header columns, so an empty cell reads ""."""
    result = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        header, *lines = block.splitlines()
        starts = [m.start() for m in re.finditer(r"\S+", header)]
        names = header.split()
        bounds = list(zip(starts, [*starts[1:], None], strict=True))
        rows = [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)}
                for line in lines]
        result.append((names, rows))
    return result


def release_objects(plane: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    return docs_of(plane.helm("get", "manifest", RELEASE, "-n", namespace).stdout)


def existing(plane: ControlPlane, namespace: str, refs: list[str]) -> list[str]:
    out = plane.kubectl("get", "-n", namespace, "--ignore-not-found", "-o", "name", *refs)
    return out.stdout.split()


def server_warnings(stderr: str) -> list[str]:
    """Warnings the API server sent (kubectl prints "Warning: ...", helm logs them),
    e.g. a pod template that "would violate PodSecurity"."""
    return [line for line in stderr.splitlines() if "Warning" in line or "violate" in line]


def can_i(plane: ControlPlane, user: str, *args: str) -> bool:
    """``kubectl auth can-i`` as ``user``: the server's SubjectAccessReview answer."""
    proc = plane.kubectl("auth", "can-i", f"--as={user}", *args, check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stderr
    return proc.stdout.strip() == "yes"


# -- helm -------------------------------------------------------------------------------------


def test_helm_install_upgrade_uninstall_in_a_restricted_namespace(
    plane: ControlPlane, admin: Cluster, restricted_ns: str
) -> None:
    ns = restricted_ns
    no_crds(plane, admin)
    operator_sa = f"system:serviceaccount:{ns}:{FULLNAME}-operator"

    # Install: nothing here needs an image to run; KWOK reports the pods Ready, so
    # --wait means every Deployment is Available, and the post-install hook Job
    # (MinIO buckets) has completed.
    install = plane.helm(
        "install", RELEASE, str(CHART), "-n", ns, "--set", "minio.enabled=true",
        "--wait", "--timeout", "120s",
    )  # fmt: skip
    assert "STATUS: deployed" in install.stdout
    assert server_warnings(install.stderr) == []
    [release] = json.loads(plane.helm("list", "-n", ns, "-o", "json").stdout)
    assert (release["name"], release["status"], release["revision"]) == (
        RELEASE, "deployed", "1")

    # helm created the CRDs from crds/ (they did not exist), and the server serves them.
    for name in CRD_NAMES:
        crd = admin.wait_for(lambda n=name: established(admin, n), what=f"CRD {name}")
        assert "helm" in {f["manager"] for f in crd["metadata"]["managedFields"]}
        shipped = yaml.safe_load((CHART / "crds" / f"{name}.yaml").read_text())
        assert [v["name"] for v in crd["spec"]["versions"]] == [
            v["name"] for v in shipped["spec"]["versions"]]

    # RBAC: the objects, and what the server grants the operator's ServiceAccount.
    for plural, name in (("clusterroles", f"{FULLNAME}-operator"),
                         ("clusterroles", f"{FULLNAME}-operator-cluster"),
                         ("clusterrolebindings", f"{FULLNAME}-operator"),
                         ("clusterrolebindings", f"{FULLNAME}-operator-cluster")):
        assert admin.get("rbac.authorization.k8s.io/v1", plural, None, name), (plural, name)
    for account in (f"{FULLNAME}-operator", f"{FULLNAME}-selector"):
        assert admin.get("v1", "serviceaccounts", ns, account), account
    assert can_i(plane, operator_sa, "patch", "modelexecutors.mulambda.io", "-A")
    assert can_i(plane, operator_sa, "create", "deployments.apps", "-n", "default")
    assert not can_i(plane, operator_sa, "get", "secrets", "-n", ns)

    # Every workload ran under "restricted": Deployments Available with pods on KWOK
    # nodes, the hook Job's pod created and completed (hook-succeeded deleted the Job).
    deployments = {d["metadata"]["name"]: d for d in admin.list("apps/v1", "deployments", ns)}
    assert sorted(deployments) == sorted(
        f"{FULLNAME}-{c}" for c in ("operator", "selector", "redis", "minio"))
    for name in deployments:
        admin.wait_for(lambda n=name: available(admin, ns, n), what=f"{name} Available")
    pods = [p for p in admin.list("v1", "pods", ns)
            if p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"]
    assert len(pods) == 4
    assert all(p["spec"]["nodeName"].startswith("kwok-node-") for p in pods)
    assert all(p["status"]["phase"] == "Running" for p in pods)
    job_events = {e["reason"] for e in admin.events(ns, involved=f"{FULLNAME}-minio-buckets")
                  if e["involvedObject"]["kind"] == "Job"}
    assert {"SuccessfulCreate", "Completed"} <= job_events, job_events
    # Not counted: the API server's own IP repair loop, which can run between a
    # Service's creation and its IP's record reaching the loop's cache and then says
    # "ClusterIPNotAllocated ... repairing" (and repairs it): a race inside the control
    # plane on a busy machine, whatever created the Service (seen once in CI here).
    warnings = [f"{e['involvedObject']['name']}: {e['reason']} {e['message']}"
                for e in admin.events(ns) if e.get("type") == "Warning"
                and e.get("reason") != "ClusterIPNotAllocated"]
    assert warnings == []

    # Upgrade: two selector replicas, DEBUG logs, watch only the release namespace.
    old_operator = deployments[f"{FULLNAME}-operator"]
    upgrade = plane.helm(
        "upgrade", RELEASE, str(CHART), "-n", ns, "--reuse-values",
        "--set", "selector.replicas=2", "--set", "settings.logLevel=DEBUG",
        "--set", "watch.clusterwide=false", "--wait", "--timeout", "120s",
    )  # fmt: skip
    assert server_warnings(upgrade.stderr) == []
    [release] = json.loads(plane.helm("list", "-n", ns, "-o", "json").stdout)
    assert (release["status"], release["revision"]) == ("deployed", "2")
    config = admin.get("v1", "configmaps", ns, f"{FULLNAME}-config")
    assert config is not None and config["data"]["MULAMBDA_LOG_LEVEL"] == "DEBUG"
    selector = admin.wait_for(lambda: available(admin, ns, f"{FULLNAME}-selector"),
                              what="the selector Available")
    assert (selector["spec"]["replicas"], selector["status"]["availableReplicas"]) == (2, 2)
    operator = admin.wait_for(lambda: available(admin, ns, f"{FULLNAME}-operator"),
                              what="the operator Available")
    template = operator["spec"]["template"]
    assert f"--namespace={ns}" in template["spec"]["containers"][0]["args"]
    # The store's pod template did not change, so the store (in memory) was not
    # restarted: a checksum of the rendered Secrets drew the generated passwords again.
    store = admin.get("apps/v1", "deployments", ns, f"{FULLNAME}-redis")
    assert store is not None and store["metadata"]["generation"] == 1
    # The config checksum changed, so the operator pod was replaced (Recreate).
    assert (template["metadata"]["annotations"]["checksum/config"]
            != old_operator["spec"]["template"]["metadata"]["annotations"]["checksum/config"])
    assert operator["status"]["updatedReplicas"] == 1
    # Namespaced watch: a RoleBinding in the namespace replaces the cluster-wide binding.
    assert admin.get("rbac.authorization.k8s.io/v1", "clusterrolebindings", None,
                     f"{FULLNAME}-operator") is None
    assert admin.get("rbac.authorization.k8s.io/v1", "rolebindings", ns, f"{FULLNAME}-operator")
    assert can_i(plane, operator_sa, "patch", "modelexecutors.mulambda.io", "-n", ns)
    assert not can_i(plane, operator_sa, "patch", "modelexecutors.mulambda.io", "-n", "default")
    assert can_i(plane, operator_sa, "list", "namespaces")  # kopf needs it for a namespace list

    # Uninstall: every object of the release goes; the CRDs stay (Helm never deletes crds/).
    objects = release_objects(plane, ns)
    refs = [ref(d) for d in objects]
    assert len(existing(plane, ns, refs)) == len(refs) >= 15
    plane.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "120s")
    assert json.loads(plane.helm("list", "-n", ns, "-o", "json").stdout) == []
    assert existing(plane, ns, refs) == []
    admin.wait_for(lambda: not admin.list("v1", "pods", ns), what="the release's pods gone")
    assert not [s for s in admin.list("v1", "secrets", ns)
                if s["type"] == "helm.sh/release.v1"]
    for name in CRD_NAMES:
        assert established(admin, name), f"{name} should outlive the release"


# -- kustomize --------------------------------------------------------------------------------


def test_kubectl_apply_k_manifests_client_and_server_side(
    plane: ControlPlane, admin: Cluster
) -> None:
    no_crds(plane, admin)

    # The base, through manifests/kustomization.yaml, as docs/install.md says.
    base = plane.kubectl("apply", "-k", str(MANIFESTS))
    # The namespace warns for "restricted": a workload violating it would print a warning.
    assert server_warnings(base.stderr) == []
    created = set(base.stdout.split("\n"))
    for name in CRD_NAMES:
        assert f"customresourcedefinition.apiextensions.k8s.io/{name} created" in created
    for line in ("namespace/mulambda created",
                 "deployment.apps/mulambda-operator created",
                 "deployment.apps/mulambda-selector created",
                 "deployment.apps/mulambda-redis created",
                 "clusterrolebinding.rbac.authorization.k8s.io/mulambda-operator created"):
        assert line in created, base.stdout
    for name in CRD_NAMES:
        admin.wait_for(lambda n=name: established(admin, n), what=f"CRD {name}")

    # The dev overlay on top (MinIO, its Secret, the bucket Job), then both server-side.
    dev = plane.kubectl("apply", "-k", str(MANIFESTS / "overlays" / "dev"))
    assert server_warnings(dev.stderr) == []
    assert "job.batch/minio-buckets created" in dev.stdout
    server_side = plane.kubectl("apply", "--server-side", "-k", str(MANIFESTS / "overlays" / "dev"))
    assert server_warnings(server_side.stderr) == []
    assert all(line.endswith(" serverside-applied")
               for line in server_side.stdout.strip().splitlines()), server_side.stdout
    again = plane.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(MANIFESTS))
    assert server_warnings(again.stderr) == []
    assert "(server dry run)" in again.stdout
    assert "customresourcedefinition.apiextensions.k8s.io/clients.mulambda.io" in again.stdout

    # KWOK runs the pods: the Deployments become Available, the bucket Job completes.
    plane.kubectl("wait", "-n", "mulambda", "--for=condition=Available", "--timeout=90s",
                  "deployment/mulambda-operator", "deployment/mulambda-selector",
                  "deployment/mulambda-redis", "deployment/minio")
    plane.kubectl("wait", "-n", "mulambda", "--for=condition=Complete", "--timeout=90s",
                  "job/minio-buckets")

    # The shipped namespace enforces only "baseline" (executor pods run user images);
    # mulambda's own pods must pass "restricted". Enforce it: the server checks the
    # running pods against the new level and warns about any that violate it ...
    label = plane.kubectl("label", "--overwrite", "namespace", "mulambda",
                          "pod-security.kubernetes.io/enforce=restricted")
    assert server_warnings(label.stderr) == []
    # ... and every pod template of base and overlay is admitted as a Pod.
    rendered = docs_of(plane.kubectl("kustomize", str(MANIFESTS / "overlays" / "dev")).stdout)
    templates = pod_templates(rendered)
    assert sorted(what for what, _ in templates) == [
        "Deployment/minio", "Deployment/mulambda-operator", "Deployment/mulambda-redis",
        "Deployment/mulambda-selector", "Job/minio-buckets"]
    assert refused_templates(admin, "mulambda", rendered) == []
    # The check has teeth: the operator's pod without its container hardening is refused.
    weakened = copy.deepcopy(dict(templates)["Deployment/mulambda-operator"])
    for container in weakened["spec"]["containers"]:
        container.pop("securityContext", None)
    with pytest.raises(ApiError) as refused:
        admit_as_pod(admin, "mulambda", weakened)
    assert refused.value.status == 403
    assert 'violates PodSecurity "restricted:latest"' in refused.value.message


def test_chart_pod_templates_pass_restricted_with_every_component(
    plane: ControlPlane, admin: Cluster, restricted_ns: str
) -> None:
    """``helm template`` with every optional part on (persistence, existing secrets, extra
    env, namespaced watch): each rendered pod template is admitted under "restricted"."""
    # Pods name their ServiceAccounts: create them as the chart would.
    for account in (f"{FULLNAME}-operator", f"{FULLNAME}-selector"):
        admin.create({"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": {"name": account, "namespace": restricted_ns}})
    rendered = docs_of(plane.helm(
        "template", RELEASE, str(CHART), "-n", restricted_ns,
        "--set", "minio.enabled=true", "--set", "minio.persistence.enabled=true",
        "--set", "redis.persistence.enabled=true",
        "--set", "redis.existingSecret=store-password", "--set", "s3.existingSecret=s3-keys",
        "--set", "watch.clusterwide=false",
        "--set-string", "operator.extraEnv[0].name=EXTRA,operator.extraEnv[0].value=1",
    ).stdout)  # fmt: skip
    assert sorted(what for what, _ in pod_templates(rendered)) == sorted(
        [f"Deployment/{FULLNAME}-{c}" for c in ("operator", "selector", "redis", "minio")]
        + [f"Job/{FULLNAME}-minio-buckets"])
    assert refused_templates(admin, restricted_ns, rendered) == []


# -- printer columns --------------------------------------------------------------------------


def test_kubectl_get_prints_the_crd_columns(
    plane: ControlPlane, admin: Cluster, restricted_ns: str
) -> None:
    ns = restricted_ns
    plane.kubectl("apply", "--server-side", "-k", str(REPO / "crds"))
    for name in CRD_NAMES:
        admin.wait_for(lambda n=name: established(admin, n), what=f"CRD {name}")
    # The examples, as NOTES.txt and docs/install.md tell a user to try them.
    admin.wait_for(lambda: plane.kubectl(
        "apply", "-n", ns, "-f", str(REPO / "examples" / "modelexecutor.yaml"),
        "-f", str(REPO / "examples" / "client.yaml"), check=False).returncode == 0,
        what="the examples accepted (the CRDs' storage may still be initialising)")

    def get(*extra: str) -> list[tuple[list[str], list[dict[str, str]]]]:
        return tables(plane.kubectl("get", "modelexecutors,clients", "-n", ns, *extra).stdout)

    # No operator: the spec columns are filled, the status columns empty.
    (me_head, [me]), (cl_head, [cl]) = get()
    assert me_head == ["NAME", "MODEL", "VERSION", "TYPE", "READY", "REPLICAS", "REASON",
                       "ROLLOUT", "AGE"]
    assert cl_head == ["NAME", "TYPE", "SELECTED", "LATENCY-MS", "SCORE", "READY", "AGE"]
    assert me == {**me, "NAME": "modelexecutor.mulambda.io/half-plus-two",
                  "MODEL": "half_plus_two", "VERSION": "", "TYPE": "regression", "READY": "",
                  "REPLICAS": "", "REASON": "", "ROLLOUT": ""}
    assert cl == {**cl, "NAME": "client.mulambda.io/demo", "TYPE": "regression",
                  "SELECTED": "", "LATENCY-MS": "", "SCORE": "", "READY": ""}
    assert re.fullmatch(r"\d+[smh]\w*", me["AGE"]) and re.fullmatch(r"\d+[smh]\w*", cl["AGE"])
    # -o wide adds the priority-1 columns.
    (me_head, _), (cl_head, _) = get("-o", "wide")
    assert me_head == ["NAME", "MODEL", "VERSION", "TYPE", "READY", "REPLICAS", "REASON",
                       "ROLLOUT", "ENDPOINT", "AGE"]
    assert cl_head == ["NAME", "TYPE", "SELECTED", "LATENCY-MS", "SCORE", "READY", "REASON",
                       "AGE"]

    # A status as the operator writes it (through the status subresource): the server's
    # JSONPaths, including the conditions filter, pick it up.
    now = "2026-01-01T00:00:00Z"
    endpoint = {"rest": f"http://half-plus-two.{ns}.svc.cluster.local:8501",
                "grpc": f"half-plus-two.{ns}.svc.cluster.local:8500"}
    admin.patch("mulambda.io/v1alpha1", "modelexecutors", ns, "half-plus-two", {"status": {
        "replicaSummary": "1/2", "model": {"loadedVersion": "1", "state": "Available"},
        "endpoint": endpoint, "rollout": {"phase": "Progressing", "candidateVersion": 2},
        "conditions": [
            {"type": "Registered", "status": "True", "reason": "Registered",
             "lastTransitionTime": now},
            {"type": "Ready", "status": "True", "reason": "ModelServing",
             "lastTransitionTime": now}]}}, subresource="status")
    admin.patch("mulambda.io/v1alpha1", "clients", ns, "demo", {"status": {
        "selected": {"executor": f"{ns}/half-plus-two", "score": 0.875, "endpoint": endpoint,
                     "expectedLatencyMs": 12.5},
        "conditions": [{"type": "Ready", "status": "False", "reason": "NoCandidate",
                        "lastTransitionTime": now}]}}, subresource="status")
    (_, [me]), (_, [cl]) = get("-o", "wide")
    assert me == {**me, "VERSION": "1", "READY": "True", "REPLICAS": "1/2",
                  "REASON": "ModelServing", "ROLLOUT": "Progressing",
                  "ENDPOINT": endpoint["rest"]}
    assert cl == {**cl, "SELECTED": f"{ns}/half-plus-two", "LATENCY-MS": "12.5",
                  "SCORE": "0.875", "READY": "False", "REASON": "NoCandidate"}
