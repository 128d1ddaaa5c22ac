"""The operator's identity as the Helm chart defines it, on the real control plane.

The chart's ServiceAccount and RBAC (templates/serviceaccount.yaml,
templates/rbac.yaml) are rendered by the real ``helm`` and applied by the
real ``kubectl``; a token for the ServiceAccount comes from the TokenRequest
API. The operator under test then authenticates with that token, so the
server enforces exactly the chart's rules: a missing verb is a 403 in the
operator's log and in the audit log, not a silent pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from support.cluster import Cluster
from support.controlplane import REPO, ControlPlane

CHART = REPO / "charts" / "mulambda"
RELEASE = "mulambda"
NAMESPACE = "mulambda-system"
RBAC_TEMPLATES = ("templates/serviceaccount.yaml", "templates/rbac.yaml")


@dataclass
class Identity:
    """A ServiceAccount's token and a kubeconfig that uses it."""

    namespace: str
    service_account: str
    token: str
    kubeconfig: Path
    cluster_roles: list[str]

    @property
    def user(self) -> str:
        """The user name the API server (and its audit log) gives this identity."""
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def render_rbac(cp: ControlPlane, *values: str) -> list[dict[str, Any]]:
    """The chart's ServiceAccounts and RBAC objects, as ``helm template`` renders them."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for template in RBAC_TEMPLATES:
        args += ["--show-only", template]
    for value in values:
        args += ["--set", value]
    out = cp.helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def operator_identity(cp: ControlPlane, cluster: Cluster, workdir: Path) -> Identity:
    """Apply the chart's operator ServiceAccount and RBAC; mint a token for it."""
    if cluster.get("v1", "namespaces", None, NAMESPACE) is None:
        cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    docs = render_rbac(cp)
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    [account] = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ServiceAccount"
        and d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    ]
    roles = [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"
             and d["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"]
    token = request_token(cluster, NAMESPACE, account)
    kubeconfig = workdir / f"{account}.kubeconfig"
    write_token_kubeconfig(kubeconfig, cp.server, cp.pki / "ca.crt", account, token)
    return Identity(NAMESPACE, account, token, kubeconfig, roles)


def request_token(cluster: Cluster, namespace: str, account: str, seconds: int = 4 * 3600) -> str:
    """A bound token from the TokenRequest API (what a projected volume would hold)."""
    result = cluster.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        body={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        },
    )
    assert result is not None
    return str(result["status"]["token"])


def write_token_kubeconfig(path: Path, server: str, ca: Path, user: str, token: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": user,
        "clusters": [
            {"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "test", "user": user}}],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
