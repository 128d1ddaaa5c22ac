"""Fleet scale: the operator against a kopf no-op operator on the real control plane.

Run:  python bench/operator_scale.py [--sizes 1000,5000] [--idle-seconds 60]

For each N, on one real control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, KWOK; ``make controlplane``) and a
real redis-server, in the same run:

1. **Backlog**: N ModelExecutors exist before any operator starts
   (scale-to-zero executors: ``minReplicas: 0``, so the fleet is idle and
   no pods are needed).
2. **No-op baseline**: a kopf operator whose only handler is an empty
   ``on.create`` for modelexecutors (``bench/noop_operator.py``), run as a
   process of its own, as the chart's ServiceAccount; objects/s until kopf
   marked all N handled (its last-handled annotation).
3. **mulambda**: ``mulambda operator`` as a process, same identity; objects/s
   until all N have ``status.observedGeneration`` (children created, store
   record written, status patched). Peak RSS (VmHWM).
4. **Steady state**, once every executor's Progressing condition is False
   (the Deployment controller has seen its Deployment; a loaded control
   plane lags behind) and the operator has patched no status for 10 s, all
   N idle, for ``--idle-seconds``: API requests/s the
   operator makes (the API server's audit log, filtered by its user; also
   ``apiserver_request_total`` from /metrics before and after, all clients),
   store commands/s (redis ``INFO stats`` total_commands_processed, less this
   script's own), and CPU cores (utime+stime from /proc).
5. **Restart**: each operator stopped and started again over the N it
   handled, with one new executor created at the same time; seconds until
   it handled that one (what a user waits for after an operator restart),
   the API requests the restart made, and mulambda's peak RSS in it.
6. **Children baseline**, last, on a backlog of its own (a second namespace,
   so the runs above are unchanged): ``bench/noop_operator.py --children``,
   a kopf operator that makes exactly the API requests an executor needs
   (its key Secret, Deployment and Service, one Event, its status, kopf's
   finalizer) and nothing else; objects/s until all N have
   ``status.observedGeneration``. mulambda against it is mulambda's own cost;
   it against the no-op is what the API work costs.

The benchmark counts handled executors from one watch of the namespace
(``tests/support/watched.py``), not by listing them: a LIST of N every half second took the
API server's CPU from the operator under test, and more of it the longer an
operator took (at N = 5,000, ten thousand objects serialized per second).

Goals (issue 15): throughput >= 0.5x the no-op's; peak RSS < 200 MiB at
5,000; per 1,000 idle executors <= 5 API requests/s, <= 20 store commands/s,
<= 0.1 core. Every figure is printed beside the goal and the baseline of the
same run. The benchmark needs a few GB of memory and several minutes at
N = 5,000 on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test support: control plane, identity

from support.cluster import Cluster  # noqa: E402
from support.controlplane import ControlPlane  # noqa: E402
from support.identity import operator_identity  # noqa: E402
from support.procs import RedisServer  # noqa: E402
from support.watched import Watched  # noqa: E402

ME = ("mulambda.io/v1alpha1", "modelexecutors")
NOOP = ROOT / "bench" / "noop_operator.py"


@dataclass
class Run:
    """What one operator did for one fleet size."""

    name: str
    n: int
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    idle_api_per_s: float = 0.0
    idle_api_all_per_s: float = 0.0
    idle_store_per_s: float = 0.0
    idle_cores: float = 0.0
    creation_requests: dict[str, int] = field(default_factory=dict)
    idle_requests: dict[str, int] = field(default_factory=dict)
    idle_store_commands: dict[str, int] = field(default_factory=dict)
    settle_seconds: float = 0.0
    restart_seconds: float = 0.0
    restart_rss_mib: float = 0.0
    restart_requests: dict[str, int] = field(default_factory=dict)

    @property
    def objects_per_s(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0


def executor(namespace: str, i: int) -> dict[str, Any]:
    return {
        "apiVersion": "mulambda.io/v1alpha1", "kind": "ModelExecutor",
        "metadata": {"name": f"mx-{i:05d}", "namespace": namespace},
        "spec": {
            "model": {"name": "m", "storageUri": f"s3://models/m{i % 50}"},
            "traits": {"type": f"type-{i % 20}", "input": "tensor", "output": "tensor",
                       "accuracy": 0.5 + (i % 50) / 100},
            "scaling": {"minReplicas": 0, "maxReplicas": 3},
        },
    }


def admin_tls(cp: ControlPlane) -> ssl.SSLContext:
    tls = ssl.create_default_context(cafile=str(cp.pki / "ca.crt"))
    tls.load_cert_chain(str(cp.pki / "admin.crt"), str(cp.pki / "admin.key"))
    return tls


async def create_backlog(cp: ControlPlane, namespace: str, n: int, workers: int = 16) -> float:
    """Create N executors with bounded concurrency; returns seconds taken."""
    tls = admin_tls(cp)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    url = f"/apis/mulambda.io/v1alpha1/namespaces/{namespace}/modelexecutors"
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=cp.server, verify=tls, timeout=60) as http:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                resp = await http.post(url, json=executor(namespace, i))
                if resp.status_code not in (201, 409):
                    raise RuntimeError(f"create mx-{i}: {resp.status_code} {resp.text[:200]}")

        await asyncio.gather(*(worker() for _ in range(workers)))
    return time.monotonic() - started


def noop_handled(obj: dict[str, Any]) -> bool:
    return "kopf.zalando.org/last-handled-configuration" in (
        obj["metadata"].get("annotations") or {})


def mulambda_handled(obj: dict[str, Any]) -> bool:
    return bool((obj.get("status") or {}).get("observedGeneration"))


def settle(watched: Watched, cluster: Cluster, n: int, user: str, limit: float) -> float:
    """Wait until every executor's rollout is seen through and ``user`` patched no status
    for 10 s (at most ``limit`` s); returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if watched.count(settled) >= n:
            mark = cluster.audit_mark()
            time.sleep(10)
            if not any(e.subresource == "status" for e in cluster.audit(user, since=mark)):
                break
        else:
            time.sleep(2)
    return time.monotonic() - started


def settled(obj: dict[str, Any]) -> bool:
    """Handled, and its Deployment's rollout seen through (Progressing False)."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return mulambda_handled(obj) and any(
        c.get("type") == "Progressing" and c.get("status") == "False" for c in conditions)


def command_counts(r: redis.Redis) -> dict[str, int]:
    """Commands the store processed so far, per command (INFO commandstats)."""
    return {k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in r.info("commandstats").items()}


def rss_peak_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def apiserver_requests(cluster: Cluster) -> float:
    """Sum of apiserver_request_total over every label set."""
    text = cluster.http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("apiserver_request_total{"))


def store_commands(r: redis.Redis) -> int:
    return int(r.info("stats")["total_commands_processed"])


def start_operator(kind: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    if kind == "noop":
        cmd = [sys.executable, str(NOOP)]
    elif kind == "children":
        cmd = [sys.executable, str(NOOP), "--children"]
    else:
        cmd = [sys.executable, "-m", "mulambda", "operator", "--metrics-port", "0",
               "--liveness", "http://127.0.0.1:0/healthz"]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=tempfile.gettempdir(), start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_operator(kind: str, n: int, watched: Watched, cluster: Cluster, env: dict[str, str],
                 user: str, store: redis.Redis, idle_seconds: float, workdir: Path) -> Run:
    run = Run(kind, n)
    handled = noop_handled if kind == "noop" else mulambda_handled
    mark = cluster.audit_mark()
    proc = start_operator(kind, env, workdir / f"{kind}-{n}.log")
    started = time.monotonic()
    try:
        while watched.count(handled) < n:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} operator exited: see {workdir / f'{kind}-{n}.log'}")
            run.peak_rss_mib = max(run.peak_rss_mib, rss_peak_mib(proc.pid))
            time.sleep(0.5)
        run.seconds = time.monotonic() - started
        run.creation_requests = tally(cluster.audit(user, since=mark))
        if kind == "children":  # throughput only: it has no steady state of its own
            # Its namespace deleted while it runs: it takes its finalizers off, so the
            # next size's operators do not finalize its executors during their runs.
            cluster.cp.kubectl("delete", "namespace", watched.namespace, "--timeout=1200s",
                               timeout=1260)
            return run
        if kind == "mulambda":
            # Steady state: the Deployment controller has seen every Deployment (a loaded
            # control plane lags), and the operator has written no status for 10 s: no
            # status has anything left to report.
            run.settle_seconds = settle(watched, cluster, n, user, max(120.0, n / 5))
            mark = cluster.audit_mark()
            api0, cmds0, cpu0 = apiserver_requests(cluster), store_commands(store), \
                cpu_seconds(proc.pid)
            per_command0 = command_counts(store)
            t0 = time.monotonic()
            time.sleep(idle_seconds)
            elapsed = time.monotonic() - t0
            run.idle_store_commands = {
                k: v - per_command0.get(k, 0) for k, v in command_counts(store).items()
                if v - per_command0.get(k, 0) > 0 and k != "info"}
            idle = cluster.audit(user, since=mark)
            run.idle_api_per_s = len(idle) / elapsed
            run.idle_requests = tally(idle)
            # /metrics counts every client; the two reads of it are ours.
            run.idle_api_all_per_s = (apiserver_requests(cluster) - api0 - 1) / elapsed
            run.idle_store_per_s = (store_commands(store) - cmds0 - 2) / elapsed
            run.idle_cores = (cpu_seconds(proc.pid) - cpu0) / elapsed
        run.peak_rss_mib = max(run.peak_rss_mib, rss_peak_mib(proc.pid))
        stop(proc)
        proc = restart(run, watched, cluster, env, user, workdir)
    finally:
        stop(proc)
    return run


def restart(run: Run, watched: Watched, cluster: Cluster, env: dict[str, str], user: str,
            workdir: Path) -> subprocess.Popen[bytes]:
    """Start the operator again over the N it handled, with one new executor created at
    once, and time how long until it handles that one: what a user waits for after an
    operator restart (a rollout of the operator, a node drain). Also the API requests
    the restart made and its peak RSS. Returns the process (the caller stops it)."""
    handled = noop_handled if run.name == "noop" else mulambda_handled
    namespace = watched.namespace
    probe = executor(namespace, run.n + (1 if run.name == "noop" else 2))
    name = probe["metadata"]["name"]
    mark = cluster.audit_mark()
    proc = start_operator(run.name, env, workdir / f"{run.name}-{run.n}-restart.log")
    try:
        wait_for_probe(run, proc, watched, cluster, probe, handled)
    except BaseException:
        stop(proc)
        raise
    run.restart_rss_mib = max(run.restart_rss_mib, rss_peak_mib(proc.pid))
    run.restart_requests = tally(cluster.audit(user, since=mark))
    if run.name == "noop":  # no finalizer: gone at once, so the next operator has N again
        cluster.delete("mulambda.io/v1alpha1", "modelexecutors", namespace, name)
    return proc


def wait_for_probe(run: Run, proc: subprocess.Popen[bytes], watched: Watched, cluster: Cluster,
                   probe: dict[str, Any], handled: Any) -> None:
    name = probe["metadata"]["name"]
    started = time.monotonic()
    cluster.create(probe)
    limit = max(300.0, run.n / 5)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{run.name} operator exited after a restart")
        obj = watched.get(name)
        run.restart_seconds = time.monotonic() - started
        if obj is not None and handled(obj):
            break
        if run.restart_seconds > limit:
            print(f"  {run.name}: restart probe not handled within {limit:.0f} s", flush=True)
            break
        run.restart_rss_mib = max(run.restart_rss_mib, rss_peak_mib(proc.pid))
        time.sleep(0.5)


def tally(events: list[Any]) -> dict[str, int]:
    """Audit events counted by verb, resource and answer (what the requests were)."""
    out: dict[str, int] = {}
    for e in events:
        key = f"{e.verb} {e.resource}{'/' + e.subresource if e.subresource else ''} {e.code}"
        out[key] = out.get(key, 0) + 1
    return out


def reset(cluster: Cluster, namespace: str) -> None:
    """Strip kopf's marks so the next operator sees an unhandled backlog again."""
    cp_kubectl = cluster.cp.kubectl
    cp_kubectl("annotate", "modelexecutors", "--all", "-n", namespace,
               "kopf.zalando.org/last-handled-configuration-", timeout=600)


def release(cluster: Cluster, namespace: str) -> None:
    """Delete a size's namespace before the next size runs. Its executors keep the
    stopped operator's finalizer: left there, the next size's cluster-wide operators
    finalized them during their own runs (1,001 patches beyond their own at N = 5,000,
    the no-op's included), so the finalizers are taken off first."""
    for obj in cluster.list(*ME, namespace):
        if obj["metadata"].get("finalizers"):
            cluster.patch(*ME, namespace, obj["metadata"]["name"],
                          {"metadata": {"finalizers": None}})
    cluster.cp.kubectl("delete", "namespace", namespace, "--timeout=1200s", timeout=1260)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="mulambda-scale-"))
    cp = ControlPlane(nodes=1)
    store_server = RedisServer()
    store_server.start()
    results: list[tuple[Run, Run, Run]] = []
    try:
        cp.start()
        cp.kubectl("apply", "--server-side", "-k", str(ROOT / "crds"))
        cluster = Cluster(cp)
        for crd in ("modelexecutors.mulambda.io", "clients.mulambda.io"):
            cluster.wait_for(lambda c=crd: cluster.get(
                "apiextensions.k8s.io/v1", "customresourcedefinitions", None, c), what=crd)
        time.sleep(2)  # the new resources' watch caches
        identity = operator_identity(cp, cluster, workdir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        # As deployed: heartbeats signed, so each executor also gets its key Secret.
        env.update(KUBECONFIG=str(identity.kubeconfig), MULAMBDA_REDIS_URL=store_server.url,
                   MULAMBDA_KEY_PREFIX="scale", MULAMBDA_LOG_LEVEL="WARNING",
                   MULAMBDA_HEARTBEAT_SECRET="bench-heartbeat-secret-0123456789",
                   PYTHONUNBUFFERED="1")
        store = redis.Redis.from_url(store_server.url)
        for n in sizes:
            namespace = f"scale-{n}"
            cluster.create({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": namespace}})
            took = asyncio.run(create_backlog(cp, namespace, n))
            print(f"N={n}: backlog created in {took:.1f}s", flush=True)
            watched = Watched(cp.server, admin_tls(cp), namespace)
            noop = run_operator("noop", n, watched, cluster, env, identity.user, store,
                                args.idle_seconds, workdir)
            print(f"  no-op: {noop.objects_per_s:.1f} objects/s", flush=True)
            reset(cluster, namespace)
            ours = run_operator("mulambda", n, watched, cluster, env, identity.user, store,
                                args.idle_seconds, workdir)
            watched.close()
            print(f"  mulambda: {ours.objects_per_s:.1f} objects/s", flush=True)
            release(cluster, namespace)
            apart = f"{namespace}-children"
            cluster.create({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": apart}})
            asyncio.run(create_backlog(cp, apart, n))
            watched = Watched(cp.server, admin_tls(cp), apart)
            children = run_operator("children", n, watched, cluster, env, identity.user,
                                    store, args.idle_seconds, workdir)
            watched.close()
            print(f"  children baseline: {children.objects_per_s:.1f} objects/s", flush=True)
            results.append((noop, ours, children))
            print(report(results[-1:]), flush=True)  # kept if a later size fails
    finally:
        cp.stop()
        store_server.stop()
    print()
    print(report(results))
    if args.json:
        print(json.dumps([[vars(r) for r in runs] for runs in results], indent=2))
    return 0


def report(results: list[tuple[Run, Run, Run]]) -> str:
    lines = ["| N | no-op objects/s | mulambda objects/s | ratio (goal >= 0.5) | peak RSS MiB "
             "(goal < 200 at 5,000) | idle API req/s per 1,000 (goal <= 5) | idle store "
             "cmds/s per 1,000 (goal <= 20) | idle cores per 1,000 (goal <= 0.1) |",
             "|---|---|---|---|---|---|---|---|"]
    for noop, ours, _ in results:
        per_k = 1000 / ours.n
        lines.append(
            f"| {ours.n} | {noop.objects_per_s:.1f} | {ours.objects_per_s:.1f} | "
            f"{ours.objects_per_s / noop.objects_per_s:.2f} | {ours.peak_rss_mib:.0f} | "
            f"{ours.idle_api_per_s * per_k:.2f} (all clients: "
            f"{ours.idle_api_all_per_s * per_k:.2f}) | {ours.idle_store_per_s * per_k:.1f} | "
            f"{ours.idle_cores * per_k:.3f} |")
    lines.append("")
    lines.append("| N | API requests per object: no-op / mulambda | API requests/s while handling: "
                 "no-op / mulambda |")
    lines.append("|---|---|---|")
    for noop, ours, _ in results:
        # Both against the same API server: equal request rates mean the server, not the
        # operator, sets the pace, and the objects/s ratio is the inverse of the requests
        # each object needs.
        per = [sum(r.creation_requests.values()) / r.n for r in (noop, ours)]
        rate = [sum(r.creation_requests.values()) / r.seconds for r in (noop, ours)]
        lines.append(f"| {ours.n} | {per[0]:.1f} / {per[1]:.1f} | {rate[0]:.0f} / {rate[1]:.0f} |")
    lines.append("")
    lines.append("| N | children baseline objects/s | mulambda / children baseline | its "
                 "ratio to the no-op | API requests per object: children baseline / mulambda |")
    lines.append("|---|---|---|---|---|")
    for noop, ours, children in results:
        per = [sum(r.creation_requests.values()) / r.n for r in (children, ours)]
        lines.append(f"| {ours.n} | {children.objects_per_s:.1f} | "
                     f"{ours.objects_per_s / children.objects_per_s:.2f} | "
                     f"{children.objects_per_s / noop.objects_per_s:.2f} | "
                     f"{per[0]:.1f} / {per[1]:.1f} |")
    lines.append("")
    lines.append("| N | restart: s until a new executor is handled, no-op / mulambda | ratio | "
                 "restart API requests per 1,000 existing: no-op / mulambda | restart peak RSS "
                 "MiB, mulambda |")
    lines.append("|---|---|---|---|---|")
    for noop, ours, _ in results:
        per_k = 1000 / ours.n
        requests = [sum(r.restart_requests.values()) * per_k for r in (noop, ours)]
        lines.append(f"| {ours.n} | {noop.restart_seconds:.1f} / {ours.restart_seconds:.1f} | "
                     f"{noop.restart_seconds / max(ours.restart_seconds, 1e-9):.2f} | "
                     f"{requests[0]:.1f} / {requests[1]:.1f} | {ours.restart_rss_mib:.0f} |")
    lines.append("")
    for noop, ours, children in results:
        lines.append(f"requests while handling N={ours.n}: mulambda {ours.creation_requests}")
        lines.append(f"                              no-op {noop.creation_requests}")
        lines.append(f"                  children baseline {children.creation_requests}")
        lines.append(f"requests while idle N={ours.n} (after {ours.settle_seconds:.0f} s "
                     f"settling): mulambda {ours.idle_requests}")
        lines.append(f"store commands while idle N={ours.n}: {ours.idle_store_commands}")
        lines.append(f"requests of the restart N={ours.n}: mulambda {ours.restart_requests}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
