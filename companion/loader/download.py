"""Parallel ranged GETs of a version's objects into its partial folder.

Each range is streamed into the file at its offset with ``os.pwrite`` on a
bounded thread pool (memory stays at ``workers x chunk`` whatever the model
size) and checksummed by the worker that fetched it. A range cut off
half-way continues from its last written byte; finished ranges go into the
:class:`~.journal.Journal`.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from minio.error import S3Error, ServerError

from mulambda.storage.s3 import ModelStorage, StoredObject

from .errors import ModelLoadError, RetryPolicy
from .journal import Journal

# Bytes read from the socket per pwrite: big enough to amortise syscalls,
# small enough that workers x chunk stays a few MiB.
CHUNK_SIZE = 1024 * 1024

Progress = Callable[[int], Any]


@dataclass
class _Cursor:
    """One range being fetched; ``written`` survives a failed GET, so a retry resumes."""

    offset: int
    length: int
    written: int = 0


class Downloader:
    """Fetches every unfinished range of ``journal.plans`` into the partial folder."""

    def __init__(self, storage: ModelStorage, bucket: str, journal: Journal, *, workers: int,
                 retry: RetryPolicy, progress: Progress | None) -> None:
        self.storage = storage
        self.bucket = bucket
        self.journal = journal
        self.plans = journal.plans
        self.workers = max(1, workers)
        self.retry = retry
        self.progress = progress
        self.stop = threading.Event()
        self.fetched = 0
        self._fetched_lock = threading.Lock()
        self._local = threading.local()

    def run(self) -> None:
        """Fetch until every range is done; on the first failure stop the others and raise."""
        tasks = [(rel, i) for rel, plan in self.plans.items()
                 for i in range(len(plan.ranges)) if i not in plan.done]
        # Big ranges first: the long tail of a load is one worker on a big file.
        tasks.sort(key=lambda t: -self.plans[t[0]].ranges[t[1]][1])
        with ThreadPoolExecutor(self.workers, thread_name_prefix="model-load") as pool:
            futures: list[Future[None]] = [pool.submit(self._fetch_range, rel, i)
                                           for rel, i in tasks]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                # Let running ranges notice and stop; queued ones never start.
                self.stop.set()
                for f in futures:
                    f.cancel()
                wait(futures)
                self.journal.save(force=True)
                raise failed[0].exception()  # type: ignore[misc]
        self.journal.save(force=True)

    def _count(self, n: int) -> None:
        with self._fetched_lock:
            self.fetched += n
        if self.progress is not None:
            self.progress(n)

    def _fetch_range(self, rel: str, index: int) -> None:
        plan = self.plans[rel]
        cursor = _Cursor(*plan.ranges[index])
        hasher = plan.range_hasher()
        fd = os.open(self.journal.partial / rel, os.O_WRONLY)

        def fetch_the_rest() -> None:
            if self.stop.is_set():
                return
            self._stream_into(fd, plan.obj, cursor, hasher)
            if cursor.written < cursor.length and not self.stop.is_set():
                raise ConnectionError(f"short read of {plan.obj.key}")

        try:
            self.retry.call(fetch_the_rest, f"download {plan.obj.key} at {cursor.offset}",
                            stop=self.stop)
        except ModelLoadError as err:
            if err.permanent or self.stop.is_set() or not _store_fault(err.__cause__):
                raise
            raise self._unreadable(plan.obj, err) from err
        finally:
            os.close(fd)
        if self.stop.is_set() and cursor.written < cursor.length:
            return
        self.journal.mark(rel, index, hasher.hexdigest() if hasher is not None else "")

    def _unreadable(self, obj: StoredObject, err: ModelLoadError) -> ModelLoadError:
        """``err`` as a permanent ``ObjectUnreadable`` if the store still answers for ``obj``.

        A store that fails every GET of one object with a server error while
        it answers a HEAD of the same object is not down: it reports that it
        cannot read the object (SeaweedFS answers 500 InternalError for a
        needle whose CRC does not match, for instance). Retrying that with
        back-off forever, as StorageUnavailable, would hide it.
        """
        try:
            self.storage.client.stat_object(self.bucket, obj.key)
        except Exception:  # the store itself is unavailable: stay transient
            return err
        return ModelLoadError(
            "ObjectUnreadable",
            f"{obj.key}: the store answers for it but every read failed ({err.message}); "
            f"the stored object is probably damaged, push the version again", permanent=True)

    def _stream_into(self, fd: int, obj: StoredObject, cursor: _Cursor, hasher: Any) -> None:
        """GET the rest of the range into the file, advancing ``cursor`` as bytes land."""
        want = cursor.length - cursor.written
        if want == 0:
            return
        start = cursor.offset + cursor.written
        resp = self.storage.get_range(self.bucket, obj.key, start, want)
        try:
            etag = (resp.headers.get("ETag") or "").strip('"')
            if obj.etag and etag and etag != obj.etag:
                raise ModelLoadError(
                    "ObjectChanged",
                    f"{obj.key} changed during download (ETag {obj.etag} -> {etag})",
                    permanent=False,
                )
            view = self._buffer()
            readinto = getattr(resp, "readinto", None)
            got_total = 0
            while got_total < want:
                if self.stop.is_set():
                    break
                part = view[:min(len(view), want - got_total)]
                if readinto is not None:
                    n = readinto(part)
                else:  # a plain file-like response (tests wrap responses this way)
                    data = resp.read(len(part))
                    n = len(data)
                    part[:n] = data
                if not n:
                    break
                got = part[:n]
                _pwrite_all(fd, got, start + got_total)
                # Hash the buffer just written, in this thread, while it is still
                # in cache (no second pass over the file). zlib and hashlib drop
                # the GIL for buffers this big; ISA-L's CRC-32 takes ~20 us per
                # MiB, too short for the GIL to matter.
                if hasher is not None:
                    hasher.update(got)
                got_total += n
                cursor.written += n
                self._count(n)
        finally:
            # RangeResponse.close() keeps the connection for reuse when the body
            # was read to its end; release_conn() is for plain urllib3 responses.
            resp.close()
            resp.release_conn()

    def _buffer(self) -> memoryview:
        """This worker thread's read buffer, allocated once and reused for every range."""
        view: memoryview | None = getattr(self._local, "view", None)
        if view is None:
            view = self._local.view = memoryview(bytearray(CHUNK_SIZE))
        return view


# Server errors that say "busy, try later", not "cannot read this".
_BUSY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "RequestTimeout"})


def _store_fault(exc: BaseException | None) -> bool:
    """True for a server-side error answer (5xx) that is not throttling."""
    if isinstance(exc, S3Error):
        status = exc.response.status if exc.response is not None else 0
        return status >= 500 and exc.code not in _BUSY_CODES
    return isinstance(exc, ServerError) and exc.status_code >= 500 and exc.status_code != 503


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # pwrite may write fewer bytes than asked (signals, some filesystems).
    while data:
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as exc:
            # The model volume, not S3: no retry of the GET helps (taken as S3 being
            # unreachable, a full disk was retried for ever under the wrong reason).
            raise disk_error(exc) from exc
        data = data[n:]
        offset += n


def disk_error(exc: OSError) -> ModelLoadError:
    """A failed write to the model volume as a load error: ``InsufficientDisk`` when it is
    full, ``LocalDiskError`` otherwise; permanent (someone must make room, or give the
    volume more), retried by the companion every ``MULAMBDA_FAILED_RETRY_SECONDS``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ModelLoadError("InsufficientDisk", f"the model volume is full: {exc.strerror}",
                              permanent=True)
    return ModelLoadError("LocalDiskError", f"cannot write the model volume: {exc}",
                          permanent=True)
