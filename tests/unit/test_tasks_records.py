"""The pure parts of asynchronous inference (mulambda.tasks.records): ids, status, decisions."""

from __future__ import annotations

import json

import pytest

from mulambda.tasks.records import (
    Next,
    Status,
    after_answer,
    before_run,
    client_of,
    idempotency_problem,
    new_task_id,
    outcome,
    read_result,
    status_of,
    to_read,
    view,
)


def test_a_task_id_names_its_client_and_is_unguessable():
    a, b = new_task_id("shop/recommender.v2"), new_task_id("shop/recommender.v2")
    assert a != b
    assert client_of(a) == client_of(b) == "shop/recommender.v2"
    assert len(a.rsplit("~", 1)[1]) == 32


@pytest.mark.parametrize("task_id", [
    "", "shop~app", "shop~app~xyz", "Shop~app~" + "0" * 32, "shop~app~" + "0" * 31,
    "shop/app~" + "0" * 32, "shop~~" + "0" * 32,
])
def test_malformed_ids_name_no_client(task_id):
    assert client_of(task_id) is None


def test_a_client_that_is_not_namespace_slash_name_gets_no_id():
    with pytest.raises(ValueError):
        new_task_id("no-namespace")


@pytest.mark.parametrize(("key", "problem"), [
    ("order-17", None),
    ("x" * 256, None),
    ("", "empty"),
    ("x" * 257, "longer than 256"),
    ("a\x00b", "control characters"),
])
def test_idempotency_keys(key, problem):
    found = idempotency_problem(key)
    assert (found is None) == (problem is None)
    if problem is not None:
        assert problem in found


def _final(status: Status, **kw: object) -> str:
    return outcome(status, worker="pod-1", at=10.0, **kw)  # type: ignore[arg-type]


# fields -> status
STATUS_TABLE = [
    ({"attempts": "0"}, Status.PENDING),
    ({"attempts": "1", "started_at": "5"}, Status.RUNNING),
    # A retry clears started_at: queued again, with the error kept.
    ({"attempts": "1", "last_error": "HTTP 500"}, Status.PENDING),
    ({"started_at": "5", "outcome": _final(Status.SUCCEEDED, result={"p": 1})}, Status.SUCCEEDED),
    ({"outcome": _final(Status.FAILED, reason="bad")}, Status.FAILED),
    ({"outcome": _final(Status.CANCELLED)}, Status.CANCELLED),
    ({"outcome": "{not json"}, Status.FAILED),
    ({"outcome": json.dumps({"status": "weird"})}, Status.FAILED),
]


@pytest.mark.parametrize(("fields", "expected"), STATUS_TABLE)
def test_status_of_stored_fields(fields, expected):
    assert status_of(fields) is expected
    assert view("ns~c~" + "0" * 32, fields, now=20.0)["status"] == str(expected)


def test_view_of_a_finished_task_carries_result_and_age():
    fields = {"executor": "ml/hp2", "created_at": "12.5", "attempts": "2",
              "outcome": _final(Status.SUCCEEDED, result={"predictions": [2.5]}, attempts=2)}
    answer = view("ml~c~" + "0" * 32, fields, now=20.0)
    assert answer == {"id": "ml~c~" + "0" * 32, "executor": "ml/hp2", "attempts": 2,
                      "created_at": 12.5, "age_seconds": 7.5, "status": "succeeded",
                      "result": {"predictions": [2.5]}, "finished_at": 10.0,
                      "worker": "pod-1"}


# fields -> (decision, words in the reason)
BEFORE_TABLE = [
    ({}, Next.SKIP, "expired"),
    ({"attempts": "0", "max_attempts": "3"}, Next.RUN, ""),
    ({"attempts": "2", "max_attempts": "3"}, Next.RUN, ""),
    ({"attempts": "3", "max_attempts": "3"}, Next.DEAD, "no result after 3 attempt(s); "
                                                        "last error: the worker was lost"),
    ({"attempts": "3", "max_attempts": "3", "last_error": "HTTP 503"}, Next.DEAD, "HTTP 503"),
    ({"attempts": "0", "max_attempts": "0"}, Next.RUN, ""),  # at least one attempt
    ({"attempts": "1", "max_attempts": "0"}, Next.DEAD, "after 1"),
    ({"attempts": "0", "outcome": _final(Status.CANCELLED)}, Next.SKIP, "finished"),
    ({"attempts": "1", "outcome": _final(Status.SUCCEEDED, result=1)}, Next.SKIP, "finished"),
]


@pytest.mark.parametrize(("fields", "decision", "words"), BEFORE_TABLE)
def test_before_run(fields, decision, words):
    got, reason = before_run(fields)
    assert got is decision
    assert words in reason


# (HTTP status or None, decision)
ANSWER_TABLE = [
    (200, Next.DONE), (201, Next.DONE),
    (400, Next.POISON), (404, Next.POISON), (413, Next.POISON),
    (408, Next.RETRY), (429, Next.RETRY),
    (500, Next.RETRY), (503, Next.RETRY), (None, Next.RETRY),
]


@pytest.mark.parametrize(("status", "decision"), ANSWER_TABLE)
def test_after_answer(status, decision):
    got, reason = after_answer(status, "detail text")
    assert got is decision
    if decision is not Next.DONE:
        assert "detail text" in reason
        assert (str(status) in reason) == (status is not None)


# (TF Serving's 2xx body, decision, result, words of the reason)
RESULT_TABLE = [
    ('{"predictions": [2.5, 3.0]}', Next.DONE, {"predictions": [2.5, 3.0]}, ""),
    ('{"predictions": [NaN]}', Next.POISON, None, "NaN"),
    ('{"predictions": [Infinity, -Infinity]}', Next.POISON, None, "Infinity"),
    ("<html>proxy error</html>", Next.RETRY, None, "not JSON"),
    ("", Next.RETRY, None, "not JSON"),
]


@pytest.mark.parametrize(("payload", "decision", "result", "words"), RESULT_TABLE)
def test_read_result(payload, decision, result, words):
    """A NaN answer fails the task at once with why (it could never be written as a
    result, and another attempt gives it again); garbage may be a passing fault."""
    got, value, reason = read_result(payload)
    assert (got, value) == (decision, result)
    assert words in reason


# (held, concurrency, prefetch, tasks to read now)
READ_TABLE = [
    (0, 4, 4, 8),  # idle: all the room there is
    (3, 4, 4, 5),  # a slot is idle: read at once
    (6, 4, 4, 2),  # half the prefetch free: a batch
    (7, 4, 4, 0),  # one free: wait for a batch's worth
    (8, 4, 4, 0),  # full
    (9, 4, 4, 0),  # over (a reclaim counted late): nothing, never negative
    (0, 1, 1, 2),
    (1, 1, 1, 1),  # prefetch 1: every free place is a batch
    (2, 1, 1, 0),
    (13, 8, 8, 0),
    (12, 8, 8, 4),
]


@pytest.mark.parametrize(("held", "concurrency", "prefetch", "count"), READ_TABLE)
def test_to_read(held, concurrency, prefetch, count):
    assert to_read(held, concurrency, prefetch) == count
