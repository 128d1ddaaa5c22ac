"""The operator's side of rollouts: the phase machine (pure ``advance``), the candidate's
children, the spec the stable Deployment is built from, and the route routers follow."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.operator.k8s.objects import ObjectRef
from mulambda.operator.modelexecutor.rollout import (
    Observations,
    RolloutState,
    advance,
    candidate_children,
    is_active,
    reconcile_rollout,
    rollout_update,
    stable_spec,
)
from mulambda.operator.status import StatusUpdate
from mulambda.policy.rollout import ArmStats, Health, bucket_of
from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ReplicaRecord

from support.procs import free_port
from support.schemas import validate_k8s

SETTINGS = Settings(serving_image="tensorflow/serving:2.18.0", companion_image="mulambda:test")
T0 = 1_800_000_000.0


def spec(version: int | None = 2, strategy: str = "Canary", **rollout: Any):
    return parse_executor_spec({
        "model": {"name": "m", "storageUri": "s3://models/m", "version": version},
        "traits": {"type": "t", "input": "i", "output": "o"},
        "rollout": {"strategy": strategy, "weight": 20, "drainSeconds": 5,
                    "analysis": {"minRequests": 10, "durationSeconds": 30,
                                 "progressDeadlineSeconds": 120}, **rollout},
    })


def iso(t: float) -> str:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


PROGRESSING = {"phase": "Progressing", "strategy": "Canary", "stableVersion": 1,
               "candidateVersion": 2, "id": "v2-g2", "step": 0, "weight": 20,
               "startedAt": iso(T0), "stepStartedAt": iso(T0), "reason": "Started",
               "message": "x"}
GOOD = ArmStats(20, 0, {bucket_of(10): 20})
BAD = ArmStats(20, 10, {bucket_of(10): 10})


SERVING = Health(1)


def seen(candidate: ArmStats = GOOD, health: Health = SERVING, beats=(), desired=1,
         inflight=0):
    return Observations(GOOD, candidate, health, beats, desired, inflight)


def beat(version: int, state: str = "Available") -> ReplicaRecord:
    return ReplicaRecord("ml/m", f"m-{version}", state=state, version=version)


# (name, previous status.rollout, spec, seconds after T0, observations,
#  expected phase, stable Deployment version, candidate present, events, removes candidate)
CASES = [
    ("new executor records its version", None, spec(1), 0, None,
     "Stable", 1, False, [], False),
    ("version change with Canary starts a rollout", {"phase": "Stable", "stableVersion": 1},
     spec(2), 0, None, "Progressing", 1, True, ["RolloutStarted"], False),
    ("Immediate follows the spec", {"phase": "Stable", "stableVersion": 1},
     spec(2, "Immediate"), 0, None, "Stable", 2, False, [], False),
    ("from an unpinned version: Immediate", {"phase": "Stable"}, spec(2), 0, None,
     "Stable", 2, False, [], False),
    ("within thresholds but too early: wait", PROGRESSING, spec(2), 10, seen(),
     "Progressing", 1, True, [], False),
    ("within thresholds for the duration: promote", PROGRESSING, spec(2), 30, seen(),
     "Promoting", 2, True, ["RolloutPromoting"], False),
    ("errors: roll back, drain first", PROGRESSING, spec(2), 5, seen(BAD),
     "RollingBack", 1, True, ["RolloutRollingBack"], False),
    ("fails to load: roll back", PROGRESSING, spec(2), 5,
     seen(ArmStats(), Health(0, "VersionNotFound", "no 2")),
     "RollingBack", 1, True, ["RolloutRollingBack"], False),
    ("drained after a rollback: candidate removed", {**PROGRESSING, "phase": "RollingBack",
                                                     "drainUntil": iso(T0 + 5)},
     spec(2), 5, seen(), "RolledBack", 1, False, ["RolloutRolledBack"], True),
    ("still draining", {**PROGRESSING, "phase": "RollingBack", "drainUntil": iso(T0 + 5)},
     spec(2), 4, seen(), "RollingBack", 1, True, [], False),
    ("drain time over, requests still in flight on the candidate: wait",
     {**PROGRESSING, "phase": "RollingBack", "drainUntil": iso(T0 + 5)},
     spec(2), 6, seen(inflight=2), "RollingBack", 1, True, [], False),
    ("in flight beyond the grace: removed anyway",
     {**PROGRESSING, "phase": "RollingBack", "drainUntil": iso(T0 + 5)},
     spec(2), 36, seen(inflight=2), "RolledBack", 1, False, ["RolloutRolledBack"], True),
    ("drain time over but no tick yet: the reconcile waits for one",
     {**PROGRESSING, "phase": "RollingBack", "drainUntil": iso(T0 + 5)},
     spec(2), 6, None, "RollingBack", 1, True, [], False),
    ("rolled back: the same version is not tried again",
     {**PROGRESSING, "phase": "RolledBack"}, spec(2), 100, None, "RolledBack", 1, False, [],
     False),
    ("rolled back: a new version is", {**PROGRESSING, "phase": "RolledBack"}, spec(3), 100,
     None, "Progressing", 1, True, ["RolloutStarted"], False),
    ("promoting waits for the stable arm to serve the new version",
     {**PROGRESSING, "phase": "Promoting"}, spec(2), 40, seen(beats=[beat(1), beat(2)]),
     "Promoting", 2, True, [], False),
    ("promoting drains once it does", {**PROGRESSING, "phase": "Promoting"}, spec(2), 40,
     seen(beats=[beat(2)]), "Promoting", 2, True, [], False),
    ("promoting that stalls past the deadline says so once, traffic staying",
     {**PROGRESSING, "phase": "Promoting", "promotingSince": iso(T0)}, spec(2), 130,
     seen(beats=[beat(1), beat(2, "Failed")]), "Promoting", 2, True,
     ["RolloutPromotionStalled"], False),
    ("promoting before the deadline just waits",
     {**PROGRESSING, "phase": "Promoting", "promotingSince": iso(T0)}, spec(2), 110,
     seen(beats=[beat(1)]), "Promoting", 2, True, [], False),
    ("a third version while promoting waits for the promotion to finish",
     {**PROGRESSING, "phase": "Promoting"}, spec(3), 40, seen(beats=[beat(1), beat(2)]),
     "Promoting", 2, True, [], False),
    ("promoted: the version that waited starts its rollout from the promoted one",
     {**PROGRESSING, "phase": "Promoted", "stableVersion": 2}, spec(3), 100, None,
     "Progressing", 2, True, ["RolloutStarted"], False),
    ("spec set back while promoting: roll back", {**PROGRESSING, "phase": "Promoting"},
     spec(1), 5, None, "RollingBack", 1, True, ["RolloutRollingBack"], False),
    ("promoted after the drain", {**PROGRESSING, "phase": "Promoting",
                                  "drainUntil": iso(T0 + 45)},
     spec(2), 45, seen(), "Promoted", 2, False, ["RolloutPromoted"], True),
    ("spec set back to the stable version: roll back", PROGRESSING, spec(1), 5, None,
     "RollingBack", 1, True, ["RolloutRollingBack"], False),
    ("another version replaces the candidate", PROGRESSING, spec(3), 5, None,
     "Progressing", 1, True, ["RolloutReplaced", "RolloutStarted"], False),
    ("strategy set to Immediate: promote", PROGRESSING, spec(2, "Immediate"), 5, None,
     "Promoting", 2, True, ["RolloutPromoting"], False),
    ("no observations: nothing moves", PROGRESSING, spec(2), 1000, None,
     "Progressing", 1, True, [], False),
]


@pytest.mark.parametrize(("name", "previous", "the_spec", "after", "observed", "phase",
                          "stable", "candidate", "events", "removes"), CASES,
                         ids=[c[0] for c in CASES])
def test_advance(name: str, previous: dict | None, the_spec: Any, after: float,
                 observed: Observations | None, phase: str, stable: int, candidate: bool,
                 events: list[str], removes: bool) -> None:
    state = advance(previous, the_spec, 3, T0 + after, observed)
    assert state.phase == phase
    assert stable_spec(the_spec, state).model.version == stable
    assert state.has_candidate is candidate
    assert [e.reason for e in state.events] == events
    assert state.remove_candidate is removes
    # Pure and settled: the same inputs again give the same state, and no event twice.
    again = advance(state.status, the_spec, 3, T0 + after, None)
    assert again.status == state.status and not again.events


def test_a_stalled_promotion_that_completes_says_so() -> None:
    stalled = advance({**PROGRESSING, "phase": "Promoting", "promotingSince": iso(T0)},
                      spec(2), 3, T0 + 130, seen(beats=[beat(1)]))
    assert stalled.status["reason"] == "PromotionStalled"
    assert "on 0 of 1 replicas after 120s" in stalled.status["message"]
    assert "set model.version back to 1" in stalled.status["message"]
    done = advance(stalled.status, spec(2), 3, T0 + 200, seen(beats=[beat(2)]))
    assert done.draining and done.status["reason"] == "PromotionDone"
    assert "promotingSince" not in done.status
    # Promoting since before the operator knew the deadline: its clock starts now.
    older = advance({**PROGRESSING, "phase": "Promoting"}, spec(2), 3, T0 + 500,
                    seen(beats=[beat(1)]))
    assert older.status["promotingSince"] == iso(T0 + 500) and not older.events
    assert advance(older.status, spec(2), 3, T0 + 620, seen(beats=[beat(1)])).events


def test_promoting_records_the_drain_once_the_stable_arm_serves_the_new_version() -> None:
    state = advance({**PROGRESSING, "phase": "Promoting"}, spec(2), 3, T0 + 40,
                    seen(beats=[beat(2)]))
    assert state.draining and state.route("r", "g") is None
    waiting = advance({**PROGRESSING, "phase": "Promoting"}, spec(2), 3, T0 + 40,
                      seen(beats=[beat(2)], desired=2))
    assert not waiting.draining and waiting.route("r", "g").weight == 100  # type: ignore[union-attr]


def _more(stats: ArmStats, n: int, errors: int = 0) -> ArmStats:
    """``stats`` and ``n`` more requests at 10 ms, ``errors`` of them failed."""
    buckets = dict(stats.buckets)
    buckets[bucket_of(10)] = buckets.get(bucket_of(10), 0) + n - errors
    return ArmStats(stats.requests + n, stats.errors + errors, buckets)


def test_steps_advance_the_weight_each_on_its_own_requests() -> None:
    s = spec(2, steps=[10, 50])
    start = advance({"phase": "Stable", "stableVersion": 1}, s, 3, T0)
    assert start.status["weight"] == 10
    step = advance(start.status, s, 3, T0 + 30, seen())
    assert [e.reason for e in step.events] == ["RolloutStepAdvanced"]
    assert step.status["weight"] == 50 and step.phase == "Progressing"
    # The first step's requests do not count for the second: it waits for its own.
    waiting = advance(step.status, s, 3, T0 + 60, seen())
    assert waiting.phase == "Progressing" and "0/10 requests" in waiting.status["message"]
    later = _more(GOOD, 10)
    assert advance(step.status, s, 3, T0 + 50, seen(later)).phase == "Progressing"
    assert advance(step.status, s, 3, T0 + 60, seen(later)).phase == "Promoting"


def _ms(stats: ArmStats, n: int, ms: float, errors: int = 0) -> ArmStats:
    buckets = dict(stats.buckets)
    buckets[bucket_of(ms)] = buckets.get(bucket_of(ms), 0) + n - errors
    return ArmStats(stats.requests + n, stats.errors + errors, buckets)


@pytest.mark.parametrize(("candidate_ms", "candidate_errors", "phase", "reason"), [
    (10.0, 6, "Promoting", "AnalysisPassed"),  # as good as the stable version: promoted
    (1000.0, 0, "RollingBack", "LatencyExceeded"),  # 100x slower: rolled back
])
def test_a_step_at_100_percent_is_compared_with_the_stable_arm_of_the_whole_rollout(
        candidate_ms: float, candidate_errors: int, phase: str, reason: str) -> None:
    # The stable arm gets nothing at 100 %: its empty window read as a 0 % error rate
    # rolled back a candidate with the stable arm's 6 %, and gave no p95 to compare with.
    s = spec(2, steps=[50, 100])
    start = advance({"phase": "Stable", "stableVersion": 1}, s, 3, T0)
    stable = _ms(ArmStats(), 100, 10.0, errors=6)
    first = _ms(ArmStats(), 100, 10.0, errors=6)
    step = advance(start.status, s, 3, T0 + 30, Observations(stable, first, SERVING))
    assert step.status["weight"] == 100
    later = _ms(first, 100, candidate_ms, errors=candidate_errors)
    done = advance(step.status, s, 3, T0 + 60, Observations(stable, later, SERVING))
    assert (done.phase, done.status["reason"]) == (phase, reason)


def test_a_slow_trickle_of_failures_is_judged_once_it_adds_up() -> None:
    # 4 requests per tick with minRequests 10: the window since the last judged tick
    # grows until it holds 10, so the latest failures are judged on their own (moved on
    # every tick, the window never held 10, and 12 failures among 1,000 were promoted).
    s = spec(2, analysis={"minRequests": 10, "durationSeconds": 300,
                          "progressDeadlineSeconds": 120, "maxErrorRateIncrease": 0.05})
    state = advance({"phase": "Stable", "stableVersion": 1}, s, 3, T0)
    candidate = _ms(ArmStats(), 1000, 10.0)
    state = advance(state.status, s, 3, T0 + 10, seen(candidate))
    for tick in range(1, 4):
        candidate = _ms(candidate, 4, 10.0, errors=4)
        state = advance(state.status, s, 3, T0 + 10 + tick, seen(candidate))
        if tick < 3:
            assert state.phase == "Progressing", tick
    assert (state.phase, state.status["reason"]) == ("RollingBack", "ErrorRateExceeded")
    assert "over 12 requests since the last analysis" in state.status["message"]


def test_a_candidate_that_starts_failing_late_in_its_last_step_is_rolled_back() -> None:
    # 1,000 good requests in the step, then 20 more since the last tick, all failed: 2 %
    # of the step (within 5 %), every one of the latest. Counted over the whole step or
    # rollout, it was promoted.
    s = spec(2)
    start = advance({"phase": "Stable", "stableVersion": 1}, s, 3, T0)
    good = _more(ArmStats(), 1000)
    ticked = advance(start.status, s, 3, T0 + 20, seen(good))
    assert ticked.phase == "Progressing"  # 20 s of its 30
    failing = advance(ticked.status, s, 3, T0 + 31, seen(_more(good, 20, errors=20)))
    assert failing.phase == "RollingBack"
    assert failing.status["reason"] == "ErrorRateExceeded"
    assert "since the last analysis" in failing.status["message"]
    # Fewer than minRequests since the last tick: judged on the step alone.
    few = advance(ticked.status, s, 3, T0 + 31, seen(_more(good, 5, errors=5)))
    assert few.phase == "Promoting"


def test_status_shows_per_arm_outcomes() -> None:
    state = advance(PROGRESSING, spec(2), 3, T0 + 10, seen())
    arms = state.status["arms"]
    assert arms["stable"]["requests"] == 20 and arms["candidate"]["errorRate"] == 0
    assert {"p50Ms", "p95Ms"} <= set(arms["candidate"])


@pytest.mark.parametrize(("status", "route"), [
    (PROGRESSING, ("Canary", 20)),
    ({**PROGRESSING, "strategy": "Shadow", "weight": 0}, ("Shadow", 0)),
    ({**PROGRESSING, "phase": "Promoting"}, ("Canary", 100)),
    ({**PROGRESSING, "phase": "Promoting", "drainUntil": iso(T0)}, None),
    ({**PROGRESSING, "phase": "RollingBack", "drainUntil": iso(T0)}, None),
    ({"phase": "Stable", "stableVersion": 1}, None),
])
def test_route_routers_follow(status: dict, route: tuple[str, int] | None) -> None:
    got = RolloutState(status).route("http://m-candidate:8501", "m-candidate:8500")
    assert (None if got is None else (got.strategy, got.weight)) == route
    assert is_active({"rollout": status}) is (status["phase"] != "Stable")


def test_candidate_children_are_valid_apart_from_the_stable_ones_and_pin_the_version() -> None:
    deployment, service = candidate_children("m", "ml", spec(2), 2, 2, SETTINGS)
    validate_k8s(deployment)
    validate_k8s(service)
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "m-candidate"
    assert deployment["spec"]["replicas"] == 2
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/instance"] == "m-candidate"
    assert service["spec"]["selector"] == selector
    assert deployment["metadata"]["labels"]["mulambda.io/rollout-of"] == "m"
    [companion] = [c for c in deployment["spec"]["template"]["spec"]["containers"]
                   if c["name"] == "companion"]
    env = {e["name"]: e.get("value") for e in companion["env"]}
    assert env["MULAMBDA_EXECUTOR"] == "ml/m-candidate"
    assert env["MULAMBDA_MODEL_VERSION"] == "2"


def test_rollout_status_is_patched_only_when_it_changed() -> None:
    state = RolloutState({"phase": "Stable", "stableVersion": 1})
    assert "rollout" in rollout_update({}, state, StatusUpdate()).fields
    assert "rollout" not in rollout_update({"rollout": dict(state.status)}, state,
                                           StatusUpdate()).fields
    # Keys that went are removed by the merge patch, and read back as absent.
    promoted = RolloutState({"phase": "Promoted", "stableVersion": 2})
    patch = rollout_update({"rollout": {"phase": "Promoting", "stableVersion": 1,
                                        "drainUntil": iso(T0)}}, promoted, StatusUpdate())
    assert patch.fields["rollout"] == {"phase": "Promoted", "stableVersion": 2,
                                       "drainUntil": None}
    assert advance(patch.fields["rollout"], spec(2), 3, T0).status == promoted.status


def test_client_experiment_is_published_with_arm_ids_and_an_id_per_generation() -> None:
    from mulambda.api.client import parse_client_spec
    from mulambda.operator.client.reconcile import experiment_record
    from mulambda.operator.k8s.objects import ObjectRef
    from mulambda.policy.experiment import Experiment

    ref = ObjectRef("mulambda.io/v1alpha1", "Client", "shop", "app", "uid-1")
    spec = parse_client_spec({"criteria": {"type": "t"}, "experiment": {
        "arms": [{"executor": "a", "weight": 70}, {"executor": "ml/b", "weight": 30}],
        "stickyField": "user"}})
    published = Experiment.of(experiment_record(ref, spec, 4))
    assert published == Experiment("shop/app@g4", (("shop/a", 70.0), ("ml/b", 30.0)),
                                   field="user")
    assert experiment_record(ref, parse_client_spec({"criteria": {"type": "t"}}), 4) is None


@pytest.mark.parametrize("experiment", [
    {"arms": [{"executor": "a"}]},  # one arm is no experiment
    {"arms": [{"executor": "a"}, {"executor": "a"}]},
    {"arms": [{"executor": "a", "weight": 0}, {"executor": "b", "weight": 0}]},
    {"arms": [{"executor": "a"}, {"executor": "b"}], "stickyHeader": "X", "stickyField": "u"},
])
def test_bad_experiments_are_refused_with_a_message(experiment: dict) -> None:
    from mulambda.api.client import parse_client_spec
    from mulambda.api.common import SpecError

    with pytest.raises(SpecError, match="experiment"):
        parse_client_spec({"criteria": {"type": "t"}, "experiment": experiment})


class _NoChildren:
    """The API server as remove_owned sees it when the candidate is already gone."""

    async def get(self, kind: str, name: str, namespace: str) -> None:
        return None


async def test_a_rollout_ends_while_the_store_is_down(caplog: pytest.LogCaptureFixture) -> None:
    # Its outcomes cannot be dropped (they expire by themselves): the rollout ends all
    # the same. Raised, it held the status and failed every refresh tick meanwhile.
    store = MetadataStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.3)
    ctx = SimpleNamespace(kube=_NoChildren(), store=store)
    ref = ObjectRef("mulambda.io/v1alpha1", "ModelExecutor", "ml", "m", "uid-m")
    try:
        with caplog.at_level(logging.WARNING):
            route, removed = await reconcile_rollout(
                ctx, ref, spec(2), RolloutState({"phase": "Promoted"}, remove_candidate=True),
                1, logging.getLogger("test"))  # type: ignore[arg-type]
    finally:
        await store.close()
    assert (route, removed) == (None, [])
    assert "rollout outcomes not dropped executor=ml/m" in caplog.text
