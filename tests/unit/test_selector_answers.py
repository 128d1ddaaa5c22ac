"""The selector's kept parts of a /select answer: the same text json.dumps gives, never a
stale one; request bodies decoded once, criteria derived again for another record; metric
children looked up once."""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from mulambda.bodies import loads_guarded
from mulambda.policy.criteria import Criteria
from mulambda.policy.ranking import Candidate
from mulambda.selector.answers import (
    AnswerText,
    RequestBodies,
    answer_body,
    text_key,
)
from mulambda.selector.decisions import Children
from mulambda.store.records import ClientRecord, ExecutorRecord, ReplicaRecord


def record(name: str = "e0", **extra: Any) -> ExecutorRecord:
    return ExecutorRecord(**{"namespace": "ml", "name": name, "model": f"m-{name}",
                             "version": 3, "type": "vision", "input": "image",
                             "output": "label", "accuracy": 0.9, "rest": f"http://{name}:8501",
                             "grpc": f"{name}:8500", "state": "Ready",
                             "service_time_ms": 10.0, **extra})


def cand(name: str = "e0", **extra: Any) -> Candidate:
    fields_: dict[str, Any] = {"executor_id": f"ml/{name}", "score": 0.912345678,
                               "expected_latency_ms": 15.123456, "accuracy": 0.9,
                               "warm": True, "record": record(name), "network_ms": 5.0,
                               "service_ms": 10.0, "load_ms": 0.123456,
                               "assumed_accuracy": 0.9, "inflight": 1.0}
    return Candidate(**{**fields_, **extra})


def dumped(best: Candidate, shown: list[Candidate]) -> str:
    return json.dumps(answer_body(best, shown), allow_nan=False)


CASES = {
    "one warm": (cand(), []),
    "five shown": (cand("e1"), [cand(f"e{i}") for i in range(5)]),
    "cold, over the ceiling": (cand(warm=False, cold_start_ms=30_000.0, over_ceiling=True),
                               [cand(warm=False, cold_start_ms=30_000.0, over_ceiling=True)]),
    "replica and notes": (cand(replica=ReplicaRecord(executor="ml/e0", pod="e0-7"),
                               notes=("no RTT sample: default",), measured=12), [cand()]),
    "not ascii": (cand(record=record("é", rest="http://ü:8501")), [cand("☃")]),
    "no accuracy, no input": (cand(record=record(accuracy=None, input=None)), [cand()]),
}


@pytest.mark.parametrize("best, shown", CASES.values(), ids=CASES.keys())
def test_the_answer_is_what_json_dumps_gives(best: Candidate, shown: list[Candidate]):
    text = AnswerText()
    assert text.answer(best, shown) == dumped(best, shown)
    assert text.answer(best, shown) == dumped(best, shown)  # from what was kept


# A value of each kind that differs from what cand() has.
CHANGED: dict[type, Any] = {str: "other", float: 7.25, bool: False, int: 99, tuple: ("x",)}


@pytest.mark.parametrize("name", [f.name for f in fields(Candidate)])
def test_a_candidate_changed_in_any_field_never_gets_a_kept_text(name: str):
    """Every field that changes the answer changes the key: change one after its text
    was kept (in place, as scoring does) and the answer is json.dumps' again."""
    text = AnswerText()
    best, other = cand("e0"), cand("e1")
    text.answer(best, [best, other])
    value = getattr(best, name)
    if name == "record":
        new: Any = replace(value, rest="http://moved:8501", model="m2", version=4,
                           accuracy=0.5, grpc="moved:8500", type="t", input="i", output="o")
    elif name == "replica":
        new = ReplicaRecord(executor="ml/e0", pod="e0-9")
    elif name == "model":
        new = None  # the service-time model is not in the answer
    else:
        new = CHANGED[type(value)]
    setattr(best, name, new)
    assert text.answer(best, [best, other]) == dumped(best, [best, other])


def test_a_record_changed_in_any_field_the_answer_names_gets_a_new_text():
    text = AnswerText()
    best = cand()
    text.answer(best, [best])
    for name in ("rest", "grpc", "model", "version", "type", "input", "output", "accuracy"):
        changed = replace(best, record=replace(best.record, **{
            name: 7 if name == "version" else 0.5 if name == "accuracy" else "x"}))
        assert text_key(changed) != text_key(best), name
        assert text.answer(changed, [changed]) == dumped(changed, [changed]), name


def test_a_non_finite_number_raises_as_json_dumps_does():
    bad = cand(score=math.nan)
    with pytest.raises(ValueError):
        dumped(bad, [bad])
    with pytest.raises(ValueError):
        AnswerText().answer(bad, [bad])
    with pytest.raises(ValueError):
        AnswerText().answer(cand(), [cand("e1", score=math.inf)])


def test_kept_texts_are_bounded():
    text = AnswerText(max_entries=8)
    for i in range(50):
        c = cand(load_ms=float(i))
        assert text.answer(c, [c]) == dumped(c, [c])
    assert len(text) == 8


def _criteria(body: Any, record: ClientRecord | None) -> Criteria:
    return Criteria.from_request(body.get("required") or {}, body.get("desired") or {},
                                 record.criteria if record is not None else None)


def _decode(raw: bytes) -> Any:
    return loads_guarded(raw) if raw.strip() else {}


BODIES = {
    "type only": (b'{"required": {"type": "vision"}}', None, Criteria(type="vision")),
    "weights": (b'{"required": {"type": "nlp"}, "desired": {"latency": 2}}', None,
                Criteria(type="nlp", latency_weight=2.0)),
    "empty, registered": (b"", ClientRecord(type="vision", output="label", namespace="ml",
                                             name="c"),
                          Criteria(type="vision", output="label")),
    "override, registered": (b'{"required": {"output": "box"}}',
                             ClientRecord(type="vision", output="label", namespace="ml",
                                          name="c", latency_weight=3.0),
                             Criteria(type="vision", output="box", latency_weight=3.0)),
}


@pytest.mark.parametrize("raw, rec, expected", BODIES.values(), ids=BODIES.keys())
def test_a_body_gives_the_criteria_it_gives_without_keeping(raw, rec, expected):
    bodies = RequestBodies()
    for _ in range(2):
        assert bodies.parse(raw, _decode).criteria(rec, _criteria) == expected


def test_a_kept_body_derives_its_criteria_again_for_another_record():
    bodies = RequestBodies()
    old = ClientRecord(type="vision", namespace="ml", name="c", latency_weight=1.0)
    new = replace(old, latency_weight=5.0)  # the client, read again after a change
    raw = b'{"desired": {"accuracy": 2}}'
    assert bodies.parse(raw, _decode).criteria(old, _criteria).latency_weight == 1.0
    assert bodies.parse(raw, _decode).criteria(new, _criteria).latency_weight == 5.0
    with pytest.raises(ValueError):  # no type and no record: as without keeping
        bodies.parse(raw, _decode).criteria(None, _criteria)


def test_bad_bodies_raise_every_time_and_are_not_kept():
    bodies = RequestBodies()
    for raw in (b"{", b"[" * 100 + b"]" * 100, b"1" * 200):
        for _ in range(2):
            with pytest.raises(ValueError):
                bodies.parse(raw, _decode)
    assert len(bodies) == 0


def test_kept_bodies_are_bounded_and_large_ones_not_kept():
    bodies = RequestBodies(max_entries=4, max_body=100)
    for i in range(20):
        bodies.parse(b'{"required": {"type": "t%d"}}' % i, _decode)
    assert len(bodies) == 4
    big = b'{"required": {"type": "%s"}}' % (b"x" * 200)
    assert bodies.parse(big, _decode).body["required"]["type"] == "x" * 200
    assert big not in bodies._kept


def test_metric_children_are_the_metrics_own_and_bounded():
    registry = CollectorRegistry()
    counter = Counter("picks", "picks", ["executor", "reason"], registry=registry)
    children = Children(counter, max_entries=2)
    children("a", "best").inc()
    children("a", "best").inc(2)
    children("b", "best").inc()
    children("c", "near").inc(5)  # beyond the bound: looked up, not kept
    children("c", "near").inc()
    assert len(children) == 2
    text = generate_latest(registry).decode()
    assert 'picks_total{executor="a",reason="best"} 3.0' in text
    assert 'picks_total{executor="c",reason="near"} 6.0' in text
