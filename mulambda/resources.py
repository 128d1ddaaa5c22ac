"""Typed views of the custom resources, parsed once at the operator's boundary.

The CRD schema rejects most bad input before the operator sees it; these
models repeat the checks that matter (so older API servers without CEL, or
objects created before a schema change, are still caught) and add the ones a
schema cannot express (resource quantities that parse, requests <= limits).
A failure becomes :class:`SpecError`, whose message is meant for the user.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

GROUP = "mulambda.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

S3_URI = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>\S*))?$")


class SpecError(ValueError):
    """A spec the operator cannot act on; the message says what to fix."""


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")
_SUFFIX: dict[str, int | Decimal] = {
    "": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}


def parse_quantity(value: Any) -> Decimal:
    """Parse a Kubernetes resource quantity ("500m", "1Gi", 2) or raise ValueError."""
    text = str(value).strip()
    m = _QUANTITY.match(text)
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 1Gi)")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation as exc:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from exc
    suffix = m.group(2) or ""
    if suffix[:1] in {"e", "E"} and suffix not in _SUFFIX:
        return number * Decimal(10) ** int(suffix[1:])
    return number * Decimal(_SUFFIX[suffix])


def check_resources(resources: dict[str, Any] | None, where: str) -> None:
    """Raise SpecError unless ``resources`` is a valid ResourceRequirements."""
    if not resources:
        return
    unknown = set(resources) - {"requests", "limits", "claims"}
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}; use requests/limits")
    parsed: dict[str, dict[str, Decimal]] = {}
    for kind in ("requests", "limits"):
        block = resources.get(kind) or {}
        if not isinstance(block, dict):
            raise SpecError(f"{where}.{kind} must be a map of resource name to quantity")
        for name, qty in block.items():
            try:
                parsed.setdefault(kind, {})[name] = parse_quantity(qty)
            except ValueError as exc:
                raise SpecError(f"{where}.{kind}.{name}: {exc}") from exc
    for name, req in parsed.get("requests", {}).items():
        limit = parsed.get("limits", {}).get(name)
        if limit is not None and req > limit:
            raise SpecError(
                f"{where}: requests.{name} ({resources['requests'][name]}) exceeds "
                f"limits.{name} ({resources['limits'][name]})"
            )


class ModelRef(_Model):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
    storage_uri: str = Field(alias="storageUri")
    version: int | None = Field(default=None, ge=1)
    credentials_secret: str | None = Field(default=None, alias="credentialsSecret")

    @property
    def bucket(self) -> str:
        m = S3_URI.match(self.storage_uri)
        assert m is not None  # validated
        return m.group("bucket")

    @property
    def prefix(self) -> str:
        m = S3_URI.match(self.storage_uri)
        assert m is not None
        return (m.group("prefix") or "").strip("/")

    @model_validator(mode="after")
    def _uri(self) -> ModelRef:
        if not S3_URI.match(self.storage_uri):
            raise ValueError(
                f"storageUri {self.storage_uri!r} must look like s3://BUCKET/PREFIX "
                "(bucket: 3-63 lowercase letters, digits, dots, dashes)"
            )
        return self


class Traits(_Model):
    type: str = Field(pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
    input: str = Field(min_length=1, max_length=128)
    output: str = Field(min_length=1, max_length=128)
    accuracy: float | None = Field(default=None, ge=0, le=1)
    service_time_ms: float | None = Field(default=None, ge=0, alias="serviceTimeMs")


class Scaling(_Model):
    min_replicas: int = Field(default=1, ge=0, le=1000, alias="minReplicas")
    max_replicas: int = Field(default=3, ge=1, le=1000, alias="maxReplicas")
    target_concurrency: float = Field(default=4.0, ge=0.1, alias="targetConcurrency")
    idle_window_seconds: int = Field(default=300, ge=0, alias="idleWindowSeconds")
    stable_window_seconds: int = Field(default=60, ge=1, alias="stableWindowSeconds")
    panic_window_seconds: int = Field(default=6, ge=1, alias="panicWindowSeconds")
    scale_down_delay_seconds: int = Field(default=30, ge=0, alias="scaleDownDelaySeconds")

    @model_validator(mode="after")
    def _bounds(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"scaling.minReplicas ({self.min_replicas}) must not exceed "
                f"scaling.maxReplicas ({self.max_replicas})"
            )
        return self


class Serving(_Model):
    image: str | None = Field(default=None, min_length=1)
    resources: dict[str, Any] | None = None
    args: list[str] = Field(default_factory=list)


class Companion(_Model):
    resources: dict[str, Any] | None = None


class ModelVolume(_Model):
    size_limit: int | str | None = Field(default=None, alias="sizeLimit")
    medium: Literal["", "Memory"] = ""


class ModelExecutorSpec(_Model):
    model: ModelRef
    traits: Traits
    scaling: Scaling = Field(default_factory=Scaling)
    serving: Serving = Field(default_factory=Serving)
    companion: Companion = Field(default_factory=Companion)
    model_volume: ModelVolume = Field(default_factory=ModelVolume, alias="modelVolume")
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    service_account_name: str | None = Field(default=None, alias="serviceAccountName")

    @model_validator(mode="after")
    def _quantities(self) -> ModelExecutorSpec:
        check_resources(self.serving.resources, "spec.serving.resources")
        check_resources(self.companion.resources, "spec.companion.resources")
        if self.model_volume.size_limit is not None:
            try:
                parse_quantity(self.model_volume.size_limit)
            except ValueError as exc:
                raise SpecError(f"spec.modelVolume.sizeLimit: {exc}") from exc
        return self


class Criteria(_Model):
    type: str = Field(pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
    input: str | None = Field(default=None, min_length=1, max_length=128)
    output: str | None = Field(default=None, min_length=1, max_length=128)


class Preferences(_Model):
    latency: float = Field(default=1.0, ge=0)
    accuracy: float = Field(default=1.0, ge=0)


class Limits(_Model):
    max_latency_ms: float | None = Field(default=None, gt=0, alias="maxLatencyMs")
    min_accuracy: float | None = Field(default=None, ge=0, le=1, alias="minAccuracy")


class Workload(_Model):
    replicas: int = Field(default=1, ge=0, le=1000)
    template: dict[str, Any]

    @model_validator(mode="after")
    def _pod_template(self) -> Workload:
        # The CRD keeps the template schemaless (a full PodTemplateSpec); check
        # what the operator relies on so the user hears it here, not from a
        # Deployment the API server refuses.
        containers = (self.template.get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers:
            raise ValueError("workload.template.spec.containers must list at least one container")
        for i, c in enumerate(containers):
            if not isinstance(c, dict) or not c.get("name") or not c.get("image"):
                raise ValueError(
                    f"workload.template.spec.containers[{i}] needs a name and an image")
            if c["name"] == "mulambda-ping":
                raise ValueError("container name 'mulambda-ping' is reserved for the probe sidecar")
        return self


class ClientSpec(_Model):
    criteria: Criteria
    preferences: Preferences = Field(default_factory=Preferences)
    limits: Limits = Field(default_factory=Limits)
    cold_start: Literal["Wait", "UseWarm"] = Field(default="UseWarm", alias="coldStart")
    probe_url: str | None = Field(default=None, alias="probeUrl", pattern=r"^https?://\S+$")
    workload: Workload | None = None


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_executor_spec(spec: dict[str, Any]) -> ModelExecutorSpec:
    """Parse a ModelExecutor spec or raise SpecError with an actionable message."""
    try:
        return ModelExecutorSpec.model_validate(dict(spec))
    except SpecError:
        raise
    except ValidationError as exc:
        # check_resources raises SpecError inside a validator: pydantic wraps it.
        raise SpecError(_explain(exc)) from None


def parse_client_spec(spec: dict[str, Any]) -> ClientSpec:
    """Parse a Client spec or raise SpecError with an actionable message."""
    try:
        return ClientSpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise SpecError(_explain(exc)) from None
