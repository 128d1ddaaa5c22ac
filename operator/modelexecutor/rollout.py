"""Rollouts of a new model version (``spec.rollout``): the candidate Deployment, the phase
machine, promotion and rollback.

Phases (``status.rollout.phase``)::

    Stable --version change (Canary/Shadow)--> Progressing --analysis passes--> Promoting
      ^                                            |                              | stable arm
      |                                            | analysis fails, the          | serves the new
      |                                            v candidate fails to load      v version
    RolledBack <--drained-- RollingBack <----------+                          Promoted

* **Progressing**: the stable Deployment keeps ``stableVersion``; the
  candidate Deployment (``NAME-candidate``, its companions heartbeat as
  ``NAMESPACE/NAME-candidate``) serves ``candidateVersion``; the store
  record's route sends ``weight`` percent of the traffic (Canary) or a copy
  of it (Shadow) there. Each analysis tick (``reconcile.rollout_tick``, run by
  the fleet refresh for every executor whose rollout is active) reads both arms' outcomes and the
  candidate's heartbeats and applies
  :func:`mulambda.policy.rollout.analyse`.
* **Promoting**: all traffic goes to the candidate while the stable
  Deployment rolls to the new version; once every live stable replica
  serves it, traffic goes back to the stable arm, and after
  ``drainSeconds`` (routers' cached snapshots), and once no router's
  in-flight lease names a candidate pod (at most ``DRAIN_GRACE_SECONDS``
  more), the candidate is deleted: **Promoted**.
* **RollingBack**: traffic goes to the stable arm at once; after
  ``drainSeconds`` the candidate is deleted: **RolledBack**, with why in
  ``reason``/``message``. The same version is not tried again until
  ``model.version`` changes.

:func:`advance` (pure) computes the next ``status.rollout`` and its Events;
:func:`reconcile_rollout` does the I/O the reconcile needs for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mulambda.api.modelexecutor import Analysis, ModelExecutorSpec
from mulambda.policy.rollout import (
    CANDIDATE,
    STABLE,
    ArmStats,
    Health,
    Route,
    analyse,
    baseline,
    candidate_id,
    candidate_name,
)
from mulambda.settings import Settings
from mulambda.store.outcomes import drop_outcomes, read_outcomes
from mulambda.store.records import ReplicaRecord, StoreUnavailable

from ..context import Context, Logger, Observed
from ..k8s.children import ensure_deployment, ensure_service, remove_owned
from ..k8s.objects import ObjectRef
from ..status import Event, StatusUpdate
from .build import build_deployment, build_service, endpoints
from .heartbeats import counted, heartbeat_secret

PROGRESSING, PROMOTING, ROLLING_BACK = "Progressing", "Promoting", "RollingBack"
STABLE_PHASE, PROMOTED, ROLLED_BACK = "Stable", "Promoted", "RolledBack"
ACTIVE = frozenset({PROGRESSING, PROMOTING, ROLLING_BACK})
ARM_LABEL, ROLLOUT_OF_LABEL = "mulambda.io/arm", "mulambda.io/rollout-of"
DRAIN_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Observations:
    """What an analysis tick measured: both arms' outcomes and the replicas' heartbeats."""

    stable: ArmStats
    candidate: ArmStats
    health: Health
    stable_heartbeats: Sequence[ReplicaRecord] = ()
    stable_desired: int = 1
    # Requests routers have in flight on the candidate's pods (their in-flight leases).
    candidate_inflight: int = 0


@dataclass(frozen=True)
class RolloutState:
    """The rollout as the reconcile acts on it."""

    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    remove_candidate: bool = False  # drained: delete the candidate's Deployment and Service

    @property
    def phase(self) -> str:
        return str(self.status.get("phase", STABLE_PHASE))

    @property
    def has_candidate(self) -> bool:
        return self.phase in ACTIVE

    @property
    def stable_version(self) -> int | None:
        """The version the stable Deployment runs (the new one from Promoting on)."""
        if self.phase == PROMOTING:
            return self.status.get("candidateVersion")
        return self.status.get("stableVersion")

    @property
    def candidate_version(self) -> int | None:
        return self.status.get("candidateVersion") if self.has_candidate else None

    @property
    def draining(self) -> bool:
        return "drainUntil" in self.status

    def route(self, rest: str, grpc: str) -> Route | None:
        """What routers follow: the weight while Progressing, everything to the candidate
        while the stable arm rolls to the new version; nothing while draining."""
        s = self.status
        if self.phase == PROGRESSING:
            return Route(s["id"], s["strategy"], int(s.get("weight", 0)),
                         s.get("candidateVersion"), rest, grpc)
        if self.phase == PROMOTING and not self.draining:
            return Route(s["id"], "Canary", 100, s.get("candidateVersion"), rest, grpc)
        return None

    def candidate_share(self) -> float:
        """Share of the stable replicas the candidate runs."""
        if self.phase == PROGRESSING and self.status.get("strategy") == "Canary":
            return int(self.status.get("weight", 0)) / 100
        return 1.0


def _iso(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: Any, default: float) -> float:
    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=UTC).timestamp()
    except ValueError:
        return default


def _clean(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if v is not None}


def _start(spec: ModelExecutorSpec, stable: int | None, generation: int, now: float,
           previous: Mapping[str, Any]) -> RolloutState:
    r, version = spec.rollout, spec.model.version
    status = _clean({
        "phase": PROGRESSING, "strategy": r.strategy, "stableVersion": stable,
        "candidateVersion": version, "id": f"v{version}-g{generation}", "step": 0,
        "weight": r.weights[0] if r.strategy == "Canary" else 0,
        "startedAt": _iso(now), "stepStartedAt": _iso(now),
        "reason": "Started", "message": f"{r.strategy} of version {version} beside {stable}",
    })
    events = [Event.normal(reason="RolloutStarted", message=status["message"])]
    if previous.get("phase") == PROGRESSING:
        events.insert(0, Event.normal(reason="RolloutReplaced", message=(
            f"version {previous.get('candidateVersion')} replaced by {version} before "
            "its analysis ended")))
    return RolloutState(status, events)


def _end(status: dict[str, Any], phase: str, reason: str, message: str, now: float,
         drain: int) -> RolloutState:
    new = {**status, "phase": phase, "reason": reason, "message": message,
           "drainUntil": _iso(now + drain)}
    if phase == ROLLING_BACK:
        return RolloutState(new, [Event.warning(reason="RolloutRollingBack", message=message)])
    return RolloutState(new, [Event.normal(reason="RolloutPromoting", message=message)])


def advance(previous: Mapping[str, Any] | None, spec: ModelExecutorSpec, generation: int,
            now: float, observed: Observations | None = None) -> RolloutState:
    """The next ``status.rollout`` from the last one, the spec and (on an analysis tick)
    what was measured; pure."""
    # A key set to None is one a merge patch removed (rollout_update).
    prev = {k: v for k, v in (previous or {}).items() if v is not None}
    phase = prev.get("phase", STABLE_PHASE)
    want, strategy = spec.model.version, spec.rollout.strategy
    stable = prev.get("stableVersion") if prev else want
    if phase not in ACTIVE:
        rolled_back = phase == ROLLED_BACK and prev.get("candidateVersion") == want
        # A rollout needs both versions pinned: an unpinned stable arm would load the
        # newest version itself.
        if (strategy != "Immediate" and want is not None and stable is not None
                and want != stable and prev and not rolled_back):
            return _start(spec, stable, generation, now, prev)
        if rolled_back and strategy != "Immediate":
            return RolloutState(prev)
        # Immediate (or nothing to roll out): the stable Deployment follows the spec.
        if phase in (PROMOTED, ROLLED_BACK) and want == stable:
            return RolloutState(prev)
        if phase in (PROMOTED, ROLLED_BACK) and want != stable:
            phase = STABLE_PHASE
        return RolloutState(_clean({"phase": phase if prev else STABLE_PHASE,
                                    "stableVersion": want}))
    return _active(prev, spec, generation, now, observed)


def _active(prev: dict[str, Any], spec: ModelExecutorSpec, generation: int, now: float,
            observed: Observations | None) -> RolloutState:
    phase, want = prev["phase"], spec.model.version
    drain = spec.rollout.drain_seconds
    if "drainUntil" in prev:
        until = _epoch(prev["drainUntil"], now)
        # The tick ends a drain: it sees the requests still in flight on the candidate,
        # and waits for them (at most DRAIN_GRACE_SECONDS longer).
        if (now < until or observed is None
                or (observed.candidate_inflight and now < until + DRAIN_GRACE_SECONDS)):
            return RolloutState(prev)
        if phase == PROMOTING:
            done = {**_without(prev, "drainUntil"), "phase": PROMOTED,
                    "stableVersion": prev.get("candidateVersion"), "finishedAt": _iso(now)}
            return RolloutState(done, [Event.normal(reason="RolloutPromoted", message=(
                f"version {prev.get('candidateVersion')} serves all traffic; "
                f"{prev.get('message', '')}"))], remove_candidate=True)
        done = {**_without(prev, "drainUntil"), "phase": ROLLED_BACK, "finishedAt": _iso(now)}
        return RolloutState(done, [Event.warning(reason="RolloutRolledBack", message=(
            f"version {prev.get('candidateVersion')} removed, version "
            f"{prev.get('stableVersion')} serves all traffic: {prev.get('message', '')}"))],
            remove_candidate=True)
    if phase == PROGRESSING:
        if want == prev.get("stableVersion"):
            return _end(prev, ROLLING_BACK, "SpecReverted",
                        f"model.version set back to {want}", now, drain)
        if want is not None and want != prev.get("candidateVersion"):
            return _start(spec, prev.get("stableVersion"), generation, now, prev)
        if spec.rollout.strategy == "Immediate":
            return _promote(prev, "PromotedBySpec", "rollout.strategy set to Immediate", now)
    if phase == PROMOTING and want == prev.get("stableVersion"):
        # The stable Deployment goes back to the old version; the route goes with it.
        return _end(_without(prev, "promotingSince"), ROLLING_BACK, "SpecReverted",
                    f"model.version set back to {want} while promoting", now, drain)
    if observed is None:
        return RolloutState(prev)
    if phase == PROMOTING:
        return _promotion(prev, observed, now, drain, spec.rollout.analysis)
    if phase == ROLLING_BACK:  # no drain time recorded (an older status): drain now
        return RolloutState({**prev, "drainUntil": _iso(now + drain)})
    return _analysed(prev, spec, observed, now, drain)


def _without(status: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k not in keys}


def _promote(prev: dict[str, Any], reason: str, message: str, now: float) -> RolloutState:
    new = {**prev, "phase": PROMOTING, "reason": reason, "message": message,
           "promotingSince": _iso(now)}
    return RolloutState(new, [Event.normal(reason="RolloutPromoting", message=message)])


def _promotion(prev: dict[str, Any], observed: Observations, now: float,
               drain: int, analysis: Analysis) -> RolloutState:
    """Promoting: drain the candidate once every live stable replica serves the new
    version (as many as the stable Deployment wants). Not done within
    ``progressDeadlineSeconds``: said once (``PromotionStalled``, a Warning), traffic
    staying on the candidate, which serves."""
    version = prev.get("candidateVersion")
    live = [r for r in observed.stable_heartbeats if r.state == "Available"]
    if (len(live) >= max(1, observed.stable_desired)
            and all(r.version == version for r in observed.stable_heartbeats)):
        done = {**_without(prev, "promotingSince"), "drainUntil": _iso(now + drain)}
        if prev.get("reason") == "PromotionStalled":
            done.update(reason="PromotionDone",
                        message=f"the stable Deployment serves version {version}")
        return RolloutState(done)
    if "promotingSince" not in prev:  # promoting since before an upgrade: from now on
        return RolloutState({**prev, "promotingSince": _iso(now)})
    waited = now - _epoch(prev["promotingSince"], now)
    if (prev.get("reason") != "PromotionStalled"
            and waited >= analysis.progress_deadline_seconds):
        serving = sum(1 for r in live if r.version == version)
        message = (f"the stable Deployment serves version {version} on {serving} of "
                   f"{max(1, observed.stable_desired)} replicas after "
                   f"{analysis.progress_deadline_seconds}s; traffic stays on the new "
                   f"version's Deployment (set model.version back to "
                   f"{prev.get('stableVersion')} to roll back)")
        return RolloutState({**prev, "reason": "PromotionStalled", "message": message},
                            [Event.warning(reason="RolloutPromotionStalled", message=message)])
    return RolloutState(prev)


def _analysed(prev: dict[str, Any], spec: ModelExecutorSpec, observed: Observations,
              now: float, drain: int) -> RolloutState:
    weights = spec.rollout.weights
    step = min(int(prev.get("step", 0)), len(weights) - 1)
    # The arms' counts when the step started and when the recent window started (outcomes
    # add up over the whole rollout): the analysis looks at what came after each.
    at_step, at_tick = (prev.get(k) or {} for k in ("stepCounts", "tickCounts"))
    least = spec.rollout.analysis.min_requests
    step_candidate = observed.candidate.minus(at_step.get(CANDIDATE))
    recent_candidate = observed.candidate.minus(at_tick.get(CANDIDATE))
    verdict = analyse(
        spec.rollout.analysis,
        baseline(observed.stable.minus(at_step.get(STABLE)), observed.stable, least),
        step_candidate, observed.health,
        step_seconds=now - _epoch(prev.get("stepStartedAt"), now),
        total_seconds=now - _epoch(prev.get("startedAt"), now),
        last_step=step >= len(weights) - 1 or prev.get("strategy") == "Shadow",
        recent=(baseline(observed.stable.minus(at_tick.get(STABLE)), observed.stable, least),
                recent_candidate) if at_tick else None)
    arms = {STABLE: observed.stable.summary(), CANDIDATE: observed.candidate.summary()}
    counts = {STABLE: observed.stable.counts(), CANDIDATE: observed.candidate.counts()}
    status = {**prev, "arms": arms, "reason": verdict.reason, "message": verdict.message}
    # The recent window moves on once it was judged (at least minRequests to the
    # candidate): moved every tick, a candidate with fewer requests per tick was never
    # judged on its latest ones.
    if not at_tick or recent_candidate.requests >= least:
        status["tickCounts"] = counts
    if verdict.action == "RollBack":
        return _end(status, ROLLING_BACK, verdict.reason, verdict.message, now, drain)
    if verdict.action == "Promote":
        return _promote(status, verdict.reason, verdict.message, now)
    if verdict.action == "Advance":
        status.update(step=step + 1, weight=weights[step + 1], stepStartedAt=_iso(now),
                      stepCounts=counts)
        return RolloutState(status, [Event.normal(reason="RolloutStepAdvanced", message=(
            f"weight {weights[step]}% -> {weights[step + 1]}%: {verdict.message}"))])
    return RolloutState(status)


# -- I/O -------------------------------------------------------------------------------


def candidate_children(name: str, namespace: str, spec: ModelExecutorSpec, version: int | None,
                       replicas: int, settings: Settings, heartbeat_secret: str | None = None,
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The candidate's Deployment and Service: the executor's pod with the new version,
    named and labelled apart (its own selector, its companions' own store id), signing
    its heartbeats with the executor's key (routers check them against the executor's
    record); pure."""
    arm = candidate_name(name)
    pinned = spec.model_copy(update={"model": spec.model.model_copy(update={"version": version})})
    deployment = build_deployment(arm, namespace, pinned, settings, replicas, heartbeat_secret)
    service = build_service(arm, namespace, pinned)
    for obj in (deployment, service):
        obj["metadata"]["labels"].update({ARM_LABEL: CANDIDATE, ROLLOUT_OF_LABEL: name})
    return deployment, service


def stable_spec(spec: ModelExecutorSpec, state: RolloutState) -> ModelExecutorSpec:
    """The spec the stable Deployment and the store record are built from."""
    if state.stable_version == spec.model.version or "stableVersion" not in state.status:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(
        update={"version": state.stable_version})})


async def reconcile_rollout(ctx: Context, ref: ObjectRef, spec: ModelExecutorSpec,
                            state: RolloutState, stable_replicas: int,
                            logger: Logger) -> tuple[Route | None, list[str]]:
    """Create, update or delete the candidate as ``state`` says; the route for the store
    record and what changed."""
    if state.remove_candidate:
        removed = await remove_owned(ctx.kube, ref, candidate_name(ref.name), ref.namespace)
        try:
            await drop_outcomes(ctx.store, f"executor/{ref.id}")
        except StoreUnavailable as exc:
            # They expire by themselves (7 days) and the next rollout has another id:
            # the rollout ends all the same (raised, it held the status and failed the
            # refresh tick until the store came back).
            logger.warning("rollout outcomes not dropped executor=%s error=%s", ref.id, exc)
        if removed:
            logger.info("rollout candidate removed executor=%s removed=%s", ref.id, removed)
        return None, removed
    if not state.has_candidate:
        return None, []
    replicas = max(1, math.ceil(stable_replicas * state.candidate_share()))
    deployment, service = candidate_children(ref.name, ref.namespace, spec,
                                             state.candidate_version, replicas, ctx.settings,
                                             heartbeat_secret(ctx, ref))
    _, d_changes = await ensure_deployment(ctx.kube, ref, deployment, lambda _: replicas)
    _, s_changes = await ensure_service(ctx.kube, ref, service)
    ep = endpoints(candidate_name(ref.name), ref.namespace, ctx.settings)
    changes = [f"Deployment {c}" for c in d_changes] + [f"Service {c}" for c in s_changes]
    return state.route(ep["rest"], ep["grpc"]), changes


async def observe(ctx: Context, executor: Observed[ModelExecutorSpec]) -> Observations:
    """What an analysis tick reads: outcomes of both arms, the arms' heartbeats."""
    rollout = executor.status.get("rollout") or {}
    ref = executor.ref
    outcomes = await read_outcomes(ctx.store, f"executor/{ref.id}", str(rollout.get("id")))
    # Only heartbeats the executor's key signed (both arms' pods sign with it), as for
    # status and routing: a forged one kept a dead canary Analysing past its deadline,
    # rolled back a good one, or held a promotion (docs/security.md T2).
    now = time.time()
    candidate_beats = counted(ctx, ref, await ctx.store.list_replicas(candidate_id(ref.id)),
                              now)
    stable_beats = counted(ctx, ref, await ctx.store.list_replicas(ref.id), now)
    _, timed = await ctx.store.inflight_load()
    pods = f"{candidate_name(ref.name)}-"
    return Observations(
        stable=outcomes.get(STABLE, ArmStats()), candidate=outcomes.get(CANDIDATE, ArmStats()),
        health=Health.of(candidate_beats), stable_heartbeats=stable_beats,
        stable_desired=int(executor.status.get("desiredReplicas") or 1),
        candidate_inflight=sum(1 for t in timed.get(ref.id, ()) if t.pod.startswith(pods)))


def is_active(status: Mapping[str, Any]) -> bool:
    """Whether the analysis tick runs for an object with this status."""
    return (status.get("rollout") or {}).get("phase") in ACTIVE


def rollout_update(previous: Mapping[str, Any], state: RolloutState,
                   update: StatusUpdate) -> StatusUpdate:
    """``update`` with ``status.rollout`` (when it changed) and the rollout's Events."""
    fields = dict(update.fields)
    before = {k: v for k, v in (previous.get("rollout") or {}).items() if v is not None}
    if before != state.status:
        # A merge patch keeps keys it does not name: the ones that went are set to null.
        fields["rollout"] = {**{k: None for k in before if k not in state.status},
                             **state.status}
    return StatusUpdate(fields, [*update.events, *state.events], update.problem)
