"""``mulambda top --once`` against a real redis-server, logged in as a user that may only
read: the frame shows what the store holds, and the server saw no write command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from mulambda.sdk.shadow import count_outcome
from mulambda.store.acl import acl_file
from mulambda.store.leases import InflightLeases
from mulambda.store.metadata import MetadataStore
from mulambda.store.outcomes import OutcomeRecorder
from mulambda.store.records import ClientRecord, ExecutorRecord, LatencySample, ReplicaRecord

from support.procs import RedisServer

pytestmark = pytest.mark.integration

P = "top"
VIEWER, PASSWORD = "mulambda-viewer", "viewer-pw-0123456789"
READS = ("hget", "hgetall", "hkeys", "hscan", "xlen", "xrange", "smembers")
# Every key of the prefix, read only; read commands only.
VIEWER_ACL = (f"user {VIEWER} on >{PASSWORD} resetkeys %R~{P}:* resetchannels -@all "
              + " ".join(f"+{c}" for c in ("ping", "select", *READS)))


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    s = RedisServer(acl=acl_file(P, {}) + VIEWER_ACL + "\n")
    s.start()
    yield s
    s.stop()


def record(name: str, state: str = "Ready") -> ExecutorRecord:
    return ExecutorRecord(namespace="ml", name=name, model=name, version=1, type="vision",
                          input="image", output="label", accuracy=0.9,
                          rest=f"http://{name}:8501", grpc="", state=state,
                          service_time_ms=8.0, min_replicas=0)


async def seed(server: RedisServer) -> None:
    """What the operator, companions and SDKs would have written."""
    admin = MetadataStore(aioredis.Redis.from_url(
        server.url, username=RedisServer.ADMIN_USER, password=server.admin_password,
        decode_responses=True), prefix=P)
    await admin.put_executor(record("resnet"))
    await admin.put_executor(record("sleepy", "ScaledToZero"))
    await admin.put_replica(ReplicaRecord(executor="ml/resnet", pod="resnet-0",
                                          state="Available"), ttl=600)
    await admin.put_client(ClientRecord(namespace="apps", name="shop", type="vision"))
    await admin.put_latencies("ml/resnet", "resnet-0",
                              {"apps/shop": LatencySample(ms=4.0, samples=2)}, ttl=600)
    leases = InflightLeases(admin, "sdk-1")
    for _ in range(3):
        leases.start("ml/resnet")
    await leases.flush()
    await leases.stop()  # stop the writer; the leases stay (an SDK still at work)
    await admin.note_demand(["ml/resnet"])
    await admin.redis.xadd(f"{P}:tasks:queue:ml/resnet", {"task": "t1"})
    await admin.redis.sadd(f"{P}:tasks:active", "ml/resnet")  # as a submission does
    # Requests an SDK served: 17 answered near 20 ms, 3 near 300 ms, one failed.
    served = OutcomeRecorder(admin)
    for ok, ms in [(True, 20.0)] * 17 + [(True, 300.0)] * 3 + [(False, 5.0)]:
        count_outcome(served, "ml/resnet", {}, None, ok=ok, ms=ms)
    await served.close()
    await admin.close()


def top(server: RedisServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MULAMBDA_REDIS_URL": server.url, "MULAMBDA_KEY_PREFIX": P,
           "MULAMBDA_REDIS_USERNAME": VIEWER, "MULAMBDA_REDIS_PASSWORD": PASSWORD,
           "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "mulambda", "top", "--once", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd="/")


async def test_top_once_shows_the_store_as_a_read_only_user_and_writes_nothing(
        server: RedisServer) -> None:
    server.flush()
    await seed(server)
    server.command("CONFIG", "RESETSTAT")
    done = top(server, "--no-kube", "--sort", "state")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "executors 2  serving 1  warming 0  cold 1  failing 0" in lines[0]
    resnet = next(line.split() for line in lines if line.startswith("ml/resnet"))
    # serving, 1 ready of unknown desired (--no-kube), 3 in flight, RTT 4 ms, 1 queued task
    assert resnet[2:5] == ["serving", "1/?", "3"]
    assert resnet[-3:] == ["4.0", "4.0", "1"]
    # 21 requests in the last minute or two; p50 near 20 ms, p95 in the 300 ms bucket.
    assert float(resnet[5]) > 0
    assert 18 < float(resnet[6]) <= 23 and 250 < float(resnet[7]) <= 310
    sleepy = next(line.split() for line in lines if line.startswith("ml/sleepy"))
    assert sleepy[2:4] == ["cold", "0/?"]
    stats = server.command("INFO", "commandstats").decode()
    used = {line.split(":", 1)[0].removeprefix("cmdstat_") for line in stats.splitlines()
            if line.startswith("cmdstat_")}
    assert used - {"info", "config|resetstat"} <= {*READS, "auth", "hello", "client|setinfo",
                                                    "ping", "select"}, used


def test_top_without_a_reachable_store_says_so(server: RedisServer) -> None:
    env = {**os.environ, "MULAMBDA_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "mulambda", "top", "--once", "--no-kube"],
                          env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 2
    assert "mulambda top:" in done.stderr and "Traceback" not in done.stderr
