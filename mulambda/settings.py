"""Process-wide configuration, read once at start-up from ``MULAMBDA_*`` variables.

Every knob is listed in :data:`SETTINGS_DOC` (the README's configuration table
is checked against it by a test). Nothing here connects to anything.
Credentials never come from here: S3 keys are read by the companion from the
environment variables a Secret feeds (``MULAMBDA_S3_ACCESS_KEY`` /
``MULAMBDA_S3_SECRET_KEY``), and are never logged or echoed in a repr.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

PREFIX = "MULAMBDA_"

DEFAULT_SERVING_IMAGE = "tensorflow/serving:2.18.0"
DEFAULT_COMPANION_IMAGE = "ghcr.io/mulambda/mulambda:0.1.0"

# name -> (default, description). Order is the order of the README table.
SETTINGS_DOC: dict[str, tuple[str, str]] = {
    "REDIS_URL": (
        "redis://localhost:6379/0", "Metadata store URL (Redis, Valkey or DragonflyDB)."),
    "REDIS_SECRET": (
        "", "Secret (key password) with the store's password, read via secretKeyRef; "
        "empty: no password."),
    "KEY_PREFIX": ("mulambda", "Prefix of every key mulambda writes in the store."),
    "SERVING_IMAGE": (DEFAULT_SERVING_IMAGE, "Default TF Serving image for executors."),
    "COMPANION_IMAGE": (DEFAULT_COMPANION_IMAGE, "Image of the companion sidecar (this project)."),
    "IMAGE_PULL_POLICY": ("IfNotPresent", "Pull policy of the containers the operator creates."),
    "S3_ENDPOINT": (
        "minio.mulambda.svc:9000", "S3/MinIO endpoint (host:port) models are read from."),
    "S3_SECURE": ("false", "Use TLS to talk to the S3 endpoint."),
    "S3_REGION": ("", "S3 region, if the store needs one."),
    "S3_SECRET": (
        "mulambda-s3", "Default Secret (keys accessKey, secretKey) with S3 credentials."),
    "SELECTOR_URL": (
        "http://mulambda-selector.mulambda.svc:8080", "Selector API URL injected into workloads."),
    "CLUSTER_DOMAIN": ("cluster.local", "Cluster DNS domain used in executor endpoints."),
    "HEARTBEAT_TTL_SECONDS": ("30", "How long a replica heartbeat lives without renewal."),
    "PROBE_INTERVAL_SECONDS": (
        "10", "How often companions probe clients (and the operator re-selects)."),
    "RECONCILE_INTERVAL_SECONDS": ("10", "Timer that re-converges every resource."),
    "AUTOSCALE_INTERVAL_SECONDS": (
        "2", "How often the operator samples demand and runs the autoscaler."),
    "RETRY_MAX_DELAY_SECONDS": ("60", "Upper bound of the back-off when the store is unreachable."),
    "LOG_LEVEL": ("INFO", "Log level of every entry point."),
}


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Typed view of the environment. Build with :meth:`from_env`."""

    redis_url: str = SETTINGS_DOC["REDIS_URL"][0]
    redis_secret: str = ""
    key_prefix: str = SETTINGS_DOC["KEY_PREFIX"][0]
    serving_image: str = DEFAULT_SERVING_IMAGE
    companion_image: str = DEFAULT_COMPANION_IMAGE
    image_pull_policy: str = "IfNotPresent"
    s3_endpoint: str = SETTINGS_DOC["S3_ENDPOINT"][0]
    s3_secure: bool = False
    s3_region: str = ""
    s3_secret: str = "mulambda-s3"
    selector_url: str = "http://mulambda-selector.mulambda.svc:8080"
    cluster_domain: str = "cluster.local"
    heartbeat_ttl_seconds: float = 30.0
    probe_interval_seconds: float = 10.0
    reconcile_interval_seconds: float = 10.0
    autoscale_interval_seconds: float = 2.0
    retry_max_delay_seconds: float = 60.0
    log_level: str = "INFO"
    extra: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``MULAMBDA_*`` variables; unknown ones are ignored, bad numbers raise."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            if f.type in ("float", float):
                try:
                    values[f.name] = float(raw)
                except ValueError as exc:
                    raise ValueError(
                        f"{PREFIX}{f.name.upper()} must be a number, got {raw!r}"
                    ) from exc
            elif f.type in ("bool", bool):
                values[f.name] = _flag(raw)
            else:
                values[f.name] = raw
        settings = cls(**values)  # type: ignore[arg-type]
        if urlsplit(settings.redis_url).password:
            # The URL is copied into every executor and workload pod spec: a
            # password there would be readable by anyone who can read Deployments.
            raise ValueError(
                f"{PREFIX}REDIS_URL must not carry a password; put it in a Secret (key "
                f"'password') and name that Secret in {PREFIX}REDIS_SECRET")
        for f in fields(cls):
            value = getattr(settings, f.name)
            if f.name.endswith("_seconds") and not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{PREFIX}{f.name.upper()} must be a positive number of seconds, "
                    f"got {value!r}")
        return settings
