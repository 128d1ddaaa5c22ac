"""Kubernetes-style status conditions (``metav1.Condition`` shape), pure.

Which condition types each kind has, and what their reasons mean, is in
``modelexecutor/status.py`` and ``client/status.py``. Reasons are CamelCase;
messages are sentences a user can act on.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

# Display order in status.conditions; types not listed go last.
ORDER = ("Ready", "Registered", "Progressing", "ModelLoaded")


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def condition(type_: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def summarize(type_: str, dependents: Sequence[dict[str, str]]) -> dict[str, str]:
    """The summary condition ``type_`` (KServe's ConditionSet): True when every dependent is
    True, else False with the reason and message of the first dependent that is not.

    When all are True it takes the reason and message of the last dependent, the one
    that says what the object is doing.
    """
    blocking = next((d for d in dependents if d["status"] != TRUE), None)
    if blocking is None:
        return {**dependents[-1], "type": type_}
    return condition(type_, FALSE, blocking["reason"], blocking["message"])


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
    return sorted(by_type.values(), key=lambda c: (ORDER.index(c["type"])
                                                   if c["type"] in ORDER else 99, c["type"]))


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
