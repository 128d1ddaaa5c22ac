"""Fixtures for the companion tests: storage clients and buckets on the session's real
SeaweedFS S3 server (``seaweedfs``, tests/conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mulambda.storage.s3 import ModelStorage

from support.seaweedfs import ADMIN, READER, Identity, SeaweedFS

REPO = Path(__file__).resolve().parents[2]
HALF_PLUS_TWO = REPO / "examples" / "models" / "half_plus_two" / "1"



@pytest.fixture
def s3(seaweedfs: SeaweedFS) -> Iterator[ModelStorage]:
    """ModelStorage with admin rights on the running server."""
    storage = storage_for(seaweedfs, ADMIN)
    yield storage
    storage.close()


@pytest.fixture
def s3_reader(seaweedfs: SeaweedFS) -> Iterator[ModelStorage]:
    """ModelStorage with read/list rights only."""
    storage = storage_for(seaweedfs, READER)
    yield storage
    storage.close()


@pytest.fixture
def bucket(s3: ModelStorage) -> str:
    """A fresh, empty bucket for one test."""
    name = f"models-{uuid.uuid4().hex[:12]}"
    s3.make_bucket(name)
    return name


@pytest.fixture
def half_plus_two() -> Path:
    """The committed tiny SavedModel (examples/models/half_plus_two/1)."""
    assert (HALF_PLUS_TWO / "saved_model.pb").is_file()
    return HALF_PLUS_TWO


def storage_for(server: SeaweedFS, identity: Identity, **kwargs: object) -> ModelStorage:
    """A ModelStorage built the way the companion builds it: from MULAMBDA_S3_* variables."""
    return ModelStorage.from_env(server.env(identity), **kwargs)
