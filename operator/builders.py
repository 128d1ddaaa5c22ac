"""Pure builders: a parsed ModelExecutor in, Kubernetes objects (plain dicts) out.

No I/O, no clock, no randomness: the same input always gives the same
objects, so the reconcile loop can compare what it built with what exists.
Owner references are added by the handler (``kopf.adopt``), not here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mulambda.resources import ModelExecutorSpec
from mulambda.settings import Settings

REST_PORT = 8501
GRPC_PORT = 8500
COMPANION_PORT = 8080
MODELS_DIR = "/models"
MANAGED_BY = "mulambda-operator"

# Annotation carrying a hash of the pod template the operator built: a changed
# hash (new model version, image, resources...) means "patch the Deployment".
TEMPLATE_HASH = "mulambda.io/template-hash"

_RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}

DEFAULT_COMPANION_RESOURCES = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"memory": "256Mi"},
}


def child_name(executor_name: str) -> str:
    """Name of the Deployment and Service of an executor (same as the executor)."""
    return executor_name


def selector_labels(executor_name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "modelexecutor",
        "app.kubernetes.io/instance": executor_name,
    }


def common_labels(executor_name: str, spec: ModelExecutorSpec) -> dict[str, str]:
    return {
        **selector_labels(executor_name),
        "app.kubernetes.io/component": "model-executor",
        "app.kubernetes.io/part-of": "mulambda",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "mulambda.io/model": spec.model.name,
        "mulambda.io/type": spec.traits.type,
    }


def endpoints(name: str, namespace: str, settings: Settings) -> dict[str, str]:
    """In-cluster REST and gRPC endpoints of the executor's Service."""
    host = f"{child_name(name)}.{namespace}.svc.{settings.cluster_domain}"
    return {"rest": f"http://{host}:{REST_PORT}", "grpc": f"{host}:{GRPC_PORT}"}


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _redis_password_env(settings: Settings) -> list[dict[str, Any]]:
    """The store's password, from the Secret named by MULAMBDA_REDIS_SECRET (same
    namespace as the pod), never as a literal value."""
    if not settings.redis_secret:
        return []
    return [_secret_env("MULAMBDA_REDIS_PASSWORD", settings.redis_secret, "password")]


def companion_env(
    name: str, namespace: str, spec: ModelExecutorSpec, settings: Settings
) -> list[dict[str, Any]]:
    """Environment of the companion: identity, model, store and S3 (keys from a Secret)."""
    secret = spec.model.credentials_secret or settings.s3_secret
    env = [
        _env("MULAMBDA_EXECUTOR", f"{namespace}/{name}"),
        _env("MULAMBDA_MODEL_NAME", spec.model.name),
        _env("MULAMBDA_MODEL_URI", spec.model.storage_uri),
        _env("MULAMBDA_MODEL_VERSION", str(spec.model.version or "")),
        _env("MULAMBDA_MODELS_DIR", MODELS_DIR),
        _env("MULAMBDA_TFSERVING_URL", f"http://127.0.0.1:{REST_PORT}"),
        _env("MULAMBDA_HTTP_PORT", str(COMPANION_PORT)),
        _env("MULAMBDA_REDIS_URL", settings.redis_url),
        _env("MULAMBDA_KEY_PREFIX", settings.key_prefix),
        _env("MULAMBDA_S3_ENDPOINT", settings.s3_endpoint),
        _env("MULAMBDA_S3_SECURE", "true" if settings.s3_secure else "false"),
        _env("MULAMBDA_HEARTBEAT_TTL_SECONDS", f"{settings.heartbeat_ttl_seconds:g}"),
        _env("MULAMBDA_PROBE_INTERVAL_SECONDS", f"{settings.probe_interval_seconds:g}"),
        _env("MULAMBDA_RETRY_MAX_DELAY_SECONDS", f"{settings.retry_max_delay_seconds:g}"),
        _env("MULAMBDA_LOG_LEVEL", settings.log_level),
        _field_env("MULAMBDA_POD_NAME", "metadata.name"),
        _field_env("MULAMBDA_POD_NAMESPACE", "metadata.namespace"),
        _field_env("MULAMBDA_POD_IP", "status.podIP"),
        _secret_env("MULAMBDA_S3_ACCESS_KEY", secret, "accessKey"),
        _secret_env("MULAMBDA_S3_SECRET_KEY", secret, "secretKey"),
        *_redis_password_env(settings),
    ]
    if settings.s3_region:
        env.append(_env("MULAMBDA_S3_REGION", settings.s3_region))
    return env


def build_pod_template(
    name: str, namespace: str, spec: ModelExecutorSpec, settings: Settings
) -> dict[str, Any]:
    """Pod template: TF Serving + companion sharing an emptyDir of models."""
    labels = common_labels(name, spec)
    serving_args = [
        f"--port={GRPC_PORT}",
        f"--rest_api_port={REST_PORT}",
        f"--model_name={spec.model.name}",
        f"--model_base_path={MODELS_DIR}/{spec.model.name}",
        # Poll often: the companion renames a finished version into place and
        # readiness waits for TF Serving to notice it.
        "--file_system_poll_wait_seconds=2",
        *spec.serving.args,
    ]
    serving: dict[str, Any] = {
        "name": "serving",
        "image": spec.serving.image or settings.serving_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": serving_args,
        "ports": [
            {"name": "http", "containerPort": REST_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        ],
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True}],
        "securityContext": dict(_RESTRICTED_CONTAINER_SECURITY),
        # TF Serving needs no writable root; it only reads /models.
        "livenessProbe": {
            "tcpSocket": {"port": "http"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
        },
    }
    if spec.serving.resources:
        serving["resources"] = dict(spec.serving.resources)
    companion: dict[str, Any] = {
        "name": "companion",
        "image": settings.companion_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["companion"],
        "env": companion_env(name, namespace, spec, settings),
        "ports": [{"name": "companion", "containerPort": COMPANION_PORT, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "companion"},
            "periodSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "companion"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": dict(spec.companion.resources or DEFAULT_COMPANION_RESOURCES),
        "securityContext": dict(_RESTRICTED_CONTAINER_SECURITY),
    }
    models_volume: dict[str, Any] = {}
    if spec.model_volume.medium:
        models_volume["medium"] = spec.model_volume.medium
    if spec.model_volume.size_limit is not None:
        models_volume["sizeLimit"] = spec.model_volume.size_limit
    pod_spec: dict[str, Any] = {
        "containers": [serving, companion],
        "volumes": [
            {"name": "models", "emptyDir": models_volume},
            {"name": "tmp", "emptyDir": {}},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        # Give the companion time to remove its heartbeat on SIGTERM.
        "terminationGracePeriodSeconds": 30,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    return {"metadata": {"labels": labels}, "spec": pod_spec}


def template_hash(template: dict[str, Any]) -> str:
    """Stable short hash of a pod template (key order does not matter)."""
    raw = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def build_deployment(
    name: str,
    namespace: str,
    spec: ModelExecutorSpec,
    settings: Settings,
    replicas: int | None = None,
) -> dict[str, Any]:
    """The executor's Deployment. ``replicas`` defaults to ``minReplicas`` (at least 1
    unless scale-to-zero is allowed); the autoscaler owns it afterwards."""
    template = build_pod_template(name, namespace, spec, settings)
    digest = template_hash(template)
    template["metadata"]["annotations"] = {TEMPLATE_HASH: digest}
    if replicas is None:
        replicas = spec.scaling.min_replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": child_name(name),
            "namespace": namespace,
            "labels": common_labels(name, spec),
            "annotations": {TEMPLATE_HASH: digest},
        },
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(name)},
            # Surge, never drop below the ready count: a new model version
            # becomes ready before the old pods go (zero downtime).
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": template,
        },
    }


def build_service(name: str, namespace: str, spec: ModelExecutorSpec) -> dict[str, Any]:
    """ClusterIP Service exposing TF Serving's REST and gRPC ports."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": child_name(name),
            "namespace": namespace,
            "labels": common_labels(name, spec),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [
                {"name": "http", "port": REST_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                 "appProtocol": "grpc"},
            ],
        },
    }


# -- Client workloads ---------------------------------------------------------

PING_PORT = 8079


def workload_name(client_name: str) -> str:
    """Name of a Client's workload Deployment and Service."""
    return f"{client_name}-workload"


def client_selector_labels(client_name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "client-workload", "app.kubernetes.io/instance": client_name}


def probe_url(client_name: str, namespace: str, settings: Settings) -> str:
    """URL companions probe for a Client that runs a workload (its ping sidecar)."""
    host = f"{workload_name(client_name)}.{namespace}.svc.{settings.cluster_domain}"
    return f"http://{host}:{PING_PORT}/ping"


def client_env(client_name: str, namespace: str, settings: Settings) -> list[dict[str, Any]]:
    """Platform settings injected into every container of a Client's workload."""
    return [
        _env("MULAMBDA_CLIENT", f"{namespace}/{client_name}"),
        _env("MULAMBDA_REDIS_URL", settings.redis_url),
        _env("MULAMBDA_KEY_PREFIX", settings.key_prefix),
        _env("MULAMBDA_SELECTOR_URL", settings.selector_url),
        *_redis_password_env(settings),
    ]


def build_client_deployment(
    client_name: str, namespace: str, template: dict[str, Any], replicas: int,
    settings: Settings,
) -> dict[str, Any]:
    """The Client's workload: the user's pod template, our env injected, a ping sidecar."""
    tpl = json.loads(json.dumps(template))  # deep copy, the input stays untouched
    meta = tpl.setdefault("metadata", {})
    labels = {
        **(meta.get("labels") or {}),
        **client_selector_labels(client_name),
        "app.kubernetes.io/part-of": "mulambda",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }
    meta["labels"] = labels
    pod = tpl.setdefault("spec", {})
    injected = client_env(client_name, namespace, settings)
    names = {e["name"] for e in injected}
    for container in pod.get("containers", []):
        # Ours win: the identity must match the Client the operator registered.
        container["env"] = [e for e in container.get("env", []) if e.get("name") not in names]
        container["env"] += injected
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
        "securityContext": {**_RESTRICTED_CONTAINER_SECURITY, "runAsUser": 65532},
    }]
    digest = template_hash(tpl)
    meta.setdefault("annotations", {})[TEMPLATE_HASH] = digest
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": workload_name(client_name),
            "namespace": namespace,
            "labels": {**client_selector_labels(client_name),
                       "app.kubernetes.io/part-of": "mulambda",
                       "app.kubernetes.io/managed-by": MANAGED_BY},
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
            "labels": {**client_selector_labels(client_name),
                       "app.kubernetes.io/part-of": "mulambda",
                       "app.kubernetes.io/managed-by": MANAGED_BY},
        },
        "spec": {
            "type": "ClusterIP",
            "selector": client_selector_labels(client_name),
            "ports": [{"name": "mulambda-ping", "port": PING_PORT,
                       "targetPort": "mulambda-ping", "protocol": "TCP"}],
        },
    }
