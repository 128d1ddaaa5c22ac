"""Fixtures of the integration tier: the emulated Kubernetes API and kopf operators on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.kube import Kube, running_kube
from support.kube_operator import OperatorRun, Target


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[Kube]:
    """A fresh emulated API server with the project's CRDs installed; KUBECONFIG points at it.

    Fresh per test (it starts in milliseconds), so no test sees another's objects.
    """
    with running_kube(tmp_path) as api:
        yield api


@pytest.fixture
def run_operator(kube: Kube) -> Iterator[Callable[..., OperatorRun]]:
    """Start a kopf operator on ``kube``: ``run_operator("mulambda.operator.main", **options)``.

    Returns the started :class:`OperatorRun` (``.stop()``, ``.start()``,
    ``.restart()``, ``.records``, ``.errors``); every run is stopped at
    teardown, where a crash or a logged exception fails the test.
    """
    runs: list[OperatorRun] = []

    def run(target: Target, **options: Any) -> OperatorRun:
        operator = OperatorRun(kube, target, **options)
        runs.append(operator)
        return operator.start()

    yield run
    failures = []
    for operator in runs:
        try:
            operator.stop()
        except Exception as exc:  # stop every run before failing
            failures.append(exc)
    if failures:
        raise failures[0]
