"""The metrics the Grafana dashboard needs and the code did not export before: each is
exported by the component that knows the fact, with bounded label values."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import REGISTRY, generate_latest

from mulambda.api.modelexecutor import parse_executor_spec
from mulambda.companion.prober import Prober
from mulambda.companion.server import Metrics
from mulambda.operator.k8s.objects import ObjectRef
from mulambda.operator.main import prune_forever
from mulambda.operator.modelexecutor.autoscale import Windows, plan
from mulambda.policy.ranking import Candidate, Ranking
from mulambda.policy.selection import DEFAULT_POLICY, Criteria, rank
from mulambda.selector.decisions import (
    DECISION_REASONS,
    REJECTION_REASONS,
    decision_reason,
    rejection_kind,
    rejections,
)
from mulambda.selector.service import Selector
from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import ClientRecord, ExecutorRecord, ReplicaRecord, Snapshot

from support.procs import free_port

CRITERIA = Criteria(type="vision")


def record(name: str, **kw: Any) -> ExecutorRecord:
    fields: dict[str, Any] = dict(namespace="ml", name=name, model=name, version=1,
                                  type="vision", input="image", output="label", accuracy=0.9,
                                  rest=f"http://{name}.ml:8501", grpc="", state="Ready")
    fields.update(kw)
    return ExecutorRecord(**fields)


def cand(name: str, score: float, *, warm: bool = True, over: bool = False) -> Candidate:
    return Candidate(executor_id=f"ml/{name}", score=score, expected_latency_ms=10.0,
                     accuracy=0.9, warm=warm, record=record(name), over_ceiling=over)


def ranking(*cands: Candidate, rejected: dict[str, str] | None = None) -> Ranking:
    return Ranking(list(cands), rejected or {}, [], CRITERIA)


A, B = cand("a", 0.8), cand("b", 0.79)
COLD_BEST = cand("c", 0.9, warm=False)
OVER_HIGH = cand("o", 0.95, over=True)


@pytest.mark.parametrize("ranked, chosen, failover, reason", [
    (ranking(A), A, False, "only_match"),
    (ranking(A, B), A, False, "best_score"),
    (ranking(B, A), B, False, "near_equal"),  # spread put the lower one first
    (ranking(COLD_BEST, A), A, False, "warm_instead_of_cold"),
    (ranking(COLD_BEST, A), COLD_BEST, False, "cold_start"),
    (ranking(cand("x", 0.3, over=True), cand("y", 0.2, over=True)),
     cand("x", 0.3, over=True), False, "over_ceiling"),
    # within the ceiling beats a higher score over it: the winner on its merits
    (ranking(A, OVER_HIGH), A, False, "best_score"),
    (ranking(A, B), B, True, "failover"),
    (ranking(COLD_BEST), COLD_BEST, True, "failover"),
])
def test_decision_reason(ranked: Ranking, chosen: Candidate, failover: bool,
                         reason: str) -> None:
    assert decision_reason(ranked, chosen, failover=failover) == reason
    assert reason in DECISION_REASONS


@pytest.mark.parametrize("text, kind", [
    ("wrong type: has 'audio'", "wrong_type"),
    ("wrong input: has 'text'", "wrong_input"),
    ("wrong output: has 'box'", "wrong_output"),
    ("invalid record: accuracy is not within [0, 1]", "invalid_record"),
    ("not serving: state Failed", "not_serving"),
    ("below min accuracy: 0.5 < 0.9", "below_min_accuracy"),
    ("over max latency: expected 120.0 ms > 100 ms", "over_max_latency"),
    ("invalid measurement: expected latency is not finite", "invalid_measurement"),
    ("something new: a reason added later", "other"),
    ("", "other"),
])
def test_rejection_kind(text: str, kind: str) -> None:
    assert rejection_kind(text) == kind


def test_rejections_of_a_real_ranking_are_named_by_their_criterion() -> None:
    now = time.time()
    def live(name: str) -> list[ReplicaRecord]:
        return [ReplicaRecord(executor=f"ml/{name}", pod=f"{name}-0", state="Available",
                              expires_at=now + 60)]

    snap = Snapshot(
        executors={"ml/ok": record("ok"), "ml/audio": record("audio", type="audio"),
                   "ml/text": record("text", input="text"),
                   "ml/failed": record("failed", state="Failed"),
                   "ml/vague": record("vague", accuracy=0.5)},
        replicas={"ml/ok": live("ok"), "ml/vague": live("vague")}, latency={}, inflight={},
        taken_at=now)
    ranked = rank(Criteria(type="vision", input="image", min_accuracy=0.8), snap)
    assert [c.executor_id for c in ranked] == ["ml/ok"]
    assert rejections(ranked) == {"wrong_type": 1, "wrong_input": 1, "not_serving": 1,
                                  "below_min_accuracy": 1}


def exposition(registry: Any) -> str:
    return generate_latest(registry).decode()


async def test_selector_exports_decisions_scores_latencies_and_rejections() -> None:
    sel = Selector(MetadataStore.from_url(f"redis://127.0.0.1:{free_port()}/0"), 0.5,
                   DEFAULT_POLICY)
    text = exposition(sel.registry)
    # Known label values are there before anything happened.
    for line in ('mulambda_selector_requests_total{outcome="store_unavailable"} 0.0',
                 'mulambda_gateway_requests_total{outcome="all_failed"} 0.0',
                 *(f'mulambda_selector_rejections_total{{reason="{r}"}} 0.0'
                   for r in REJECTION_REASONS)):
        assert line in text, line

    chosen = cand("a", 0.8)
    chosen.expected_latency_ms = 30.0
    sel.count_decision(ranking(chosen, cand("b", 0.5),
                               rejected={"ml/z": "wrong type: has 'audio'"}), chosen)
    reg = sel.registry
    assert reg.get_sample_value("mulambda_selector_decisions_total",
                                {"executor": "ml/a", "reason": "best_score"}) == 1
    assert reg.get_sample_value("mulambda_selector_score_sum", {"executor": "ml/a"}) == 0.8
    assert reg.get_sample_value("mulambda_selector_expected_latency_seconds_sum",
                                {"executor": "ml/a"}) == pytest.approx(0.03)
    assert reg.get_sample_value("mulambda_selector_rejections_total",
                                {"reason": "wrong_type"}) == 1
    for family in ("mulambda_gateway_upstream_seconds", "mulambda_gateway_client_seconds"):
        assert f"# TYPE {family} histogram" in exposition(reg), family
    await sel.close()


def test_autoscaler_exports_ready_beside_desired_replicas() -> None:
    spec = parse_executor_spec({"model": {"name": "m", "storageUri": "s3://models/m"},
                                "traits": {"type": "vision", "input": "image", "output": "label"},
                                "scaling": {"minReplicas": 2, "maxReplicas": 4}})
    ref = ObjectRef("mulambda.io/v1alpha1", "ModelExecutor", "ml", "ready-gauge", "uid-1")
    deployment = {"metadata": {"ownerReferences": [{"uid": "uid-1"}]},
                  "spec": {"replicas": 2}, "status": {"readyReplicas": 1}}
    memory = Windows()
    plan(memory, ref, spec, {}, deployment, (0, 0.0), time.time())
    labels = {"executor": "ml/ready-gauge"}
    assert REGISTRY.get_sample_value("mulambda_executor_ready_replicas", labels) == 1
    assert REGISTRY.get_sample_value("mulambda_executor_desired_replicas", labels) == 2
    memory.forget("ml/ready-gauge")  # a deleted executor leaves no series behind
    assert REGISTRY.get_sample_value("mulambda_executor_ready_replicas", labels) is None


async def test_operator_counts_store_failures_of_its_loops() -> None:
    labels = {"target": "store", "loop": "prune"}
    for target, loop in (("store", "autoscale"), ("store", "refresh"), ("api", "refresh")):
        assert REGISTRY.get_sample_value("mulambda_operator_errors_total",
                                         {"target": target, "loop": loop}) is not None
    before = REGISTRY.get_sample_value("mulambda_operator_errors_total", labels)
    # Nothing listens on the port: the real client's connection is refused.
    store = MetadataStore.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    ctx = SimpleNamespace(settings=Settings(heartbeat_ttl_seconds=0.05), store=store)
    task = asyncio.create_task(prune_forever(ctx))  # type: ignore[arg-type]
    try:
        for _ in range(250):  # the counter is all there is to wait on
            if REGISTRY.get_sample_value("mulambda_operator_errors_total", labels) != before:
                break
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
    assert REGISTRY.get_sample_value("mulambda_operator_errors_total", labels) > before


async def test_companion_exports_each_clients_rtt_and_drops_unregistered_ones(
    store: MetadataStore,
) -> None:
    async def pong(_: web.Request) -> web.Response:
        return web.Response(text="pong")

    app = web.Application()
    app.router.add_get("/", pong)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    metrics = Metrics()
    prober = Prober(store, executor="ml/hpt", pod="hpt-0", interval=1, timeout=2,
                    concurrency=2, ttl=30, metrics=metrics)
    try:
        for name in ("web", "batch"):
            await store.put_client(ClientRecord(namespace="shop", name=name, type="vision",
                                                probe_url=f"http://127.0.0.1:{port}/"))
        await prober.probe_round()
        rtt = {c: metrics.registry.get_sample_value(
            "mulambda_companion_client_rtt_seconds", {"executor": "ml/hpt", "client": c})
            for c in ("shop/web", "shop/batch")}
        assert all(v is not None and 0 < v < 2 for v in rtt.values()), rtt
        assert metrics.registry.get_sample_value(
            "mulambda_companion_store_errors_total", {"component": "prober"}) == 0

        await store.remove_client("shop/batch")
        await prober.probe_round()
        assert metrics.registry.get_sample_value(
            "mulambda_companion_client_rtt_seconds",
            {"executor": "ml/hpt", "client": "shop/batch"}) is None
        assert metrics.registry.get_sample_value(
            "mulambda_companion_client_rtt_seconds",
            {"executor": "ml/hpt", "client": "shop/web"}) is not None
    finally:
        await prober.close()
        await runner.cleanup()
