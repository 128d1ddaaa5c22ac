"""``mulambda simulate``: replay one request stream through several selectors.

A discrete-event simulation (milliseconds, seeded, no I/O) of:

* **nodes** and the round-trip network delay between them (``network_ms``,
  symmetric; a missing pair falls back to ``default_network_ms``);
* **models**: base service time, accuracy, parallel slots per replica
  (``concurrency``) and how service time grows with concurrency
  (``slowdown``: each request already busy on the replica when one starts
  adds that fraction of the base time); requests beyond the slots queue FIFO;
* **executors**: a model placed on one or more nodes (one replica per
  node entry; the Service spreads requests round-robin over replicas);
* **clients** on nodes with preferences (latency/accuracy weights) and a
  share of the traffic;
* a **request stream**: Poisson arrivals at ``rate_per_s``, the client of
  each request drawn by share, and a service-time jitter per request
  (log-normal, ``jitter``), all from ``seed``.

Every selector sees exactly the same stream and jitter:

* ``mulambda`` -- :func:`mulambda.policy.selection.rank` on a snapshot built from the
  scenario: service times as the operator publishes them, RTTs as the
  companions measure them, and the in-flight counts (load feedback) as
  they stood at most ``feedback_interval_ms`` ago (0 = always current, like
  an SDK process that sees its own requests at once);
* ``round-robin`` over matching executors; ``random`` (seeded);
* ``lowest-network`` -- the executor with the smallest RTT to the client.

Output per selector: median, p95 and mean round-trip time (client ->
model -> client, including queueing) and mean accuracy of the models used.
A built-in default scenario is used unless ``--scenario FILE`` (YAML or
JSON, same shape as :data:`DEFAULT_SCENARIO`) is given.
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

from mulambda.policy.selection import Criteria, Policy, rank
from mulambda.store.records import ExecutorRecord, LatencySample, ReplicaRecord, Snapshot

log = logging.getLogger("mulambda.simulate")

SELECTORS = ("mulambda", "round-robin", "random", "lowest-network")

# Edge nodes with small, fast models next to the cameras and a cloud node
# with a large accurate model: the lowest-network baseline overloads the
# edge models, round-robin sends latency-sensitive traffic to the cloud.
DEFAULT_SCENARIO: dict[str, Any] = {
    "seed": 7,
    "requests": 6000,
    "rate_per_s": 260,
    "feedback_interval_ms": 0,
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
    slots: int
    busy: int = 0
    queue: deque[int] = field(default_factory=deque)


@dataclass
class SelectorResult:
    """Figures of one selector over the stream."""

    selector: str
    rtt_ms: list[float]
    accuracy: list[float]
    used: Counter[str]

    @property
    def p50(self) -> float:
        return statistics.median(self.rtt_ms)

    @property
    def p95(self) -> float:
        return _percentile(self.rtt_ms, 95)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.rtt_ms)

    @property
    def mean_accuracy(self) -> float:
        return statistics.fmean(self.accuracy)

    def as_dict(self) -> dict[str, Any]:
        return {"selector": self.selector, "p50_ms": round(self.p50, 2),
                "p95_ms": round(self.p95, 2), "mean_ms": round(self.mean, 2),
                "mean_accuracy": round(self.mean_accuracy, 4), "used": dict(self.used)}


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
            self.feedback_ms = float(raw.get("feedback_interval_ms", 0))
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
        except (KeyError, TypeError, ValueError) as exc:
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
        if self.requests <= 0 or self.rate <= 0:
            raise ValueError("requests and rate_per_s must be positive")

    def rtt(self, a: str, b: str) -> float:
        return self.net.get((a, b), self.default_net)

    def type_of(self, client_or_model: dict[str, Any]) -> str:
        return str(client_or_model.get("type", "default"))


def _stream(sc: Scenario) -> list[tuple[float, int, float]]:
    """(arrival ms, client index, jitter factor) for every request, from the seed."""
    rng = random.Random(sc.seed)
    shares = [float(c.get("share", 1)) for c in sc.clients]
    t = 0.0
    out = []
    for _ in range(sc.requests):
        t += rng.expovariate(sc.rate / 1000.0)
        who = rng.choices(range(len(sc.clients)), weights=shares)[0]
        jitter = rng.lognormvariate(0, sc.jitter) if sc.jitter > 0 else 1.0
        out.append((t, who, jitter))
    return out


def _records(sc: Scenario) -> dict[str, ExecutorRecord]:
    recs = {}
    for e in sc.executors:
        m = sc.models[e["model"]]
        recs[f"sim/{e['name']}"] = ExecutorRecord(
            namespace="sim", name=e["name"], model=e["model"], version=1,
            type=sc.type_of(m), input="any", output="any", accuracy=m.get("accuracy"),
            rest="", grpc="", state="Ready", min_replicas=len(e["nodes"]),
            max_replicas=len(e["nodes"]), ready_replicas=len(e["nodes"]),
            service_time_ms=float(m["service_ms"]),
        )
    return recs


Chooser = Callable[[int, float, dict[str, int]], str]


def _choosers(sc: Scenario, recs: dict[str, ExecutorRecord], policy: Policy) -> dict[
    str, Chooser
]:
    """selector name -> choose(client index, now ms, in-flight view) -> executor id."""
    matching = [
        sorted(eid for eid, r in recs.items() if r.type == sc.type_of(c)) for c in sc.clients
    ]
    for c, m in zip(sc.clients, matching, strict=True):
        if not m:
            raise ValueError(f"client {c['name']}: no executor of its type")
    nodes_of = {f"sim/{e['name']}": e["nodes"] for e in sc.executors}
    replicas = {
        eid: [ReplicaRecord(executor=eid, pod=f"r{i}", state="Available", expires_at=math.inf)
              for i in range(len(nodes))]
        for eid, nodes in nodes_of.items()
    }
    snapshots = []
    for c in sc.clients:
        lat = {eid: {f"r{i}": LatencySample(ms=sc.rtt(c["node"], n), samples=1)
                     for i, n in enumerate(nodes)}
               for eid, nodes in nodes_of.items()}
        snapshots.append(Snapshot(recs, replicas, lat, {}, 0.0))
    criteria = [
        Criteria(type=sc.type_of(c), latency_weight=float(c.get("latency", 1)),
                 accuracy_weight=float(c.get("accuracy", 1)))
        for c in sc.clients
    ]
    rr = [0]
    rng = random.Random(sc.seed + 1)
    nearest = [
        min(m, key=lambda eid, c=c: (  # type: ignore[misc]
            statistics.fmean(sc.rtt(c["node"], n) for n in nodes_of[eid]), eid))
        for c, m in zip(sc.clients, matching, strict=True)
    ]

    def ours(who: int, now: float, inflight: dict[str, int]) -> str:
        snap = snapshots[who]
        snap.inflight = inflight
        ranking = rank(criteria[who], snap, client=sc.clients[who]["name"], now=now / 1000,
                       policy=policy)
        return ranking[0].executor_id

    def round_robin(who: int, now: float, inflight: dict[str, int]) -> str:
        rr[0] += 1
        return matching[who][rr[0] % len(matching[who])]

    def rand(who: int, now: float, inflight: dict[str, int]) -> str:
        return rng.choice(matching[who])

    def lowest_network(who: int, now: float, inflight: dict[str, int]) -> str:
        return nearest[who]

    return {"mulambda": ours, "round-robin": round_robin, "random": rand,
            "lowest-network": lowest_network}


def _run_one(sc: Scenario, name: str, choose: Chooser,
             stream: list[tuple[float, int, float]]) -> SelectorResult:
    reps: dict[str, list[_Replica]] = {}
    for e in sc.executors:
        slots = int(sc.models[e["model"]].get("concurrency", 1))
        reps[f"sim/{e['name']}"] = [_Replica(node=n, slots=slots) for n in e["nodes"]]
    next_replica: Counter[str] = Counter()
    inflight: dict[str, int] = {}
    seen_inflight: dict[str, int] = {}
    seen_at = -math.inf
    # request index -> (executor, replica index)
    routed: dict[int, tuple[str, int]] = {}
    rtts = [0.0] * len(stream)
    accs = [0.0] * len(stream)
    used: Counter[str] = Counter()
    events: list[tuple[float, int, str, int]] = []  # (time, seq, kind, request)
    seq = 0
    for i, (t, _who, _j) in enumerate(stream):
        events.append((t, seq, "arrive", i))
        seq += 1
    heapq.heapify(events)

    def start_service(now: float, req: int) -> None:
        nonlocal seq
        eid, ri = routed[req]
        rep = reps[eid][ri]
        m = sc.models[eid_model[eid]]
        slowdown = float(m.get("slowdown", 0.0))
        duration = float(m["service_ms"]) * stream[req][2] * (1 + slowdown * rep.busy)
        rep.busy += 1
        heapq.heappush(events, (now + duration, seq, "done", req))
        seq += 1

    eid_model = {f"sim/{e['name']}": e["model"] for e in sc.executors}
    while events:
        now, _s, kind, req = heapq.heappop(events)
        t0, who, _j = stream[req]
        client_node = sc.clients[who]["node"]
        if kind == "arrive":
            if now - seen_at >= sc.feedback_ms:
                seen_inflight, seen_at = dict(inflight), now
            view = inflight if sc.feedback_ms <= 0 else seen_inflight
            eid = choose(who, now, dict(view))
            ri = next_replica[eid] % len(reps[eid])
            next_replica[eid] += 1
            routed[req] = (eid, ri)
            inflight[eid] = inflight.get(eid, 0) + 1
            used[eid.removeprefix("sim/")] += 1
            half = sc.rtt(client_node, reps[eid][ri].node) / 2
            heapq.heappush(events, (now + half, seq, "reach", req))
            seq += 1
        elif kind == "reach":
            eid, ri = routed[req]
            rep = reps[eid][ri]
            if rep.busy < rep.slots:
                start_service(now, req)
            else:
                rep.queue.append(req)
        elif kind == "done":
            eid, ri = routed[req]
            rep = reps[eid][ri]
            rep.busy -= 1
            if rep.queue:
                start_service(now, rep.queue.popleft())
            half = sc.rtt(client_node, rep.node) / 2
            heapq.heappush(events, (now + half, seq, "back", req))
            seq += 1
        else:  # back at the client
            eid, _ri = routed[req]
            inflight[eid] -= 1
            rtts[req] = now - t0
            accs[req] = float(sc.models[eid_model[eid]].get("accuracy") or 0.0)
    return SelectorResult(name, rtts, accs, used)


def simulate(raw: dict[str, Any], selectors: tuple[str, ...] = SELECTORS,
             policy: Policy | None = None) -> dict[str, SelectorResult]:
    """Run every selector over the scenario's one request stream."""
    sc = Scenario(raw)
    stream = _stream(sc)
    recs = _records(sc)
    results = {}
    for name in selectors:
        # Fresh selector state per run, so earlier runs cannot influence later ones.
        chooser = _choosers(sc, recs, policy or Policy())[name]
        results[name] = _run_one(sc, name, chooser, stream)
        log.debug("simulated selector=%s requests=%d", name, len(stream))
    return results


def format_table(results: dict[str, SelectorResult]) -> str:
    lines = [f"{'selector':<16}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}{'accuracy':>10}  used"]
    for r in results.values():
        used = ", ".join(f"{k}={v}" for k, v in sorted(r.used.items()))
        lines.append(f"{r.selector:<16}{r.p50:>9.1f}{r.p95:>9.1f}{r.mean:>9.1f}"
                     f"{r.mean_accuracy:>10.3f}  {used}")
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
    parser.add_argument("--seed", type=int, help="override the scenario's seed")
    parser.add_argument("--requests", type=int, help="override the number of requests")
    parser.add_argument("--rate", type=float, help="override requests per second")
    parser.add_argument("--feedback-interval-ms", type=float,
                        help="override how stale the load feedback is")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--print-default", action="store_true",
                        help="print the built-in scenario as JSON and exit")


def run(args: argparse.Namespace) -> int:
    """Simulate and write the comparison to stdout (the command's output, not a log)."""
    if args.print_default:
        sys.stdout.write(json.dumps(DEFAULT_SCENARIO, indent=2) + "\n")
        return 0
    raw = load_scenario(args.scenario) if args.scenario else dict(DEFAULT_SCENARIO)
    for key, value in (("seed", args.seed), ("requests", args.requests),
                       ("rate_per_s", args.rate),
                       ("feedback_interval_ms", args.feedback_interval_ms)):
        if value is not None:
            raw[key] = value
    try:
        results = simulate(raw)
    except ValueError as exc:
        log.error("scenario rejected error=%s", exc)
        return 2
    if args.json:
        sys.stdout.write(json.dumps([r.as_dict() for r in results.values()], indent=2) + "\n")
    else:
        sys.stdout.write(
            f"scenario: {args.scenario or 'built-in'}, seed {raw.get('seed')}, "
            f"{raw['requests']} requests at {raw['rate_per_s']}/s\n"
        )
        sys.stdout.write(format_table(results) + "\n")
    return 0
