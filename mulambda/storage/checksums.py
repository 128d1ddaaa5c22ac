"""CRC-32 checksums of model files: fast (ISA-L when installed) and combinable across ranges."""

from __future__ import annotations

import functools
import os

# CRC-32 (zlib's polynomial and values) from ISA-L when the optional ``isal``
# package is installed: it uses carry-less multiply and checksums a cached
# 1 MiB buffer at ~50 GB/s per core here, against ~4 GB/s for zlib 1.2's table-driven loop, which
# makes verifying a download almost free (bench/model_load.py). zlib
# otherwise; both give identical results.
try:
    from isal.isal_zlib import crc32 as _crc32_impl

    CRC32_IMPL = "isal"
except ImportError:  # pragma: no cover - depends on the environment
    from zlib import crc32 as _crc32_impl

    CRC32_IMPL = "zlib"


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """``zlib.crc32``, computed by ISA-L when available (see :data:`CRC32_IMPL`)."""
    return int(_crc32_impl(data, value))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc(A), crc(B) and len(B) (zlib's algorithm; zlib's
    Python module lacks it). Lets ranges be checksummed in parallel.

    Appending ``len2`` bytes is a linear map on the CRC; it is composed from
    cached maps for 2**k zero bytes, one per set bit of ``len2``. zlib
    rebuilds them on every call, which in pure Python cost ~3 ms per call
    (0.15-0.25 s per GiB in 16 MiB ranges, run after the download, so
    serial); cached, a call takes tens of microseconds.
    """
    if len2 <= 0:
        return crc1
    ops = _zero_operators(len2.bit_length())
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _gf2_times(ops[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def _gf2_times(mat: tuple[int, ...], vec: int) -> int:
    total, i = 0, 0
    while vec:
        if vec & 1:
            total ^= mat[i]
        vec >>= 1
        i += 1
    return total


def _gf2_square(mat: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_gf2_times(mat, mat[n]) for n in range(32))


@functools.lru_cache(maxsize=1)
def _zero_operators_upto(bits: int) -> tuple[tuple[int, ...], ...]:
    one_bit = (0xEDB88320, *(1 << n for n in range(31)))  # operator for one zero bit
    op = _gf2_square(_gf2_square(_gf2_square(one_bit)))  # one zero byte
    ops = [op]
    for _ in range(bits - 1):
        op = _gf2_square(op)
        ops.append(op)
    return tuple(ops)


def _zero_operators(bits: int) -> tuple[tuple[int, ...], ...]:
    """Operators appending 2**k zero bytes to a CRC, for k < max(bits, 64)."""
    return _zero_operators_upto(max(bits, 64))


def file_crc32(path: str | os.PathLike[str], chunk: int = 1024 * 1024) -> int:
    """CRC-32 of a local file, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            crc = crc32(data, crc)
    return crc

