"""Local copies of store hashes, kept current by reading only what changed.

Every writer of a mirrored hash ``K`` appends the names of the fields it set
or deleted to the stream ``K:changes`` (XADD, trimmed near
``CHANGES_MAXLEN`` entries), in the same pipeline and after the write. A
reader keeps the id of the last change it applied and, each refresh, asks
for the changes since (XRANGE from that id, inclusive, so the first entry
returned proves nothing was trimmed in between), then reads only those
fields (HMGET). When nothing changed a refresh is one pipelined round trip
of small replies, whatever the size of the hash.

The hash is read whole (HGETALL, with the stream's newest id read first)
when the mirror is new, when the id it kept is gone (the stream was
trimmed past it, or lost in a store restart), when more than
``max_changes`` changes piled up (one HGETALL is cheaper then), and every
``full_every`` seconds regardless (5 minutes): a writer that does not note
its changes (an older version during an upgrade) delays what readers see
by at most that long.

:class:`GroupView` turns a mirror's records into what a
:class:`~mulambda.store.records.Snapshot` holds per executor (live replicas,
summed service times, latency samples per pod), recomputing only the
executors whose records changed or expired.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Changes kept per stream: readers that fall further behind read the hash whole.
CHANGES_MAXLEN = 20_000
# A whole read of 10,000 executors takes seconds of a reader's CPU: rarely.
FULL_RELOAD_SECONDS = 300.0
MAX_CHANGES = 2_000
_EMPTY = "0-0"  # the stream was empty when the hash was read: every entry is new


def changes_key(key: str) -> str:
    """The change stream of hash ``key``."""
    return f"{key}:changes"


def queue_change(pipe: Any, key: str, fields: Iterable[str]) -> None:
    """Writers: note that ``fields`` of hash ``key`` were set or deleted (queue it after
    the write, in the same pipeline)."""
    names = list(fields)
    if names:
        pipe.xadd(changes_key(key), {"f": json.dumps(names)}, maxlen=CHANGES_MAXLEN,
                  approximate=True)


Decode = Callable[[str, str], Any]  # (field, raw value) -> record, or None to skip it


@dataclass
class _Pending:
    """What one mirror asked for in the first round trip."""

    reload: bool
    fields: list[str] | None = None  # changed fields to read (after a poll)


class HashMirror:
    """A local copy of hash ``key``'s decoded records (see the module docstring)."""

    def __init__(self, key: str, decode: Decode, *, full_every: float = FULL_RELOAD_SECONDS,
                 max_changes: int = MAX_CHANGES) -> None:
        self.key = key
        self.stream = changes_key(key)
        self.decode = decode
        self.full_every = full_every
        self.max_changes = max_changes
        self.records: dict[str, Any] = {}
        self.reloads = 0  # whole-hash reads so far (for tests and benchmarks)
        self._last: str | None = None  # None: never read
        self._read_at = -math.inf
        self._pending: _Pending | None = None

    # -- the first round trip --------------------------------------------------------
    def queue_first(self, pipe: Any, now: float) -> None:
        """Queue this refresh's first read: the changes since the last one, or the whole
        hash when it is due."""
        if self._last is None or now - self._read_at >= self.full_every:
            self._queue_reload(pipe)
            self._pending = _Pending(reload=True)
        else:
            start = "-" if self._last == _EMPTY else self._last
            pipe.xrange(self.stream, min=start, max="+", count=self.max_changes + 2)
            self._pending = _Pending(reload=False)

    def _queue_reload(self, pipe: Any) -> None:
        pipe.xrevrange(self.stream, max="+", min="-", count=1)
        pipe.hgetall(self.key)

    def replies_first(self) -> int:
        """How many replies :meth:`queue_first` queued."""
        assert self._pending is not None
        return 2 if self._pending.reload else 1

    def take_first(self, replies: list[Any], now: float) -> dict[str, Any] | None:
        """Apply the first round trip's replies; the changed records (field -> record or
        None when gone), or None when everything may have changed (a reload)."""
        assert self._pending is not None
        if self._pending.reload:
            self._apply_reload(replies, now)
            return None
        entries = replies[0] or []
        if self._last != _EMPTY:
            if not entries or _id(entries[0][0]) != self._last:
                self._pending = _Pending(reload=True)  # trimmed past us, or lost: read it all
                return {}
            entries = entries[1:]
        if len(entries) > self.max_changes:
            self._pending = _Pending(reload=True)
            return {}
        changed: list[str] = []
        for _entry_id, data in entries:
            changed.extend(_fields(data))
        if entries:
            self._last = _id(entries[-1][0])
        fields = list(dict.fromkeys(changed))
        self._pending = _Pending(reload=False, fields=fields) if fields else None
        return {}

    # -- the second round trip (only when something changed) ---------------------------
    def queue_second(self, pipe: Any) -> bool:
        """Queue the reads the first round trip found necessary; False when none."""
        pending = self._pending
        if pending is None:
            return False
        if pending.reload:
            self._queue_reload(pipe)
            return True
        if pending.fields:
            pipe.hmget(self.key, pending.fields)
            return True
        self._pending = None
        return False

    def take_second(self, replies: list[Any], now: float) -> dict[str, Any] | None:
        """Apply the second round trip's replies (as :meth:`take_first` returns them)."""
        pending = self._pending
        assert pending is not None
        if pending.reload:
            self._apply_reload(replies, now)
            return None
        assert pending.fields is not None
        self._pending = None
        changed: dict[str, Any] = {}
        for name, raw in zip(pending.fields, replies[0], strict=True):
            record = None if raw is None else self.decode(name, _text(raw))
            if record is None:
                self.records.pop(name, None)
            else:
                self.records[name] = record
            changed[name] = record
        return changed

    def pending_second(self) -> bool:
        return self._pending is not None

    def _apply_reload(self, replies: list[Any], now: float) -> None:
        newest, raw = replies
        self._last = _id(newest[0][0]) if newest else _EMPTY
        self._read_at = now
        self._pending = None
        self.reloads += 1
        records = {}
        for name, value in (raw or {}).items():
            record = self.decode(_text(name), _text(value))
            if record is not None:
                records[_text(name)] = record
        self.records = records


def _id(entry_id: Any) -> str:
    return _text(entry_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(data: Mapping[Any, Any]) -> list[str]:
    """The field names one change entry lists (an entry that does not parse lists none:
    the periodic reload catches what it meant)."""
    for key, value in data.items():
        if _text(key) == "f":
            try:
                names = json.loads(_text(value))
            except ValueError:
                return []
            return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []
    return []


Reduce = Callable[[Mapping[str, Any], float], tuple[Any, float]]


class GroupView:
    """A mirror's records grouped (``group(field) -> (group, member)``) and each group
    reduced to one value (``reduce(members, now) -> (value or None, next expiry)``),
    recomputed only for groups whose records changed or whose next expiry passed.

    :meth:`current` returns a dict the caller may keep: a new one after a
    change, the same one as last time otherwise.
    """

    def __init__(self, group: Callable[[str], tuple[str, str]], reduce: Reduce) -> None:
        self.group = group
        self.reduce = reduce
        self.members: dict[str, dict[str, Any]] = {}
        self.values: dict[str, Any] = {}
        self._expiry: list[tuple[float, str]] = []
        self._scheduled: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._copy: dict[str, Any] = {}

    def update(self, changed: Mapping[str, Any] | None, records: Mapping[str, Any]) -> None:
        """Take in a mirror's changes (None: everything may have changed, regroup
        ``records``)."""
        if changed is None:
            self.members = {}
            for name, record in records.items():
                group, member = self.group(name)
                self.members.setdefault(group, {})[member] = record
            self._dirty = set(self.members) | set(self.values)
            return
        for name, record in changed.items():
            group, member = self.group(name)
            members = self.members.setdefault(group, {})
            if record is None:
                members.pop(member, None)
                if not members:
                    del self.members[group]
            else:
                members[member] = record
            self._dirty.add(group)

    def current(self, now: float) -> dict[str, Any]:
        while self._expiry and self._expiry[0][0] < now:
            at, group = heapq.heappop(self._expiry)
            if self._scheduled.get(group) == at:
                del self._scheduled[group]
                self._dirty.add(group)
        if not self._dirty:
            return self._copy
        for group in self._dirty:
            value, expires = self.reduce(self.members.get(group, {}), now)
            if value is None:
                self.values.pop(group, None)
            else:
                self.values[group] = value
            if math.isfinite(expires) and expires < self._scheduled.get(group, math.inf):
                self._scheduled[group] = expires
                heapq.heappush(self._expiry, (expires, group))
        self._dirty = set()
        self._copy = dict(self.values)
        return self._copy
