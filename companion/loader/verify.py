"""The check of a finished download against its plans: every range, every byte, each checksum."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mulambda.storage.checksums import crc32_combine

from .download import CHUNK_SIZE
from .errors import ModelLoadError
from .plan import FilePlan


def verify(partial: Path, plans: dict[str, FilePlan]) -> int:
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


def _md5_of_file(path: Path) -> str:
    hasher = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            hasher.update(chunk)
    return hasher.hexdigest()
