"""Companion settings, read once at start-up from ``MULAMBDA_*`` variables.

The operator sets these in the companion container of every executor pod
(pod name and IP through the downward API). Shared knobs (store URL, key
prefix, heartbeat TTL, probe interval, retry cap, log level) come from
:class:`mulambda.settings.Settings` so the operator and the companion agree
on them; S3 endpoint and credentials are read by
:meth:`mulambda.storage.ModelStorage.from_env`, never here, so no secret
ever passes through this object.

Every companion-specific variable is listed in :data:`COMPANION_SETTINGS_DOC`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from mulambda.api.common import S3_URI
from mulambda.settings import PREFIX, Settings

# name (without prefix) -> (default, description). "" means "unset".
COMPANION_SETTINGS_DOC: dict[str, tuple[str, str]] = {
    "EXECUTOR": ("(required)", "NAMESPACE/NAME of the ModelExecutor this pod serves."),
    "POD_NAMESPACE": ("", "Namespace used when EXECUTOR has no NAMESPACE/ part."),
    "MODEL_URI": ("", "s3://BUCKET/PREFIX of the model; versions live under PREFIX/VERSION/."),
    "MODEL_BUCKET": ("", "Bucket of the model (alternative to MODEL_URI)."),
    "MODEL_PREFIX": ("", "Prefix of the model in the bucket (alternative to MODEL_URI)."),
    "MODEL_NAME": ("last prefix segment", "TF Serving model name = folder under MODELS_DIR."),
    "MODEL_VERSION": ("", "Version to load; empty means the highest version in storage."),
    "MODELS_DIR": ("/models", "Volume shared with TF Serving (--model_base_path=MODELS_DIR/NAME)."),
    "POD_NAME": ("hostname", "This pod's name (downward API metadata.name)."),
    "POD_IP": ("", "This pod's IP (downward API status.podIP), published in the heartbeat."),
    "TFSERVING_URL": ("http://127.0.0.1:8501", "TF Serving REST API in the same pod."),
    "HTTP_HOST": ("0.0.0.0", "Address the companion's /healthz, /readyz, /metrics listen on."),
    "HTTP_PORT": ("8080", "Port of the companion's HTTP server."),
    "HEARTBEAT_INTERVAL_SECONDS": ("TTL / 3", "How often the heartbeat is renewed."),
    "PROBE_TIMEOUT_SECONDS": ("2", "Per-probe timeout; a slower client counts as an error."),
    "PROBE_CONCURRENCY": ("16", "Probes in flight at once."),
    "PROBE_JITTER": ("0.2", "Random +/- fraction of the probe interval between rounds."),
    "LATENCY_ALPHA": ("0.3", "EWMA weight of a new latency sample (0 < alpha <= 1)."),
    "LATENCY_TTL_SECONDS": ("3 * probe interval", "Lifetime of a latency sample without refresh."),
    "SERVING_POLL_SECONDS": ("1", "How often TF Serving's model status is polled."),
    "VERSION_WATCH_SECONDS": (
        "15", "Unpinned executors: how often the newest version in storage is checked."),
    "LOAD_WORKERS": ("4", "Parallel ranged GETs per model download."),
    "RETRY_BASE_DELAY_SECONDS": ("1", "First back-off after a transient load error (doubles)."),
    "FAILED_RETRY_SECONDS": ("60", "Retry after a permanent load error (model uploaded later)."),
}


class ConfigError(ValueError):
    """The companion's environment is incomplete or malformed; the message says which variable."""


@dataclass(frozen=True)
class CompanionConfig:
    """Everything the companion needs, typed. Build with :meth:`from_env`."""

    namespace: str
    executor_name: str
    bucket: str
    prefix: str
    model_name: str
    version: int | None
    models_dir: str
    pod_name: str
    pod_ip: str
    settings: Settings
    serving_rest_url: str = "http://127.0.0.1:8501"
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    heartbeat_interval: float = 10.0
    probe_timeout: float = 2.0
    probe_concurrency: int = 16
    probe_jitter: float = 0.2
    latency_alpha: float = 0.3
    latency_ttl: float = 30.0
    serving_poll: float = 1.0
    version_watch: float = 15.0
    load_workers: int = 4
    retry_base_delay: float = 1.0
    failed_retry: float = 60.0

    @property
    def executor_id(self) -> str:
        return f"{self.namespace}/{self.executor_name}"

    @property
    def heartbeat_ttl(self) -> float:
        return self.settings.heartbeat_ttl_seconds

    @property
    def probe_interval(self) -> float:
        return self.settings.probe_interval_seconds

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CompanionConfig:
        """Read the environment; raise :class:`ConfigError` naming the bad variable."""
        env = os.environ if environ is None else environ
        try:
            settings = Settings.from_env(env)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

        def get(name: str, default: str = "") -> str:
            value = env.get(PREFIX + name, "").strip()
            return value or default

        def number(name: str, default: float, kind: type = float, minimum: float = 0.0) -> float:
            raw = get(name)
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError as exc:
                raise ConfigError(f"{PREFIX}{name} must be a number, got {raw!r}") from exc
            if value < minimum:
                raise ConfigError(f"{PREFIX}{name} must be >= {minimum}, got {raw!r}")
            return value

        executor = get("EXECUTOR")
        namespace, _, name = executor.rpartition("/")
        namespace = namespace or get("POD_NAMESPACE")
        if not namespace or not name:
            raise ConfigError(
                f"{PREFIX}EXECUTOR must be NAMESPACE/NAME (or NAME with {PREFIX}POD_NAMESPACE), "
                f"got {executor!r}"
            )

        uri = get("MODEL_URI")
        if uri:
            match = S3_URI.match(uri)
            if not match:
                raise ConfigError(
                    f"{PREFIX}MODEL_URI must look like s3://bucket/prefix, got {uri!r}"
                )
            bucket, prefix = match["bucket"], match["prefix"] or ""
        else:
            bucket, prefix = get("MODEL_BUCKET"), get("MODEL_PREFIX")
            if not bucket:
                raise ConfigError(f"set {PREFIX}MODEL_URI (or {PREFIX}MODEL_BUCKET)")
        prefix = prefix.strip("/")

        model_name = get("MODEL_NAME") or prefix.rsplit("/", 1)[-1]
        if not model_name:
            raise ConfigError(f"{PREFIX}MODEL_NAME is required when the prefix is empty")

        raw_version = get("MODEL_VERSION")
        version: int | None = None
        if raw_version:
            try:
                version = int(raw_version)
            except ValueError as exc:
                raise ConfigError(
                    f"{PREFIX}MODEL_VERSION must be an integer, got {raw_version!r}"
                ) from exc

        ttl = settings.heartbeat_ttl_seconds
        alpha = number("LATENCY_ALPHA", 0.3)
        if not 0 < alpha <= 1:
            raise ConfigError(f"{PREFIX}LATENCY_ALPHA must be in (0, 1], got {alpha}")
        return cls(
            namespace=namespace,
            executor_name=name,
            bucket=bucket,
            prefix=prefix,
            model_name=model_name,
            version=version,
            models_dir=get("MODELS_DIR", "/models"),
            pod_name=get("POD_NAME") or socket.gethostname(),
            pod_ip=get("POD_IP"),
            settings=settings,
            serving_rest_url=get("TFSERVING_URL", "http://127.0.0.1:8501").rstrip("/"),
            http_host=get("HTTP_HOST", "0.0.0.0"),
            http_port=int(number("HTTP_PORT", 8080, int)),
            heartbeat_interval=number(
                "HEARTBEAT_INTERVAL_SECONDS", max(ttl / 3, 0.1), minimum=0.01
            ),
            probe_timeout=number("PROBE_TIMEOUT_SECONDS", 2.0, minimum=0.01),
            probe_concurrency=int(number("PROBE_CONCURRENCY", 16, int, minimum=1)),
            probe_jitter=min(number("PROBE_JITTER", 0.2), 1.0),
            latency_alpha=alpha,
            latency_ttl=number(
                "LATENCY_TTL_SECONDS", 3 * settings.probe_interval_seconds, minimum=0.01
            ),
            serving_poll=number("SERVING_POLL_SECONDS", 1.0, minimum=0.01),
            version_watch=number("VERSION_WATCH_SECONDS", 15.0, minimum=0.01),
            load_workers=int(number("LOAD_WORKERS", 4, int, minimum=1)),
            retry_base_delay=number("RETRY_BASE_DELAY_SECONDS", 1.0, minimum=0.01),
            failed_retry=number("FAILED_RETRY_SECONDS", 60.0, minimum=0.01),
        )
