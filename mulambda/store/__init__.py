"""The metadata store (Redis, Valkey, DragonflyDB): records, keys, in-flight leases.

``metadata.py`` (:class:`~mulambda.store.metadata.MetadataStore`) builds every key;
``records.py`` holds the values; ``leases.py`` the SDK's in-flight leases;
``connection.py`` how a process connects (user, password, pool); ``acl.py`` what
each role may do. The key schema:

The metadata store: the one module that knows every key mulambda writes.

Works with any Redis-compatible server (Redis, Valkey, DragonflyDB): only
HASH commands (HSET, HGET, HMGET, HGETALL, HKEYS, HDEL, HINCRBY, HSCAN),
stream commands (XADD, XRANGE, XREVRANGE), EXPIRE, DEL and pipelines are
used, no Lua, no modules, no key-space scans.

Key schema (``P`` is the configured prefix, default ``mulambda``; an
executor id is ``NAMESPACE/NAME``, a client id likewise; values are JSON):

``P:executors`` (HASH) executor id -> :class:`ExecutorRecord`.
    Written by the operator on create/update; deleted by the executor's
    finalizer (``mulambda.io/metadata``).
``P:replicas`` (HASH) ``EXEC|POD`` -> :class:`ReplicaRecord`.
    Companion heartbeats. Each value carries ``expires_at`` (its TTL):
    readers ignore expired values, the operator prunes them, and a companion
    deletes its own on SIGTERM.
``P:clients`` (HASH) client id -> :class:`ClientRecord`.
    Written by the operator; deleted by the Client's finalizer.
``P:latency:CLIENT`` (HASH) ``EXEC|POD`` -> :class:`LatencySample`.
    Smoothed round-trip time from one replica to the client, written by
    companions; per-value ``expires_at`` and a key EXPIRE refreshed on write.
``P:inflight`` (HASH) ``EXEC|INSTANCE`` -> :class:`InflightLease`
    (``{"n": requests in flight, "expires_at": epoch seconds, "requests":
    [[pod, busy_until, back_by, inflight, items, stay_ms], ...]}``: when
    each request is expected to be served and back, so other routers can
    tell whether it will still be ahead of theirs, and what it was sent
    with, so that one not back when due tells them its model is slower than
    they think, as the sender's own late requests tell it; the sender
    rewrites an entry when an answer shows it will be served sooner. Older
    writers' three-field entries are read as before).
    One lease per SDK instance or selector process (``INSTANCE`` is a
    random id per :class:`~mulambda.store.leases.InflightLeases`) and
    executor. The owner writes its absolute count (never an increment), so
    a lost reply, a failed write or a cancelled caller can only delay the
    published value, never leave it wrong; it writes at each change,
    rewrites its leases every ``INFLIGHT_LEASE_SECONDS / 3`` while it has
    requests in flight and deletes a lease when its count drops to zero.
    Readers sum the unexpired leases per executor, so a dead process's
    count vanishes after at most ``INFLIGHT_LEASE_SECONDS`` (30 s); routers
    read them for each decision (:meth:`MetadataStore.inflight_counts`);
    the operator prunes expired leases with the heartbeats;
    ``remove_executor`` deletes them.
``P:service`` (HASH) ``EXEC|INSTANCE`` -> :class:`ServiceStats`.
    Measured service times of one executor as one router saw them: each SDK
    instance and each selector (gateway) process publishes the sufficient
    statistics of its own observations (response time minus network RTT,
    requests in flight, items) and its measured cold starts, with the same
    writer that publishes its in-flight leases. ``expires_at`` is
    ``now + SERVICE_TTL_SECONDS`` (1 h) at every write: a measurement
    outlives a restart of its writer, and an executor idle for an hour
    falls back to its declared ``serviceTimeMs``. Readers add the
    unexpired values per executor (:mod:`mulambda.policy.latency` fits the
    model); expired ones are pruned by the operator with the heartbeats;
    ``remove_executor`` deletes them.
``P:demand:BUCKET`` (HASH) executor id -> requests started in that
    10-second bucket (``BUCKET = epoch // 10``), plus demand signals for
    executors scaled to zero (SDK, selector, the operator's Client
    selection). EXPIRE 600 s, so old buckets vanish by themselves. The
    autoscaler reads the arrival rate from the last buckets.

``P:executors:changes``, ``P:replicas:changes``, ``P:inflight:changes``,
``P:service:changes``, ``P:latency:CLIENT:changes`` (STREAM) entries
``{"f": JSON list of field names}``. Every writer of the hash beside it
appends the fields it set or deleted, in the same pipeline as the write
(XADD, trimmed near 20,000 entries; a latency stream expires with its
hash). Long-lived readers (the SDK, the selector:
:mod:`~mulambda.store.reader`) keep a copy of each hash and read only the
fields named since their last refresh; a trimmed or lost stream, or a
minute gone by, makes them read the hash whole (:mod:`~mulambda.store.mirror`).

The operator reads these fleet-wide, never per executor, so its store load
does not grow with the fleet: each autoscaler tick one pipeline of HGETALL
``P:inflight`` plus HGETALL of each demand bucket its longest window covers
(:meth:`MetadataStore.fleet_load`); each refresh tick HGETALL ``P:replicas``
and HKEYS ``P:executors`` (a record a store restart lost is written again),
and one HSET of only the executor records that changed.

A value that does not decode (bad JSON or UTF-8, not an object, a required
field missing or of the wrong type) or holds an impossible value (NaN or an
infinity, a negative time or count, an accuracy outside [0, 1]:
:func:`~mulambda.store.records.invalid_reason`) is skipped by every reader
and logged with its key, field and reason, never its content: one bad writer must not break
selection for everyone. ``prune_expired`` leaves such values alone (a newer
version may have written them).

Why hashes with an ``expires_at`` inside the value instead of one key per
replica with EXPIRE: selection must read everything it needs in one
pipelined round trip, and a hash can be read whole with one HGETALL while
per-key TTLs would need a SCAN. Field-level TTL (HEXPIRE) is not available
on all three servers. Missing data is normal and never raises: an executor
with no latency sample for a client simply has none in the snapshot.
"""
