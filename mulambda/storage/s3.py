"""Model storage in S3-compatible object stores (MinIO in production).

:class:`ModelStorage` wraps :class:`minio.Minio` with the handful of
operations the companion loader and the ``mulambda models`` CLI need, on the
layout :mod:`mulambda.storage.layout` defines (``s3://BUCKET/PREFIX/VERSION/``).

Credentials come only from the environment (``MULAMBDA_S3_ACCESS_KEY`` /
``MULAMBDA_S3_SECRET_KEY``, fed by a Kubernetes Secret). They are never
logged, never part of an error message and never shown by ``repr``.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from .layout import version_prefix
from .manifest import PUSH_MANIFEST_NAME, PushManifest

__all__ = [
    "ENV_ACCESS_KEY",
    "ENV_ENDPOINT",
    "ENV_REGION",
    "ENV_SECRET_KEY",
    "ENV_SECURE",
    "ModelStorage",
    "ObjectChecksums",
    "RangeResponse",
    "StorageErrorInfo",
    "StoredObject",
    "VersionSummary",
    "classify_error",
]

log = logging.getLogger(__name__)

ENV_ENDPOINT = "MULAMBDA_S3_ENDPOINT"
ENV_ACCESS_KEY = "MULAMBDA_S3_ACCESS_KEY"
ENV_SECRET_KEY = "MULAMBDA_S3_SECRET_KEY"
ENV_SECURE = "MULAMBDA_S3_SECURE"
ENV_REGION = "MULAMBDA_S3_REGION"

# Metadata ``mulambda models push`` sets on multipart uploads, so a loader
# can verify multipart ETags without an extra HEAD ?partNumber=1 request.
PART_SIZE_META = "x-amz-meta-mulambda-part-size"
# CRC-32 of the whole object (8 hex digits), computed by ``push`` from the
# source file. Loaders prefer it to the ETag: it is checked end to end, and
# zlib's CRC-32 runs ~5x faster than MD5, which is what bounds a verified
# load on a small node (bench/model_load.py).
CRC32_META = "x-amz-meta-mulambda-crc32"
# A push manifest lists a few entries per file; anything this big is not one.
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class StoredObject:
    """One object of a model version: ``relpath`` is relative to the version folder."""

    key: str
    relpath: str
    size: int
    etag: str


@dataclass(frozen=True)
class VersionSummary:
    """One version folder as ``mulambda models list`` shows it."""

    files: int
    bytes: int
    pushed: bool  # holds a push manifest: complete, every file checkable
    saved_model: bool  # holds saved_model.pb(txt) at its top level


@dataclass(frozen=True)
class ObjectChecksums:
    """What the store can tell about an object's integrity beyond its ETag."""

    crc32: int | None
    part_size: int | None


@dataclass(frozen=True)
class StorageErrorInfo:
    """What an exception from the store means: a CamelCase reason and whether to retry."""

    reason: str
    permanent: bool
    message: str


# S3 error codes -> (reason, permanent). Anything not listed with a 5xx
# status, or any network error, is StorageUnavailable and worth retrying.
_S3_CODES: dict[str, tuple[str, bool]] = {
    "NoSuchBucket": ("BucketNotFound", True),
    "NoSuchKey": ("ModelNotFound", True),
    "AccessDenied": ("AccessDenied", True),
    "InvalidAccessKeyId": ("AccessDenied", True),
    "SignatureDoesNotMatch": ("AccessDenied", True),
    "InvalidToken": ("AccessDenied", True),
    "ExpiredToken": ("AccessDenied", True),
    "AllAccessDisabled": ("AccessDenied", True),
    "InternalError": ("StorageUnavailable", False),
    "ServiceUnavailable": ("StorageUnavailable", False),
    "SlowDown": ("StorageUnavailable", False),
    "RequestTimeout": ("StorageUnavailable", False),
}


def classify_error(exc: BaseException) -> StorageErrorInfo:
    """Map an exception raised while talking to the store to a reason.

    The message names the S3 code and resource, never credentials.
    """
    if isinstance(exc, S3Error):
        reason, permanent = _S3_CODES.get(exc.code or "", ("StorageError", False))
        if exc.code not in _S3_CODES and exc.response is not None and exc.response.status < 500:
            reason, permanent = "StorageError", True
        where = "/".join(p for p in (exc.bucket_name, exc.object_name) if p)
        return StorageErrorInfo(reason, permanent, f"S3 {exc.code}: {exc.message} ({where})")
    if isinstance(exc, ServerError):
        return StorageErrorInfo("StorageUnavailable", False, f"S3 server error {exc.status_code}")
    if isinstance(exc, InvalidResponseError):
        return StorageErrorInfo("StorageUnavailable", False, "invalid response from S3 server")
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError, socket.timeout)):
        return StorageErrorInfo("StorageUnavailable", False,
                                f"cannot reach S3 server: {type(exc).__name__}: {exc}")
    return StorageErrorInfo("StorageError", True, f"{type(exc).__name__}: {exc}")


class ModelStorage:
    """Model versions in an S3-compatible store, over one pooled HTTP client.

    The HTTP pool holds ``max_connections`` keep-alive connections so that
    parallel ranged GETs do not reconnect. urllib3 retries only connection
    set-up briefly; callers (the loader) own the real retry policy because
    they know what can be resumed.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        region: str | None = None,
        *,
        max_connections: int = 16,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not endpoint:
            raise ValueError(f"S3 endpoint is empty (set {ENV_ENDPOINT})")
        endpoint = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
        self.endpoint = endpoint
        self.secure = secure
        self.region = region or None
        self._http = urllib3.PoolManager(
            maxsize=max_connections,
            block=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=urllib3.Retry(total=2, connect=2, read=0, redirect=0, status=0,
                                  backoff_factor=0.2),
        )
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                            secure=secure, region=self.region, http_client=self._http)

    def __repr__(self) -> str:
        # Deliberately no credentials.
        return (f"ModelStorage(endpoint={self.endpoint!r}, secure={self.secure}, "
                f"region={self.region!r})")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, endpoint: str | None = None,
        **kwargs: Any,
    ) -> ModelStorage:
        """Build from ``MULAMBDA_S3_*`` variables; ``endpoint`` overrides the variable."""
        env = os.environ if environ is None else environ
        access_key = env.get(ENV_ACCESS_KEY, "")
        secret_key = env.get(ENV_SECRET_KEY, "")
        pairs = ((ENV_ACCESS_KEY, access_key), (ENV_SECRET_KEY, secret_key))
        missing = [name for name, value in pairs if not value]
        if missing:
            raise ValueError(f"S3 credentials missing: set {' and '.join(missing)}")
        return cls(
            endpoint or env.get(ENV_ENDPOINT, ""),
            access_key,
            secret_key,
            secure=_flag(env.get(ENV_SECURE, "false")),
            region=env.get(ENV_REGION) or None,
            **kwargs,
        )

    def close(self) -> None:
        """Drop pooled connections."""
        self._http.clear()

    # -- reading -----------------------------------------------------------------

    def bucket_exists(self, bucket: str) -> bool:
        return bool(self.client.bucket_exists(bucket))

    def list_versions(self, bucket: str, prefix: str) -> list[int]:
        """Numeric version folders under ``PREFIX/``, ascending. Other folders are ignored."""
        versions: set[int] = set()
        base = prefix.strip("/") + "/"
        for obj in self.client.list_objects(bucket, prefix=base, recursive=False):
            name = obj.object_name[len(base):].strip("/")
            if obj.is_dir and name.isdigit():
                versions.add(int(name))
        return sorted(versions)

    def list_version_objects(self, bucket: str, prefix: str, version: int, *,
                             include_manifest: bool = False) -> list[StoredObject]:
        """Every model file of one version, sorted by relative path (folder markers skipped;
        the push manifest only with ``include_manifest``)."""
        base = version_prefix(prefix, version)
        found: list[StoredObject] = []
        for obj in self.client.list_objects(bucket, prefix=base, recursive=True):
            if obj.is_dir or obj.object_name.endswith("/"):
                continue
            rel = obj.object_name[len(base):]
            if rel == PUSH_MANIFEST_NAME and not include_manifest:
                continue
            found.append(StoredObject(obj.object_name, rel, int(obj.size or 0),
                                      (obj.etag or "").strip('"')))
        return sorted(found, key=lambda o: o.relpath)

    def push_manifest(self, bucket: str, prefix: str, version: int
                      ) -> tuple[PushManifest | None, str]:
        """The version's push manifest and its ETag; ``(None, "")`` when there is none.

        Raises ValueError for a manifest that does not parse (the caller decides
        what that means), and the store's errors as usual.
        """
        key = version_prefix(prefix, version) + PUSH_MANIFEST_NAME
        try:
            resp = self.client.get_object(bucket, key)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                return None, ""
            raise
        try:
            raw = resp.read(_MAX_MANIFEST_BYTES + 1)
            etag = (resp.headers.get("ETag") or "").strip('"')
        finally:
            resp.close()
            resp.release_conn()
        if len(raw) > _MAX_MANIFEST_BYTES:
            raise ValueError(f"push manifest {key} is larger than {_MAX_MANIFEST_BYTES} bytes")
        return PushManifest.from_json(raw), etag

    def put_push_manifest(self, bucket: str, prefix: str, manifest: PushManifest) -> None:
        """Write the push manifest (the last object of a push)."""
        import io

        raw = manifest.to_json()
        self.client.put_object(bucket, version_prefix(prefix, manifest.version) +
                               PUSH_MANIFEST_NAME, io.BytesIO(raw), len(raw),
                               content_type="application/json")

    def abort_unfinished_uploads(self, bucket: str, prefix: str) -> list[str]:
        """Abort every multipart upload in progress under ``prefix``; the keys they were for.

        Parts of an upload never completed stay in the store (and are billed)
        until aborted. Only called on a version folder being pushed: an upload
        still running there is an abandoned one, or a concurrent push of the
        same version, which is an error anyway.
        """
        aborted: list[str] = []
        for _ in range(1000):  # each round aborts what it listed; 1000 x 1000 uploads at most
            # minio's _list_multipart_uploads / _abort_multipart_upload: the S3 calls,
            # not public in minio-py 7.
            listing = self.client._list_multipart_uploads(bucket, prefix=prefix)
            if not listing.uploads:
                break
            for upload in listing.uploads:
                if upload.object_name and upload.upload_id:
                    self.client._abort_multipart_upload(bucket, upload.object_name,
                                                        upload.upload_id)
                    aborted.append(upload.object_name)
        return aborted

    def has_saved_model(self, bucket: str, prefix: str, version: int) -> bool:
        """True if the version folder holds ``saved_model.pb`` or ``saved_model.pbtxt``."""
        base = version_prefix(prefix, version)
        for obj in self.client.list_objects(bucket, prefix=base + "saved_model.pb"):
            if obj.object_name in (base + "saved_model.pb", base + "saved_model.pbtxt"):
                return True
        return False

    def version_summaries(self, bucket: str, prefix: str) -> dict[int, VersionSummary]:
        """Every numeric version with its files, bytes and completeness, in one recursive
        listing (the push manifest is not counted as a file)."""
        base = prefix.strip("/") + "/"
        found: dict[int, list[Any]] = {}
        for obj in self.client.list_objects(bucket, prefix=base, recursive=True):
            head, _, rest = obj.object_name[len(base):].partition("/")
            if not head.isdigit() or not rest or obj.object_name.endswith("/"):
                continue
            files, total, pushed, saved = found.setdefault(int(head), [0, 0, False, False])
            if rest == PUSH_MANIFEST_NAME:
                found[int(head)][2] = True
                continue
            found[int(head)] = [files + 1, total + int(obj.size or 0), pushed,
                                saved or rest in ("saved_model.pb", "saved_model.pbtxt")]
        return {v: VersionSummary(*found[v]) for v in sorted(found)}

    def version_sizes(self, bucket: str, prefix: str) -> dict[int, tuple[int, int]]:
        """``{version: (files, bytes)}`` for every numeric version, in one recursive listing."""
        return {v: (s.files, s.bytes) for v, s in self.version_summaries(bucket, prefix).items()}

    def object_checksums(self, bucket: str, key: str, *, multipart_parts: int = 0
                         ) -> ObjectChecksums:
        """CRC-32 recorded by ``push`` and, for multipart uploads, the part size.

        The part size is needed to check a multipart ETag (MD5 of the parts'
        MD5s); it comes from ``push``'s metadata, else ``HEAD ?partNumber=1``
        (only asked when there is no CRC-32 to check instead).
        """
        stat = self.client.stat_object(bucket, key)
        meta = {k.lower(): v for k, v in (stat.metadata or {}).items()}
        crc_hex = meta.get(CRC32_META, "")
        crc = int(crc_hex, 16) if len(crc_hex) == 8 and _is_hex(crc_hex) else None
        part = int(meta[PART_SIZE_META]) if meta.get(PART_SIZE_META, "").isdigit() else None
        if crc is None and part is None and multipart_parts:
            part = self._first_part_size(bucket, key)
        return ObjectChecksums(crc32=crc, part_size=part)

    def _first_part_size(self, bucket: str, key: str) -> int | None:
        try:
            first = self.client.stat_object(bucket, key, extra_query_params={"partNumber": "1"})
        except S3Error:
            return None
        headers = {k.lower(): v for k, v in (first.metadata or {}).items()}
        if "x-amz-mp-parts-count" not in headers:
            return None  # the store ignored partNumber and answered for the whole object
        return int(first.size) if first.size else None

    def get_range(self, bucket: str, key: str, offset: int, length: int) -> RangeResponse:
        """Open a streaming GET of ``length`` bytes at ``offset``.

        Returns a :class:`RangeResponse`; the caller must ``close()`` it.
        Nothing is read into memory here.
        """
        return RangeResponse(self.client.get_object(bucket, key, offset=offset, length=length))

    # -- writing -----------------------------------------------------------------

    def make_bucket(self, bucket: str) -> bool:
        """Create ``bucket`` unless it exists; True if this call created it."""
        if self.client.bucket_exists(bucket):
            return False
        try:
            self.client.make_bucket(bucket)
        except S3Error as exc:
            if exc.code != "BucketAlreadyOwnedByYou":
                raise
            return False  # created meanwhile, with the same credentials
        return True

    def put_file(
        self, bucket: str, key: str, stream: BinaryIO, size: int, *, part_size: int,
        progress: Callable[[int], object] | None = None, crc32: int | None = None,
    ) -> str:
        """Upload ``size`` bytes from ``stream``; returns the ETag.

        Large files go up in ``part_size`` parts; the part size (and the
        CRC-32, if given) are recorded as metadata for loaders to verify.
        """
        reader: BinaryIO = _ProgressReader(stream, progress) if progress else stream  # type: ignore[assignment]
        meta: dict[str, str] = {}
        if size > part_size:
            meta[PART_SIZE_META] = str(part_size)
        if crc32 is not None:
            meta[CRC32_META] = f"{crc32:08x}"
        result = self.client.put_object(bucket, key, reader, size, part_size=part_size,
                                        metadata=meta or None)  # type: ignore[arg-type]
        return (result.etag or "").strip('"')

    def remove_version(self, bucket: str, prefix: str, version: int) -> int:
        """Delete every object of one version; returns how many model files were deleted."""
        from minio.deleteobjects import DeleteObject

        everything = self.list_version_objects(bucket, prefix, version, include_manifest=True)
        objects = [o for o in everything if o.relpath != PUSH_MANIFEST_NAME]
        if len(objects) < len(everything):
            # The manifest first: a version losing files stops looking complete at once.
            self.client.remove_object(bucket, version_prefix(prefix, version) +
                                      PUSH_MANIFEST_NAME)
        errors = list(self.client.remove_objects(bucket, (DeleteObject(o.key) for o in objects)))
        if errors:
            first = errors[0]
            raise RuntimeError(f"could not delete {len(errors)} object(s), first: "
                               f"{first.name}: {first.code} {first.message}")
        # Filer-backed stores (SeaweedFS) keep emptied folders, which would still
        # list as a version; delete their markers deepest first. A no-op on MinIO.
        base = version_prefix(prefix, version)
        folders = {base}
        for obj in objects:
            parts = obj.relpath.split("/")[:-1]
            folders.update(base + "/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1))
        for folder in sorted(folders, key=lambda f: -f.count("/")):
            try:
                self.client.remove_object(bucket, folder)
            except S3Error as exc:
                log.debug("folder marker not removed key=%s code=%s", folder, exc.code)
        return len(objects)

class RangeResponse:
    """Body of a ranged GET, read straight into the caller's buffer.

    urllib3's ``read(n)`` returns a fresh ``bytes`` per call (``readinto``
    is the same plus a copy): at 1 GiB that is a thousand 1 MiB allocations,
    each page-faulted in by the kernel. When the body is a plain
    Content-Length stream (no Content-Encoding, not chunked; what S3
    answers to a ranged GET), :meth:`readinto` reads from the underlying
    ``http.client`` response instead, so bytes go from the socket into the
    caller's reused buffer in one copy. Anything else falls back to
    urllib3's ``read``, which decodes and checks as usual. Short bodies are
    not hidden either way: the caller counts bytes against the length it
    asked for.
    """

    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.headers = resp.headers
        raw = getattr(resp, "_fp", None)
        encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
        plain = (isinstance(raw, http.client.HTTPResponse) and not raw.chunked
                 and raw.length is not None and encoding == "identity")
        self._raw: http.client.HTTPResponse | None = raw if plain else None

    def read(self, amt: int) -> bytes:
        if self._raw is not None:
            return self._raw.read(amt)
        return bytes(self._resp.read(amt))

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` (blocking until full or the body ends); returns the byte count."""
        if self._raw is not None:
            return self._raw.readinto(buf)
        data = self._resp.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        """Return the connection to the pool if the body was read to its end, else drop it."""
        if self._raw is not None and self._raw.isclosed():
            # http.client closes its side once Content-Length bytes were read:
            # the connection is clean and can be reused (urllib3 does the same
            # check when it is the one reading).
            self._resp.release_conn()
        self._resp.close()
        self._resp.release_conn()

    def release_conn(self) -> None:
        # Kept for callers written against urllib3 responses; close() releases.
        self._resp.release_conn()


class _ProgressReader:
    """File-like wrapper that reports bytes read (the SDK reads in part-sized chunks)."""

    def __init__(self, stream: BinaryIO, progress: Callable[[int], object]) -> None:
        self._stream = stream
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if data:
            self._progress(len(data))
        return data


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)

