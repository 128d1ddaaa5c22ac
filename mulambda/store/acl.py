"""Who may touch which store key: one Redis ACL user per role.

The roles, what they do with the keys :mod:`.metadata` builds, and the rule
that follows (``P`` is the key prefix; ``%R~`` read only, ``%W~`` write only,
``~`` both: Redis >= 7.0, Valkey and DragonflyDB all take this syntax):

operator (``mulambda-operator``)
    Writes ``executors`` and ``clients``; prunes expired ``replicas``,
    ``inflight``, ``service``, ``latency:*`` values; deletes a Client's
    ``latency:C``; reads demand and the task backlog of the active queues
    (SMEMBERS, XLEN, XRANGE); fails a deleted executor's queued tasks (an
    outcome only where none was written) and deletes its queue. Keys: ``~``
    every metadata family but demand, ``%R~P:demand:*``,
    ``~P:tasks:queue:*``, ``~P:tasks:active``, and write only
    ``%W~P:task:*``, ``%W~P:tasks:open:*`` (it reads no task nor result).
companion (``mulambda-companion``)
    Writes its heartbeat in ``replicas`` and its samples in ``latency:*``;
    reads ``clients`` (probe targets); its worker takes tasks, writes
    outcomes and dead letters, and takes a task out of its Client's open
    tasks. Keys: ``%W~P:replicas``, ``~P:latency:*``, ``%R~P:clients``,
    ``~P:task:*``, ``~P:tasks:queue:*``, ``~P:tasks:open:*``,
    ``%W~P:tasks:dead``.
selector (``mulambda-selector``; the gateway too)
    Reads the snapshot; writes demand, its in-flight leases, measured service
    times and rollout outcomes; queues tasks (with their Idempotency-Keys and
    their Client's open tasks), reads their results, cancels them. Keys:
    ``%R~`` the snapshot, ``~P:inflight``, ``~P:service``, ``~P:demand:*``,
    ``~P:outcomes:*``, ``~P:task:*``, ``~P:tasks:idem:*``,
    ``~P:tasks:open:*``, ``%W~P:tasks:queue:*``, ``%W~P:tasks:active``.
sdk (``mulambda-sdk``)
    The same as the selector, for trusted platform processes embedding the
    SDK, without the task families: its tasks go through the selector's task
    API.
client (``mulambda-client``)
    Reads the snapshot only: tenants' workloads; cannot write anything, nor
    read any task (results go through the selector, which checks the caller
    may use the Client). Keys: ``%R~`` the snapshot.

The rules exactly: :data:`ROLES`, printed by ``python -m mulambda.store.acl
commands`` and tabled in docs/install.md (a test checks that table).

Commands are listed one by one (``-@all`` first), exactly the ones
:class:`~.metadata.MetadataStore` sends for that role, plus ``PING`` (health
checks) and ``SELECT`` (a URL naming a database). The ``default`` user is
switched off: a connection
that does not log in as one of these users can do nothing.

Limits (docs/security.md): ACLs work per key, and several families are one
hash for everybody (``P:replicas``, ``P:inflight``, ``P:service``,
``P:latency:C``). A companion credential can therefore write or delete any
replica's heartbeat and any latency sample, not only its own pod's; a
selector or SDK credential can write any in-flight lease, service-time
statistic or demand counter. None of them can write an executor's or a
Client's record, which is where endpoints and criteria live. Each mirrored
family's change stream (``P:executors:changes``, ``P:replicas:changes``,
``P:inflight:changes``, ``P:service:changes``; ``P:latency:C:changes`` under
``latency:*``) takes
its family's rule: whoever may write the family may note changes to it, and
a flood of made-up changes costs readers a whole read, never a wrong value
(readers read the fields themselves).

``python -m mulambda.store.acl`` builds what the bundled store loads:

* ``acl-file --secrets DIR --out FILE``: an ACL file from the role Secrets
  mounted under ``DIR/ROLE/password`` (the Helm chart's store pod runs it
  in an init container);
* ``acl-file --namespace NS --secret-prefix NAME --out FILE``: the same,
  reading the Secrets ``NAME-ROLE`` through the Kubernetes API and creating
  the missing ones with random passwords first (the kustomize base; with
  ``--heartbeat-secret NAME`` it also creates the operator's heartbeat
  secret when missing);
* ``commands``: the ``ACL SETUSER`` commands for a store you run yourself.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import _glob_escape

__all__ = ["ROLES", "Role", "acl_file", "acl_line", "generate_password", "key_rules",
           "setuser_command"]

# Every key family metadata.py builds (``P:name``; ``*`` families have a suffix).
EXECUTORS, CLIENTS, REPLICAS = "executors", "clients", "replicas"
INFLIGHT, SERVICE, LATENCY, DEMAND = "inflight", "service", "latency:*", "demand:*"
OUTCOMES = "outcomes:*"  # per-arm outcomes of rollouts and experiments (outcomes.py)
# The task queue's families (mulambda.tasks): tasks with their results, the
# per-executor streams, Idempotency-Keys, the dead letters.
TASK, QUEUE, IDEMPOTENCY, DEAD = "task:*", "tasks:queue:*", "tasks:idem:*", "tasks:dead"
OPEN = "tasks:open:*"  # each Client's open tasks (its limit)
ACTIVE = "tasks:active"  # executors whose queue may hold entries
_METADATA = (EXECUTORS, CLIENTS, REPLICAS, INFLIGHT, SERVICE, LATENCY, DEMAND, OUTCOMES)
FAMILIES = (*_METADATA, TASK, QUEUE, ACTIVE, IDEMPOTENCY, DEAD, OPEN)

# What every reader of a selection snapshot reads (MetadataStore.snapshot,
# inflight_counts, service_stats).
_SNAPSHOT = (EXECUTORS, REPLICAS, INFLIGHT, SERVICE, LATENCY, CLIENTS)
# Families whose writers note changed fields in a stream beside them
# (``P:FAMILY:changes``, store/mirror.py): the stream gets the family's rule.
# ``latency:*`` needs none (its pattern covers ``P:latency:C:changes``).
_MIRRORED = (EXECUTORS, REPLICAS, INFLIGHT, SERVICE)
# What a snapshot reader sends besides HGETALL: changes since its last read, and
# the changed fields (store/reader.py).
_MIRROR_READ = ("hmget", "xrange", "xrevrange")
# CLIENT SETINFO (redis-py names itself on connect) is not granted: it exists only
# since Redis 7.2 (an ACL file naming it stops 7.0 from starting), and redis-py
# ignores the refusal.
_ALWAYS = ("ping", "select")


@dataclass(frozen=True)
class Role:
    """One store user: its name, what it may do to which key family, which commands."""

    name: str
    username: str
    purpose: str
    read: tuple[str, ...]
    write: tuple[str, ...]
    commands: tuple[str, ...]


ROLES: dict[str, Role] = {r.name: r for r in (
    Role("operator", "mulambda-operator",
         "executor and Client records; prunes expired values; reads demand",
         read=(*_METADATA, QUEUE, ACTIVE),
         # task, queue: a deleted executor's queued tasks are failed and its queue deleted
         # (TaskQueue.abandon); hsetnx writes only an outcome not yet written.
         write=(EXECUTORS, CLIENTS, REPLICAS, INFLIGHT, SERVICE, LATENCY, OUTCOMES, ACTIVE,
                TASK, QUEUE, OPEN),
         commands=("hget", "hgetall", "hkeys", "hscan", "hset", "hsetnx", "hdel", "del",
                   "xlen", "xadd", "smembers", "srem", "sadd", "zrem", "multi", "exec",
                   *_MIRROR_READ)),
    Role("companion", "mulambda-companion",
         "its replica's heartbeat and latency samples; reads probe targets",
         # open: the outcome script takes a task out of its Client's open tasks (a key a
         # script names is checked for reading and writing)
         read=(LATENCY, CLIENTS, TASK, QUEUE, OPEN),
         write=(REPLICAS, LATENCY, TASK, QUEUE, DEAD, OPEN),
         # evalsha, script|load: the worker's start and outcome scripts (tasks/queue.py);
         # the commands inside a script are checked against this user's rules too.
         commands=("hget", "hgetall", "hset", "hdel", "expire", "hincrby", "hsetnx", "watch",
                   "multi", "exec", "xreadgroup", "xack", "xdel", "xautoclaim", "xclaim",
                   "xadd", "xgroup|create", "zrem", "evalsha", "script|load")),
    Role("selector", "mulambda-selector",
         "selector and gateway: reads snapshots; writes demand, in-flight leases, "
         "measured service times",
         read=(*_SNAPSHOT, DEMAND, OUTCOMES, TASK, IDEMPOTENCY, OPEN),
         write=(INFLIGHT, SERVICE, DEMAND, OUTCOMES, TASK, QUEUE, ACTIVE, IDEMPOTENCY, OPEN),
         commands=("hget", "hgetall", "hset", "hdel", "hincrby", "expire", "exists", "get",
                   "set", "watch", "multi", "exec", "xadd", "xdel", "xgroup|create", "sadd",
                   "zadd", "zcard", "zrem", "zremrangebyscore", *_MIRROR_READ)),
    Role("sdk", "mulambda-sdk",
         "trusted processes embedding the SDK: like the selector",
         # outcomes: HINCRBY reads the key it writes.
         read=(*_SNAPSHOT, DEMAND, OUTCOMES), write=(INFLIGHT, SERVICE, DEMAND, OUTCOMES),
         commands=("hget", "hgetall", "hset", "hdel", "hincrby", "expire", "xadd",
                   *_MIRROR_READ)),
    Role("client", "mulambda-client",
         "tenants' workloads embedding the SDK: reads snapshots, writes nothing",
         read=_SNAPSHOT, write=(),
         commands=("hget", "hgetall", *_MIRROR_READ)),
)}


def _pattern(prefix: str, family: str) -> str:
    if family.endswith(":*"):
        return f"{_glob_escape(prefix)}:{_glob_escape(family[:-2])}:*"
    return f"{_glob_escape(prefix)}:{_glob_escape(family)}"


def key_rules(role: Role, prefix: str) -> list[str]:
    """``~``, ``%R~`` and ``%W~`` rules for the role's key families, in FAMILIES order."""
    rules = []
    for family in FAMILIES:
        r, w = family in role.read, family in role.write
        if r or w:
            mode = "~" if r and w else "%R~" if r else "%W~"
            rules.append(f"{mode}{_pattern(prefix, family)}")
            if family in _MIRRORED:
                rules.append(f"{mode}{_pattern(prefix, family + ':changes')}")
    return rules


def _rules(role: Role, prefix: str) -> list[str]:
    return ["resetkeys", *key_rules(role, prefix), "resetchannels", "-@all",
            *(f"+{c}" for c in (*_ALWAYS, *role.commands))]


def acl_line(role: Role, prefix: str, password: str) -> str:
    """One line of an ACL file (``aclfile``): the password only as its SHA-256."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    return " ".join(["user", role.username, "on", f"#{digest}", *_rules(role, prefix)])


def setuser_command(role: Role, prefix: str, password: str = "PASSWORD") -> str:
    """The ``ACL SETUSER`` command creating the role's user (``redis-cli``/``valkey-cli``)."""
    return " ".join(["ACL", "SETUSER", role.username, "reset", "on", f">{password}",
                     *_rules(role, prefix)])


DEFAULT_OFF = "user default off resetkeys resetchannels -@all"


def acl_file(prefix: str, passwords: Mapping[str, str]) -> str:
    """An ACL file with a user per role in ``passwords`` and the default user off."""
    unknown = set(passwords) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles: {sorted(unknown)}")
    lines = [DEFAULT_OFF]
    for name, role in ROLES.items():
        if name in passwords:
            if not passwords[name]:
                raise ValueError(f"empty password for role {name}")
            lines.append(acl_line(role, prefix, passwords[name]))
    return "\n".join(lines) + "\n"


def generate_password() -> str:
    """32 random URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


# -- command line (the bundled store's init container) -------------------------------------


def shared_acl_file(password: str) -> str:
    """An ACL file for per-role users off (``redis.acl.enabled: false`` with
    ``redis.existingSecret``): the default user, every command and key, with the one
    password every process shares, as its SHA-256 (not on the server's command line)."""
    if not password:
        raise ValueError("empty shared password")
    digest = hashlib.sha256(password.encode()).hexdigest()
    return f"user default on #{digest} ~* &* +@all\n"


def _passwords_from_files(root: Path) -> dict[str, str]:
    found = {}
    for name in ROLES:
        path = root / name / "password"
        if path.is_file():
            found[name] = path.read_text().strip()
    return found


def passwords_from_api(namespace: str, secret_prefix: str, core: Any = None) -> dict[str, str]:
    """Read ``SECRET_PREFIX-ROLE`` for every role, creating missing ones (random password).

    ``core`` is a ``kubernetes.client.CoreV1Api``; by default the pod's own
    (in-cluster) identity.
    """
    import base64

    from kubernetes import client, config

    if core is None:
        config.load_incluster_config()
        core = client.CoreV1Api()
    found = {}
    for name, role in ROLES.items():
        secret_name = f"{secret_prefix}-{name}"
        data = secret_from_api(core, namespace, secret_name, {
            "app.kubernetes.io/component": "store-credentials", "mulambda.io/store-role": name,
        }, {"username": role.username, "password": generate_password()})
        if "password" not in data:
            raise SystemExit(f"Secret {namespace}/{secret_name} has no key 'password'")
        found[name] = base64.b64decode(data["password"]).decode()
    return found


def secret_from_api(core: Any, namespace: str, name: str, labels: dict[str, str],
                    fresh: dict[str, str]) -> dict[str, str]:
    """The data (base64 values) of Secret ``name``, created with ``fresh`` (plain values)
    when there is none."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        secret = core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, labels={
                "app.kubernetes.io/name": "mulambda", **labels}),
            type="Opaque", string_data=fresh)
        try:
            secret = core.create_namespaced_secret(namespace, body)
        except ApiException as race:  # another pod created it meanwhile
            if race.status != 409:
                raise
            secret = core.read_namespaced_secret(name, namespace)
        print(f"created Secret {namespace}/{name}", file=sys.stderr)
    return dict(secret.data or {})


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mulambda.store.acl",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("acl-file", help="write the store's ACL file from the role Secrets")
    # Empty counts as unset, as for every MULAMBDA_* variable (mulambda.settings).
    build.add_argument("--prefix", default=os.environ.get("MULAMBDA_KEY_PREFIX") or "mulambda")
    build.add_argument("--out", required=True, type=Path)
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--secrets", type=Path, help="DIR/ROLE/password files (mounted Secrets)")
    source.add_argument("--namespace", help="read (and create) the Secrets through the API")
    source.add_argument("--shared-password", type=Path,
                        help="per-role users off: a file with the one password all share "
                        "(read exactly: the processes send the Secret's value as it is)")
    build.add_argument("--secret-prefix", default="mulambda-store",
                       help="with --namespace: Secrets are named PREFIX-ROLE")
    build.add_argument("--heartbeat-secret", default="",
                       help="with --namespace: also make sure this Secret holds a random "
                       "'secret' (what the operator derives executors' heartbeat keys from)")
    show = sub.add_parser("commands", help="print ACL SETUSER commands for your own store")
    show.add_argument("--prefix", default="mulambda")
    args = parser.parse_args(argv)

    if args.command == "commands":
        for role in ROLES.values():
            print(setuser_command(role, args.prefix))
        print("# then, unless something else still logs in without a user:")
        print(DEFAULT_OFF.replace("user default", "ACL SETUSER default", 1))
        return 0
    if args.shared_password is not None:
        _write(args.out, shared_acl_file(args.shared_password.read_text()))
        print(f"wrote {args.out}: the default user with the shared password", file=sys.stderr)
        return 0
    passwords = (_passwords_from_files(args.secrets) if args.secrets is not None
                 else passwords_from_api(args.namespace, args.secret_prefix))
    if args.heartbeat_secret and args.namespace:
        from kubernetes import client

        secret_from_api(client.CoreV1Api(), args.namespace, args.heartbeat_secret,
                        {"app.kubernetes.io/component": "heartbeat-key"},
                        {"secret": secrets.token_urlsafe(36)})
    if not passwords:
        print("no role passwords found: the store would accept nobody", file=sys.stderr)
        return 2
    _write(args.out, acl_file(args.prefix, passwords))
    print(f"wrote {args.out}: users {', '.join(ROLES[r].username for r in passwords)}, "
          f"default off", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover - the store's init container
    raise SystemExit(main())
