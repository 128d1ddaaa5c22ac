"""The simulated world: scenarios, nodes, models with true service times, replicas, the
request stream, and the figures a router earns."""


from __future__ import annotations

import math
import random
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from mulambda.policy.selection import Criteria
from mulambda.store.records import (
    ExecutorRecord,
)

SELECTORS = ("mulambda-sdk", "mulambda-gateway", "oracle", "noisy-oracle", "least-outstanding",
             "prototype", "round-robin", "random", "lowest-network")
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
class Replica:
    """One replica of an executor: its node, slots and what is on it or on the way."""

    node: str
    slots: int  # 0: every request runs at once
    busy: int = 0
    transit: int = 0  # requests on their way to it
    queue: deque[int] = field(default_factory=deque)


@dataclass
class Figures:
    """Latencies (ms) and accuracies of the requests one router served, and what each was
    worth to its client (its preferences' score of that latency and accuracy)."""

    rtt_ms: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    utility: list[float] = field(default_factory=list)

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

    @property
    def mean_utility(self) -> float:
        return statistics.fmean(self.utility) if self.utility else math.nan


@dataclass
class SelectorResult(Figures):
    """Figures of one router over the stream (after the warm-up), overall and per client."""

    selector: str = ""
    used: Counter[str] = field(default_factory=Counter)
    by_client: dict[str, Figures] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def figures(f: Figures) -> dict[str, Any]:
            return {"p50_ms": finite(f.p50, 2), "p95_ms": finite(f.p95, 2),
                    "mean_ms": finite(f.mean, 2), "mean_accuracy": finite(f.mean_accuracy, 4),
                    "mean_utility": finite(f.mean_utility, 4), "requests": len(f.rtt_ms)}

        return {"selector": self.selector, **figures(self), "used": dict(self.used),
                "clients": {k: figures(v) for k, v in self.by_client.items()}}


def finite(value: float, digits: int) -> float | None:
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
            # The routers' own draws (mulambda's spreading over near-equal candidates,
            # the random baseline), apart from the stream's: another router seed replays
            # the same stream and world, so a figure that moves with it moves by chance.
            self.router_seed = int(raw.get("router_seed", self.seed))
            self.requests = int(raw["requests"])
            self.rate = float(raw["rate_per_s"])
            # feedback_interval_ms: the old name of the SDK snapshot's age.
            self.snapshot_ttl = float(raw.get("snapshot_ttl_ms",
                                              raw.get("feedback_interval_ms", 1000)))
            self.gateway_cache = float(raw.get("gateway_cache_ms", 500))
            # Fresh reads of the other routers' in-flight leases (< 0: none) by an SDK
            # process and by a gateway (the defaults of MulambdaClient and Selector), and
            # what one costs the request that waits for it.
            self.load_ttl = float(raw.get("load_ttl_ms", 0))
            self.gateway_load_ttl = float(raw.get("gateway_load_ttl_ms", 2))
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
        except KeyError as exc:
            raise ValueError(f"bad scenario: it has no {exc.args[0]!r}") from exc
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"bad scenario: {exc}") from exc
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
Stream = list[tuple[float, int, float, float, int]]


def stream_of(sc: Scenario) -> Stream:
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


def records_of(sc: Scenario) -> dict[str, ExecutorRecord]:
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


class World:
    """The true state every router acts on: replicas, their queues, the models."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.model_of = {f"sim/{e['name']}": sc.models[e["model"]] for e in sc.executors}
        self.reps: dict[str, list[Replica]] = {
            f"sim/{e['name']}": [
                Replica(node=n, slots=int(sc.models[e["model"]].get("concurrency", 1)))
                for n in e["nodes"]]
            for e in sc.executors
        }

    def duration(self, eid: str, rep: Replica, factor: float, u: float, items: int) -> float:
        m = self.model_of[eid]
        busy = rep.busy
        core = (float(m["service_ms"]) + float(m.get("per_item_ms", 0)) * items
                + float(m.get("per_concurrent_ms", 0)) * busy)
        return (core * (1 + float(m.get("slowdown", 0)) * busy) * factor
                + float(m.get("jitter_ms", 0)) * u)

    def expected(self, eid: str, rep: Replica, items: int) -> float:
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
