"""Conditions: Ready summarised from its dependents, transitions stamped only on a flip."""

from __future__ import annotations

import pytest

from mulambda.operator.k8s.conditions import (
    FALSE,
    TRUE,
    UNKNOWN,
    condition,
    merge_conditions,
    summarize,
)

REGISTERED = condition("Registered", TRUE, "Registered", "in the store")
SERVING = condition("Serving", TRUE, "ModelServing", "on 2 replicas")


@pytest.mark.parametrize(("dependents", "summary"), [
    ([REGISTERED, SERVING], (TRUE, "ModelServing", "on 2 replicas")),
    ([condition("Registered", FALSE, "StoreUnavailable", "down"), SERVING],
     (FALSE, "StoreUnavailable", "down")),
    ([REGISTERED, condition("Serving", FALSE, "ScaledToZero", "asleep")],
     (FALSE, "ScaledToZero", "asleep")),
    ([condition("Registered", UNKNOWN, "Pending", "not yet"),
      condition("Serving", FALSE, "WaitingForReplicas", "0/1")], (FALSE, "Pending", "not yet")),
])
def test_the_summary_is_true_only_when_every_dependent_is(dependents, summary):
    ready = summarize("Ready", dependents)
    assert (ready["type"], ready["status"], ready["reason"], ready["message"]) == ("Ready",
                                                                                   *summary)


def test_transition_time_moves_only_when_the_status_flips():
    first = merge_conditions(None, [REGISTERED], 1, now="t1")
    reworded = merge_conditions(first, [{**REGISTERED, "message": "other"}], 2, now="t2")
    flipped = merge_conditions(reworded, [condition("Registered", FALSE, "StoreUnavailable",
                                                    "down")], 2, now="t3")
    assert [c["lastTransitionTime"] for c in (first[0], reworded[0], flipped[0])] == [
        "t1", "t1", "t3"]
    assert reworded[0]["observedGeneration"] == 2


def test_conditions_keep_a_stable_order_and_those_not_mentioned():
    merged = merge_conditions([condition("Custom", TRUE, "X", ""), REGISTERED],
                              [condition("Ready", TRUE, "Y", "")], 1, now="t")
    assert [c["type"] for c in merged] == ["Ready", "Registered", "Custom"]
