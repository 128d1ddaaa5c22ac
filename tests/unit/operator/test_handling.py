"""The handlers' boundary: parse once, reconcile, write the StatusUpdate through kopf."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from kubernetes.client.exceptions import ApiException

from mulambda.api.common import SpecError
from mulambda.operator import handling
from mulambda.operator.client.status import failure
from mulambda.operator.context import Observed
from mulambda.operator.k8s.api import Forbidden
from mulambda.operator.k8s.children import NameConflict, Rejected
from mulambda.operator.status import Event, Problem, StatusUpdate
from mulambda.settings import Settings

BODY = {"apiVersion": "mulambda.io/v1alpha1", "kind": "Client",
        "metadata": {"namespace": "apps", "name": "c", "uid": "u1", "generation": 4,
                     "labels": {"team": "a"}},
        "spec": {"want": "x"}, "status": {"observedGeneration": 3}}


def parse(spec: dict[str, Any]) -> str:
    if "want" not in spec:
        raise SpecError("spec.want: Field required")
    return str(spec["want"])


@pytest.fixture
def posted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str]]:
    """Events handed to kopf, as (type, reason, message): posted with kopf.event, which
    (unlike kopf.info) the posting level, WARNING, does not filter."""
    calls: list[tuple[str, str, str]] = []
    monkeypatch.setattr(kopf, "event", lambda _body, *, type, reason, message:
                        calls.append((type, reason, message)))
    return calls


def kind(outcome: Any) -> tuple[handling.Kind[str], list[Observed[str]]]:
    seen: list[Observed[str]] = []

    async def reconcile(_ctx: Any, observed: Observed[str]) -> StatusUpdate:
        seen.append(observed)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def forget(*_: Any) -> None:
        return None

    return handling.Kind(plural="clients", noun="client", parse=parse, reconcile=reconcile,
                         failure=failure, forget=forget, timer="reselect_client",
                         interval=lambda _settings: 10.0), seen


def context() -> Any:
    """What handling itself reads of the context (the fake reconcile reads nothing)."""
    return SimpleNamespace(settings=Settings(retry_max_delay_seconds=30), written={})


async def run(kind_: handling.Kind[str], body: dict[str, Any], patch: kopf.Patch,
              ctx: Any = None, **kw: Any) -> None:
    # No logger: the fake reconcile does not log.
    await handling.reconcile(kind_, ctx or context(), kopf.Body(body), patch,
                             None, **kw)  # type: ignore[arg-type]


async def test_the_object_is_typed_once_and_the_update_written(posted):
    update = StatusUpdate({"selected": None}, [Event.normal(reason="SelectionChanged",
                                                            message="m"),
                                               Event.warning(reason="NoMatchingExecutor",
                                                             message="w")])
    kind_, seen = kind(update)
    patch = kopf.Patch()
    await run(kind_, BODY, patch, retry=2, spec_changed=True)
    assert dict(patch.status) == {"selected": None}
    assert posted == [("Normal", "SelectionChanged", "m"), ("Warning", "NoMatchingExecutor", "w")]
    [observed] = seen
    assert (observed.ref.id, observed.ref.kind, observed.ref.uid, dict(observed.ref.labels)) == (
        "apps/c", "Client", "u1", {"team": "a"})
    assert (observed.spec, observed.generation, observed.retry, observed.spec_changed) == (
        "x", 4, 2, True)
    assert observed.status == {"observedGeneration": 3}


async def test_a_problem_with_a_delay_is_retried_after_the_status_is_written(posted):
    kind_, _ = kind(StatusUpdate({"conditions": []}, [], Problem("down", retry_after=4.0)))
    patch = kopf.Patch()
    with pytest.raises(kopf.TemporaryError, match="down") as err:
        await run(kind_, BODY, patch)
    assert err.value.delay == 4.0
    assert dict(patch.status) == {"conditions": []}


@pytest.mark.parametrize(("body", "outcome", "reason", "message"), [
    ({**BODY, "spec": {}}, StatusUpdate(), "InvalidSpec",
     "Invalid spec: spec.want: Field required"),
    (BODY, NameConflict("Deployment apps/c-workload is not ours"), "NameConflict",
     "Deployment apps/c-workload is not ours"),
    (BODY, Rejected("the API server rejected Deployment c-workload: bad"), "Rejected",
     "the API server rejected Deployment c-workload: bad"),
])
async def test_what_the_operator_cannot_act_on_is_the_kinds_failure_and_permanent(
    posted, body, outcome, reason, message,
):
    kind_, seen = kind(outcome)
    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError, match=message):
        await run(kind_, body, patch)
    [ready] = patch.status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"], ready["message"]) == (
        "Ready", "False", reason, message)
    assert posted == [("Warning", reason, message)]
    assert bool(seen) == (reason != "InvalidSpec")  # a spec that does not parse goes no further


REFUSAL = ('deployments.apps is forbidden: User "system:serviceaccount:m:op" cannot '
           'create resource "deployments"')
RANGE_FULL = ('Internal error occurred: failed to allocate a serviceIP for Service "c": '
              'range is full')


def _server_error(status: int, message: str) -> ApiException:
    exc = ApiException(status=status, reason="Internal Server Error")
    exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


@pytest.mark.parametrize(("failure", "reason", "said"), [
    (Forbidden(REFUSAL), "Forbidden", REFUSAL),
    # The server's own sentence, not the client's dump of headers and body.
    (_server_error(500, RANGE_FULL), "APIError", f"failed a request (500): {RANGE_FULL}"),
    (_server_error(429, "too many requests, please try again later"), "APIError",
     "(429): too many requests"),
])
async def test_a_refused_or_failed_call_is_a_visible_failure_retried_with_back_off(
    posted, failure, reason, said,
):
    kind_, _ = kind(failure)
    patch = kopf.Patch()
    with pytest.raises(kopf.TemporaryError, match="Retrying in 4s") as err:
        await run(kind_, BODY, patch, retry=2)
    assert err.value.delay == 4.0  # 2 ** retry, capped by the settings
    [ready] = patch.status["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert said in ready["message"]
    assert "HTTP response headers" not in ready["message"]
    assert posted == [("Warning", reason, ready["message"])]


@pytest.mark.parametrize(("written_over", "age", "expected"), [
    ("7", 0.0, {"observedGeneration": 4, "selected": {"executor": "ml/a"}}),  # body predates it
    ("8", 0.0, {"observedGeneration": 3}),  # the watch delivered a newer object: trust it
    ("7", handling.WRITTEN_STATUS_SECONDS + 1, {"observedGeneration": 3}),  # a lost write
])
def test_the_status_last_written_stands_in_for_an_older_body(written_over, age, expected):
    ctx = context()
    body = kopf.Body({**BODY, "metadata": {**BODY["metadata"], "resourceVersion": "7"}})
    handling.remember_status(ctx, body, {"observedGeneration": 3}, StatusUpdate(
        {"observedGeneration": 4, "selected": {"executor": "ml/a"}}))
    _, at, status = ctx.written["u1"]
    ctx.written["u1"] = (written_over, at - age, status)
    assert handling.previous_status(ctx, body) == expected


@pytest.mark.parametrize(("age", "kept"), [
    (0.0, True),
    (handling.WRITTEN_STATUS_SECONDS - 1, True),
    (handling.WRITTEN_STATUS_SECONDS, False),  # no longer trusted, so no longer held
    (3600.0, False),
])
def test_statuses_written_long_ago_are_forgotten(age, kept):
    ctx = context()
    ctx.written["u1"] = ("7", 1000.0 - age, {"observedGeneration": 4})
    ctx.written["u2"] = ("7", 1000.0, {"observedGeneration": 1})
    handling.forget_old_writes(ctx, now=1000.0)
    assert ("u1" in ctx.written) is kept
    assert "u2" in ctx.written


@pytest.mark.parametrize(("timer", "reason", "observed", "skipped"), [
    # a start over a concluded generation: the fleet refresh's first tick has it
    (None, kopf.Reason.RESUME, 4, True),
    # the generation changed while no operator ran, or its handling never concluded
    (None, kopf.Reason.RESUME, 3, False),
    (None, kopf.Reason.RESUME, None, False),
    # not a resume: kopf's create and update handlers always reconcile
    (None, kopf.Reason.CREATE, 4, False),
    (None, kopf.Reason.UPDATE, 4, False),
    # a kind with its own per-object timer is not the fleet's
    ("reselect_client", kopf.Reason.RESUME, 4, False),
])
def test_only_a_concluded_resume_of_a_fleet_kind_is_left_to_the_fleet(
        timer, reason, observed, skipped):
    client_kind, _ = kind(StatusUpdate())
    body = {**BODY, "status": {} if observed is None else {"observedGeneration": observed}}
    fleet_kind = handling.Kind(**{**vars(client_kind), "timer": timer})
    assert handling.left_to_the_fleet(fleet_kind, reason, body) is skipped
