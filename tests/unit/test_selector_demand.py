"""The selector's demand queue: coalesced, retried, never dropped without being counted;
and the settings of its store pool."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mulambda.selector.caches import DemandQueue
from mulambda.settings import SELECTOR_SETTINGS_DOC, SelectorSettings, SettingsError
from mulambda.store.connection import DEFAULT_POOL_SIZE, DEFAULT_POOL_TIMEOUT_SECONDS
from mulambda.store.records import StoreUnavailable


class FlakyStore:
    """Fails the first ``failures`` writes, then records each batch written."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[dict[tuple[int, str], int]] = []

    async def add_demand(self, demand: dict[tuple[int, str], int]) -> None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("metadata store unreachable: test")
        self.batches.append(dict(demand))


def metric(registry: CollectorRegistry, line: str) -> bool:
    return line in generate_latest(registry).decode().splitlines()


async def test_demand_is_coalesced_into_one_write():
    store, registry = FlakyStore(), CollectorRegistry()
    queue = DemandQueue(store, registry, interval=0.05)  # type: ignore[arg-type]
    for _ in range(500):
        queue.add(["ml/a", "ml/b"])
    for _ in range(100):
        if store.batches:
            break
        await asyncio.sleep(0.02)
    assert len(store.batches) == 1
    assert sorted((e, n) for (_, e), n in store.batches[0].items()) == [
        ("ml/a", 500), ("ml/b", 500)]
    assert metric(registry, "mulambda_selector_demand_written_total 1000.0")
    await queue.close()


async def test_a_failed_write_is_kept_and_retried_not_dropped():
    store, registry = FlakyStore(failures=2), CollectorRegistry()
    queue = DemandQueue(store, registry, interval=0.02)  # type: ignore[arg-type]
    queue.add(["ml/a"] * 3)
    for _ in range(200):
        if store.batches:
            break
        await asyncio.sleep(0.02)
    assert [sum(b.values()) for b in store.batches] == [3]
    assert metric(registry, 'mulambda_selector_demand_flushes_total{outcome="failed"} 2.0')
    assert not [line for line in generate_latest(registry).decode().splitlines()
                if line.startswith("mulambda_selector_demand_dropped_total{")]
    await queue.close()


async def test_what_cannot_be_kept_or_written_is_counted_as_dropped():
    store, registry = FlakyStore(failures=1000), CollectorRegistry()
    queue = DemandQueue(store, registry, interval=60, max_pending=2)  # type: ignore[arg-type]
    queue.add(["ml/a", "ml/b", "ml/c", "ml/a"])  # c does not fit
    assert metric(registry, 'mulambda_selector_demand_dropped_total{reason="queue_full"} 1.0')
    await queue.close(seconds=0.2)  # the store is down: a, a and b never written
    assert metric(registry, 'mulambda_selector_demand_dropped_total{reason="shutdown"} 3.0')


def test_selector_settings_default_to_the_store_pool_defaults():
    settings = SelectorSettings.from_env({})
    assert settings.redis_pool_size == DEFAULT_POOL_SIZE
    assert settings.redis_pool_timeout == DEFAULT_POOL_TIMEOUT_SECONDS
    assert SELECTOR_SETTINGS_DOC["REDIS_POOL_SIZE"][0] == str(DEFAULT_POOL_SIZE)
    assert float(SELECTOR_SETTINGS_DOC["REDIS_POOL_TIMEOUT_SECONDS"][0]) == \
        DEFAULT_POOL_TIMEOUT_SECONDS
    custom = SelectorSettings.from_env({"MULAMBDA_REDIS_POOL_SIZE": "200",
                                        "MULAMBDA_REDIS_POOL_TIMEOUT_SECONDS": "0.5"})
    assert (custom.redis_pool_size, custom.redis_pool_timeout) == (200, 0.5)


@pytest.mark.parametrize("env", [{"MULAMBDA_REDIS_POOL_SIZE": "0"},
                                 {"MULAMBDA_REDIS_POOL_TIMEOUT_SECONDS": "-1"},
                                 {"MULAMBDA_REDIS_POOL_SIZE": "many"}])
def test_bad_pool_settings_name_the_variable(env: dict[str, Any]):
    with pytest.raises(SettingsError, match=next(iter(env))):
        SelectorSettings.from_env(env)
