"""A real Kubernetes control plane for tests, started the way envtest does.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK (which
plays the kubelets of a few fake nodes: pods bound to them become Running and
Ready) run as local processes on free 127.0.0.1 ports, in a temporary
directory. The binaries come from ``make controlplane``
(hack/controlplane/build.sh), which builds them from the Go modules pinned in
hack/controlplane/go.mod.

    cp = ControlPlane()
    cp.start()            # ~10-30 s; raises ControlPlaneError with log tails
    cp.kubectl("get", "nodes")
    api = cp.api_client()  # kubernetes.client.ApiClient as the admin
    cp.stop()

Certificates come from the openssl CLI: a CA, the API server's serving
certificate, an admin client certificate in ``system:masters``, and the
service-account signing key.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "controlplane" / "build.sh"
BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)
# Nodes KWOK manages carry this annotation; nodes without it are left alone.
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_SELECTOR = f"{KWOK_ANNOTATION}=fake"
# KWOK's default Stages, which build.sh copies from the kwok module beside bin/.
KWOK_STAGES = "share/kwok-stages.yaml"
# Room for a fleet: every executor has a Service (a /24 ran out at 254 in bench/operator_scale).
SERVICE_CIDR = "10.0.0.0/16"
POD_CIDR = "10.244.0.0/16"

MISSING_HINT = (
    "The Kubernetes control plane binaries are not built: run `make controlplane` "
    "(hack/controlplane/build.sh; Go >= 1.26 and the Go module proxy), "
    "or point MULAMBDA_CONTROLPLANE_BIN at a directory holding {bins} "
    f"(and ../{KWOK_STAGES})."
)


class ControlPlaneError(RuntimeError):
    """The control plane could not be found, started or reached."""


class ToolFailed(subprocess.CalledProcessError):
    """kubectl/helm exited non-zero; the message carries its stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr:\n{self.stderr}"


class BinariesMissing(ControlPlaneError):
    """``make controlplane`` has not been run (or MULAMBDA_CONTROLPLANE_BIN is wrong)."""


def find_bin_dir() -> Path:
    """The directory holding the built binaries.

    ``MULAMBDA_CONTROLPLANE_BIN`` wins; otherwise ``build.sh --print-dir`` says
    where the cache entry for the pinned go.mod/go.sum is (it never builds).
    """
    env = os.environ.get("MULAMBDA_CONTROLPLANE_BIN")
    if env:
        bin_dir = Path(env)
    else:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--print-dir"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BinariesMissing(
                MISSING_HINT.format(bins=", ".join(BINARIES)) + f"\n{proc.stderr.strip()}"
            )
        bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if not (bin_dir.parent / KWOK_STAGES).is_file():
        missing.append(str(bin_dir.parent / KWOK_STAGES))
    if missing:
        raise BinariesMissing(
            MISSING_HINT.format(bins=", ".join(BINARIES))
            + f"\n{bin_dir} lacks: {', '.join(missing)}"
        )
    return bin_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


def _ec_key(path: Path) -> None:
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-out", str(path), cwd=path.parent,
    )  # fmt: skip


def _ca(pki: Path, name: str, subject: str) -> None:
    _ec_key(pki / f"{name}.key")
    _openssl(
        "req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.crt", "-days", "3650",
        "-subj", subject,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=pki,
    )  # fmt: skip


def make_cert(pki: Path, name: str, subject: str, extensions: str, ca: str = "ca") -> None:
    """``pki/NAME.crt`` and ``.key`` signed by ``pki/CA.crt``; ``subject`` like
    ``/O=group/CN=user``, ``extensions`` an openssl extfile body."""
    _ec_key(pki / f"{name}.key")
    (pki / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
        cwd=pki,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "365", "-extfile", f"{name}.ext",
        cwd=pki,
    )  # fmt: skip


CLIENT_EXTENSIONS = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)


def make_certs(pki: Path) -> None:
    """CA, apiserver serving cert, admin client cert (``system:masters``),
    front-proxy CA and client, service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _ca(pki, "ca", "/CN=mulambda-test-ca")
    sans = ",".join(
        [
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
            "IP:127.0.0.1",
            "IP:10.0.0.1",  # the `kubernetes` Service's ClusterIP in SERVICE_CIDR
        ]
    )
    make_cert(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n",
    )
    make_cert(pki, "admin", "/O=system:masters/CN=mulambda-admin", CLIENT_EXTENSIONS)
    # Request-header authentication (the aggregation layer), with its own CA as
    # kubeadm has it; without it the controller manager's and scheduler's
    # delegated authentication logs an error every few seconds.
    _ca(pki, "front-proxy-ca", "/CN=mulambda-test-front-proxy-ca")
    make_cert(
        pki, "front-proxy-client", "/CN=front-proxy-client", CLIENT_EXTENSIONS, ca="front-proxy-ca"
    )
    # Service-account tokens: the API server signs with sa.key and verifies
    # with sa.pub; the controller manager signs legacy token Secrets with sa.key.
    _ec_key(pki / "sa.key")
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(
    path: Path, server: str, pki: Path, user: str = "admin", token: str | None = None
) -> None:
    """A kubeconfig for ``server``: client certificate ``pki/USER.crt`` or a bearer token."""
    credentials = (
        {"token": token}
        if token
        else {
            "client-certificate": str(pki / f"{user}.crt"),
            "client-key": str(pki / f"{user}.key"),
        }
    )
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "mulambda-test",
                "cluster": {"server": server, "certificate-authority": str(pki / "ca.crt")},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [
            {"name": "mulambda-test", "context": {"cluster": "mulambda-test", "user": user}}
        ],
        "current-context": "mulambda-test",
    }
    # JSON is YAML: no dependency on a YAML writer here.
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)


def _tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"({e})"
    return "\n".join(data.splitlines()[-lines:])


@dataclass
class Component:
    name: str
    args: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, cwd: Path, env: dict[str, str]) -> None:
        with self.log.open("ab") as out:
            out.write(f"$ {' '.join(self.args)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.args,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ControlPlaneError(
                f"{self.name} exited with {self.proc.returncode}; "
                f"last lines of {self.log}:\n{_tail(self.log, 30)}"
            )

    def terminate(self) -> None:
        """SIGTERM to the group without waiting (stop() waits)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlived the leader still share its group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + controller manager + scheduler + KWOK with fake nodes.

    Attributes after ``start()``: ``server`` (https URL), ``kubeconfig`` (admin,
    ``system:masters``), ``bin`` (binaries), ``logs`` (one file a component),
    ``pki`` (ca.crt, admin.crt/key, sa.key/pub), ``startup_seconds`` and
    ``timings`` (seconds per phase).
    """

    nodes: int = 3
    bin: Path = field(default_factory=find_bin_dir)
    workdir: Path | None = None
    startup_timeout: float = 120.0
    node_allocatable: dict[str, str] = field(
        default_factory=lambda: {"cpu": "32", "memory": "256Gi", "pods": "110"}
    )

    def __post_init__(self) -> None:
        self._own_workdir = self.workdir is None
        self.dir = Path(self.workdir or tempfile.mkdtemp(prefix="mulambda-cp-"))
        self.pki = self.dir / "pki"
        self.logs = self.dir / "logs"
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self.audit_log = self.logs / "audit.log"
        self.server = ""
        self.components: list[Component] = []
        self.timings: dict[str, float] = {}
        self.startup_seconds = 0.0
        self.node_names = [f"kwok-node-{i}" for i in range(self.nodes)]

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> ControlPlane:
        t0 = time.monotonic()
        mark = t0

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.timings[name] = round(now - mark, 2)
            mark = now

        self.logs.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)  # should the caller never reach stop()
        try:
            make_certs(self.pki)
            phase("certs")
            self._start_etcd()
            phase("etcd")
            self._start_apiserver()
            phase("kube-apiserver")
            self._start_controllers()
            self._create_nodes()
            self._wait_nodes_ready()
            self._wait_default_service_account()
            phase("controllers+nodes")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = round(time.monotonic() - t0, 2)
        (self.logs / "startup.json").write_text(
            json.dumps({"total": self.startup_seconds, **self.timings}, indent=2)
        )
        return self

    def stop(self) -> None:
        """Terminate every component's process group: the API server's clients
        together, then the API server, then etcd."""
        for component in self.components:
            if component.name not in ("etcd", "kube-apiserver"):
                component.terminate()
        for component in reversed(self.components):
            component.stop()
        self.components.clear()
        atexit.unregister(self.stop)

    def cleanup(self) -> None:
        """Stop and remove the working directory (keeps it when the caller gave it)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- components ----------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        env["HOME"] = str(self.dir)  # kwok and kubectl read ~/.kwok, ~/.kube
        return env

    def _launch(self, name: str, args: Sequence[str]) -> Component:
        component = Component(name, [str(self.bin / name), *args], self.logs / f"{name}.log")
        component.start(self.dir, self._env())
        self.components.append(component)
        return component

    def _wait(self, what: str, check: Any, timeout: float | None = None) -> Any:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        last: object = None
        while time.monotonic() < deadline:
            for c in self.components:
                c.check_alive()
            try:
                result = check()
            except Exception as e:
                last = e
            else:
                if result:
                    return result
            time.sleep(0.2)
        raise ControlPlaneError(
            f"timed out waiting for {what} (last: {last!r})\n{self.log_tail(20)}"
        )

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        self._launch(
            "etcd",
            [
                "--name=mulambda-test",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=mulambda-test={peer_url}",
                "--unsafe-no-fsync",  # test data: durability is not wanted, speed is
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", client, timeout=2)
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                return resp.status == 200 and b'"true"' in resp.read()
            finally:
                conn.close()

        self._wait("etcd /health", healthy)

    def _start_apiserver(self) -> None:
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        pki = self.pki
        self._launch(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--authorization-mode=Node,RBAC",
                # The 1.36 defaults include NamespaceLifecycle, ServiceAccount
                # (token projection), PodSecurity, ResourceQuota, the webhooks
                # and ValidatingAdmissionPolicy; NodeRestriction is added.
                "--enable-admission-plugins=NodeRestriction",
                f"--service-account-issuer={self.server}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                # The `kubernetes` Service would point at 127.0.0.1, which
                # Endpoints refuse (loopback): leave it without endpoints.
                "--endpoint-reconciler-type=none",
                # Every request of a client under test (the operator's
                # ServiceAccount, tests' own calls), as the server saw it: what
                # the tests count requests and check RBAC use with.
                f"--audit-policy-file={self._write_audit_policy()}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                "--profiling=false",
                "--v=1",
            ],
        )
        write_kubeconfig(self.kubeconfig, self.server, pki)
        self._wait("kube-apiserver /readyz", lambda: self._get("/readyz")[0] == 200)

    def _write_audit_policy(self) -> Path:
        """Metadata-level audit of everyone but the control plane's own components."""
        policy = {
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "None", "users": ["system:kube-controller-manager",
                                            "system:kube-scheduler", "system:apiserver"]},
                {"level": "None", "userGroups": ["system:serviceaccounts:kube-system",
                                                 "system:nodes"]},
                {"level": "None", "resources": [{"group": "coordination.k8s.io",
                                                 "resources": ["leases"]}]},
                {"level": "Metadata"},
            ],
        }
        path = self.dir / "audit-policy.yaml"
        path.write_text(json.dumps(policy))
        return path

    def _start_controllers(self) -> None:
        kc = str(self.kubeconfig)
        delegated = [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--v=1",
        ]
        self._launch(
            "kube-controller-manager",
            [
                *delegated,
                f"--secure-port={free_port()}",
                # Every default-on controller: garbage collector, deployment,
                # replicaset, namespace, serviceaccount(-token), node lifecycle ...
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={self.pki / 'ca.crt'}",
                f"--cluster-signing-key-file={self.pki / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allocate-node-cidrs=false",
                "--concurrent-gc-syncs=5",
            ],
        )
        self._launch("kube-scheduler", [*delegated, f"--secure-port={free_port()}"])
        stages = self.bin.parent / KWOK_STAGES
        self._launch(
            "kwok",
            [
                f"--kubeconfig={kc}",
                f"--config={stages}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_SELECTOR}",
                f"--cidr={POD_CIDR}",
                "--node-ip=127.0.0.1",
                "--node-lease-duration-seconds=40",
            ],
        )

    def _create_nodes(self) -> None:
        from kubernetes import client

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            for name in self.node_names:
                core.create_node(self.node_manifest(name))

    def node_manifest(self, name: str) -> dict[str, Any]:
        """A Node KWOK manages: schedulable, no taints, large allocatable."""
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "type": "kwok",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "spec": {},
            "status": {
                "allocatable": dict(self.node_allocatable),
                "capacity": dict(self.node_allocatable),
            },
        }

    def _wait_nodes_ready(self) -> None:
        from kubernetes import client

        def ready() -> bool:
            with self.api_client() as api:
                nodes = client.CoreV1Api(api).list_node(label_selector="type=kwok").items
            if len(nodes) < len(self.node_names):
                return False
            for node in nodes:
                conditions = {c.type: c.status for c in node.status.conditions or []}
                # The node lifecycle controller lifts the not-ready taint that
                # TaintNodesByCondition set at creation once KWOK reports Ready.
                if conditions.get("Ready") != "True" or node.spec.taints:
                    return False
            return True

        self._wait(f"{len(self.node_names)} KWOK nodes Ready without taints", ready)

    def _wait_default_service_account(self, namespace: str = "default") -> None:
        from kubernetes import client

        def exists() -> bool:
            with self.api_client() as api:
                client.CoreV1Api(api).read_namespaced_service_account("default", namespace)
            return True

        self._wait(f"serviceaccount {namespace}/default", exists)

    # -- access --------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _get(self, path: str) -> tuple[int, bytes]:
        port = int(self.server.rsplit(":", 1)[1])
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, context=self._ssl_context(), timeout=5
        )
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        """GET a path as the admin (e.g. ``/version``) and decode the JSON body."""
        status, body = self._get(path)
        if status != 200:
            raise ControlPlaneError(f"GET {path}: {status} {body[:500]!r}")
        return json.loads(body)

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` as the admin; close it (or use ``with``)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this control plane:
        KUBECONFIG, the binaries first on PATH, kubectl's and helm's caches here."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HELM_"))}
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            KUBECACHEDIR=str(self.dir / "kube-cache"),
            HELM_CACHE_HOME=str(self.dir / "helm" / "cache"),
            HELM_CONFIG_HOME=str(self.dir / "helm" / "config"),
            HELM_DATA_HOME=str(self.dir / "helm" / "data"),
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        return env

    def _run(
        self,
        tool: str,
        args: Sequence[str],
        input: str | None,
        check: bool,
        timeout: float,
        kubeconfig: Path | None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / tool), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise ToolFailed(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl (as the admin unless ``kubeconfig`` says otherwise);
        raises ToolFailed (a CalledProcessError with stderr in its message) unless
        ``check=False``."""
        return self._run("kubectl", args, input, check, timeout, kubeconfig)

    def helm(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 300,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built helm like kubectl (its cache and config under ``dir``)."""
        return self._run("helm", args, input, check, timeout, kubeconfig)

    def service_account_kubeconfig(
        self, namespace: str, name: str, expiration_seconds: int = 3600
    ) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name``
        with a token from the TokenRequest API (what a pod would mount)."""
        from kubernetes import client

        with self.api_client() as api:
            token = (
                client.CoreV1Api(api)
                .create_namespaced_service_account_token(
                    name, namespace, {"spec": {"expirationSeconds": expiration_seconds}}
                )
                .status.token
            )
        path = self.dir / f"sa-{namespace}-{name}.kubeconfig"
        write_kubeconfig(path, self.server, self.pki, user=f"{namespace}-{name}", token=token)
        return path

    @contextlib.contextmanager
    def namespace(
        self, prefix: str = "test", restricted: bool = False, labels: dict[str, str] | None = None
    ) -> Iterator[str]:
        """A fresh namespace (``restricted``: Pod Security ``enforce=restricted``),
        ready for pods (its default ServiceAccount exists), deleted afterwards."""
        from kubernetes import client

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        all_labels = dict(labels or {})
        if restricted:
            all_labels["pod-security.kubernetes.io/enforce"] = "restricted"
            all_labels["pod-security.kubernetes.io/enforce-version"] = "latest"
        with self.api_client() as api:
            client.CoreV1Api(api).create_namespace(
                {"metadata": {"name": name, "labels": all_labels}}
            )
        self._wait_default_service_account(name)
        try:
            yield name
        finally:
            with self.api_client() as api, contextlib.suppress(client.ApiException):
                # The namespace controller finishes the deletion in the background.
                client.CoreV1Api(api).delete_namespace(name)

    # -- diagnostics ---------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` of each component's log, for failure reports."""
        parts = []
        for c in self.components or [
            Component(p.stem, [], p) for p in sorted(self.logs.glob("*.log"))
        ]:
            parts.append(f"===== {c.name} ({c.log}) =====\n{_tail(c.log, lines)}")
        return "\n".join(parts)

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        logs = f"; logs in {self.logs}" if self.logs.exists() else ""
        return (
            f"control plane {self.server} started in {self.startup_seconds:.1f}s ({phases}){logs}"
        )
