"""Selection quality on real parts: the SDK and the gateway against the oracle and
least-outstanding, in wall-clock time.

``mulambda simulate --suite`` runs mulambda's ranking in simulated time. This runs
the real SDK (``MulambdaClient``, several per client kind) and the real gateway
(``POST /v1/predict``, the selector's aiohttp app) on a real redis-server, against
TF Serving REST doubles on loopback that behave as the suite's models: each
replica is a double on its own loopback address that holds every request for
its node's round trip (the network, emulated) and its service time, which grows
with the requests running beside it (``World.duration``; a model with slots
queues the rest, FIFO). The companions' RTT samples are written to the store as
a companion writes them. The oracle and least-outstanding are the simulator's,
reading the replicas' live state. Same models, placements and client kinds as
the suite (``mulambda.tools.simulate.experiment``), one request each, at
absolute rates; printed with the suite's table and goals.

    python bench/live_selection.py [--seed 11] [--placement mixed] [--rates 2,5,10,20]
        [--seconds 20] [--routers mulambda-sdk,mulambda-gateway,oracle,least-outstanding]
        (--routers also takes noisy-oracle)

Each rate and router starts from an empty store (the declared service times
only) and new SDK clients and gateway; the first 10 % of the requests is the
warm-up, left out of the figures as in the simulator. One process, one event
loop: the load generator, the routers and the doubles share it, so at high
rates the event loop's own delay adds to every router's latency alike.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import random
import sys
import time
from pathlib import Path

import httpx
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mulambda.cliargs import positive_seconds
from mulambda.policy.ranking import Policy
from mulambda.sdk import MulambdaClient
from mulambda.selector.app import create_app, selector_server_options
from mulambda.selector.handshakes import Handshakes, Probe
from mulambda.selector.service import SELECTOR_KEY
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, LatencySample, ReplicaRecord
from mulambda.tools.simulate import experiment
from mulambda.tools.simulate.routers import Router, router
from mulambda.tools.simulate.world import (
    Figures,
    Replica,
    Scenario,
    World,
    records_of,
    stream_of,
)

from support.procs import RedisServer, free_port
from support.tfserving_double import TFServingDouble

ROUTERS = ("mulambda-sdk", "mulambda-gateway", "oracle", "least-outstanding")
# Also on request: the oracle with a 10 % error in every expected latency (the
# simulator's yardstick of what chance alone misses, bench/README.md).
KNOWN = (*ROUTERS, "noisy-oracle")
BODY = {"instances": [[0]]}


class LiveReplica:
    """One replica's double: holds each request for the network and its service time,
    keeping the shared :class:`Replica` (what the oracle reads) up to date."""

    def __init__(self, world: World, eid: str, rep: Replica, rtt_ms: float,
                 rng: random.Random) -> None:
        self.world, self.eid, self.rep, self.rtt_ms, self.rng = world, eid, rep, rtt_ms, rng
        self.waiting: dict[int, asyncio.Future[None]] = {}
        self.tickets = itertools.count()

    async def hold(self) -> None:
        rep = self.rep
        rep.transit += 1
        await asyncio.sleep(self.rtt_ms / 2000)
        rep.transit -= 1
        if rep.slots > 0 and rep.busy >= rep.slots:
            ticket = next(self.tickets)
            self.waiting[ticket] = asyncio.get_running_loop().create_future()
            rep.queue.append(ticket)
            await self.waiting[ticket]  # the request finishing hands its slot over
            del self.waiting[ticket]
            running = rep.busy - 1
        else:
            running = rep.busy
            rep.busy += 1
        factor = self.rng.lognormvariate(0, self.world.sc.jitter)
        ms = self.world.duration(self.eid, dataclasses.replace(rep, busy=running), factor,
                                 self.rng.random(), 1)
        try:
            await asyncio.sleep(ms / 1000)
        finally:
            if rep.queue:
                self.waiting[rep.queue.popleft()].set_result(None)
            else:
                rep.busy -= 1
        await asyncio.sleep(self.rtt_ms / 2000)


def scenario(seed: int, placement: str, rate: float, seconds: float) -> Scenario:
    raw = experiment.suite_scenario(placement, 0.05, seed=seed,
                                    requests=max(20, round(rate * seconds)), rate_per_s=rate)
    for c in raw["clients"]:
        c["items"] = c["items_max"] = 1  # the doubles answer one instance per request
    return Scenario(raw)


def capacity(seed: int, placement: str) -> float:
    """Requests per second the placement's replicas sustain (the suite's load 1)."""
    return float(experiment.suite_scenario(placement, 1.0, seed=seed)["rate_per_s"])


class EmulatedHandshakes(Handshakes):
    """The round trips the doubles emulate, as the gateway's handshakes would measure them
    across a real network."""

    def __init__(self, rtt_ms: dict[str, float]) -> None:
        super().__init__()
        self.rtt_ms = rtt_ms

    def network_ms(self, probe: Probe) -> float | None:
        return self.rtt_ms.get(probe.key)


class Fleet:
    """The doubles of one run, each replica on its own loopback address, and what the
    operator and the companions publish about them."""

    def __init__(self, sc: Scenario, world: World, seed: int) -> None:
        self.sc, self.world = sc, world
        self.doubles: list[TFServingDouble] = []
        self.urls: dict[tuple[str, int], str] = {}
        self.rtt_ms: dict[str, float] = {}  # host:port -> the round trip its double emulates
        self.rng = random.Random(seed)

    async def start(self, store: MetadataStore) -> None:
        port, n = free_port(), 0
        for eid, rec in records_of(self.sc).items():
            for i, rep in enumerate(self.world.reps[eid]):
                n += 1
                host, rtt = f"127.0.{n // 250 + 1}.{n % 250 + 1}", self.sc.rtt("client", rep.node)
                live = LiveReplica(self.world, eid, rep, rtt, random.Random(self.rng.random()))
                double = TFServingDouble(rec.model, on_request=live.hold, host=host, port=port)
                self.doubles.append(await double.start())
                self.urls[(eid, i)], self.rtt_ms[f"{host}:{port}"] = double.url, rtt
                pod = f"{rec.name}-{i}"
                await store.put_replica(ReplicaRecord(executor=eid, pod=pod, ip=host,
                                                      state="Available"), ttl=3600)
                await store.put_latencies(eid, pod, {
                    f"sim/{c['name']}": LatencySample(ms=self.sc.rtt(c["node"], rep.node),
                                                      samples=10)
                    for c in self.sc.clients}, ttl=3600)
            await store.put_executor(dataclasses.replace(rec, rest=self.urls[(eid, 0)]))
        for c in self.sc.clients:
            await store.put_client(ClientRecord(namespace="sim", name=str(c["name"]),
                                                **dataclasses.asdict(self.sc.criteria(c))))

    async def stop(self) -> None:
        for d in self.doubles:
            await d.stop()


class Dispatch:
    """Sends one request the way router ``name`` does; returns the executor that answered."""

    def __init__(self, name: str, sc: Scenario, world: World, fleet: Fleet,
                 store: MetadataStore, seed: int) -> None:
        self.name, self.sc, self.world, self.fleet, self.store = name, sc, world, fleet, store
        self.seed = seed
        self.recs = records_of(sc)
        self.http = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None))
        self.sdks: list[list[MulambdaClient]] = []
        self.turn = [0] * len(sc.clients)
        self.runner: web.AppRunner | None = None
        self.gateway = ""
        self.sim: Router | None = None

    async def __aenter__(self) -> Dispatch:
        if self.name == "mulambda-sdk":
            n = itertools.count()
            self.sdks = [[await MulambdaClient(self.store, f"sim/{c['name']}",
                                               self.sc.criteria(c),
                                               seed=self.seed * 7919 + next(n)).__aenter__()
                          for _ in range(int(c.get("instances", 1)))]
                         for c in self.sc.clients]
        elif self.name == "mulambda-gateway":
            app = create_app(self.store)
            # The network is emulated inside the doubles, where the gateway's TCP handshakes
            # (loopback) cannot see it; the gateway sits at the clients' node, so its round
            # trip to a replica is the client's, and it is told that one.
            app[SELECTOR_KEY].handshakes = EmulatedHandshakes(self.fleet.rtt_ms)
            self.runner = web.AppRunner(app, **selector_server_options())
            await self.runner.setup()
            port = free_port()
            await web.TCPSite(self.runner, "127.0.0.1", port).start()
            self.gateway = f"http://127.0.0.1:{port}"
        else:
            self.sim = router(self.name, self.sc, self.recs, self.world, Policy())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for group in self.sdks:
            for sdk in group:
                await sdk.__aexit__(None, None, None)
        if self.runner is not None:
            await self.runner.cleanup()
        await self.http.aclose()

    async def send(self, req: int, who: int, now_ms: float) -> str:
        client = str(self.sc.clients[who]["name"])
        if self.sdks:
            group = self.sdks[who]
            self.turn[who] += 1
            return (await group[self.turn[who] % len(group)].predict(BODY["instances"])).executor
        if self.gateway:
            resp = await self.http.post(f"{self.gateway}/v1/predict/sim/{client}", json=BODY)
            resp.raise_for_status()
            return resp.headers["X-Mulambda-Executor"]
        assert self.sim is not None
        eid, i = self.sim.choose(req, who, now_ms, 1)
        started = time.monotonic()
        try:
            resp = await self.http.post(
                f"{self.fleet.urls[(eid, i)]}/v1/models/{self.recs[eid].model}:predict",
                json=BODY)
            resp.raise_for_status()
        finally:
            elapsed = (time.monotonic() - started) * 1000
            self.sim.complete(req, now_ms + elapsed, elapsed)
        return eid


async def run_one(name: str, sc: Scenario, store: MetadataStore,
                  seed: int) -> tuple[dict[str, Figures], int]:
    """One router over the rate's stream, from an empty store: figures per client kind."""
    await store.redis.flushdb()
    world = World(sc)
    fleet = Fleet(sc, world, seed)
    await fleet.start(store)
    scoring = Router(sc, records_of(sc), world, Policy())
    stream = stream_of(sc)
    skip = int(len(stream) * sc.warmup)
    figures: dict[str, Figures] = {}
    errors = 0
    try:
        async with Dispatch(name, sc, world, fleet, store, seed) as dispatch:
            t0 = time.monotonic()

            async def one(req: int) -> None:
                nonlocal errors
                at, who, *_ = stream[req]
                await asyncio.sleep(max(0.0, t0 + at / 1000 - time.monotonic()))
                try:
                    eid = await dispatch.send(req, who, (time.monotonic() - t0) * 1000)
                except (httpx.HTTPError, OSError, RuntimeError) as exc:
                    errors += 1
                    print(f"  {name}: request {req} failed: {exc!r}", file=sys.stderr)
                    return
                if req < skip:
                    return
                latency = (time.monotonic() - t0) * 1000 - at
                accuracy = float(world.model_of[eid].get("accuracy") or 0.0)
                f = figures.setdefault(str(sc.clients[who]["name"]), Figures())
                f.rtt_ms.append(latency)
                f.accuracy.append(accuracy)
                f.utility.append(scoring.prefs[who].score(latency,
                                                          accuracy / scoring.best_acc[who]))

            await asyncio.gather(*(one(i) for i in range(len(stream))))
    finally:
        await fleet.stop()
    return figures, errors


async def run(args: argparse.Namespace) -> list[experiment.Cell]:
    redis = RedisServer()
    redis.start()
    store = MetadataStore.from_url(redis.url)
    cells: list[experiment.Cell] = []
    full = capacity(args.seed, args.placement)
    try:
        for rate in args.rates:
            sc = scenario(args.seed, args.placement, rate, args.seconds)
            by_router: dict[str, dict[str, Figures]] = {}
            for name in args.routers:
                started = time.monotonic()
                by_router[name], errors = await run_one(name, sc, store, args.seed)
                print(f"rate {rate:g}/s {name}: {sc.requests} requests in "
                      f"{time.monotonic() - started:.0f} s, {errors} errors", file=sys.stderr)
            for c in sc.clients:
                kind = str(c["name"])
                cells.append(experiment.Cell(args.placement, round(rate / full, 3), rate, kind, {
                    name: figs.get(kind, Figures()) for name, figs in by_router.items()}))
    finally:
        await store.close()
        redis.stop()
    return cells


def rates(text: str) -> list[float]:
    """Comma-separated requests per second, each a finite number > 0."""
    return [positive_seconds(x) for x in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=11, help="the suite's model family")
    parser.add_argument("--placement", default="mixed", choices=experiment.PLACEMENTS)
    parser.add_argument("--rates", default="2,5,10,20", type=rates,
                        help="requests per second, comma-separated")
    parser.add_argument("--seconds", type=positive_seconds, default=20.0,
                        help="per rate and router")
    parser.add_argument("--routers", default=",".join(ROUTERS),
                        type=lambda s: tuple(s.split(",")),
                        help=f"comma-separated, from {','.join(KNOWN)}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    unknown = set(args.routers) - set(KNOWN)
    if unknown:
        parser.error(f"unknown routers {sorted(unknown)}; from {','.join(KNOWN)}")
    cells = asyncio.run(run(args))
    if args.json:
        print(json.dumps([{"rate_per_s": c.rate, "load": round(c.load, 4), "client": c.client,
                           "router": n, "p50_ms": f.p50, "p95_ms": f.p95,
                           "mean_accuracy": f.mean_accuracy, "requests": len(f.rtt_ms)}
                          for c in cells for n, f in c.figures.items()], indent=2))
    else:
        print(experiment.format_suite(cells))
        print(experiment.format_goals(experiment.goals(cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
