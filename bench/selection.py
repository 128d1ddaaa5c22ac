"""Selection and snapshot refreshes through the SDK against a real redis-server, beside
one PING.

Run:  python bench/selection.py [--executors 1000,10000] [--clients 1000]

For each fleet size in ``--executors``, on a fresh redis-server on a free
loopback port: that many executors (``--types`` model types, 1-2 live
replicas each) and ``--clients`` registered clients; RTT samples from every
replica to each of the ``--measure-clients`` measured clients (samples for
the others would only take memory: a reader reads its own client's). Then,
in one process and one run:

* one Redis PING round trip (the unit the targets are expressed in);
* ``MulambdaClient.select()`` with the default cache (``cache_ttl=1``,
  background refresh): what an application sees per request;
* ``select()`` with ``cache_ttl=0``: a refresh (what changed since the
  last call) and a ranking on every call;
* ``select()`` by an SDK that has measured answers of its own (three
  executors'), merged into every decision's statistics;
* ``store.snapshot()``: the whole read a refresh used to be;
* an SDK's refresh now (``SnapshotReader.snapshot()``, store/reader.py)
  when nothing changed, and when 1% of the heartbeats were rewritten since
  the last one (the writes are not timed).

The measured clients take turns, each with a fresh SDK instance for
``--seconds-per-client`` (several cache refreshes); calls are issued one at
a time (closed loop, so the tail is understated by coordinated omission).
PINGs are measured before and after. Prints p50/p99 and their ratio to the
PING median. Targets (issues 11 and 15): select p99 <= 10x PING; a refresh
when nothing changed <= 10x PING at 10,000 executors and 1,000 clients,
and one after changes proportional to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

from mulambda.sdk import MulambdaClient
from mulambda.store.leases import InflightLeases
from mulambda.store.metadata import MetadataStore
from mulambda.store.reader import SnapshotReader
from mulambda.store.records import ClientRecord, ExecutorRecord, LatencySample, ReplicaRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.procs import RedisServer


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def _load(store: MetadataStore, executors: int, clients: list[str], types: int,
                sampled: list[str]) -> tuple[InflightLeases, list[ReplicaRecord]]:
    """Register the executors and clients (RTT samples from every replica to the
    ``sampled`` clients); returns the in-flight load of "other" SDK instances,
    published until the caller stops it, and the replicas' heartbeats."""
    rng = random.Random(1)
    others = InflightLeases(store, instance="bench-others")
    replicas = []
    for i in range(executors):
        rec = ExecutorRecord(
            namespace="bench", name=f"ex{i:05d}", model=f"m{i}", version=1,
            type=f"type{i % types}", input="tensor", output="tensor",
            accuracy=round(rng.uniform(0.6, 0.95), 3), rest=f"http://ex{i}:8501",
            grpc=f"ex{i}:8500", state="Ready", service_time_ms=rng.uniform(2, 60),
        )
        await store.put_executor(rec)
        for r in range(1 + i % 2):
            replica = ReplicaRecord(executor=rec.id, pod=f"ex{i:05d}-{r}", state="Available")
            await store.put_replica(replica, ttl=3600)
            replicas.append(replica)
            await store.put_latencies(
                rec.id, replica.pod, {c: LatencySample(ms=rng.uniform(0.2, 40), samples=5)
                                      for c in sampled}, ttl=3600)
        others.add(rec.id, rng.randint(0, 3), publish=False)
    for c in clients:
        namespace, name = c.split("/")
        await store.put_client(ClientRecord(namespace=namespace, name=name,
                                            type=f"type{clients.index(c) % types}"))
    await others.flush()
    return others, replicas


async def _measure(fn, seconds: float) -> list[float]:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


async def measure(args: argparse.Namespace, executors: int) -> dict[str, dict[str, float]]:
    server = RedisServer()
    server.start()
    try:
        store = MetadataStore.from_url(server.url, prefix="bench")
        clients = [f"apps/client{c:04d}" for c in range(args.clients)]
        picked = clients[:: max(1, len(clients) // args.measure_clients)][: args.measure_clients]
        others, replicas = await _load(store, executors, clients, args.types, picked)
        results: dict[str, list[float]] = {}

        half = args.ping_seconds / 2
        results["redis PING"] = await _measure(store.ping, half)

        # Each application process runs one SDK instance for its own client;
        # hosting 100 refreshing instances in this one process would measure
        # CPU contention of the benchmark, not selection. So clients take
        # turns, each long enough for several cache refreshes.
        it = iter(range(10**12))
        cached: list[float] = []
        uncached: list[float] = []
        for c in picked:
            kind = f"type{clients.index(c) % args.types}"
            async with MulambdaClient(store, c, type=kind) as sdk:
                await sdk.select()  # the first call waits for the snapshot: not steady state
                cached += await _measure(sdk.select, args.seconds_per_client)
            async with MulambdaClient(store, c, type=kind, cache_ttl=0) as sdk:
                await sdk.select()  # its first refresh reads everything: not steady state
                uncached += await _measure(sdk.select, args.seconds_per_client / 4)
        results["SDK select (cache_ttl=1s)"] = cached
        results["SDK select (cache_ttl=0)"] = uncached
        # An SDK process that has had answers: its own measurements are merged into every
        # decision's statistics (what the two rows above, with none, do not see).
        answered: list[float] = []
        for c in picked:
            kind = f"type{clients.index(c) % args.types}"
            async with MulambdaClient(store, c, type=kind) as sdk:
                for cand in (await sdk.ranking())[:3]:
                    sdk._tracker.observe(cand.executor_id, inflight=0, items=1,
                                         elapsed_ms=20.0, network_ms=5.0, predicted_ms=15.0,
                                         at=time.monotonic())
                await sdk.select()
                answered += await _measure(sdk.select, args.seconds_per_client / 2)
        results["SDK select, own answers"] = answered

        async def snapshot_only() -> None:
            await store.snapshot(picked[next(it) % len(picked)])

        results["whole read (snapshot())"] = await _measure(snapshot_only,
                                                            args.seconds_per_client)
        # What an SDK's refresh costs now: only what changed since its last one.
        reader = SnapshotReader(store, picked[0], exclude_instance="bench-me")
        await reader.snapshot()
        results["refresh, nothing changed"] = await _measure(reader.snapshot,
                                                             args.seconds_per_client)
        rng = random.Random(2)
        changed: list[float] = []
        batch = max(1, len(replicas) // 100)
        end = time.perf_counter() + args.seconds_per_client
        while time.perf_counter() < end:
            for replica in rng.sample(replicas, batch):  # 1% of heartbeats change
                await store.put_replica(replica, ttl=3600)
            t0 = time.perf_counter()
            await reader.snapshot()
            changed.append((time.perf_counter() - t0) * 1e6)
        results[f"refresh, {batch} heartbeats new"] = changed
        results["redis PING"] += await _measure(store.ping, half)
        await others.stop()
        await store.close()
    finally:
        server.stop()

    ping = statistics.median(results["redis PING"])
    ping99 = _pct(results["redis PING"], 99)
    table = {}
    for name, values in results.items():
        p50, p99 = _pct(values, 50), _pct(values, 99)
        table[name] = {"n": len(values), "p50_us": p50, "p99_us": p99,
                       "p50_over_ping_p50": p50 / ping, "p99_over_ping_p50": p99 / ping,
                       "p99_over_ping_p99": p99 / ping99}
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executors", default="1000,10000",
                        help="fleet sizes, comma-separated, each measured on its own store")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--types", type=int, default=20)
    parser.add_argument("--measure-clients", type=int, default=10,
                        help="clients measured in turn (all --clients are loaded)")
    parser.add_argument("--seconds-per-client", type=float, default=3.0)
    parser.add_argument("--ping-seconds", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tables = {int(n): asyncio.run(measure(args, int(n))) for n in args.executors.split(",")}
    if args.json:
        sys.stdout.write(json.dumps(tables, indent=2) + "\n")
        raise SystemExit(0)
    try:
        import hiredis  # noqa: F401  (redis-py uses it when present)

        parser_name = "hiredis"
    except ImportError:
        parser_name = "pure-Python RESP parser"
    for n, table in tables.items():
        sys.stdout.write(f"\n{n} executors, {args.clients} clients, {args.types} types, "
                         f"{parser_name}\n")
        sys.stdout.write(f"{'measurement':<30}{'n':>8}{'p50 us':>10}{'p99 us':>10}"
                         f"{'p50/PING50':>12}{'p99/PING50':>12}{'p99/PING99':>12}\n")
        for name, row in table.items():
            sys.stdout.write(f"{name:<30}{row['n']:>8}{row['p50_us']:>10.0f}"
                             f"{row['p99_us']:>10.0f}{row['p50_over_ping_p50']:>12.1f}"
                             f"{row['p99_over_ping_p50']:>12.1f}{row['p99_over_ping_p99']:>12.1f}\n")
