"""What both custom resources share: API group, spec errors, quantities, the pydantic base.

Typed views of the custom resources are parsed once at the operator's boundary.

The CRD schema rejects most bad input before the operator sees it; these
models repeat the checks that matter (so older API servers without CEL, or
objects created before a schema change, are still caught) and add the ones a
schema cannot express (resource quantities that parse, requests <= limits).
A failure becomes :class:`SpecError`, whose message is meant for the user.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

GROUP = "mulambda.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


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
    suffix = m.group(2) or ""
    try:
        number = Decimal(m.group(1))
        if suffix[:1] in {"e", "E"} and suffix not in _SUFFIX:
            return number * Decimal(10) ** int(suffix[1:])
        return number * Decimal(_SUFFIX[suffix])
    except ArithmeticError as exc:
        # InvalidOperation ("1.2.3"), Overflow ("1e9999999999": not a ValueError, so it
        # went through pydantic and the operator's spec checks uncaught).
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from exc


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


def explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"spec.{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
