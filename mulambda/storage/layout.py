"""Where a model lives in S3: URIs, version folders and safe relative paths.

A model lives under ``s3://BUCKET/PREFIX/VERSION/`` where VERSION is a
non-negative integer folder holding a TensorFlow SavedModel, exactly the
layout TF Serving expects on local disk.

Standard library only, so that ``mulambda models --help`` and the CRD
contract (:mod:`mulambda.api`) can use these rules without importing an S3
client.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["JOURNAL_NAME", "MANIFEST_NAME", "PUSH_MANIFEST_NAME", "S3_URI", "is_bucket_name",
           "parse_s3_uri", "relpath_is_safe", "unholdable", "version_prefix"]

# The manifest `mulambda models push` writes last into a version's folder in S3.
PUSH_MANIFEST_NAME = ".mulambda-push-manifest.json"
# The loader's own files in a version's folder on disk (companion/loader: what it
# downloaded, and its progress): no object of the version may be named like them.
MANIFEST_NAME = ".mulambda-manifest.json"
JOURNAL_NAME = ".mulambda-journal.json"
# Control characters: a key with a newline was stored under another name by one S3
# server, and they make log lines lie.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# 3-63 lowercase letters, digits, dots and dashes, starting and ending alphanumeric.
_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
#: ``s3://BUCKET[/PREFIX]``: the rule for ``ModelExecutor.spec.model.storageUri``.
S3_URI = re.compile(rf"^s3://(?P<bucket>{_BUCKET})(?:/(?P<prefix>\S*))?$")


def is_bucket_name(name: str) -> bool:
    """True if ``name`` is a bucket name an ``s3://`` URI accepts."""
    return re.fullmatch(_BUCKET, name) is not None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://BUCKET/NAME[/...]`` into ``(bucket, prefix)`` without slashes at the ends."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r} (expected s3://BUCKET/NAME)")
    match = S3_URI.match(uri)
    prefix = ((match.group("prefix") if match else "") or "").strip("/")
    if match is None or not prefix:
        raise ValueError(
            f"expected s3://BUCKET/NAME with a bucket of 3-63 lowercase letters, digits, dots "
            f"or dashes, got {uri!r}")
    if not relpath_is_safe(prefix):
        # "a/../b" was refused by the S3 client half-way; "x//y" was stored as "x/y/".
        raise ValueError(f"the name in {uri!r} must be path parts without '.', '..', empty "
                         "parts, backslashes or control characters")
    return match.group("bucket"), prefix


def version_prefix(prefix: str, version: int) -> str:
    """Key prefix of one version folder: ``PREFIX/VERSION/``."""
    return f"{prefix.strip('/')}/{int(version)}/"


def relpath_is_safe(relpath: str) -> bool:
    """True if a key's path below the version folder stays inside it when written to disk,
    and is text every S3 server and log keeps as it is (UTF-8, no control characters)."""
    parts = relpath.split("/")
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (surrogate escapes)
        return False
    return (bool(relpath) and not relpath.startswith("/") and "\\" not in relpath
            and not _CONTROL.search(relpath)
            and all(part not in ("", ".", "..") for part in parts))


def unholdable(relpaths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Of a version's relative paths, those its folder on disk cannot hold: (unsafe ones,
    :func:`relpath_is_safe`; clashing ones, both a file and a folder, like "assets" beside
    "assets/vocab.txt", or named like the loader's own files). The loader refuses such a
    version (InvalidObjectKey), and ``mulambda models push`` before it uploads."""
    paths = list(relpaths)
    unsafe = [p for p in paths if not relpath_is_safe(p)]
    folders = {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}
    clashing = [p for p in paths if p in folders or p in (MANIFEST_NAME, JOURNAL_NAME)]
    return unsafe, clashing
