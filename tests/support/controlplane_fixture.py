"""pytest fixtures for the real control plane (support/controlplane.py).

Register with ``pytest_plugins = ["support.controlplane_fixture"]`` in the root
conftest, or import the fixtures into a test module:

    from support.controlplane_fixture import controlplane, cp_namespace  # noqa: F401

Fixtures:
- ``controlplane`` (session): a started ControlPlane; fails (never skips)
  with a message naming ``make controlplane`` when the binaries are missing.
- ``cp_namespace`` / ``cp_restricted_namespace`` (function): a fresh namespace,
  the latter labelled ``pod-security.kubernetes.io/enforce=restricted``;
  deleted after the test.

The start-up time is printed in the terminal summary, and a failing test that
used the control plane gets the tail of each component's log as a report
section ("controlplane logs").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from support.controlplane import BinariesMissing, ControlPlane

_PLUGIN_NAME = "mulambda-controlplane-report"


class _Report:
    """Registered on first use: summary line and log tails on failures."""

    def __init__(self) -> None:
        self.plane: ControlPlane | None = None
        self.error: str | None = None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        report = yield
        if (
            report.failed
            and self.plane is not None
            and "controlplane" in getattr(item, "fixturenames", ())
        ):
            report.sections.append(("controlplane logs", self.plane.log_tail(40)))
        return report

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.plane is not None:
            terminalreporter.write_line(self.plane.summary())
        elif self.error:
            terminalreporter.write_line(f"control plane not started: {self.error}")


def _reporter(config: pytest.Config) -> _Report:
    plugin = config.pluginmanager.get_plugin(_PLUGIN_NAME)
    if plugin is None:
        plugin = _Report()
        config.pluginmanager.register(plugin, _PLUGIN_NAME)
    return plugin  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def controlplane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver, controller manager, scheduler and KWOK with 3 nodes."""
    report = _reporter(request.config)
    missing = None
    try:
        plane = ControlPlane()
    except BinariesMissing as e:
        missing = str(e)
    if missing is not None:  # outside the except: no chained traceback
        report.error = missing.splitlines()[0]
        pytest.fail(missing, pytrace=False)
    try:
        plane.start()
    except Exception as e:
        report.error = str(e).splitlines()[0]
        raise  # start() stopped the processes; the logs stay in plane.logs
    report.plane = plane
    try:
        yield plane
    finally:
        # Keep the logs when the session failed: they are what explains it.
        if request.session.testsfailed:
            plane.stop()
        else:
            plane.cleanup()


@pytest.fixture
def cp_namespace(controlplane: ControlPlane) -> Iterator[str]:
    with controlplane.namespace() as name:
        yield name


@pytest.fixture
def cp_restricted_namespace(controlplane: ControlPlane) -> Iterator[str]:
    with controlplane.namespace(restricted=True) as name:
        yield name
