"""Atomic, resumable, verified download of one model version for TF Serving.

TF Serving watches ``MODELS_DIR/NAME/`` and loads any numeric folder it
finds, so a version must appear there complete or not at all. The loader:

1. lists ``s3://BUCKET/PREFIX/VERSION/`` (one LIST call gives keys, sizes
   and ETags) and refuses early what is not a SavedModel;
2. returns at once if ``NAME/VERSION/`` already holds this exact listing
   (a manifest file in the folder records keys, sizes and ETags);
3. downloads into ``NAME/.partial-VERSION/`` on the same volume, by ranged
   GETs on a bounded thread pool, each range streamed into the file at its
   offset with ``os.pwrite`` (memory stays at ``workers x chunk`` whatever
   the model size);
4. verifies every byte count and a checksum wherever the store offers one:
   the CRC-32 ``mulambda models push`` records as metadata (cheapest, end
   to end), else the MD5 ETag of single-part uploads, else a multipart ETag
   whose part size the store reveals; each range is checksummed by the
   worker that fetched it and the pieces are combined, so verification
   runs in parallel too;
5. renames the folder to ``NAME/VERSION/`` (atomic on one filesystem).

Transient failures are retried with exponential back-off and resumed:
finished ranges are recorded in a journal inside the partial folder, and a
range cut off half-way continues from its last written byte. The journal
survives a failed call, so the next call (even from a restarted process)
picks up where this one stopped.

Everything here is synchronous; the companion runs it in a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mulambda.storage.checksums import crc32, crc32_combine
from mulambda.storage.s3 import ModelStorage, StoredObject, classify_error, relpath_is_safe

__all__ = [
    "MANIFEST_NAME",
    "LoadResult",
    "ModelLoadError",
    "load_model_version",
    "local_versions",
    "remove_other_versions",
    "resolve_version",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = ".mulambda-manifest.json"
JOURNAL_NAME = ".mulambda-journal.json"
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")

DEFAULT_PART_SIZE = 16 * 1024 * 1024
# Bytes read from the socket per pwrite: big enough to amortise syscalls,
# small enough that workers x chunk stays a few MiB.
CHUNK_SIZE = 1024 * 1024
# Persist the journal at most this often; losing the last half second of
# progress on a crash costs little, rewriting it per range costs more.
JOURNAL_INTERVAL = 0.5

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_RE = re.compile(r"^([0-9a-f]{32})-(\d+)$")

T = TypeVar("T")
Progress = Callable[[int], Any]


class ModelLoadError(Exception):
    """A load failed. ``reason`` is CamelCase for conditions; ``permanent`` means
    retrying without someone changing something (storage, credentials, spec) will not help.
    """

    def __init__(self, reason: str, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.permanent = permanent

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass
class LoadResult:
    """Outcome of :func:`load_model_version`.

    ``bytes``/``files`` describe the version; ``fetched_bytes`` is what this
    call actually received from the store (0 when cached, less than
    ``bytes`` when a previous attempt was resumed).
    """

    version: int
    path: Path
    bytes: int
    files: int
    seconds: float
    downloaded: bool
    fetched_bytes: int = 0
    checksummed_files: int = 0


# -- version resolution ------------------------------------------------------------


def resolve_version(storage: ModelStorage, bucket: str, prefix: str, version: int | None) -> int:
    """``version`` if given and present, else the highest *complete* numeric version folder.

    A folder counts as complete once its ``saved_model.pb``/``.pbtxt`` is
    there; ``mulambda models push`` uploads that file last, so a push in
    progress is never picked up as the latest version.
    """
    versions = _with_retries(lambda: storage.list_versions(bucket, prefix),
                             f"list versions of s3://{bucket}/{prefix}", retries=3)
    if not versions:
        raise _missing_model(storage, bucket, prefix)
    if version is not None:
        if version not in versions:
            raise ModelLoadError(
                "VersionNotFound",
                f"version {version} of s3://{bucket}/{prefix} not found (available: "
                f"{', '.join(map(str, versions))})",
                permanent=True,
            )
        return version
    for candidate in reversed(versions):
        if _with_retries(functools.partial(storage.has_saved_model, bucket, prefix, candidate),
                         f"check s3://{bucket}/{prefix}/{candidate}/", retries=3):
            return candidate
        log.info("skipping version without saved_model.pb bucket=%s prefix=%s version=%d",
                 bucket, prefix, candidate)
    raise ModelLoadError(
        "NotASavedModel",
        f"no version under s3://{bucket}/{prefix}/ holds a saved_model.pb or saved_model.pbtxt "
        f"(versions: {', '.join(map(str, versions))})",
        permanent=True,
    )


def _missing_model(storage: ModelStorage, bucket: str, prefix: str) -> ModelLoadError:
    # An empty listing does not say whether the bucket exists; ask, since the
    # fix differs (create the bucket vs. push the model).
    exists = _with_retries(lambda: storage.bucket_exists(bucket), f"check bucket {bucket}",
                           retries=3)
    if not exists:
        return ModelLoadError("BucketNotFound", f"bucket {bucket!r} does not exist", permanent=True)
    return ModelLoadError(
        "ModelNotFound", f"no version folders under s3://{bucket}/{prefix}/", permanent=True
    )


# -- local layout ------------------------------------------------------------------


def local_versions(models_dir: Path, model_name: str) -> list[int]:
    """Numeric version folders TF Serving would see under ``models_dir/model_name``."""
    base = Path(models_dir) / model_name
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and p.is_dir())


def remove_other_versions(models_dir: Path, model_name: str, keep: int) -> list[int]:
    """Delete every local version except ``keep`` (and stale partial downloads of others).

    Each folder is first renamed to a hidden name, so TF Serving sees the
    version vanish at once instead of half-deleted. Returns the removed versions.
    """
    base = Path(models_dir) / model_name
    removed: list[int] = []
    if not base.is_dir():
        return removed
    for entry in sorted(base.iterdir()):
        name = entry.name
        if name.isdigit() and int(name) != keep and entry.is_dir():
            trash = base / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            entry.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(int(name))
        elif name.startswith(".partial-") and name[len(".partial-"):].isdigit() \
                and int(name[len(".partial-"):]) < keep and entry.is_dir():
            # Only older ones: a newer partial may be a download in progress.
            shutil.rmtree(entry, ignore_errors=True)
        elif name.startswith(".trash-"):
            shutil.rmtree(entry, ignore_errors=True)
    if removed:
        log.info("removed local versions model=%s removed=%s kept=%d", model_name, removed, keep)
    return sorted(removed)


# -- retries -------------------------------------------------------------------------


def _backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential back-off with jitter, so parallel workers do not retry in lock-step."""
    return min(cap, base * (2 ** attempt)) * (0.5 + random.random() / 2)


def _as_load_error(exc: BaseException, what: str) -> ModelLoadError:
    if isinstance(exc, ModelLoadError):
        return exc
    info = classify_error(exc)
    return ModelLoadError(info.reason, f"{what}: {info.message}", permanent=info.permanent)


def _with_retries(fn: Callable[[], T], what: str, *, retries: int, backoff: float = 0.5,
                  max_backoff: float = 10.0, stop: threading.Event | None = None) -> T:
    """Call ``fn``; retry transient store errors up to ``retries`` times."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            err = _as_load_error(exc, what)
            if err.permanent or attempt >= retries or (stop is not None and stop.is_set()):
                raise err from exc
            delay = _backoff(attempt, backoff, max_backoff)
            log.warning("transient storage error, retrying what=%r attempt=%d delay=%.2fs "
                        "error=%r", what, attempt + 1, delay, err.message)
            attempt += 1
            time.sleep(delay)


# -- plan and journal ----------------------------------------------------------------


@dataclass
class _FilePlan:
    """How one object is fetched and checked."""

    obj: StoredObject
    # "crc32": per-range CRC-32s combined, checked against push's metadata;
    # "stream": MD5 computed while downloading (one range, plain MD5 ETag);
    # "parts": per-range MD5s combined like S3 does (multipart ETag, ranges = upload parts);
    # "whole": MD5 of the finished file (plain MD5 ETag, several ranges);
    # "size": the store gives no usable checksum, sizes only.
    check: str
    ranges: list[tuple[int, int]]
    done: dict[int, str] = field(default_factory=dict)  # range index -> digest hex or ""
    crc32: int | None = None

    def journal_entry(self) -> dict[str, Any]:
        return {"key": self.obj.key, "size": self.obj.size, "etag": self.obj.etag,
                "check": self.check, "ranges": self.ranges, "crc32": self.crc32,
                "done": {str(k): v for k, v in self.done.items()}}


def _split(size: int, part: int) -> list[tuple[int, int]]:
    if size == 0:
        return [(0, 0)]
    return [(off, min(part, size - off)) for off in range(0, size, part)]


def _plan_file(storage: ModelStorage, bucket: str, obj: StoredObject, part_size: int,
               retries: int) -> _FilePlan:
    etag = obj.etag.lower()
    ranges = _split(obj.size, part_size)
    if _MD5_RE.match(etag) and len(ranges) == 1:
        return _FilePlan(obj, "stream", ranges)  # small file: MD5 on the fly, no HEAD
    multipart = _MULTIPART_RE.match(etag)
    count = int(multipart.group(2)) if multipart else 0
    sums = _with_retries(lambda: storage.object_checksums(bucket, obj.key, multipart_parts=count),
                         f"stat {obj.key}", retries=retries)
    if sums.crc32 is not None:
        return _FilePlan(obj, "crc32", ranges, crc32=sums.crc32)
    if _MD5_RE.match(etag):
        return _FilePlan(obj, "whole", ranges)
    if multipart and obj.size > 0 and sums.part_size and -(-obj.size // sums.part_size) == count:
        # Ranges must follow the upload's parts to hash them independently.
        return _FilePlan(obj, "parts", _split(obj.size, sums.part_size))
    log.info("no verifiable checksum, checking size only key=%s etag=%s", obj.key, obj.etag)
    return _FilePlan(obj, "size", ranges)


class _Journal:
    """Finished ranges of a partial download, persisted next to the data."""

    def __init__(self, path: Path, plans: dict[str, _FilePlan]) -> None:
        self.path = path
        self.plans = plans
        self.lock = threading.Lock()
        self._saved_at = 0.0

    def restore(self, partial: Path) -> int:
        """Adopt finished ranges from a previous attempt; returns bytes already there."""
        try:
            old = json.loads(self.path.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return 0
        kept = 0
        for rel, plan in self.plans.items():
            entry = old.get(rel)
            target = partial / rel
            if entry is None or not target.is_file():
                continue
            # Reuse only if it is the same object, cut the same way.
            same = (entry.get("key"), entry.get("size"), entry.get("etag"), entry.get("check"),
                    [tuple(r) for r in entry.get("ranges", [])], entry.get("crc32")) == (
                plan.obj.key, plan.obj.size, plan.obj.etag, plan.check, plan.ranges, plan.crc32)
            if not same or target.stat().st_size != plan.obj.size:
                continue
            plan.done = {int(k): v for k, v in entry.get("done", {}).items()}
            kept += sum(plan.ranges[i][1] for i in plan.done if i < len(plan.ranges))
        return kept

    def mark(self, rel: str, index: int, md5: str) -> None:
        with self.lock:
            self.plans[rel].done[index] = md5
        self.save()

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            if not force and now - self._saved_at < JOURNAL_INTERVAL:
                return
            self._saved_at = now
            data = {"files": {rel: p.journal_entry() for rel, p in self.plans.items()}}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.path)


# -- download ------------------------------------------------------------------------


class _Downloader:
    """Parallel ranged GETs of a set of file plans into a partial folder."""

    def __init__(self, storage: ModelStorage, bucket: str, partial: Path,
                 plans: dict[str, _FilePlan], journal: _Journal, *, workers: int, retries: int,
                 backoff: float, max_backoff: float, progress: Progress | None) -> None:
        self.storage = storage
        self.bucket = bucket
        self.partial = partial
        self.plans = plans
        self.journal = journal
        self.workers = max(1, workers)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.progress = progress
        self.stop = threading.Event()
        self.fetched = 0
        self._fetched_lock = threading.Lock()
        self._local = threading.local()

    def run(self) -> None:
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
        offset, length = plan.ranges[index]
        hasher: Any = None
        if plan.check in ("stream", "parts"):
            hasher = hashlib.md5(usedforsecurity=False)
        elif plan.check == "crc32":
            hasher = _Crc32()
        written = 0
        attempt = 0
        fd = os.open(self.partial / rel, os.O_WRONLY)
        try:
            while written < length:
                if self.stop.is_set():
                    return
                try:
                    written += self._stream_into(fd, plan.obj, offset + written,
                                                 length - written, hasher)
                    if written < length and not self.stop.is_set():
                        raise _PartialRange(0, ConnectionError(f"short read of {plan.obj.key}"))
                except _PartialRange as partial:
                    written += partial.written
                    err = _as_load_error(partial.cause, f"download {plan.obj.key}")
                    if err.permanent or attempt >= self.retries or self.stop.is_set():
                        raise err from partial.cause
                    delay = _backoff(attempt, self.backoff, self.max_backoff)
                    log.warning("range interrupted, resuming key=%s offset=%d written=%d "
                                "attempt=%d delay=%.2fs error=%r", plan.obj.key, offset,
                                written, attempt + 1, delay, err.message)
                    attempt += 1
                    # Sleep on the event so a failure elsewhere cancels the wait.
                    self.stop.wait(delay)
        finally:
            os.close(fd)
        if self.stop.is_set() and written < length:
            return
        self.journal.mark(rel, index, hasher.hexdigest() if hasher is not None else "")

    def _stream_into(self, fd: int, obj: StoredObject, offset: int, length: int,
                     hasher: Any) -> int:
        """GET ``length`` bytes at ``offset`` into the file; returns bytes written.

        Bytes written before an exception are kept: the caller resumes after them.
        """
        if length == 0:
            return 0
        written = 0
        try:
            resp = self.storage.get_range(self.bucket, obj.key, offset, length)
        except Exception as exc:
            raise _PartialRange(0, exc) from exc
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
            while written < length:
                if self.stop.is_set():
                    break
                part = view[:min(len(view), length - written)]
                if readinto is not None:
                    n = readinto(part)
                else:  # a plain file-like response (tests wrap responses this way)
                    data = resp.read(len(part))
                    n = len(data)
                    part[:n] = data
                if not n:
                    break
                got = part[:n]
                _pwrite_all(fd, got, offset + written)
                # Hash the buffer just written, in this thread, while it is still
                # in cache (no second pass over the file). zlib and hashlib drop
                # the GIL for buffers this big; ISA-L's CRC-32 takes ~20 us per
                # MiB, too short for the GIL to matter.
                if hasher is not None:
                    hasher.update(got)
                written += n
                self._count(n)
            return written
        except Exception as exc:
            # The caller resumes after the bytes that did arrive.
            raise _PartialRange(written, exc) from exc
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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # pwrite may write fewer bytes than asked (signals, some filesystems).
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


class _Crc32:
    """CRC-32 (ISA-L or zlib, see mulambda.storage.crc32) behind the hashlib interface."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class _PartialRange(Exception):
    """Carries how many bytes a failed ranged GET did write."""

    def __init__(self, written: int, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.written = written
        self.cause = cause


def _md5_of_file(path: Path) -> str:
    hasher = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            hasher.update(chunk)
    return hasher.hexdigest()


def _verify(partial: Path, plans: dict[str, _FilePlan]) -> int:
    """Check sizes and checksums of a finished download; returns how many files were checksummed."""
    checked = 0
    for rel, plan in plans.items():
        obj = plan.obj
        missing = [i for i in range(len(plan.ranges)) if i not in plan.done]
        if missing:
            raise ModelLoadError("IncompleteDownload", f"{obj.key}: ranges {missing} missing",
                                 permanent=False)
        size = (partial / rel).stat().st_size
        if size != obj.size:
            raise ModelLoadError("SizeMismatch",
                                 f"{obj.key}: {size} bytes on disk, store says {obj.size}",
                                 permanent=False)
        if plan.check == "crc32":
            crc = 0
            for i, (_, length) in enumerate(plan.ranges):
                crc = crc32_combine(crc, int(plan.done[i], 16), length)
            if crc != plan.crc32:
                raise ModelLoadError(
                    "ChecksumMismatch",
                    f"{obj.key}: CRC-32 {crc:08x} does not match the pushed {plan.crc32:08x}",
                    permanent=True)
            checked += 1
            continue
        if plan.check == "stream":
            actual = plan.done[0]
        elif plan.check == "whole":
            actual = _md5_of_file(partial / rel)
        elif plan.check == "parts":
            digests = b"".join(bytes.fromhex(plan.done[i]) for i in range(len(plan.ranges)))
            actual = f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(plan.ranges)}"
        else:
            continue
        if actual != obj.etag.lower():
            raise ModelLoadError("ChecksumMismatch",
                                 f"{obj.key}: MD5 {actual} does not match ETag {obj.etag}",
                                 permanent=True)
        checked += 1
    return checked


# -- manifest ------------------------------------------------------------------------


def _manifest(bucket: str, prefix: str, version: int, objects: list[StoredObject]) -> dict:
    return {
        "bucket": bucket, "prefix": prefix, "version": version,
        "objects": [{"key": o.key, "path": o.relpath, "size": o.size, "etag": o.etag}
                    for o in objects],
    }


def _read_manifest(version_dir: Path) -> dict | None:
    try:
        return json.loads((version_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _local_copy_intact(version_dir: Path, manifest: dict) -> bool:
    """Every file the manifest names is there with its size (cheap; no re-hashing)."""
    for entry in manifest.get("objects", []):
        path = version_dir / entry["path"]
        try:
            if path.stat().st_size != entry["size"]:
                return False
        except OSError:
            return False
    return True


def _same_listing(manifest: dict, objects: list[StoredObject]) -> bool:
    want = {(o["key"], o["size"], o["etag"]) for o in manifest.get("objects", [])}
    return want == {(o.key, o.size, o.etag) for o in objects}


@contextlib.contextmanager
def _version_lock(base: Path, version: int) -> Iterator[None]:
    """Serialise loaders of the same version (e.g. a retry racing a slow attempt)."""
    with (base / f".lock-{version}").open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- entry point ---------------------------------------------------------------------


def load_model_version(
    storage: ModelStorage,
    bucket: str,
    prefix: str,
    version: int,
    models_dir: Path,
    model_name: str,
    *,
    workers: int = 4,
    part_size: int = DEFAULT_PART_SIZE,
    retries: int = 5,
    backoff: float = 0.5,
    max_backoff: float = 10.0,
    progress: Progress | None = None,
    verify_checksums: bool = True,
) -> LoadResult:
    """Make ``models_dir/model_name/version/`` a verified copy of ``s3://bucket/prefix/version/``.

    Raises :class:`ModelLoadError`. ``progress`` (if given) is called from
    worker threads with the number of bytes just received.
    ``verify_checksums=False`` checks sizes only; integrity then rests on TCP
    and the store. The CRC-32 check of pushed models costs about 0.02 CPU s
    per GiB with ISA-L (``isal`` installed), 0.25 s with zlib; MD5 of objects
    uploaded by other tools about 1.4 s per GiB (see bench/model_load.py).
    """
    started = time.monotonic()
    if version < 0:
        raise ModelLoadError("InvalidVersion", f"version must be >= 0, got {version}",
                             permanent=True)
    prefix = prefix.strip("/")
    base = Path(models_dir) / model_name
    base.mkdir(parents=True, exist_ok=True)
    final = base / str(version)
    source = f"s3://{bucket}/{prefix}/{version}/"

    with _version_lock(base, version):
        try:
            objects = _with_retries(
                lambda: storage.list_version_objects(bucket, prefix, version),
                f"list {source}", retries=retries, backoff=backoff, max_backoff=max_backoff)
        except ModelLoadError as err:
            manifest = _read_manifest(final)
            if err.permanent or manifest is None or not _local_copy_intact(final, manifest):
                raise
            # The store is down but we hold a verified copy: serving it beats failing.
            log.warning("storage unavailable, using cached copy model=%s version=%d error=%r",
                        model_name, version, err.message)
            return _cached_result(final, manifest, version, started)

        if not objects:
            versions = _with_retries(lambda: storage.list_versions(bucket, prefix),
                                     f"list s3://{bucket}/{prefix}/", retries=retries)
            if not versions:
                raise _missing_model(storage, bucket, prefix)
            raise ModelLoadError(
                "VersionNotFound",
                f"{source} is empty (available versions: {', '.join(map(str, versions))})",
                permanent=True)
        unsafe = [o.key for o in objects if not relpath_is_safe(o.relpath)]
        if unsafe:
            raise ModelLoadError("InvalidObjectKey", f"unsafe object keys under {source}: "
                                 f"{unsafe[:3]}", permanent=True)
        if not any(o.relpath in SAVED_MODEL_FILES for o in objects):
            raise ModelLoadError(
                "NotASavedModel",
                f"{source} has no saved_model.pb or saved_model.pbtxt at its top level "
                f"(found: {', '.join(o.relpath for o in objects[:5])})",
                permanent=True)

        manifest = _read_manifest(final)
        if manifest is not None and _same_listing(manifest, objects) \
                and _local_copy_intact(final, manifest):
            log.info("model version already present model=%s version=%d", model_name, version)
            return _cached_result(final, manifest, version, started)

        result = _download(storage, bucket, prefix, version, objects, base, final,
                           workers=workers, part_size=part_size, retries=retries,
                           backoff=backoff, max_backoff=max_backoff, progress=progress,
                           verify_checksums=verify_checksums)
        result.seconds = time.monotonic() - started
        log.info("model version loaded model=%s version=%d files=%d bytes=%d fetched=%d "
                 "checksummed=%d seconds=%.2f mb_per_s=%.1f", model_name, version, result.files,
                 result.bytes, result.fetched_bytes, result.checksummed_files, result.seconds,
                 result.fetched_bytes / 1e6 / max(result.seconds, 1e-9))
        return result


def _cached_result(final: Path, manifest: dict, version: int, started: float) -> LoadResult:
    objs = manifest.get("objects", [])
    return LoadResult(version=version, path=final, bytes=sum(o["size"] for o in objs),
                      files=len(objs), seconds=time.monotonic() - started, downloaded=False)


def _download(storage: ModelStorage, bucket: str, prefix: str, version: int,
              objects: list[StoredObject], base: Path, final: Path, *, workers: int,
              part_size: int, retries: int, backoff: float, max_backoff: float,
              progress: Progress | None, verify_checksums: bool) -> LoadResult:
    partial = base / f".partial-{version}"
    partial.mkdir(exist_ok=True)
    if verify_checksums:
        # One HEAD per object for its checksum metadata: in parallel, since on
        # a link with real latency a serial round of HEADs delays every range.
        with ThreadPoolExecutor(max(1, min(workers, len(objects))),
                                thread_name_prefix="model-plan") as pool:
            planned = pool.map(
                lambda o: _plan_file(storage, bucket, o, part_size, retries), objects)
            plans = {o.relpath: plan for o, plan in zip(objects, planned, strict=True)}
    else:
        plans = {o.relpath: _FilePlan(o, "size", _split(o.size, part_size)) for o in objects}
    journal = _Journal(partial / JOURNAL_NAME, plans)
    reused = journal.restore(partial)
    for rel, plan in plans.items():
        path = partial / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not plan.done:
            # Sparse file of the final size: ranges land at their offsets.
            with path.open("wb") as f:
                f.truncate(plan.obj.size)
    if reused:
        log.info("resuming partial download source=s3://%s/%s/%d reused_bytes=%d",
                 bucket, prefix, version, reused)

    downloader = _Downloader(storage, bucket, partial, plans, journal, workers=workers,
                             retries=retries, backoff=backoff, max_backoff=max_backoff,
                             progress=progress)
    downloader.run()

    try:
        checked = _verify(partial, plans)
    except ModelLoadError as err:
        if err.reason in ("ChecksumMismatch", "SizeMismatch"):
            # Never resume from bytes that failed verification.
            shutil.rmtree(partial, ignore_errors=True)
        raise

    (partial / JOURNAL_NAME).unlink(missing_ok=True)
    (partial / MANIFEST_NAME).write_text(
        json.dumps(_manifest(bucket, prefix, version, objects), indent=1))
    _publish(partial, final)
    return LoadResult(version=version, path=final, bytes=sum(o.size for o in objects),
                      files=len(objects), seconds=0.0, downloaded=True,
                      fetched_bytes=downloader.fetched, checksummed_files=checked)


def _publish(partial: Path, final: Path) -> None:
    """Rename the finished folder into place; the version appears whole or not at all."""
    if final.exists():
        # A stale or foreign copy: move it out of TF Serving's sight first.
        old = final.parent / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(final)
    # Make the rename itself durable before the companion tells TF Serving.
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
