"""List-then-watch caches of the operator's children, with a signal that they are complete.

client-go's informer, in small: a paged LIST fills the cache, then a WATCH
from the list's resourceVersion keeps it current (bookmarks move that
version on; a watch the server expired, 410 Gone, is followed by a fresh
LIST that replaces the cache). Once the first LIST of every stream is in,
:attr:`Informers.synced` is set: from then on a child missing from the cache
does not exist, so a handler creates it without a GET first.

Why not kopf's indexes, which did this before: with any ``@kopf.index`` on a
kind, kopf holds every handler of every kind until each object of the
indexed kinds has been indexed once, through one ``ToggleSet`` whose every
change wakes every waiting worker. A restart with N executors (2N children)
woke about 3N workers 4N times: quadratic, minutes at a few thousand
executors. kopf also runs a per-object worker for every event of every
child (the Deployment controller alone writes several per executor). Here
each stream is one thread reading lines, and each event one dict update on
the event loop.

A stream runs in a thread of its own (the client is synchronous and a
watch holds its connection for minutes; the API pool's threads are for
short calls) with an API client of its own (a watch would hold one of the
pool's connections). Every change to the cache is made on the event loop,
in the order the server sent it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from kubernetes import client
from kubernetes.watch.watch import iter_resp_lines

from .api import list_call

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
# What a cache keeps of an object (the fleet reads a few fields, not whole objects).
Trim = Callable[[dict[str, Any]], dict[str, Any]]
# The cache's shape, the one kopf indexes had: key -> [the trimmed object].
Cache = dict[Key, list[dict[str, Any]]]

PAGE = 500
# The server ends a watch after this long; the stream then watches again from the last
# version it saw. The read timeout leaves the server room to end it first.
WATCH_SECONDS = 300
READ_TIMEOUT = WATCH_SECONDS + 30
LIST_TIMEOUT = (5.0, 60.0)  # (connect, read) seconds, per page
RETRY_SECONDS = (0.5, 30.0)  # first and longest wait after a failed list or watch
JOIN_SECONDS = 5.0  # how long stop() waits for each stream's thread to end
COMPACT_DEPTH = 32  # the objects' own fields are a few levels deep


def compact(value: Any, depth: int = 0) -> Any:
    """A copy of decoded JSON whose strings are interned, for what a cache keeps.

    Each watch event is decoded on its own, so without this every cached object
    holds its own copy of every key ("ownerReferences", label names, condition
    fields) and of every value it shares with others (its namespace, its labels,
    the name an executor and its two children have in common). At 1,000 idle
    executors (tracemalloc, after settling) what the caches kept of decoded JSON
    went from 16.5 MB to 10.8 MB, the table of interned strings included.

    Below :data:`COMPACT_DEPTH` levels the value is kept as decoded: a spec's free-form
    fields may nest as deep as the decoder allows, deeper than this recursion may go."""
    if isinstance(value, str):
        return sys.intern(value)
    if depth >= COMPACT_DEPTH:
        return value
    if isinstance(value, dict):
        return {compact(k): compact(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v, depth + 1) for v in value]
    return value


class Expired(Exception):
    """The server no longer has the version a watch started from (410 Gone): list again."""


def watched(namespace: str, patterns: Sequence[str]) -> bool:
    """Whether ``namespace`` matches one of kopf's namespace patterns (comma-separated
    globs; ``!glob`` excludes; a leading exclusion implies a catch-all first; a later
    inclusion only re-admits what the first glob admitted)."""
    for pattern in patterns:
        globs = [glob.strip() for glob in pattern.split(",")]
        if globs[0].startswith("!"):
            globs.insert(0, "*")
        first = matches = fnmatch(namespace, globs[0])
        for glob in globs[1:]:
            if glob.startswith("!"):
                matches = matches and not fnmatch(namespace, glob[1:])
            else:
                matches = matches or (first and fnmatch(namespace, glob))
        if matches:
            return True
    return False


def is_pattern(namespace: str) -> bool:
    return any(ch in namespace for ch in "*?[!,")


@dataclass(frozen=True)
class Change:
    """One watch event, decided: ``obj`` (trimmed, :func:`compact`) to keep under ``key``,
    or None to forget."""

    key: Key
    obj: dict[str, Any] | None


def decide(event: Mapping[str, Any], trim: Trim,
           admit: Callable[[str], bool]) -> tuple[str | None, Change | None]:
    """What one watch event means: (the version it brings, the change to the cache).

    Raises :class:`Expired` for 410 Gone, and RuntimeError for any other error
    event (the stream is then watched again after a wait)."""
    kind = event.get("type")
    obj = event.get("object") or {}
    if kind == "ERROR":
        if obj.get("code") == 410:
            raise Expired(obj.get("message", "410 Gone"))
        raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
    meta = obj.get("metadata") or {}
    version = meta.get("resourceVersion")
    if kind == "BOOKMARK" or not admit(meta.get("namespace", "")):
        return version, None
    key = (meta.get("namespace", ""), meta.get("name", ""))
    return version, Change(key, None if kind == "DELETED" else compact(trim(obj)))


class Stream:
    """One LIST-then-WATCH of one kind in one namespace (None: every namespace) into a
    shared cache; a relist replaces only its own namespace's part."""

    def __init__(self, informers: Informers, kind: str, namespace: str | None,
                 trim: Trim, cache: Cache) -> None:
        self.informers = informers
        self.kind = kind
        self.namespace = namespace
        self.trim = trim
        self.cache = cache
        self.synced = False
        self._call: Any = None  # made in the thread: the client builds it slowly (~1 s)
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"informer-{kind}-{namespace or 'all'}")

    def _list_kwargs(self) -> dict[str, Any]:
        return {"label_selector": self.informers.selector, "_preload_content": False}

    # -- in the stream's thread ----------------------------------------------------
    def _run(self) -> None:
        wait = RETRY_SECONDS[0]
        stopping = self.informers.stopping
        self._call = list_call(self.informers.api_client, self.kind, self.namespace)
        while not stopping.is_set():
            try:
                version = self._relist()
                wait = RETRY_SECONDS[0]
                while not stopping.is_set():
                    version = self._watch(version)
            except Expired as exc:
                log.info("watch expired kind=%s namespace=%s, listing again: %s",
                         self.kind, self.namespace or "*", exc)
            except Exception as exc:
                if stopping.is_set():
                    return
                log.warning("watch failed kind=%s namespace=%s, again in %gs: %s",
                            self.kind, self.namespace or "*", wait, exc)
                stopping.wait(wait)
                wait = min(wait * 2, RETRY_SECONDS[1])

    def _relist(self) -> str:
        items: Cache = {}
        token = None
        admit = self.informers.admit
        while True:
            page = json.loads(self._call(**self._list_kwargs(), limit=PAGE, _continue=token,
                                         _request_timeout=LIST_TIMEOUT).data)
            for obj in page.get("items") or []:
                meta = obj["metadata"]
                if admit(meta.get("namespace", "")):
                    items[(meta["namespace"], meta["name"])] = [compact(self.trim(obj))]
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
        self.informers.post(self._replace, items)
        return str(page["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        response = self._call(**self._list_kwargs(), watch=True, resource_version=version,
                              allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
                              _request_timeout=(5.0, READ_TIMEOUT))
        self._response = response
        try:
            for line in self._lines(response):
                seen, change = decide(json.loads(line), self.trim, self.informers.admit)
                if seen:
                    version = seen
                if change is not None:
                    self.informers.post(self._apply, change)
        finally:
            self._response = None
            response.release_conn()
        return version

    def _lines(self, response: Any) -> Iterator[str]:
        for line in iter_resp_lines(response):
            if self.informers.stopping.is_set():
                return
            if line:
                yield line

    # -- on the event loop ---------------------------------------------------------
    def _replace(self, items: Cache) -> None:
        for key in [k for k in self.cache if self.namespace in (None, k[0])]:
            if key not in items:
                del self.cache[key]
        self.cache.update(items)
        self.synced = True
        self.informers.check_synced()

    def _apply(self, change: Change) -> None:
        if change.obj is None:
            self.cache.pop(change.key, None)
        else:
            self.cache[change.key] = [change.obj]

    def start(self) -> None:
        self._thread.start()

    def interrupt(self) -> None:
        response = self._response
        if response is not None:
            try:
                response.shutdown()
            except Exception:  # already closed, or closing raced the stream's own end
                pass

    def join(self, seconds: float) -> None:
        self._thread.join(seconds)


class Informers:
    """The streams that keep the children's caches, for the namespaces the operator
    watches: one per kind cluster-wide (no namespaces, or patterns: filtered here),
    else one per kind and namespace."""

    def __init__(self, selector: str, namespaces: Sequence[str],
                 kinds: Mapping[str, tuple[Trim, Cache]]) -> None:
        self.api_client = client.ApiClient()
        self.selector = selector
        self.stopping = threading.Event()
        self.synced = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        patterns = [ns for ns in namespaces if is_pattern(ns)]
        if patterns or not namespaces:
            self.admit: Callable[[str], bool] = (
                (lambda ns: watched(ns, namespaces)) if patterns else (lambda ns: True))
            scopes: list[str | None] = [None]
        else:
            self.admit = lambda ns: True
            scopes = list(dict.fromkeys(namespaces))
        self.streams = [Stream(self, kind, scope, trim, cache)
                        for kind, (trim, cache) in kinds.items() for scope in scopes]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for stream in self.streams:
            stream.start()

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the event loop (from a stream's thread), after what was posted
        before it."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed under a stream still reading
            self.stopping.set()

    def check_synced(self) -> None:
        if not self.synced.is_set() and all(stream.synced for stream in self.streams):
            self.synced.set()
            sizes = {stream.kind: len(stream.cache) for stream in self.streams}
            log.info("caches synced %s", " ".join(f"{k}={v}" for k, v in sizes.items()))

    async def stop(self) -> None:
        self.stopping.set()
        for stream in self.streams:
            stream.interrupt()
        await asyncio.to_thread(self._join)
        await asyncio.to_thread(self.api_client.close)

    def _join(self) -> None:
        for stream in self.streams:
            stream.join(JOIN_SECONDS)
