"""The selector under concurrent load, beside a minimal aiohttp handler on the same machine.

Run:  python bench/selector_load.py [--seconds 30] [--levels 50,200,1000] [--json]

Starts a redis-server on a free loopback port and fills it with
``--executors`` executors (``--types`` model types, 1-2 Available replicas
each, like bench/selection.py), then, as subprocesses listening on
127.0.0.1:

* ``mulambda selector`` on that store (caller authorization off: there is no
  API server here; MULAMBDA_SELECTOR_AUTH=false);
* the baseline: an aiohttp app whose one handler reads the body and returns a
  fixed JSON body of the selector's answer size (this script with
  ``--serve-baseline PORT``).

At each level N, for the baseline and then the selector, N connections
(one asyncio task each, one aiohttp session capped at N connections) send
``POST /select/bench/cK`` with a ``{"required": {"type": ...}}`` body, one
request after another, for ``--seconds`` or ``--max-requests``, whichever
comes first; the ``--clients`` client names rotate. Printed per level and
target: requests/s (200 answers only), p50/p99 latency of every answer, errors
by status (or exception; a request times out after 10 s) and the server's RSS
before and after; then the selector/baseline ratio of
requests/s. Goal (issue 12): zero errors at every level and >= 0.5x the
baseline's requests/s at 200 connections. The load generator is one Python
process on the same cores: it caps both targets, so read the ratio, not the
absolute rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.procs import RedisServer, free_port

BODY_SIZE = 600  # bytes, about a /select answer with a few candidates




def _raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft




async def _fill(url: str, prefix: str, executors: int, types: int) -> None:
    from mulambda.store.metadata import MetadataStore
    from mulambda.store.records import ExecutorRecord, ReplicaRecord

    rng = random.Random(1)
    store = MetadataStore.from_url(url, prefix=prefix)
    try:
        for i in range(executors):
            rec = ExecutorRecord(
                namespace="bench", name=f"ex{i:04d}", model=f"m{i}", version=1,
                type=f"type{i % types}", input="tensor", output="tensor",
                accuracy=round(rng.uniform(0.6, 0.95), 3), rest=f"http://ex{i}:8501",
                grpc=f"ex{i}:8500", state="Ready", service_time_ms=rng.uniform(2, 60))
            await store.put_executor(rec)
            for r in range(1 + i % 2):
                await store.put_replica(
                    ReplicaRecord(executor=rec.id, pod=f"ex{i:04d}-{r}", state="Available"),
                    ttl=3600)
    finally:
        await store.close()


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what} did not answer {url} within {timeout:g}s")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU the process has used (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Result:
    target: str
    connections: int
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    rss_before_mib: float = 0.0
    rss_after_mib: float = 0.0
    cpu_ms_per_request: float = 0.0  # the server's CPU per answered request


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


async def _load(base: str, connections: int, seconds: float, max_requests: int,
                clients: int, types: int) -> tuple[list[float], Counter[str], float]:
    """N connections, closed loop, until the deadline or the request budget."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    budget = max_requests
    bodies = [json.dumps({"required": {"type": f"type{k % types}", "input": "tensor",
                                       "output": "tensor"}}).encode() for k in range(clients)]
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker(i: int) -> None:
            nonlocal budget
            k = i
            while budget > 0 and time.perf_counter() < deadline:
                budget -= 1
                k = (k + 1) % clients
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{base}/select/bench/c{k:03d}", data=bodies[k],
                                            headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        status = r.status
                except Exception as exc:  # counted by kind, the run goes on
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.01)
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                if status != 200:
                    errors[str(status)] += 1

        await asyncio.gather(*(worker(i) for i in range(connections)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


async def _run_level(target: str, base: str, pid: int, n: int,
                     args: argparse.Namespace) -> Result:
    rss_before, cpu_before = _rss_mib(pid), _cpu_seconds(pid)
    latencies, errors, elapsed = await _load(base, n, args.seconds, args.max_requests,
                                             args.clients, args.types)
    latencies.sort()
    done = len(latencies) + sum(v for k, v in errors.items() if not k.isdigit())
    ok = len(latencies) - sum(v for k, v in errors.items() if k.isdigit())
    # requests/s counts 200s only: a fast 503 is not capacity.
    return Result(target=target, connections=n, requests=done, seconds=round(elapsed, 2),
                  rps=round(ok / elapsed, 1) if elapsed else 0.0,
                  p50_ms=round(_pct(latencies, 50), 2), p99_ms=round(_pct(latencies, 99), 2),
                  errors=dict(errors), rss_before_mib=round(rss_before, 1),
                  rss_after_mib=round(_rss_mib(pid), 1),
                  cpu_ms_per_request=round((_cpu_seconds(pid) - cpu_before) * 1000
                                           / max(1, len(latencies)), 3))


def _serve_baseline(port: int) -> None:
    from aiohttp import web

    payload = json.dumps({"endpoint": "http://ex0:8501", "padding": "x" * BODY_SIZE}).encode()

    async def select(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=payload, content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/select/{client:.+}", select)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _print(results: list[Result], levels: list[int]) -> None:
    head = ("| connections | target | requests/s | p50 ms | p99 ms | requests | errors | "
            "RSS before -> after MiB | server CPU ms per request |")
    print(head)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        print(f"| {r.connections} | {r.target} | {r.rps:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
              f"| {r.requests} | {errors} | {r.rss_before_mib:.0f} -> {r.rss_after_mib:.0f} "
              f"| {r.cpu_ms_per_request:.3f} |")
    print()
    by = {(r.target, r.connections): r for r in results}
    for n in levels:
        base, sel = by[("baseline", n)], by[("selector", n)]
        ratio = sel.rps / base.rps if base.rps else 0.0
        cost = (sel.cpu_ms_per_request / base.cpu_ms_per_request
                if base.cpu_ms_per_request else 0.0)
        # The load generator shares the cores, so the CPU a request costs each server is
        # the steadier figure: at most 2x the baseline's is what 0.5x the rate needs.
        print(f"{n} connections: selector/baseline requests/s = {ratio:.2f}; "
              f"CPU per request = {cost:.2f}x the baseline's")
    clean = all(not r.errors for r in results if r.target == "selector")
    at200 = by.get(("selector", 200)), by.get(("baseline", 200))
    ratio200 = at200[0].rps / at200[1].rps if at200[0] and at200[1] and at200[1].rps else None
    met = clean and ratio200 is not None and ratio200 >= 0.5
    print(f"goal (no errors at any level, >= 0.5x baseline at 200): "
          f"{'MET' if met else 'NOT MET'} (selector errors: "
          f"{'none' if clean else 'yes'}; ratio at 200: "
          f"{'n/a' if ratio200 is None else f'{ratio200:.2f}'})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _measure(targets: dict[str, tuple[str, subprocess.Popen[bytes]]],
                   levels: list[int], args: argparse.Namespace) -> list[Result]:
    results = []
    for n in levels:
        for name, (base, proc) in targets.items():
            if not args.json:
                print(f"# {name}, {n} connections, {args.seconds:g} s ...", file=sys.stderr)
            results.append(await _run_level(name, base, proc.pid, n, args))
            await asyncio.sleep(1)  # closed connections drain
    return results


def main(args: argparse.Namespace) -> list[Result]:
    levels = [int(x) for x in args.levels.split(",")]
    nofile = _raise_fd_limit()
    if nofile < 2 * max(levels) + 100:
        sys.exit(f"RLIMIT_NOFILE is {nofile}: too low for {max(levels)} connections")
    server = RedisServer(args=["--maxclients", "10000"])
    server.start()
    url = server.url
    procs: list[subprocess.Popen[bytes]] = []
    procs_logs: list[Any] = []
    try:
        asyncio.run(_fill(url, "bench", args.executors, args.types))
        env = {**os.environ, "MULAMBDA_SELECTOR_AUTH": "false", "MULAMBDA_LOG_LEVEL": "WARNING",
               "MULAMBDA_REDIS_URL": url, "MULAMBDA_KEY_PREFIX": "bench"}
        sel_port, base_port = free_port(), free_port()
        # Its log (warnings and above here) goes to a file, not this terminal.
        log = open(args.selector_log or os.devnull, "ab")  # closed in finally
        procs_logs.append(log)
        selector = subprocess.Popen(
            [sys.executable, "-m", "mulambda", "selector", "--host", "127.0.0.1",
             "--port", str(sel_port), "--redis-url", url, "--key-prefix", "bench"],
            env=env, stdout=subprocess.DEVNULL, stderr=log)
        procs.append(selector)
        baseline = subprocess.Popen(
            [sys.executable, __file__, "--serve-baseline", str(base_port)], env=env)
        procs.append(baseline)
        targets = {"baseline": (f"http://127.0.0.1:{base_port}", baseline),
                   "selector": (f"http://127.0.0.1:{sel_port}", selector)}
        for name, (base, proc) in targets.items():
            _wait_http(f"{base}/healthz", proc, name)
        return asyncio.run(_measure(targets, levels, args))
    finally:
        for proc in reversed(procs):
            _stop(proc)
        server.stop()
        for f in procs_logs:
            f.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per level and target")
    parser.add_argument("--levels", default="50,200,1000", help="concurrent connections")
    parser.add_argument("--max-requests", type=int, default=1_000_000,
                        help="request budget per level and target")
    parser.add_argument("--executors", type=int, default=1000)
    parser.add_argument("--types", type=int, default=10)
    parser.add_argument("--clients", type=int, default=100, help="distinct client names")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--selector-log", default="", help="file for the selector's log "
                        "(default: discarded)")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse()
    if options.serve_baseline:
        _serve_baseline(options.serve_baseline)
        sys.exit(0)
    found = main(options)
    if options.json:
        print(json.dumps([asdict(r) for r in found], indent=2))
    else:
        _print(found, [int(x) for x in options.levels.split(",")])
