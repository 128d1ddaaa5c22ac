"""The companion's model lifecycle against a real redis-server and the TF Serving test double.

Most tests use :class:`FakeSource` in place of S3 (it writes version
folders the way the real loader does and raises the real
``ModelLoadError``), so they can dictate load failures and run in well
under a second each. The last tests use the real loader against a real
SeaweedFS server, the last one through the ``mulambda companion`` command.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from mulambda.companion import loader
from mulambda.companion.lifecycle import Companion, S3ModelSource
from mulambda.companion.serving import ServingClient
from mulambda.settings import CompanionSettings
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ReplicaRecord

from support.procs import free_port
from support.tfserving_double import TFServingDouble

MODEL = "half_plus_two"
EXECUTOR = "ml/hpt"
POD = "hpt-abc12"


def companion_env(
    redis_url: str, models_dir: Path, serving_url: str, **extra: str
) -> dict[str, str]:
    """Environment of a companion tuned for fast tests (intervals in tens of milliseconds)."""
    env = {
        "MULAMBDA_EXECUTOR": EXECUTOR,
        "MULAMBDA_MODEL_URI": f"s3://models/{MODEL}",
        "MULAMBDA_MODELS_DIR": str(models_dir),
        "MULAMBDA_POD_NAME": POD,
        "MULAMBDA_POD_IP": "10.1.2.3",
        "MULAMBDA_TFSERVING_URL": serving_url,
        "MULAMBDA_HTTP_HOST": "127.0.0.1",
        "MULAMBDA_HTTP_PORT": "0",
        "MULAMBDA_REDIS_URL": redis_url,
        "MULAMBDA_KEY_PREFIX": "test",
        "MULAMBDA_HEARTBEAT_TTL_SECONDS": "5",
        "MULAMBDA_HEARTBEAT_INTERVAL_SECONDS": "0.1",
        "MULAMBDA_PROBE_INTERVAL_SECONDS": "0.2",
        "MULAMBDA_SERVING_POLL_SECONDS": "0.05",
        "MULAMBDA_VERSION_WATCH_SECONDS": "0.1",
        "MULAMBDA_RETRY_BASE_DELAY_SECONDS": "0.05",
        "MULAMBDA_FAILED_RETRY_SECONDS": "0.3",
    }
    env.update(extra)
    return env


class FakeSource:
    """Stands in for S3: versions it "has", errors to raise, folders written like the loader's."""

    def __init__(
        self, models_dir: Path, versions: list[int], errors: list[Exception] | None = None
    ) -> None:
        self.models_dir = models_dir
        self.versions = versions
        self.errors = list(errors or [])
        self.loads: list[int] = []

    def resolve(self, version: int | None) -> int:
        if not self.versions:
            raise loader.ModelLoadError(
                "ModelNotFound", f"no version folders under s3://models/{MODEL}/", permanent=True
            )
        if version is not None and version not in self.versions:
            raise loader.ModelLoadError("VersionNotFound", f"version {version} not found",
                                        permanent=True)
        return max(self.versions) if version is None else version

    def load(self, version: int) -> loader.LoadResult:
        if self.errors:
            raise self.errors.pop(0)
        self.loads.append(version)
        base = self.models_dir / MODEL
        partial = base / f".partial-{version}"
        partial.mkdir(parents=True)
        (partial / "saved_model.pb").write_bytes(b"x" * 100)
        final = base / str(version)
        partial.rename(final)  # atomic, as the real loader does
        return loader.LoadResult(version=version, path=final, bytes=100, files=1,
                                 seconds=0.01, downloaded=True)

    def remove_others(self, keep: int) -> None:
        loader.remove_other_versions(self.models_dir, MODEL, keep)


async def eventually(check: Callable[[], object], within: float = 5.0, what: str = "") -> object:
    """Await until ``check()`` (sync or async) returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or check}")
        await asyncio.sleep(0.02)


async def replica(store: MetadataStore) -> ReplicaRecord | None:
    replicas = await store.list_replicas(EXECUTOR)
    return replicas[0] if replicas else None


async def finish(r: Running) -> int:
    """Stop a running companion the way SIGTERM does and return its exit code."""
    r.companion.request_stop()
    code = await asyncio.wait_for(r.task, 5)
    await r.http.aclose()
    await r.companion.serving.close()
    return code


class Running:
    """A companion running in this event loop, with an HTTP client for its endpoints."""

    def __init__(self, companion: Companion, task: asyncio.Task[int]) -> None:
        self.companion = companion
        self.task = task
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{companion.server.port}")

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(path)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
async def start_companion(
    store: MetadataStore, redis_url: str, models_dir: Path
) -> AsyncIterator[Callable[..., object]]:
    """Factory: start a Companion on a given source and TF Serving double; stopped afterwards."""
    running: list[tuple[Running, TFServingDouble]] = []

    async def start(source: object, double: TFServingDouble, **env: str) -> Running:
        config = CompanionSettings.from_env(companion_env(redis_url, models_dir, double.url, **env))
        serving = ServingClient(config.serving_rest_url)
        companion = Companion(config, store, source, serving)  # type: ignore[arg-type]
        task = asyncio.create_task(companion.run())
        await eventually(lambda: companion.server.listening, what="http server")
        r = Running(companion, task)
        running.append((r, double))
        return r

    yield start
    for r, double in running:
        if not r.task.done():
            await finish(r)
        await double.stop()




async def test_readiness_turns_200_only_when_tf_serving_reports_the_version_available(
    start_companion, store: MetadataStore, models_dir: Path
):
    double = await TFServingDouble(MODEL, models_dir=models_dir, hold=True).start()
    r = await start_companion(FakeSource(models_dir, [1]), double)

    # The folder is on disk and TF Serving (the double) is "loading" it.
    await eventually(lambda: double.states().get(1) == "LOADING", what="double sees version 1")
    for _ in range(10):
        resp = await r.get("/readyz")
        assert resp.status_code == 503
        assert resp.json()["reason"] == "WaitingForServing"
        await asyncio.sleep(0.03)
    assert (await replica(store)).state == "Loading"
    assert (await r.get("/healthz")).status_code == 200

    double.release(1)
    await eventually(lambda: double.states().get(1) == "AVAILABLE", what="version 1 available")

    async def ready() -> bool:
        return (await r.get("/readyz")).status_code == 200

    await eventually(ready, what="readyz 200")
    body = (await r.get("/readyz")).json()
    assert body == {"ready": True, "state": "Available", "version": 1, "reason": "",
                    "message": ""}
    rec = await eventually(lambda: _replica_in_state(store, "Available"), what="heartbeat")
    assert (rec.version, rec.pod, rec.ip) == (1, POD, "10.1.2.3")
    assert await finish(r) == 0


async def _replica_in_state(store: MetadataStore, state: str) -> ReplicaRecord | None:
    rec = await replica(store)
    return rec if rec is not None and rec.state == state else None


async def test_permanent_load_error_publishes_failed_with_reason_and_stays_alive(
    start_companion, store: MetadataStore, models_dir: Path
):
    double = await TFServingDouble(MODEL, models_dir=models_dir).start()
    source = FakeSource(models_dir, [])  # nothing in storage: ModelNotFound, permanent
    r = await start_companion(source, double)

    rec = await eventually(lambda: _replica_in_state(store, "Failed"), what="Failed heartbeat")
    assert rec.reason == "ModelNotFound"
    assert "no version folders" in rec.message
    resp = await r.get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["reason"] == "ModelNotFound"
    assert (await r.get("/healthz")).status_code == 200
    metrics = (await r.get("/metrics")).text
    assert 'mulambda_companion_model_load_errors_total{reason="ModelNotFound"}' in metrics
    assert not (models_dir / MODEL).exists() or not any((models_dir / MODEL).iterdir())

    # The administrator uploads the model later: the periodic retry picks it up.
    source.versions.append(3)
    await eventually(lambda: _replica_in_state(store, "Available"), what="recovered")
    assert (await r.get("/readyz")).status_code == 200
    assert await finish(r) == 0


async def test_transient_load_errors_are_retried_until_the_model_serves(
    start_companion, store: MetadataStore, models_dir: Path
):
    double = await TFServingDouble(MODEL, models_dir=models_dir, load_delay=0.05).start()
    flaky = [loader.ModelLoadError("StorageUnavailable", "connection refused", permanent=False)
             for _ in range(2)]
    source = FakeSource(models_dir, [1], errors=flaky)
    r = await start_companion(source, double)

    await eventually(lambda: _replica_in_state(store, "Available"), what="Available")
    assert source.loads == [1]
    metrics = (await r.get("/metrics")).text
    assert 'mulambda_companion_model_load_errors_total{reason="StorageUnavailable"} 2.0' in metrics
    assert await finish(r) == 0


async def test_tf_serving_load_failure_is_reported_as_failed(
    start_companion, store: MetadataStore, models_dir: Path
):
    class NoSavedModel(FakeSource):
        def load(self, version: int) -> loader.LoadResult:
            result = super().load(version)
            (result.path / "saved_model.pb").unlink()  # TF Serving will refuse it
            return result

    double = await TFServingDouble(MODEL, models_dir=models_dir, load_delay=0.05).start()
    r = await start_companion(NoSavedModel(models_dir, [1]), double,
                              MULAMBDA_FAILED_RETRY_SECONDS="60")
    rec = await eventually(lambda: _replica_in_state(store, "Failed"), what="Failed")
    assert rec.reason == "ServingLoadFailed"
    assert "Could not find SavedModel" in rec.message
    assert (await r.get("/readyz")).json()["reason"] == "ServingLoadFailed"
    assert await finish(r) == 0


async def test_new_version_in_storage_switches_without_dropping_readiness(
    start_companion, store: MetadataStore, models_dir: Path
):
    # No version pinned: the companion follows the newest version in storage.
    double = await TFServingDouble(MODEL, models_dir=models_dir, hold=True).start()
    double.release(1)
    source = FakeSource(models_dir, [1])
    r = await start_companion(source, double)
    await eventually(lambda: _replica_in_state(store, "Available"), what="v1 Available")

    statuses: list[int] = []

    async def watch_readiness() -> None:
        while True:
            statuses.append((await r.get("/readyz")).status_code)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_readiness())
    source.versions.append(2)  # an administrator pushes version 2
    await eventually(lambda: double.states().get(2) == "LOADING", what="v2 loading")
    await asyncio.sleep(0.2)  # several serving polls while v2 is still loading
    assert (models_dir / MODEL / "1").is_dir(), "old version removed before new one serves"
    assert double.states()[1] == "AVAILABLE"

    double.release(2)
    rec = await eventually(lambda: _version_is(store, 2), what="heartbeat version 2")
    assert rec.state == "Available"
    await eventually(lambda: not (models_dir / MODEL / "1").exists(), what="v1 folder removed")
    watcher.cancel()
    assert statuses and set(statuses) == {200}, "readiness dropped during the switch"
    assert source.loads == [1, 2]
    assert await finish(r) == 0


async def test_failed_switch_keeps_serving_the_old_version_and_says_why(
    start_companion, store: MetadataStore, models_dir: Path
):
    double = await TFServingDouble(MODEL, models_dir=models_dir, load_delay=0.05).start()
    source = FakeSource(models_dir, [1])
    r = await start_companion(source, double, MULAMBDA_FAILED_RETRY_SECONDS="60")
    await eventually(lambda: _replica_in_state(store, "Available"), what="v1 Available")

    # Version 5 appears in storage but cannot be loaded.
    source.errors.append(loader.ModelLoadError("NotASavedModel", "5/ has no saved_model.pb",
                                               permanent=True))
    source.versions.append(5)

    async def stuck() -> ReplicaRecord | None:
        rec = await replica(store)
        return rec if rec is not None and rec.reason else None

    rec = await eventually(stuck, what="stuck switch reported")
    assert (rec.state, rec.version, rec.reason) == ("Available", 1, "VersionSwitchNotASavedModel")
    assert (await r.get("/readyz")).status_code == 200
    assert (models_dir / MODEL / "1").is_dir()
    assert await finish(r) == 0


async def test_withdrawn_newest_version_rolls_back_removing_the_higher_one_first(
    start_companion, store: MetadataStore, models_dir: Path
):
    # TF Serving's "latest" policy would keep serving 2 while 1 sits next to it.
    double = await TFServingDouble(MODEL, models_dir=models_dir, load_delay=0.05).start()
    source = FakeSource(models_dir, [1, 2])
    r = await start_companion(source, double)
    await eventually(lambda: _version_is(store, 2), what="v2 served")

    source.versions.remove(2)  # version 2 withdrawn from storage: back to 1
    rec = await eventually(lambda: _version_is(store, 1), what="rolled back to v1")
    assert rec.state == "Available"
    assert double.states() == {1: "AVAILABLE", 2: "END"}
    assert sorted(p.name for p in (models_dir / MODEL).iterdir()) == ["1"]
    assert (await r.get("/readyz")).json()["version"] == 1
    assert await finish(r) == 0


async def _version_is(store: MetadataStore, version: int) -> ReplicaRecord | None:
    rec = await replica(store)
    return rec if rec is not None and rec.version == version else None


async def test_readiness_drops_when_tf_serving_stops_serving_the_version(
    start_companion, store: MetadataStore, models_dir: Path
):
    double = await TFServingDouble(MODEL, models_dir=models_dir, load_delay=0.05).start()
    r = await start_companion(FakeSource(models_dir, [1]), double,
                              MULAMBDA_VERSION_WATCH_SECONDS="60")
    await eventually(lambda: _replica_in_state(store, "Available"), what="Available")

    # Someone deletes the folder: TF Serving unloads the version (END).
    loader.remove_other_versions(models_dir, MODEL, keep=999)

    async def not_ready() -> httpx.Response | None:
        resp = await r.get("/readyz")
        return resp if resp.status_code == 503 else None

    resp = await eventually(not_ready, what="readyz 503")
    assert resp.json()["reason"] == "ServingUnavailable"
    assert (await replica(store)).state == "Loading"
    assert await finish(r) == 0


async def test_metrics_expose_load_probe_and_error_series(
    start_companion, store: MetadataStore, models_dir: Path
):
    from mulambda.store.records import ClientRecord

    dead = free_port()  # nothing listens there
    await store.put_client(ClientRecord(namespace="ml", name="dead", type="regression",
                                        probe_url=f"http://127.0.0.1:{dead}/"))
    double = await TFServingDouble(MODEL, models_dir=models_dir, load_delay=0.05).start()
    r = await start_companion(FakeSource(models_dir, [7]), double)
    await eventually(lambda: _replica_in_state(store, "Available"), what="Available")

    async def probed() -> str | None:
        text = (await r.get("/metrics")).text
        return text if 'mulambda_companion_probe_errors_total{reason="connect"}' in text else None

    text = await eventually(probed, what="probe error counted")
    resp = await r.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    for series in (
        'mulambda_companion_model_load_duration_seconds{model="half_plus_two",version="7"} 0.01',
        'mulambda_companion_model_load_bytes{model="half_plus_two",version="7"} 100.0',
        "mulambda_companion_model_ready 1.0",
        "mulambda_companion_model_loaded_version 7.0",
        "# TYPE mulambda_companion_probe_latency_seconds histogram",
        "# TYPE mulambda_companion_model_load_errors_total counter",
    ):
        assert series in text, series
    assert (await r.get("/nope")).status_code == 404
    assert await finish(r) == 0


# -- real S3 (SeaweedFS) + the real loader ---------------------------------------------------


@pytest.mark.integration
async def test_missing_model_in_real_s3_is_failed_model_not_found(
    seaweedfs, s3, bucket: str, start_companion, store: MetadataStore, redis_url: str,
    models_dir: Path, monkeypatch: pytest.MonkeyPatch,
):
    for k, v in seaweedfs.env().items():  # S3ModelSource reads them like in a pod
        monkeypatch.setenv(k, v)
    double = await TFServingDouble(MODEL, models_dir=models_dir).start()
    env = {"MULAMBDA_MODEL_URI": f"s3://{bucket}/{MODEL}", "MULAMBDA_FAILED_RETRY_SECONDS": "60"}
    config = CompanionSettings.from_env(companion_env(redis_url, models_dir, double.url, **env))
    r = await start_companion(S3ModelSource.from_config(config), double, **env)
    rec = await eventually(lambda: _replica_in_state(store, "Failed"), within=15, what="Failed")
    assert rec.reason == "ModelNotFound"
    assert (await r.get("/readyz")).json()["reason"] == "ModelNotFound"
    assert await finish(r) == 0


@pytest.mark.integration
async def test_model_changed_after_its_push_is_failed_checksum_mismatch_and_not_refetched(
    seaweedfs, s3, bucket: str, half_plus_two: Path, start_companion, store: MetadataStore,
    redis_url: str, models_dir: Path, monkeypatch: pytest.MonkeyPatch,
):
    import io

    from mulambda.storage.s3 import ModelStorage
    from mulambda.tools.push import push_version

    push_version(s3, half_plus_two, bucket, MODEL, 1)
    index = (half_plus_two / "variables" / "variables.index").read_bytes()
    damaged = index[:-1] + bytes([index[-1] ^ 0xFF])  # same size, one byte differs
    s3.client.put_object(bucket, f"{MODEL}/1/variables/variables.index", io.BytesIO(damaged),
                         len(damaged))

    class Counting(ModelStorage):
        gets = 0

        def get_range(self, *args: object, **kwargs: object) -> object:
            Counting.gets += 1
            return super().get_range(*args, **kwargs)  # type: ignore[arg-type]

    double = await TFServingDouble(MODEL, models_dir=models_dir).start()
    env = {"MULAMBDA_MODEL_URI": f"s3://{bucket}/{MODEL}", "MULAMBDA_FAILED_RETRY_SECONDS": "0.2"}
    config = CompanionSettings.from_env(companion_env(redis_url, models_dir, double.url, **env))
    source = S3ModelSource(Counting.from_env(seaweedfs.env()), config)
    r = await start_companion(source, double, **env)
    rec = await eventually(lambda: _replica_in_state(store, "Failed"), within=15, what="Failed")
    assert rec.reason == "ChecksumMismatch" and "variables.index" in rec.message
    gets = Counting.gets
    await asyncio.sleep(1.0)  # about five retries of the permanent error
    assert Counting.gets == gets, "the same bad bytes were downloaded again"
    assert (await replica(store)).reason == "ChecksumMismatch"
    assert not (models_dir / MODEL / "1").exists()  # nothing published for TF Serving
    assert (await r.get("/readyz")).status_code == 503
    assert await finish(r) == 0
    source.close()


@pytest.mark.integration
async def test_companion_command_loads_from_s3_becomes_ready_and_cleans_up_on_sigterm(
    seaweedfs, s3, bucket: str, half_plus_two: Path, redis_url: str, store: MetadataStore,
    tmp_path: Path,
):
    from mulambda.tools.push import push_version

    push_version(s3, half_plus_two, bucket, MODEL, 1)
    models_dir = tmp_path / "models"
    port = free_port()
    async with TFServingDouble(MODEL, models_dir=models_dir, load_delay=0.1) as double:
        env = {**os.environ, **seaweedfs.env(),
               **companion_env(redis_url, models_dir, double.url, MULAMBDA_HTTP_PORT=str(port),
                               MULAMBDA_MODEL_URI=f"s3://{bucket}/{MODEL}")}
        # A real process of the real command, so SIGTERM goes through the real handler.
        proc = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "mulambda", "companion"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            # Not the repo root: there `mulambda/` would shadow the installed package.
            cwd=tmp_path,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

                async def ready() -> bool:
                    assert proc.poll() is None, proc.stdout.read().decode()
                    try:
                        return (await http.get("/readyz")).status_code == 200
                    except httpx.HTTPError:
                        return False

                await eventually(ready, within=30, what="companion ready")
                loaded = models_dir / MODEL / "1" / "saved_model.pb"
                assert loaded.read_bytes() == (half_plus_two / "saved_model.pb").read_bytes()
                predict = await http.post(f"{double.url}/v1/models/{MODEL}:predict",
                                          json={"instances": [1.0, 2.0, 5.0]})
                assert predict.json() == {"predictions": [2.5, 3.0, 4.5]}
                rec = await replica(store)
                assert (rec.state, rec.version, rec.pod) == ("Available", 1, POD)

            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(proc.communicate, timeout=10)
            assert proc.returncode == 0, out.decode()
            assert await replica(store) is None, "heartbeat not removed on SIGTERM"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- configuration ----------------------------------------------------------------------------


def test_config_reads_the_environment_the_operator_builds():
    """Contract with the operator's companion_env: every value the pod gets is understood."""
    from mulambda.api.modelexecutor import parse_executor_spec
    from mulambda.operator.modelexecutor import build as builders
    from mulambda.settings import Settings

    spec = parse_executor_spec({
        "model": {"name": "half-plus-two", "storageUri": "s3://models/half_plus_two",
                  "version": 3},
        "traits": {"type": "regression", "input": "i", "output": "o"},
    })
    settings = Settings(heartbeat_ttl_seconds=45, probe_interval_seconds=20)
    downward = {"metadata.name": "hp2-7d9f-x2", "metadata.namespace": "ml",
                "status.podIP": "10.0.0.7"}
    env: dict[str, str] = {}
    for var in builders.companion_env("hp2", "ml", spec, settings):
        source = var.get("valueFrom", {})
        if "fieldRef" in source:
            env[var["name"]] = downward[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            env[var["name"]] = "from-secret"
        else:
            env[var["name"]] = var["value"]

    c = CompanionSettings.from_env(env)
    assert (c.executor_id, c.pod_name, c.pod_ip) == ("ml/hp2", "hp2-7d9f-x2", "10.0.0.7")
    assert (c.bucket, c.prefix, c.model_name, c.version) == (
        "models", "half_plus_two", "half-plus-two", 3)
    assert (c.models_dir, c.serving_rest_url, c.http_port) == (
        "/models", "http://127.0.0.1:8501", 8080)
    assert (c.heartbeat_ttl, c.heartbeat_interval, c.probe_interval, c.latency_ttl) == (
        45.0, 15.0, 20.0, 60.0)


def test_config_rejects_incomplete_or_malformed_environment():
    from mulambda.settings import SettingsError

    base = {"MULAMBDA_EXECUTOR": "ml/hp2", "MULAMBDA_MODEL_URI": "s3://models/hpt"}
    assert CompanionSettings.from_env(base).version is None  # unset version: newest
    for bad, needle in (
        ({"MULAMBDA_EXECUTOR": ""}, "MULAMBDA_EXECUTOR"),
        ({"MULAMBDA_MODEL_URI": "http://x/y"}, "MULAMBDA_MODEL_URI"),
        ({"MULAMBDA_MODEL_VERSION": "latest"}, "MULAMBDA_MODEL_VERSION"),
        ({"MULAMBDA_PROBE_TIMEOUT_SECONDS": "soon"}, "MULAMBDA_PROBE_TIMEOUT_SECONDS"),
        ({"MULAMBDA_LATENCY_ALPHA": "0"}, "MULAMBDA_LATENCY_ALPHA"),
    ):
        with pytest.raises(SettingsError, match=needle):
            CompanionSettings.from_env({**base, **bad})


async def test_pinned_version_ignores_newer_versions_in_storage(
    start_companion, store: MetadataStore, models_dir: Path
):
    # A pinned version changes only with the pod template (the Deployment rolls).
    double = await TFServingDouble(MODEL, models_dir=models_dir, load_delay=0.05).start()
    source = FakeSource(models_dir, [1])
    r = await start_companion(source, double, MULAMBDA_MODEL_VERSION="1")
    await eventually(lambda: _version_is(store, 1), what="v1 served")
    source.versions.append(2)
    await asyncio.sleep(0.5)  # five version-watch rounds
    assert source.loads == [1] and (await replica(store)).version == 1
    assert await finish(r) == 0


@pytest.mark.integration
@pytest.mark.parametrize("pinned", ["", "1"], ids=["newest", "pinned"])
async def test_a_companion_started_while_s3_is_down_serves_its_verified_copy(
    pinned: str, s3, bucket: str, half_plus_two: Path, start_companion,
    store: MetadataStore, redis_url: str, models_dir: Path,
):
    # The companion container restarted (OOM, liveness) while S3 is down, and the pod's
    # volume holds version 1 verified: it serves it, not "StorageUnavailable" until S3
    # comes back.
    from mulambda.storage.s3 import ModelStorage
    from mulambda.tools.push import push_version

    push_version(s3, half_plus_two, bucket, MODEL, 1)
    loader.load_model_version(s3, bucket, MODEL, 1, models_dir, MODEL)
    double = await TFServingDouble(MODEL, models_dir=models_dir).start()
    env = {"MULAMBDA_MODEL_URI": f"s3://{bucket}/{MODEL}", "MULAMBDA_MODEL_VERSION": pinned}
    config = CompanionSettings.from_env(companion_env(redis_url, models_dir, double.url, **env))
    down = ModelStorage(f"127.0.0.1:{free_port()}", "key", "secret", connect_timeout=0.2)
    r = await start_companion(S3ModelSource(down, config), double, **env)
    rec = await eventually(lambda: _replica_in_state(store, "Available"), within=20,
                           what="Available from the copy on disk")
    assert rec.version == 1
    assert (await r.get("/readyz")).status_code == 200
    assert await finish(r) == 0


@pytest.mark.integration
async def test_without_a_copy_on_disk_an_s3_outage_still_says_so(
    start_companion, store: MetadataStore, redis_url: str, models_dir: Path,
):
    from mulambda.storage.s3 import ModelStorage

    double = await TFServingDouble(MODEL, models_dir=models_dir).start()
    env = {"MULAMBDA_MODEL_URI": f"s3://models/{MODEL}"}
    config = CompanionSettings.from_env(companion_env(redis_url, models_dir, double.url, **env))
    down = ModelStorage(f"127.0.0.1:{free_port()}", "key", "secret", connect_timeout=0.2)
    r = await start_companion(S3ModelSource(down, config), double, **env)
    rec = await eventually(lambda: _reason_is(store, "StorageUnavailable"), within=20,
                           what="StorageUnavailable")
    assert rec.state == "Loading"
    assert (await r.get("/readyz")).status_code == 503
    assert await finish(r) == 0


async def _reason_is(store: MetadataStore, reason: str) -> ReplicaRecord | None:
    rec = await replica(store)
    return rec if rec is not None and rec.reason == reason else None
