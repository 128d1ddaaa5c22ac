"""``mulambda top``: the executors in a terminal, refreshed (``--once``: one frame).

Per executor: replicas ready/desired, state, requests in flight, requests
per second and their latency (median and 95th percentile of what the SDK and
the gateway measured over the last minutes, ``P:outcomes:served/MINUTE``), the
measured service time at the current load, the clients' network round
trips (median and 95th percentile over every client and replica sample),
and the asynchronous task queue's depth.

Where the figures come from (read only; the operator's store user and its
Kubernetes read permissions are enough):

- the store: one selection snapshot (executor records, live heartbeats,
  measured service times), the fleet's load (``fleet_load``: in-flight
  leases and arrivals per second over ``--window`` seconds of demand
  buckets), every registered client's latency samples, and the task
  queues' backlog (``mulambda.tasks``);
- the API server: the ModelExecutors (``status.desiredReplicas``,
  ``readyReplicas``, the Ready condition). Without it (``--no-kube``, or
  no kubeconfig) desired replicas are unknown and the frame says why.

The service column is the service-time model's mean at the current load
(:mod:`mulambda.policy.latency` keeps exponentially weighted sums, not a
distribution); the request percentiles come from the routers' per-minute
latency histograms, the RTT percentiles from the clients' smoothed samples.

:func:`build_rows` and :func:`render` are pure functions of a
:class:`FleetView`: the frame is tested from a fixed one.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from mulambda.api.common import GROUP, VERSION
from mulambda.cliargs import positive_int, positive_seconds
from mulambda.policy.latency import ServiceModel, fit
from mulambda.policy.ranking import DEFAULT_POLICY
from mulambda.policy.rollout import ArmStats
from mulambda.store.metadata import MetadataStore
from mulambda.store.outcomes import read_served
from mulambda.store.records import ExecutorRecord, ReplicaRecord, ServiceStats, StoreUnavailable

from .storeargs import add_store_options, open_store
from .terminal import shown

STATES = ("serving", "warming", "cold", "failing")
SORTS = ("name", "state", "rps", "p95", "inflight", "service", "rtt")
# Ready reasons of a ModelExecutor that are a normal state, not a failure.
QUIET_REASONS = frozenset({"ModelServing", "WaitingForReplicas", "ScaledToZero"})


@dataclass(frozen=True)
class FleetView:
    """Everything one frame shows, as read at ``taken_at``."""

    taken_at: float
    executors: dict[str, ExecutorRecord]
    replicas: dict[str, list[ReplicaRecord]] = field(default_factory=dict)  # live only
    load: dict[str, tuple[int, float]] = field(default_factory=dict)  # in flight, req/s
    service: dict[str, ServiceStats] = field(default_factory=dict)
    rtt: dict[str, list[float]] = field(default_factory=dict)  # ms, all clients' samples
    # executor id -> (tasks queued or running, oldest age s); None: no task queue to read
    queue: dict[str, tuple[int, float]] | None = None
    # executor id -> requests the routers served in the last minutes (latency histogram)
    served: dict[str, ArmStats] = field(default_factory=dict)
    served_seconds: float = 0.0
    # executor id -> its ModelExecutor's status; None: the API server was not read
    resources: dict[str, Mapping[str, Any]] | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    executor: str
    type: str
    state: str
    ready: int
    desired: int | None
    inflight: int
    rps: float
    service_ms: float
    measured: int  # requests the service-time model was measured on (0: declared)
    rtt_p50: float | None
    rtt_p95: float | None
    p50: float | None  # ms, requests served lately (the routers' measurement)
    p95: float | None
    queue: int | None
    why: str  # a failing executor's reason


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def state_of(record: ExecutorRecord, live: Sequence[ReplicaRecord], desired: int | None,
             ready_condition: Mapping[str, Any] | None) -> tuple[str, str]:
    """(state, why): serving (a live Available replica), failing (the record or a replica
    failed and none serves, or Ready is False for a reason that is not a normal wait),
    cold (scaled to zero, nothing running), else warming."""
    if any(r.state == "Available" for r in live):
        return "serving", ""
    failed = next((r for r in live if r.state == "Failed"), None)
    if failed is not None:
        return "failing", failed.reason or "LoadFailed"
    reason = (ready_condition or {}).get("reason") or ""
    if (ready_condition or {}).get("status") == "False" and reason not in QUIET_REASONS:
        return "failing", reason
    if record.state == "Failed":
        return "failing", "Failed"
    if not live and (desired == 0 or (desired is None and record.state == "ScaledToZero")):
        return "cold", ""
    return "warming", ""


def build_rows(view: FleetView, *, namespace: str | None = None, type_: str | None = None,
               sort: str = "name") -> list[Row]:
    """One row per executor of ``view`` (filtered by namespace and model type), sorted."""
    rows = []
    for eid, rec in view.executors.items():
        if namespace is not None and rec.namespace != namespace:
            continue
        if type_ is not None and rec.type != type_:
            continue
        live = view.replicas.get(eid, [])
        status = (view.resources or {}).get(eid)
        desired = None if status is None else int(status.get("desiredReplicas") or 0)
        ready_cond = next((c for c in (status or {}).get("conditions") or []
                           if c.get("type") == "Ready"), None)
        state, why = state_of(rec, live, desired, ready_cond)
        ready = (int(status.get("readyReplicas") or 0) if status is not None
                 else sum(r.state == "Available" for r in live))
        inflight, rps = view.load.get(eid, (0, 0.0))
        declared = rec.service_time_ms or DEFAULT_POLICY.default_service_time_ms
        stats = view.service.get(eid)
        model = fit(stats, ServiceModel(declared, declared / DEFAULT_POLICY.replica_concurrency),
                    DEFAULT_POLICY.fit)
        service = model.predict(inflight / max(ready, 1))
        samples = view.rtt.get(eid, [])
        queued = None if view.queue is None else view.queue.get(eid, (0, 0.0))[0]
        served = view.served.get(eid)
        if served is not None and view.served_seconds > 0:
            rps = served.requests / view.served_seconds  # answered and failed, all routers
        rows.append(Row(eid, rec.type, state, ready, desired, inflight, rps, service,
                        stats.count if stats is not None else 0, percentile(samples, 50),
                        percentile(samples, 95), served.p50 if served else None,
                        served.p95 if served else None, queued, why))
    keys = {
        "name": lambda r: (r.executor,),
        "state": lambda r: (STATES.index(r.state), r.executor),
        "rps": lambda r: (-r.rps, r.executor),
        "inflight": lambda r: (-r.inflight, r.executor),
        "service": lambda r: (-r.service_ms, r.executor),
        "rtt": lambda r: (-(r.rtt_p95 or 0.0), r.executor),
        "p95": lambda r: (-(r.p95 or 0.0), r.executor),
    }
    return sorted(rows, key=keys[sort])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(view: FleetView, *, namespace: str | None = None, type_: str | None = None,
           sort: str = "name", limit: int | None = None) -> Group:
    """The frame: a header line, the table (the first ``limit`` rows), and notes on what
    could not be read."""
    rows = build_rows(view, namespace=namespace, type_=type_, sort=sort)
    table = Table(box=None, pad_edge=False)
    heads = ["executor", "type", "state", "ready/desired", "in flight", "req/s",
             "p50 ms", "p95 ms", "service ms", "rtt p50", "rtt p95"]
    if view.queue is not None:
        heads.append("queue")
    for head in heads:
        table.add_column(head, justify="left" if head in ("executor", "type", "state")
                         else "right", no_wrap=True)
    # Drawing costs milliseconds per row: a fleet of thousands shows the rows that fit.
    for r in rows[:limit]:
        state = r.state + (f" ({r.why})" if r.why else "")
        service = _ms(r.service_ms) + ("" if r.measured else "*")
        cells = [r.executor, r.type, state,
                 f"{r.ready}/{'?' if r.desired is None else r.desired}", str(r.inflight),
                 f"{r.rps:.2f}", _ms(r.p50), _ms(r.p95), service, _ms(r.rtt_p50),
                 _ms(r.rtt_p95)]
        if view.queue is not None:
            cells.append("-" if r.queue is None else str(r.queue))
        # Names, states and reasons come from the store (a companion writes a reason):
        # as markup, "[/x]" raised and "[bold]" restyled; an ESC reached the terminal.
        table.add_row(*(shown(c) for c in cells))
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    stamp = time.strftime("%H:%M:%S", time.gmtime(view.taken_at))
    header = Text(f"mulambda top  {stamp} UTC  executors {len(rows)}  " + "  ".join(
        f"{s} {n}" for s, n in counts.items()) + f"  sorted by {sort}")
    notes = [Text("req/s, p50/p95 ms: requests the SDK and the gateway sent in the last "
                  "minutes, as they measured them; service ms: the measured model's mean "
                  "at the current load (* = declared serviceTimeMs, nothing measured yet)")]
    if limit is not None and len(rows) > limit:
        notes.insert(0, Text(f"... {len(rows) - limit} more executors (sorted by {sort}; "
                             "narrow with -n, --type or --limit)"))
    notes.extend(shown(n) for n in view.notes)
    return Group(header, table, *notes)


def frame_text(view: FleetView, *, width: int = 140, **options: Any) -> str:
    """:func:`render` as plain text (no colour codes)."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False).print(
        render(view, **options))
    return out.getvalue()


# -- reading (I/O) ------------------------------------------------------------------------

async def read_store(store: MetadataStore, window: float) -> FleetView:
    """Everything the store says about the fleet (read-only commands)."""
    snap = await store.snapshot(None)
    load = await store.fleet_load({e: window for e in snap.executors})
    rtt: dict[str, list[float]] = {}
    clients = await store.list_clients()
    for latency, _ in await asyncio.gather(*(store.client_view(c) for c in clients)):
        for eid, pods in latency.items():
            rtt.setdefault(eid, []).extend(s.ms for s in pods.values())
    queue, notes = None, []
    try:
        from mulambda.tasks.queue import TaskQueue
    except ImportError:  # an install without asynchronous tasks
        pass
    else:
        try:
            queue = await TaskQueue(store).backlog(snap.executors, tidy=False)
        except StoreUnavailable as exc:
            notes.append(f"task queues not read: {exc}")
    try:
        served, seconds = await read_served(store, snap.taken_at)
    except StoreUnavailable as exc:
        served, seconds = {}, 0.0
        notes.append(f"served requests not read: {exc}")
    return FleetView(snap.taken_at, snap.executors, snap.replicas, load, snap.service, rtt,
                     queue, served, seconds, None, tuple(notes))


def read_resources(namespace: str | None) -> dict[str, Mapping[str, Any]]:
    """executor id -> status of every ModelExecutor the kubeconfig's user may list."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CustomObjectsApi()
    found = cast(dict[str, Any], (
        api.list_namespaced_custom_object(GROUP, VERSION, namespace, "modelexecutors")
        if namespace else api.list_cluster_custom_object(GROUP, VERSION, "modelexecutors")))
    return {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o.get("status") or {}
            for o in found.get("items", [])}


async def read_view(store: MetadataStore, args: argparse.Namespace) -> FleetView:
    view = await read_store(store, args.window)
    if args.no_kube:
        return view
    try:
        resources = await asyncio.to_thread(read_resources, args.namespace)
    except Exception as exc:  # no kubeconfig, unreachable, refused: the store still speaks
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return replace(view, notes=(
            *view.notes, f"API server not read ({first}): desired replicas unknown"))
    return replace(view, resources=resources)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", default=None, help="only this namespace")
    parser.add_argument("--type", dest="type_", default=None, help="only this model type")
    parser.add_argument("--sort", choices=SORTS, default="name", help="row order")
    parser.add_argument("--interval", type=positive_seconds, default=2.0,
                        help="seconds between frames (default 2)")
    parser.add_argument("--window", type=positive_seconds, default=60.0,
                        help="seconds of demand requests/s is averaged over (default 60)")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="rows shown (default: all with --once, else what fits the "
                             "terminal)")
    parser.add_argument("--no-kube", action="store_true",
                        help="do not read the API server (desired replicas unknown)")
    add_store_options(parser)


async def _main(args: argparse.Namespace) -> int:
    from rich.live import Live

    store = open_store(args)
    options: dict[str, Any] = {"namespace": args.namespace, "type_": args.type_,
                               "sort": args.sort, "limit": args.limit}
    try:
        if args.once:
            print(frame_text(await read_view(store, args), **options), end="")
            return 0
        with Live(auto_refresh=False, screen=False) as live:
            while True:
                if args.limit is None:  # the header, the table's head and two notes
                    options["limit"] = max(3, live.console.size.height - 5)
                live.update(render(await read_view(store, args), **options), refresh=True)
                await asyncio.sleep(args.interval)
    except StoreUnavailable as exc:
        print(f"mulambda top: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 0
