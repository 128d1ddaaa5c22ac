"""The executors' watch cache the fleet loops read (operator/modelexecutor/handlers.py)."""

from __future__ import annotations

from typing import Any

import pytest

from mulambda.operator.modelexecutor.fleet import first
from mulambda.operator.modelexecutor.handlers import ExecutorCache, remember

KEY = ("ml", "hp2")


def body(generation: int) -> dict[str, Any]:
    return {"metadata": {"name": "hp2", "namespace": "ml", "generation": generation}}


@pytest.mark.parametrize(("events", "held"), [
    pytest.param([(None, 1)], 1, id="listed"),
    pytest.param([("ADDED", 1)], 1, id="added"),
    pytest.param([(None, 1), ("MODIFIED", 2)], 2, id="modified-replaces"),
    pytest.param([("ADDED", 1), ("DELETED", 1)], None, id="deleted-forgets"),
    pytest.param([("DELETED", 1)], None, id="deleted-unknown"),
    pytest.param([("ADDED", 1), ("DELETED", 1), ("ADDED", 3)], 3, id="recreated"),
])
def test_the_cache_holds_the_latest_event_of_each_executor(
    events: list[tuple[str | None, int]], held: int | None
) -> None:
    cache: ExecutorCache = {("ml", "other"): [body(9)]}
    for event_type, generation in events:
        remember(cache, event_type, KEY, body(generation))
    got = first(cache, KEY)
    assert (None if got is None else got["metadata"]["generation"]) == held
    assert first(cache, ("ml", "other"))["metadata"]["generation"] == 9
