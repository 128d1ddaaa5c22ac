"""What reading the others' measured service times with each fresh in-flight read costs a
decision: the read with them (``InflightReader(service=True)``, what the SDK does) beside
the read without (the old path, what the selector still does), in one run.

Run:  python bench/fresh_read.py [--executors 1000] [--routers 8] [--seconds 3]

On a fresh redis-server on a free loopback port: ``--executors`` executors, each
measured by ``--routers`` other SDK instances (``P:service``), each with a request of
its in flight at four of them (``P:inflight``). Two mirrors of the same reader identity, one with
the service part and one without, read in alternation (so load on the machine hits
both alike), in two states:

* **nothing changed** since the last read;
* **one request answered**: before each pair of reads another router publishes what a
  finished request changes (its leases and one executor's new measurement, one
  pipeline, as ``InflightLeases.flush`` writes it; the write is not timed).

Per read: p50/p99 time, this process's mean CPU time, commands and bytes the
server received and sent (from ``INFO stats`` deltas around each read, less the
INFO calls' own share), and the ratio of the new path to the old. Then
``MulambdaClient.select()`` (cache_ttl=1 s, the application's view, an SDK that has
measured something itself) with the new fresh read and with the old one swapped in,
alternating, while routers keep finishing requests.
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
from typing import Any

from mulambda.policy.latency import ServiceTracker
from mulambda.sdk import MulambdaClient
from mulambda.store.leases import InflightReader
from mulambda.store.metadata import MetadataStore
from mulambda.store.reader import InflightMirror
from mulambda.store.records import MAX_LEASE_SECONDS, ExecutorRecord, ReplicaRecord, ServiceStats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.procs import RedisServer

TYPE = "type0"
INFLIGHT_PER_ROUTER = 4


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _measured(rng: random.Random, executor: str) -> dict[str, ServiceStats]:
    tracker = ServiceTracker()
    tracker.observe(executor, inflight=rng.randint(0, 3), items=1,
                    elapsed_ms=rng.uniform(5, 60), network_ms=1, predicted_ms=20,
                    at=time.monotonic())
    return tracker.take_changed()


async def _load(store: MetadataStore, executors: int, routers: int) -> list[str]:
    rng = random.Random(1)
    ids = []
    for i in range(executors):
        rec = ExecutorRecord(
            namespace="bench", name=f"ex{i:05d}", model=f"m{i}", version=1,
            type=TYPE if i % 20 == 0 else f"type{i % 20}", input="tensor", output="tensor",
            accuracy=round(rng.uniform(0.6, 0.95), 3), rest=f"http://ex{i}:8501",
            grpc=f"ex{i}:8500", state="Ready", service_time_ms=rng.uniform(2, 60))
        await store.put_executor(rec)
        await store.put_replica(ReplicaRecord(executor=rec.id, pod=f"ex{i:05d}-0",
                                              state="Available"), ttl=3600)
        ids.append(rec.id)
    for r in range(routers):
        service: dict[str, ServiceStats] = {}
        for e in ids:
            service.update(_measured(rng, e))
        await store.publish_inflight(f"router-{r}", {e: 1 for e in _mine(ids, r)},
                                     ttl=MAX_LEASE_SECONDS, service=service)
    return ids


def _mine(ids: list[str], router: int) -> list[str]:
    """The executors a router has requests in flight at (a few: one request each)."""
    return random.Random(router).sample(ids, INFLIGHT_PER_ROUTER)


class Counters:
    """Commands and bytes the server handled, from INFO stats (another connection)."""

    def __init__(self, store: MetadataStore) -> None:
        self.redis = store.redis
        self.own = (0.0, 0.0, 0.0)

    async def read(self) -> tuple[float, float, float]:
        info: dict[str, Any] = await self.redis.info("stats")
        return (float(info["total_commands_processed"]), float(info["total_net_input_bytes"]),
                float(info["total_net_output_bytes"]))

    async def calibrate(self) -> None:
        deltas = []
        for _ in range(50):
            a = await self.read()
            b = await self.read()
            deltas.append(tuple(y - x for x, y in zip(a, b, strict=True)))
        self.own = tuple(statistics.median(d[i] for d in deltas)  # type: ignore[assignment]
                         for i in range(3))

    async def around(self, fn: Any) -> tuple[float, float, float, float, float]:
        """(microseconds, commands, bytes in, bytes out, this process's CPU microseconds)
        of one ``await fn()``."""
        a = await self.read()
        t0, cpu0 = time.perf_counter(), time.process_time()
        await fn()
        us = (time.perf_counter() - t0) * 1e6
        cpu_us = (time.process_time() - cpu0) * 1e6
        b = await self.read()
        c, i, o = (y - x - own for x, y, own in zip(a, b, self.own, strict=True))
        return us, c, i, o, cpu_us


async def _finish_one(store: MetadataStore, rng: random.Random, ids: list[str],
                      routers: int) -> None:
    """What one router's flush after an answered request writes."""
    r = rng.randrange(routers)
    mine = _mine(ids, r)
    await store.publish_inflight(f"router-{r}", {e: 1 for e in mine}, ttl=MAX_LEASE_SECONDS,
                                 service=_measured(rng, rng.choice(mine)))


def _row(values: list[tuple[float, float, float, float, float]]) -> dict[str, float]:
    us = [v[0] for v in values]
    return {"n": len(values), "p50_us": _pct(us, 50), "p99_us": _pct(us, 99),
            "cpu_us": statistics.mean(v[4] for v in values),
            "commands": statistics.median(v[1] for v in values),
            "bytes_in": statistics.median(v[2] for v in values),
            "bytes_out": statistics.median(v[3] for v in values)}


async def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    server = RedisServer()
    server.start()
    try:
        store = MetadataStore.from_url(server.url, prefix="bench")
        info = MetadataStore.from_url(server.url, prefix="bench")
        ids = await _load(store, args.executors, args.routers)
        counters = Counters(info)
        await counters.calibrate()
        # The last change noted is a typical one (each read re-reads it: XRANGE from
        # the id it kept, inclusive), not the set-up's whole-fleet write.
        await _finish_one(store, random.Random(3), ids, args.routers)
        old = InflightMirror(store, "me")
        new = InflightMirror(store, "me", service=True)
        await old.load()
        await new.load()  # the first read of each is whole: not steady state
        rng = random.Random(2)
        table: dict[str, dict[str, float]] = {}
        for state in ("nothing changed", "one request answered"):
            got: dict[str, list[tuple[float, float, float, float, float]]] = {
                "old": [], "new": []}
            end = time.perf_counter() + args.seconds
            turn = 0
            while time.perf_counter() < end:
                if state != "nothing changed":
                    await _finish_one(store, rng, ids, args.routers)
                order = [("old", old), ("new", new)][:: 1 if turn % 2 else -1]
                turn += 1
                for name, mirror in order:
                    got[name].append(await counters.around(mirror.load))
            for name in ("old", "new"):
                table[f"read, {state}, {name}"] = _row(got[name])

        # The application's view: select() with either fresh read, alternating.
        selects: dict[str, list[float]] = {"old": [], "new": []}
        cpu: dict[str, list[float]] = {"old": [], "new": []}
        async with MulambdaClient(store, "apps/bench", type=TYPE, seed=1) as sdk:
            # An SDK in use has measured something itself; its own statistics are then
            # merged into every decision's view (a new dict per call) on either path.
            sdk._tracker.observe(ids[0], inflight=0, items=1, elapsed_ms=21, network_ms=1,
                                 predicted_ms=20, at=time.monotonic())
            readers = {"old": InflightReader(store, sdk._leases.instance),
                       "new": InflightReader(store, sdk._leases.instance, service=True)}
            for reader in readers.values():
                sdk._load = reader
                await sdk.select()
            end = time.perf_counter() + args.seconds
            turn = 0
            while time.perf_counter() < end:
                await _finish_one(store, rng, ids, args.routers)
                for name in (["old", "new"] if turn % 2 else ["new", "old"]):
                    sdk._load = readers[name]
                    t0, cpu0 = time.perf_counter(), time.process_time()
                    await sdk.select()
                    selects[name].append((time.perf_counter() - t0) * 1e6)
                    cpu[name].append((time.process_time() - cpu0) * 1e6)
                turn += 1
            sdk._load = None
            for reader in readers.values():
                reader.close()
        for name, us in selects.items():
            table[f"SDK select, one request answered, {name}"] = {
                "n": len(us), "p50_us": _pct(us, 50), "p99_us": _pct(us, 99),
                "cpu_us": statistics.mean(cpu[name]), "commands": float("nan"),
                "bytes_in": float("nan"), "bytes_out": float("nan")}
        await store.close()
        await info.close()
    finally:
        server.stop()
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executors", type=int, default=1000)
    parser.add_argument("--routers", type=int, default=8,
                        help="other SDK instances with measurements and leases")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = asyncio.run(measure(args))
    if args.json:
        sys.stdout.write(json.dumps(table, indent=2) + "\n")
        raise SystemExit(0)
    sys.stdout.write(f"{args.executors} executors, {args.routers} other routers\n")
    sys.stdout.write(f"{'measurement':<44}{'n':>7}{'p50 us':>9}{'p99 us':>9}{'CPU us':>8}"
                     f"{'cmds':>6}{'B in':>7}{'B out':>7}{'p50 new/old':>13}"
                     f"{'CPU new/old':>13}\n")
    for name, row in table.items():
        ratio = cpu_ratio = ""
        if name.endswith(", new"):
            before = table[name[:-3] + "old"]
            ratio = f"{row['p50_us'] / before['p50_us']:.2f}"
            cpu_ratio = f"{row['cpu_us'] / before['cpu_us']:.2f}"
        sys.stdout.write(f"{name:<44}{row['n']:>7}{row['p50_us']:>9.0f}{row['p99_us']:>9.0f}"
                         f"{row['cpu_us']:>8.0f}{row['commands']:>6.0f}"
                         f"{row['bytes_in']:>7.0f}{row['bytes_out']:>7.0f}{ratio:>13}"
                         f"{cpu_ratio:>13}\n")
