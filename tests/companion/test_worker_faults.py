"""Faults of asynchronous inference with real companion processes (``mulambda companion``,
model loaded from real S3), a real redis-server and the TF Serving REST double: a worker
killed mid-task, a worker stopped mid-task, the store killed and restarted (AOF) during a
backlog, a poison task."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mulambda.store.metadata import MetadataStore
from mulambda.store.records import StoreUnavailable
from mulambda.tasks.queue import TaskQueue
from mulambda.tasks.records import TaskOptions, new_task_id

from support.procs import RedisServer, free_port
from support.seaweedfs import SeaweedFS
from support.tfserving_double import TFServingDouble

pytestmark = pytest.mark.integration

MODEL = "half_plus_two"
EXECUTOR = "ml/hpt"
CLIENT = "shop/app"
OPTIONS = TaskOptions(max_attempts=3, result_ttl_seconds=600)


async def eventually(check: Callable[[], Any], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


class Companions:
    """Starts ``mulambda companion`` processes for one executor, each its own pod."""

    def __init__(self, seaweedfs: SeaweedFS, bucket: str, redis_url: str, models_dir: Path,
                 serving_url: str, cwd: Path) -> None:
        self.base = {
            **os.environ, **seaweedfs.env(),
            "MULAMBDA_EXECUTOR": EXECUTOR, "MULAMBDA_MODEL_URI": f"s3://{bucket}/{MODEL}",
            "MULAMBDA_MODEL_VERSION": "1", "MULAMBDA_MODELS_DIR": str(models_dir),
            "MULAMBDA_TFSERVING_URL": serving_url, "MULAMBDA_HTTP_HOST": "127.0.0.1",
            "MULAMBDA_REDIS_URL": redis_url, "MULAMBDA_KEY_PREFIX": "test",
            "MULAMBDA_HEARTBEAT_TTL_SECONDS": "5", "MULAMBDA_SERVING_POLL_SECONDS": "0.05",
            "MULAMBDA_RETRY_BASE_DELAY_SECONDS": "0.05", "MULAMBDA_WORKER_CONCURRENCY": "2",
            "MULAMBDA_TASK_VISIBILITY_SECONDS": "1",
        }
        self.cwd = cwd
        self.procs: list[subprocess.Popen[bytes]] = []

    async def start(self, pod: str, **env: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        proc = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "mulambda", "companion"],
            env={**self.base, "MULAMBDA_POD_NAME": pod, "MULAMBDA_HTTP_PORT": str(port), **env},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=self.cwd,  # not the repo root: there mulambda/ would shadow the package
        )
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"

        async def ready() -> bool:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ready, 30, f"companion {pod} ready")
        return proc, url

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def model_bucket(s3: Any, bucket: str, half_plus_two: Path) -> str:
    from mulambda.tools.push import push_version

    push_version(s3, half_plus_two, bucket, MODEL, 1)
    return bucket


@pytest.fixture
def calls() -> dict[str, Any]:
    """What the double's predict handler does: the first ``hold`` calls wait on ``gate``."""
    return {"n": 0, "hold": 0, "gate": asyncio.Event(), "first": asyncio.Event(), "delay": 0.0}


@pytest.fixture
async def double(tmp_path: Path, calls: dict[str, Any]) -> AsyncIterator[TFServingDouble]:
    async def on_request() -> None:
        calls["n"] += 1
        if calls["n"] <= calls["hold"]:
            calls["first"].set()
            await calls["gate"].wait()
        elif calls["delay"]:
            await asyncio.sleep(calls["delay"])

    async with TFServingDouble(MODEL, models_dir=tmp_path / "models", load_delay=0.05,
                               on_request=on_request) as d:
        yield d
    calls["gate"].set()


def companions_for(seaweedfs: SeaweedFS, model_bucket: str, redis_url: str, tmp_path: Path,
                   double: TFServingDouble) -> Companions:
    return Companions(seaweedfs, model_bucket, redis_url, tmp_path / "models", double.url,
                      tmp_path)


async def submit(queue: TaskQueue, x: float) -> str:
    task_id, _ = await queue.submit(new_task_id(CLIENT), client=CLIENT, executor=EXECUTOR,
                                    model=MODEL, body=json.dumps({"instances": [x]}),
                                    options=OPTIONS)
    return task_id


async def outcome(queue: TaskQueue, task_id: str) -> dict[str, Any] | None:
    raw = (await queue.get(task_id)).get("outcome")
    return None if raw is None else dict(json.loads(raw))


async def metric(url: str, name: str) -> str:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


async def test_a_worker_killed_mid_task_is_redelivered_and_the_result_written_once(
        seaweedfs, model_bucket, redis_url, store, tmp_path, double, calls):
    calls["hold"] = 1  # the first delivery hangs in TF Serving
    pods = companions_for(seaweedfs, model_bucket, redis_url, tmp_path, double)
    try:
        a, _ = await pods.start("hpt-a")
        queue = TaskQueue(store)
        task_id = await submit(queue, 3.0)
        await asyncio.wait_for(calls["first"].wait(), 20)
        assert (await queue.get(task_id))["worker"] == "hpt-a"
        a.kill()  # SIGKILL: nothing returned, nothing acknowledged
        await asyncio.to_thread(a.wait)

        _, b_url = await pods.start("hpt-b")
        done = await eventually(lambda: outcome(queue, task_id), 20, "the task's outcome")
        assert done["status"] == "succeeded" and done["worker"] == "hpt-b"
        assert done["result"] == {"predictions": [3.5]}
        assert done["attempts"] == 2  # the killed delivery counted
        assert calls["n"] == 2  # delivered twice (at least once) ...
        # ... and written once: B wrote it, as its first and only outcome.
        assert 'outcome="succeeded"} 1.0' in await metric(b_url, "mulambda_companion_tasks_total")
        assert "duplicate" not in await metric(b_url, "mulambda_companion_tasks_total")
        assert await queue.backlog([EXECUTOR]) == {}
        assert await queue.dead_letters() == []
    finally:
        pods.stop_all()


async def test_a_stopped_worker_returns_its_running_task_at_once(
        seaweedfs, model_bucket, redis_url, store, tmp_path, double, calls):
    calls["hold"] = 1
    pods = companions_for(seaweedfs, model_bucket, redis_url, tmp_path, double)
    try:
        # A long visibility: the task comes back because A returns it, not because it lapsed.
        a, _ = await pods.start("hpt-a", MULAMBDA_TASK_VISIBILITY_SECONDS="60",
                                MULAMBDA_TASK_DRAIN_SECONDS="0.5")
        queue = TaskQueue(store)
        task_id = await submit(queue, 1.0)
        await asyncio.wait_for(calls["first"].wait(), 20)
        a.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(a.communicate, timeout=15)
        assert a.returncode == 0, out.decode()
        assert "tasks returned to the queue tasks=1" in out.decode()
        fields = await queue.get(task_id)
        assert fields["attempts"] == "0" and "started_at" not in fields

        started = time.monotonic()
        await pods.start("hpt-b", MULAMBDA_TASK_VISIBILITY_SECONDS="60")
        done = await eventually(lambda: outcome(queue, task_id), 20, "the task's outcome")
        assert time.monotonic() - started < 30  # well before a 60 s visibility timeout
        assert (done["status"], done["worker"], done["attempts"]) == ("succeeded", "hpt-b", 1)
    finally:
        pods.stop_all()


async def test_a_poison_task_ends_in_the_dead_letter_stream_with_its_reason(
        seaweedfs, model_bucket, redis_url, store, tmp_path, double):
    pods = companions_for(seaweedfs, model_bucket, redis_url, tmp_path, double)
    try:
        await pods.start("hpt-a")
        queue = TaskQueue(store)
        poison, _ = await queue.submit(new_task_id(CLIENT), client=CLIENT, executor=EXECUTOR,
                                       model=MODEL, body='{"instances": ["not a number"]}',
                                       options=OPTIONS)
        fine = await submit(queue, 2.0)
        bad = await eventually(lambda: outcome(queue, poison), 20, "the poison task's outcome")
        assert bad["status"] == "failed" and "HTTP 400" in bad["reason"]
        assert (await eventually(lambda: outcome(queue, fine), 20, "the other task"))[
            "result"] == {"predictions": [3.0]}
        [dead] = await queue.dead_letters()
        assert (dead["task"], dead["executor"], dead["worker"]) == (poison, EXECUTOR, "hpt-a")
        assert "could not convert" in dead["reason"] or "bad request" in dead["reason"]
    finally:
        pods.stop_all()


async def test_a_model_answering_nan_fails_the_task_at_once_with_why(
        seaweedfs, model_bucket, redis_url, store, tmp_path, double):
    """TF Serving writes NaN and Infinity into its JSON; no result can carry them, and
    the same input gives them again: failed after one attempt, saying so (it used to
    fail writing the outcome and come back until its attempts ran out, as "lost")."""
    pods = companions_for(seaweedfs, model_bucket, redis_url, tmp_path, double)
    try:
        await pods.start("hpt-a")
        queue = TaskQueue(store)
        task, _ = await queue.submit(new_task_id(CLIENT), client=CLIENT, executor=EXECUTOR,
                                     model=MODEL, body='{"instances": [Infinity]}',
                                     options=OPTIONS)
        done = await eventually(lambda: outcome(queue, task), 20, "the task's outcome")
        assert done["status"] == "failed" and "Infinity" in done["reason"]
        [dead] = await queue.dead_letters()
        assert dead["task"] == task and int(dead["attempts"]) == 1
    finally:
        pods.stop_all()


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server that keeps every write in its append-only file (the chart's store
    configuration for tasks: docs/async.md)."""
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(args=["--appendonly", "yes", "--appendfsync", "always",
                               "--dir", str(data)])
    server.start()
    yield server
    server.stop()


async def test_the_store_killed_and_restarted_during_a_backlog_loses_no_task(
        seaweedfs, model_bucket, aof_redis, tmp_path, double, calls):
    calls["delay"] = 0.05
    store = MetadataStore.from_url(aof_redis.url, prefix="test", timeout=2)
    pods = companions_for(seaweedfs, model_bucket, aof_redis.url, tmp_path, double)
    try:
        queue = TaskQueue(store)
        tasks = {await submit(queue, float(i)): float(i) for i in range(40)}
        await pods.start("hpt-a")

        async def some_done() -> bool:
            return calls["n"] >= 10

        await eventually(some_done, 20, "the first tasks served")
        assert aof_redis.proc is not None
        aof_redis.proc.kill()  # SIGKILL: no shutdown save, only what the AOF holds
        await asyncio.to_thread(aof_redis.proc.wait)
        aof_redis.proc = None
        await asyncio.sleep(1.0)
        await asyncio.to_thread(aof_redis.start)  # same port, same append-only file

        async def all_done() -> bool:
            try:
                return all([await outcome(queue, t) for t in tasks])
            except StoreUnavailable:  # this test's own pooled connections, cut by the kill
                return False

        await eventually(all_done, 60, "every task's outcome after the restart")
        for task_id, x in tasks.items():
            done = await outcome(queue, task_id)
            assert done is not None and done["status"] == "succeeded", (task_id, done)
            assert done["result"] == {"predictions": [0.5 * x + 2.0]}
        assert await queue.backlog([EXECUTOR]) == {}
        assert await queue.dead_letters() == []
        assert calls["n"] >= len(tasks)  # at least once; a few may have run twice
    finally:
        pods.stop_all()
        await store.close()
