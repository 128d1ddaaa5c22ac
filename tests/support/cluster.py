"""Tests' view of the real control plane: objects by (apiVersion, plural), waits, Events, audit.

A thin REST client as the cluster admin (the test itself, not the operator):
the operator under test talks to the same API server with its own
ServiceAccount token (see :mod:`support.operator_run`). Every call is a real
request; nothing here imitates server behaviour.

    cluster.create(body)                                  # -> the stored object
    cluster.get("apps/v1", "deployments", ns, name)       # -> dict or None
    cluster.patch("v1", "services", ns, name, {...})      # merge patch; patch_type="json"
    cluster.wait_for(lambda: ..., what="the Deployment")  # polls until truthy
    cluster.audit(user=OPERATOR_USER)                     # the API server's audit log
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from support.controlplane import ControlPlane

T = TypeVar("T")
Obj = dict[str, Any]

_PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


class ApiError(Exception):
    """A request the API server refused; ``status`` and the server's ``message``."""

    def __init__(self, status: int, body: str, what: str) -> None:
        try:
            self.message = json.loads(body).get("message", body)
        except ValueError:
            self.message = body
        self.status = status
        super().__init__(f"{what}: {status} {self.message}")


def path_of(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """REST path of a collection or an object (core group under /api, others under /apis)."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
    if subresource:
        base += f"/{subresource}"
    return base


_PLURALS = {
    "Namespace": "namespaces",
    "Service": "services",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Pod": "pods",
    "ServiceAccount": "serviceaccounts",
    "Deployment": "deployments",
    "ReplicaSet": "replicasets",
    "Event": "events",
    "ModelExecutor": "modelexecutors",
    "Client": "clients",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "ClusterRole": "clusterroles",
    "ClusterRoleBinding": "clusterrolebindings",
}


@dataclass
class AuditEvent:
    """One request as the API server's audit log recorded it (level Metadata)."""

    user: str
    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    code: int
    uri: str


class Cluster:
    """Admin access to a :class:`ControlPlane` for arranging and checking tests."""

    def __init__(self, cp: ControlPlane, timeout: float = 30.0) -> None:
        self.cp = cp
        tls = ssl.create_default_context(cafile=str(cp.pki / "ca.crt"))
        tls.load_cert_chain(str(cp.pki / "admin.crt"), str(cp.pki / "admin.key"))
        self.http = httpx.Client(base_url=cp.server, timeout=timeout, verify=tls)

    def close(self) -> None:
        self.http.close()

    # -- requests -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        ok_missing: bool = False,
        params: dict[str, str] | None = None,
    ) -> Obj | None:
        content = None if body is None else json.dumps(body)
        resp = self.http.request(
            method, path, content=content, params=params, headers={"Content-Type": content_type}
        )
        if resp.status_code == 404 and ok_missing:
            return None
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, resp.text, f"{method} {path}")
        return resp.json() if resp.content else {}

    def create(self, body: Obj) -> Obj:
        meta = body["metadata"]
        plural = _PLURALS[body["kind"]]
        path = path_of(body["apiVersion"], plural, meta.get("namespace"))
        result = self.request("POST", path, body=body)
        assert result is not None
        return result

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> Obj | None:
        return self.request("GET", path_of(api_version, plural, namespace, name), ok_missing=True)

    def list(
        self, api_version: str, plural: str, namespace: str | None = None, **params: str
    ) -> list[Obj]:
        result = self.request("GET", path_of(api_version, plural, namespace), params=params)
        assert result is not None
        return list(result.get("items") or [])

    def patch(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        patch_type: str = "merge",
        subresource: str | None = None,
    ) -> Obj:
        result = self.request(
            "PATCH",
            path_of(api_version, plural, namespace, name, subresource),
            body=patch,
            content_type=_PATCH_TYPES[patch_type],
        )
        assert result is not None
        return result

    def delete(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        propagation: str = "Background",
    ) -> None:
        self.request(
            "DELETE",
            path_of(api_version, plural, namespace, name),
            body={"propagationPolicy": propagation},
            ok_missing=True,
        )

    # -- conveniences ---------------------------------------------------------------------------

    def events(
        self, namespace: str, reason: str | None = None, involved: str | None = None
    ) -> list[Obj]:
        """core/v1 Events of a namespace (what ``kubectl describe`` shows)."""
        found = self.list("v1", "events", namespace)
        return [
            e
            for e in found
            if (reason is None or e.get("reason") == reason)
            and (involved is None or e.get("involvedObject", {}).get("name") == involved)
        ]

    @staticmethod
    def wait_for(
        check: Callable[[], T],
        timeout: float = 30.0,
        interval: float = 0.1,
        what: str = "the condition",
    ) -> T:
        """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(interval)

    def audit(self, user: str | None = None, since: int = 0) -> list[AuditEvent]:
        """Requests in the API server's audit log from byte offset ``since``, optionally
        of one user: each once, when complete (a watch when its response starts)."""
        found: list[AuditEvent] = []
        path = self.cp.audit_log
        if not path.exists():
            return found
        with path.open("rb") as f:
            f.seek(since)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # the server is still writing this one
                entry = json.loads(line)
                # A watch completes only when it ends (minutes later): count it
                # when its response starts, once.
                wanted = "ResponseStarted" if entry.get("verb") == "watch" else "ResponseComplete"
                if entry.get("stage") != wanted:
                    continue
                who = entry.get("user", {}).get("username", "")
                if user is not None and who != user:
                    continue
                ref = entry.get("objectRef") or {}
                found.append(
                    AuditEvent(
                        user=who,
                        verb=entry.get("verb", ""),
                        group=ref.get("apiGroup", ""),
                        resource=ref.get("resource", ""),
                        subresource=ref.get("subresource", ""),
                        namespace=ref.get("namespace", ""),
                        name=ref.get("name", ""),
                        code=int((entry.get("responseStatus") or {}).get("code") or 0),
                        uri=entry.get("requestURI", ""),
                    )
                )
        return found

    def audit_mark(self) -> int:
        """A position in the audit log: ``audit(since=mark)`` reads what came after it."""
        path = self.cp.audit_log
        return path.stat().st_size if path.exists() else 0
