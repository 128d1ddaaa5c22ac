"""Reconciling one Client: workload, store registration, and the current selection.

The selection in ``status.selected`` is recomputed from one store snapshot
(one pipelined round trip) on every change and every probe interval, so a
new executor, a lost replica or a latency shift shows within one interval.
Cold executors are woken by real demand (SDK and selector requests), not by
the operator: a Client that sends nothing must let them sleep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from mulambda.api.client import ClientSpec
from mulambda.api.common import GROUP, VERSION
from mulambda.policy.experiment import Experiment, experiment_status
from mulambda.policy.selection import Ranking, rank
from mulambda.settings import Settings
from mulambda.store.outcomes import read_outcomes
from mulambda.store.records import ClientRecord, StoreUnavailable

from ..context import Context, Logger, Observed, forget_records, store_retry
from ..k8s.children import ensure_deployment, ensure_service, remove_owned
from ..k8s.objects import ObjectRef
from ..status import Event, Problem, StatusUpdate, store_unavailable
from .build import build_client_deployment, build_client_service, probe_url, workload_name
from .status import client_status, selection_events


async def ensure_workload(
    ctx: Context, client: ObjectRef, spec: ClientSpec, logger: Logger, spec_changed: bool,
) -> tuple[list[Event], dict[str, Any] | None]:
    """Run (or stop running) the Client's workload Deployment + ping Service; returns the
    Events and the Deployment as the API server has it (None without a workload)."""
    name, ns = client.name, client.namespace
    if spec.workload is None:
        if not spec_changed:
            return [], None  # a workload can only have gone away with a spec change
        removed = await remove_owned(ctx.kube, client, workload_name(name), ns)
        return [Event.normal(reason="DeletedWorkload", message=f"Deleted {what}: no spec.workload")
                for what in removed], None
    replicas = spec.workload.replicas
    deployment, changes = await ensure_deployment(
        ctx.kube, client,
        build_client_deployment(name, ns, spec.workload.template, replicas, ctx.settings),
        lambda _current: replicas,
    )
    events = []
    if changes:
        events.append(Event.normal(
            reason="CreatedWorkload" if changes == ["created"] else "UpdatedWorkload",
            message=f"Workload Deployment {ns}/{deployment['metadata']['name']}: "
                    f"{', '.join(changes)}"))
    service, changes = await ensure_service(ctx.kube, client, build_client_service(name, ns))
    if changes:
        logger.info("workload service reconciled name=%s changes=%s",
                    service["metadata"]["name"], changes)
    return events, deployment


def client_record(
    client: ObjectRef, spec: ClientSpec, generation: int, settings: Settings
) -> ClientRecord:
    probe = spec.probe_url
    if probe is None and spec.workload is not None:
        probe = probe_url(client.name, client.namespace, settings)
    return ClientRecord(
        namespace=client.namespace, name=client.name, type=spec.criteria.type,
        input=spec.criteria.input, output=spec.criteria.output,
        latency_weight=spec.preferences.latency, accuracy_weight=spec.preferences.accuracy,
        max_latency_ms=spec.limits.max_latency_ms, min_accuracy=spec.limits.min_accuracy,
        probe_url=probe, cold_start=spec.cold_start, generation=generation,
        experiment=experiment_record(client, spec, generation),
    )


async def with_experiment(ctx: Context, record: ClientRecord, ranking: Ranking,
                          previous: Mapping[str, Any], update: StatusUpdate) -> StatusUpdate:
    """``update`` with ``status.experiment`` (arms, eligibility, counted outcomes) when the
    Client runs one and it changed; a store outage leaves the last one shown."""
    experiment = Experiment.of(record.experiment)
    if experiment is None:
        shown: dict[str, Any] | None = None
    else:
        try:
            outcomes = await read_outcomes(ctx.store, experiment.subject, experiment.id)
        except StoreUnavailable:
            return update
        shown = experiment_status(experiment, [c.executor_id for c in ranking],
                                  ranking.rejected, outcomes)
    if previous.get("experiment") == shown:
        return update
    return replace(update, fields={**update.fields, "experiment": shown})


def experiment_record(client: ObjectRef, spec: ClientSpec,
                      generation: int) -> dict[str, Any] | None:
    """The experiment as routers read it; its id changes with the spec, so outcomes of
    an earlier split are never counted for a new one."""
    exp = spec.experiment
    if exp is None:
        return None
    return Experiment(f"{client.id}@g{generation}", tuple(
        (e, float(w)) for e, w in exp.executor_ids(client.namespace)),
        exp.sticky_header, exp.sticky_field).to_record()


async def reconcile(ctx: Context, client: Observed[ClientSpec]) -> StatusUpdate:
    """Converge workload and registration for one Client; return its selection as status."""
    events, workload = await ensure_workload(ctx, client.ref, client.spec, client.logger,
                                             client.spec_changed)
    record = client_record(client.ref, client.spec, client.generation, ctx.settings)
    try:
        await ctx.store.put_client(record)
        # The fleet part is shared by every Client (one incremental read a second);
        # only this Client's samples are read for it.
        latency, _ = await ctx.store.client_view(record.id)
        snapshot = replace(await ctx.snapshots.get(), latency=latency, client_record=record)
    except StoreUnavailable as exc:
        problem = store_retry(exc, client.retry, ctx.settings)
        return store_unavailable(client.status, client.generation, problem).after(events)
    ranking = rank(record.criteria, snapshot, client=record.id)
    update = client_status(record.id, ranking, client.status, client.generation,
                           workload=workload)
    update = await with_experiment(ctx, record, ranking, client.status, update)
    await announce_selection(ctx, record.id, client.status, update, client.logger)
    return update.after(events)


async def announce_selection(ctx: Context, client_id: str, previous: Mapping[str, Any],
                             update: StatusUpdate, logger: Logger) -> None:
    """Tell the executors a change of selection concerns (``Selected``, ``Deselected``
    Events on them); remember the selection (``ctx.selections``)."""
    was = (previous.get("selected") or {}).get("executor")
    selected = update.fields["selected"] if "selected" in update.fields else previous.get(
        "selected")
    now = (selected or {}).get("executor")
    if now is None:
        ctx.selections.pop(client_id, None)
    else:
        ctx.selections[client_id] = now
    for executor_id, event in selection_events(client_id, was, now, ctx.selections):
        namespace, _, name = executor_id.partition("/")
        try:
            body = await ctx.kube.get_custom(GROUP, VERSION, "modelexecutors", name, namespace)
            if body is None:
                continue  # gone: nobody to tell
            meta = body["metadata"]
            await ctx.kube.post_event(
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelExecutor", "name": name,
                 "namespace": namespace, "uid": meta["uid"]},
                event.type, event.reason, event.message)
        except Exception as exc:  # an Event lost is no reason to fail the Client's reconcile
            logger.warning("event not posted executor=%s reason=%s: %s", executor_id,
                           event.reason, exc)


async def forget(ctx: Context, client_id: str, retry: int, logger: Logger) -> Problem | None:
    """Remove the Client's store records (the finalizer's job); the workload goes by GC."""
    problem = await forget_records(ctx, ctx.store.remove_client, "Client", client_id, retry,
                                   logger)
    if problem is None:
        ctx.selections.pop(client_id, None)
    return problem
