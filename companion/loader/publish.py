"""What TF Serving sees: version folders that appear whole (atomic rename) and vanish at once.

TF Serving watches ``MODELS_DIR/NAME/`` and loads any numeric folder it
finds. A finished download is renamed into place in one step; a folder
being removed is first renamed to a hidden name. The manifest inside each
version folder records the listing it was made from, so a later load of
the same listing is a no-op. A version whose bytes failed verification is
remembered next to the folders (``.rejected-VERSION.json``, with a digest
of its listing), so the same bad bytes are not downloaded again on every
retry; a new push (a new listing) is tried again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mulambda.storage.layout import MANIFEST_NAME
from mulambda.storage.s3 import StoredObject

log = logging.getLogger(__name__)


Manifest = dict[str, Any]


def manifest(bucket: str, prefix: str, version: int, objects: list[StoredObject],
             push_manifest_etag: str = "") -> Manifest:
    """What a published folder was made from: the listing, and the push manifest it was
    checked against (its ETag; empty when the version has none)."""
    return {
        "bucket": bucket, "prefix": prefix, "version": version,
        "push_manifest": push_manifest_etag,
        "objects": [{"key": o.key, "path": o.relpath, "size": o.size, "etag": o.etag}
                    for o in objects],
    }


def read_manifest(version_dir: Path) -> Manifest | None:
    try:
        return json.loads((version_dir / MANIFEST_NAME).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def local_copy_intact(version_dir: Path, manifest: Manifest) -> bool:
    """Every file the manifest names is there with its size (cheap; no re-hashing)."""
    for entry in manifest.get("objects", []):
        path = version_dir / entry["path"]
        try:
            if path.stat().st_size != entry["size"]:
                return False
        except OSError:
            return False
    return True


def same_listing(manifest: Manifest, objects: list[StoredObject],
                 push_manifest_etag: str = "") -> bool:
    """True if ``manifest`` was made from exactly this listing and push manifest."""
    want = {(o["key"], o["size"], o["etag"]) for o in manifest.get("objects", [])}
    return (want == {(o.key, o.size, o.etag) for o in objects}
            and manifest.get("push_manifest", "") == push_manifest_etag)


def listing_fingerprint(objects: list[StoredObject], push_manifest_etag: str) -> str:
    """A short digest of a listing and its push manifest: "the same bytes in storage"."""
    import hashlib

    raw = json.dumps([push_manifest_etag, sorted((o.key, o.size, o.etag) for o in objects)])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _rejected_path(base: Path, version: int) -> Path:
    return base / f".rejected-{version}.json"


def remember_rejected(base: Path, version: int, fingerprint: str, reason: str,
                      message: str) -> None:
    """Record that this exact content of ``version`` failed verification."""
    path = _rejected_path(base, version)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "reason": reason,
                               "message": message}))
    tmp.replace(path)


def rejected(base: Path, version: int, fingerprint: str) -> tuple[str, str] | None:
    """(reason, message) if this exact content of ``version`` failed verification before."""
    try:
        data = json.loads(_rejected_path(base, version).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
        return None
    return str(data.get("reason", "ChecksumMismatch")), str(data.get("message", ""))


def forget_rejected(base: Path, version: int) -> None:
    _rejected_path(base, version).unlink(missing_ok=True)


@contextlib.contextmanager
def version_lock(base: Path, version: int) -> Iterator[None]:
    """Serialise loaders of the same version (e.g. a retry racing a slow attempt)."""
    with (base / f".lock-{version}").open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def publish(partial: Path, final: Path, manifest: Manifest) -> None:
    """Write the manifest and rename the folder into place: it appears whole or not at all."""
    (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    # The files' bytes reach the disk before the rename can: after a crash, a published
    # (verified) copy never holds bytes that were still only in the page cache.
    for path in partial.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if final.exists():
        # A stale or foreign copy: move it out of TF Serving's sight first.
        old = _trash_name(final)
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


def cached_version(models_dir: Path, model_name: str, wanted: int | None) -> int | None:
    """A version this volume holds a verified, intact copy of: ``wanted`` (a pinned one),
    else the highest; None when there is none. What a companion started while the store
    is down can serve (the copy was verified when it was published)."""
    base = Path(models_dir) / model_name
    try:
        held = sorted((int(p.name) for p in base.iterdir() if p.name.isdigit()),
                      reverse=True)
    except OSError:
        return None
    for version in held if wanted is None else [v for v in held if v == wanted]:
        manifest = read_manifest(base / str(version))
        if manifest is not None and local_copy_intact(base / str(version), manifest):
            return version
    return None


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
        partial_of = name.removeprefix(".partial-")
        if name.isdigit() and int(name) != keep and entry.is_dir():
            trash = _trash_name(entry)
            entry.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(int(name))
        elif partial_of != name and partial_of.isdigit() and int(partial_of) < keep \
                and entry.is_dir():
            # Only older ones: a newer partial may be a download in progress.
            shutil.rmtree(entry, ignore_errors=True)
        elif name.startswith(".trash-"):
            shutil.rmtree(entry, ignore_errors=True)
    if removed:
        log.info("removed local versions model=%s removed=%s kept=%d", model_name, removed, keep)
    return sorted(removed)


def _trash_name(folder: Path) -> Path:
    return folder.parent / f".trash-{folder.name}-{uuid.uuid4().hex[:8]}"
