"""The replica heartbeat against a real redis-server, and shutdown on a real SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

from mulambda.companion import loader
from mulambda.companion.heartbeat import Heartbeat
from mulambda.companion.lifecycle import Companion, serve
from mulambda.companion.server import Metrics, ModelState
from mulambda.settings import CompanionSettings
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ReplicaRecord

from support.procs import free_port

EXECUTOR, POD = "ml/hpt", "hpt-abc12"


def make_heartbeat(store: MetadataStore, state: ModelState, **kw: float) -> Heartbeat:
    args = {"ttl": 2.0, "interval": 0.05, **kw}
    return Heartbeat(store, state, executor=EXECUTOR, pod=POD, ip="10.1.2.3",
                     metrics=Metrics(), **args)


async def current(store: MetadataStore) -> ReplicaRecord | None:
    """This pod's heartbeat as stored, expired or not (None once deleted)."""
    raw = await store.redis.hget(store.replicas_key, f"{EXECUTOR}|{POD}")
    return None if raw is None else ReplicaRecord(**json.loads(raw))


async def run_for(hb: Heartbeat, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(hb.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 1.0)


async def test_heartbeat_carries_a_ttl_and_is_renewed(store: MetadataStore):
    state = ModelState()
    state.set("Available", "", "", ready=True, version=4)
    hb = make_heartbeat(store, state, ttl=2.0, interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(hb.run(stop))
    # Poll rather than sleep a fixed time: a loaded CI machine may be slow to
    # schedule the first write, and what matters is that a renewal follows it.
    first = await _eventually(lambda: current(store))
    second = await _eventually(
        lambda: _renewed_after(store, first.heartbeat_at))  # type: ignore[union-attr]
    stop.set()
    await asyncio.wait_for(task, 5.0)

    assert first is not None and second is not None
    assert (second.state, second.version, second.ip) == ("Available", 4, "10.1.2.3")
    assert second.expires_at - second.heartbeat_at == 2.0
    assert second.heartbeat_at > first.heartbeat_at, "heartbeat was not renewed"


async def test_heartbeat_ages_out_when_not_renewed(store: MetadataStore):
    hb = make_heartbeat(store, ModelState(), ttl=1.0, interval=0.1)
    await run_for(hb, 0.2)  # stopped without remove(): a pod that died
    rec = await current(store)
    assert rec is not None and rec.pod == POD
    # Live until its TTL, gone after it (judged by the record's own clock).
    await asyncio.sleep(max(0.0, rec.expires_at - time.time()) + 0.2)
    assert await store.list_replicas(EXECUTOR) == []


async def _eventually(fetch: Any, within: float = 5.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await fetch()
        if found is not None:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError("not seen in time")


async def _renewed_after(store: MetadataStore, at: float) -> Any:
    rec = await current(store)
    return rec if rec is not None and rec.heartbeat_at > at else None


async def test_state_change_is_published_without_waiting_for_the_interval(store: MetadataStore):
    state = ModelState()
    hb = make_heartbeat(store, state, ttl=60.0, interval=30.0)
    stop = asyncio.Event()
    task = asyncio.create_task(hb.run(stop))
    await asyncio.sleep(0.05)
    assert (await current(store)).state == "Loading"

    state.set("Failed", "AccessDenied", "S3 AccessDenied: models/hpt", ready=False)
    hb.changed()
    started = time.monotonic()
    while (rec := await current(store)).state != "Failed":
        assert time.monotonic() - started < 1.0, "state change not published promptly"
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 1.0)
    assert (rec.reason, rec.message) == ("AccessDenied", "S3 AccessDenied: models/hpt")


async def test_store_outage_is_counted_and_does_not_end_the_loop():
    down = MetadataStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="test",
                                  timeout=0.2)
    hb = make_heartbeat(down, ModelState(), interval=0.05)
    await run_for(hb, 0.3)
    await hb.remove()  # logged, not raised
    await down.close()
    assert hb.metrics.registry.get_sample_value("mulambda_companion_heartbeat_errors_total") >= 1


class MissingModel:
    """A model source whose storage has no model: the companion stays up in state Failed."""

    def resolve(self, version: int | None) -> int:
        raise loader.ModelLoadError("ModelNotFound", "nothing under s3://models/hpt/",
                                    permanent=True)

    def load(self, version: int) -> loader.LoadResult:
        raise AssertionError("not reached")

    def remove_others(self, keep: int) -> None:
        """Nothing was loaded, so nothing to remove."""


async def test_sigterm_removes_the_heartbeat_and_exits_zero(
    store: MetadataStore, redis_url: str, tmp_path
):
    config = CompanionSettings.from_env({
        "MULAMBDA_EXECUTOR": EXECUTOR, "MULAMBDA_MODEL_URI": "s3://models/hpt",
        "MULAMBDA_MODELS_DIR": str(tmp_path), "MULAMBDA_POD_NAME": POD,
        "MULAMBDA_TFSERVING_URL": f"http://127.0.0.1:{free_port()}",
        "MULAMBDA_HTTP_HOST": "127.0.0.1", "MULAMBDA_HTTP_PORT": "0",
        "MULAMBDA_REDIS_URL": redis_url, "MULAMBDA_KEY_PREFIX": "test",
        "MULAMBDA_HEARTBEAT_TTL_SECONDS": "30", "MULAMBDA_HEARTBEAT_INTERVAL_SECONDS": "0.05",
        "MULAMBDA_FAILED_RETRY_SECONDS": "60",
    })
    started: list[Companion] = []
    task = asyncio.create_task(
        serve(config, store=store, source=MissingModel(), install_signal_handlers=True,
              started=started.append)
    )
    deadline = time.monotonic() + 5
    while (rec := await current(store)) is None or rec.state != "Failed":
        assert time.monotonic() < deadline, "no Failed heartbeat"
        await asyncio.sleep(0.02)
    assert rec.expires_at - rec.heartbeat_at == 30.0

    os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the companion's handler
    assert await asyncio.wait_for(task, 5) == 0
    assert await current(store) is None, "heartbeat left behind after SIGTERM"
    # The handler is gone again: the default SIGTERM disposition is restored for pytest.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
