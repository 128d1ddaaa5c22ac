"""A predict body's items and sticky key, decoded inline or, with many containers, in a
child process that is killed when it takes too long (mulambda.selector.inspector)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mulambda.selector.inspector import BodyInspector, BodyTooComplex

BODIES = [
    pytest.param(b'{"instances": [1, 2, 3]}', None, (3, None, True), id="instances"),
    pytest.param(b'{"inputs": {"x": [[1], [2]]}}', None, (2, None, True), id="columnar"),
    pytest.param(b'{"instances": [], "user": "u7"}', "user", (1, "u7", True),
                 id="sticky-field"),
    pytest.param(b'{"instances": [1], "user": 9}', "user", (1, "9", True), id="integer-key"),
    pytest.param(b'{"instances": [1], "user": true}', "user", (1, None, True),
                 id="bool-is-no-key"),
    pytest.param(b"[]", None, (1, None, False), id="not-a-predict-body"),
    pytest.param(b'{"user": "u7"}', "user", (1, "u7", False), id="an-object-without-items"),
]
BAD = [
    pytest.param(b'{"instances": [' + b"[" * 100 + b"]" * 100 + b"]}", "nested deeper than 64",
                 id="deep"),
    pytest.param(b'{"instances": [' + b"9" * 500 + b"]}", "longer than 100 digits", id="long-int"),
    pytest.param(b'{"instances": [1,', "Expecting value", id="truncated"),
    pytest.param(b"\xff\xfe{}", "Expecting value", id="not-utf8"),
]


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "child"])
@pytest.mark.parametrize(("body", "field", "want"), BODIES)
async def test_both_ways_give_the_same_answer(inline, body, field, want):
    inspector = BodyInspector(inline_containers=10**9 if inline else 0)
    assert await inspector.inspect(body, field) == want


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "child"])
@pytest.mark.parametrize(("body", "error"), BAD)
async def test_a_bad_body_is_a_value_error_both_ways(inline, body, error):
    inspector = BodyInspector(inline_containers=10**9 if inline else 0)
    with pytest.raises(ValueError, match=error):
        await inspector.inspect(body)


def _inspecting_children() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"mulambda.bodies" in cmd and entry.name.isdigit() and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


async def test_a_body_too_slow_to_decode_is_refused_and_its_child_killed():
    # 8 MiB of brackets nested 63 deep: seconds of decoding, far past the timeout.
    block = b"[" * 63 + b"]" * 63
    flood = b'{"instances": [' + b",".join([block] * (8 << 20 >> 7)) + b"]}"
    inspector = BodyInspector(timeout=0.3)
    with pytest.raises(BodyTooComplex, match=r"within 0\.3 s"):
        await inspector.inspect(flood)
    assert _inspecting_children() == []


async def test_the_event_loop_goes_on_while_a_large_body_is_decoded():
    block = b"[" * 63 + b"]" * 63
    too_deep = b"[" * 65 + b"]" * 65
    flood = b'{"instances": [' + b",".join([block] * (4 << 20 >> 7) + [too_deep]) + b"]}"
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(ValueError, match="nested deeper"):
            await BodyInspector().inspect(flood)
    finally:
        ticker.cancel()
    # Inline, the loop would not have run once until decoding ended.
    assert ticks > 100


async def test_a_decoder_killed_for_memory_is_a_413_not_a_crash(monkeypatch):
    # What the OOM killer does to a child decoding millions of containers in a container
    # whose memory limit it shares: the child dies by SIGKILL.
    inspector = BodyInspector(inline_containers=0)
    real = asyncio.create_subprocess_exec

    async def killed(*args, **kwargs):
        return await real("/bin/sh", "-c", "kill -9 $$", **kwargs)

    monkeypatch.setattr("mulambda.selector.inspector.asyncio.create_subprocess_exec", killed)
    with pytest.raises(BodyTooComplex, match="decoder was killed"):
        await inspector.inspect(b'{"instances": [[1]]}')
