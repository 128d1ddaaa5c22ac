"""What the SDK's task client makes of a selector that answers garbage (a real HTTP server
that answers as told): a TaskError naming the call, never a raw KeyError or TypeError,
so callers that catch the SDK's errors (and the read-only SDK's wake-up, which catches
them) keep working."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from mulambda.sdk import MulambdaError
from mulambda.sdk.tasks import TaskClient, TaskError

from support.selector_http import served

pytestmark = pytest.mark.integration


@pytest.fixture
async def selector() -> AsyncIterator[tuple[TaskClient, dict]]:
    told: dict = {}

    async def answer(_request: web.Request) -> web.Response:
        status, body = told["answer"]
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    async with served(app) as url:
        tasks = TaskClient(url, "apps/shop", token="t", token_file=None)
        yield tasks, told
        await tasks.close()


@pytest.mark.parametrize("body", [{"model": None}, {"endpoint": "x"}, {"model": {}},
                                  {"model": {"executor": 3}}])
async def test_a_malformed_selection_is_a_task_error(selector, body) -> None:
    tasks, told = selector
    told["answer"] = (200, body)
    with pytest.raises(TaskError, match=r"select failed \(200\): malformed answer"):
        await tasks.wake()


@pytest.mark.parametrize("body", [[], {"status_url": "/v1/tasks/x", "executor": "ml/m"},
                                  {"id": 7, "status_url": "u", "executor": "e"}])
async def test_a_malformed_submission_answer_is_a_task_error(selector, body) -> None:
    tasks, told = selector
    told["answer"] = (202, body)
    with pytest.raises(TaskError, match=r"submit failed \(202\): malformed answer"):
        await tasks.submit([1.0])


@pytest.mark.parametrize("attempts", ["x", [1], 1.5, True])
async def test_a_malformed_status_is_a_task_error(selector, attempts) -> None:
    tasks, told = selector
    told["answer"] = (200, {"status": "running", "attempts": attempts})
    with pytest.raises(MulambdaError, match=r"status failed \(200\): malformed answer"):
        await tasks.result("apps~shop~x")


async def test_a_refusal_without_an_error_field_shows_the_answer(selector) -> None:
    tasks, told = selector
    told["answer"] = (409, {"status": "running"})
    with pytest.raises(TaskError, match=r"cancel failed \(409\): \{'status': 'running'\}"):
        await tasks.cancel("apps~shop~x")
