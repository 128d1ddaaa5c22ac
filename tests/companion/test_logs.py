"""Quiet logs: no INFO line per poll while waiting, repeated warnings counted, not repeated."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mulambda.companion.heartbeat import Heartbeat
from mulambda.companion.logs import CHATTY_LOGGERS, RepeatFilter, configure_logging
from mulambda.companion.server import Metrics, ModelState
from mulambda.companion.serving import ServingClient
from mulambda.store.metadata import MetadataStore

from support.procs import RedisServer
from support.tfserving_double import TFServingDouble


class Lines(logging.Handler):
    """Collects the lines a process would print (records that passed the handler's filters)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def lines() -> Iterator[Lines]:
    """Root logging as ``mulambda companion`` sets it up, printing into a list; restored after."""
    root = logging.getLogger()
    saved = root.level, {n: logging.getLogger(n).level for n in CHATTY_LOGGERS}
    filters = {h: list(h.filters) for h in root.handlers}
    handler = Lines()
    root.addHandler(handler)
    try:
        configure_logging("INFO", window=60.0)
        yield handler
    finally:
        root.removeHandler(handler)
        # configure_logging filtered every root handler, pytest's capture among them:
        # later tests' log assertions must not inherit its 60 s window.
        for h, kept in filters.items():
            h.filters[:] = kept
        root.setLevel(saved[0])
        for name, level in saved[1].items():
            logging.getLogger(name).setLevel(level)


def test_identical_warnings_pass_once_per_window_with_a_count():
    now = [0.0]
    f = RepeatFilter(window=60, clock=lambda: now[0])

    def warn(msg: str, *args: object, name: str = "x") -> bool:
        return f.filter(logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None))

    assert warn("store down error=%s", "refused")
    for second in range(1, 60):  # the same warning with a different error text is a repeat
        now[0] = second
        assert not warn("store down error=%s", f"timeout {second}")
    assert warn("other thing")  # a different warning is not held back
    assert warn("store down error=%s", "x", name="y")  # nor the same text from another logger
    now[0] = 61.0
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "store down error=%s",
                               ("refused",), None)
    assert f.filter(record)
    assert record.getMessage() == "store down error=refused [59 more like this in 61s]"
    info = logging.LogRecord("x", logging.INFO, __file__, 1, "state", (), None)
    assert f.filter(info) and f.filter(info)  # below WARNING: never limited


async def test_a_store_outage_gives_one_warning_not_one_per_attempt(lines: Lines):
    server = RedisServer()
    server.start()
    store = MetadataStore.from_url(server.url, prefix="test", timeout=0.2)
    hb = Heartbeat(store, ModelState(), executor="ml/a", pod="a-1", ip="", ttl=5,
                   interval=0.02, metrics=Metrics())
    stop = asyncio.Event()
    task = asyncio.create_task(hb.run(stop))
    try:
        await asyncio.sleep(0.2)
        server.stop()
        await asyncio.sleep(2.0)  # ~100 failed heartbeats at this interval
        server.start()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await store.close()
        server.stop()
    assert hb.metrics is not None
    errors = hb.metrics.registry.get_sample_value("mulambda_companion_heartbeat_errors_total")
    assert errors is not None and errors >= 20  # every failure is still counted
    warnings = lines.at(logging.WARNING)
    assert 1 <= len(warnings) <= 2, warnings
    assert any("heartbeat written again" in m for m in lines.at(logging.INFO))


async def test_waiting_for_tf_serving_logs_no_line_per_poll(lines: Lines, tmp_path: Path):
    double = await TFServingDouble("m", models_dir=tmp_path, hold=True).start()
    serving = ServingClient(double.url)
    try:
        (tmp_path / "m" / "1").mkdir(parents=True)
        (tmp_path / "m" / "1" / "saved_model.pb").write_bytes(b"")
        waiting = asyncio.create_task(serving.wait_available("m", 1, poll=0.02))
        await asyncio.sleep(1.0)  # ~50 polls: 404 first, then LOADING
        double.release(1)
        await asyncio.wait_for(waiting, 5)
    finally:
        await serving.close()
        await double.stop()
    assert lines.at(logging.INFO) == []
