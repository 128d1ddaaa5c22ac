"""Pure builders: a parsed ModelExecutor in, Kubernetes objects (plain dicts) out.

No I/O, no clock, no randomness: the same input always gives the same
objects, so the reconcile loop can compare what it built with what exists.
Owner references are added by the handler (``kopf.adopt``), not here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Any

from mulambda.api.modelexecutor import ModelExecutorSpec
from mulambda.settings import Settings

from ..k8s.objects import (
    LAST_VALID_SPEC,
    MANAGED_BY,
    RESTRICTED_CONTAINER_SECURITY,
    TEMPLATE_HASH,
    env_var,
    field_env,
    redis_password_env,
    secret_env,
    template_hash,
)

REST_PORT = 8501
GRPC_PORT = 8500
COMPANION_PORT = 8080
MODELS_DIR = "/models"
# Where the companion finds its heartbeat signing key (mulambda.store.heartbeats).
HEARTBEAT_KEY_DIR = "/var/run/mulambda/heartbeat"
HEARTBEAT_KEY = "key"


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


def companion_env(
    name: str, namespace: str, spec: ModelExecutorSpec, settings: Settings
) -> list[dict[str, Any]]:
    """Environment of the companion: identity, model, store and S3 (keys from a Secret)."""
    secret = spec.model.credentials_secret or settings.s3_secret
    env = [
        env_var("MULAMBDA_EXECUTOR", f"{namespace}/{name}"),
        env_var("MULAMBDA_MODEL_NAME", spec.model.name),
        env_var("MULAMBDA_MODEL_URI", spec.model.storage_uri),
        env_var("MULAMBDA_MODEL_VERSION", str(spec.model.version or "")),
        env_var("MULAMBDA_MODELS_DIR", MODELS_DIR),
        env_var("MULAMBDA_TFSERVING_URL", f"http://127.0.0.1:{REST_PORT}"),
        env_var("MULAMBDA_HTTP_PORT", str(COMPANION_PORT)),
        env_var("MULAMBDA_REDIS_URL", settings.redis_url),
        env_var("MULAMBDA_KEY_PREFIX", settings.key_prefix),
        env_var("MULAMBDA_S3_ENDPOINT", settings.s3_endpoint),
        env_var("MULAMBDA_S3_SECURE", "true" if settings.s3_secure else "false"),
        env_var("MULAMBDA_HEARTBEAT_TTL_SECONDS", f"{settings.heartbeat_ttl_seconds:g}"),
        env_var("MULAMBDA_PROBE_INTERVAL_SECONDS", f"{settings.probe_interval_seconds:g}"),
        env_var("MULAMBDA_RETRY_MAX_DELAY_SECONDS", f"{settings.retry_max_delay_seconds:g}"),
        env_var("MULAMBDA_LOG_LEVEL", settings.log_level),
        # Tasks at the model at once per pod: what the autoscaler sizes replicas for.
        env_var("MULAMBDA_WORKER_CONCURRENCY",
                str(max(1, math.ceil(spec.scaling.target_concurrency)))),
        field_env("MULAMBDA_POD_NAME", "metadata.name"),
        field_env("MULAMBDA_POD_NAMESPACE", "metadata.namespace"),
        field_env("MULAMBDA_POD_IP", "status.podIP"),
        secret_env("MULAMBDA_S3_ACCESS_KEY", secret, "accessKey"),
        secret_env("MULAMBDA_S3_SECRET_KEY", secret, "secretKey"),
        *redis_password_env(settings),
    ]
    if settings.s3_region:
        env.append(env_var("MULAMBDA_S3_REGION", settings.s3_region))
    return env


def heartbeat_secret_name(executor_name: str, seed: bytes) -> str:
    """The Secret with an executor's heartbeat signing key, named after the key: a
    recreated executor (new UID) or a new operator secret gets a new Secret, and the
    Deployment rolls onto it, instead of pods mounting a key no record vouches for."""
    return f"{executor_name}-heartbeat-{hashlib.sha256(seed).hexdigest()[:10]}"


def build_heartbeat_secret(executor_name: str, namespace: str, seed: bytes) -> dict[str, Any]:
    """The Secret holding an executor's heartbeat signing key (base64 of the seed,
    mulambda.store.heartbeats); mounted into its companions only."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": heartbeat_secret_name(executor_name, seed), "namespace": namespace,
                     "labels": {**selector_labels(executor_name),
                                "app.kubernetes.io/component": "heartbeat-key"}},
        "type": "Opaque",
        "stringData": {HEARTBEAT_KEY: base64.b64encode(seed).decode()},
    }


def build_pod_template(
    name: str, namespace: str, spec: ModelExecutorSpec, settings: Settings,
    heartbeat_secret: str | None = None,
) -> dict[str, Any]:
    """Pod template: TF Serving + companion sharing an emptyDir of models; with
    ``heartbeat_secret``, the companion signs its heartbeats with the key in it."""
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
        "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
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
        "securityContext": dict(RESTRICTED_CONTAINER_SECURITY),
    }
    volumes: list[dict[str, Any]] = []
    if heartbeat_secret is not None:
        # Only the companion mounts it: TF Serving runs a user-chosen image.
        companion["volumeMounts"].append(
            {"name": "heartbeat-key", "mountPath": HEARTBEAT_KEY_DIR, "readOnly": True})
        companion["env"].append(
            env_var("MULAMBDA_HEARTBEAT_KEY_FILE", f"{HEARTBEAT_KEY_DIR}/{HEARTBEAT_KEY}"))
        volumes.append({"name": "heartbeat-key", "secret": {
            "secretName": heartbeat_secret, "items": [{"key": HEARTBEAT_KEY,
                                                       "path": HEARTBEAT_KEY}]}})
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
            *volumes,
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
    if pulls := settings.pull_secrets():
        pod_spec["imagePullSecrets"] = pulls
    return {"metadata": {"labels": labels}, "spec": pod_spec}


def build_deployment(
    name: str,
    namespace: str,
    spec: ModelExecutorSpec,
    settings: Settings,
    replicas: int | None = None,
    heartbeat_secret: str | None = None,
) -> dict[str, Any]:
    """The executor's Deployment. ``replicas`` defaults to ``minReplicas`` (at least 1
    unless scale-to-zero is allowed); the autoscaler owns it afterwards.
    ``heartbeat_secret``: see :func:`build_pod_template`."""
    template = build_pod_template(name, namespace, spec, settings, heartbeat_secret)
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
            "annotations": {TEMPLATE_HASH: digest, LAST_VALID_SPEC: spec_annotation(spec)},
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


def spec_annotation(spec: ModelExecutorSpec) -> str:
    """``spec`` as the Deployment's ``LAST_VALID_SPEC`` annotation keeps it: what differs
    from the defaults, as the resource spells it (``parse_executor_spec`` reads it back)."""
    return json.dumps(spec.model_dump(mode="json", by_alias=True, exclude_defaults=True),
                      separators=(",", ":"), sort_keys=True)


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
