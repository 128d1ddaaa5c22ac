"""What a client asks of selection: hard criteria, soft weights, optional limits.

:class:`Criteria` is the one definition of these fields. The store's
:class:`mulambda.store.records.ClientRecord` extends it with the Client's
identity, so the operator registers exactly what selection reads; the
selector builds one from a request body (:meth:`Criteria.from_request`).
The CRD's own ``spec.criteria`` (type, input, output only) is
:class:`mulambda.api.client.ClientCriteria`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ColdStart", "Criteria"]

ColdStart = Literal["Wait", "UseWarm"]


@dataclass(frozen=True)
class Criteria:
    """What a client asks for: hard criteria, soft weights, optional limits."""

    type: str
    input: str | None = None
    output: str | None = None
    latency_weight: float = 1.0
    accuracy_weight: float = 1.0
    max_latency_ms: float | None = None
    min_accuracy: float | None = None
    cold_start: ColdStart = "UseWarm"

    def __post_init__(self) -> None:
        if not self.type:
            raise ValueError("criteria.type is required")
        for name in ("latency_weight", "accuracy_weight", "max_latency_ms", "min_accuracy"):
            value = getattr(self, name)
            # NaN compares False with everything, so it would pass every check below.
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")
        if self.latency_weight < 0 or self.accuracy_weight < 0:
            raise ValueError("preference weights must be non-negative")
        if self.max_latency_ms is not None and self.max_latency_ms <= 0:
            raise ValueError("max_latency_ms must be positive")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise ValueError("min_accuracy must be within [0, 1]")
        if self.cold_start not in ("Wait", "UseWarm"):
            raise ValueError("cold_start must be 'Wait' or 'UseWarm'")

    @classmethod
    def from_request(
        cls, required: Mapping[str, Any], desired: Mapping[str, Any] | None = None,
        base: Criteria | None = None,
    ) -> Criteria:
        """Criteria from the selector request shape of the MuLambda prototype.

        ``required`` holds hard criteria (``type``, ``input``, ``output``) and
        limits (``max_latency_ms``/``maxLatencyMs``, ``min_accuracy``/
        ``minAccuracy``); ``desired`` holds weights (``latency``,
        ``accuracy``). Fields not given come from ``base`` (the registered
        client) or the defaults. Raises ValueError on bad values.
        """
        desired = desired or {}

        def pick(src: Mapping[str, Any], *names: str, default: Any = None) -> Any:
            for n in names:
                if src.get(n) is not None:
                    return src[n]
            return default

        def number(value: Any, what: str) -> float | None:
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{what} must be a number, got {value!r}")
            if not math.isfinite(value):  # json.loads accepts NaN and Infinity
                raise ValueError(f"{what} must be a finite number, got {value!r}")
            return float(value)

        b = base
        kind = pick(required, "type", default=b.type if b else None)
        if not isinstance(kind, str) or not kind:
            raise ValueError("required.type (the model type) is required")
        for name in ("input", "output"):
            if required.get(name) is not None and not isinstance(required[name], str):
                raise ValueError(f"required.{name} must be a string")
        lat_w = number(pick(desired, "latency", "latency_weight"), "desired.latency")
        acc_w = number(pick(desired, "accuracy", "accuracy_weight"), "desired.accuracy")
        max_lat = number(
            pick(required, "max_latency_ms", "maxLatencyMs"), "required.max_latency_ms"
        )
        min_acc = number(pick(required, "min_accuracy", "minAccuracy"), "required.min_accuracy")
        cold = pick(required, "cold_start", "coldStart")
        return cls(
            type=kind,
            input=pick(required, "input", default=b.input if b else None),
            output=pick(required, "output", default=b.output if b else None),
            latency_weight=lat_w if lat_w is not None else (b.latency_weight if b else 1.0),
            accuracy_weight=acc_w if acc_w is not None else (b.accuracy_weight if b else 1.0),
            max_latency_ms=max_lat if max_lat is not None else (b.max_latency_ms if b else None),
            min_accuracy=min_acc if min_acc is not None else (b.min_accuracy if b else None),
            cold_start=cold or (b.cold_start if b else "UseWarm"),
        )

    def to_request(self) -> dict[str, Any]:
        """The selector request body that :meth:`from_request` turns back into these
        criteria."""
        required: dict[str, Any] = {"type": self.type, "cold_start": self.cold_start}
        for name in ("input", "output", "max_latency_ms", "min_accuracy"):
            if getattr(self, name) is not None:
                required[name] = getattr(self, name)
        return {"required": required, "desired": {"latency": self.latency_weight,
                                                  "accuracy": self.accuracy_weight}}
