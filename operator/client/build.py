"""Pure builders: a Client's workload Deployment (the user's pod template, platform env
injected, a ping sidecar) and the Service companions probe."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mulambda.settings import Settings, names

from ..k8s.objects import (
    MANAGED_BY,
    RESTRICTED_CONTAINER_SECURITY,
    TEMPLATE_HASH,
    env_var,
    secret_env,
    template_hash,
)

PING_PORT = 8079


def workload_name(client_name: str) -> str:
    """Name of a Client's workload Deployment and Service."""
    return f"{client_name}-workload"


def client_selector_labels(client_name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "client-workload", "app.kubernetes.io/instance": client_name}


def workload_labels(client_name: str) -> dict[str, str]:
    """Labels of the workload's Deployment, Service and pods."""
    return {**client_selector_labels(client_name), "app.kubernetes.io/part-of": "mulambda",
            "app.kubernetes.io/managed-by": MANAGED_BY}


def probe_url(client_name: str, namespace: str, settings: Settings) -> str:
    """URL companions probe for a Client that runs a workload (its ping sidecar)."""
    host = f"{workload_name(client_name)}.{namespace}.svc.{settings.cluster_domain}"
    return f"http://{host}:{PING_PORT}/ping"


def client_env(client_name: str, namespace: str, settings: Settings) -> list[dict[str, Any]]:
    """Platform settings injected into every container of a Client's workload."""
    return [
        env_var("MULAMBDA_CLIENT", f"{namespace}/{client_name}"),
        env_var("MULAMBDA_KEY_PREFIX", settings.key_prefix),
        *([env_var("MULAMBDA_SELECTOR_URL", settings.selector_url)]
          if settings.selector_url else []),
        *client_store_env(settings, namespace),
    ]


# -- store access of tenant code (issue 12, store access control; docs/security.md) --------


def client_store_env(settings: Settings, namespace: str) -> list[dict[str, Any]]:
    """The store as a Client workload may see it: read-only, or not at all.

    Workloads run tenant code, so they never get the companions' or the
    operator's credentials. Only when ``MULAMBDA_REDIS_CLIENT_SECRET`` names
    the read-only ``mulambda-client`` user's Secret do they get the store's
    URL (without the companions' user in it), that user, and
    ``MULAMBDA_SDK_READ_ONLY`` (the SDK then writes nothing: mulambda.sdk),
    and only in ``MULAMBDA_REDIS_CLIENT_NAMESPACES`` when it names any (where the
    Secret is); otherwise they get no store address at all and use the selector.
    """
    secret = settings.redis_client_secret
    allowed = set(names(settings.redis_client_namespaces))
    if not secret or (allowed and namespace not in allowed):
        return []
    parts = urlsplit(settings.redis_url)
    url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return [
        env_var("MULAMBDA_REDIS_URL", url),
        secret_env("MULAMBDA_REDIS_USERNAME", secret, "username"),
        secret_env("MULAMBDA_REDIS_PASSWORD", secret, "password"),
        env_var("MULAMBDA_SDK_READ_ONLY", "true"),
    ]


def build_client_deployment(
    client_name: str, namespace: str, template: dict[str, Any], replicas: int,
    settings: Settings,
) -> dict[str, Any]:
    """The Client's workload: the user's pod template, our env injected, a ping sidecar."""
    tpl = json.loads(json.dumps(template))  # deep copy, the input stays untouched
    meta = tpl.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **workload_labels(client_name)}
    pod = tpl.setdefault("spec", {})
    injected = client_env(client_name, namespace, settings)
    names = {e["name"] for e in injected}
    for container in pod.get("containers", []):
        # Ours win: the identity must match the Client the operator registered.
        container["env"] = [e for e in container.get("env", []) if e.get("name") not in names]
        container["env"] += injected
    # The ping sidecar is the companion image: its pull Secrets, beside the user's own.
    refs = settings.pull_secrets()
    if refs:
        own = list(pod.get("imagePullSecrets") or [])  # a null in the template: none
        pod["imagePullSecrets"] = own + [r for r in refs if r not in own]
    pod["containers"] = [*pod.get("containers", []), {
        "name": "mulambda-ping",
        "image": settings.companion_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["ping", f"--port={PING_PORT}"],
        "ports": [{"name": "mulambda-ping", "containerPort": PING_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "mulambda-ping"},
                           "periodSeconds": 10},
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                      "limits": {"memory": "64Mi"}},
        "securityContext": {**RESTRICTED_CONTAINER_SECURITY, "runAsUser": 65532},
    }]
    digest = template_hash(tpl)
    meta.setdefault("annotations", {})[TEMPLATE_HASH] = digest
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": workload_name(client_name),
            "namespace": namespace,
            "labels": workload_labels(client_name),
            "annotations": {TEMPLATE_HASH: digest},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": client_selector_labels(client_name)},
            "template": tpl,
        },
    }


def build_client_service(client_name: str, namespace: str) -> dict[str, Any]:
    """Service in front of the workload's ping sidecars (what companions probe)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": workload_name(client_name),
            "namespace": namespace,
            "labels": workload_labels(client_name),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": client_selector_labels(client_name),
            "ports": [{"name": "mulambda-ping", "port": PING_PORT,
                       "targetPort": "mulambda-ping", "protocol": "TCP"}],
        },
    }
