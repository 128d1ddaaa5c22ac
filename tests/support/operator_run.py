"""Run a kopf operator in a background thread against the real API server, stop it, start it again.

The operator authenticates as the ServiceAccount the Helm chart gives it (a
token from the TokenRequest API, see :mod:`support.identity`), through the
kubeconfig in ``KUBECONFIG``: kopf's production login handler and the
operator's own Kubernetes client both read it, so the chart's RBAC is
enforced by the real server on every request the operator makes.

``kopf.testing.KopfRunner`` (kopf 1.45.2) runs every operator on the one
process-wide registry, so handlers of every module ever imported in the test
session would run together, and a restart could not get a clean slate. Here
each start builds a fresh ``kopf.OperatorRegistry`` holding only the
handlers of the target:

* a module path (``"mulambda.operator.main"``): the handlers it (and its
  package) registered on kopf's default registry, picked by the module their
  function lives in; a module that keeps its own ``registry`` attribute (a
  ``kopf.OperatorRegistry``) gives that registry's handlers instead;
* a callable ``register(registry)`` that adds handlers itself.

If the target registers no login handler, kopf's ``login_via_client`` is
added. The operator runs standalone (no peering objects), watching the given
namespaces (a test's own namespace, so operators of earlier tests' leftovers
never meet), with kopf settings shortened for tests (see
:func:`apply_test_settings`).

Failures surface: a crash of the operator thread is re-raised by
:meth:`OperatorRun.stop` (and by :meth:`OperatorRun.start` if it happens
during start-up); kopf's log records are kept in :attr:`OperatorRun.records`
and still propagate to pytest's log capture; unexpected handler exceptions
(records with a traceback) make :meth:`OperatorRun.stop` raise
:class:`OperatorErrors` unless the run was made with ``allow_errors=True``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import kopf
from kopf._core.intents import causes  # Activity enum: to find login handlers

from support.cluster import Cluster

Target = str | Callable[[kopf.OperatorRegistry], None]

_REGISTRY_PARTS = ("_activities", "_indexing", "_watching", "_spawning", "_changing", "_webhooks")


class OperatorErrors(AssertionError):
    """The operator logged exceptions (with tracebacks) while it ran."""


def apply_test_settings(settings: kopf.OperatorSettings) -> None:
    """Shorten kopf's production timings so a test waits seconds, not minutes.

    Only timings change; what the operator configures about persistence,
    posting or scanning is left as the operator set it.
    """
    settings.networking.connect_timeout = 2
    settings.networking.request_timeout = 15
    settings.networking.error_backoffs = [0.2, 0.5, 1]
    # Handlers failing with an arbitrary exception retry after this (default 60 s).
    settings.execution.default_backoff = 1.0
    settings.queueing.exit_timeout = 1.0
    settings.watching.reconnect_backoff = 0.1
    settings.persistence.consistency_timeout = 2.0
    settings.background.cancellation_polling = 0.5
    settings.process.ultimate_exiting_timeout = 5.0


def load_handler_module(target: str) -> ModuleType:
    """Import a module by dotted name."""
    return importlib.import_module(target)


def _fn_module(fn: Any) -> str:
    while not hasattr(fn, "__module__") and hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return getattr(fn, "__module__", "") or ""


def _within(module_name: str, prefixes: Iterable[str]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def registry_for(target: Target, prefixes: Iterable[str] | None = None) -> kopf.OperatorRegistry:
    """A fresh registry with only the target's handlers (see the module docstring)."""
    fresh = kopf.OperatorRegistry()
    if callable(target):
        target(fresh)
        return fresh
    module = load_handler_module(target)
    own = getattr(module, "registry", None)
    if isinstance(own, kopf.OperatorRegistry):
        source, wanted = own, None
    else:
        source = kopf.get_default_registry()
        if prefixes is None:
            # The module and its siblings: mulambda.operator.main -> mulambda.operator.*
            parent = module.__name__.rpartition(".")[0]
            prefixes = [module.__name__] + ([parent] if parent else [])
        wanted = list(prefixes)
    for part in _REGISTRY_PARTS:
        picked: dict[Any, Any] = {}
        for handler in getattr(source, part).get_all_handlers():
            if wanted is None or _within(_fn_module(handler.fn), wanted):
                picked[handler.id] = handler  # a re-imported module: the newest wins
        for handler in picked.values():
            getattr(fresh, part).append(handler)
    return fresh


def _has_login(registry: kopf.OperatorRegistry) -> bool:
    return any(
        h.activity == causes.Activity.AUTHENTICATION
        for h in registry._activities.get_all_handlers()
    )


class _RecordKeeper(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(level=logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class OperatorRun:
    """One operator, startable and stoppable any number of times (a restart is stop + start).

    Each start gets a fresh registry, fresh settings and (unless ``memo`` is
    given) a fresh memo, like a new operator process would.
    """

    def __init__(
        self,
        cluster: Cluster,
        user: str,
        target: Target,
        *,
        prefixes: Iterable[str] | None = None,
        configure: Callable[[kopf.OperatorSettings], None] | None = None,
        memo: kopf.Memo | None = None,
        namespaces: Iterable[str] = (),
        allow_errors: bool = False,
        startup_timeout: float = 15.0,
        stop_timeout: float = 30.0,
        log_level: int = logging.DEBUG,
    ) -> None:
        self.cluster = cluster
        self.user = user
        self.target = target
        self.prefixes = list(prefixes) if prefixes is not None else None
        self.configure = configure
        self.memo = memo
        self.namespaces = list(namespaces)
        self.allow_errors = allow_errors
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        self.records: list[logging.LogRecord] = []
        self.starts = 0
        self._thread: threading.Thread | None = None
        self._stop_flag: threading.Event | None = None
        self._crash: BaseException | None = None
        self._log_handler: _RecordKeeper | None = None
        self._saved_level: int | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, *, wait_watching: bool = True) -> OperatorRun:
        """Start the operator; return once its startup handlers ran and it watches the API."""
        if self.running:
            raise RuntimeError("the operator is already running; stop() it first")
        registry = registry_for(self.target, self.prefixes)
        if not _has_login(registry):
            kopf.on.login(registry=registry)(kopf.login_via_client)
        # Registered last so that it runs after the target's own startup handlers.
        kopf.on.startup(registry=registry)(self._tune_settings)
        settings = kopf.OperatorSettings()
        apply_test_settings(settings)

        self._attach_logging()
        self._crash = None
        self._stop_flag = threading.Event()
        ready_flag = threading.Event()
        memo = self.memo if self.memo is not None else kopf.Memo()
        mark = self.cluster.audit_mark()
        self.starts += 1

        def target() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(
                    kopf.operator(
                        registry=registry,
                        settings=settings,
                        clusterwide=not self.namespaces,
                        namespaces=self.namespaces,
                        standalone=True,
                        stop_flag=self._stop_flag,
                        ready_flag=ready_flag,
                        memo=memo,
                    )
                )
            except BaseException as exc:  # re-raised in the test thread by start()/stop()
                self._crash = exc
                logging.getLogger("kopf").exception("the operator thread crashed")
            finally:
                close_loop(loop)

        self._thread = threading.Thread(
            target=target, name=f"kopf-operator-{self.starts}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not ready_flag.is_set():
            if not self._thread.is_alive():
                self._detach_logging()
                raise RuntimeError("the operator exited during start-up") from self._crash
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the operator was not ready in {self.startup_timeout}s")
            time.sleep(0.01)
        if wait_watching:
            # Ready means the startup handlers ran; the watch-streams open right after.
            while not any(
                e.verb == "watch" and e.group == "mulambda.io"
                for e in self.cluster.audit(self.user, since=mark)
            ):
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError("the operator opened no watch-stream")
                time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop the operator; raise its crash, or OperatorErrors for logged exceptions."""
        if self._thread is None:
            return
        assert self._stop_flag is not None
        self._stop_flag.set()
        self._thread.join(self.stop_timeout)
        alive = self._thread.is_alive()
        self._thread = None
        self._detach_logging()
        if alive:
            raise RuntimeError(f"the operator did not stop within {self.stop_timeout}s")
        if self._crash is not None:
            raise RuntimeError("the operator thread crashed") from self._crash
        if not self.allow_errors and self.errors:
            raise OperatorErrors(self.format_errors())

    def restart(self) -> OperatorRun:
        """Stop and start again: a new registry, settings and memo, as a new process would have."""
        self.stop()
        return self.start()

    def __enter__(self) -> OperatorRun:
        return self if self.running else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- logs ------------------------------------------------------------------------------------

    @property
    def errors(self) -> list[logging.LogRecord]:
        """Unexpected exceptions: kopf records at ERROR or above that carry a traceback.

        kopf logs a handler's arbitrary exception this way, but not TemporaryError
        or PermanentError (deliberate outcomes). The operator's own loggers are
        kept in :attr:`records` without counting here: it may log tracebacks of
        failures it handles.
        """
        return [
            r
            for r in self.records
            if r.name.startswith("kopf") and r.levelno >= logging.ERROR and r.exc_info
        ]

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        """Formatted messages of the kept records at ``level`` or above."""
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def format_errors(self) -> str:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "the operator logged exceptions:\n" + "\n".join(
            formatter.format(r) for r in self.errors
        )

    def _attach_logging(self) -> None:
        if self._log_handler is not None:
            return
        self._log_handler = _RecordKeeper(self.records)
        kopf_logger = logging.getLogger("kopf")
        self._saved_level = kopf_logger.level
        kopf_logger.setLevel(self.log_level)
        # The operator's own loggers too (the project's, and the target's top package).
        for name in self._logger_names():
            logging.getLogger(name).addHandler(self._log_handler)

    def _detach_logging(self) -> None:
        if self._log_handler is None:
            return
        for name in self._logger_names():
            logging.getLogger(name).removeHandler(self._log_handler)
        if self._saved_level is not None:
            logging.getLogger("kopf").setLevel(self._saved_level)
        self._log_handler = None

    def _logger_names(self) -> list[str]:
        names = ["kopf", "mulambda"]
        if isinstance(self.target, str):
            names.append(self.target.split(".")[0])
        return sorted(set(names))

    # --- handlers added to every run -------------------------------------------------------------

    def _tune_settings(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        apply_test_settings(settings)
        if self.configure is not None:
            self.configure(settings)


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left (connections still closing), then close the loop without warnings."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()
