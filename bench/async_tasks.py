"""Asynchronous tasks through the queue, beside direct REST calls to the same model.

Run:  python bench/async_tasks.py [--concurrency 8] [--seconds 10] [--service-ms 20,100]
      [--low-load 50] [--json]

Starts a redis-server on a free loopback port and, in this process, the TF
Serving REST test double (tests/support/tfserving_double.py) answering each
predict after ``--service-ms`` (a model's service time; each in turn), the selector's
aiohttp app (task API, caller authorization off) and two companion workers
(companion/worker.py) of ``--concurrency``/2 slots each. Then, in the same run:

* **direct**: ``--concurrency`` callers POST ``:predict`` to the double, one
  request after another, for ``--seconds``: requests/s and p50/p99 latency.
  The baseline: what the model serves at that concurrency.
* **queue**: as many tasks as the direct phase served are queued through
  ``POST /v1/tasks`` (8 submitters; the rate is printed), then the workers
  start on the full queue: tasks/s until the last outcome is written, and
  per task the time from taken to result written (p50/p99).
* **low load**: ``--low-load`` tasks one at a time, each submitted and
  polled (``GET /v1/tasks/ID`` every 2 ms) until it succeeded, beside the same
  number of single direct calls: the latency a task adds per call (p50/p99),
  and the part of it inside the system (queued -> result written).

Printed: the figures and the ratios queue/direct throughput (goal >= 0.8 at
the same concurrency) and added latency, and the CPU this process spent per
direct call and per task (and the redis-server's per task). Everything shares
one event loop and the machine's cores, so read the ratios, not the absolute
rates; the CPU per task is the steadier figure when other work shares the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mulambda.companion.worker import Worker
from mulambda.selector.app import create_app, selector_server_options
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, ExecutorRecord, ReplicaRecord
from mulambda.tasks.queue import TaskQueue
from mulambda.tasks.records import TaskOptions

from support.procs import RedisServer
from support.tfserving_double import TFServingDouble

MODEL, EXECUTOR, CLIENT = "bench_model", "bench/model", "bench/client"
# The worker's outcomes (mulambda_companion_tasks_total) after which a task's is written.
_WRITTEN = ("succeeded", "duplicate", "dead_letter", "skipped")
BODY = {"instances": [[1.0, 2.0, 3.0, 4.0]]}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _register(store: MetadataStore) -> None:
    await store.put_executor(ExecutorRecord(
        namespace="bench", name="model", model=MODEL, version=1, type="bench", input="x",
        output="y", accuracy=0.9, rest="http://unused:8501", grpc="unused:8500",
        state="Ready", service_time_ms=20))
    for pod in ("w-0", "w-1"):
        await store.put_replica(ReplicaRecord(executor=EXECUTOR, pod=pod, state="Available",
                                              version=1), ttl=3600)
    await store.put_client(ClientRecord(namespace="bench", name="client", type="bench"))


async def direct(url: str, concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` callers, one request after another, for ``seconds``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    body = json.dumps(BODY).encode()
    # The HTTP client the workers use (aiohttp), so the ratio is the queue's, not a library's.
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def caller() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with http.post(f"{url}/v1/models/{MODEL}:predict", data=body,
                                     headers={"Content-Type": "application/json"}) as resp:
                    resp.raise_for_status()
                    await resp.read()
                latencies.append(time.perf_counter() - started)

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"requests": len(latencies), "per_s": len(latencies) / elapsed,
            "cpu_ms": 1000 * cpu / max(1, len(latencies)),
            "p50_ms": 1000 * _quantile(latencies, 0.5), "p99_ms": 1000 * _quantile(latencies, 0.99)}


async def submit_all(api: str, n: int) -> tuple[list[str], float]:
    """Queue ``n`` tasks through the API (8 submitters); (ids, submissions per second)."""
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=api, timeout=30) as http:
        started = time.perf_counter()
        left = iter(range(n))

        async def submitter() -> None:
            for _ in left:
                resp = await http.post(f"/v1/tasks/{CLIENT}", json=BODY)
                if resp.status_code != 202:
                    raise RuntimeError(f"submit answered {resp.status_code}: {resp.text}")
                ids.append(resp.json()["id"])

        await asyncio.gather(*(submitter() for _ in range(8)))
        return ids, n / (time.perf_counter() - started)


async def _server_cpu(queue: TaskQueue) -> float:
    """CPU seconds the redis-server has used so far."""
    info = await queue.redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _ended(registries: list[CollectorRegistry]) -> float:
    """Tasks the workers ended with an outcome written (their own counters)."""
    return sum(registry.get_sample_value("mulambda_companion_tasks_total", {"outcome": o})
               or 0.0 for registry in registries for o in _WRITTEN)


async def drain(queue: TaskQueue, ids: list[str],
                start_workers: Callable[[], list[CollectorRegistry]]) -> dict[str, float]:
    """Start the workers on a full queue and time them until every outcome is written.

    The end is watched on the workers' counters in this process, then confirmed once in
    the store (backlog empty): polling the store's backlog every 10 ms from this process
    made the queue side pay about 0.6 store commands per task that neither the direct
    side nor a deployment (its operator reads the backlog once per tick, elsewhere) pays.
    """
    store_cpu = await _server_cpu(queue)
    started, cpu = time.perf_counter(), time.process_time()
    registries = start_workers()
    while _ended(registries) < len(ids) or await queue.backlog([EXECUTOR]):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    store_cpu = await _server_cpu(queue) - store_cpu
    served: list[float] = []
    failed = 0
    for task_id in ids:
        fields = await queue.get(task_id)
        done = json.loads(fields["outcome"])
        if done["status"] != "succeeded":
            failed += 1
        served.append(done["finished_at"] - float(fields["started_at"]))
    return {"tasks": len(ids), "failed": failed, "per_s": len(ids) / elapsed,
            "cpu_ms": 1000 * cpu / len(ids), "store_cpu_ms": 1000 * store_cpu / len(ids),
            "p50_ms": 1000 * _quantile(served, 0.5), "p99_ms": 1000 * _quantile(served, 0.99)}


async def low_load(api: str, serving: str, queue: TaskQueue, n: int) -> dict[str, float]:
    """One task at a time, submitted and polled until done, beside single direct calls."""
    direct_ms: list[float] = []
    task_ms: list[float] = []
    inside_ms: list[float] = []
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(n):
            started = time.perf_counter()
            (await http.post(f"{serving}/v1/models/{MODEL}:predict", json=BODY)).raise_for_status()
            direct_ms.append(1000 * (time.perf_counter() - started))

            started = time.perf_counter()
            task_id = (await http.post(f"{api}/v1/tasks/{CLIENT}", json=BODY)).json()["id"]
            while True:
                status = (await http.get(f"{api}/v1/tasks/{task_id}")).json()
                if status["status"] == "succeeded":
                    break
                if status["status"] in ("failed", "cancelled"):
                    raise RuntimeError(f"task {task_id} {status['status']}: {status}")
                await asyncio.sleep(0.002)
            task_ms.append(1000 * (time.perf_counter() - started))
            fields = await queue.get(task_id)
            inside_ms.append(1000 * (json.loads(fields["outcome"])["finished_at"]
                                     - float(fields["created_at"])))
    return {"direct_p50_ms": statistics.median(direct_ms),
            "task_p50_ms": statistics.median(task_ms),
            "task_p99_ms": _quantile(task_ms, 0.99),
            "inside_p50_ms": statistics.median(inside_ms),
            "added_p50_ms": statistics.median(task_ms) - statistics.median(direct_ms),
            "added_p99_ms": _quantile(task_ms, 0.99) - _quantile(direct_ms, 0.99)}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every phase at every service time, one store, selector and double for all."""
    redis = RedisServer()
    redis.start()
    store = MetadataStore.from_url(redis.url, prefix="bench")
    service = {"ms": 0.0}

    async def model_time() -> None:
        await asyncio.sleep(service["ms"] / 1000)

    runner: web.AppRunner | None = None
    out = []
    try:
        await _register(store)
        async with TFServingDouble(MODEL, on_request=model_time) as double:
            # The whole run is queued before a worker starts: no open-task limit.
            runner = web.AppRunner(create_app(store, cache_ttl=0.5, tasks=TaskOptions(
                max_open_per_client=1 << 30)), **selector_server_options())
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            api = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
            queue = TaskQueue(store)
            for ms in args.service_ms:
                service["ms"] = ms
                stops: list[asyncio.Event] = []
                workers: list[asyncio.Task[None]] = []

                def start_workers(stops: list[asyncio.Event] = stops,
                                  workers: list[asyncio.Task[None]] = workers
                                  ) -> list[CollectorRegistry]:
                    registries = []
                    for pod in ("w-0", "w-1"):
                        stop = asyncio.Event()
                        registry = CollectorRegistry()
                        worker = Worker(TaskQueue(store), executor=EXECUTOR, consumer=pod,
                                        model=MODEL, serving_url=double.url,
                                        concurrency=max(1, args.concurrency // 2),
                                        visibility=30, drain=5, predict_timeout=30,
                                        ready=lambda: True, registry=registry)
                        stops.append(stop)
                        registries.append(registry)
                        workers.append(asyncio.create_task(worker.run(stop)))
                    return registries

                try:
                    base = await direct(double.url, args.concurrency, args.seconds)
                    ids, submit_rate = await submit_all(api, int(base["requests"]))
                    tasks = {**await drain(queue, ids, start_workers),
                             "submit_per_s": submit_rate}
                    low = await low_load(api, double.url, queue, args.low_load)
                finally:
                    for stop in stops:
                        stop.set()
                    await asyncio.gather(*workers, return_exceptions=True)
                out.append({"concurrency": args.concurrency, "service_ms": ms, "direct": base,
                            "queue": tasks, "low_load": low,
                            "throughput_ratio": tasks["per_s"] / base["per_s"]})
    finally:
        if runner is not None:
            await runner.cleanup()
        await store.close()
        redis.stop()
    return out


def report(r: dict[str, Any]) -> str:
    d, q, low = r["direct"], r["queue"], r["low_load"]
    return "\n".join([
        f"model service time {r['service_ms']:g} ms; concurrency {r['concurrency']} "
        f"(direct callers = worker slots)",
        f"direct REST   {d['per_s']:8.1f} req/s   p50 {d['p50_ms']:7.1f} ms   "
        f"p99 {d['p99_ms']:7.1f} ms   ({d['requests']} requests)",
        f"through queue {q['per_s']:8.1f} tasks/s p50 {q['p50_ms']:7.1f} ms   "
        f"p99 {q['p99_ms']:7.1f} ms   taken->written, slot wait included ({q['tasks']} "
        f"tasks, {q['failed']} failed; the API queued them at {q['submit_per_s']:.0f}/s "
        f"beforehand)",
        f"queue / direct throughput: {r['throughput_ratio']:.2f}x (goal >= 0.8)",
        f"CPU of this process per call: direct {d['cpu_ms']:.2f} ms, through queue "
        f"{q['cpu_ms']:.2f} ms (+{q['cpu_ms'] - d['cpu_ms']:.2f} ms: workers' store calls "
        f"and scheduling); redis-server {q['store_cpu_ms']:.2f} ms per task",
        f"low load, one at a time: direct p50 {low['direct_p50_ms']:.1f} ms; task submit->"
        f"result p50 {low['task_p50_ms']:.1f} ms, p99 {low['task_p99_ms']:.1f} ms "
        f"(queued->written p50 {low['inside_p50_ms']:.1f} ms)",
        f"added latency per task: p50 {low['added_p50_ms']:.1f} ms, p99 "
        f"{low['added_p99_ms']:.1f} ms ({low['task_p50_ms'] / low['direct_p50_ms']:.2f}x "
        f"the direct call at p50)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--service-ms", type=lambda v: [float(x) for x in v.split(",")],
                        default=[20.0, 100.0],
                        help="model service times to run at, comma-separated (default 20,100)")
    parser.add_argument("--low-load", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=2) if args.json
          else "\n\n".join(report(r) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
