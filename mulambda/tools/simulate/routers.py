"""The routers compared on one request stream: mulambda (SDK and gateway paths), the oracle,
least-outstanding, the prototype scorer and the naive baselines; running one through a stream."""


from __future__ import annotations

import heapq
import logging
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mulambda.policy.inflight import OwnRequests, measure
from mulambda.policy.latency import ServiceTracker, add_stats
from mulambda.policy.ranking import Candidate
from mulambda.policy.selection import Policy, Preferences, rank
from mulambda.store.records import (
    ExecutorRecord,
    LatencySample,
    ReplicaRecord,
    ServiceStats,
    Snapshot,
    TimedRequest,
)

from .world import (
    PROTOTYPE_BUCKETS_MS,
    SELECTORS,
    Figures,
    Replica,
    Scenario,
    SelectorResult,
    Stream,
    World,
    records_of,
    stream_of,
)

log = logging.getLogger("mulambda.simulate")


class Router:
    """Chooses (executor, replica index) per request; told when the answer is back."""

    name = ""

    def __init__(self, sc: Scenario, recs: dict[str, ExecutorRecord], world: World,
                 policy: Policy) -> None:
        self.sc, self.recs, self.world, self.policy = sc, recs, world, policy
        self.matching = [sorted(eid for eid, r in recs.items() if r.type == sc.type_of(c))
                         for c in sc.clients]
        for c, m in zip(sc.clients, self.matching, strict=True):
            if not m:
                raise ValueError(f"client {c['name']}: no executor of its type")
        # What each client asked for, and the best accuracy it can get: how the oracle
        # scores a choice and how the suite weighs what every router served.
        self.prefs = [Preferences.of(sc.criteria(c), policy) for c in sc.clients]
        self.best_acc = [max((recs[e].accuracy or 0.0) for e in m) or 1.0
                         for m in self.matching]
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


class _ByExecutor(Router):
    def __init__(self, pick: Callable[[int], str], *args: Any) -> None:
        super().__init__(*args)
        self.pick = pick

    def choose(self, req: int, who: int, now: float, items: int) -> tuple[str, int]:
        eid = self.pick(who)
        return eid, self.service_replica(eid)


def _baselines(sc: Scenario, recs: dict[str, ExecutorRecord], world: World,
               policy: Policy) -> dict[str, Callable[[], Router]]:
    nodes_of = {f"sim/{e['name']}": e["nodes"] for e in sc.executors}
    base = Router(sc, recs, world, policy)
    rtt_of = [{eid: statistics.fmean(sc.rtt(c["node"], n) for n in nodes_of[eid])
               for eid in m} for c, m in zip(sc.clients, base.matching, strict=True)]

    def round_robin() -> Router:
        turn = [0]

        def pick(who: int) -> str:
            turn[0] += 1
            return base.matching[who][turn[0] % len(base.matching[who])]
        return _ByExecutor(pick, sc, recs, world, policy)

    def rand() -> Router:
        rng = random.Random(sc.router_seed + 1)
        return _ByExecutor(lambda who: rng.choice(base.matching[who]), sc, recs, world, policy)

    def lowest_network() -> Router:
        nearest = [min(m, key=lambda eid, w=w: (rtt_of[w][eid], eid))  # type: ignore[misc]
                   for w, m in enumerate(base.matching)]
        return _ByExecutor(lambda who: nearest[who], sc, recs, world, policy)

    def prototype() -> Router:
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


class _LeastOutstanding(Router):
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


class _Oracle(Router):
    """Knows the true parameters and state; scores like mulambda, request by request."""

    name = "oracle"

    def choose(self, req: int, who: int, now: float, items: int) -> tuple[str, int]:
        node = self.sc.clients[who]["node"]
        prefs, top = self.prefs[who], self.best_acc[who]
        best: tuple[bool, float, str, int] | None = None
        for eid in self.matching[who]:
            ratio = (self.recs[eid].accuracy or 0.0) / top
            for i, rep in enumerate(self.world.reps[eid]):
                latency = self.latency_ms(node, eid, rep, items)
                key = (latency > prefs.ceiling_ms, -prefs.score(latency, ratio), eid, i)
                if best is None or key < best:
                    best = key
        assert best is not None
        return best[2], best[3]

    def latency_ms(self, node: str, eid: str, rep: Replica, items: int) -> float:
        """The true expected latency of a request from ``node`` sent to ``rep`` now."""
        return self.sc.rtt(node, rep.node) + self.world.expected(eid, rep, items)


class _NoisyOracle(_Oracle):
    """The oracle with every expected latency off by a lognormal error of
    ``Policy.latency_noise`` (10 %, the error mulambda's spreading assumes), drawn per
    candidate and decision: the goals it misses are what that error alone costs."""

    name = "noisy-oracle"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.rng = random.Random(self.sc.router_seed * 104729 + 3)

    def latency_ms(self, node: str, eid: str, rep: Replica, items: int) -> float:
        error = math.exp(self.rng.gauss(0.0, self.policy.latency_noise))
        return super().latency_ms(node, eid, rep, items) * error


@dataclass
class _Instance:
    """One SDK process or one gateway: its own requests, measurements and views."""

    index: int
    rng: random.Random
    tracker: ServiceTracker
    own: OwnRequests = field(default_factory=OwnRequests)
    snap_at: float = -math.inf
    others_stats: dict[str, ServiceStats] = field(default_factory=dict)
    snap_requests: dict[str, list[TimedRequest]] = field(default_factory=dict)
    load_at: float = -math.inf
    others_requests: dict[str, list[TimedRequest]] = field(default_factory=dict)
    # The others' measurements as of the last fresh read (which carries them).
    fresh_stats: dict[str, ServiceStats] | None = None


class _Mulambda(Router):
    """mulambda's ranking, run by SDK processes or by gateways, each with its own view."""

    def __init__(self, gateway: bool, *args: Any) -> None:
        super().__init__(*args)
        sc = self.sc
        self.gateway = gateway
        self.name = "mulambda-gateway" if gateway else "mulambda-sdk"
        self.ttl = sc.gateway_cache if gateway else sc.snapshot_ttl
        self.load_ttl = sc.gateway_load_ttl if gateway else sc.load_ttl
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
        self.instances = [_Instance(i, random.Random(sc.router_seed * 7919 + i),
                                    ServiceTracker(self.policy.fit)) for i in range(count)]
        # What the store holds: every instance's leases (each request's executor and
        # timing) and measurements.
        self.published: list[dict[int, tuple[str, TimedRequest]]] = [{} for _ in range(count)]
        self.lease_of: dict[tuple[int, int], tuple[float, str]] = {}  # -> (sent, pod)
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
        self.sent: dict[int, tuple[_Instance, int, Candidate, int]] = {}

    def dispatch_node(self, who: int) -> str:
        return self.sc.gateway_node if self.gateway else super().dispatch_node(who)

    def hop_ms(self, who: int) -> float:
        if not self.gateway:
            return 0.0
        return (self.sc.rtt(self.sc.clients[who]["node"], self.sc.gateway_node) / 2
                + self.sc.gateway_overhead)

    def _others(self, inst: _Instance) -> dict[str, list[TimedRequest]]:
        found: dict[str, list[TimedRequest]] = {}
        for other in self.instances:
            if other is not inst:
                for e, timed in self.published[other.index].values():
                    found.setdefault(e, []).append(timed)
        return found

    def _publish(self, inst: _Instance, eid: str, token: int) -> None:
        """The lease of ``token`` as mulambda.sdk.counting publishes it (and rewrites it)."""
        sent, pod = self.lease_of[(inst.index, token)]
        t = inst.own.lease(token)
        assert t is not None
        self.published[inst.index][token] = (eid, t.entry(pod, sent))

    def _others_stats(self, inst: _Instance) -> dict[str, ServiceStats]:
        stats: dict[str, ServiceStats] = {}
        for other in self.instances:
            if other is not inst:
                for e, st in self.published_stats[other.index].items():
                    merged = add_stats(stats.get(e), st)
                    assert merged is not None
                    stats[e] = merged
        return stats

    def _refresh(self, inst: _Instance, now: float) -> None:
        inst.others_stats, inst.snap_requests, inst.snap_at = (
            self._others_stats(inst), self._others(inst), now)

    def choose(self, req: int, who: int, now: float, items: int) -> tuple[str, int]:
        sc = self.sc
        owners = self.owners[who]
        inst = self.instances[owners[self.turn[who] % len(owners)]]
        self.turn[who] += 1
        if now - inst.snap_at >= self.ttl:
            self._refresh(inst, now)
        delay = 0.0
        if self.load_ttl < 0:  # no fresh reads: the snapshot's leases
            others = inst.snap_requests
        else:
            if now - inst.load_at < self.load_ttl:
                pass  # shared: read less than load_ttl ago
            elif now < inst.load_at + sc.store_rtt:
                # A read still on its way: joined (InflightReader reads once at a time).
                delay = inst.load_at + sc.store_rtt - now
            else:
                inst.others_requests, inst.load_at = self._others(inst), now
                # The fresh read carries the others' measurements too (the SDK's and
                # the selector's InflightReader(service=True)).
                inst.fresh_stats = self._others_stats(inst)
                delay = sc.store_rtt  # the decision waits for the read
            others = inst.others_requests
        # Faded as mulambda.sdk.counting fades them before a decision, and published.
        if inst.tracker.fade(now / 1000):
            self.published_stats[inst.index].update(inst.tracker.take_changed())
        stats = dict(inst.others_stats if inst.fresh_stats is None else inst.fresh_stats)
        for e, st in inst.tracker.stats.items():
            merged = add_stats(stats.get(e), st)
            assert merged is not None
            stats[e] = merged
        own, own_pods = inst.own.ahead(now)
        snap = Snapshot(self.recs, self.replicas, self.latency[who], {}, now / 1000, None,
                        stats, others, own, own_pods, inst.own.late(now))
        ranking = rank(self.criteria[who], snap, policy=self.policy, items=items,
                       rng=inst.rng, replicas=True)
        c = ranking[0]
        pod = c.replica.pod if c.replica is not None else "r0"
        eid = c.executor_id
        stay, net, sent = c.service_ms + c.load_ms, c.network_ms, now + delay
        # Counted as mulambda.sdk.counting counts a request (the SDK's and the gateway's).
        margin = inst.tracker.stay_margin_ms(eid, stay)
        token = inst.own.add(eid, pod, sent, stay, net, margin, c.saving, c.inflight,
                             items)
        self.lease_of[(inst.index, token)] = (sent, pod)
        self._publish(inst, eid, token)
        self.sent[req] = (inst, token, c, items)
        self.delay[req] = delay
        return eid, self.pods[eid][pod]

    def complete(self, req: int, now: float, elapsed_ms: float) -> None:
        inst, token, c, items = self.sent.pop(req)
        # Measured as mulambda.sdk.counting measures an answer, timed from when the router
        # sent the request, not from the store read.
        # A gateway times its own round trip to the replica (selector/handshakes.py).
        rep = self.pods[c.executor_id][c.replica.pod if c.replica is not None else "r0"]
        net = (self.sc.rtt(self.sc.gateway_node, self.world.reps[c.executor_id][rep].node)
               if self.gateway else None)
        measure(inst.tracker, c, items, inst.own.gone_ahead(token),
                elapsed_ms - self.delay.pop(req, 0.0), now / 1000, net)
        self.published_stats[inst.index].update(inst.tracker.take_changed())
        for later in inst.own.answered(token, now):
            self._publish(inst, self.published[inst.index][later][0], later)
        inst.own.remove(token)
        del self.published[inst.index][token]
        del self.lease_of[(inst.index, token)]


def router(name: str, sc: Scenario, recs: dict[str, ExecutorRecord], world: World,
           policy: Policy) -> Router:
    """The router ``name`` acting on ``world``: the simulation's, or one whose replicas'
    state is kept by live servers (bench/live_selection.py)."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selectors: {[name]}")
    return _routers(sc, recs, world, policy)[name]()


def _routers(sc: Scenario, recs: dict[str, ExecutorRecord], world: World,
             policy: Policy) -> dict[str, Callable[[], Router]]:
    args = (sc, recs, world, policy)
    out: dict[str, Callable[[], Router]] = {
        "mulambda-sdk": lambda: _Mulambda(False, *args),
        "mulambda-gateway": lambda: _Mulambda(True, *args),
        "oracle": lambda: _Oracle(*args),
        "noisy-oracle": lambda: _NoisyOracle(*args),
        "least-outstanding": lambda: _LeastOutstanding(*args),
    }
    out.update(_baselines(*args))
    return out


_ARRIVE, _DISPATCH, _REACH, _DONE, _BACK, _FINAL = range(6)


def _run_one(sc: Scenario, name: str, router: Router, stream: Stream) -> SelectorResult:
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
            utility = router.prefs[who].score(latency, accuracy / router.best_acc[who])
            for f in (result, figs):
                f.rtt_ms.append(latency)
                f.accuracy.append(accuracy)
                f.utility.append(utility)
            result.used[eid.removeprefix("sim/")] += 1
    return result


def simulate(raw: dict[str, Any], selectors: tuple[str, ...] = SELECTORS,
             policy: Policy | None = None) -> dict[str, SelectorResult]:
    """Run every router over the scenario's one request stream."""
    sc = Scenario(raw)
    stream = stream_of(sc)
    recs = records_of(sc)
    policy = policy or Policy()
    unknown = set(selectors) - set(SELECTORS)
    if unknown:
        raise ValueError(f"unknown selectors: {sorted(unknown)}")
    results = {}
    for name in selectors:
        # A fresh world and router per run: earlier runs cannot influence later ones.
        world = World(sc)
        results[name] = _run_one(sc, name, router(name, sc, recs, world, policy), stream)
        log.debug("simulated selector=%s requests=%d", name, len(stream))
    return results
