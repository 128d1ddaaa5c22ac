"""A ModelExecutor's status from its Deployment, heartbeats and store outcome: every reason
docs/design.md lists for Ready, Registered, Progressing and ModelLoaded, and the Events."""

from __future__ import annotations

from typing import Any

import pytest

from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.operator.k8s.objects import ObjectRef
from mulambda.operator.modelexecutor.reconcile import executor_record, last_cold_start_ms
from mulambda.operator.modelexecutor.status import (
    Rollout,
    executor_state,
    executor_status,
    failure,
    model_report,
)
from mulambda.operator.status import NORMAL, WARNING, Problem
from mulambda.store.records import ReplicaRecord

SPEC = parse_executor_spec({
    "model": {"name": "hp2", "storageUri": "s3://models/hp2", "version": 1},
    "traits": {"type": "regression", "input": "i", "output": "o"},
})
ENDPOINT = {"rest": "http://hp2.ml.svc:8501", "grpc": "hp2.ml.svc:8500"}
NOW = "2026-12-01T00:00:00Z"


def deployment(desired: int = 1, ready: int = 0, updated: int | None = None,
               generation: int = 1, observed: int = 1) -> dict[str, Any]:
    return {"metadata": {"generation": generation},
            "spec": {"replicas": desired},
            "status": {"replicas": desired, "readyReplicas": ready,
                       "updatedReplicas": desired if updated is None else updated,
                       "observedGeneration": observed}}


def heartbeat(pod: str, state: str, version: int = 1, reason: str = "",
              message: str = "") -> ReplicaRecord:
    return ReplicaRecord(executor="ml/hp2", pod=pod, state=state, version=version,
                         reason=reason, message=message)


def derive(dep: dict[str, Any], heartbeats: list[ReplicaRecord],
           previous: dict[str, Any] | None = None, problem: Problem | None = None,
           generation: int = 1):
    return executor_status("ml/hp2", SPEC, dep, heartbeats, problem, ENDPOINT,
                           previous or {}, generation, NOW)


def conditions(fields: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in fields["conditions"]}


def written(previous: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``previous`` after a merge patch of ``fields`` (status.model merges by key)."""
    model = {**(previous.get("model") or {}), **(fields.get("model") or {})}
    return {**previous, **fields, **({"model": model} if model else {})}


AVAILABLE = heartbeat("hp2-a", "Available")
LOADING = heartbeat("hp2-a", "Loading")
NOT_FOUND = heartbeat("hp2-b", "Failed", reason="ModelNotFound",
                      message="s3://models/hp2/1/ has no objects")
NO_REASON = heartbeat("hp2-b", "Failed")
NEW_BROKEN = heartbeat("hp2-new", "Failed", version=2, reason="NotASavedModel",
                       message="s3://models/hp2/2/ has no saved_model.pb")


@pytest.mark.parametrize(("dep", "heartbeats", "ready", "progressing", "loaded"), [
    pytest.param(deployment(1, 1), [AVAILABLE], ("True", "ModelServing"),
                 ("False", "RolloutComplete"), ("True", "ModelAvailable"), id="serving"),
    pytest.param(deployment(1, 0, updated=0), [], ("False", "WaitingForReplicas"),
                 ("True", "RollingOut"), ("Unknown", "NoHeartbeat"), id="starting"),
    pytest.param(deployment(1, 0), [LOADING], ("False", "WaitingForReplicas"),
                 ("True", "RollingOut"), ("False", "Loading"), id="loading"),
    pytest.param(deployment(0, 0), [], ("False", "ScaledToZero"),
                 ("False", "RolloutComplete"), ("Unknown", "ScaledToZero"), id="at-zero"),
    pytest.param(deployment(1, 0), [NOT_FOUND], ("False", "ModelNotFound"),
                 ("True", "RollingOut"), ("False", "ModelNotFound"), id="load-failed"),
    pytest.param(deployment(1, 0), [NO_REASON], ("False", "LoadFailed"),
                 ("True", "RollingOut"), ("False", "LoadFailed"), id="load-failed-no-reason"),
    pytest.param(deployment(2, 1, updated=1), [AVAILABLE, NEW_BROKEN], ("True", "ModelServing"),
                 ("False", "NewVersionFailed"), ("True", "ModelAvailable"),
                 id="new-version-failed"),
    pytest.param(deployment(1, 1, generation=2, observed=1), [AVAILABLE],
                 ("True", "ModelServing"), ("True", "RollingOut"), ("True", "ModelAvailable"),
                 id="change-not-yet-observed"),
    pytest.param(deployment(1, 1, updated=0), [AVAILABLE], ("True", "ModelServing"),
                 ("True", "RollingOut"), ("True", "ModelAvailable"), id="old-pods-serving"),
])
def test_conditions_follow_the_deployment_and_heartbeats(dep, heartbeats, ready, progressing,
                                                         loaded):
    got = conditions(derive(dep, heartbeats).fields)
    assert got == {"Ready": ready, "Registered": ("True", "Registered"),
                   "Progressing": progressing, "ModelLoaded": loaded}


def test_ready_is_true_whenever_a_replica_serves_even_if_heartbeats_lag():
    # Companions report after the pod is ready: readiness alone makes it selectable.
    got = conditions(derive(deployment(1, 1), []).fields)
    assert got["Ready"] == ("True", "ModelServing")
    assert got["ModelLoaded"] == ("Unknown", "NoHeartbeat")


def test_a_failed_load_is_ready_false_with_the_replicas_words():
    fields = derive(deployment(1, 0), [NOT_FOUND]).fields
    ready = next(c for c in fields["conditions"] if c["type"] == "Ready")
    assert "failed to load the model: s3://models/hp2/1/ has no objects" in ready["message"]
    assert fields["lastFailure"] == ready["message"]
    assert fields["model"] == {"state": "Failed", "reason": "ModelNotFound",
                               "message": "s3://models/hp2/1/ has no objects"}


@pytest.mark.parametrize(("dep", "heartbeats", "state"), [
    (deployment(1, 1), [NOT_FOUND], "Ready"),
    (deployment(1, 0), [NOT_FOUND], "Failed"),
    (deployment(0, 0), [], "ScaledToZero"),
    (deployment(1, 0), [LOADING], "Pending"),
    (deployment(1, 0), [], "Pending"),
])
def test_store_record_state(dep, heartbeats, state):
    rollout = Rollout.of(dep)
    assert executor_state(rollout, model_report(heartbeats, rollout.desired)) == state


def test_status_model_and_replica_counts():
    fields = derive(deployment(2, 1, updated=1), [AVAILABLE, LOADING]).fields
    assert fields["model"] == {"loadedVersion": "1", "state": "Available", "reason": "",
                               "message": ""}
    assert {k: fields[k] for k in ("observedGeneration", "desiredReplicas", "replicas",
                                   "readyReplicas", "replicaSummary", "endpoint")} == {
        "observedGeneration": 1, "desiredReplicas": 2, "replicas": 2, "readyReplicas": 1,
        "replicaSummary": "1/2", "endpoint": ENDPOINT}


def test_a_new_version_that_fails_while_the_old_serves_is_reported_once():
    first = derive(deployment(2, 1, updated=1), [AVAILABLE, NEW_BROKEN])
    assert "keeps serving" in first.fields["lastFailure"]
    assert first.fields["model"]["reason"] == "NotASavedModel"
    assert [(e.type, e.reason) for e in first.events] == [
        (NORMAL, "Loaded"), (NORMAL, "ModelServing"), (WARNING, "NewVersionFailed")]
    again = derive(deployment(2, 1, updated=1), [AVAILABLE, NEW_BROKEN],
                   previous=written({}, first.fields))
    assert again.events == [] and "lastFailure" not in again.fields


@pytest.mark.parametrize(("before", "after", "event"), [
    # A new executor's first state: its creation is the news (CreatedChildren).
    pytest.param(None, (deployment(1, 0), []), None, id="created-waiting"),
    pytest.param(None, (deployment(0, 0), []), None, id="created-at-zero"),
    pytest.param(None, (deployment(1, 1), [AVAILABLE]), (NORMAL, "ModelServing"),
                 id="created-serving"),
    pytest.param(None, (deployment(1, 0), [NOT_FOUND]), (WARNING, "ModelNotFound"),
                 id="created-failing"),
    pytest.param((deployment(0, 0), []), (deployment(1, 0), []),
                 (NORMAL, "WaitingForReplicas"), id="woken"),
    pytest.param((deployment(1, 0), []), (deployment(1, 1), [AVAILABLE]),
                 (NORMAL, "ModelServing"), id="serving"),
    pytest.param((deployment(1, 1), [AVAILABLE]), (deployment(0, 0), []),
                 (NORMAL, "ScaledToZero"), id="scaled-to-zero"),
    pytest.param((deployment(1, 0), []), (deployment(1, 0), [NOT_FOUND]),
                 (WARNING, "ModelNotFound"), id="failed"),
    pytest.param((deployment(1, 1), [AVAILABLE]), (deployment(1, 1), [AVAILABLE]), None,
                 id="unchanged"),
])
def test_ready_changes_are_events_warning_only_for_problems(before, after, event):
    previous = {} if before is None else written({}, derive(*before).fields)
    update = derive(*after, previous=previous)
    got = [(e.type, e.reason) for e in update.events if e.reason not in MODEL_EVENTS]
    assert got == ([] if event is None else [event])


MODEL_EVENTS = ("NewVersionFailed", "LoadStarted", "Loaded", "VersionSwitched")
V2 = heartbeat("hp2-c", "Available", version=2)


@pytest.mark.parametrize(("steps", "story"), [
    pytest.param([(deployment(1, 0), []), (deployment(1, 0), [LOADING]),
                  (deployment(1, 1), [AVAILABLE])],
                 [[], ["LoadStarted"], ["Loaded"]], id="first-load"),
    pytest.param([(deployment(1, 1), [AVAILABLE]), (deployment(1, 1), [V2])],
                 [["Loaded"], ["VersionSwitched"]], id="version-switch"),
    pytest.param([(deployment(1, 1), [AVAILABLE]), (deployment(0, 0), []),
                  (deployment(1, 0), [LOADING]), (deployment(1, 1), [AVAILABLE])],
                 [["Loaded"], [], ["LoadStarted"], ["Loaded"]], id="cold-start-same-version"),
    pytest.param([(deployment(1, 1), [AVAILABLE]), (deployment(2, 1), [AVAILABLE, LOADING]),
                  (deployment(2, 2), [AVAILABLE, heartbeat("hp2-b", "Available")])],
                 [["Loaded"], [], []], id="scale-up-beside-a-serving-replica"),
    pytest.param([(deployment(1, 0), [LOADING]), (deployment(1, 0), [LOADING]),
                  (deployment(1, 0), [NOT_FOUND])],
                 [["LoadStarted"], [], []], id="load-fails-once-told"),
])
def test_the_model_story_is_told_once_per_change(steps, story):
    previous: dict[str, Any] = {}
    told = []
    for dep, heartbeats in steps:
        update = derive(dep, heartbeats, previous=previous)
        told.append([e.reason for e in update.events
                     if e.reason in MODEL_EVENTS and e.reason != "NewVersionFailed"])
        previous = written(previous, update.fields)
    assert told == story


def test_a_second_derivation_from_the_written_status_writes_nothing():
    for dep, heartbeats in [(deployment(1, 1), [AVAILABLE]), (deployment(1, 0), [NOT_FOUND]),
                            (deployment(2, 1, updated=1), [AVAILABLE, NEW_BROKEN])]:
        previous = written({}, derive(dep, heartbeats).fields)
        again = derive(dep, heartbeats, previous=previous)
        assert (again.fields, again.events) == ({}, [])


def test_store_outage_is_registered_and_ready_false_and_keeps_mirroring_replicas():
    serving = written({}, derive(deployment(1, 1), [AVAILABLE]).fields)
    problem = Problem("store down; retrying in 2s.", retry_after=2.0)
    update = derive(deployment(2, 1), [], previous=serving, problem=problem)
    got = conditions(update.fields)
    assert got["Registered"] == ("False", "StoreUnavailable")
    assert got["Ready"] == ("False", "StoreUnavailable")
    # What the heartbeats said last stays: they cannot be read.
    assert got["ModelLoaded"] == ("True", "ModelAvailable") and "model" not in update.fields
    assert update.fields["desiredReplicas"] == 2
    assert update.problem == problem
    assert [(e.type, e.reason) for e in update.events] == [(WARNING, "StoreUnavailable")]
    still_down = derive(deployment(2, 1), [], previous=written(serving, update.fields),
                        problem=problem)
    assert still_down.events == []
    back = derive(deployment(2, 1), [AVAILABLE], previous=written(serving, update.fields))
    assert conditions(back.fields)["Registered"] == ("True", "Registered")
    assert [(e.type, e.reason) for e in back.events] == [(NORMAL, "ModelServing")]


@pytest.mark.parametrize(("reason", "detail", "message"), [
    ("InvalidSpec", "Invalid spec: spec.model: Field required",
     "Invalid spec: spec.model: Field required. Fix the ModelExecutor; existing pods are left "
     "as they are."),
    ("NameConflict", "Deployment ml/hp2 already exists and is not owned by ModelExecutor hp2",
     "Deployment ml/hp2 already exists and is not owned by ModelExecutor hp2"),
    ("Rejected", "the API server rejected Deployment hp2: bad toleration",
     "the API server rejected Deployment hp2: bad toleration. Fix the ModelExecutor spec."),
])
def test_what_the_operator_cannot_act_on_sets_ready_and_progressing_false(reason, detail,
                                                                          message):
    update = failure(reason, detail, {}, 3, NOW)
    assert conditions(update.fields) == {"Ready": ("False", reason),
                                         "Progressing": ("False", reason)}
    assert {c["message"] for c in update.fields["conditions"]} == {message}
    assert update.fields["observedGeneration"] == 3
    assert update.problem == Problem(message)  # permanent: no retry until the spec changes
    assert [(e.type, e.reason, e.message) for e in update.events] == [(WARNING, reason, message)]
    # One Warning per generation and reason, not one per retry or timer tick.
    assert failure(reason, detail, update.fields, 3, NOW).events == []
    assert len(failure(reason, detail, update.fields, 4, NOW).events) == 1


@pytest.mark.parametrize(("heartbeats", "model", "says"), [
    pytest.param([heartbeat("p-0", "Loading", reason="Downloading", message="loading version 1")],
                 {"state": "Loading", "reason": "Downloading", "message": "loading version 1"},
                 "Replica p-0: loading version 1", id="on-its-way"),
    # The one retrying a problem is named, not the one making progress beside it.
    pytest.param([heartbeat("p-0", "Loading", reason="Downloading", message="loading version 1"),
                  heartbeat("p-1", "Loading", reason="StorageUnavailable",
                            message="cannot reach S3 server (retrying in 8s)")],
                 {"state": "Loading", "reason": "StorageUnavailable",
                  "message": "cannot reach S3 server (retrying in 8s)"},
                 "Replica p-1: cannot reach S3 server (retrying in 8s)", id="retrying-a-problem"),
    pytest.param([heartbeat("p-0", "Loading", reason="Starting")],
                 {"state": "Loading", "reason": "Starting", "message": ""},
                 "Replica p-0: Starting", id="starting"),
    # Serving version 1, its switch to a newer one refused: said, still Available.
    pytest.param([heartbeat("p-0", "Available", reason="VersionSwitchChecksumMismatch",
                            message="version 2: 1 file differs from its push manifest")],
                 {"loadedVersion": "1", "state": "Available",
                  "reason": "VersionSwitchChecksumMismatch",
                  "message": "Replica p-0 serves version 1 but cannot switch to a newer one: "
                             "version 2: 1 file differs from its push manifest"},
                 "Version 1 is AVAILABLE", id="switch-stuck"),
])
def test_status_model_says_why_a_replica_is_not_done(heartbeats, model, says):
    report = model_report(heartbeats, desired=len(heartbeats))
    assert report.status == model
    assert says in report.condition["message"]
    assert report.new_version_failure is None  # no Warning Event per retry


@pytest.mark.parametrize(("status", "ms"), [
    pytest.param({}, None, id="never-measured"),
    pytest.param({"scaling": None}, None, id="no-scaling-status"),
    pytest.param({"scaling": {"lastColdStartSeconds": 12.5}}, 12500.0, id="seconds-to-ms"),
    pytest.param({"scaling": {"lastColdStartSeconds": 0}}, 0.0, id="zero"),
    # What an edited status could hold never reaches the store record.
    pytest.param({"scaling": {"lastColdStartSeconds": -3}}, None, id="negative"),
    pytest.param({"scaling": {"lastColdStartSeconds": float("nan")}}, None, id="nan"),
    pytest.param({"scaling": {"lastColdStartSeconds": 1e308}}, None, id="infinite-in-ms"),
    pytest.param({"scaling": {"lastColdStartSeconds": "12"}}, None, id="a-string"),
    pytest.param({"scaling": {"lastColdStartSeconds": True}}, None, id="a-bool"),
])
def test_the_last_cold_start_goes_into_the_store_record(status, ms):
    assert last_cold_start_ms(status) == ms
    record = executor_record(ObjectRef("v1", "ModelExecutor", "ml", "hp2", "uid"), SPEC,
                             ENDPOINT, "ScaledToZero", 0, 1,
                             cold_start_ms=last_cold_start_ms(status))
    assert record.cold_start_ms == ms
