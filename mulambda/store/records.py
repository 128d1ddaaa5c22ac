"""Store records: the JSON values mulambda keeps in the metadata store, and their codec.

See :mod:`mulambda.store.metadata` for the keys that hold them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from mulambda.errors import MulambdaError
from mulambda.policy.criteria import Criteria

log = logging.getLogger("mulambda.store")


class StoreUnavailable(MulambdaError, RuntimeError):
    """The store could not be reached; callers retry with back-off. A
    :class:`~mulambda.errors.MulambdaError`: the SDK's callers catch it with its own."""


def _now() -> float:
    return time.time()


# An in-flight lease outlives its owner by this long (a router may choose up to
# MAX_LEASE_SECONDS); measured service times are kept this long after their writer's last
# write.
INFLIGHT_LEASE_SECONDS = 30.0
MAX_LEASE_SECONDS = 300.0
SERVICE_TTL_SECONDS = 3600.0
# How far a writer's clock may run ahead of a reader's.
CLOCK_SLACK_SECONDS = 60.0


class _Resource:
    """A record of one custom resource, identified by ``NAMESPACE/NAME``."""

    namespace: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class ExecutorRecord(_Resource):
    """What the operator publishes about one ModelExecutor."""

    namespace: str
    name: str
    model: str
    version: int | None
    type: str
    input: str
    output: str
    accuracy: float | None
    rest: str
    grpc: str
    state: str = "Pending"  # Pending | Ready | ScaledToZero | Failed | Unavailable
    min_replicas: int = 1
    max_replicas: int = 1
    ready_replicas: int = 0
    service_time_ms: float | None = None
    generation: int = 0
    updated_at: float = field(default_factory=_now)
    # A new version beside this one, while a rollout routes to it: the route
    # routers follow (mulambda.policy.rollout.Route); None otherwise.
    rollout: dict[str, Any] | None = None
    # Public key (base64 Ed25519) its pods sign their heartbeats with; None: heartbeats
    # are not signed (mulambda.store.heartbeats).
    heartbeat_key: str | None = None
    # The last cold start the operator measured (activation at zero to the first ready
    # replica, status.scaling.lastColdStartSeconds); None before the first.
    cold_start_ms: float | None = None


@dataclass(frozen=True, kw_only=True)
class ClientRecord(Criteria, _Resource):
    """What the operator publishes about one Client: its :class:`Criteria`, and who it is.

    Stored flat (the criteria fields beside ``namespace``, ``name``, ...), so
    selection reads exactly what the operator registered.
    """

    namespace: str
    name: str
    probe_url: str | None = None
    generation: int = 0
    updated_at: float = field(default_factory=_now)
    # An A/B experiment over executors (mulambda.policy.experiment.Experiment); None otherwise.
    experiment: dict[str, Any] | None = None

    @property
    def criteria(self) -> Criteria:
        """The selection criteria alone (a plain :class:`Criteria`)."""
        return Criteria(**{f.name: getattr(self, f.name) for f in fields(Criteria)})


@dataclass
class ReplicaRecord:
    """A companion's heartbeat for one pod of an executor."""

    executor: str
    pod: str
    ip: str = ""
    state: str = "Loading"  # Loading | Available | Failed
    version: int | None = None
    reason: str = ""
    message: str = ""
    heartbeat_at: float = field(default_factory=_now)
    expires_at: float = 0.0
    # The signed claim (mulambda.store.heartbeats): until when it holds, and the
    # signature (base64) of the executor's key; empty when not signed.
    claim_until: float = 0.0
    sig: str = ""


@dataclass
class LatencySample:
    """Smoothed round-trip time from one replica to one client."""

    ms: float
    samples: int
    at: float = field(default_factory=_now)
    expires_at: float = 0.0


class TimedRequest(NamedTuple):
    """One request in an :class:`InflightLease` (see there); ``inflight`` < 0: not said."""

    pod: str
    busy_until: float
    back_by: float
    inflight: float = -1.0
    items: float = 1.0
    stay_ms: float = 0.0

    def item(self) -> list[str | float]:
        """As :attr:`InflightLease.requests` holds it: without what it was sent with when
        that is not said (the three-field form)."""
        return list(self) if self.inflight >= 0 else list(self[:3])


@dataclass
class InflightLease:
    """Requests one router (SDK instance, selector) has in flight on one executor, until
    ``expires_at``.

    ``requests`` says, per request, ``[pod, busy_until, back_by, inflight,
    items, stay_ms]`` (:class:`TimedRequest`; times in epoch seconds): the
    replica it went to (``""`` for the Service), when its sender expects it
    to be served, and when back (sent + RTT + stay); the requests ahead of it
    when it was sent (less those its sender's answers showed were not), its
    items and its expected stay in ms. A reader counts it ahead of its own
    next request while it is still being served when that one would arrive,
    or when it is late; a late one also says how long its model takes at
    least, as the reader's own late requests do
    (:func:`mulambda.policy.selection.rank`). The sender rewrites it when
    its answers show it will be served sooner. Older writers leave out the
    last three (then it is not said to be late) or the whole list (then only
    ``n`` is known).
    """

    n: int
    expires_at: float
    requests: list[list[Any]] = field(default_factory=list)


@dataclass
class ServiceStats:
    """Measured service times of one executor, as sufficient statistics.

    Exponentially weighted sums over observations (``k`` requests in flight
    per replica when the request was sent, ``i`` items in it, ``t`` its
    service time in ms = response time minus network RTT): ``w`` = sum of
    weights, ``k`` = sum w*k, ``kk`` = sum w*k*k, ``kt`` = sum w*k*t and so
    on. Sums of several writers add up to the statistics of all their
    observations, so each writer publishes its own and readers add them;
    :mod:`mulambda.policy.latency` fits the service-time model from them.
    ``cold_ms`` is the writer's smoothed measured cold start (activation to
    first answer) and ``cold_count`` how many it saw.
    """

    w: float = 0.0
    k: float = 0.0
    i: float = 0.0
    t: float = 0.0
    kk: float = 0.0
    ii: float = 0.0
    ki: float = 0.0
    kt: float = 0.0
    it: float = 0.0
    count: int = 0
    cold_ms: float | None = None
    cold_count: int = 0
    expires_at: float = 0.0

    def __add__(self, other: ServiceStats) -> ServiceStats:
        cold_count = self.cold_count + other.cold_count
        cold: float | None = None
        if cold_count:
            cold = ((self.cold_ms or 0.0) * self.cold_count
                    + (other.cold_ms or 0.0) * other.cold_count) / cold_count
        return ServiceStats(
            self.w + other.w, self.k + other.k, self.i + other.i, self.t + other.t,
            self.kk + other.kk, self.ii + other.ii, self.ki + other.ki,
            self.kt + other.kt, self.it + other.it, self.count + other.count,
            cold, cold_count, max(self.expires_at, other.expires_at),
        )


@dataclass
class Snapshot:
    """Everything selection needs, read in one round trip."""

    executors: dict[str, ExecutorRecord]
    replicas: dict[str, list[ReplicaRecord]]  # executor id -> live replicas
    latency: dict[str, dict[str, LatencySample]]  # executor id -> pod -> sample (one client)
    inflight: dict[str, int]
    taken_at: float
    client_record: ClientRecord | None = None  # the snapshot's client, when registered
    # executor id -> measured service-time statistics, all writers added up
    service: dict[str, ServiceStats] = field(default_factory=dict)
    # executor id -> everybody else's requests in flight whose timing is known:
    # TimedRequest (epoch seconds); ``inflight`` then counts the others
    inflight_requests: dict[str, list[TimedRequest]] = field(default_factory=dict)
    # The reader's own requests in flight, when it keeps them apart from ``inflight``
    # (which then counts everybody else's): executor id -> requests still ahead at
    # the executor (a router knows when it sent each one), and the same per replica.
    own_inflight: dict[str, float] = field(default_factory=dict)
    replica_inflight: dict[str, dict[str, float]] = field(default_factory=dict)
    # executor id -> the reader's own requests not back when due: (requests ahead when
    # sent, items, the least its service time can be in ms) (policy/latency.py Late)
    own_late: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)


def invalid_reason(record: Any) -> str | None:
    """Why ``record`` holds an impossible value (NaN, infinity, a negative time or
    count, an accuracy outside [0, 1]), or None when it is sound.

    Such a value must never rank: NaN compares False with everything, so a
    NaN service time or accuracy would win every comparison it takes part in.
    """
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            if f.name == "expires_at" and value == math.inf:
                continue  # "never expires": the simulator's records
            return f"field {f.name!r} is not a finite number"
    check = _RULES.get(type(record))
    return check(record) if check is not None else None


def too_far_ahead(cls: type | None, expires_at: float, now: float) -> str | None:
    """Why a ``cls`` (a lease or service statistics) expiring at ``expires_at`` expires
    later than any writer of ours sets, or None. Such a value is refused by readers and
    pruned: a hostile writer's lease would otherwise count for as long as it likes
    (docs/security.md T3)."""
    horizon = _HORIZON_SECONDS.get(cls) if cls is not None else None
    if horizon is not None and expires_at > now + horizon + CLOCK_SLACK_SECONDS:
        return f"expires_at is more than {horizon:g} s ahead (no writer sets that)"
    return None


def _negative(record: Any, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = getattr(record, name)
        if value is not None and value < 0:
            return f"field {name!r} is negative"
    return None


def _executor_rule(r: ExecutorRecord) -> str | None:
    if r.accuracy is not None and not 0 <= r.accuracy <= 1:
        return "field 'accuracy' is outside [0, 1]"
    return _negative(r, ("service_time_ms", "min_replicas", "max_replicas", "ready_replicas",
                         "cold_start_ms"))


def _lease_rule(r: InflightLease) -> str | None:
    for item in r.requests:
        if (not isinstance(item, list) or len(item) not in (3, 6) or not isinstance(item[0], str)
                or not all(isinstance(v, int | float) and not isinstance(v, bool)
                           and math.isfinite(v) for v in item[1:])
                or any(v < 0 for v in item[3:])):
            return ("field 'requests' holds an item that is not [pod, busy_until, back_by] "
                    "or [pod, busy_until, back_by, inflight, items, stay_ms] (finite, the "
                    "last three not negative)")
    return _negative(r, ("n",))


_HORIZON_SECONDS: dict[type, float] = {InflightLease: MAX_LEASE_SECONDS,
                                        ServiceStats: SERVICE_TTL_SECONDS}
_RULES: dict[type, Any] = {
    ExecutorRecord: _executor_rule,
    LatencySample: lambda r: _negative(r, ("ms", "samples")),
    InflightLease: _lease_rule,
    ServiceStats: lambda r: _negative(r, ("w", "k", "i", "t", "kk", "ii", "ki", "kt", "it",
                                          "count", "cold_ms", "cold_count")),
}


def _dump(obj: Any) -> str:
    return json.dumps(asdict(obj), separators=(",", ":"), sort_keys=True)


def _accepted_types(annotation: Any) -> tuple[type, ...]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members: tuple[Any, ...] = typing.get_args(annotation)
    else:
        members = (annotation,)
    out: list[type] = []
    for member in members:
        if typing.get_origin(member) is typing.Literal:
            # The type of the values; the class itself checks which ones.
            out.extend({type(v) for v in typing.get_args(member)})
            continue
        # list[...]: a list; its items are the class's rules' business.
        out.append(typing.get_origin(member) or member)
        if member is float:
            out.append(int)  # JSON has one number type: 1 is a fine float
    return tuple(out)


_FIELD_TYPES: dict[type, dict[str, tuple[type, ...]]] = {}


def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    found = _FIELD_TYPES.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        found = _FIELD_TYPES[cls] = {
            name: _accepted_types(hints[name]) for name in cls.__dataclass_fields__  # type: ignore[attr-defined]
        }
    return found


# A JSON integer of this many digits is no count, time or version of ours.
_LONG_INT_DIGITS = 16
_LONG_INT = re.compile(rf"[0-9]{{{_LONG_INT_DIGITS}}}")
_LONG_INT_BYTES = re.compile(_LONG_INT.pattern.encode())
# What a Redis counter (HINCRBY) can hold.
_COUNTER_RANGE = range(-(2**63), 2**63)


def _long_int(text: str) -> int | float:
    if len(text) - (text[0] == "-") < _LONG_INT_DIGITS:
        return int(text)
    value = float(text)
    return value if math.isfinite(value) else math.nan


def _json(raw: str | bytes) -> Any:
    """``json.loads``, with integers of 16 digits or more read as floats, and NaN past a
    float's range: validation refuses it, where an int overflowed the first ``float()``
    of a router, the gateway or the autoscaler (a hostile writer's 10**400 in a lease
    did: docs/security.md T3)."""
    long = (_LONG_INT.search(raw) if isinstance(raw, str) else _LONG_INT_BYTES.search(raw))
    if long is None:
        return json.loads(raw)
    return json.loads(raw, parse_int=_long_int)


def _load(cls: Any, raw: str | bytes) -> Any:
    """Decode a record; ValueError (naming no value) when it is not a valid one."""
    try:
        data = _json(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError("not JSON") from exc
    if not isinstance(data, dict):
        raise ValueError(f"JSON {type(data).__name__}, not an object")
    fields = _field_types(cls)
    # Unknown fields (written by a newer version) are dropped, not fatal.
    known = {k: v for k, v in data.items() if k in fields}
    for name, value in known.items():
        # bool is an int to isinstance, never a number here.
        if isinstance(value, bool) or not isinstance(value, fields[name]):
            raise ValueError(f"field {name!r} is a JSON {type(value).__name__}")
    try:
        record = cls(**known)
    except TypeError as exc:  # a required field is missing
        raise ValueError(str(exc)) from exc
    why = invalid_reason(record)
    if why is not None:
        raise ValueError(why)
    return record


def _expires_at(raw: str) -> float | None:
    """The ``expires_at`` of a JSON value, or None when it has no usable one."""
    try:
        data = _json(raw)
    except ValueError:
        return None
    value = data.get("expires_at") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _split_field(raw: str) -> tuple[str, str]:
    executor, _, pod = raw.rpartition("|")
    return executor, pod


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _count(raw: Any) -> int | None:
    """A HINCRBY counter's value, or None when it is not an integer."""
    try:
        value = int(raw)
    except (TypeError, ValueError):
        return None
    return value if value in _COUNTER_RANGE else None

