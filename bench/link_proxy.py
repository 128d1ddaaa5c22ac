"""A loopback TCP proxy that simulates a constrained network link, per TCP connection.

    python bench/link_proxy.py --upstream 127.0.0.1:8333 [--mbps-per-conn 80] [--latency-ms 0]
    python bench/link_proxy.py --capacity [--connections 4]

What it simulates, and only that:

* **a throughput cap per TCP connection** (``bytes_per_s``): each direction
  of each connection is paced by its own token bucket (a virtual clock:
  after moving ``n`` bytes the next byte is due ``n / rate`` seconds
  later; at most ``burst_s`` of unused time is banked). This is what limits
  a single stream across a real network: the TCP window over the RTT, or an
  object store's per-connection throttling. Connections do not share a
  budget, so N parallel connections get up to N times the cap, as they
  would on a path whose aggregate capacity is much larger than one
  stream's; when paced, the proxy reads from the upstream no faster than the
  cap, so the server sees TCP back-pressure as it would on a slow path.
* **an optional fixed latency per request** (``latency_s``): bytes from
  the client are held back ``latency_s`` after they arrive before they are
  forwarded. HTTP/1.1 clients send a request and wait for its answer, so
  every request's first response byte comes ``latency_s`` later
  (a one-way delay on the request path, about one RTT per request).
  Connection set-up is not delayed; keep-alive connections are reused.

Not simulated: packet loss, congestion between connections, slow start.

Server -> client bytes move with ``os.splice`` (socket -> pipe -> socket,
never copied into Python), so the proxy costs little CPU; elsewhere it falls
back to ``recv_into`` / ``sendall``. One thread per direction per connection.
:func:`measure_capacity` measures what the proxy can carry uncapped with
N parallel connections, against the same transfer without the proxy.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable

MB = 1_000_000
MiB = 1024 * 1024
PIPE_SIZE = MiB  # /proc/sys/fs/pipe-max-size, the unprivileged maximum, by default
UNPACED_CHUNK = MiB
SPLICE = hasattr(os, "splice")


class Pacer:
    """Token bucket as a virtual clock: ``spend(n)`` sleeps until ``n`` more bytes are due."""

    def __init__(self, bytes_per_s: float | None, burst_s: float = 0.005,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive (or None for no cap)")
        self.rate = bytes_per_s
        self.burst_s = burst_s
        self._clock, self._sleep = clock, sleep
        self._due = clock()
        # Bytes per move: one burst, so a move never runs ahead of the cap by more.
        self.chunk = (UNPACED_CHUNK if bytes_per_s is None
                      else int(min(UNPACED_CHUNK, max(16 * 1024, bytes_per_s * burst_s))))

    def spend(self, n: int) -> None:
        if self.rate is None:
            return
        now = self._clock()
        # Idle time banks at most one burst: the clock never lags further behind.
        self._due = max(self._due, now - self.burst_s) + n / self.rate
        if self._due > now:
            self._sleep(self._due - now)


class LinkProxy:
    """``LinkProxy(upstream_port, bytes_per_s=80e6).start()``; ``endpoint``; ``stop()``.

    A context manager too. ``bytes_per_s=None`` forwards uncapped.
    """

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1",
                 bytes_per_s: float | None = None, latency_s: float = 0.0,
                 burst_s: float = 0.005, use_splice: bool = SPLICE) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.bytes_per_s = bytes_per_s
        self.latency_s = latency_s
        self.burst_s = burst_s
        self.use_splice = use_splice
        self.port = 0
        self.connections = 0
        self.bytes_down = 0  # server -> client
        self.bytes_up = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def describe(self) -> str:
        cap = ("uncapped" if self.bytes_per_s is None
               else f"{self.bytes_per_s / MB:g} MB/s per TCP connection, each direction")
        return f"{cap}, +{self.latency_s * 1000:g} ms per request"

    def start(self) -> LinkProxy:
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        listener.settimeout(0.2)  # accept() polls so stop() is noticed
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # Linux: wakes accept() now
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes threads blocked in recv/splice
        for t in list(self._threads):
            t.join(5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self.connections += 1
            self._sockets.update((client, upstream))
        requests = threading.Thread(target=self._pump_requests, args=(client, upstream),
                                    daemon=True)
        requests.start()
        try:
            pacer = Pacer(self.bytes_per_s, self.burst_s)
            if self.use_splice:
                self._pump_splice(upstream, client, pacer)
            else:
                self._pump_copy(upstream, client, pacer, "bytes_down")
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        requests.join()
        with self._lock:
            self._sockets.difference_update((client, upstream))
        client.close()
        upstream.close()

    def _pump_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        pacer = Pacer(self.bytes_per_s, self.burst_s)
        try:
            while data := client.recv(65536):
                if self.latency_s:
                    # Held back from when it arrived: back-to-back segments of
                    # one request are not delayed twice.
                    arrived = time.monotonic()
                    self._stop.wait(max(0.0, arrived + self.latency_s - time.monotonic()))
                upstream.sendall(data)
                with self._lock:
                    self.bytes_up += len(data)
                pacer.spend(len(data))
            upstream.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _pump_splice(self, src: socket.socket, dst: socket.socket, pacer: Pacer) -> None:
        r, w = os.pipe()
        try:
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # type: ignore[attr-defined]
            src_fd, dst_fd = src.fileno(), dst.fileno()
            while n := os.splice(src_fd, w, pacer.chunk):
                left = n
                while left:
                    left -= os.splice(r, dst_fd, left)
                with self._lock:
                    self.bytes_down += n
                pacer.spend(n)
        finally:
            os.close(r)
            os.close(w)

    def _pump_copy(self, src: socket.socket, dst: socket.socket, pacer: Pacer,
                   counter: str) -> None:
        buf = memoryview(bytearray(pacer.chunk))
        while n := src.recv_into(buf):
            dst.sendall(buf[:n])
            with self._lock:
                setattr(self, counter, getattr(self, counter) + n)
            pacer.spend(n)


# -- a byte source and the capacity measurement ----------------------------------------


class ByteSource:
    """A loopback server that answers each ``b"<n>\\n"`` request with ``n`` bytes.

    Connections are kept alive (one request after another, like HTTP/1.1).
    Used to measure the proxy and in its tests.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._payload = memoryview(bytes(MiB))
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> ByteSource:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._listener.close()

    def __enter__(self) -> ByteSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError), conn.makefile("rb") as requests:
            for line in requests:
                left = int(line)
                while left:
                    piece = self._payload[:min(left, len(self._payload))]
                    conn.sendall(piece)
                    left -= len(piece)


def fetch(sock: socket.socket, n: int, buf: memoryview | None = None) -> float:
    """Ask a :class:`ByteSource` (directly or through a proxy) for ``n`` bytes.

    Returns the seconds until the first byte arrived.
    """
    buf = buf if buf is not None else memoryview(bytearray(MiB))
    started = time.perf_counter()
    sock.sendall(b"%d\n" % n)
    first = None
    got = 0
    while got < n:
        k = sock.recv_into(buf[:min(len(buf), n - got)])
        if not k:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        if first is None:
            first = time.perf_counter() - started
        got += k
    return first or 0.0


def transfer(port: int, connections: int, bytes_per_conn: int) -> float:
    """``connections`` parallel clients each fetch ``bytes_per_conn``; aggregate bytes/s."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    errors: list[BaseException] = []
    start = threading.Barrier(connections + 1)

    def client(sock: socket.socket) -> None:
        try:
            start.wait()
            fetch(sock, bytes_per_conn)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    for s in socks:
        s.close()
    if errors:
        raise errors[0]
    return connections * bytes_per_conn / seconds


def measure_capacity(connections: int = 4, bytes_per_conn: int = 256 * MiB,
                     repeat: int = 3) -> tuple[float, float]:
    """Best aggregate bytes/s (through an uncapped proxy, direct) with ``connections`` streams.

    Source, proxy and clients share this machine's CPUs, so the proxy figure
    is a lower bound of what it can carry for a client in another process.
    """
    with ByteSource() as source, LinkProxy(source.port) as proxy:
        via, direct = 0.0, 0.0
        for _ in range(repeat):
            via = max(via, transfer(proxy.port, connections, bytes_per_conn))
            direct = max(direct, transfer(source.port, connections, bytes_per_conn))
    return via, direct


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", help="host:port to forward to")
    parser.add_argument("--mbps-per-conn", type=float, default=0,
                        help="cap per TCP connection and direction, MB/s (0: uncapped)")
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--capacity", action="store_true",
                        help="measure the uncapped proxy's aggregate throughput and exit")
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    if args.capacity:
        via, direct = measure_capacity(args.connections)
        print(f"{args.connections} parallel connections: through the proxy {via / MB:.0f} MB/s, "
              f"direct {direct / MB:.0f} MB/s")
        return 0
    if not args.upstream:
        parser.error("--upstream or --capacity")
    host, _, port = args.upstream.rpartition(":")
    proxy = LinkProxy(int(port), upstream_host=host or "127.0.0.1",
                      bytes_per_s=args.mbps_per_conn * MB or None,
                      latency_s=args.latency_ms / 1000).start()
    print(f"listening on {proxy.endpoint} -> {args.upstream}: {proxy.describe()}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
