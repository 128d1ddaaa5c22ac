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

__all__ = ["S3_URI", "is_bucket_name", "parse_s3_uri", "relpath_is_safe", "version_prefix"]

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
    return match.group("bucket"), prefix


def version_prefix(prefix: str, version: int) -> str:
    """Key prefix of one version folder: ``PREFIX/VERSION/``."""
    return f"{prefix.strip('/')}/{int(version)}/"


def relpath_is_safe(relpath: str) -> bool:
    """True if a key's path below the version folder stays inside it when written to disk."""
    parts = relpath.split("/")
    return (bool(relpath) and not relpath.startswith("/") and "\\" not in relpath
            and all(part not in ("", ".", "..") for part in parts))
