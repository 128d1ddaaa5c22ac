"""The Client spec: hard criteria, soft preferences, limits, an optional workload."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from .common import SpecError, _Model, explain


class ClientCriteria(_Model):
    type: str = Field(pattern=r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
    input: str | None = Field(default=None, min_length=1, max_length=128)
    output: str | None = Field(default=None, min_length=1, max_length=128)


class Preferences(_Model):
    latency: float = Field(default=1.0, ge=0)
    accuracy: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _not_both_zero(self) -> Preferences:
        # The CRD's CEL rule says the same; objects stored before it still come here.
        if self.latency == 0 and self.accuracy == 0:
            raise ValueError("preferences.latency and preferences.accuracy must not both be 0")
        return self


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


class ExperimentArm(_Model):
    executor: str = Field(pattern=r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/)?"
                                  r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
    weight: int = Field(default=50, ge=0, le=100)


class Experiment(_Model):
    """An A/B experiment over executors (docs/rollouts.md)."""

    arms: list[ExperimentArm] = Field(min_length=2, max_length=10)
    sticky_header: str | None = Field(default=None, alias="stickyHeader",
                                      pattern=r"^[A-Za-z0-9-]{1,128}$")
    sticky_field: str | None = Field(default=None, alias="stickyField",
                                     pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

    @model_validator(mode="after")
    def _arms(self) -> Experiment:
        names = [a.executor for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError("experiment.arms name an executor twice")
        if not any(a.weight for a in self.arms):
            raise ValueError("experiment.arms: at least one weight must be above 0")
        if self.sticky_header and self.sticky_field:
            raise ValueError("experiment: set stickyHeader or stickyField, not both")
        return self

    def executor_ids(self, namespace: str) -> list[tuple[str, int]]:
        """(executor id, weight) per arm; a bare name is in the Client's namespace."""
        return [(a.executor if "/" in a.executor else f"{namespace}/{a.executor}", a.weight)
                for a in self.arms]


class ClientSpec(_Model):
    criteria: ClientCriteria
    preferences: Preferences = Field(default_factory=Preferences)
    limits: Limits = Field(default_factory=Limits)
    cold_start: Literal["Wait", "UseWarm"] = Field(default="UseWarm", alias="coldStart")
    probe_url: str | None = Field(default=None, alias="probeUrl", pattern=r"^https?://\S+$")
    workload: Workload | None = None
    experiment: Experiment | None = None


def parse_client_spec(spec: dict[str, Any]) -> ClientSpec:
    """Parse a Client spec or raise SpecError with an actionable message."""
    try:
        return ClientSpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise SpecError(explain(exc)) from None
