"""The task worker's store writes as Lua scripts over declared keys (used by
:class:`mulambda.tasks.queue.TaskQueue`)."""

from __future__ import annotations

# A worker's two writes per task as scripts over declared keys, one command per batch: a
# transaction costs redis-py a command and a QUEUED reply per task, which at tens of
# tasks per second was most of what the queue added to a call (bench/async_tasks.py). A
# script runs atomically like MULTI/EXEC, and each command in it is checked against the
# caller's ACL user as if sent alone.
#
# KEYS: the tasks; ARGV: started_at, worker. Per task {fields before, attempts now}.
BEGIN = """
local out = {}
for i, key in ipairs(KEYS) do
  local before = redis.call('HGETALL', key)
  local attempts = redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'started_at', ARGV[1], 'worker', ARGV[2])
  out[i] = {before, attempts}
end
return out
"""
# KEYS: the queue, then the tasks; ARGV: the group, then per task entry, outcome,
# result_ttl. Per task 1 when this wrote its outcome, 0 when one was there.
FINISH = """
local written, entries = {}, {}
for j = 1, (#KEYS - 1) / 2 do
  local task, open, at = KEYS[2 * j], KEYS[2 * j + 1], 4 * (j - 1) + 1
  entries[j] = ARGV[at + 1]
  written[j] = redis.call('HSETNX', task, 'outcome', ARGV[at + 2])
  if written[j] == 1 then  -- a duplicate does not extend the first outcome's life
    redis.call('EXPIRE', task, ARGV[at + 3])
    redis.call('ZREM', open, ARGV[at + 4])  -- no longer one of its Client's open tasks
  end
end
redis.call('XACK', KEYS[1], ARGV[1], unpack(entries))
redis.call('XDEL', KEYS[1], unpack(entries))
return written
"""
