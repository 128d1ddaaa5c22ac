"""Store ACLs of the task queue on a real redis-server loading the ACL file the store gets:
each role does its part of a task's life with its own user, and nobody reads a result
that is not theirs to read. The expectations are written out, not derived from acl.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis
from redis.exceptions import NoPermissionError

from mulambda.store.records import StoreUnavailable
from mulambda.tasks.queue import TaskQueue
from mulambda.tasks.records import Next, Status, TaskOptions, new_task_id, outcome

from support.acl_store import login, role_stores
from support.procs import RedisServer

pytestmark = pytest.mark.integration

P = "acl"
EXECUTOR, CLIENT = "ml/hp2", "shop/app"


@pytest.fixture
async def queues(acl_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
    dict[str, TaskQueue]
]:
    acl_redis.flush()
    stores = role_stores(acl_redis.url, P, monkeypatch)
    yield {role: TaskQueue(store) for role, store in stores.items()}
    for store in stores.values():
        await store.close()


async def test_each_role_does_its_part_of_a_tasks_life(queues):
    sel, comp, op = queues["selector"], queues["companion"], queues["operator"]
    # Selector: queues a task (with an Idempotency-Key) and a second one it cancels.
    task_id, created = await sel.submit(new_task_id(CLIENT), client=CLIENT, executor=EXECUTOR,
                                        model="m", body='{"instances": [1]}',
                                        options=TaskOptions(), idempotency_key="k1")
    assert created
    again, created = await sel.submit(new_task_id(CLIENT), client=CLIENT, executor=EXECUTOR,
                                      model="m", body="{}", options=TaskOptions(),
                                      idempotency_key="k1")
    assert (again, created) == (task_id, False)
    doomed, _ = await sel.submit(new_task_id(CLIENT), client=CLIENT, executor=EXECUTOR,
                                 model="m", body="{}", options=TaskOptions())
    assert await sel.cancel(doomed) is Status.CANCELLED
    # Operator: reads the backlog.
    assert (await op.backlog([EXECUTOR]))[EXECUTOR][0] == 1
    # Companion: takes the task, renews it, claims, finishes; dead-letters another.
    [(entry, got)] = await comp.read(EXECUTOR, "pod-0", 10, 100)
    assert got == task_id
    await comp.touch(EXECUTOR, "pod-0", [entry])
    assert await comp.reclaim(EXECUTOR, "pod-1", 0, 10) == [(entry, task_id)]
    decision, _, fields = await comp.begin(task_id, "pod-1")
    assert decision is Next.RUN and fields["body"] == '{"instances": [1]}'
    final = outcome(Status.SUCCEEDED, worker="pod-1", at=1.0, result={"predictions": [2.5]})
    assert await comp.finish(EXECUTOR, entry, task_id, final, 60)
    poison, _ = await sel.submit(new_task_id(CLIENT), client=CLIENT, executor=EXECUTOR,
                                 model="m", body="{}", options=TaskOptions())
    [(entry2, _)] = await comp.read(EXECUTOR, "pod-0", 10, 100)
    await comp.dead_letter(EXECUTOR, entry2, poison, "refused", attempts=1, worker="pod-0",
                           result_ttl=60)
    # Selector: reads the results back.
    assert "predictions" in (await sel.get(task_id))["outcome"]
    assert "refused" in (await sel.get(poison))["outcome"]
    assert await op.backlog([EXECUTOR]) == {}
    # Operator: the executor is deleted with a task still queued: the task is failed.
    orphan, _ = await sel.submit(new_task_id(CLIENT), client=CLIENT, executor=EXECUTOR,
                                 model="m", body="{}", options=TaskOptions())
    assert await op.abandon(EXECUTOR, "executor ml/hp2 was deleted") == 1
    assert "was deleted" in (await sel.get(orphan))["outcome"]
    assert await op.backlog([EXECUTOR]) == {}


# role -> what it must not do with tasks (raw commands on the real acl_redis).
FORBIDDEN = {
    "client": [("script", "load", "return 1"), ("hgetall", f"{P}:task:x"),
               ("get", f"{P}:tasks:idem:x"),
               ("xlen", f"{P}:tasks:queue:{EXECUTOR}"), ("xrange", f"{P}:tasks:dead", "-", "+"),
               ("hset", f"{P}:task:x", "outcome", "forged")],
    "sdk": [("hgetall", f"{P}:task:x"), ("xadd", f"{P}:tasks:queue:{EXECUTOR}", "*", "task", "x"),
            ("set", f"{P}:tasks:idem:x", "y")],
    # The operator writes tasks and queues (a deleted executor's are failed and deleted),
    # and reads queues; it reads no task, key or dead letter.
    "operator": [("hgetall", f"{P}:task:x"), ("hget", f"{P}:task:x", "body"),
                 ("get", f"{P}:tasks:idem:x"), ("xrange", f"{P}:tasks:dead", "-", "+")],
    "companion": [("get", f"{P}:tasks:idem:x"), ("xrange", f"{P}:tasks:dead", "-", "+"),
                  ("hset", f"{P}:executors", EXECUTOR, "{}")],
    "selector": [("script", "load", "return 1"),
                 ("xreadgroup", "GROUP", "workers", "c", "STREAMS",
                  f"{P}:tasks:queue:{EXECUTOR}", ">"),
                 ("xrange", f"{P}:tasks:queue:{EXECUTOR}", "-", "+"),
                 ("xadd", f"{P}:tasks:dead", "*", "task", "x")],
}


def test_a_companions_script_reaches_no_further_than_its_commands(acl_redis):
    """The worker's scripts need SCRIPT LOAD and EVALSHA; a script it loads runs each
    command under the companion's rules, so it reads no Idempotency-Key nor dead letter."""
    companion = login(acl_redis.url, "companion")
    for body, key in (("return redis.call('GET', KEYS[1])", f"{P}:tasks:idem:x"),
                      ("return redis.call('XLEN', KEYS[1])", f"{P}:tasks:dead")):
        sha = companion.script_load(body)
        with pytest.raises(redis.exceptions.ResponseError, match=r"(?i)noperm|permission"):
            companion.evalsha(sha, 1, key)


@pytest.mark.parametrize(("role", "command"), [
    (role, command) for role, commands in FORBIDDEN.items() for command in commands])
def test_roles_are_refused_what_is_not_theirs(acl_redis, role, command):
    with pytest.raises(NoPermissionError):
        login(acl_redis.url, role).execute_command(*command)


async def test_a_tenant_credential_cannot_read_any_tasks_result(queues, acl_redis):
    sel = queues["selector"]
    task_id, _ = await sel.submit(new_task_id("other/app"), client="other/app",
                                  executor=EXECUTOR, model="m", body='{"secret": 1}',
                                  options=TaskOptions())
    with pytest.raises(StoreUnavailable, match=r"NOPERM|permission"):
        await queues["client"].get(task_id)
    with pytest.raises(NoPermissionError):
        login(acl_redis.url, "client").hget(f"{P}:task:{task_id}", "body")
