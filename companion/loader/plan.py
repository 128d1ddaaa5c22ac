"""How each object of a version is fetched and checked: its ranges and its checksum."""

from __future__ import annotations

import hashlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mulambda.storage.checksums import crc32
from mulambda.storage.manifest import PushManifest
from mulambda.storage.s3 import ModelStorage, StoredObject

from .errors import ModelLoadError, RetryPolicy

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 16 * 1024 * 1024

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_RE = re.compile(r"^([0-9a-f]{32})-(\d+)$")


@dataclass
class FilePlan:
    """How one object is fetched and checked."""

    obj: StoredObject
    # "crc32": per-range CRC-32s combined, checked against the push manifest (or the
    #          CRC-32 metadata push set on the object, for versions without a manifest);
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

    def range_hasher(self) -> Any:
        """A fresh hasher for one range (None when ranges are not checksummed one by one)."""
        if self.check in ("stream", "parts"):
            return hashlib.md5(usedforsecurity=False)
        if self.check == "crc32":
            return Crc32()
        return None


class Crc32:
    """CRC-32 (ISA-L or zlib, see mulambda.storage.checksums) behind the hashlib interface."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def split_ranges(size: int, part: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of at most ``part`` bytes; one empty range for an empty file."""
    if size == 0:
        return [(0, 0)]
    return [(off, min(part, size - off)) for off in range(0, size, part)]


def plan_file(storage: ModelStorage, bucket: str, obj: StoredObject, part_size: int,
              retry: RetryPolicy) -> FilePlan:
    """The best check the store offers for ``obj`` (one HEAD for its metadata)."""
    etag = obj.etag.lower()
    ranges = split_ranges(obj.size, part_size)
    multipart = _MULTIPART_RE.match(etag)
    count = int(multipart.group(2)) if multipart else 0
    # Every object, small ones too: the CRC-32 push recorded beats the ETag, which
    # says only what the store holds now, not what was pushed.
    sums = retry.call(lambda: storage.object_checksums(bucket, obj.key, multipart_parts=count),
                      f"stat {obj.key}")
    if sums.crc32 is not None:
        return FilePlan(obj, "crc32", ranges, crc32=sums.crc32)
    if _MD5_RE.match(etag):
        return FilePlan(obj, "stream" if len(ranges) == 1 else "whole", ranges)
    if multipart and obj.size > 0 and sums.part_size and -(-obj.size // sums.part_size) == count:
        # Ranges must follow the upload's parts to hash them independently.
        return FilePlan(obj, "parts", split_ranges(obj.size, sums.part_size))
    log.info("no verifiable checksum, checking size only key=%s etag=%s", obj.key, obj.etag)
    return FilePlan(obj, "size", ranges)


def plan_from_manifest(objects: list[StoredObject], manifest: PushManifest, source: str,
                       part_size: int) -> dict[str, FilePlan]:
    """A CRC-32 plan per object from the push manifest, no HEAD needed.

    The listing must be exactly the manifest: a file missing, added or of
    another size means the version changed after its push (``ChecksumMismatch``).
    """
    pushed = manifest.by_path()
    listed = {o.relpath: o for o in objects}
    problems = [f"{rel}: not in the push manifest" for rel in sorted(listed.keys() - pushed)]
    problems += [f"{rel}: in the push manifest, missing from storage"
                 for rel in sorted(pushed.keys() - listed)]
    problems += [f"{rel}: {listed[rel].size} bytes in storage, {pushed[rel].size} pushed"
                 for rel in sorted(listed.keys() & pushed) if listed[rel].size != pushed[rel].size]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelLoadError("ChecksumMismatch", f"{source} differs from its push manifest: "
                             f"{'; '.join(problems[:3])}{more}", permanent=True)
    return {o.relpath: FilePlan(o, "crc32", split_ranges(o.size, part_size),
                                crc32=pushed[o.relpath].crc32) for o in objects}


def plan_files(storage: ModelStorage, bucket: str, objects: list[StoredObject], *,
               part_size: int, workers: int, retry: RetryPolicy,
               verify_checksums: bool, manifest: PushManifest | None = None,
               source: str = "") -> dict[str, FilePlan]:
    """A plan per object, keyed by its path inside the version folder.

    With a push manifest every file is checked against it; without one
    (uploaded by another tool, or by a push older than manifests) each
    object's own metadata and ETag decide.
    """
    if not verify_checksums:
        return {o.relpath: FilePlan(o, "size", split_ranges(o.size, part_size)) for o in objects}
    if manifest is not None:
        return plan_from_manifest(objects, manifest, source, part_size)
    # One HEAD per object for its checksum metadata: in parallel, since on
    # a link with real latency a serial round of HEADs delays every range.
    with ThreadPoolExecutor(max(1, min(workers, len(objects))),
                            thread_name_prefix="model-plan") as pool:
        planned = pool.map(lambda o: plan_file(storage, bucket, o, part_size, retry), objects)
        return {o.relpath: plan for o, plan in zip(objects, planned, strict=True)}
