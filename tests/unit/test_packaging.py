"""Packaging and deployment: image, kustomize manifests, Helm chart, examples, RBAC.

Everything here runs offline: the chart is rendered with the real Helm
library (helm-python-sdk), the kustomizations with ``kubectl kustomize``, and
every object is validated strictly against the upstream Kubernetes schemas
(kubernetes-validate) or, for mulambda's own kinds, against the CRD's
openAPIV3Schema read with structural-schema semantics.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from mulambda import __version__
from mulambda.api.client import parse_client_spec
from mulambda.api.common import SpecError
from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.settings import DEFAULT_COMPANION_IMAGE, PREFIX, SETTINGS_DOC, Settings
from mulambda.store.acl import ROLES

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mulambda"
K8S_VERSION = "1.33"
RELEASE, NAMESPACE = "mulambda", "mulambda"
IMAGE_UID = 65532

Obj = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def load_rbac() -> ModuleType:
    """operator/rbac.py by path: it is importable as mulambda.operator.rbac only
    after a (strict) editable reinstall, and the file is what ships."""
    spec = importlib.util.spec_from_file_location("_mulambda_rbac", REPO / "operator" / "rbac.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RBAC = load_rbac()


def yaml_docs(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d]


@cache
def kustomize(path: str) -> tuple[Obj, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot build the kustomizations")
    out = subprocess.run(
        [kubectl, "kustomize", str(REPO / path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return tuple(yaml_docs(out.stdout))


@cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def render(values: Obj, namespace: str = NAMESPACE) -> list[Obj]:
    rendered = chart().render(values, name=RELEASE, namespace=namespace)
    docs: list[Obj] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(yaml_docs(text))
    return docs


def notes(values: Obj) -> str:
    rendered = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def find(docs: list[Obj] | tuple[Obj, ...], kind: str, name: str | None = None) -> list[Obj]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[Obj] | tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def crd_files() -> dict[str, bytes]:
    """The canonical CRD files (crds/kustomization.yaml is not one)."""
    return {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.mulambda.io.yaml"))}


@cache
def crd_schemas() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) -> JSON Schema of every served version of every canonical CRD."""
    schemas = {}
    for raw in crd_files().values():
        crd = yaml.safe_load(raw)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = structural_to_jsonschema(version["schema"]["openAPIV3Schema"])
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def structural_to_jsonschema(node: Obj) -> Obj:
    """Read an OpenAPI v3 structural schema the way the API server does.

    Unknown fields are rejected (as `kubectl apply` does with strict field
    validation) unless x-kubernetes-preserve-unknown-fields; int-or-string
    accepts both; OpenAPI 3.0's boolean exclusiveMinimum/Maximum and nullable
    become their JSON Schema forms. CEL rules (x-kubernetes-validations) are
    not evaluated here: the examples also go through mulambda.resources.
    """
    out: Obj = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: structural_to_jsonschema(v) for k, v in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_to_jsonschema(v) for v in value]
        elif key == "not":
            out[key] = structural_to_jsonschema(value)
        elif key.startswith("x-kubernetes-") or key in ("default", "nullable", "format"):
            continue
        else:
            out[key] = copy.deepcopy(value)
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True:
            out[bound] = out.pop(limit)
        elif node.get(bound) is False:
            out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def validate(obj: Obj) -> None:
    """Validate one object strictly: upstream schema, or its CRD's schema."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if key in crd_schemas():
        assert DNS_SUBDOMAIN.match(obj["metadata"]["name"]), obj["metadata"]["name"]
        jsonschema.Draft202012Validator(crd_schemas()[key]).validate(obj)
        return
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def canonical_rules(rules: list[Obj]) -> list[str]:
    """Rules as comparable strings; order of rules and of list entries is irrelevant."""
    return sorted(
        json.dumps({k: sorted(v) for k, v in rule.items()}, sort_keys=True) for rule in rules
    )


def pod_specs(docs: list[Obj] | tuple[Obj, ...]) -> Iterator[tuple[str, Obj]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def assert_hardened(docs: list[Obj] | tuple[Obj, ...]) -> None:
    specs = list(pod_specs(docs))
    assert specs, "no workloads rendered"
    for name, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["runAsUser"] != 0, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
            long_running = spec.get("restartPolicy", "Always") == "Always"  # not a Job
            if long_running and c in spec["containers"]:  # init containers finish
                assert "livenessProbe" in c and "readinessProbe" in c, where
            assert not c.get("image", "").endswith(":latest"), where


def assert_references_resolve(docs: list[Obj] | tuple[Obj, ...], external: set[str]) -> None:
    """ConfigMaps, Secrets, ServiceAccounts and PVCs a pod names exist (or are BYO)."""
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for name, spec in pod_specs(docs):
        sa = spec.get("serviceAccountName")
        if sa:
            assert ("ServiceAccount", sa) in names or sa in external, f"{name}: {sa}"
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names, f"{name}: {claim}"
            sources = [vol, *vol.get("projected", {}).get("sources", [])]
            for src in sources:
                if "configMap" in src:
                    cm = src["configMap"]["name"]
                    assert ("ConfigMap", cm) in names or cm in external, f"{name}: {vol}"
                if "secret" in src:
                    secret = src["secret"].get("secretName") or src["secret"]["name"]
                    assert ("Secret", secret) in names or secret in external, f"{name}: {vol}"
        for c in spec["containers"] + spec.get("initContainers", []):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert ("ConfigMap", src["configMapRef"]["name"]) in names, name
                if "secretRef" in src:
                    ref_name = src["secretRef"]["name"]
                    assert ("Secret", ref_name) in names or ref_name in external, name
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ("Secret", ref["name"]) in names or ref["name"] in external, name
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ("ConfigMap", ref["name"]) in names, name


def assert_services_select_pods(docs: list[Obj] | tuple[Obj, ...]) -> None:
    pods = {
        name: (d["spec"]["template"]["metadata"]["labels"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] == "Deployment"
        for name in [d["metadata"]["name"]]
    }
    for d in docs:
        if d["kind"] == "Deployment":
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in find(docs, "Service"):
        sel = svc["spec"]["selector"]
        matches = [n for n, (labels, _) in pods.items() if sel.items() <= labels.items()]
        assert len(matches) == 1, f"Service {svc['metadata']['name']} selects {matches}"
        ports = {p["name"] for c in pods[matches[0]][1]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, svc["metadata"]["name"]


def component(obj: Obj) -> str:
    return str(obj["metadata"].get("labels", {}).get("app.kubernetes.io/component", ""))


def rbac_rules(docs: list[Obj] | tuple[Obj, ...], of: str = "operator") -> list[Obj]:
    """The rules of the roles of one component (label app.kubernetes.io/component)."""
    roles = find(docs, "ClusterRole") + find(docs, "Role")
    return [rule for role in roles if component(role) == of for rule in role["rules"]]


# The selector verifies callers (mulambda/authz.py) and may do nothing else; tenants bind
# the caller role to select their namespace's Clients.
SELECTOR_REVIEW_RULES = [
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
     "verbs": ["create"]},
]
CLIENT_CALLER_RULES = [{"apiGroups": ["mulambda.io"], "resources": ["clients"],
                        "verbs": ["select"]}]


def assert_selector_reviews_callers(docs: list[Obj] | tuple[Obj, ...], prefix: str) -> None:
    """The selector's ServiceAccount: a mounted token and exactly create on the two reviews,
    cluster-wide; the caller role tenants bind grants select on clients and aggregates into
    admin and edit."""
    account = f"{prefix}-selector"
    (sa,) = [a for a in find(docs, "ServiceAccount") if a["metadata"]["name"] == account]
    assert sa.get("automountServiceAccountToken", True) is True
    spec = one(docs, "Deployment", account)["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == account
    assert spec.get("automountServiceAccountToken", True) is True
    assert canonical_rules(rbac_rules(docs, "selector")) == canonical_rules(SELECTOR_REVIEW_RULES)
    (review,) = [r for r in find(docs, "ClusterRole") if component(r) == "selector"]
    (binding,) = [b for b in find(docs, "ClusterRoleBinding")
                  if b["roleRef"]["name"] == review["metadata"]["name"]]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert not [b for b in find(docs, "RoleBinding") + find(docs, "ClusterRoleBinding")
                if any(s.get("name") == account for s in b["subjects"]) and b is not binding]
    (caller,) = [r for r in find(docs, "ClusterRole") if component(r) == "client-caller"]
    assert canonical_rules(caller["rules"]) == canonical_rules(CLIENT_CALLER_RULES)
    # What a Prometheus is bound to for the selector's /metrics; the release binds nobody.
    (reader,) = [r for r in find(docs, "ClusterRole") if component(r) == "metrics-reader"]
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    assert not [b for b in find(docs, "RoleBinding") + find(docs, "ClusterRoleBinding")
                if b["roleRef"]["name"] == reader["metadata"]["name"]]
    labels = caller["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert not [b for b in find(docs, "ClusterRoleBinding")
                if b["roleRef"]["name"] == caller["metadata"]["name"]], "tenants bind it"
    assert config_data(docs)["MULAMBDA_SELECTOR_AUTH"] == "true"


def config_data(docs: list[Obj] | tuple[Obj, ...]) -> dict[str, str]:
    (cm,) = [c for c in find(docs, "ConfigMap") if c["metadata"]["name"].endswith("-config")]
    return dict(cm["data"])


def container(docs: list[Obj] | tuple[Obj, ...], deployment: str) -> Obj:
    spec = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    return spec["containers"][0]


# --------------------------------------------------------------------------- operator RBAC


def test_required_rules_are_least_privilege() -> None:
    resources = set()
    for rule in RBAC.REQUIRED_RULES:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for field in rule.values():
            assert field and "*" not in field, rule
        assert not {"update", "escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
        resources |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    # Secrets: create only (executors' heartbeat keys), never read back.
    assert [r["verbs"] for r in RBAC.REQUIRED_RULES if "secrets" in r["resources"]] == [
        ["create"]]
    assert ("", "pods") not in resources
    assert ("kopf.dev", "kopfpeerings") not in resources
    needed = {
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("mulambda.io", "modelexecutors"),
        ("mulambda.io", "clients"),
        ("mulambda.io", "modelexecutors/status"),
        ("mulambda.io", "clients/status"),
        ("apps", "deployments"),
        ("", "services"),
        ("", "secrets"),
        ("", "events"),
    }
    assert needed <= resources


def test_rules_split_into_cluster_scoped_and_namespaced() -> None:
    cluster, namespaced = RBAC.cluster_scoped_rules(), RBAC.namespaced_rules()
    assert canonical_rules(cluster + namespaced) == canonical_rules(RBAC.REQUIRED_RULES)
    assert [r["resources"] for r in cluster] == [["customresourcedefinitions"]]
    # Watching a list of namespaces adds kopf's namespace observer, cluster-wide.
    assert [r["resources"] for r in RBAC.cluster_scoped_rules(clusterwide=False)] == [
        ["customresourcedefinitions"], ["namespaces"]]


# --------------------------------------------------------------------------- image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copy_sources() -> list[str]:
    sources = []
    for word, rest in dockerfile_instructions():
        if word != "COPY" or "--from" in rest:
            continue
        args = [a for a in rest.split() if not a.startswith("--")]
        sources.extend(args[:-1])
    return sources


def test_dockerfile_copies_only_files_that_exist_and_are_in_the_build_context() -> None:
    allowed = {
        line[1:].strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    first = next(line for line in (REPO / ".dockerignore").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert first == "*", ".dockerignore should be an allow-list starting with *"
    sources = copy_sources()
    assert sources
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile COPYs {src}, which does not exist"
        assert src.rstrip("/").split("/")[0] in allowed, f"{src} is excluded by .dockerignore"


def test_image_ships_every_package_dir_and_the_readme() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    needed |= {"pyproject.toml", project["project"]["readme"]}
    copied = {s.rstrip("/").split("/")[0] for s in copy_sources()}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"


def test_every_package_of_the_checkout_is_installed() -> None:
    """A package missing from ``packages`` works in the development install (symlinks)
    and is absent from the wheel and the image: every folder with an __init__.py under
    a package-dir root must be listed."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            found.add(".".join((name, *parts)))
    assert found - set(setuptools["packages"]) == set()


def test_image_is_slim_non_root_and_runs_mulambda() -> None:
    instructions = dockerfile_instructions()
    final = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    last_stage = instructions[final:]
    args = dict(a.split("=", 1) for w, a in instructions if w == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    users = [rest for word, rest in last_stage if word == "USER"]
    assert users == [f"{IMAGE_UID}:{IMAGE_UID}"]
    assert json.loads(dict(last_stage)["ENTRYPOINT"]) == ["mulambda"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "mulambda" in project["project"]["scripts"]
    installs = " ".join(rest for word, rest in instructions if word == "RUN" and "pip" in rest)
    # No extras (the grpc extra is TensorFlow) and nothing TensorFlow-shaped.
    assert installs and not re.search(r"(\.|mulambda)\[", installs), installs
    assert "tensorflow" not in installs.lower() and "grpc" not in installs.lower()


def test_deployment_args_parse_with_the_real_cli() -> None:
    from mulambda.cli import build_parser

    docs = list(kustomize("manifests/base")) + render(SCENARIOS["namespaced"])
    for d in find(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["name"] not in ("operator", "selector"):
                continue
            args = build_parser(c["args"][0]).parse_args(c["args"])
            if getattr(args, "_missing", False):
                pytest.skip(f"mulambda {c['name']} is not importable here: reinstall (make dev)")
            if c["name"] == "operator":
                port = int(args.liveness.rsplit(":", 1)[1].split("/")[0])
                probe = c["livenessProbe"]["httpGet"]
                assert probe["path"] == "/healthz" and args.liveness.endswith("/healthz")
                assert {"name": "health", "containerPort": port, "protocol": "TCP"} in c["ports"]
            else:
                assert {"name": "http", "containerPort": args.port, "protocol": "TCP"} in c["ports"]


# --------------------------------------------------------------------------- CRD copies


def test_the_chart_crds_are_byte_identical_copies() -> None:
    copies = {p.name: p.read_bytes() for p in sorted((REPO / "charts/mulambda/crds").glob("*"))}
    assert copies == crd_files(), "charts/mulambda/crds differs: cp crds/*.mulambda.io.yaml there"


def test_crds_have_one_canonical_copy_outside_the_chart() -> None:
    # kustomize includes crds/ as a base; a second copy would drift.
    copies = [p for p in REPO.glob("manifests/**/*.yaml")
              for d in yaml.safe_load_all(p.read_text())
              if d and d.get("kind") == "CustomResourceDefinition"]
    assert copies == []


def test_helm_sees_the_chart_crds() -> None:
    names = {Path(c["name"]).name for c in chart().crds}
    assert names == set(crd_files())


def test_crds_validate_against_upstream_schema() -> None:
    for raw in crd_files().values():
        kubernetes_validate.validate(yaml.safe_load(raw), K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- kustomize


@pytest.mark.parametrize("path", ["manifests/base", "manifests/overlays/dev"])
def test_kustomization_objects_validate_strictly(path: str) -> None:
    docs = kustomize(path)
    assert len(docs) > 10
    for d in docs:
        validate(d)


@pytest.mark.parametrize("path", ["manifests/base", "manifests/overlays/dev"])
def test_kustomization_is_hardened_and_consistent(path: str) -> None:
    docs = kustomize(path)
    assert_hardened(docs)
    assert_services_select_pods(docs)
    # The base leaves the S3 Secret to the user; the dev overlay ships one. The store
    # creates its users' Secrets (and the operator's heartbeat secret) at its first
    # start; Kubernetes puts kube-root-ca.crt in every namespace.
    external = ({f"mulambda-store-{role}" for role in ROLES}
                | {"kube-root-ca.crt", "mulambda-heartbeat"})
    if path.endswith("base"):
        external.add("mulambda-s3")
    assert_references_resolve(docs, external)
    for d in docs:
        if d["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole",
                             "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]


@pytest.mark.parametrize("path", ["manifests/base", "manifests/overlays/dev"])
def test_kustomization_grants_exactly_the_required_rules(path: str) -> None:
    docs = kustomize(path)
    assert canonical_rules(rbac_rules(docs)) == canonical_rules(RBAC.REQUIRED_RULES)
    operator_bindings = [b for b in find(docs, "ClusterRoleBinding") if component(b) == "operator"]
    bound = {b["roleRef"]["name"] for b in operator_bindings}
    assert bound == {r["metadata"]["name"] for r in find(docs, "ClusterRole")
                     if component(r) == "operator"}
    assert {component(r) for r in find(docs, "ClusterRole")} == {
        "operator", "selector", "client-caller", "metrics-reader"}
    assert_selector_reviews_callers(docs, "mulambda")
    for b in operator_bindings:
        assert b["subjects"] == [
            {"kind": "ServiceAccount", "name": "mulambda-operator", "namespace": NAMESPACE}
        ]
    # The one namespaced Role: the store's init container creates and reads its users'
    # Secrets and the operator's heartbeat secret, nothing else; bound to the store's own
    # ServiceAccount only.
    (role,) = find(docs, "Role")
    secrets = sorted([*(f"mulambda-store-{r}" for r in ROLES), "mulambda-heartbeat"])
    assert canonical_rules(role["rules"]) == canonical_rules([
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
         "resourceNames": secrets}])
    (binding,) = find(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mulambda-store", "namespace": NAMESPACE}]


def test_kustomize_base_config_matches_the_code_defaults() -> None:
    docs = kustomize("manifests/base")
    data = config_data(docs)
    assert set(data) == {PREFIX + k for k in SETTINGS_DOC}
    store = one(docs, "Service", "mulambda-redis")
    for key, (default, _) in SETTINGS_DOC.items():
        if key == "REDIS_URL":  # the companions' user: the operator copies the URL to them
            assert data[PREFIX + key] == (
                f"redis://mulambda-companion@{store['metadata']['name']}.{NAMESPACE}.svc:6379/0")
        elif key == "REDIS_SECRET":
            assert data[PREFIX + key] == "mulambda-store-companion"
        else:
            assert data[PREFIX + key] == default, key
    Settings.from_env(data)  # every value parses


def test_kustomize_base_runs_the_operator_clusterwide_standalone_with_liveness() -> None:
    docs = kustomize("manifests/base")
    op = container(docs, "mulambda-operator")
    assert op["args"] == ["operator", "--liveness=http://0.0.0.0:8080/healthz",
                          "--metrics-port=9090"]
    assert op["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"},
                           {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert op["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert one(docs, "Deployment", "mulambda-operator")["spec"]["replicas"] == 1
    assert container(docs, "mulambda-selector")["args"] == ["selector"]
    for name in ("mulambda-operator", "mulambda-selector"):
        assert container(docs, name)["image"] == DEFAULT_COMPANION_IMAGE
        spec = one(docs, "Deployment", name)["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == IMAGE_UID
    assert not find(docs, "Secret"), "the base must not ship credentials"


def test_dev_overlay_adds_minio_with_clearly_dev_only_credentials() -> None:
    docs = kustomize("manifests/overlays/dev")
    secret = one(docs, "Secret")
    assert secret["metadata"]["name"] == config_data(docs)["MULAMBDA_S3_SECRET"]
    assert set(secret["stringData"]) == {"accessKey", "secretKey"}
    assert secret["metadata"]["labels"]["mulambda.io/dev-only"] == "true"
    minio = one(docs, "Service", "minio")
    host, port = config_data(docs)["MULAMBDA_S3_ENDPOINT"].split(":")
    assert host == f"{minio['metadata']['name']}.{NAMESPACE}.svc"
    assert int(port) in {p["port"] for p in minio["spec"]["ports"]}
    (job,) = find(docs, "Job")
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    executor = next(d for ds in examples().values() for d in ds if d["kind"] == "ModelExecutor")
    assert executor["spec"]["model"]["storageUri"].split("/")[2] in env["BUCKETS"].split(",")
    base_names = {(d["kind"], d["metadata"]["name"]) for d in kustomize("manifests/base")}
    assert base_names <= {(d["kind"], d["metadata"]["name"]) for d in docs}


def test_kustomize_crds_are_the_canonical_ones() -> None:
    canonical = {yaml.safe_load(raw)["metadata"]["name"]: yaml.safe_load(raw)
                 for raw in crd_files().values()}
    for path in ("manifests/base", "manifests/overlays/dev"):
        crds = {d["metadata"]["name"]: d for d in find(kustomize(path), "CustomResourceDefinition")}
        assert set(crds) == set(canonical)
        for name, crd in crds.items():
            assert crd["spec"] == canonical[name]["spec"]


# --------------------------------------------------------------------------- Helm chart

SCENARIOS: dict[str, Obj] = {
    "defaults": {},
    "byo-redis": {"redis": {"enabled": False, "url": "redis://my-redis.db.svc:6379/2"}},
    "byo-redis-with-password": {
        "redis": {"enabled": False, "url": "redis://my-redis.db.svc:6379/2",
                  "existingSecret": "store-auth", "acl": {"enabled": False}},
        "operator": {"extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]},
    },
    "store-shared-password": {"redis": {"acl": {"enabled": False}, "existingSecret": "store-auth"}},
    "acl-namespaces": {
        "redis": {"acl": {"executorNamespaces": ["ml", "ml-gpu"], "clientNamespaces": ["apps"]}},
    },
    "byo-s3": {
        "s3": {"endpoint": "s3.example.com:443", "secure": True, "region": "eu-west-1",
               "existingSecret": "team-s3"},
    },
    "minio": {"minio": {"enabled": True}},
    "store-persistent": {
        "redis": {"persistence": {"enabled": True, "size": "2Gi", "storageClass": "standard"}},
    },
    "minio-persistent-byo-secret": {
        "minio": {"enabled": True, "persistence": {"enabled": True, "size": "20Gi",
                                                   "storageClass": "standard"}},
        "s3": {"existingSecret": "team-s3"},
    },
    "namespaced": {"watch": {"clusterwide": False, "namespaces": ["team-a", "team-b"]}},
    "namespaced-release-namespace": {"watch": {"clusterwide": False, "namespaces": []}},
    "custom-images": {
        "image": {"repository": "registry.example.com/ml/mulambda", "tag": "1.2.3",
                  "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "servingImage": "registry.example.com/tf/serving:2.18.0-gpu",
        "redis": {"image": {"repository": "redis", "tag": "7.2-alpine", "pullPolicy": "Always"}},
    },
    "tuned": {
        "fullnameOverride": "ml",
        "serviceAccount": {"create": False, "name": "ml-operator-sa"},
        "selector": {"replicas": 3, "service": {"type": "NodePort", "nodePort": 30080},
                     "extraArgs": ["--predict-timeout=10"],
                     "extraEnv": [{"name": "MULAMBDA_TASK_TTL_SECONDS", "value": "60"}]},
        "settings": {"logLevel": "DEBUG", "keyPrefix": "team", "heartbeatTtlSeconds": 12.5},
        "operator": {"extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
                     "nodeSelector": {"kubernetes.io/os": "linux"},
                     "tolerations": [{"key": "ml", "operator": "Exists"}]},
    },
    "no-selector": {"selector": {"enabled": False}},
}


def merged(values: Obj) -> Obj:
    return chart().merge_values(values)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_renders_valid_hardened_objects(scenario: str) -> None:
    values = SCENARIOS[scenario]
    docs = render(values)
    for d in docs:
        validate(d)
    assert_hardened(docs)
    assert_services_select_pods(docs)
    v = merged(values)
    external = {v["s3"]["existingSecret"], v["redis"]["existingSecret"],
                v["serviceAccount"]["name"]} - {""}
    if not v["minio"]["enabled"]:
        external.add(config_data(docs)["MULAMBDA_S3_SECRET"])
    assert_references_resolve(docs, external)
    watched = set(v["watch"]["namespaces"]) or {NAMESPACE}
    acl = v["redis"]["acl"]
    copies = {  # store-credentials Secrets go where a pod needs them (store-users.yaml)
        "companion": {NAMESPACE, *(acl["executorNamespaces"] or (
            [] if v["watch"]["clusterwide"] else v["watch"]["namespaces"]))},
        "client": {NAMESPACE, *acl["clientNamespaces"]},
    }
    for d in docs:
        ns = d["metadata"].get("namespace")
        role = d["metadata"].get("labels", {}).get("mulambda.io/store-role")
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            assert ns is None
        elif d["kind"] == "RoleBinding":
            assert ns in watched
        elif d["kind"] == "Secret" and role:
            assert ns in copies.get(role, {NAMESPACE}), (role, ns)
        else:
            assert ns == NAMESPACE, f"{d['kind']} {d['metadata']['name']}"
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_grants_exactly_the_required_rules(scenario: str) -> None:
    values = SCENARIOS[scenario]
    docs = render(values)
    v = merged(values)
    clusterwide = v["watch"]["clusterwide"]
    assert canonical_rules(rbac_rules(docs)) == canonical_rules(RBAC.rules_for(clusterwide))
    roles = {r["metadata"]["name"]: r["rules"] for r in find(docs, "ClusterRole")}
    cluster_role = next(
        n for n, rules in roles.items()
        if canonical_rules(rules) == canonical_rules(RBAC.cluster_scoped_rules(clusterwide)))
    ns_role = next(n for n, rules in roles.items()
                   if canonical_rules(rules) == canonical_rules(RBAC.namespaced_rules()))
    sa = v["serviceAccount"]["name"] or f"{RELEASE}-operator"
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    crbs = {b["roleRef"]["name"]: b for b in find(docs, "ClusterRoleBinding")
            if component(b) == "operator"}
    if v["selector"]["enabled"]:
        assert_selector_reviews_callers(docs, v["fullnameOverride"] or RELEASE)
    else:
        assert not rbac_rules(docs, "selector") and not rbac_rules(docs, "client-caller")
    rbs = find(docs, "RoleBinding")
    assert crbs[cluster_role]["subjects"] == subject
    args = container(docs, next(d["metadata"]["name"] for d in find(docs, "Deployment")
                                if d["metadata"]["name"].endswith("-operator")))["args"]
    if v["watch"]["clusterwide"]:
        assert crbs[ns_role]["subjects"] == subject and not rbs
        assert not [a for a in args if a.startswith(("-n", "--namespace"))]
    else:
        assert ns_role not in crbs, "namespaced mode must not grant the rules cluster-wide"
        watched = v["watch"]["namespaces"] or [NAMESPACE]
        assert sorted(b["metadata"]["namespace"] for b in rbs) == sorted(watched)
        for b in rbs:
            assert b["roleRef"]["name"] == ns_role and b["subjects"] == subject
        assert sorted(a for a in args if a.startswith("--namespace=")) == sorted(
            f"--namespace={ns}" for ns in watched
        )


def test_chart_without_rbac_renders_no_roles() -> None:
    docs = render({"rbac": {"create": False}})
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")


def test_chart_selector_without_auth_has_no_token_and_no_api_access() -> None:
    docs = render({"selector": {"auth": {"enabled": False}}})
    assert config_data(docs)["MULAMBDA_SELECTOR_AUTH"] == "false"
    (sa,) = [a for a in find(docs, "ServiceAccount") if component(a) == "selector"]
    assert sa["automountServiceAccountToken"] is False
    spec = one(docs, "Deployment", "mulambda-selector")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert not rbac_rules(docs, "selector")
    assert not [b for b in find(docs, "ClusterRoleBinding") if component(b) == "selector"]
    # Tenants may bind the caller role ahead of turning authorization on.
    assert canonical_rules(rbac_rules(docs, "client-caller")) == canonical_rules(
        CLIENT_CALLER_RULES)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_config_carries_every_setting(scenario: str) -> None:
    values = SCENARIOS[scenario]
    docs = render(values)
    v = merged(values)
    data = config_data(docs)
    assert set(data) == {PREFIX + k for k in SETTINGS_DOC}
    settings = Settings.from_env(data)
    image = f"{v['image']['repository']}:{v['image']['tag'] or __version__}"
    assert settings.companion_image == image
    assert settings.image_pull_policy == v["image"]["pullPolicy"]
    assert settings.serving_image == v["servingImage"]
    assert settings.log_level == v["settings"]["logLevel"]
    assert settings.key_prefix == v["settings"]["keyPrefix"]
    assert settings.heartbeat_ttl_seconds == float(v["settings"]["heartbeatTtlSeconds"])
    for d in find(docs, "Deployment"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            if c["name"] in ("operator", "selector"):
                assert c["image"] == image and c["imagePullPolicy"] == v["image"]["pullPolicy"]
    # With per-role users the URL names the companions' user (the operator copies it
    # into executor pods); the operator and the selector log in as themselves.
    user = "mulambda-companion@" if v["redis"]["acl"]["enabled"] else ""
    if v["redis"]["enabled"]:
        store = next(s for s in find(docs, "Service") if s["metadata"]["name"].endswith("-redis"))
        host = f"{store['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        assert settings.redis_url == f"redis://{user}{host}:6379/0"
        redis_image = container(docs, store["metadata"]["name"])["image"]
        assert redis_image == f"{v['redis']['image']['repository']}:{v['redis']['image']['tag']}"
    else:
        assert settings.redis_url == v["redis"]["url"].replace("redis://", f"redis://{user}")
        assert not any(d["metadata"]["name"].endswith("-redis") for d in docs)
    fullname = v["fullnameOverride"] or RELEASE
    if v["redis"]["acl"]["enabled"]:
        assert settings.redis_secret == f"{fullname}-store-companion"
        assert settings.redis_client_secret == (
            f"{fullname}-store-client" if v["redis"]["acl"]["clientNamespaces"] else "")
        # Where store-users.yaml put a copy of that Secret, and only where the store's
        # NetworkPolicy admits Client workloads (not the release namespace).
        copies = {d["metadata"]["namespace"] for d in find(docs, "Secret")
                  if d["metadata"]["labels"].get("mulambda.io/store-role") == "client"}
        listed = set(filter(None, settings.redis_client_namespaces.split(",")))
        assert listed == set(v["redis"]["acl"]["clientNamespaces"]) <= copies
    else:
        assert settings.redis_secret == v["redis"]["existingSecret"]
        assert settings.redis_client_secret == ""
    if v["selector"]["enabled"]:
        svc = next(s for s in find(docs, "Service") if s["metadata"]["name"].endswith("-selector"))
        host = f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        assert settings.selector_url == f"http://{host}:{svc['spec']['ports'][0]['port']}"
    else:
        assert data["MULAMBDA_SELECTOR_URL"] == "" and settings.selector_url == ""
    secret_name = v["s3"]["existingSecret"] or f"{fullname}-s3"
    assert settings.s3_secret == secret_name
    # The operator's pods pull with the chart's Secrets too.
    assert settings.pull_secrets() == [{"name": s["name"]} for s in v["imagePullSecrets"]]
    assert settings.s3_secure is v["s3"]["secure"] and settings.s3_region == v["s3"]["region"]
    if v["s3"]["endpoint"]:
        assert settings.s3_endpoint == v["s3"]["endpoint"]
    elif v["minio"]["enabled"]:
        minio = next(s for s in find(docs, "Service") if s["metadata"]["name"].endswith("-minio"))
        host = f"{minio['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        assert settings.s3_endpoint == f"{host}:9000"
    else:
        assert data["MULAMBDA_S3_ENDPOINT"] == ""
        assert "no S3 endpoint is configured" in notes(values)


def test_chart_defaults_equal_the_code_defaults() -> None:
    data = config_data(render({}))
    expected = Settings(redis_url=data["MULAMBDA_REDIS_URL"],
                        redis_secret=data["MULAMBDA_REDIS_SECRET"],
                        selector_url=data["MULAMBDA_SELECTOR_URL"])
    assert Settings.from_env(data) == expected
    assert DEFAULT_COMPANION_IMAGE == f"{chart().values['image']['repository']}:{__version__}"


@pytest.mark.parametrize("scenario", ["minio", "minio-persistent-byo-secret", "defaults", "byo-s3"])
def test_chart_creates_the_s3_secret_only_for_its_own_minio(scenario: str) -> None:
    values = SCENARIOS[scenario]
    docs = render(values)
    v = merged(values)
    secrets = [d for d in find(docs, "Secret")
               if d["metadata"]["labels"]["app.kubernetes.io/component"] not in (
                   "store-credentials", "heartbeat-key")]
    if v["minio"]["enabled"] and not v["s3"]["existingSecret"]:
        (secret,) = secrets
        assert set(secret["data"]) == {"accessKey", "secretKey"}
        assert secret["metadata"]["labels"]["mulambda.io/dev-only"] == "true"
        assert "DEV-ONLY" in notes(values)
    else:
        assert not secrets
    pvcs = find(docs, "PersistentVolumeClaim")
    assert len(pvcs) == int(v["minio"]["enabled"] and v["minio"]["persistence"]["enabled"])


BUCKET_ARGS = ["models", "mb", "$(BUCKETS)"]  # `mulambda models mb`, BUCKETS expanded by k8s


def test_chart_and_overlay_bucket_jobs_run_the_same_command() -> None:
    (chart_job,) = find(render(SCENARIOS["minio"]), "Job")
    (dev_job,) = find(kustomize("manifests/overlays/dev"), "Job")
    for job in (chart_job, dev_job):
        (c,) = job["spec"]["template"]["spec"]["containers"]
        assert "command" not in c  # the image's entry point, mulambda
        assert c["args"] == BUCKET_ARGS


@pytest.mark.parametrize("scenario", ["minio", "minio-persistent-byo-secret", "defaults"])
def test_chart_creates_the_model_bucket_with_its_minio(scenario: str) -> None:
    values = SCENARIOS[scenario]
    v = merged(values)
    jobs = find(render(values), "Job")
    if not v["minio"]["enabled"]:
        assert not jobs
        return
    (job,) = jobs
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == BUCKET_ARGS
    env = {e["name"]: e for e in c["env"]}
    executor = next(d for ds in examples().values() for d in ds if d["kind"] == "ModelExecutor")
    assert executor["spec"]["model"]["storageUri"].split("/")[2] in env["BUCKETS"]["value"]
    minio = next(s for s in find(render(values), "Service")
                 if s["metadata"]["name"].endswith("-minio"))
    assert env["MULAMBDA_S3_ENDPOINT"]["value"].startswith(f"{minio['metadata']['name']}.")
    secret = v["s3"]["existingSecret"] or f"{RELEASE}-s3"
    assert env["MULAMBDA_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": secret, "key": "accessKey"}


def test_names_that_become_label_values_fit_with_the_longest_release_name() -> None:
    # A Job's and a Service's names end up in label values (63 characters at most): a
    # 52-character release name made the bucket Job's 64, and the API server refused it.
    release = "mulambda-ml-platform-production-europe-west4-primary"
    rendered = chart().render({"minio": {"enabled": True}}, name=release, namespace=NAMESPACE)
    docs = [d for path, text in rendered.items() if not path.endswith(".txt")
            for d in yaml_docs(text)]
    (job,) = find(docs, "Job")
    assert len(job["metadata"]["name"]) <= 63
    for d in docs:
        if d["kind"] in ("Service", "Job"):
            assert len(d["metadata"]["name"]) <= 63, d["metadata"]["name"]


def test_bucket_job_command_waits_for_s3_then_creates_each_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mulambda.storage.s3
    from mulambda.cli import main

    calls: list[str] = []

    class FlakyStorage:
        def make_bucket(self, bucket: str) -> bool:
            calls.append(bucket)
            if len(calls) == 1:
                raise ConnectionRefusedError("MinIO is starting")
            return True

        def close(self) -> None:
            pass

    monkeypatch.setattr(mulambda.storage.s3.ModelStorage, "from_env",
                        classmethod(lambda cls, **kwargs: FlakyStorage()))
    monkeypatch.setattr("time.sleep", lambda _: None)
    # What the Job runs once Kubernetes has expanded $(BUCKETS).
    assert main([*BUCKET_ARGS[:-1], "models,extra"]) == 0
    assert calls == ["models", "models", "extra"]


def test_chart_passes_the_selector_its_own_settings_and_options() -> None:
    selector = container(render(SCENARIOS["tuned"]), "ml-selector")  # fullnameOverride
    assert selector["args"] == ["selector", "--predict-timeout=10"]
    env = {e["name"]: e for e in selector["env"]}
    assert env["MULAMBDA_TASK_TTL_SECONDS"] == {"name": "MULAMBDA_TASK_TTL_SECONDS",
                                                "value": "60"}
    assert "MULAMBDA_REDIS_PASSWORD" in env  # its store login stays
    plain = container(render({"redis": {"acl": {"enabled": False}}}), "mulambda-selector")
    assert plain["args"] == ["selector"] and not plain.get("env")


def test_chart_store_password_only_through_the_secret() -> None:
    # Per-role users off: one shared password, from redis.existingSecret only.
    docs = render(SCENARIOS["byo-redis-with-password"])
    for name in ("mulambda-operator", "mulambda-selector"):
        env = {e["name"]: e for e in container(docs, name).get("env", [])}
        ref = env["MULAMBDA_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "store-auth", "key": "password"}
        assert "MULAMBDA_REDIS_USERNAME" not in env
    assert "HTTPS_PROXY" in {e["name"] for e in container(docs, "mulambda-operator")["env"]}
    assert config_data(docs)["MULAMBDA_REDIS_SECRET"] == "store-auth"
    assert "store-auth" not in config_data(docs)["MULAMBDA_REDIS_URL"]
    components = {d["metadata"]["labels"].get("app.kubernetes.io/component")
                  for d in find(docs, "Secret")}
    assert "store-credentials" not in components
    assert "WARNING: redis.acl.enabled is false" in notes(SCENARIOS["byo-redis-with-password"])
    assert "NO password" in notes({"redis": {"acl": {"enabled": False}}})


def _store_secrets(docs: list[Obj]) -> dict[tuple[str, str], dict[str, str]]:
    """(role, namespace) -> decoded data of the chart's store-credentials Secrets."""
    return {(d["metadata"]["labels"]["mulambda.io/store-role"], d["metadata"]["namespace"]):
            {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
            for d in find(docs, "Secret")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "store-credentials"}


@pytest.mark.parametrize("scenario", ["defaults", "acl-namespaces", "byo-redis", "tuned"])
def test_chart_gives_each_role_its_own_generated_store_user(scenario: str) -> None:
    values = SCENARIOS[scenario]
    docs = render(values)
    v = merged(values)
    fullname = v["fullnameOverride"] or RELEASE
    secrets = _store_secrets(docs)
    acl = v["redis"]["acl"]
    executor_ns = {NAMESPACE, *acl["executorNamespaces"]}
    expected = {(role, NAMESPACE) for role in ROLES}
    expected |= {("companion", ns) for ns in executor_ns}
    expected |= {("client", ns) for ns in acl["clientNamespaces"]}
    assert set(secrets) == expected
    for (role, _ns), data in secrets.items():
        assert data["username"] == ROLES[role].username
        assert len(data["password"]) >= 32
        assert data["password"] == secrets[(role, NAMESPACE)]["password"]  # copies agree
    assert len({secrets[(r, NAMESPACE)]["password"] for r in ROLES}) == len(ROLES)
    # Generated, not fixed: another render (no cluster to look up) gives others.
    again = _store_secrets(render(values))
    assert all(again[k]["password"] != secrets[k]["password"] for k in secrets)
    # Each process logs in as its own role, from its own Secret.
    for component, role in (("operator", "operator"), ("selector", "selector")):
        env = {e["name"]: e for e in container(docs, f"{fullname}-{component}").get("env", [])}
        for var, key in (("MULAMBDA_REDIS_USERNAME", "username"),
                         ("MULAMBDA_REDIS_PASSWORD", "password")):
            assert env[var]["valueFrom"]["secretKeyRef"] == {
                "name": f"{fullname}-store-{role}", "key": key}, (component, var)
    # Nobody else's Secret is mounted or referenced by a pod of the chart.
    text = json.dumps([d for d in docs if d["kind"] == "Deployment"
                       and not d["metadata"]["name"].endswith("-redis")])
    for role in ("companion", "sdk", "client"):
        assert f"{fullname}-store-{role}" not in text, role


@pytest.mark.parametrize("scenario", ["defaults", "acl-namespaces"])
def test_chart_pods_roll_on_the_store_passwords_and_on_nothing_else(scenario: str) -> None:
    # The store, operator and selector carry one checksum of the passwords their Secrets
    # hold in the same render. Of the rendered store-users.yaml, it was the first
    # install's generated passwords drawn again for each checksum (so the first upgrade
    # restarted the store, empty), and any namespace given a copy of a Secret.
    docs = render(SCENARIOS[scenario])
    secrets = _store_secrets(docs)
    order = ("operator", "selector", "companion", "sdk", "client")  # "mulambda.storeRoles"
    assert set(order) == set(ROLES)
    want = hashlib.sha256("\n".join(f"{role} {secrets[(role, NAMESPACE)]['password']}"
                                     for role in order).encode()).hexdigest()
    for component in ("redis", "operator", "selector"):
        annotations = one(docs, "Deployment", f"mulambda-{component}")["spec"]["template"][
            "metadata"]["annotations"]
        assert annotations["checksum/store-users"] == want, component


def test_chart_store_loads_an_acl_file_from_the_role_secrets() -> None:
    docs = render({})
    spec = one(docs, "Deployment", "mulambda-redis")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["command"][:3] == ["python", "-m", "mulambda.store.acl"]
    assert "--aclfile /etc/mulambda-store/users.acl" in spec["containers"][0]["args"][0]
    assert spec["automountServiceAccountToken"] is False
    (users,) = [vol for vol in spec["volumes"] if vol["name"] == "users"]
    assert sorted(src["secret"]["name"] for src in users["projected"]["sources"]) == sorted(
        f"mulambda-store-{role}" for role in ROLES)
    # Only the init container sees the passwords; the store sees the ACL file.
    assert [m["name"] for m in spec["containers"][0]["volumeMounts"]] == ["data", "acl"]
    # Without per-role users nothing of this is rendered.
    plain = one(render({"redis": {"acl": {"enabled": False}}}), "Deployment", "mulambda-redis")
    assert "initContainers" not in plain["spec"]["template"]["spec"]


def test_a_claim_without_a_bundled_store_needs_no_append_only_file() -> None:
    # redis.persistence is about the bundled store: with your own, the values are unused.
    values = {"redis": {"enabled": False, "url": "redis://db:6379/0", "appendOnly": False,
                        "persistence": {"enabled": True}}}
    jsonschema.Draft7Validator(values_schema()).validate(merged(values))
    assert find(render(values), "PersistentVolumeClaim") == []


@pytest.mark.parametrize(("scenario", "claim"), [
    pytest.param("defaults", None, id="emptydir"),
    pytest.param("store-persistent", ("2Gi", "standard"), id="claim"),
])
def test_chart_store_keeps_its_append_only_file_on_a_claim_when_asked(
        scenario: str, claim: tuple[str, str] | None) -> None:
    docs = render(SCENARIOS[scenario])
    store = one(docs, "Deployment", "mulambda-redis")
    spec = store["spec"]["template"]["spec"]
    assert "--appendonly yes" in spec["containers"][0]["args"][0]
    assert "--dir /data" in spec["containers"][0]["args"][0]
    (data,) = [v for v in spec["volumes"] if v["name"] == "data"]
    claims = [d for d in find(docs, "PersistentVolumeClaim")
              if d["metadata"]["labels"]["app.kubernetes.io/component"] == "store"]
    if claim is None:
        assert data == {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}
        assert claims == []
        return
    (pvc,) = claims
    assert data == {"name": "data",
                    "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}
    assert (pvc["spec"]["resources"]["requests"]["storage"],
            pvc["spec"]["storageClassName"]) == claim
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    # One pod at a time on a ReadWriteOnce claim: the old one goes before the new starts.
    assert store["spec"]["strategy"] == {"type": "Recreate"}


def test_chart_selector_node_port() -> None:
    svc = one(render(SCENARIOS["tuned"]), "Service", "ml-selector")
    assert svc["spec"]["type"] == "NodePort"
    assert svc["spec"]["ports"][0]["nodePort"] == 30080
    kind = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    mapped = {m["containerPort"] for n in kind["nodes"] for m in n.get("extraPortMappings", [])}
    assert 30080 in mapped


@pytest.mark.parametrize("scenario", ["defaults", "minio", "namespaced", "byo-redis"])
def test_chart_passes_helm_lint(scenario: str) -> None:
    report = helm_python.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE,
                              kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_chart_metadata_matches_the_package() -> None:
    meta = chart().metadata
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["appVersion"] == __version__ == project["project"]["version"]
    assert meta["apiVersion"] == "v2" and meta["name"] == "mulambda"


# --------------------------------------------------------------------------- values schema


def values_schema() -> Obj:
    return json.loads((CHART / "values.schema.json").read_text())


def test_values_yaml_validates_against_the_schema() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(values_schema())
    jsonschema.Draft7Validator(values_schema()).validate(values)
    for scenario in SCENARIOS.values():
        chart().validate_schema(scenario)  # Helm's own validator, on merged values
        jsonschema.Draft7Validator(values_schema()).validate(merged(scenario))


BAD_VALUES: dict[str, Obj] = {
    "byo-redis-without-url": {"redis": {"enabled": False}},
    "unknown-top-level-key": {"replicas": 2},
    "typo-in-nested-key": {"minio": {"enable": True}},
    "bad-log-level": {"settings": {"logLevel": "LOUD"}},
    "bad-service-type": {"selector": {"service": {"type": "Ingress"}}},
    "node-port-out-of-range": {"selector": {"service": {"type": "NodePort", "nodePort": 80}}},
    "short-minio-password": {"minio": {"enabled": True, "secretKey": "short"}},
    "negative-interval": {"settings": {"probeIntervalSeconds": -1}},
    "s3-endpoint-is-a-url": {"s3": {"endpoint": "https://s3.example.com"}},
    "bad-namespace": {"watch": {"clusterwide": False, "namespaces": ["Team_A"]}},
    "password-in-store-url": {"redis": {"enabled": False, "url": "redis://:pw@db:6379/0"}},
    "password-in-store-url-query": {
        "redis": {"enabled": False, "url": "redis://db:6379/0?password=pw"}},
    # A claim with nothing written to it: the store would come back empty all the same.
    "store-claim-without-append-only-file": {
        "redis": {"appendOnly": False, "persistence": {"enabled": True}}},
    "bad-store-claim-size": {"redis": {"persistence": {"size": "a lot"}}},
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_bad_values_are_rejected(case: str) -> None:
    values = BAD_VALUES[case]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(values_schema()).validate(merged(values))
    with pytest.raises(helm_python.HelmError):
        chart().validate_schema(values)
    with pytest.raises(helm_python.HelmError):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


def leaf_keys(values: Obj, prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("resources",):
            yield from leaf_keys(value, path + ".")
        else:
            yield path


def test_every_value_is_commented_and_documented() -> None:
    text = (CHART / "values.yaml").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    parents: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z]\w*):\s*(\S.*)?$", line)
        if not m:
            continue
        indent = len(m.group(1))
        while parents and parents[-1][0] >= indent:
            parents.pop()
        inside_value = any(key == "resources" for _, key in parents)
        if m.group(3) is None:
            parents.append((indent, m.group(2)))
            if m.group(2) != "resources":
                continue  # a section header
        if not inside_value:
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#"), f"values.yaml: no comment above {line.strip()!r}"
    docs = (REPO / "docs" / "install.md").read_text()
    documented = set(re.findall(r"^\|\s*`([\w.]+)`", docs, flags=re.M))
    keys = set(leaf_keys(yaml.safe_load(text)))
    assert keys == documented, (
        f"missing from docs/install.md: {sorted(keys - documented)}; "
        f"documented but not in values.yaml: {sorted(documented - keys)}"
    )


# --------------------------------------------------------------------------- examples


def examples() -> dict[str, list[Obj]]:
    return {p.name: yaml_docs(p.read_text()) for p in sorted((REPO / "examples").glob("*.yaml"))}


def test_examples_validate_against_the_crds_and_parse() -> None:
    found = examples()
    kinds = [d["kind"] for docs in found.values() for d in docs]
    assert "ModelExecutor" in kinds and "Client" in kinds
    for docs in found.values():
        for d in docs:
            validate(d)
            assert "namespace" not in d["metadata"], "examples are applied with -n"
            if d["kind"] == "ModelExecutor":
                parse_executor_spec(d["spec"])
            elif d["kind"] == "Client":
                parse_client_spec(d["spec"])
                if "workload" in d["spec"]:
                    template = d["spec"]["workload"]["template"]
                    deployment = {
                        "apiVersion": "apps/v1", "kind": "Deployment",
                        "metadata": {"name": d["metadata"]["name"]},
                        "spec": {"selector": {"matchLabels": template["metadata"]["labels"]},
                                 "template": template},
                    }
                    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_example_client_matches_the_example_executor() -> None:
    docs = [d for ds in examples().values() for d in ds]
    executor = next(d for d in docs if d["kind"] == "ModelExecutor")
    client = next(d for d in docs if d["kind"] == "Client")
    traits, criteria = executor["spec"]["traits"], client["spec"]["criteria"]
    for key, wanted in criteria.items():
        assert traits[key] == wanted, key
    assert executor["spec"]["model"]["name"] == "half_plus_two"
    assert executor["spec"]["model"]["storageUri"].endswith("/half_plus_two")
    makefile = (REPO / "Makefile").read_text()
    uri = executor["spec"]["model"]["storageUri"]
    assert f"MODEL_BUCKET  ?= {uri.split('/')[2]}" in makefile
    assert f"MODEL_URI  ?= s3://$(MODEL_BUCKET)/{uri.split('/', 3)[3]}" in makefile
    assert f"MODEL_VERSION ?= {executor['spec']['model']['version']}" in makefile
    assert f"modelexecutor/{executor['metadata']['name']}" in makefile


BAD_RESOURCES = {
    "unknown-field": ("ModelExecutor", ["spec", "model", "bucket"], "models"),
    "bad-storage-uri": ("ModelExecutor", ["spec", "model", "storageUri"], "http://x/y"),
    "accuracy-above-one": ("ModelExecutor", ["spec", "traits", "accuracy"], 1.5),
    "size-limit-not-quantity-type": ("ModelExecutor", ["spec", "modelVolume", "sizeLimit"], 1.5),
    "negative-weight": ("Client", ["spec", "preferences", "latency"], -1),
    "zero-max-latency": ("Client", ["spec", "limits", "maxLatencyMs"], 0),
    "bad-cold-start": ("Client", ["spec", "coldStart"], "Sometimes"),
}


@pytest.mark.parametrize("case", BAD_RESOURCES)
def test_crd_validation_rejects_bad_resources(case: str) -> None:
    """Proves the structural-schema validator used above can fail."""
    kind, path, value = BAD_RESOURCES[case]
    obj = copy.deepcopy(next(d for ds in examples().values() for d in ds if d["kind"] == kind))
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(obj)


def test_int_or_string_accepts_both() -> None:
    obj = copy.deepcopy(next(d for ds in examples().values() for d in ds
                             if d["kind"] == "ModelExecutor"))
    for size in (1073741824, "1Gi"):
        obj["spec"]["modelVolume"] = {"sizeLimit": size}
        validate(obj)
    with pytest.raises(SpecError):
        parse_executor_spec({**obj["spec"], "modelVolume": {"sizeLimit": "lots"}})


# --------------------------------------------------------------------------- kind + Makefile


def test_kind_config_has_a_control_plane_and_a_worker() -> None:
    kind = yaml.safe_load((REPO / "kind-config.yaml").read_text())
    assert kind["apiVersion"] == "kind.x-k8s.io/v1alpha4" and kind["kind"] == "Cluster"
    assert sorted(n["role"] for n in kind["nodes"]) == ["control-plane", "worker"]
    for node in kind["nodes"]:
        assert node["image"].startswith(f"kindest/node:v{K8S_VERSION}.")


def make_dry_run(target: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    out = subprocess.run([make, "-n", "-C", str(REPO), target],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_up_builds_loads_installs_pushes_applies_waits_and_predicts() -> None:
    steps = make_dry_run("up")
    expected = [
        "kind create cluster --name mulambda --config kind-config.yaml",
        "docker build -t ghcr.io/mulambda/mulambda:dev .",
        "kind load docker-image ghcr.io/mulambda/mulambda:dev",
        "helm upgrade --install mulambda charts/mulambda",
        "--set minio.enabled=true",
        "mulambda models push examples/models/half_plus_two/1 s3://models/half_plus_two "
        "--version 1",
        "apply -f examples/modelexecutor.yaml -f examples/client.yaml",
        "wait --for=condition=Ready modelexecutor/half-plus-two",
        "v1/models/half_plus_two:predict",
    ]
    positions = [steps.find(e) for e in expected]
    assert -1 not in positions, [e for e, p in zip(expected, positions, strict=True) if p < 0]
    assert positions == sorted(positions), "make up runs its steps out of order"


def test_make_targets_run_the_documented_commands() -> None:
    assert 'pytest -m "not e2e"' in make_dry_run("test")
    assert "python -m pytest" not in make_dry_run("test")
    assert "pytest -m e2e tests/e2e" in make_dry_run("e2e")
    lint = make_dry_run("lint")
    assert "ruff check" in lint and "mypy" in lint
    assert "hack/dev_install.py" in make_dry_run("dev")
    assert "kind delete cluster --name mulambda" in make_dry_run("down")


def test_install_doc_covers_kustomize_helm_byo_and_uninstall() -> None:
    text = (REPO / "docs" / "install.md").read_text()
    for needle in ("kubectl apply -k manifests/base", "kubectl apply -k manifests/overlays/dev",
                   "helm install", "redis.enabled=false", "s3.existingSecret", "helm uninstall",
                   "kubectl delete -k", "make up"):
        assert needle in text, needle


def _peer_admits(peer: Obj, namespace: str, labels: dict[str, str]) -> bool:
    """A NetworkPolicy peer (namespaceSelector + podSelector) evaluated for one pod."""

    def matches(selector: Obj, have: dict[str, str]) -> bool:
        if not all(have.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()):
            return False
        for expr in selector.get("matchExpressions") or []:
            assert expr["operator"] == "In", expr  # all this test needs to understand
            if have.get(expr["key"]) not in expr["values"]:
                return False
        return True

    ns_labels = {"kubernetes.io/metadata.name": namespace}
    return matches(peer["namespaceSelector"], ns_labels) and matches(peer["podSelector"], labels)


@pytest.mark.parametrize("source", ["chart", "chart-client-namespaces", "kustomize"])
def test_store_network_policy_admits_only_platform_pods_in_platform_namespaces(
        source: str) -> None:
    from mulambda.api.client import parse_client_spec
    from mulambda.api.modelexecutor import parse_executor_spec
    from mulambda.operator.client import build as client_build
    from mulambda.operator.modelexecutor import build as builders
    from mulambda.settings import Settings

    if source == "kustomize" and shutil.which("kubectl") is None:
        pytest.skip("kubectl is needed to render kustomize")
    if source == "kustomize":
        docs: list[Obj] | tuple[Obj, ...] = kustomize("manifests/base")
    else:
        docs = render({} if source == "chart" else
                      {"redis": {"acl": {"clientNamespaces": ["apps"]}}})
    policy = one(docs, "NetworkPolicy")
    store = next(d for d in find(docs, "Deployment")
                 if d["metadata"]["labels"].get("app.kubernetes.io/component") == "store")
    store_labels = store["spec"]["template"]["metadata"]["labels"]
    assert all(store_labels.get(k) == v
               for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    peers = rule["from"]
    for peer in peers:
        # Every peer names its namespaces by kubernetes.io/metadata.name, which the API
        # server sets and nobody can change; never "any namespace".
        ns_sel = peer["namespaceSelector"]
        keys = set(ns_sel.get("matchLabels") or {}) | {
            e["key"] for e in ns_sel.get("matchExpressions") or []}
        assert keys == {"kubernetes.io/metadata.name"}, peer
        assert peer["podSelector"], peer

    def admitted(namespace: str, labels: dict[str, str]) -> bool:
        return any(_peer_admits(p, namespace, labels) for p in peers)

    for d in find(docs, "Deployment"):
        component = d["metadata"]["labels"].get("app.kubernetes.io/component")
        labels = d["spec"]["template"]["metadata"]["labels"]
        if component in ("operator", "selector"):
            assert admitted(NAMESPACE, labels), component
            assert not admitted("apps", labels), f"{component} labels in a tenant namespace"
    # The pods the operator builds: executors (companions) and Client workloads.
    spec = parse_executor_spec({"model": {"name": "m", "storageUri": "s3://bkt/m"},
                                "traits": {"type": "t", "input": "i", "output": "o"}})
    executor_pod = builders.build_deployment("m", NAMESPACE, spec, Settings())["spec"]["template"]
    workload = parse_client_spec({"criteria": {"type": "t"}, "workload": {"template": {
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}}).workload
    assert workload is not None
    client_pod = client_build.build_client_deployment("c", "apps", workload.template, 1,
                                                      Settings())["spec"]["template"]
    assert admitted(NAMESPACE, executor_pod["metadata"]["labels"])
    # A tenant namespace: executor-looking pods there are not companions we trust.
    assert not admitted("apps", executor_pod["metadata"]["labels"])
    assert admitted("apps", client_pod["metadata"]["labels"]) is (
        source == "chart-client-namespaces")
    # The label the old policy trusted, which any pod can set, admits nothing by itself.
    assert not admitted(NAMESPACE, {"app.kubernetes.io/part-of": "mulambda"})
    assert not admitted("apps", {"app.kubernetes.io/part-of": "mulambda"})
