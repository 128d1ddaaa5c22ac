"""Pieces every child object shares: ownership labels, the template hash, hardened security,
environment entries (never a literal secret)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mulambda.settings import Settings

MANAGED_BY = "mulambda-operator"

# Annotation carrying a hash of the pod template the operator built: a changed
# hash (new model version, image, resources...) means "patch the Deployment".
TEMPLATE_HASH = "mulambda.io/template-hash"

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
