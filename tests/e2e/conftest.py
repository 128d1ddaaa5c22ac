"""End-to-end tier: a real cluster with mulambda installed (``make up``).

These tests create and delete resources in the cluster KUBECONFIG points to,
so they run only when selected explicitly (``pytest -m e2e``, ``make e2e``)
and skip, saying why, when no cluster answers or mulambda is not installed.
The namespace must hold the S3 credentials Secret and the model pushed by
``make up``; ``MULAMBDA_E2E_NAMESPACE`` / ``MULAMBDA_E2E_RELEASE`` pick the
Helm release (default ``mulambda`` / ``mulambda``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

NAMESPACE = os.environ.get("MULAMBDA_E2E_NAMESPACE", "mulambda")
RELEASE = os.environ.get("MULAMBDA_E2E_RELEASE", "mulambda")
GROUP, VERSION = "mulambda.io", "v1alpha1"
REACHABILITY_TIMEOUT = 3.0

T = TypeVar("T")


def _e2e_selected(config: pytest.Config) -> bool:
    expr = config.getoption("markexpr") or ""
    return "e2e" in expr and "not e2e" not in expr


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[Any]:
    """An ApiClient for a reachable cluster that has mulambda's CRDs, else skip."""
    if not _e2e_selected(request.config):
        pytest.skip("e2e tests change the cluster KUBECONFIG points to: select them with -m e2e")
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    try:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    except Exception as exc:
        pytest.skip(f"no usable kubeconfig (KUBECONFIG={os.environ.get('KUBECONFIG')!r}): {exc}")
    api = client.ApiClient()
    api.configuration.retries = 0
    try:
        client.VersionApi(api).get_code(_request_timeout=REACHABILITY_TIMEOUT)
    except Exception as exc:
        api.close()
        pytest.skip(f"no Kubernetes cluster answers at {api.configuration.host}: "
                    f"{type(exc).__name__}")
    try:
        client.ApiextensionsV1Api(api).read_custom_resource_definition(
            f"modelexecutors.{GROUP}", _request_timeout=10)
    except ApiException as exc:
        api.close()
        if exc.status == 404:
            pytest.skip("mulambda's CRDs are not installed in this cluster: run `make up`")
        raise
    yield api
    api.close()


@pytest.fixture(scope="session")
def settings_map(kube: Any) -> dict[str, str]:
    """The release's MULAMBDA_* ConfigMap."""
    from kubernetes import client

    cm = client.CoreV1Api(kube).read_namespaced_config_map(f"{RELEASE}-config", NAMESPACE)
    return dict(cm.data or {})


@dataclass(frozen=True)
class Target:
    """Where the e2e tests work, and the helpers they share."""

    namespace: str = NAMESPACE
    release: str = RELEASE
    group: str = GROUP
    version: str = VERSION

    @staticmethod
    def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
                 describe: Callable[[], str] = lambda: "") -> T:
        return wait_for(what, probe, timeout, describe)

    @staticmethod
    def port_forward(namespace: str, target: str, remote_port: int) -> Any:
        return port_forward(namespace, target, remote_port)


@pytest.fixture(scope="session")
def e2e(kube: Any) -> Target:
    """The cluster target (namespace, release) and the shared helpers."""
    return Target()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
             describe: Callable[[], str] = lambda: "", interval: float = 2.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``describe()`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}. {describe()}")
        time.sleep(interval)


@contextlib.contextmanager
def port_forward(namespace: str, target: str, remote_port: int) -> Iterator[int]:
    """``kubectl port-forward`` to a free local port; yields the port."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is needed for port-forwarding")
    proc = subprocess.Popen(
        [kubectl, "-n", namespace, "port-forward", target, f":{remote_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> REMOTE"
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not m:
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"kubectl port-forward {target} failed: {line}{err}")
        yield int(m.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
