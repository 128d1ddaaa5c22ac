"""Pieces every child object shares: its owner, ownership labels, the template hash,
hardened security, environment entries (never a literal secret)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mulambda.settings import Settings

MANAGED_BY = "mulambda-operator"

# Annotation carrying a hash of the pod template the operator built: a changed
# hash (new model version, image, resources...) means "patch the Deployment".
TEMPLATE_HASH = "mulambda.io/template-hash"
# Annotation carrying the spec the operator last built the Deployment from (valid by
# construction): after a restart, an executor whose spec is now invalid is scaled by it
# (operator/modelexecutor/fleet.py), as it is by the one in memory before a restart.
LAST_VALID_SPEC = "mulambda.io/last-valid-spec"


@dataclass(frozen=True)
class ObjectRef:
    """The custom resource being reconciled: what its children and Events need to name it."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ObjectRef:
        meta = body["metadata"]
        return cls(api_version=body["apiVersion"], kind=body["kind"],
                   namespace=meta["namespace"], name=meta["name"], uid=meta["uid"],
                   labels=dict(meta.get("labels") or {}))

    @property
    def id(self) -> str:
        """``NAMESPACE/NAME``, the object's key in the metadata store."""
        return f"{self.namespace}/{self.name}"


RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def env_var(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def redis_password_env(settings: Settings) -> list[dict[str, Any]]:
    """The store's password, from the Secret named by MULAMBDA_REDIS_SECRET (same
    namespace as the pod), never as a literal value."""
    if not settings.redis_secret:
        return []
    return [secret_env("MULAMBDA_REDIS_PASSWORD", settings.redis_secret, "password")]


def template_hash(template: dict[str, Any]) -> str:
    """Stable short hash of a pod template (key order does not matter)."""
    raw = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]
