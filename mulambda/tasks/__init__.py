"""Asynchronous inference: tasks on a queue in the store, served by workers in executor pods.

``records.py`` holds the pure parts (task ids, what a task's fields mean,
what a worker does with an answer); ``queue.py`` every key and command
(:class:`~mulambda.tasks.queue.TaskQueue`, Redis Streams with a consumer
group); ``handlers.py`` the selector's routes ``POST /v1/tasks/NS/CLIENT``,
``GET`` and ``DELETE /v1/tasks/ID``. The worker is ``companion/worker.py``,
the SDK's side ``mulambda/sdk/tasks.py``; docs/async.md tells the whole story.

Key schema (``P`` is the key prefix; only commands Redis, Valkey and
DragonflyDB all support: streams with consumer groups, XAUTOCLAIM, hashes,
SET NX, WATCH/MULTI, and two Lua scripts a worker runs with EVALSHA, every
key they touch declared):

``P:tasks:queue:EXECUTOR`` (STREAM) entries ``{"task": ID}``, consumer
    group ``workers``. One stream per executor: selection decides the
    executor when the task is submitted. An entry stays in the stream until
    a worker has written the task's outcome (XACK + XDEL), so XLEN is the
    backlog (queued and running) and the first entry's id is the oldest
    task's enqueue time: what the autoscaler reads.
``P:task:ID`` (HASH) the task: ``client``, ``executor``, ``model``,
    ``body`` (the TF Serving request), ``created_at``, ``max_attempts``,
    ``result_ttl``, ``entry`` (its stream entry), ``attempts`` (HINCRBY at
    each start), ``started_at``,
    ``worker``, ``last_error``, and ``outcome`` (JSON: status
    succeeded/failed/cancelled, result or reason), written once with HSETNX
    whichever delivery finishes first. EXPIRE ``MULAMBDA_TASK_TTL_SECONDS``
    at submission, ``result_ttl`` once the outcome is written.
``P:tasks:idem:CLIENT:SHA256`` (STRING) task id of an ``Idempotency-Key``
    (hashed: any length or character is safe in a key), SET NX with the
    task's TTL.
``P:tasks:active`` (SET) executor ids whose queue may hold entries: a
    submission adds its executor after its entry; the operator reads only
    these queues' backlog and removes the ones it finds empty (reading them
    once more after that, so no submission slips between).
``P:tasks:dead`` (STREAM, capped near 10,000 entries) ``{"task", "executor",
    "reason", "attempts"}``: tasks that will not be tried again.
"""
