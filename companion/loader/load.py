"""Which version to load, and :func:`load_model_version`: plan, download, verify, publish."""

from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from mulambda.storage.layout import unholdable
from mulambda.storage.manifest import PushManifest
from mulambda.storage.s3 import ModelStorage, StoredObject
from mulambda.storage.savedmodel import NotASavedModel, check_saved_model

from .download import Downloader, Progress, disk_error
from .errors import ModelLoadError, RetryPolicy
from .journal import Journal
from .plan import DEFAULT_PART_SIZE, plan_files
from .publish import (
    Manifest,
    forget_rejected,
    listing_fingerprint,
    local_copy_intact,
    manifest,
    publish,
    read_manifest,
    rejected,
    remember_rejected,
    same_listing,
    version_lock,
)
from .verify import verify

log = logging.getLogger(__name__)

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")

# Looking up versions and buckets: a few quick retries.
_LOOKUP = RetryPolicy(retries=3)
# Retries of each store call of a load (listing, each range) before its error counts.
LOAD_RETRIES = 5


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


def resolve_version(storage: ModelStorage, bucket: str, prefix: str, version: int | None) -> int:
    """``version`` if given and present, else the highest *complete* numeric version folder.

    A folder counts as complete once its ``saved_model.pb``/``.pbtxt`` is
    there; ``mulambda models push`` uploads that file last, so a push in
    progress is never picked up as the latest version.
    """
    versions = _LOOKUP.call(lambda: storage.list_versions(bucket, prefix),
                            f"list versions of s3://{bucket}/{prefix}")
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
        if _LOOKUP.call(functools.partial(storage.has_saved_model, bucket, prefix, candidate),
                        f"check s3://{bucket}/{prefix}/{candidate}/"):
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
    if not _LOOKUP.call(lambda: storage.bucket_exists(bucket), f"check bucket {bucket}"):
        return ModelLoadError("BucketNotFound", f"bucket {bucket!r} does not exist", permanent=True)
    return ModelLoadError(
        "ModelNotFound", f"no version folders under s3://{bucket}/{prefix}/", permanent=True
    )


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
    retries: int = LOAD_RETRIES,
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
    retry = RetryPolicy(retries, backoff, max_backoff)
    prefix = prefix.strip("/")
    base = Path(models_dir) / model_name
    base.mkdir(parents=True, exist_ok=True)
    final = base / str(version)
    source = f"s3://{bucket}/{prefix}/{version}/"

    with version_lock(base, version):
        try:
            objects = retry.call(lambda: storage.list_version_objects(bucket, prefix, version),
                                 f"list {source}")
        except ModelLoadError as err:
            cached = read_manifest(final)
            if err.permanent or cached is None or not local_copy_intact(final, cached):
                raise
            # The store is down but we hold a verified copy: serving it beats failing.
            log.warning("storage unavailable, using cached copy model=%s version=%d error=%r",
                        model_name, version, err.message)
            return _cached_result(final, cached, version, started)

        _refuse_unloadable(storage, bucket, prefix, source, objects, retry)
        pushed, pushed_etag = _push_manifest(storage, bucket, prefix, version, source, retry)
        cached = read_manifest(final)
        if cached is not None and same_listing(cached, objects, pushed_etag) \
                and local_copy_intact(final, cached):
            log.info("model version already present model=%s version=%d", model_name, version)
            return _cached_result(final, cached, version, started)

        fingerprint = listing_fingerprint(objects, pushed_etag)
        known = rejected(base, version, fingerprint)
        if known is not None:
            # The same bytes failed verification before: say so again, download nothing.
            raise ModelLoadError(known[0], f"{known[1]} (not downloaded again until "
                                 f"{source} changes in storage)", permanent=True)
        try:
            result = _download(storage, bucket, prefix, version, objects, final,
                               workers=workers, part_size=part_size, retry=retry,
                               progress=progress, verify_checksums=verify_checksums,
                               pushed=pushed, pushed_etag=pushed_etag)
        except ModelLoadError as err:
            if err.reason in _REMEMBERED:
                remember_rejected(base, version, fingerprint, err.reason, err.message)
            raise
        forget_rejected(base, version)
        result.seconds = time.monotonic() - started
        log.info("model version loaded model=%s version=%d files=%d bytes=%d fetched=%d "
                 "checksummed=%d seconds=%.2f mb_per_s=%.1f", model_name, version, result.files,
                 result.bytes, result.fetched_bytes, result.checksummed_files, result.seconds,
                 result.fetched_bytes / 1e6 / max(result.seconds, 1e-9))
        return result


# Verdicts about the bytes in storage: the same listing gives the same verdict, so
# they are remembered and not downloaded again until the version changes.
_REMEMBERED = frozenset({"ChecksumMismatch", "NotASavedModel"})


def _push_manifest(storage: ModelStorage, bucket: str, prefix: str, version: int, source: str,
                   retry: RetryPolicy) -> tuple[PushManifest | None, str]:
    """The version's push manifest (None for versions uploaded without one) and its ETag."""
    try:
        return retry.call(lambda: storage.push_manifest(bucket, prefix, version),
                          f"read the push manifest of {source}")
    except ModelLoadError as err:
        if isinstance(err.__cause__, ValueError):  # it is there but does not parse
            raise ModelLoadError("ChecksumMismatch", f"{source}: {err.__cause__}",
                                 permanent=True) from None
        raise


def _refuse_unloadable(storage: ModelStorage, bucket: str, prefix: str, source: str,
                       objects: list[StoredObject], retry: RetryPolicy) -> None:
    """Raise a permanent error, before any download, for what TF Serving could never load."""
    if not objects:
        versions = retry.call(lambda: storage.list_versions(bucket, prefix),
                              f"list s3://{bucket}/{prefix}/")
        if not versions:
            raise _missing_model(storage, bucket, prefix)
        raise ModelLoadError(
            "VersionNotFound",
            f"{source} is empty (available versions: {', '.join(map(str, versions))})",
            permanent=True)
    # Names a folder on disk cannot hold: unsafe ones, one that is both a file and a folder
    # ("assets" beside "assets/vocab.txt"), or the loader's own files (an object named
    # like the journal was overwritten by it and re-downloaded at every attempt).
    key_of = {o.relpath: o.key for o in objects}
    unsafe_paths, clashing_paths = unholdable(key_of)
    unsafe = [key_of[p] for p in unsafe_paths]
    if unsafe:
        raise ModelLoadError("InvalidObjectKey", f"unsafe object keys under {source}: "
                             f"{unsafe[:3]}", permanent=True)
    clashing = [key_of[p] for p in clashing_paths]
    if clashing:
        raise ModelLoadError("InvalidObjectKey", f"object keys under {source} that a folder "
                             f"cannot hold (both a file and a folder, or the loader's own "
                             f"names): {clashing[:3]}", permanent=True)
    if not any(o.relpath in SAVED_MODEL_FILES for o in objects):
        raise ModelLoadError(
            "NotASavedModel",
            f"{source} has no saved_model.pb or saved_model.pbtxt at its top level "
            f"(found: {', '.join(o.relpath for o in objects[:5])})",
            permanent=True)


def _cached_result(final: Path, manifest: Manifest, version: int, started: float) -> LoadResult:
    objs = manifest.get("objects", [])
    return LoadResult(version=version, path=final, bytes=sum(o["size"] for o in objs),
                      files=len(objs), seconds=time.monotonic() - started, downloaded=False)


def _download(storage: ModelStorage, bucket: str, prefix: str, version: int,
              objects: list[StoredObject], final: Path, *, workers: int, part_size: int,
              retry: RetryPolicy, progress: Progress | None,
              verify_checksums: bool, pushed: PushManifest | None = None,
              pushed_etag: str = "") -> LoadResult:
    """Download into ``.partial-VERSION/`` (resuming its journal), verify, publish.

    Nothing reaches ``final`` unless every file passed its check: a failed
    check deletes the partial folder and leaves a published copy untouched.
    """
    partial = final.parent / f".partial-{version}"
    source = f"s3://{bucket}/{prefix}/{version}/"
    plans = plan_files(storage, bucket, objects, part_size=part_size, workers=workers,
                       retry=retry, verify_checksums=verify_checksums, manifest=pushed,
                       source=source)
    partial.mkdir(exist_ok=True)
    journal = Journal(partial, plans)
    reused = journal.restore()
    # Sparse files take no room until written: say now when the rest cannot fit, not
    # after filling the volume.
    needed = sum(plan.obj.size for plan in plans.values()) - reused
    free = shutil.disk_usage(partial).free
    if needed > free:
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelLoadError("InsufficientDisk", f"{source} needs {needed} more bytes; the "
                             f"model volume has {free} free", permanent=True)
    try:
        for rel, plan in plans.items():
            path = partial / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if not plan.done:
                # Sparse file of the final size: ranges land at their offsets.
                with path.open("wb") as f:
                    f.truncate(plan.obj.size)
    except OSError as exc:
        raise disk_error(exc) from exc
    if reused:
        log.info("resuming partial download source=%s reused_bytes=%d", source, reused)

    downloader = Downloader(storage, bucket, journal, workers=workers, retry=retry,
                            progress=progress)
    try:
        downloader.run()
    except ModelLoadError as err:
        if err.reason == "InsufficientDisk":
            # What does not fit is no use kept: the room goes back to the volume.
            shutil.rmtree(partial, ignore_errors=True)
        raise

    try:
        checked = verify(partial, plans)
        try:
            check_saved_model(partial)
        except NotASavedModel as exc:
            raise ModelLoadError("NotASavedModel", f"{source}: {exc}", permanent=True) from None
    except ModelLoadError as err:
        if err.reason in ("ChecksumMismatch", "SizeMismatch", "NotASavedModel"):
            # Never resume from bytes that failed verification.
            shutil.rmtree(partial, ignore_errors=True)
        raise

    journal.remove()
    publish(partial, final, manifest(bucket, prefix, version, objects, pushed_etag))
    return LoadResult(version=version, path=final, bytes=sum(o.size for o in objects),
                      files=len(objects), seconds=0.0, downloaded=True,
                      fetched_bytes=downloader.fetched, checksummed_files=checked)
