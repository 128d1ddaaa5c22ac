"""Every component's configuration, read once at start-up from ``MULAMBDA_*`` variables.

One module, two sections, one parser:

* :class:`Settings`, the shared section: what the operator, the selector, the
  CLI and the companion all read. The Helm chart and the manifests set
  exactly these keys from a ConfigMap; the table is :data:`SETTINGS_DOC`.
* :class:`CompanionSettings`, the companion's own section: its pod's
  identity, its model and the timing of its loops, set by the operator in
  every executor pod. It carries the shared section as ``shared``; the
  table is :data:`COMPANION_SETTINGS_DOC`.
* :class:`SelectorSettings`, the selector's own section (its store
  connection pool), with the shared one as ``shared``; the table is
  :data:`SELECTOR_SETTINGS_DOC`. Unset, the defaults serve; the selector's
  Deployment may set them.

Each table maps a variable (without the prefix) to its documented default
and meaning; the README's tables are checked against both by a test, and a
literal default in a table is the one the code uses (:class:`Env` reads it
from there). Every value is parsed by :class:`Env`, so a bad one always
raises :class:`SettingsError` naming the variable. Nothing here connects to
anything. Credentials never come from here: each process reads its own
from the environment variables a Secret feeds (:data:`CREDENTIALS_DOC`),
and they are never logged or echoed in a repr.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from urllib.parse import parse_qs, urlsplit

from mulambda.storage.layout import S3_URI
from mulambda.tasks.records import TaskOptions

PREFIX = "MULAMBDA_"

DEFAULT_SERVING_IMAGE = "tensorflow/serving:2.18.0"
DEFAULT_COMPANION_IMAGE = "ghcr.io/mulambda/mulambda:0.1.0"

# name -> (default, description); "" means "unset". Order is the order of the README table.
SETTINGS_DOC: dict[str, tuple[str, str]] = {
    "REDIS_URL": (
        "redis://localhost:6379/0", "Metadata store URL (Redis, Valkey or DragonflyDB); its "
        "user, if any, is the companions' (the operator copies the URL into executor pods)."),
    "REDIS_SECRET": (
        "", "Secret (key password) with the companions' store password, read via "
        "secretKeyRef in each executor's namespace (their user is the one in "
        "MULAMBDA_REDIS_URL); empty: no password."),
    "REDIS_CLIENT_SECRET": (
        "", "Secret (keys username, password) with the read-only store user Client workloads "
        "get, in each workload's namespace; empty: workloads get no store access at all."),
    "REDIS_CLIENT_NAMESPACES": (
        "", "Comma-separated namespaces that hold that Secret: only Client workloads there get "
        "the store user, the others the selector alone (a reference to a Secret a namespace "
        "lacks keeps the workload from starting); empty: every namespace."),
    "KEY_PREFIX": ("mulambda", "Prefix of every key mulambda writes in the store."),
    "SERVING_IMAGE": (DEFAULT_SERVING_IMAGE, "Default TF Serving image for executors."),
    "COMPANION_IMAGE": (DEFAULT_COMPANION_IMAGE, "Image of the companion sidecar (this project)."),
    "IMAGE_PULL_POLICY": ("IfNotPresent", "Pull policy of the containers the operator creates."),
    "IMAGE_PULL_SECRETS": (
        "", "Comma-separated image pull Secrets of the pods the operator creates (executors, "
        "Client workloads), for a private companion or serving image; each must be in the "
        "pod's namespace (the kubelet skips a missing one with a warning Event)."),
    "S3_ENDPOINT": (
        "minio.mulambda.svc:9000", "S3/MinIO endpoint (host:port) models are read from."),
    "S3_SECURE": ("false", "Use TLS to talk to the S3 endpoint."),
    "S3_REGION": ("", "S3 region, if the store needs one."),
    "S3_SECRET": (
        "mulambda-s3", "Default Secret (keys accessKey, secretKey) with S3 credentials."),
    "SELECTOR_URL": (
        "http://mulambda-selector.mulambda.svc:8080", "Selector API URL injected into workloads; "
        "set and empty: there is no selector, and workloads get none."),
    "SELECTOR_AUTH": (
        "true", "Selector and gateway callers must present a ServiceAccount token allowed to "
        "`select` the Client (mulambda.authz); false only for local development (warned at "
        "start)."),
    "CLUSTER_DOMAIN": ("cluster.local", "Cluster DNS domain used in executor endpoints."),
    "HEARTBEAT_TTL_SECONDS": ("30", "How long a replica heartbeat lives without renewal."),
    "PROBE_INTERVAL_SECONDS": (
        "10", "How often companions probe clients (and the operator re-selects)."),
    "RECONCILE_INTERVAL_SECONDS": ("10", "Timer that re-converges every resource."),
    "AUTOSCALE_INTERVAL_SECONDS": (
        "2", "How often the operator samples demand and runs the autoscaler."),
    "RETRY_MAX_DELAY_SECONDS": ("60", "Upper bound of the back-off when the store is unreachable."),
    "LOG_LEVEL": (
        "INFO", "Log level of every entry point: DEBUG, INFO, WARNING, ERROR or CRITICAL."),
}

# Per process, from a Secret through secretKeyRef, never from the shared ConfigMap:
# read where they are used (mulambda.store.metadata, mulambda.storage.s3).
CREDENTIALS_DOC: dict[str, str] = {
    "REDIS_USERNAME": "The store ACL user this process logs in as (mulambda.store.acl: "
                      "mulambda-operator, -selector, -companion, -sdk, -client); wins over "
                      "the URL's user.",
    "REDIS_PASSWORD": "That user's password.",
    "S3_ACCESS_KEY": "S3 access key (companions, `mulambda models`).",
    "S3_SECRET_KEY": "S3 secret key (companions, `mulambda models`).",
    "HEARTBEAT_SECRET": "The operator's secret every executor's heartbeat signing key is "
                        "derived from (mulambda.store.heartbeats); unset: executors' "
                        "heartbeats are not signed (warned at start).",
}

# The companion's section, read besides the shared one. A default that is not a
# literal ("TTL / 3") is computed by CompanionSettings.from_env.
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
    "HEARTBEAT_KEY_FILE": (
        "", "This executor's heartbeat signing key (the operator mounts it from the Secret "
        "NAME-heartbeat-KEYHASH); empty: heartbeats are not signed."),
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
    "WORKER_CONCURRENCY": (
        "4", "Tasks this pod's worker runs at once (the executor's target concurrency; 0 "
        "turns the worker off)."),
    "TASK_VISIBILITY_SECONDS": (
        "30", "A task taken by a worker that stops renewing it for this long (the pod died "
        "or froze) is delivered again."),
    "TASK_DRAIN_SECONDS": (
        "20", "On SIGTERM, how long running tasks may finish before they go back to the "
        "queue."),
    "TASK_PREDICT_TIMEOUT_SECONDS": (
        "300", "Longest a worker waits for TF Serving's answer to one task."),
    "TASK_MAX_RESULT_BYTES": (
        "16777216", "Largest answer of TF Serving a worker keeps as a task's result; a "
        "larger one fails the task (it would be as large again)."),
}


# The selector's own section (mulambda.selector; defaults as in mulambda.store.metadata).
SELECTOR_SETTINGS_DOC: dict[str, tuple[str, str]] = {
    "REDIS_POOL_SIZE": (
        "64", "Store connections of one selector process; a request that finds them all "
        "busy waits for one."),
    "REDIS_POOL_TIMEOUT_SECONDS": (
        "5", "How long a request waits for a free store connection before it answers 503."),
    "TASK_MAX_PAYLOAD_BYTES": (
        "1048576", "Largest task body `POST /v1/tasks` accepts; larger gets 413."),
    "TASK_TTL_SECONDS": (
        "86400", "How long a task (and its Idempotency-Key) lives without an outcome."),
    "TASK_RESULT_TTL_SECONDS": ("3600", "How long a task's result is kept once written."),
    "TASK_MAX_ATTEMPTS": (
        "3", "Deliveries of a task before it goes to the dead-letter stream."),
    "TASK_MAX_OPEN_PER_CLIENT": (
        "1000", "Tasks a Client may have queued or running at once; one more gets 429 "
        "(bounds what one tenant holds in the shared store: at most this many bodies of "
        "up to `TASK_MAX_PAYLOAD_BYTES`)."),
}


class SettingsError(ValueError):
    """A ``MULAMBDA_*`` variable is missing or malformed; the message names it."""


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


class Env:
    """Typed ``MULAMBDA_*`` values, defaulting to ``table``'s literal defaults.

    The one parser of every section: a bad value raises
    :class:`SettingsError` naming the variable.
    """

    def __init__(
        self, table: Mapping[str, tuple[str, str]], environ: Mapping[str, str] | None = None
    ) -> None:
        self.table = table
        self.environ = os.environ if environ is None else environ

    def raw(self, name: str) -> str:
        """The variable's value, stripped; "" when unset."""
        return self.environ.get(PREFIX + name, "").strip()

    def text(self, name: str, default: str | None = None) -> str:
        """The value, else ``default``, else the table's default."""
        return self.raw(name) or (self.table[name][0] if default is None else default)

    def flag(self, name: str) -> bool:
        return _flag(self.text(name))

    def number(
        self, name: str, default: float | None = None, *, kind: type = float,
        minimum: float = 0.0, positive: bool = False,
    ) -> float:
        """A number >= ``minimum`` (finite and > 0 if ``positive``); unset: the default."""
        raw = self.raw(name)
        if not raw:
            return kind(self.table[name][0]) if default is None else default
        try:
            value = kind(raw)
        except ValueError as exc:
            raise SettingsError(f"{PREFIX}{name} must be a number, got {raw!r}") from exc
        if positive and not (math.isfinite(value) and value > 0):
            raise SettingsError(f"{PREFIX}{name} must be a positive number, got {raw!r}")
        if value < minimum:
            raise SettingsError(f"{PREFIX}{name} must be >= {minimum}, got {raw!r}")
        return value


# Companion intervals below this would spin the loops.
_MIN_SECONDS = 0.01


def _default(name: str) -> str:
    return SETTINGS_DOC[name][0]


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(environ: Mapping[str, str] | None = None) -> str:
    """``MULAMBDA_LOG_LEVEL``, upper-cased; :class:`SettingsError` when it is none of
    :data:`LOG_LEVELS` (every entry point reads it, also those that need no other
    setting)."""
    level = Env(SETTINGS_DOC, environ).text("LOG_LEVEL").strip().upper()
    if level not in LOG_LEVELS:
        raise SettingsError(f"{PREFIX}LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, "
                            f"not {level!r}")
    return level


@dataclass(frozen=True)
class Settings:
    """The shared section, typed; field ``x_y`` is ``MULAMBDA_X_Y``. Build with :meth:`from_env`."""

    redis_url: str = _default("REDIS_URL")
    redis_secret: str = _default("REDIS_SECRET")
    redis_client_secret: str = _default("REDIS_CLIENT_SECRET")
    redis_client_namespaces: str = _default("REDIS_CLIENT_NAMESPACES")
    key_prefix: str = _default("KEY_PREFIX")
    serving_image: str = _default("SERVING_IMAGE")
    companion_image: str = _default("COMPANION_IMAGE")
    image_pull_policy: str = _default("IMAGE_PULL_POLICY")
    image_pull_secrets: str = _default("IMAGE_PULL_SECRETS")
    s3_endpoint: str = _default("S3_ENDPOINT")
    s3_secure: bool = _flag(_default("S3_SECURE"))
    s3_region: str = _default("S3_REGION")
    s3_secret: str = _default("S3_SECRET")
    selector_url: str = _default("SELECTOR_URL")
    selector_auth: bool = _flag(_default("SELECTOR_AUTH"))
    cluster_domain: str = _default("CLUSTER_DOMAIN")
    heartbeat_ttl_seconds: float = float(_default("HEARTBEAT_TTL_SECONDS"))
    probe_interval_seconds: float = float(_default("PROBE_INTERVAL_SECONDS"))
    reconcile_interval_seconds: float = float(_default("RECONCILE_INTERVAL_SECONDS"))
    autoscale_interval_seconds: float = float(_default("AUTOSCALE_INTERVAL_SECONDS"))
    retry_max_delay_seconds: float = float(_default("RETRY_MAX_DELAY_SECONDS"))
    log_level: str = _default("LOG_LEVEL")
    extra: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def pull_secrets(self) -> list[dict[str, str]]:
        """``imagePullSecrets`` of the pods the operator creates."""
        return [{"name": n} for n in names(self.image_pull_secrets)]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``MULAMBDA_*`` variables; unknown ones are ignored, bad values raise."""
        env = Env(SETTINGS_DOC, environ)
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f.name.upper()
            if name not in SETTINGS_DOC:
                continue
            if f.type in ("float", float):
                # Every number here is an interval or a TTL.
                values[f.name] = env.number(name, positive=True)
            elif f.type in ("bool", bool):
                values[f.name] = env.flag(name)
            else:
                values[f.name] = env.text(name)
        values["log_level"] = log_level(environ)
        if env.environ.get(f"{PREFIX}SELECTOR_URL") == "":
            # The chart says so when it runs no selector: the default would send workloads'
            # tokens to a selector that may be another release's.
            values["selector_url"] = ""
        settings = cls(**values)  # type: ignore[arg-type]
        if _carries_password(settings.redis_url):
            # The URL is copied into every executor and workload pod spec: a
            # password there would be readable by anyone who can read Deployments.
            raise SettingsError(
                f"{PREFIX}REDIS_URL must not carry a password; put it in a Secret (key "
                f"'password') and name that Secret in {PREFIX}REDIS_SECRET (the operator "
                f"hands it to pods), or give it in {PREFIX}REDIS_PASSWORD (the CLI)")
        return settings


def names(text: str) -> list[str]:
    """The names of a comma-separated setting, blanks dropped."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _carries_password(url: str) -> bool:
    """Whether a store URL holds a password: in its user part, or in its query, where
    redis-py reads one too (``?password=``)."""
    parts = urlsplit(url)
    return parts.password is not None or any(
        name.lower() == "password" for name in parse_qs(parts.query, keep_blank_values=True))


@dataclass(frozen=True)
class CompanionSettings:
    """The companion's section plus the shared one. Build with :meth:`from_env`.

    The operator sets these in the companion container of every executor pod
    (pod name and IP through the downward API). S3 endpoint and credentials
    are read by :meth:`mulambda.storage.s3.ModelStorage.from_env`, never
    here, so no secret ever passes through this object.
    """

    namespace: str
    executor_name: str
    bucket: str
    prefix: str
    model_name: str
    version: int | None
    models_dir: str
    pod_name: str
    pod_ip: str
    shared: Settings
    serving_rest_url: str
    http_host: str
    http_port: int
    heartbeat_interval: float
    probe_timeout: float
    probe_concurrency: int
    probe_jitter: float
    latency_alpha: float
    latency_ttl: float
    serving_poll: float
    version_watch: float
    load_workers: int
    retry_base_delay: float
    failed_retry: float
    worker_concurrency: int = 4
    task_visibility: float = 30.0
    task_drain: float = 20.0
    task_predict_timeout: float = 300.0
    task_max_result_bytes: int = 16 << 20
    heartbeat_key_file: str = ""

    @property
    def executor_id(self) -> str:
        return f"{self.namespace}/{self.executor_name}"

    @property
    def heartbeat_ttl(self) -> float:
        return self.shared.heartbeat_ttl_seconds

    @property
    def probe_interval(self) -> float:
        return self.shared.probe_interval_seconds

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CompanionSettings:
        """Read both sections; raise :class:`SettingsError` naming the bad variable."""
        shared = Settings.from_env(environ)
        env = Env(COMPANION_SETTINGS_DOC, environ)

        executor = env.raw("EXECUTOR")
        namespace, _, name = executor.rpartition("/")
        namespace = namespace or env.raw("POD_NAMESPACE")
        if not namespace or not name:
            raise SettingsError(
                f"{PREFIX}EXECUTOR must be NAMESPACE/NAME (or NAME with {PREFIX}POD_NAMESPACE), "
                f"got {executor!r}"
            )

        uri = env.raw("MODEL_URI")
        if uri:
            match = S3_URI.match(uri)
            if not match:
                raise SettingsError(
                    f"{PREFIX}MODEL_URI must look like s3://bucket/prefix, got {uri!r}"
                )
            bucket, prefix = match["bucket"], match["prefix"] or ""
        else:
            bucket, prefix = env.raw("MODEL_BUCKET"), env.raw("MODEL_PREFIX")
            if not bucket:
                raise SettingsError(f"set {PREFIX}MODEL_URI (or {PREFIX}MODEL_BUCKET)")
        prefix = prefix.strip("/")

        model_name = env.raw("MODEL_NAME") or prefix.rsplit("/", 1)[-1]
        if not model_name:
            raise SettingsError(f"{PREFIX}MODEL_NAME is required when the prefix is empty")

        version: int | None = None
        if env.raw("MODEL_VERSION"):
            # Any integer: the loader turns a negative one into a Failed InvalidVersion.
            version = int(env.number("MODEL_VERSION", kind=int, minimum=-math.inf))

        alpha = env.number("LATENCY_ALPHA")
        if not 0 < alpha <= 1:
            raise SettingsError(f"{PREFIX}LATENCY_ALPHA must be in (0, 1], got {alpha}")
        return cls(
            namespace=namespace,
            executor_name=name,
            bucket=bucket,
            prefix=prefix,
            model_name=model_name,
            version=version,
            models_dir=env.text("MODELS_DIR"),
            pod_name=env.raw("POD_NAME") or socket.gethostname(),
            pod_ip=env.text("POD_IP"),
            shared=shared,
            serving_rest_url=env.text("TFSERVING_URL").rstrip("/"),
            http_host=env.text("HTTP_HOST"),
            http_port=int(env.number("HTTP_PORT", kind=int)),
            heartbeat_interval=env.number(
                "HEARTBEAT_INTERVAL_SECONDS", max(shared.heartbeat_ttl_seconds / 3, 0.1),
                minimum=_MIN_SECONDS),
            probe_timeout=env.number("PROBE_TIMEOUT_SECONDS", minimum=_MIN_SECONDS),
            probe_concurrency=int(env.number("PROBE_CONCURRENCY", kind=int, minimum=1)),
            probe_jitter=min(env.number("PROBE_JITTER"), 1.0),
            latency_alpha=alpha,
            latency_ttl=env.number(
                "LATENCY_TTL_SECONDS", 3 * shared.probe_interval_seconds, minimum=_MIN_SECONDS),
            serving_poll=env.number("SERVING_POLL_SECONDS", minimum=_MIN_SECONDS),
            version_watch=env.number("VERSION_WATCH_SECONDS", minimum=_MIN_SECONDS),
            load_workers=int(env.number("LOAD_WORKERS", kind=int, minimum=1)),
            retry_base_delay=env.number("RETRY_BASE_DELAY_SECONDS", minimum=_MIN_SECONDS),
            failed_retry=env.number("FAILED_RETRY_SECONDS", minimum=_MIN_SECONDS),
            worker_concurrency=int(env.number("WORKER_CONCURRENCY", kind=int)),
            task_visibility=env.number("TASK_VISIBILITY_SECONDS", minimum=_MIN_SECONDS),
            task_drain=env.number("TASK_DRAIN_SECONDS"),
            task_predict_timeout=env.number("TASK_PREDICT_TIMEOUT_SECONDS", positive=True),
            task_max_result_bytes=int(env.number("TASK_MAX_RESULT_BYTES", kind=int,
                                                 minimum=1)),
            heartbeat_key_file=env.text("HEARTBEAT_KEY_FILE"),
        )


@dataclass(frozen=True)
class SelectorSettings:
    """The selector's section plus the shared one. Build with :meth:`from_env`."""

    shared: Settings
    redis_pool_size: int
    redis_pool_timeout: float
    tasks: TaskOptions = field(default_factory=TaskOptions)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SelectorSettings:
        """Read both sections; raise :class:`SettingsError` naming the bad variable."""
        env = Env(SELECTOR_SETTINGS_DOC, environ)
        return cls(
            shared=Settings.from_env(environ),
            redis_pool_size=int(env.number("REDIS_POOL_SIZE", kind=int, minimum=1)),
            redis_pool_timeout=env.number("REDIS_POOL_TIMEOUT_SECONDS", positive=True),
            tasks=TaskOptions(
                max_payload_bytes=int(env.number("TASK_MAX_PAYLOAD_BYTES", kind=int, minimum=1)),
                ttl_seconds=env.number("TASK_TTL_SECONDS", minimum=1),
                result_ttl_seconds=env.number("TASK_RESULT_TTL_SECONDS", minimum=1),
                max_attempts=int(env.number("TASK_MAX_ATTEMPTS", kind=int, minimum=1)),
                max_open_per_client=int(env.number("TASK_MAX_OPEN_PER_CLIENT", kind=int,
                                                   minimum=1)),
            ),
        )
