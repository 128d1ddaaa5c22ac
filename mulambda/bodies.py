"""What a request body holds: JSON decoded within limits (:func:`loads_guarded`), and what
the gateway needs of a TF Serving predict body (:func:`summary`: its items, and the
experiment's sticky-key field).

Light on purpose (no aiohttp): run as ``python -m mulambda.bodies [FIELD]`` it is the
child process :class:`mulambda.selector.inspector.BodyInspector` decodes a large body in
(the body on stdin; ``[items, key]`` as JSON on stdout, exit 0; a ``ValueError``'s
message on stderr, exit 2).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterable
from typing import Any, NamedTuple

# The most of an executor's answer a router reads (the gateway's --max-answer-bytes
# default, the SDK's bound): one model, or one compromised pod, answering without end
# cannot take a router's memory.
MAX_ANSWER_BYTES = 64 << 20


# The header of a body json_body() wrote (and of any other JSON body a router sends).
JSON_HEADERS = {"Content-Type": "application/json"}


def json_body(value: Any) -> bytes:
    """``value`` as a compact JSON request body (as httpx's ``json=`` writes one), arrays
    (numpy's, or anything else whose ``tolist()`` gives lists and numbers) as what they
    hold; ``TypeError`` naming what cannot be JSON, ``ValueError`` for NaN or an infinity.

    Model inputs are usually numpy arrays: ``json`` alone refuses them, and
    every caller would have to call ``tolist()`` first."""
    return json.dumps(value, default=_plain, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _plain(obj: Any) -> Any:
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        held = tolist()
        # Only what JSON holds as it is: a tolist() that gives another such object would
        # be called again and again.
        if held is None or isinstance(held, (list, str, int, float, bool)):
            return held
    raise TypeError(f"{type(obj).__name__!r} cannot be sent as JSON: pass lists, numbers, "
                    "strings and dicts, or arrays with tolist() (numpy)")


class BodyTooLarge(Exception):
    """The body is (or says it is) longer than the limit: 413 for a request's."""


async def collect(chunks: AsyncIterable[bytes], limit: int, what: str) -> bytes:
    """All of ``chunks`` (a body as it arrives), at most ``limit`` bytes:
    :class:`BodyTooLarge` as soon as more came."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"{what} larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)

MAX_JSON_DEPTH = 64
MAX_JSON_INT_DIGITS = 100
# Exit status of the child for a body that is not valid JSON within the limits.
BAD_BODY_EXIT = 2


def containers(body: bytes) -> int:
    """An upper bound of the JSON arrays and objects in ``body`` (brackets in strings
    count too), at C speed: what decoding it costs grows with it."""
    return body.count(b"[") + body.count(b"{")


# Strings may hold brackets; escapes may hold quotes.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % (MAX_JSON_INT_DIGITS + 1))


def _too_deep(body: bytes, limit: int) -> bool:
    """Whether ``body`` nests brackets deeper than ``limit`` (C-speed regex passes: each
    removes the innermost pairs, so ``limit`` passes empty any body within it)."""
    if containers(body) <= limit:
        return False
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        brackets, n = _INNERMOST.subn(b"", brackets)
        if not brackets or not n:
            return False  # within the limit, or unbalanced (the decoder says why)
    return bool(brackets)


def _bounded_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer longer than {MAX_JSON_INT_DIGITS} digits")
    return int(text)


def loads_guarded(body: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses what would otherwise be a 500: nesting deeper than
    ``max_depth``, integers longer than :data:`MAX_JSON_INT_DIGITS` digits. Every
    failure is a ``ValueError`` (``json.JSONDecodeError`` for bad syntax)."""
    raw = body.encode() if isinstance(body, str) else body
    if _too_deep(raw, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    try:
        if _LONG_DIGITS.search(raw) is None:  # the common case: no per-integer hook
            return json.loads(raw)
        return json.loads(raw, parse_int=_bounded_int)
    except RecursionError:  # a guard above missed it: still the client's error
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None


def items_of(payload: Any) -> int:
    """How many items a TF Serving predict body carries (1 when it does not say)."""
    if isinstance(payload, dict):
        for key in ("instances", "inputs"):
            value = payload.get(key)
            if isinstance(value, list):
                return max(1, len(value))
            if isinstance(value, dict):
                first = next(iter(value.values()), None)
                if isinstance(first, list):
                    return max(1, len(first))
    return 1


class Summary(NamedTuple):
    """What a router needs of a body: its items (:func:`items_of`), the value of its
    top-level ``field`` when that is a string or an integer (an experiment's sticky key),
    and whether it is a TF Serving predict request at all (a JSON object with
    ``instances`` or ``inputs``)."""

    items: int
    key: str | None
    predict: bool


def summary(payload: Any, field: str | None) -> Summary:
    """:class:`Summary` of a decoded body."""
    key = None
    if field and isinstance(payload, dict):
        value = payload.get(field)
        if isinstance(value, str | int) and not isinstance(value, bool):
            key = str(value)
    predict = isinstance(payload, dict) and ("instances" in payload or "inputs" in payload)
    return Summary(items_of(payload), key, predict)


def main() -> int:
    field = sys.argv[1] if len(sys.argv) > 1 else None
    try:
        found = summary(loads_guarded(sys.stdin.buffer.read()), field)
    except ValueError as exc:
        print(str(exc)[:500], file=sys.stderr)
        return BAD_BODY_EXIT
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
