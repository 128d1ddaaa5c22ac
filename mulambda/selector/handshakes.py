"""The gateway's own round trip to each replica it forwards to, from its TCP handshakes,
and each request's time on the wire.

What the gateway times of an answer (on the wire: its body sent -> the answer's
headers back, :class:`~mulambda.sdk.counting.Wire`) is its own round trip to the
replica plus the service time. The companions' samples are round trips to the *client* (its
``probeUrl``), which may sit far from the gateway: an external caller 100 ms
away from a replica next to the gateway would have a 50 ms model learned as
taking nothing, in the statistics every router adds up. A TCP connect returns
after one round trip (SYN, SYN-ACK), so each connection the gateway opens is a
sample of its own (name resolution left out), kept per host and port. A request
that opened its connection paid that round trip before its body left: not on the
wire.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp

from mulambda.sdk.counting import Wire

# The least of the last few handshakes: a busy event loop only ever adds to one.
KEPT_SAMPLES = 8


@dataclass
class Probe:
    """What one request's trace learned: where it went and when it was on the wire."""

    key: str = ""
    wire: Wire = field(default_factory=Wire)


class Handshakes:
    """Round trips (ms) per ``host:port``, from the connections a session opens."""

    def __init__(self, perf: Callable[[], float] = time.perf_counter) -> None:
        self.perf = perf
        self._samples: dict[str, deque[float]] = {}

    def add(self, key: str, ms: float) -> None:
        self._samples.setdefault(key, deque(maxlen=KEPT_SAMPLES)).append(max(0.0, ms))

    def network_ms(self, probe: Probe) -> float | None:
        """The network part of the request ``probe`` traced (of its time on the wire), or
        None without a sample."""
        kept = self._samples.get(probe.key)
        return min(kept) if kept else None

    def trace_config(self) -> aiohttp.TraceConfig:
        """Hand to the session: requests made with ``trace_request_ctx=Probe()`` are traced."""
        config = aiohttp.TraceConfig()

        async def request_start(_s: Any, ctx: SimpleNamespace,
                                params: aiohttp.TraceRequestStartParams) -> None:
            if isinstance(ctx.trace_request_ctx, Probe):
                ctx.trace_request_ctx.key = f"{params.url.host}:{params.url.port}"

        async def create_start(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
            ctx.connect_at, ctx.dns_ms = self.perf(), 0.0

        async def dns_start(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
            ctx.dns_at = self.perf()

        async def dns_end(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
            if hasattr(ctx, "dns_at"):
                ctx.dns_ms = (self.perf() - ctx.dns_at) * 1000

        async def create_end(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
            probe = ctx.trace_request_ctx
            if isinstance(probe, Probe) and probe.key and hasattr(ctx, "connect_at"):
                self.add(probe.key, (self.perf() - ctx.connect_at) * 1000 - ctx.dns_ms)

        async def sent(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
            if isinstance(ctx.trace_request_ctx, Probe):  # headers, then each body chunk
                ctx.trace_request_ctx.wire.sent = self.perf()

        async def headers_back(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
            if isinstance(ctx.trace_request_ctx, Probe):
                ctx.trace_request_ctx.wire.back = self.perf()

        config.on_request_start.append(request_start)
        config.on_connection_create_start.append(create_start)
        config.on_dns_resolvehost_start.append(dns_start)
        config.on_dns_resolvehost_end.append(dns_end)
        config.on_connection_create_end.append(create_end)
        config.on_request_headers_sent.append(sent)
        config.on_request_chunk_sent.append(sent)
        config.on_request_end.append(headers_back)
        return config
