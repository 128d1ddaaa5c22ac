"""One SavedModel version uploaded to S3 in TF Serving's layout (``mulambda models push``):
the files a version takes from a folder, what it refuses, and the upload, manifest last.

Standard library only at import, as :mod:`.models` (whose ``--help`` must start fast);
the S3 client and checksums are imported by the upload.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from mulambda.storage.layout import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    PUSH_MANIFEST_NAME,
    unholdable,
    version_prefix,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import logging
    from pathlib import Path

    from mulambda.storage.s3 import ModelStorage, StoredObject

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
# mulambda's own files in a version folder: never pushed as part of a model.
OWN_FILES = (PUSH_MANIFEST_NAME, MANIFEST_NAME, JOURNAL_NAME)
# Versions readers take: 1 up (what a ModelExecutor may pin), and fewer than 16 digits
# (a JSON number of 16 or more is read as a float, and such a heartbeat is dropped).
MAX_VERSION = 10 ** 15 - 1
# Multipart part size of pushes. Loaders fetch multipart objects range by
# range along these parts (to verify each part's MD5 in parallel), so this is
# also their download granularity; see bench/model_load.py.
DEFAULT_PART_SIZE_MIB = 16


class UsageError(Exception):
    """Bad input from the user (exit code 2)."""


class StoreError(Exception):
    """The store refused or failed (exit code 1)."""


class PushResult:
    """What ``push_version`` did (a plain class: dataclasses would import inspect).

    ``kept``: files a resumed push found already uploaded; ``aborted``:
    multipart uploads an interrupted push had left open.
    """

    __slots__ = ("aborted", "bytes", "files", "kept", "replaced")

    def __init__(self, files: int, bytes: int, replaced: bool, kept: int = 0,
                 aborted: int = 0) -> None:
        self.files, self.bytes, self.replaced = files, bytes, replaced
        self.kept, self.aborted = kept, aborted


def logger() -> logging.Logger:
    import logging

    return logging.getLogger(__name__)


def _note(message: str) -> None:
    print(f"mulambda models: note: {message}", file=sys.stderr)


def saved_model_files(src: Path) -> list[Path]:
    """Files of a SavedModel folder, ``saved_model.pb*`` last. Raises UsageError if not one."""
    from mulambda.storage.savedmodel import NotASavedModel, check_saved_model

    if not src.is_dir():
        raise UsageError(f"{src} is not a directory")
    if not any((src / name).is_file() for name in SAVED_MODEL_FILES):
        raise UsageError(
            f"{src} is not a SavedModel folder: no saved_model.pb or saved_model.pbtxt in it "
            f"(pass the version folder itself, e.g. .../half_plus_two/1)")
    try:
        check_saved_model(src)
    except NotASavedModel as exc:
        raise UsageError(f"{src} is not a SavedModel: {exc}") from None
    files = []
    for path in _walk(src):
        rel = path.relative_to(src).as_posix()
        if rel in OWN_FILES:
            # A folder downloaded from a bucket or a companion's cache holds mulambda's
            # own manifest: uploaded as a model file, the version could never load.
            _note(f"skipped {path}: mulambda's own file, not part of the model")
        else:
            files.append(path)
    unsafe, clashing = unholdable(p.relative_to(src).as_posix() for p in files)
    if unsafe or clashing:
        # What the loader refuses (InvalidObjectKey), refused before anything is uploaded.
        names = ", ".join(repr(n) for n in [*unsafe, *clashing][:5])
        raise UsageError(f"{src} holds files a model version cannot have: {names} (names "
                         "must be UTF-8 without control characters or backslashes, and a "
                         "name cannot be both a file and a folder)")
    # The marker goes last so a half-pushed version is never "the latest".
    return sorted(files, key=lambda p: p.relative_to(src).as_posix() in SAVED_MODEL_FILES)


def _walk(src: Path) -> list[Path]:
    """Every file under ``src``, through links to files and to folders alike (the
    folders were skipped, a SavedModel whose ``variables`` was a link was pushed without
    it), in name order; a link back to a folder above is refused."""
    top = src.resolve()
    found: list[Path] = []
    outside: list[str] = []
    above: set[Path] = set()

    def visit(folder: Path) -> None:
        real = folder.resolve()
        if real in above:
            raise UsageError(f"{folder} links back to a folder above it")
        above.add(real)
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink() and not entry.resolve().is_relative_to(top):
                outside.append(f"{entry.relative_to(src)} -> {entry.resolve()}")
            if entry.is_dir():
                visit(entry)
            elif entry.is_file():
                found.append(entry)
            elif entry.is_symlink():
                raise UsageError(f"{entry} is a link to nothing")
        above.discard(real)

    visit(src)
    if outside:
        _note(f"pushing files through links out of {src}: {', '.join(outside)}")
    return found


def push_version(
    storage: ModelStorage, src: Path, bucket: str, prefix: str, version: int, *,
    force: bool = False, part_size: int = DEFAULT_PART_SIZE_MIB * 1024 * 1024,
    progress: Callable[[int], object] | None = None, files: list[Path] | None = None,
) -> PushResult:
    """Upload SavedModel folder ``src`` to ``s3://bucket/prefix/version/``, manifest last.
    ``files``: :func:`saved_model_files` of ``src``, when the caller has them already
    (walked again, its notes were printed twice).

    Without ``force`` a complete version (one with a push manifest) or a
    folder some other tool uploaded (a SavedModel without a manifest) is
    refused; a folder an interrupted push left behind (no manifest, no
    ``saved_model.pb`` yet) is resumed: files already there with the same
    size and CRC-32 are kept. Multipart uploads left open under the version
    are aborted first, and on any failure or interruption of this push.
    """
    from datetime import UTC, datetime

    from mulambda import __version__
    from mulambda.storage.checksums import file_crc32
    from mulambda.storage.manifest import ManifestFile, PushManifest
    from mulambda.storage.savedmodel import check_saved_model

    files = saved_model_files(src) if files is None else files
    saved_name, saved_info = check_saved_model(src)
    if not storage.bucket_exists(bucket):
        raise StoreError(f"bucket {bucket!r} does not exist on {storage.endpoint}")
    base = version_prefix(prefix, version)
    target = f"s3://{bucket}/{base}"
    aborted = storage.abort_unfinished_uploads(bucket, base)
    if aborted:
        logger().warning("aborted unfinished uploads of an interrupted push target=%s keys=%d",
                       target, len(aborted))
    existing = storage.list_version_objects(bucket, prefix, version)
    complete = _has_manifest(storage, bucket, prefix, version)
    if existing and not force:
        if complete:
            raise StoreError(f"{target} already exists ({len(existing)} objects); "
                             "pass --force to replace it")
        if any(o.relpath in SAVED_MODEL_FILES for o in existing):
            raise StoreError(f"{target} already holds a SavedModel without a push manifest "
                             "(uploaded by another tool, or a push interrupted at its very "
                             "end); pass --force to replace it")
    if complete:
        # Replacing: the old version must stop looking complete before any file changes.
        storage.client.remove_object(bucket, base + PUSH_MANIFEST_NAME)
    if force:
        # Its SavedModel too: loaders take a version with one and no manifest as whole
        # (another tool's upload), so a replacement that died, or is still running, left
        # old and new files served together. It is uploaded again last, the manifest after.
        for old in existing:
            if old.relpath in SAVED_MODEL_FILES:
                storage.client.remove_object(bucket, old.key)
    resumable = {} if force else {o.relpath: o for o in existing}
    pushed: list[ManifestFile] = []
    uploaded: set[str] = set()
    kept = total = 0
    try:
        for path in files:
            rel = path.relative_to(src).as_posix()
            key = base + rel
            size = path.stat().st_size
            crc = file_crc32(path)  # a second read, from the page cache; loaders check it
            pushed.append(ManifestFile(rel, size, crc))
            uploaded.add(key)
            total += size
            if _already_there(storage, bucket, resumable.get(rel), size, crc):
                kept += 1
                if progress is not None:
                    progress(size)
                continue
            with path.open("rb") as stream:
                storage.put_file(bucket, key, stream, size, part_size=part_size,
                                 progress=progress, crc32=crc)
    except BaseException:
        # Ctrl-C or a failed upload: do not leave parts in the store; the files
        # already uploaded stay, and the next run of the same push keeps them.
        try:
            storage.abort_unfinished_uploads(bucket, base)
        except Exception as exc:  # the store may be what failed
            logger().warning("could not abort unfinished uploads target=%s error=%s", target, exc)
        raise
    # Objects of the replaced (or interrupted) version that the new one does not have.
    stale = [o for o in existing if o.key not in uploaded]
    if stale:
        from minio.deleteobjects import DeleteObject

        errors = list(storage.client.remove_objects(bucket, (DeleteObject(o.key) for o in stale)))
        if errors:
            raise StoreError(f"pushed, but could not delete {len(errors)} stale object(s)")
    storage.put_push_manifest(bucket, prefix, PushManifest(
        version=version, files=tuple(pushed), saved_model=saved_name,
        meta_graphs=saved_info.meta_graphs, tool=f"mulambda {__version__}",
        pushed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")))
    logger().info("pushed model version target=%s files=%d bytes=%d replaced=%s kept=%d",
                target, len(files), total, complete, kept)
    return PushResult(files=len(files), bytes=total, replaced=bool(existing) and force,
                      kept=kept, aborted=len(aborted))


def _has_manifest(storage: ModelStorage, bucket: str, prefix: str, version: int) -> bool:
    """True if the version holds a push manifest (a malformed one counts: it is replaced)."""
    try:
        return storage.push_manifest(bucket, prefix, version)[0] is not None
    except ValueError:
        return True


def _already_there(storage: ModelStorage, bucket: str, stored: StoredObject | None, size: int,
                   crc: int) -> bool:
    """True if an interrupted push already uploaded this file unchanged (same size and the
    CRC-32 it recorded)."""
    if stored is None or stored.size != size:
        return False
    return storage.object_checksums(bucket, stored.key).crc32 == crc
