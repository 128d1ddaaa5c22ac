"""What a reconcile concludes, for either kind, and the failures both kinds report alike.

A reconcile returns a :class:`StatusUpdate`: the status fields that changed,
the Events to post and, when it could not finish, the :class:`Problem` kopf
must hear of afterwards. The handlers write it (``handling.apply``); nothing
here does I/O or knows kopf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .k8s.conditions import FALSE, condition, get_condition, merge_conditions

NORMAL, WARNING = "Normal", "Warning"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event about the reconciled object."""

    type: str
    reason: str
    message: str

    @classmethod
    def normal(cls, *, reason: str, message: str) -> Event:
        return cls(NORMAL, reason, message)

    @classmethod
    def warning(cls, *, reason: str, message: str) -> Event:
        return cls(WARNING, reason, message)


@dataclass(frozen=True)
class Problem:
    """Why a reconcile did not finish: retry after ``retry_after`` seconds, or (None) not
    until the object changes."""

    message: str
    retry_after: float | None = None


@dataclass(frozen=True)
class StatusUpdate:
    """Status fields to patch, Events to post, and the problem that stopped the reconcile,
    if one did."""

    fields: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    problem: Problem | None = None

    def after(self, events: Sequence[Event]) -> StatusUpdate:
        """This update with ``events`` (what the reconcile did before deriving it) posted first."""
        return replace(self, events=[*events, *self.events])


def changed(previous: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """The ``fields`` whose value differs from ``previous``: no status write for a no-op."""
    return {key: value for key, value in fields.items() if previous.get(key) != value}


def failed(
    previous: Mapping[str, Any], generation: int, reason: str, message: str,
    types: Sequence[str], now: str | None = None,
) -> StatusUpdate:
    """The conditions ``types`` False with ``reason``: the operator cannot act on the object
    as it is, and retrying cannot help. One Warning Event per generation and reason."""
    old = previous.get("conditions")
    ready = get_condition(old, "Ready")
    reported = (ready is not None and ready.get("reason") == reason
                and ready.get("observedGeneration") == generation)
    conditions = merge_conditions(
        old, [condition(type_, FALSE, reason, message) for type_ in types], generation, now)
    return StatusUpdate(
        fields={"observedGeneration": generation, "conditions": conditions},
        events=[] if reported else [Event.warning(reason=reason, message=message)],
        problem=Problem(message),
    )


def unregistered(problem: Problem) -> dict[str, str]:
    """The Registered condition while the store does not answer."""
    return condition("Registered", FALSE, "StoreUnavailable", problem.message)


def store_unavailable(
    previous: Mapping[str, Any], generation: int, problem: Problem,
    also: Sequence[dict[str, str]] = (), now: str | None = None,
) -> StatusUpdate:
    """Registered False/``StoreUnavailable`` (and the conditions ``also``); a Warning Event
    on the first failure since the store last answered, not on every retry."""
    old = previous.get("conditions")
    registered = get_condition(old, "Registered")
    repeated = registered is not None and registered.get("reason") == "StoreUnavailable"
    conditions = merge_conditions(old, [unregistered(problem), *also], generation, now)
    return StatusUpdate(
        fields={"conditions": conditions},
        events=[] if repeated else [Event.warning(reason="StoreUnavailable",
                                                  message=problem.message)],
        problem=problem,
    )
