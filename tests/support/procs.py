"""Helpers to run real server processes on loopback for tests."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``check`` until it returns True or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # the server is not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s (last error: {last!r})")


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Terminate, then kill, a child process."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class RedisServer:
    """A real ``redis-server`` on a random loopback port (no persistence).

    ``stop()``/``start()`` keep the port, so tests can take the store away and
    bring it back to check that components retry and converge.

    ``password`` protects the default user (``requirepass``). ``acl`` is the
    text of an ACL file (``aclfile``, e.g. :func:`mulambda.store.acl.acl_file`);
    a user ``ADMIN_USER`` with every right is appended for the harness itself
    (``flush``, ``command``), so the file's own default user may be off.
    """

    ADMIN_USER = "test-admin"

    def __init__(self, password: str | None = None, acl: str | None = None,
                 args: Sequence[str] = ()) -> None:
        self.password = password
        self.args = list(args)  # more redis-server flags (e.g. --maxclients for a benchmark)
        self.acl = acl
        self.admin_password = secrets.token_hex(16) if acl is not None else None
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        extra: list[str] = list(self.args)
        if self.password:
            extra += ["--requirepass", self.password]
        if self.acl is not None:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="redis-acl-")
            path = Path(self._dir.name) / "users.acl"
            path.write_text(f"{self.acl.rstrip()}\nuser {self.ADMIN_USER} on "
                            f">{self.admin_password} ~* &* +@all\n")
            extra += ["--aclfile", str(path)]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._pings, 10, f"redis-server on port {self.port}")

    def _pings(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            answer = s.recv(64)
            # With a password, "-NOAUTH" also proves the server is up.
            return answer.startswith(b"+PONG") or answer.startswith(b"-NOAUTH")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def command(self, *args: str) -> bytes:
        """Run one command as the harness (the admin user, or the password); the raw reply."""
        parts: list[list[str]] = []
        if self.admin_password is not None:
            parts.append(["AUTH", self.ADMIN_USER, self.admin_password])
        elif self.password:
            parts.append(["AUTH", self.password])
        parts.append(list(args))
        payload = b"".join(_resp(p) for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload)
            reply = b""
            while reply.count(b"\r\n") < len(parts):
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", len(parts) - 1)[-1]

    def flush(self) -> None:
        self.command("FLUSHALL")


def _resp(args: list[str]) -> bytes:
    """One command in the Redis protocol (arguments may hold spaces)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)
