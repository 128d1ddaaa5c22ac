"""Kubernetes-style status conditions (``metav1.Condition`` shape).

Operator-owned condition types on a ModelExecutor:

- ``Registered``: the executor's record is in the metadata store.
- ``Progressing``: the Deployment is rolling out / has the desired pods.
- ``ModelLoaded``: derived from the companions' heartbeats (companion-owned
  facts, mirrored by the operator; the companions never patch the resource).
- ``Ready``: the summary a user looks at first.

Reasons are CamelCase; messages are sentences a user can act on.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def condition(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(
    existing: list[dict[str, Any]] | None,
    updates: list[dict[str, str]],
    generation: int | None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """Apply ``updates`` to ``existing``: keep ``lastTransitionTime`` unless the status
    flips, keep conditions not mentioned, stable order by type."""
    stamp = now or now_iso()
    by_type = {c["type"]: dict(c) for c in existing or [] if "type" in c}
    for upd in updates:
        old = by_type.get(upd["type"])
        new: dict[str, Any] = dict(upd)
        if generation is not None:
            new["observedGeneration"] = generation
        if old is not None and old.get("status") == upd["status"]:
            new["lastTransitionTime"] = old.get("lastTransitionTime", stamp)
        else:
            new["lastTransitionTime"] = stamp
        by_type[upd["type"]] = new
    order = ["Ready", "Registered", "Progressing", "ModelLoaded"]
    return sorted(by_type.values(), key=lambda c: (order.index(c["type"])
                                                   if c["type"] in order else 99, c["type"]))


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    for c in conditions or []:
        if c.get("type") == type_:
            return c
    return None


def conditions_equal(a: list[dict[str, Any]] | None, b: list[dict[str, Any]] | None) -> bool:
    """Equal ignoring lastTransitionTime (used to skip no-op status patches)."""

    def strip(cs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in cs or []]

    return strip(a) == strip(b)


def report_failure(
    body: kopf.Body, patch: kopf.Patch, old: list[dict[str, Any]] | None, generation: int,
    reason: str, msg: str, types: tuple[str, ...] = ("Ready",),
) -> None:
    """Set ``types`` False with ``reason``; one Warning Event per generation and reason."""
    ready = get_condition(old, "Ready")
    already = (ready is not None and ready.get("reason") == reason
               and ready.get("observedGeneration") == generation)
    patch.status["observedGeneration"] = generation
    patch.status["conditions"] = merge_conditions(
        old, [condition(t, FALSE, reason, msg) for t in types], generation)
    if not already:
        kopf.warn(body, reason=reason, message=msg)
