"""How each object of a version is fetched and checked: its ranges and its checksum."""

from __future__ import annotations

import hashlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mulambda.storage.checksums import crc32
from mulambda.storage.s3 import ModelStorage, StoredObject

from .errors import RetryPolicy

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 16 * 1024 * 1024

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")
_MULTIPART_RE = re.compile(r"^([0-9a-f]{32})-(\d+)$")


@dataclass
class FilePlan:
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
    """The cheapest verifiable way to fetch ``obj`` (one HEAD unless its ETag is a plain MD5)."""
    etag = obj.etag.lower()
    ranges = split_ranges(obj.size, part_size)
    if _MD5_RE.match(etag) and len(ranges) == 1:
        return FilePlan(obj, "stream", ranges)  # small file: MD5 on the fly, no HEAD
    multipart = _MULTIPART_RE.match(etag)
    count = int(multipart.group(2)) if multipart else 0
    sums = retry.call(lambda: storage.object_checksums(bucket, obj.key, multipart_parts=count),
                      f"stat {obj.key}")
    if sums.crc32 is not None:
        return FilePlan(obj, "crc32", ranges, crc32=sums.crc32)
    if _MD5_RE.match(etag):
        return FilePlan(obj, "whole", ranges)
    if multipart and obj.size > 0 and sums.part_size and -(-obj.size // sums.part_size) == count:
        # Ranges must follow the upload's parts to hash them independently.
        return FilePlan(obj, "parts", split_ranges(obj.size, sums.part_size))
    log.info("no verifiable checksum, checking size only key=%s etag=%s", obj.key, obj.etag)
    return FilePlan(obj, "size", ranges)


def plan_files(storage: ModelStorage, bucket: str, objects: list[StoredObject], *,
               part_size: int, workers: int, retry: RetryPolicy,
               verify_checksums: bool) -> dict[str, FilePlan]:
    """A plan per object, keyed by its path inside the version folder."""
    if not verify_checksums:
        return {o.relpath: FilePlan(o, "size", split_ranges(o.size, part_size)) for o in objects}
    # One HEAD per object for its checksum metadata: in parallel, since on
    # a link with real latency a serial round of HEADs delays every range.
    with ThreadPoolExecutor(max(1, min(workers, len(objects))),
                            thread_name_prefix="model-plan") as pool:
        planned = pool.map(lambda o: plan_file(storage, bucket, o, part_size, retry), objects)
        return {o.relpath: plan for o, plan in zip(objects, planned, strict=True)}
