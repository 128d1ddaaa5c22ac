"""A script of ``bench/`` loaded as a module, for the tests of its parts.

Loaded by path: putting the repository root on sys.path would let the top-level
``operator/`` folder shadow the standard library.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@contextmanager
def bench_module(script: str) -> Iterator[ModuleType]:
    """``bench/<script>`` as a module while the block runs."""
    name = f"mulambda_bench_{script.removesuffix('.py')}"
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
