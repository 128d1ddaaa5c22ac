"""How a ModelExecutor's status is derived: pure functions, no I/O.

Conditions the operator sets (CamelCase reasons, messages a user can act on):

- ``Registered``: the executor's record is in the metadata store.
- ``Progressing``: the Deployment rolls out, or has every pod up to date.
- ``ModelLoaded``: from the companions' heartbeats (companion-owned facts,
  mirrored by the operator; the companions never patch the resource).
- ``Ready``: the summary a user looks at first. It is never set on its own
  but derived from the conditions in :data:`READY_DEPENDS_ON` (see
  ``k8s.conditions.summarize``), except when the operator cannot act on the
  spec at all (:func:`failure`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mulambda.api.modelexecutor import ModelExecutorSpec
from mulambda.store.records import ReplicaRecord

from ..k8s.conditions import (
    FALSE,
    TRUE,
    UNKNOWN,
    condition,
    conditions_equal,
    get_condition,
    merge_conditions,
    summarize,
)
from ..status import (
    Event,
    Problem,
    StatusUpdate,
    changed,
    failed,
    store_unavailable,
    unregistered,
)

# Ready is True when these are, else False with the reason of the first that is not.
# Serving (a replica serves; if none does, why) is not published: the replica counts
# and ModelLoaded show it.
READY_DEPENDS_ON = ("Registered", "Serving")
# Ready reasons that are a normal state, not a problem: their Events are Normal.
QUIET_NOT_READY = frozenset({"WaitingForReplicas", "ScaledToZero"})
# How a user fixes what the operator cannot act on, by reason.
FIXES = {
    "InvalidSpec": "Fix the ModelExecutor; existing pods are left as they are.",
    "Rejected": "Fix the ModelExecutor spec.",
    "Forbidden": ("Grant the operator's ServiceAccount the permissions operator/rbac.py lists "
                  "(the Helm chart and manifests/ do)"),
}


@dataclass(frozen=True)
class Rollout:
    """The replica counts of the executor's Deployment."""

    desired: int
    current: int
    ready: int
    updated: int
    # The Deployment controller has not seen our last change yet: the counts
    # still describe the previous template.
    unobserved: bool = False

    @classmethod
    def of(cls, deployment: Mapping[str, Any]) -> Rollout:
        status = deployment.get("status") or {}
        generation = int(deployment.get("metadata", {}).get("generation") or 0)
        return cls(desired=int(deployment.get("spec", {}).get("replicas") or 0),
                   current=int(status.get("replicas") or 0),
                   ready=int(status.get("readyReplicas") or 0),
                   updated=int(status.get("updatedReplicas") or 0),
                   unobserved=int(status.get("observedGeneration") or 0) < generation)


@dataclass(frozen=True)
class ModelReport:
    """What the heartbeats say: the ModelLoaded condition, ``status.model``, and the
    failure of a new version while an older one keeps serving (None when there is none)."""

    condition: dict[str, str]
    status: dict[str, Any]
    new_version_failure: str | None = None

    @property
    def failed(self) -> bool:
        return bool(self.status["state"] == "Failed")


# Reasons of a Loading heartbeat that is making progress (companion/lifecycle.py); any
# other is a problem it retries.
_ON_ITS_WAY = frozenset({"", "Starting", "Downloading", "WaitingForServing", "RollingBack"})


def model_report(heartbeats: Sequence[ReplicaRecord], desired: int) -> ModelReport:
    """ModelLoaded and ``status.model`` from the companions' live heartbeats."""
    available = [r for r in heartbeats if r.state == "Available"]
    failing = sorted((r for r in heartbeats if r.state == "Failed"), key=lambda r: r.pod)
    if available:
        version = max((r.version or 0) for r in available)
        loaded = condition("ModelLoaded", TRUE, "ModelAvailable",
                           f"Version {version} is AVAILABLE in TF Serving on "
                           f"{len(available)}/{len(heartbeats)} reporting replica(s).")
        if failing:
            # Old pods still serve (maxUnavailable 0) while new ones cannot
            # load: the rollout is stuck, say why instead of looking healthy.
            first = failing[0]
            reason = first.reason or "LoadFailed"
            message = (f"Replica {first.pod} failed to load the model "
                       f"({reason}): {first.message or first.reason}; "
                       f"version {version} keeps serving.")
            return ModelReport(loaded, {"loadedVersion": str(version), "state": "Available",
                                        "reason": reason, "message": message}, message)
        switching = sorted((r for r in available if r.reason.startswith("VersionSwitch")),
                           key=lambda r: r.pod)
        if switching:
            # Serving, but its switch to a newer version is stuck (retrying, or failed
            # for good): said in status.model, not as a failure of the serving version.
            first = switching[0]
            return ModelReport(loaded, {
                "loadedVersion": str(version), "state": "Available", "reason": first.reason,
                "message": f"Replica {first.pod} serves version {first.version or version} "
                           f"but cannot switch to a newer one: {first.message}"})
        return ModelReport(loaded, {"loadedVersion": str(version), "state": "Available",
                                    "reason": "", "message": ""})
    if failing:
        first = failing[0]
        reason = first.reason or "LoadFailed"
        loaded = condition("ModelLoaded", FALSE, reason,
                           f"Replica {first.pod} failed to load the model: "
                           f"{first.message or reason}")
        return ModelReport(loaded, {"state": "Failed", "reason": reason,
                                    "message": first.message or ""})
    if heartbeats:
        # A replica that retries a problem (S3 down, a full disk) says why; one that is
        # simply on its way says what it is doing. The problem first.
        first = min(heartbeats, key=lambda r: (r.reason in _ON_ITS_WAY, r.pod))
        detail = f" Replica {first.pod}: {first.message or first.reason}" if (
            first.reason or first.message) else ""
        loaded = condition("ModelLoaded", FALSE, "Loading",
                           f"{len(heartbeats)} replica(s) are downloading or loading the "
                           f"model.{detail}")
        return ModelReport(loaded, {"state": "Loading", "reason": first.reason or "Loading",
                                    "message": first.message or ""})
    if desired == 0:
        loaded = condition("ModelLoaded", UNKNOWN, "ScaledToZero",
                           "No replicas run; the model loads when the executor is activated.")
        return ModelReport(loaded, {"state": "ScaledToZero", "reason": "", "message": ""})
    loaded = condition("ModelLoaded", UNKNOWN, "NoHeartbeat", "No companion has reported yet.")
    return ModelReport(loaded, {"state": "Pending", "reason": "", "message": ""})


def executor_state(rollout: Rollout, model: ModelReport) -> str:
    """The state in the executor's store record, what selection reads."""
    if rollout.ready > 0:
        return "Ready"
    if model.failed:
        return "Failed"
    if rollout.desired == 0:
        return "ScaledToZero"
    return "Pending"


def progressing(rollout: Rollout, model: ModelReport) -> dict[str, str]:
    """Progressing: is the Deployment still moving towards the current template?"""
    if model.new_version_failure is not None:
        return condition("Progressing", FALSE, "NewVersionFailed", model.new_version_failure)
    if rollout.unobserved:
        return condition("Progressing", TRUE, "RollingOut",
                         "Waiting for the Deployment controller to pick up the change.")
    if rollout.updated < rollout.desired or rollout.ready < rollout.desired:
        return condition("Progressing", TRUE, "RollingOut",
                         f"{rollout.ready}/{rollout.desired} replicas ready, "
                         f"{rollout.updated} up to date.")
    return condition("Progressing", FALSE, "RolloutComplete",
                     f"All {rollout.desired} replica(s) are up to date and ready.")


def serving(rollout: Rollout, model: ModelReport, model_name: str) -> dict[str, str]:
    """Serving (unpublished, Ready depends on it): a replica serves, or why none does."""
    if rollout.ready > 0:
        return condition("Serving", TRUE, "ModelServing",
                         f"Serving {model_name} on {rollout.ready} replica(s).")
    if model.failed:
        return {**model.condition, "type": "Serving"}
    if rollout.desired == 0:
        return condition("Serving", FALSE, "ScaledToZero",
                         "Scaled to zero; activates when a client needs it.")
    return condition("Serving", FALSE, "WaitingForReplicas",
                     f"0/{rollout.desired} replicas ready yet.")


def ready(known: Mapping[str, dict[str, str]]) -> dict[str, str]:
    """Ready from those of its dependents that are known, in :data:`READY_DEPENDS_ON` order
    (while the store is down only Registered is, and it is False)."""
    return summarize("Ready", [known[type_] for type_ in READY_DEPENDS_ON if type_ in known])


def ready_event(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> Event | None:
    """An Event when Ready changes status or reason: Warning unless all is well or the
    executor is simply waiting or asleep. A new executor's first state, when it is
    waiting or asleep, is no news: its creation has an Event already, and each Event is an
    API request (a backlog of executors is bound by the API server)."""
    if old is not None and (old.get("status"), old.get("reason")) == (new["status"],
                                                                      new["reason"]):
        return None
    if old is None and new["status"] != TRUE and new["reason"] in QUIET_NOT_READY:
        return None
    if new["status"] == TRUE or new["reason"] in QUIET_NOT_READY:
        return Event.normal(reason=new["reason"], message=new["message"])
    return Event.warning(reason=new["reason"], message=new["message"])


def model_events(old: Mapping[str, Any] | None, new: Mapping[str, Any],
                 old_model: Mapping[str, Any] | None, new_model: Mapping[str, Any]
                 ) -> list[Event]:
    """The model's story from ModelLoaded and ``status.model``: ``LoadStarted`` when
    replicas begin loading, ``Loaded`` when a version becomes AVAILABLE, and
    ``VersionSwitched`` when the serving version changes. Only on a change, so a restart,
    a scale-up beside serving replicas or a repeated refresh posts nothing."""
    events = []
    was = (old or {}).get("reason")
    if new["reason"] == "Loading" and was != "Loading":
        events.append(Event.normal(reason="LoadStarted", message=new["message"]))
    if new["status"] == TRUE and (old or {}).get("status") != TRUE:
        events.append(Event.normal(reason="Loaded", message=new["message"]))
    before, after = (old_model or {}).get("loadedVersion"), new_model.get("loadedVersion")
    if before and after and before != after:
        events.append(Event.normal(reason="VersionSwitched",
                                   message=f"Serving version {after} (was {before})."))
    return events


def executor_status(
    executor_id: str,
    spec: ModelExecutorSpec,
    deployment: Mapping[str, Any],
    heartbeats: Sequence[ReplicaRecord],
    store_problem: Problem | None,
    endpoint: dict[str, str],
    previous: Mapping[str, Any],
    generation: int,
    now: str | None = None,
) -> StatusUpdate:
    """The executor's status from its Deployment, its companions' heartbeats and whether
    its record reached the store (``store_problem`` None) or not.

    Only fields that changed are in the update. While the store is down only
    Registered, Ready and the replica counts move: the heartbeats are not known.
    """
    rollout = Rollout.of(deployment)
    counts = changed(previous, {
        "observedGeneration": generation,
        "desiredReplicas": rollout.desired,
        "replicas": rollout.current,
        "readyReplicas": rollout.ready,
        "replicaSummary": f"{rollout.ready}/{rollout.desired}",
        "endpoint": endpoint,
    })
    if store_problem is not None:
        update = store_unavailable(
            previous, generation, store_problem,
            also=[ready({"Registered": unregistered(store_problem)})], now=now)
        return StatusUpdate({**update.fields, **counts}, update.events, update.problem)

    model = model_report(heartbeats, rollout.desired)
    registered = condition("Registered", TRUE, "Registered",
                           f"Registered in the metadata store as {executor_id}.")
    summary = ready({"Registered": registered,
                     "Serving": serving(rollout, model, spec.model.name)})
    old = previous.get("conditions")
    conditions = merge_conditions(
        old, [registered, progressing(rollout, model), model.condition, summary], generation, now)
    fields = dict(counts)
    events = model_events(get_condition(old, "ModelLoaded"), model.condition,
                          previous.get("model"), model.status)
    events += [e for e in [ready_event(get_condition(old, "Ready"), summary)] if e is not None]
    if not conditions_equal(old, conditions):
        fields["conditions"] = conditions
    stuck = model.new_version_failure
    if stuck is not None and previous.get("lastFailure") != stuck:
        fields["lastFailure"] = stuck
        events.append(Event.warning(reason="NewVersionFailed", message=stuck))
    # A merge patch keeps keys it does not mention: write only what is new or different.
    if previous.get("model") != {**(previous.get("model") or {}), **model.status}:
        fields["model"] = model.status
    if model.failed and previous.get("lastFailure") != model.condition["message"]:
        fields["lastFailure"] = model.condition["message"]
    return StatusUpdate(fields, events)


def failure(
    reason: str, detail: str, previous: Mapping[str, Any], generation: int,
    now: str | None = None,
) -> StatusUpdate:
    """Ready and Progressing False with ``reason`` (``InvalidSpec``, ``NameConflict``,
    ``Rejected``, ``Forbidden``): the operator cannot act on the executor as it is."""
    fix = FIXES.get(reason)
    return failed(previous, generation, reason, f"{detail}. {fix}" if fix else detail,
                  ("Ready", "Progressing"), now)
