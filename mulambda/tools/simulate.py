"""``mulambda simulate``: replay one request stream through several routers.

A discrete-event simulation (milliseconds, seeded, no I/O) of:

* **nodes** and the round-trip network delay between them (``network_ms``,
  symmetric; a missing pair falls back to ``default_network_ms``);
* **models** with a true service time, per request::

      ((service_ms + per_item_ms * items + per_concurrent_ms * busy)
       * (1 + slowdown * busy) * lognormal(jitter)) + uniform(0, jitter_ms)

  where ``busy`` is the number of requests already running on the replica
  when it starts. ``concurrency`` is the number of slots per replica
  (requests beyond them queue FIFO); 0 runs every request at once. What the
  operator publishes as ``serviceTimeMs`` is ``declared_ms`` (default
  ``service_ms``): the routers that use it get only the base time;
* **executors**: a model on one or more nodes (one replica per entry);
* **clients** on nodes with preferences (``latency``/``accuracy`` weights,
  optional ``max_latency_ms``), a share of the traffic, a request size
  (``items``, or uniform in ``[items, items_max]``) and a number of SDK
  processes (``instances``);
* a **request stream**: Poisson arrivals at ``rate_per_s``, the client of
  each request drawn by share, the jitter draws and the size, all from
  ``seed``. Every router sees exactly the same stream.

Routers:

* ``mulambda-sdk`` -- each client's ``instances`` SDK processes run
  :func:`mulambda.policy.selection.rank` (``replicas=True``) on their own
  view: their own requests in flight and measurements exact, everybody
  else's from a store snapshot refreshed every ``snapshot_ttl_ms`` (the
  SDK's cache, 1 s), service times learned only from answered requests
  (:class:`mulambda.policy.latency.ServiceTracker`), starting from the
  declared times. Requests go straight from the client to the replica.
* ``mulambda-gateway`` -- the same ranking in ``gateways`` selector
  processes on ``gateway_node`` (default: the first client's node) with a
  ``gateway_cache_ms`` (0.5 s) snapshot: requests go client -> gateway ->
  replica and back, plus ``gateway_overhead_ms`` each way.
* ``oracle`` -- knows every model's true parameters and every replica's
  true state (running, queued, on the way to it) and scores the true
  expected latency with mulambda's scoring (same utilities, same ceiling):
  the best a router with this objective can do request by request.
* ``least-outstanding`` -- the replica with the fewest requests in flight
  (join-shortest-queue over all replicas of the type; ties: lower RTT).
* ``prototype`` -- the MuLambda prototype's scorer: latency = RTT +
  declared service time normalised into buckets (30, 60, 90, 150, 240,
  390, 630, 1020, 1650 ms -> 1 - bucket/9), accuracy / best accuracy,
  weighted sum; no load.
* ``round-robin``, ``random`` (seeded) and ``lowest-network`` (the executor
  with the smallest mean RTT to the client) over matching executors.

Routers other than mulambda's send to the executor's Service, which spreads
over its replicas round-robin. The first ``warmup`` fraction of the stream
(default 10 %) is left out of every router's figures: mulambda starts from
the declared times and learns, the figures are about the steady state.

Output per router: median, p95 and mean latency (client -> model -> client,
including queueing) and mean accuracy of the models used, overall and per
client. ``--suite`` runs the experiment of issue 11 instead: see
:func:`suite`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import random
import statistics
import sys
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mulambda.policy.latency import OwnRequests, ServiceTracker, add_stats
from mulambda.policy.selection import Criteria, Policy, Preferences, rank
from mulambda.store.records import (
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    Snapshot,
)

log = logging.getLogger("mulambda.simulate")

SELECTORS = ("mulambda-sdk", "mulambda-gateway", "oracle", "least-outstanding", "prototype",
             "round-robin", "random", "lowest-network")
PROTOTYPE_BUCKETS_MS = (30, 60, 90, 150, 240, 390, 630, 1020, 1650)

# Edge nodes with small, fast models next to the cameras and a cloud node
# with a large accurate model: the lowest-network baseline overloads the
# edge models, round-robin sends latency-sensitive traffic to the cloud.
DEFAULT_SCENARIO: dict[str, Any] = {
    "seed": 7,
    "requests": 6000,
    "rate_per_s": 260,
    "jitter": 0.15,
    "default_network_ms": 30,
    "nodes": ["edge-a", "edge-b", "cloud"],
    "network_ms": {
        "edge-a": {"edge-a": 0.4, "edge-b": 4, "cloud": 28},
        "edge-b": {"edge-b": 0.4, "cloud": 24},
        "cloud": {"cloud": 0.3},
    },
    "models": {
        "mobilenet": {"service_ms": 6, "accuracy": 0.71, "concurrency": 1, "slowdown": 0.0},
        "resnet50": {"service_ms": 18, "accuracy": 0.76, "concurrency": 2, "slowdown": 0.2},
        "efficientnet": {"service_ms": 40, "accuracy": 0.84, "concurrency": 4, "slowdown": 0.1},
    },
    "executors": [
        {"name": "mobilenet-a", "model": "mobilenet", "nodes": ["edge-a"]},
        {"name": "mobilenet-b", "model": "mobilenet", "nodes": ["edge-b"]},
        {"name": "resnet-b", "model": "resnet50", "nodes": ["edge-b"]},
        {"name": "efficientnet-cloud", "model": "efficientnet", "nodes": ["cloud", "cloud"]},
    ],
    "clients": [
        {"name": "camera-a", "node": "edge-a", "share": 0.55, "latency": 1, "accuracy": 0.3},
        {"name": "camera-b", "node": "edge-b", "share": 0.3, "latency": 1, "accuracy": 1},
        {"name": "analytics", "node": "cloud", "share": 0.15, "latency": 0.2, "accuracy": 1},
    ],
}


@dataclass
class _Replica:
    node: str
    slots: int  # 0: every request runs at once
    busy: int = 0
    transit: int = 0  # requests on their way to it
    queue: deque[int] = field(default_factory=deque)


@dataclass
class Figures:
    """Latencies (ms) and accuracies of the requests one router served."""

    rtt_ms: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.rtt_ms) if self.rtt_ms else math.nan

    @property
    def p95(self) -> float:
        return _percentile(self.rtt_ms, 95) if self.rtt_ms else math.nan

    @property
    def mean(self) -> float:
        return statistics.fmean(self.rtt_ms) if self.rtt_ms else math.nan

    @property
    def mean_accuracy(self) -> float:
        return statistics.fmean(self.accuracy) if self.accuracy else math.nan


@dataclass
class SelectorResult(Figures):
    """Figures of one router over the stream (after the warm-up), overall and per client."""

    selector: str = ""
    used: Counter[str] = field(default_factory=Counter)
    by_client: dict[str, Figures] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def figures(f: Figures) -> dict[str, Any]:
            return {"p50_ms": _finite(f.p50, 2), "p95_ms": _finite(f.p95, 2),
                    "mean_ms": _finite(f.mean, 2), "mean_accuracy": _finite(f.mean_accuracy, 4),
                    "requests": len(f.rtt_ms)}

        return {"selector": self.selector, **figures(self), "used": dict(self.used),
                "clients": {k: figures(v) for k, v in self.by_client.items()}}


def _finite(value: float, digits: int) -> float | None:
    """``value`` rounded, or None (JSON null) when there is none."""
    return round(value, digits) if math.isfinite(value) else None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, math.ceil(q / 100 * len(ordered)) - 1)  # nearest rank
    return ordered[k]


class Scenario:
    """A parsed scenario; raises ValueError with the offending field."""

    def __init__(self, raw: dict[str, Any]) -> None:
        try:
            self.seed = int(raw.get("seed", 1))
            self.requests = int(raw["requests"])
            self.rate = float(raw["rate_per_s"])
            # feedback_interval_ms: the old name of the SDK snapshot's age.
            self.snapshot_ttl = float(raw.get("snapshot_ttl_ms",
                                              raw.get("feedback_interval_ms", 1000)))
            self.gateway_cache = float(raw.get("gateway_cache_ms", 500))
            # Fresh reads of the other routers' in-flight leases (< 0: none) and what
            # one costs the request that waits for it.
            self.load_ttl = float(raw.get("load_ttl_ms", 2))
            self.store_rtt = float(raw.get("store_rtt_ms", 0.5))
            self.gateway_overhead = float(raw.get("gateway_overhead_ms", 0.5))
            self.gateways = int(raw.get("gateways", 1))
            self.warmup = float(raw.get("warmup", 0.1))
            self.jitter = float(raw.get("jitter", 0.1))
            self.default_net = float(raw.get("default_network_ms", 10))
            self.nodes = list(raw["nodes"])
            self.net: dict[tuple[str, str], float] = {}
            for a, row in (raw.get("network_ms") or {}).items():
                for b, ms in row.items():
                    self.net[(a, b)] = self.net[(b, a)] = float(ms)
            self.models = {k: dict(v) for k, v in raw["models"].items()}
            self.executors = [dict(e) for e in raw["executors"]]
            self.clients = [dict(c) for c in raw["clients"]]
            self.gateway_node = str(raw.get("gateway_node") or self.clients[0]["node"])
            for m in self.models.values():
                for key in ("service_ms", "per_item_ms", "per_concurrent_ms", "jitter_ms",
                            "slowdown", "declared_ms"):
                    if key in m and not (math.isfinite(float(m[key])) and float(m[key]) >= 0):
                        raise ValueError(f"{key} must be a non-negative number")
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"bad scenario: {exc!r}") from exc
        for e in self.executors:
            if e["model"] not in self.models:
                raise ValueError(f"executor {e['name']}: unknown model {e['model']!r}")
            for n in e["nodes"]:
                if n not in self.nodes:
                    raise ValueError(f"executor {e['name']}: unknown node {n!r}")
        for c in self.clients:
            if c["node"] not in self.nodes:
                raise ValueError(f"client {c['name']}: unknown node {c['node']!r}")
        if self.gateway_node not in self.nodes:
            raise ValueError(f"gateway_node: unknown node {self.gateway_node!r}")
        if self.requests <= 0 or self.rate <= 0:
            raise ValueError("requests and rate_per_s must be positive")
        if not 0 <= self.warmup < 1:
            raise ValueError("warmup must be within [0, 1)")

    def rtt(self, a: str, b: str) -> float:
        if a == b and (a, b) not in self.net:
            return 0.0
        return self.net.get((a, b), self.default_net)

    def type_of(self, client_or_model: dict[str, Any]) -> str:
        return str(client_or_model.get("type", "default"))

    def criteria(self, c: dict[str, Any]) -> Criteria:
        limit = c.get("max_latency_ms")
        return Criteria(type=self.type_of(c), latency_weight=float(c.get("latency", 1)),
                        accuracy_weight=float(c.get("accuracy", 1)),
                        max_latency_ms=float(limit) if limit is not None else None)


# (arrival ms, client index, lognormal factor, uniform draw, items)
_Stream = list[tuple[float, int, float, float, int]]


def _stream(sc: Scenario) -> _Stream:
    """Every request's arrival, client, jitter draws and size, from the seed."""
    rng = random.Random(sc.seed)
    shares = [float(c.get("share", 1)) for c in sc.clients]
    t = 0.0
    out = []
    for _ in range(sc.requests):
        t += rng.expovariate(sc.rate / 1000.0)
        who = rng.choices(range(len(sc.clients)), weights=shares)[0]
        factor = rng.lognormvariate(0, sc.jitter) if sc.jitter > 0 else 1.0
        u = rng.random()
        c = sc.clients[who]
        low = int(c.get("items", 1))
        items = rng.randint(low, int(c.get("items_max", low)))
        out.append((t, who, factor, u, items))
    return out


def _records(sc: Scenario) -> dict[str, ExecutorRecord]:
    recs = {}
    for e in sc.executors:
        m = sc.models[e["model"]]
        declared = m.get("declared_ms", m["service_ms"])
        recs[f"sim/{e['name']}"] = ExecutorRecord(
            namespace="sim", name=e["name"], model=e["model"], version=1,
            type=sc.type_of(m), input="any", output="any", accuracy=m.get("accuracy"),
            rest=f"http://{e['name']}:8501", grpc="", state="Ready",
            min_replicas=len(e["nodes"]), max_replicas=len(e["nodes"]),
            ready_replicas=len(e["nodes"]),
            service_time_ms=None if declared is None else float(declared),
        )
    return recs


class _World:
    """The true state every router acts on: replicas, their queues, the models."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.model_of = {f"sim/{e['name']}": sc.models[e["model"]] for e in sc.executors}
        self.reps: dict[str, list[_Replica]] = {
            f"sim/{e['name']}": [
                _Replica(node=n, slots=int(sc.models[e["model"]].get("concurrency", 1)))
                for n in e["nodes"]]
            for e in sc.executors
        }

    def duration(self, eid: str, rep: _Replica, factor: float, u: float, items: int) -> float:
        m = self.model_of[eid]
        busy = rep.busy
        core = (float(m["service_ms"]) + float(m.get("per_item_ms", 0)) * items
                + float(m.get("per_concurrent_ms", 0)) * busy)
        return (core * (1 + float(m.get("slowdown", 0)) * busy) * factor
                + float(m.get("jitter_ms", 0)) * u)

    def expected(self, eid: str, rep: _Replica, items: int) -> float:
        """True expected service time (queueing included) of a request arriving now."""
        m = self.model_of[eid]
        mean_factor = math.exp(self.sc.jitter ** 2 / 2)
        ahead = rep.busy + len(rep.queue) + rep.transit
        slots = rep.slots
        running = ahead if slots <= 0 else min(ahead, slots - 1)

        def one(busy: float) -> float:
            core = (float(m["service_ms"]) + float(m.get("per_item_ms", 0)) * items
                    + float(m.get("per_concurrent_ms", 0)) * busy)
            return (core * (1 + float(m.get("slowdown", 0)) * busy) * mean_factor
                    + float(m.get("jitter_ms", 0)) / 2)

        service = one(running)
        if slots > 0 and ahead >= slots:
            service += (ahead - slots + 1) * service / slots  # wait for the queue ahead
        return service


class _Router:
    """Chooses (executor, replica index) per request; told when the answer is back."""

    name = ""

    def __init__(self, sc: Scenario, recs: dict[str, ExecutorRecord], world: _World,
                 policy: Policy) -> None:
        self.sc, self.recs, self.world, self.policy = sc, recs, world, policy
        self.matching = [sorted(eid for eid, r in recs.items() if r.type == sc.type_of(c))
                         for c in sc.clients]
        for c, m in zip(sc.clients, self.matching, strict=True):
            if not m:
                raise ValueError(f"client {c['name']}: no executor of its type")
        self.next_replica: Counter[str] = Counter()
        # request -> ms the router spent deciding (waiting for the store) before sending
        self.delay: dict[int, float] = {}

    def dispatch_node(self, who: int) -> str:
        """Where the routing decision is made and the request leaves for the replica."""
        return str(self.sc.clients[who]["node"])

    def hop_ms(self, who: int) -> float:
        """One-way delay client -> dispatch point (and back)."""
        return 0.0

    def service_replica(self, eid: str) -> int:
        """The replica a Kubernetes Service would pick (round-robin)."""
        i = self.next_replica[eid] % len(self.world.reps[eid])
        self.next_replica[eid] += 1
        return i

    def choose(self, req: int, who: int, now: float, items: int) -> tuple[str, int]:
        raise NotImplementedError

    def complete(self, req: int, now: float, elapsed_ms: float) -> None:
        """The answer is back at the dispatch point, ``elapsed_ms`` after it left."""


class _ByExecutor(_Router):
    def __init__(self, pick: Callable[[int], str], *args: Any) -> None:
        super().__init__(*args)
        self.pick = pick

    def choose(self, req: int, who: int, now: float, items: int) -> tuple[str, int]:
        eid = self.pick(who)
        return eid, self.service_replica(eid)


def _baselines(sc: Scenario, recs: dict[str, ExecutorRecord], world: _World,
               policy: Policy) -> dict[str, Callable[[], _Router]]:
    nodes_of = {f"sim/{e['name']}": e["nodes"] for e in sc.executors}
    base = _Router(sc, recs, world, policy)
    rtt_of = [{eid: statistics.fmean(sc.rtt(c["node"], n) for n in nodes_of[eid])
               for eid in m} for c, m in zip(sc.clients, base.matching, strict=True)]

    def round_robin() -> _Router:
        turn = [0]

        def pick(who: int) -> str:
            turn[0] += 1
            return base.matching[who][turn[0] % len(base.matching[who])]
        return _ByExecutor(pick, sc, recs, world, policy)

    def rand() -> _Router:
        rng = random.Random(sc.seed + 1)
        return _ByExecutor(lambda who: rng.choice(base.matching[who]), sc, recs, world, policy)

    def lowest_network() -> _Router:
        nearest = [min(m, key=lambda eid, w=w: (rtt_of[w][eid], eid))  # type: ignore[misc]
                   for w, m in enumerate(base.matching)]
        return _ByExecutor(lambda who: nearest[who], sc, recs, world, policy)

    def prototype() -> _Router:
        best = []
        for w, c in enumerate(sc.clients):
            m = base.matching[w]
            top = max((recs[e].accuracy or 0.0) for e in m) or 1.0
            lat_w, acc_w = float(c.get("latency", 1)), float(c.get("accuracy", 1))

            def score(eid: str, w: int = w, top: float = top, lat_w: float = lat_w,
                      acc_w: float = acc_w) -> float:
                declared = recs[eid].service_time_ms or policy.default_service_time_ms
                latency = rtt_of[w][eid] + declared
                bucket = next((i for i, b in enumerate(PROTOTYPE_BUCKETS_MS) if latency <= b),
                              len(PROTOTYPE_BUCKETS_MS))
                normal = 1 - bucket / len(PROTOTYPE_BUCKETS_MS)
                return lat_w * normal + acc_w * (recs[eid].accuracy or 0.0) / top

            best.append(max(m, key=lambda eid, s=score: (s(eid), eid)))  # type: ignore[misc]
        return _ByExecutor(lambda who: best[who], sc, recs, world, policy)

    return {"round-robin": round_robin, "random": rand, "lowest-network": lowest_network,
            "prototype": prototype}


class _LeastOutstanding(_Router):
    name = "least-outstanding"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.outstanding: dict[tuple[str, int], int] = {}
        self.sent: dict[int, tuple[str, int]] = {}

    def choose(self, req: int, who: int, now: float, items: int) -> tuple[str, int]:
        node = self.sc.clients[who]["node"]
        best = min(((self.outstanding.get((eid, i), 0), self.sc.rtt(node, rep.node), eid, i)
                    for eid in self.matching[who]
                    for i, rep in enumerate(self.world.reps[eid])))
        key = (best[2], best[3])
        self.outstanding[key] = self.outstanding.get(key, 0) + 1
        self.sent[req] = key
        return key

    def complete(self, req: int, now: float, elapsed_ms: float) -> None:
        self.outstanding[self.sent.pop(req)] -= 1


class _Oracle(_Router):
    """Knows the true parameters and state; scores like mulambda, request by request."""

    name = "oracle"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.prefs = [Preferences.of(self.sc.criteria(c), self.policy) for c in self.sc.clients]
        self.best_acc = [max((self.recs[e].accuracy or 0.0) for e in m) or 1.0
                         for m in self.matching]

    def choose(self, req: int, who: int, now: float, items: int) -> tuple[str, int]:
        node = self.sc.clients[who]["node"]
        prefs, top = self.prefs[who], self.best_acc[who]
        best: tuple[bool, float, str, int] | None = None
        for eid in self.matching[who]:
            ratio = (self.recs[eid].accuracy or 0.0) / top
            for i, rep in enumerate(self.world.reps[eid]):
                latency = self.sc.rtt(node, rep.node) + self.world.expected(eid, rep, items)
                key = (latency > prefs.ceiling_ms, -prefs.score(latency, ratio), eid, i)
                if best is None or key < best:
                    best = key
        assert best is not None
        return best[2], best[3]


@dataclass
class _Instance:
    """One SDK process or one gateway: its own requests, measurements and views."""

    index: int
    rng: random.Random
    tracker: ServiceTracker
    own: OwnRequests = field(default_factory=OwnRequests)
    snap_at: float = -math.inf
    others_stats: dict[str, ServiceStats] = field(default_factory=dict)
    snap_requests: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)
    load_at: float = -math.inf
    others_requests: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)


class _Mulambda(_Router):
    """mulambda's ranking, run by SDK processes or by gateways, each with its own view."""

    def __init__(self, gateway: bool, *args: Any) -> None:
        super().__init__(*args)
        sc = self.sc
        self.gateway = gateway
        self.name = "mulambda-gateway" if gateway else "mulambda-sdk"
        self.ttl = sc.gateway_cache if gateway else sc.snapshot_ttl
        self.criteria = [sc.criteria(c) for c in sc.clients]
        if gateway:
            owners = [list(range(sc.gateways)) for _ in sc.clients]
            count = sc.gateways
        else:
            owners, count = [], 0
            for c in sc.clients:
                n = max(1, int(c.get("instances", 1)))
                owners.append(list(range(count, count + n)))
                count += n
        self.owners = owners
        self.turn = [0] * len(sc.clients)
        self.instances = [_Instance(i, random.Random(sc.seed * 7919 + i),
                                    ServiceTracker(self.policy.fit)) for i in range(count)]
        # What the store holds: every instance's leases (each request's replica and
        # when it should be served and back, in seconds) and measurements.
        self.published: list[dict[int, tuple[str, str, float, float]]] = [
            {} for _ in range(count)]
        self.published_stats: list[dict[str, ServiceStats]] = [{} for _ in range(count)]
        self.pods = {eid: {f"r{i}": i for i in range(len(reps))}
                     for eid, reps in self.world.reps.items()}
        self.replicas = {
            eid: [ReplicaRecord(executor=eid, pod=f"r{i}", ip=f"10.0.{n}.{i}",
                                state="Available", expires_at=math.inf)
                  for i in range(len(reps))]
            for n, (eid, reps) in enumerate(self.world.reps.items())
        }
        # What the companions measure: RTT from each replica to each client.
        self.latency = [
            {eid: {f"r{i}": LatencySample(ms=sc.rtt(c["node"], rep.node), samples=10)
                   for i, rep in enumerate(reps)} for eid, reps in self.world.reps.items()}
            for c in sc.clients
        ]
        self.sent: dict[int, tuple[_Instance, str, int, float, float, float, int]] = {}

    def dispatch_node(self, who: int) -> str:
        return self.sc.gateway_node if self.gateway else super().dispatch_node(who)

    def hop_ms(self, who: int) -> float:
        if not self.gateway:
            return 0.0
        return (self.sc.rtt(self.sc.clients[who]["node"], self.sc.gateway_node) / 2
                + self.sc.gateway_overhead)

    def _others(self, inst: _Instance) -> dict[str, list[tuple[str, float, float]]]:
        found: dict[str, list[tuple[str, float, float]]] = {}
        for other in self.instances:
            if other is not inst:
                for e, pod, busy_until, back_by in self.published[other.index].values():
                    found.setdefault(e, []).append((pod, busy_until, back_by))
        return found

    def _refresh(self, inst: _Instance, now: float) -> None:
        stats: dict[str, ServiceStats] = {}
        for other in self.instances:
            if other is not inst:
                for e, st in self.published_stats[other.index].items():
                    merged = add_stats(stats.get(e), st)
                    assert merged is not None
                    stats[e] = merged
        inst.others_stats, inst.snap_requests, inst.snap_at = stats, self._others(inst), now

    def choose(self, req: int, who: int, now: float, items: int) -> tuple[str, int]:
        sc = self.sc
        owners = self.owners[who]
        inst = self.instances[owners[self.turn[who] % len(owners)]]
        self.turn[who] += 1
        if now - inst.snap_at >= self.ttl:
            self._refresh(inst, now)
        delay = 0.0
        if sc.load_ttl < 0:  # no fresh reads: the snapshot's leases
            others = inst.snap_requests
        else:
            if now - inst.load_at >= sc.load_ttl:
                inst.others_requests, inst.load_at = self._others(inst), now
                delay = sc.store_rtt  # the decision waits for the read
            others = inst.others_requests
        stats = dict(inst.others_stats)
        for e, st in inst.tracker.stats.items():
            merged = add_stats(stats.get(e), st)
            assert merged is not None
            stats[e] = merged
        own, own_pods = inst.own.ahead(now)
        snap = Snapshot(self.recs, self.replicas, self.latency[who], {}, now / 1000, None,
                        stats, others, own, own_pods)
        ranking = rank(self.criteria[who], snap, policy=self.policy, items=items,
                       rng=inst.rng, replicas=True)
        c = ranking[0]
        pod = c.replica.pod if c.replica is not None else "r0"
        eid = c.executor_id
        stay, net, sent = c.service_ms + c.load_ms, c.network_ms, now + delay
        token = inst.own.add(eid, pod, sent, stay, net)
        self.published[inst.index][token] = (eid, pod, (sent + net / 2 + stay) / 1000,
                                             (sent + net + stay) / 1000)
        self.sent[req] = (inst, eid, token, c.inflight, c.network_ms, c.service_ms + c.load_ms,
                          items)
        self.delay[req] = delay
        return eid, self.pods[eid][pod]

    def complete(self, req: int, now: float, elapsed_ms: float) -> None:
        inst, eid, token, k, net, predicted, items = self.sent.pop(req)
        # The router times the request from when it sent it, not from the store read.
        inst.tracker.observe(eid, inflight=k, items=items,
                             elapsed_ms=elapsed_ms - self.delay.pop(req, 0.0),
                             network_ms=net, predicted_ms=predicted)
        self.published_stats[inst.index][eid] = inst.tracker.stats[eid]
        inst.own.remove(token)
        del self.published[inst.index][token]


def _routers(sc: Scenario, recs: dict[str, ExecutorRecord], world: _World,
             policy: Policy) -> dict[str, Callable[[], _Router]]:
    args = (sc, recs, world, policy)
    out: dict[str, Callable[[], _Router]] = {
        "mulambda-sdk": lambda: _Mulambda(False, *args),
        "mulambda-gateway": lambda: _Mulambda(True, *args),
        "oracle": lambda: _Oracle(*args),
        "least-outstanding": lambda: _LeastOutstanding(*args),
    }
    out.update(_baselines(*args))
    return out


_ARRIVE, _DISPATCH, _REACH, _DONE, _BACK, _FINAL = range(6)


def _run_one(sc: Scenario, name: str, router: _Router, stream: _Stream) -> SelectorResult:
    world = router.world
    reps = world.reps
    routed: dict[int, tuple[str, int]] = {}
    left_at: dict[int, float] = {}
    result = SelectorResult(selector=name)
    skip = int(len(stream) * sc.warmup)
    events: list[tuple[float, int, int, int]] = [(t, i, _ARRIVE, i)
                                                 for i, (t, *_rest) in enumerate(stream)]
    heapq.heapify(events)
    seq = len(stream)

    def push(at: float, kind: int, req: int) -> None:
        nonlocal seq
        heapq.heappush(events, (at, seq, kind, req))
        seq += 1

    def start(now: float, req: int) -> None:
        eid, ri = routed[req]
        rep = reps[eid][ri]
        _t, _who, factor, u, items = stream[req]
        duration = world.duration(eid, rep, factor, u, items)
        rep.busy += 1
        push(now + duration, _DONE, req)

    while events:
        now, _s, kind, req = heapq.heappop(events)
        t0, who, _f, _u, items = stream[req]
        if kind == _ARRIVE:
            hop = router.hop_ms(who)
            if hop > 0:
                push(now + hop, _DISPATCH, req)
                continue
            kind = _DISPATCH
        if kind == _DISPATCH:
            eid, ri = router.choose(req, who, now, items)
            routed[req] = (eid, ri)
            left_at[req] = now
            rep = reps[eid][ri]
            rep.transit += 1
            delay = router.delay.get(req, 0.0)
            push(now + delay + sc.rtt(router.dispatch_node(who), rep.node) / 2, _REACH, req)
        elif kind == _REACH:
            eid, ri = routed[req]
            rep = reps[eid][ri]
            rep.transit -= 1
            if rep.slots <= 0 or rep.busy < rep.slots:
                start(now, req)
            else:
                rep.queue.append(req)
        elif kind == _DONE:
            eid, ri = routed[req]
            rep = reps[eid][ri]
            rep.busy -= 1
            if rep.queue:
                start(now, rep.queue.popleft())
            push(now + sc.rtt(router.dispatch_node(who), rep.node) / 2, _BACK, req)
        elif kind == _BACK:
            router.complete(req, now, now - left_at.pop(req))
            hop = router.hop_ms(who)
            if hop > 0:
                push(now + hop, _FINAL, req)
                continue
            kind = _FINAL
        if kind == _FINAL:
            eid, _ri = routed.pop(req)
            if req < skip:
                continue
            latency = now - t0
            accuracy = float(world.model_of[eid].get("accuracy") or 0.0)
            client = str(sc.clients[who]["name"])
            figs = result.by_client.setdefault(client, Figures())
            for f in (result, figs):
                f.rtt_ms.append(latency)
                f.accuracy.append(accuracy)
            result.used[eid.removeprefix("sim/")] += 1
    return result


def simulate(raw: dict[str, Any], selectors: tuple[str, ...] = SELECTORS,
             policy: Policy | None = None) -> dict[str, SelectorResult]:
    """Run every router over the scenario's one request stream."""
    sc = Scenario(raw)
    stream = _stream(sc)
    recs = _records(sc)
    policy = policy or Policy()
    unknown = set(selectors) - set(SELECTORS)
    if unknown:
        raise ValueError(f"unknown selectors: {sorted(unknown)}")
    results = {}
    for name in selectors:
        # A fresh world and router per run: earlier runs cannot influence later ones.
        world = _World(sc)
        router = _routers(sc, recs, world, policy)[name]()
        results[name] = _run_one(sc, name, router, stream)
        log.debug("simulated selector=%s requests=%d", name, len(stream))
    return results


# -- the experiment of issue 11 --------------------------------------------------------

NODE_RTT_MS = {"n10": 10.0, "n30": 30.0, "n100": 100.0, "n300": 300.0}
PLACEMENTS = ("all-on-all", "one-node", "mixed")
LOAD_LEVELS = (0.05, 0.25, 0.5, 0.75)
CLIENT_KINDS = {"latency": (1.0, 0.0), "accuracy": (0.0, 1.0), "balanced": (0.5, 0.5)}
SUITE_SELECTORS = SELECTORS


def model_family(seed: int) -> dict[str, dict[str, Any]]:
    """Nine models, three speed tiers x three accuracy tiers, drawn from ``seed``.

    Base times: fast 8-15 ms, mid 40-80 ms, slow 120-200 ms. Each request
    running beside one costs ``per_concurrent_ms``: 5-12x the base time for
    fast models, 2-6x for mid, 0.5-2x for slow ones (what declared service
    times miss). Per item 0.2-1 % of the base time; additive jitter up to
    20-50 % of it. Two in three run every request at once (the published
    dummy models), one in three has 1-3 slots and a queue (a server with a
    thread pool). Accuracy: bad 0.50-0.62, ok 0.75-0.85, good 0.88-0.97.
    The declared ``serviceTimeMs`` is the base time.
    """
    rng = random.Random(seed)
    tiers = (("fast", (8, 15), (5, 12)), ("mid", (40, 80), (2, 6)), ("slow", (120, 200), (0.5, 2)))
    grades = (("bad", (0.5, 0.62)), ("ok", (0.75, 0.85)), ("good", (0.88, 0.97)))
    out: dict[str, dict[str, Any]] = {}
    for tier, base, ratio in tiers:
        for grade, acc in grades:
            d = rng.uniform(*base)
            parallel = rng.random() < 2 / 3
            out[f"{tier}-{grade}"] = {
                "service_ms": round(d, 2),
                "per_concurrent_ms": round(d * rng.uniform(*ratio), 2),
                "per_item_ms": round(d * rng.uniform(0.002, 0.01), 4),
                "jitter_ms": round(d * rng.uniform(0.2, 0.5), 2),
                "concurrency": 0 if parallel else rng.randint(1, 3),
                "accuracy": round(rng.uniform(*acc), 3),
            }
    return out


def _capacity(model: dict[str, Any]) -> float:
    """Requests per second one replica sustains (asymptotically)."""
    d = float(model["service_ms"])
    beta = float(model.get("per_concurrent_ms", 0))
    slots = int(model.get("concurrency", 1))
    if slots <= 0:
        return 1000 / beta if beta > 0 else 1000 / d * 10
    return slots * 1000 / (d + beta * (slots - 1))


def suite_scenario(placement: str, load: float, *, seed: int = 11,
                   requests: int = 3000) -> dict[str, Any]:
    """One cell of the suite: the model family placed on the four nodes, at ``load``
    times their capacity, one client of each kind (latency-only, accuracy-only,
    balanced) sharing the traffic, each with two SDK processes and 1-20 items per
    request."""
    models = model_family(seed)
    names = sorted(models)
    nodes = list(NODE_RTT_MS)
    executors: list[dict[str, Any]] = []
    if placement == "all-on-all":
        executors = [{"name": f"{m}-{n}", "model": m, "nodes": [n]} for m in names for n in nodes]
    elif placement == "one-node":
        executors = [{"name": f"{m}-n10", "model": m, "nodes": ["n10"]} for m in names]
    elif placement == "mixed":
        # Each model on one or two nodes (drawn), one of them as a single executor
        # whose two replicas sit on different nodes (the Service spreads over both).
        rng = random.Random(seed + 1)
        for m in names:
            where = rng.sample(nodes, rng.choice((1, 2)))
            if len(where) == 2 and rng.random() < 0.3:
                executors.append({"name": f"{m}-spread", "model": m, "nodes": where})
            else:
                executors.extend({"name": f"{m}-{n}", "model": m, "nodes": [n]} for n in where)
    else:
        raise ValueError(f"unknown placement {placement!r}; one of {PLACEMENTS}")
    capacity = sum(_capacity(models[e["model"]]) for e in executors for _ in e["nodes"])
    clients = [{"name": kind, "node": "client", "latency": w[0], "accuracy": w[1],
                "share": 1.0, "items": 1, "items_max": 20, "instances": 2}
               for kind, w in CLIENT_KINDS.items()]
    network = {"client": {"client": 0.5, **NODE_RTT_MS}}
    return {
        "seed": seed, "requests": requests, "rate_per_s": round(load * capacity, 2),
        "jitter": 0.1, "nodes": ["client", *nodes], "network_ms": network,
        "models": models, "executors": executors, "clients": clients,
    }


@dataclass
class Cell:
    """One placement x load x client kind of the suite, with every router's figures."""

    placement: str
    load: float
    rate: float
    client: str
    figures: dict[str, Figures]


def suite(*, seed: int = 11, requests: int = 3000,
          selectors: tuple[str, ...] = SUITE_SELECTORS,
          placements: tuple[str, ...] = PLACEMENTS,
          loads: tuple[float, ...] = LOAD_LEVELS) -> list[Cell]:
    """Run every placement at every load; one cell per client kind."""
    cells = []
    for placement in placements:
        for load in loads:
            raw = suite_scenario(placement, load, seed=seed, requests=requests)
            results = simulate(raw, selectors)
            for kind in CLIENT_KINDS:
                cells.append(Cell(placement, load, float(raw["rate_per_s"]), kind,
                                  {n: r.by_client.get(kind, Figures())
                                   for n, r in results.items()}))
    return cells


@dataclass
class Goal:
    """One goal of issue 11 in one cell, met or not."""

    cell: Cell
    what: str
    value: float
    limit: float

    @property
    def met(self) -> bool:
        return self.value <= self.limit


def goals(cells: list[Cell]) -> list[Goal]:
    """Medians and p95 of both mulambda paths within 1.25x the oracle's; mean accuracy
    within 5 % of the oracle's for balanced and accuracy-only clients; the gateway
    within 1.25x the SDK. And against the plain load-aware router: a lower p95 for
    latency-only clients, a higher mean accuracy for the others."""
    out = []
    for cell in cells:
        f = cell.figures
        oracle = f.get("oracle")
        plain = f.get("least-outstanding")
        for path in ("mulambda-sdk", "mulambda-gateway"):
            ours = f.get(path)
            if ours is None:
                continue
            if plain is not None and cell.client == "latency":
                out.append(Goal(cell, f"{path} p95/least-outstanding", ours.p95 / plain.p95, 1.0))
            elif plain is not None:
                out.append(Goal(cell, f"{path} accuracy/least-outstanding (inverse)",
                                plain.mean_accuracy / ours.mean_accuracy, 1.0))
            if oracle is None:
                continue
            out.append(Goal(cell, f"{path} p50/oracle", ours.p50 / oracle.p50, 1.25))
            out.append(Goal(cell, f"{path} p95/oracle", ours.p95 / oracle.p95, 1.25))
            if cell.client != "latency":
                out.append(Goal(cell, f"{path} accuracy shortfall",
                                1 - ours.mean_accuracy / oracle.mean_accuracy, 0.05))
        sdk, gw = f.get("mulambda-sdk"), f.get("mulambda-gateway")
        if sdk is not None and gw is not None:
            out.append(Goal(cell, "gateway p50/sdk", gw.p50 / sdk.p50, 1.25))
            out.append(Goal(cell, "gateway p95/sdk", gw.p95 / sdk.p95, 1.25))
    return out


def format_suite(cells: list[Cell]) -> str:
    """One line per cell and router: p50, p95, accuracy and the ratios to the oracle."""
    lines = [f"{'placement':<11}{'load':>5}{'rate/s':>8} {'client':<9}{'router':<18}"
             f"{'p50 ms':>9}{'p95 ms':>9}{'acc':>7}{'p50/or':>8}{'p95/or':>8}{'acc/or':>8}"]
    for cell in cells:
        oracle = cell.figures.get("oracle")
        for name, f in cell.figures.items():
            ratios = ("", "", "")
            if oracle is not None:
                ratios = (f"{f.p50 / oracle.p50:.2f}", f"{f.p95 / oracle.p95:.2f}",
                          f"{f.mean_accuracy / oracle.mean_accuracy:.3f}")
            lines.append(f"{cell.placement:<11}{cell.load:>5.2f}{cell.rate:>8.1f} "
                         f"{cell.client:<9}{name:<18}{f.p50:>9.1f}{f.p95:>9.1f}"
                         f"{f.mean_accuracy:>7.3f}{ratios[0]:>8}{ratios[1]:>8}{ratios[2]:>8}")
    return "\n".join(lines)


def format_goals(found: list[Goal]) -> str:
    missed = [g for g in found if not g.met]
    lines = [f"goals: {len(found) - len(missed)} of {len(found)} met"]
    for g in missed:
        c = g.cell
        lines.append(f"  missed: {c.placement} load {c.load:g} {c.client}: {g.what} "
                     f"{g.value:.3f} > {g.limit:g}")
    return "\n".join(lines)


def format_table(results: dict[str, SelectorResult]) -> str:
    lines = [f"{'selector':<18}{'client':<12}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}"
             f"{'accuracy':>10}  used"]
    for r in results.values():
        used = ", ".join(f"{k}={v}" for k, v in sorted(r.used.items()))
        lines.append(f"{r.selector:<18}{'(all)':<12}{r.p50:>9.1f}{r.p95:>9.1f}{r.mean:>9.1f}"
                     f"{r.mean_accuracy:>10.3f}  {used}")
        if len(r.by_client) > 1:
            for name, f in sorted(r.by_client.items()):
                lines.append(f"{'':<18}{name:<12}{f.p50:>9.1f}{f.p95:>9.1f}{f.mean:>9.1f}"
                             f"{f.mean_accuracy:>10.3f}")
    return "\n".join(lines)


def load_scenario(path: str) -> dict[str, Any]:
    """Read a YAML or JSON scenario file."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        return dict(json.loads(text))
    import yaml  # only needed for YAML scenarios

    return dict(yaml.safe_load(text))


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mulambda simulate``."""
    parser.add_argument("--scenario", help="YAML or JSON scenario file (default: built in)")
    parser.add_argument("--suite", action="store_true",
                        help="run the issue-11 experiment: placements x loads x client kinds")
    parser.add_argument("--seed", type=int, help="override the scenario's (or suite's) seed")
    parser.add_argument("--requests", type=int, help="override the number of requests")
    parser.add_argument("--rate", type=float, help="override requests per second")
    parser.add_argument("--selectors", help=f"comma-separated subset of {','.join(SELECTORS)}")
    parser.add_argument("--placements", help=f"suite: comma-separated subset of "
                        f"{','.join(PLACEMENTS)}")
    parser.add_argument("--loads", help="suite: comma-separated loads (fractions of capacity)")
    parser.add_argument("--feedback-interval-ms", "--snapshot-ttl-ms", dest="snapshot_ttl_ms",
                        type=float, help="override the SDK snapshot's refresh interval")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--print-default", action="store_true",
                        help="print the built-in scenario as JSON and exit")


def run(args: argparse.Namespace) -> int:
    """Simulate and write the comparison to stdout (the command's output, not a log)."""
    if args.print_default:
        sys.stdout.write(json.dumps(DEFAULT_SCENARIO, indent=2) + "\n")
        return 0
    selectors = tuple(args.selectors.split(",")) if args.selectors else SELECTORS
    try:
        if args.suite:
            cells = suite(seed=args.seed if args.seed is not None else 11,
                          requests=args.requests or 3000, selectors=selectors,
                          placements=(tuple(args.placements.split(",")) if args.placements
                                      else PLACEMENTS),
                          loads=(tuple(float(x) for x in args.loads.split(",")) if args.loads
                                 else LOAD_LEVELS))
        else:
            raw = load_scenario(args.scenario) if args.scenario else dict(DEFAULT_SCENARIO)
            for key, value in (("seed", args.seed), ("requests", args.requests),
                               ("rate_per_s", args.rate),
                               ("snapshot_ttl_ms", args.snapshot_ttl_ms)):
                if value is not None:
                    raw[key] = value
            results = simulate(raw, selectors)
    except ValueError as exc:
        log.error("scenario rejected error=%s", exc)
        return 2
    if args.suite:
        found = goals(cells)
        if args.json:
            rows = [{"placement": c.placement, "load": c.load, "rate_per_s": c.rate,
                     "client": c.client, "router": n,
                     "p50_ms": _finite(f.p50, 2), "p95_ms": _finite(f.p95, 2),
                     "mean_accuracy": _finite(f.mean_accuracy, 4)}
                    for c in cells for n, f in c.figures.items()]
            sys.stdout.write(json.dumps({"cells": rows, "goals_met": sum(g.met for g in found),
                                         "goals": len(found)}, indent=2) + "\n")
        else:
            sys.stdout.write(format_suite(cells) + "\n" + format_goals(found) + "\n")
        return 0
    if args.json:
        sys.stdout.write(json.dumps([r.as_dict() for r in results.values()], indent=2) + "\n")
    else:
        sys.stdout.write(
            f"scenario: {args.scenario or 'built-in'}, seed {raw.get('seed')}, "
            f"{raw['requests']} requests at {raw['rate_per_s']}/s\n"
        )
        sys.stdout.write(format_table(results) + "\n")
    return 0
