"""The operator's shutdown steps are bounded: a stuck one is abandoned and named."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from mulambda.operator import main


async def test_a_stuck_shutdown_step_is_abandoned_and_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(main, "SHUTDOWN_STEP_SECONDS", 0.05)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        await main._bounded_step("store close", asyncio.sleep(60))
    assert time.monotonic() - started < 5
    assert "shutdown step store close took over 0.05s; abandoned" in caplog.text


async def test_a_quick_step_runs_to_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    done = []

    async def step() -> None:
        await asyncio.sleep(0)
        done.append(True)

    await main._bounded_step("fleet tasks", step())
    assert done == [True]
