"""The ModelExecutor spec: model, traits, scaling, serving pod overrides."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mulambda.storage.layout import S3_URI

from .common import SpecError, _Model, check_resources, explain, parse_quantity


class ModelRef(_Model):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
    storage_uri: str = Field(alias="storageUri")
    # At most 15 digits: a heartbeat's version of 16 or more reads as a float and is dropped.
    version: int | None = Field(default=None, ge=1, le=10**15 - 1)
    credentials_secret: str | None = Field(default=None, alias="credentialsSecret")

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
    service_time_ms: float | None = Field(default=None, ge=0, le=3_600_000, alias="serviceTimeMs")


class Scaling(_Model):
    min_replicas: int = Field(default=1, ge=0, le=1000, alias="minReplicas")
    max_replicas: int = Field(default=3, ge=1, le=1000, alias="maxReplicas")
    target_concurrency: float = Field(default=4.0, ge=0.1, alias="targetConcurrency")
    idle_window_seconds: int = Field(default=300, ge=0, alias="idleWindowSeconds")
    stable_window_seconds: int = Field(default=60, ge=1, alias="stableWindowSeconds")
    panic_window_seconds: int = Field(default=6, ge=1, alias="panicWindowSeconds")
    scale_down_delay_seconds: int = Field(default=30, ge=0, alias="scaleDownDelaySeconds")
    #: Requests in flight kept spare ahead of demand (mulambda.policy.headroom).
    burst_capacity: float = Field(default=40.0, ge=0, le=100_000, alias="burstCapacity")

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


class Analysis(_Model):
    """When the operator promotes or rolls back a new version (see docs/rollouts.md)."""

    max_error_rate_increase: float = Field(default=0.05, ge=0, le=1,
                                           alias="maxErrorRateIncrease")
    max_p95_ratio: float = Field(default=1.5, ge=1, alias="maxP95Ratio")
    min_requests: int = Field(default=50, ge=1, le=10_000_000, alias="minRequests")
    duration_seconds: int = Field(default=60, ge=0, le=86_400, alias="durationSeconds")
    max_disagreement_rate: float | None = Field(default=None, ge=0, le=1,
                                                alias="maxDisagreementRate")
    progress_deadline_seconds: int = Field(default=600, ge=1, le=86_400,
                                           alias="progressDeadlineSeconds")


class Rollout(_Model):
    """How a change of ``model.version`` reaches the clients."""

    strategy: Literal["Immediate", "Canary", "Shadow"] = "Immediate"
    weight: int = Field(default=10, ge=0, le=100)
    steps: list[int] = Field(default_factory=list, max_length=20)
    analysis: Analysis = Field(default_factory=Analysis)
    drain_seconds: int = Field(default=10, ge=0, le=3600, alias="drainSeconds")

    @model_validator(mode="after")
    def _steps(self) -> Rollout:
        if any(not 1 <= s <= 100 for s in self.steps):
            raise ValueError("rollout.steps must be percentages in [1, 100]")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("rollout.steps must increase")
        if self.strategy == "Canary" and not self.steps and self.weight < 1:
            raise ValueError("a Canary needs a weight of at least 1 (0 sends the new version "
                             "nothing, and its analysis would wait forever)")
        return self

    @property
    def weights(self) -> list[int]:
        """The candidate's share at each step (one step of ``weight`` without ``steps``)."""
        return list(self.steps) or [self.weight]


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
    rollout: Rollout = Field(default_factory=Rollout)

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


def parse_executor_spec(spec: dict[str, Any]) -> ModelExecutorSpec:
    """Parse a ModelExecutor spec or raise SpecError with an actionable message."""
    try:
        return ModelExecutorSpec.model_validate(dict(spec))
    except SpecError:
        raise
    except ValidationError as exc:
        # check_resources raises SpecError inside a validator: pydantic wraps it.
        raise SpecError(explain(exc)) from None
