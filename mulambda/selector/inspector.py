"""What the gateway needs of a predict body (:class:`BodyInspector`), without stalling the
event loop.

The gateway and the task API count a TF Serving body's items for the latency model (and
the gateway reads an experiment's sticky-key field), and decoding is the one CPU-bound
step of a request. A body of few JSON containers is decoded
inline: at most :data:`INLINE_CONTAINERS` of them cost about a millisecond. One with
more, a raw tensor as nested lists or a flood of brackets, costs up to seconds (16 MiB of
``[[...]]`` took 20 s) and, on the event loop, stalled every request of every tenant for
as long. Those are decoded in a child process (``python -m mulambda.bodies``), at most
``concurrency`` at a time, killed after ``timeout`` seconds (then the body is refused,
413). The child costs about 70 ms to start, little beside the megabytes such a body is.
"""

from __future__ import annotations

import asyncio
import json
import sys

from mulambda.bodies import BAD_BODY_EXIT, Summary, containers, loads_guarded, summary
from mulambda.httpd import BodyTooLarge

INLINE_CONTAINERS = 4096
INSPECT_TIMEOUT_SECONDS = 5.0


class BodyTooComplex(BodyTooLarge):
    """Decoding the body takes longer than the inspector allows, or its decoder was
    killed (answered 413)."""


class BodyInspector:
    """A predict body's :func:`~mulambda.bodies.summary`; ``ValueError`` when it is not
    valid JSON within :mod:`mulambda.bodies`' limits, :class:`BodyTooComplex` when
    decoding it takes longer than ``timeout``."""

    def __init__(self, timeout: float = INSPECT_TIMEOUT_SECONDS, concurrency: int = 1,
                 inline_containers: int = INLINE_CONTAINERS) -> None:
        self.timeout = timeout
        self.inline_containers = inline_containers
        self._slots = asyncio.Semaphore(concurrency)

    async def inspect(self, body: bytes, field: str | None = None) -> Summary:
        """The body's :class:`~mulambda.bodies.Summary` (``field``: the top-level one whose
        value is wanted)."""
        if containers(body) <= self.inline_containers:
            return summary(loads_guarded(body), field)
        try:
            async with asyncio.timeout(self.timeout):  # waiting for a slot counts too
                async with self._slots:
                    return await self._in_child(body, field)
        except TimeoutError:
            raise BodyTooComplex(
                "request body has too many JSON arrays and objects to inspect within "
                f"{self.timeout:g} s") from None

    async def _in_child(self, body: bytes, field: str | None) -> Summary:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mulambda.bodies", *([field] if field else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await child.communicate(body)
        except BaseException:  # the timeout (or a cancelled request): no orphan left
            if child.returncode is None:
                child.kill()
                await child.wait()
            raise
        if child.returncode == BAD_BODY_EXIT:
            raise ValueError(err.decode(errors="replace").strip())
        if child.returncode is not None and child.returncode < 0:
            # Killed: most likely by the OOM killer (decoding millions of containers takes
            # hundreds of MB; inline, it would have been the selector that was killed).
            raise BodyTooComplex("request body too large to inspect: its decoder was killed "
                                 f"(signal {-child.returncode})")
        if child.returncode != 0:
            raise RuntimeError(f"body inspection failed (exit {child.returncode})")
        items, key, predict = json.loads(out)
        return Summary(int(items), key, bool(predict))
