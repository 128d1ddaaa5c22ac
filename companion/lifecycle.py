"""The companion's lifecycle: load the model, report on it, stop cleanly.

One pod, one executor::

    resolve version -> download into MODELS_DIR/NAME/VERSION (atomic rename)
      -> wait until TF Serving reports the version AVAILABLE -> /readyz 200
      -> delete the other version folders
      -> heartbeat + client probing + version watch + task worker ... until SIGTERM
      -> the worker drains (running tasks finish or go back to the queue)
      -> delete the heartbeat, exit 0

TF Serving is started with ``--model_base_path=MODELS_DIR/NAME`` and polls
that folder; the companion never talks to it except to read model status.

* Transient load errors (S3 unreachable, 5xx) are retried with exponential
  back-off capped at ``MULAMBDA_RETRY_MAX_DELAY_SECONDS``; the heartbeat says
  Loading with the reason. Permanent ones (model missing, access denied, not
  a SavedModel) publish state Failed with the CamelCase reason; /healthz stays
  200 (a restart would not fix it) and /readyz 503 with the reason. The load
  is re-attempted every ``MULAMBDA_FAILED_RETRY_SECONDS`` because an
  administrator may upload the missing model later.
* Which version: ``MULAMBDA_MODEL_VERSION`` from the pod template. A new
  pinned version in the ModelExecutor changes the template, so the
  Deployment rolls (surge, ``maxUnavailable: 0``): new pods load it while
  old pods keep serving theirs untouched. Only an unpinned executor follows
  storage in place: every ``MULAMBDA_VERSION_WATCH_SECONDS`` the newest
  version in storage is compared with the served one, the new version is
  loaded next to the old one, and the old folder is deleted only once TF
  Serving reports the new one AVAILABLE, so readiness stays 200 throughout.
  TF Serving's default version policy serves only the highest version, so
  if the newest version disappears from storage the *rollback* cannot
  overlap: the higher folder is removed first and readiness drops until
  the lower version is AVAILABLE.
* While serving, TF Serving's status is re-read every
  ``MULAMBDA_SERVING_POLL_SECONDS``; if the version stops being AVAILABLE
  (TF Serving restarted), readiness drops to 503 until it is back.
* Client probing and the heartbeat start at once, not after the load: the
  network latency from this pod does not depend on the model, and the
  operator wants to see a Loading replica.
* The synchronous loader runs in a daemon thread rather than the default
  executor, and the command (``main.run``) exits hard if the loader's own
  download threads are still busy after shutdown: on SIGTERM the process
  must exit within the grace period, not wait for a multi-gigabyte
  download. The atomic rename means an abandoned download never shows TF
  Serving a partial version, and the loader's journal resumes it on the
  next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mulambda.settings import CompanionSettings
from mulambda.store.heartbeats import Signer
from mulambda.store.metadata import MetadataStore
from mulambda.tasks.queue import TaskQueue

from .backoff import Backoff
from .heartbeat import Heartbeat
from .prober import Prober
from .server import CompanionServer, Metrics, ModelState
from .serving import AVAILABLE, ServingClient, ServingLoadFailed, ServingUnavailable
from .worker import Worker

log = logging.getLogger("mulambda.companion")

T = TypeVar("T")


class LoadedVersion(Protocol):
    """What a load reports (the loader's ``LoadResult``)."""

    version: int
    bytes: int
    files: int
    seconds: float
    downloaded: bool


class ModelSource(Protocol):
    """Where model versions come from; synchronous, run off the event loop."""

    def resolve(self, version: int | None) -> int: ...
    def load(self, version: int) -> LoadedVersion: ...
    def remove_others(self, keep: int) -> None: ...


class S3ModelSource:
    """Model versions in S3, loaded with :mod:`mulambda.companion.loader`."""

    def __init__(self, storage: Any, config: CompanionSettings) -> None:
        from . import loader  # pulls in minio, which sources other than S3 never need

        self._loader = loader
        self.storage = storage
        self.config = config
        # The last resolve found the store down and fell back to the copy on disk: the load
        # that follows tries the store once, not through a full retry, before serving it.
        self._store_down = False

    @classmethod
    def from_config(cls, config: CompanionSettings) -> S3ModelSource:
        from mulambda.storage.s3 import ModelStorage

        return cls(ModelStorage.from_env(max_connections=max(16, config.load_workers * 2)), config)

    def resolve(self, version: int | None) -> int:
        c = self.config
        try:
            found = int(self._loader.resolve_version(self.storage, c.bucket, c.prefix, version))
        except self._loader.ModelLoadError as err:
            if err.permanent:
                raise
            # The store is down, but this volume holds a verified copy (the companion
            # restarted: OOM, a liveness failure): serve it rather than stay unready until
            # the store is back; the next watch looks for a newer version again.
            cached = self._loader.cached_version(Path(c.models_dir), c.model_name, version)
            if cached is None:
                raise
            log.warning("storage unavailable, serving the verified copy on disk version=%d "
                        "error=%r", cached, err.message)
            self._store_down = True
            return int(cached)
        self._store_down = False
        return found

    def load(self, version: int) -> LoadedVersion:
        c = self.config
        return self._loader.load_model_version(  # type: ignore[no-any-return]
            self.storage, c.bucket, c.prefix, version, Path(c.models_dir), c.model_name,
            workers=c.load_workers, retries=1 if self._store_down else self._loader.LOAD_RETRIES,
        )

    def remove_others(self, keep: int) -> None:
        self._loader.remove_other_versions(Path(self.config.models_dir), self.config.model_name,
                                           keep)

    def close(self) -> None:
        self.storage.close()


async def in_daemon_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Like :func:`asyncio.to_thread`, but the thread never delays process exit (see module doc)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():  # the awaiting task was cancelled (shutdown)
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            result: Any = fn(*args, **kwargs)
            ok = True
        except BaseException as exc:
            result, ok = exc, False
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=target, name=f"companion-{fn.__name__}", daemon=True).start()
    return await future


def error_reason(exc: BaseException) -> tuple[str, bool, str]:
    """(CamelCase reason, permanent?, message) of a load error.

    The loader's ``ModelLoadError`` carries ``reason`` and ``permanent``;
    anything else (a full disk, a bug) is retried as transient, since
    giving up for good on an unknown error would need a human anyway.
    """
    reason = getattr(exc, "reason", None) or type(exc).__name__
    permanent = bool(getattr(exc, "permanent", False))
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(reason), permanent, str(message)


class Companion:
    """Runs the model lifecycle, heartbeat, prober and HTTP server of one pod."""

    def __init__(
        self,
        config: CompanionSettings,
        store: MetadataStore,
        source: ModelSource,
        serving: ServingClient,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.source = source
        self.serving = serving
        self.metrics = metrics or Metrics()
        self.state = ModelState()
        self.stop_event = asyncio.Event()
        # The version TF Serving is expected to be serving; None while nothing is (yet).
        self._serving_version: int | None = None
        # The version being switched to, while TF Serving loads it next to the old one.
        self._pending_version: int | None = None
        self.heartbeat = Heartbeat(
            store, self.state,
            executor=config.executor_id, pod=config.pod_name, ip=config.pod_ip,
            ttl=config.heartbeat_ttl, interval=config.heartbeat_interval, metrics=self.metrics,
            signer=(Signer.from_file(config.heartbeat_key_file) if config.heartbeat_key_file
                    else None),
        )
        self.prober = Prober(
            store,
            executor=config.executor_id, pod=config.pod_name,
            interval=config.probe_interval, timeout=config.probe_timeout,
            concurrency=config.probe_concurrency, ttl=config.latency_ttl,
            alpha=config.latency_alpha, jitter=config.probe_jitter, metrics=self.metrics,
        )
        self.server = CompanionServer(self.state, self.metrics, config.http_host, config.http_port)
        # Asynchronous tasks for this executor (mulambda.tasks), pulled only while ready.
        self.worker = Worker(
            TaskQueue(store), executor=config.executor_id, consumer=config.pod_name,
            model=config.model_name, serving_url=config.serving_rest_url,
            concurrency=config.worker_concurrency, visibility=config.task_visibility,
            drain=config.task_drain, predict_timeout=config.task_predict_timeout,
            max_result_bytes=config.task_max_result_bytes,
            ready=lambda: self.state.ready, registry=self.metrics.registry,
        ) if config.worker_concurrency > 0 else None

    # -- state ------------------------------------------------------------------
    def request_stop(self) -> None:
        """Begin graceful shutdown (the SIGTERM handler)."""
        if not self.stop_event.is_set():
            log.info("shutdown requested executor=%s pod=%s",
                     self.config.executor_id, self.config.pod_name)
        self.stop_event.set()

    def _set_state(
        self, state: str, reason: str, message: str, *, ready: bool, version: int | None = None
    ) -> None:
        s = self.state
        if (s.state, s.reason, s.message, s.ready) == (state, reason, message, ready) and (
            version is None or version == s.version
        ):
            return
        s.set(state, reason, message, ready=ready, version=version)
        self.metrics.model_ready.set(1 if ready else 0)
        log.info("model state=%s ready=%s version=%s reason=%s message=%r",
                 state, ready, s.version, reason, message)
        self.heartbeat.changed()

    def _report_problem(self, state: str, reason: str, message: str) -> None:
        """Record a load problem without taking down a version that is still being served."""
        if self._serving_version is not None and self.state.ready:
            # An old version still serves: stay Available, but say why the switch is stuck.
            self._set_state("Available", f"VersionSwitch{reason}", message, ready=True)
        else:
            self._set_state(state, reason, message, ready=False)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; True when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), seconds)
        return self.stop_event.is_set()

    # -- model lifecycle ----------------------------------------------------------
    async def _attempt(self, what: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Run a loader call off the loop, retrying transient errors; None on permanent ones."""
        base = self.config.retry_base_delay
        delays = Backoff(base, max(self.config.shared.retry_max_delay_seconds, base))
        while not self.stop_event.is_set():
            try:
                return await in_daemon_thread(fn, *args)
            except Exception as exc:
                reason, permanent, message = error_reason(exc)
                self.metrics.load_errors.labels(reason=reason).inc()
                if permanent:
                    log.error("%s failed permanently reason=%s message=%r", what, reason, message)
                    self._report_problem("Failed", reason, message)
                    return None
                delay = delays.next_delay()
                log.warning("%s failed, retrying reason=%s delay=%.1f message=%r",
                            what, reason, delay, message,
                            exc_info=not hasattr(exc, "permanent"))
                self._report_problem("Loading", reason, f"{message} (retrying in {delay:.0f}s)")
                if await self._sleep(delay):
                    return None
        return None

    async def converge(self, wanted: int | None) -> bool:
        """Make TF Serving serve ``wanted`` (None: newest in storage); False on a lasting error."""
        if wanted is not None and wanted == self._serving_version:
            return True
        version = await self._attempt("resolve version", self.source.resolve, wanted)
        if version is None:
            return False
        if version == self._serving_version:
            if self.state.ready and self.state.reason:  # a failed switch was given up on
                self._set_state("Available", "", "", ready=True)
            return True
        if self._serving_version is None:
            self._set_state("Loading", "Downloading", f"loading version {version}", ready=False)
        else:
            log.info("switching version from=%s to=%s", self._serving_version, version)

        result = await self._attempt(f"load version {version}", self.source.load, version)
        if result is None:
            return False
        labels = {"model": self.config.model_name, "version": str(version)}
        self.metrics.load_duration.labels(**labels).set(result.seconds)
        self.metrics.load_bytes.labels(**labels).set(result.bytes)
        log.info("model version on disk version=%s bytes=%d files=%d seconds=%.3f downloaded=%s",
                 version, result.bytes, result.files, result.seconds, result.downloaded)

        if self._serving_version is not None and version < self._serving_version:
            # Rollback: TF Serving keeps serving the highest folder; take it away first.
            self._serving_version = None
            self._set_state("Loading", "RollingBack", f"rolling back to version {version}",
                            ready=False)
            await in_daemon_thread(self.source.remove_others, version)
        elif self._serving_version is None:
            self._set_state("Loading", "WaitingForServing",
                            f"version {version} on disk, waiting for TF Serving", ready=False)

        self._pending_version = version
        try:
            await self.serving.wait_available(
                self.config.model_name, version, poll=self.config.serving_poll
            )
        except ServingLoadFailed as exc:
            self.metrics.load_errors.labels(reason=exc.reason).inc()
            self._report_problem("Failed", exc.reason, str(exc))
            return False
        finally:
            self._pending_version = None

        self._serving_version = version
        self.metrics.loaded_version.set(version)
        self._set_state("Available", "", "", ready=True, version=version)
        # Only now is it safe to delete the previous version: TF Serving serves the new one.
        try:
            await in_daemon_thread(self.source.remove_others, version)
        except OSError as exc:  # leftover folders waste disk but break nothing
            log.warning("old versions not removed keep=%s error=%s", version, exc)
        return True

    async def manage_model(self) -> None:
        """Converge on the wanted version, then keep watching for a new one until stopped."""
        # The pod template pins the version (a change rolls the Deployment);
        # None follows the newest version in storage.
        wanted = self.config.version
        while not self.stop_event.is_set():
            ok = await self.converge(wanted)
            if await self._sleep(self.config.version_watch if ok else self.config.failed_retry):
                return

    async def watch_serving(self) -> None:
        """Drop readiness while TF Serving stops serving the installed version."""
        name = self.config.model_name
        while not await self._sleep(self.config.serving_poll):
            version, pending = self._serving_version, self._pending_version
            if version is None:
                continue
            # During a switch TF Serving unloads the old version as soon as the new one is
            # AVAILABLE, possibly before converge() notices; either one serving is fine.
            acceptable = {version} if pending is None else {version, pending}
            try:
                statuses = await self.serving.model_status(name)
                serving = {s.version for s in statuses if s.state == AVAILABLE}
                problem = None if serving & acceptable else (
                    f"TF Serving serves no acceptable version of {name} "
                    f"(wanted {sorted(acceptable)}, states "
                    f"{ {s.version: s.state for s in statuses} })"
                )
            except ServingUnavailable as exc:
                problem = str(exc)
            if version != self._serving_version:  # a switch finished meanwhile: stale answer
                continue
            if problem is None and not self.state.ready:
                self._set_state("Available", "", "", ready=True, version=version)
            elif problem is not None and self.state.ready:
                self._set_state("Loading", "ServingUnavailable", problem, ready=False)

    # -- process ------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until :meth:`request_stop`; 0 on a graceful stop, 1 if a loop crashed."""
        c = self.config
        log.info("companion starting executor=%s pod=%s model=%s bucket=%s prefix=%s version=%s",
                 c.executor_id, c.pod_name, c.model_name, c.bucket, c.prefix, c.version)
        await self.server.start()
        tasks: set[asyncio.Task[Any]] = {
            asyncio.create_task(self.heartbeat.run(self.stop_event), name="heartbeat"),
            asyncio.create_task(self.prober.run(self.stop_event), name="prober"),
            asyncio.create_task(self.manage_model(), name="model"),
            asyncio.create_task(self.watch_serving(), name="serving-watch"),
        }
        worker = (asyncio.create_task(self.worker.run(self.stop_event), name="worker")
                  if self.worker is not None else None)
        if worker is not None:
            tasks.add(worker)
        stopping = asyncio.create_task(self.stop_event.wait(), name="stop")
        code = 0
        try:
            done, _ = await asyncio.wait(tasks | {stopping}, return_when=asyncio.FIRST_COMPLETED)
            for crashed in done - {stopping}:
                if not crashed.cancelled() and crashed.exception() is not None:
                    log.error("loop crashed task=%s", crashed.get_name(),
                              exc_info=crashed.exception())
                    code = 1
        finally:
            self.stop_event.set()
            self.state.ready = False
            self.metrics.model_ready.set(0)
            if worker is not None:
                # Running tasks finish or go back to the queue before anything closes.
                await asyncio.wait({worker}, timeout=self.config.task_drain + 5)
            for task in (*tasks, stopping):
                task.cancel()
            await asyncio.gather(*tasks, stopping, return_exceptions=True)
            # After the heartbeat task has ended, so no late renewal re-creates the record.
            await self.heartbeat.remove()
            await self.server.stop()
            await self.prober.close()
        log.info("companion stopped code=%d", code)
        return code


async def serve(
    config: CompanionSettings,
    *,
    store: MetadataStore | None = None,
    source: ModelSource | None = None,
    install_signal_handlers: bool = True,
    started: Callable[[Companion], None] | None = None,
) -> int:
    """Build the companion's clients, run it, close everything; the process's exit code."""
    own_store = store is None
    store = store or MetadataStore.from_url(config.shared.redis_url, config.shared.key_prefix)
    source = source or S3ModelSource.from_config(config)
    serving = ServingClient(config.serving_rest_url)
    companion = Companion(config, store, source, serving)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if install_signal_handlers else ()
    for sig in signals:
        loop.add_signal_handler(sig, companion.request_stop)
    try:
        if started is not None:
            started(companion)
        return await companion.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await serving.close()
        if own_store:
            await store.close()
        close = getattr(source, "close", None)
        if close is not None:
            close()
