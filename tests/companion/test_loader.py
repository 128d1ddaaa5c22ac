"""The model loader against a real SeaweedFS S3 server.

Counting and corrupting storages below are thin subclasses of the real
ModelStorage: every byte still comes from the real server.
"""

from __future__ import annotations

import errno
import filecmp
import hashlib
import io
import json
import os
import shutil
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest

from mulambda.companion.loader import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    LoadResult,
    ModelLoadError,
    load_model_version,
    remove_other_versions,
    resolve_version,
)
from mulambda.storage.checksums import crc32, crc32_combine
from mulambda.storage.manifest import PUSH_MANIFEST_NAME
from mulambda.storage.s3 import ModelStorage
from mulambda.tools.push import push_version

from support.seaweedfs import ADMIN, Identity, SeaweedFS

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PART = 5 * MiB  # smallest multipart part S3 allows


def make_model(root: Path, half_plus_two: Path, extra: dict[str, int] | None = None) -> Path:
    """A SavedModel folder: the tiny real model plus random files of the given sizes."""
    shutil.copytree(half_plus_two, root)
    for rel, size in (extra or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return root


def upload(s3: ModelStorage, bucket: str, prefix: str, version: int, src: Path) -> None:
    push_version(s3, src, bucket, prefix, version, part_size=PART, force=True)


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()
                     and p.name != MANIFEST_NAME)
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


class CountingStorage(ModelStorage):
    """Real storage that counts ranged GETs (proves what was not downloaded)."""

    gets = 0

    def get_range(self, bucket: str, key: str, offset: int, length: int) -> Any:
        self.gets += 1
        return super().get_range(bucket, key, offset, length)


class OverlapStorage(ModelStorage):
    """Real storage that records how many ranged GETs are open at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self.open = 0
        self.most = 0

    def get_range(self, bucket: str, key: str, offset: int, length: int) -> Any:
        response = super().get_range(bucket, key, offset, length)
        with self._lock:
            self.open += 1
            self.most = max(self.most, self.open)
        original_close = response.close

        def close() -> None:
            with self._lock:
                self.open -= 1
            original_close()

        response.close = close
        return response


class _FlipFirstByteReadOnly:
    """A response whose first byte arrives flipped, like a broken proxy would deliver it.

    It has only ``read``: the loader's fallback for plain file-like responses.
    """

    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.headers = resp.headers
        self._first = True

    def read(self, amt: int) -> bytes:
        data = self._resp.read(amt)
        if self._first and data:
            self._first = False
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def close(self) -> None:
        self._resp.close()

    def release_conn(self) -> None:
        self._resp.release_conn()


class _FlipFirstByte(_FlipFirstByteReadOnly):
    """The same through ``readinto``, the path the loader takes with real responses."""

    def readinto(self, buf: memoryview) -> int:
        n: int = self._resp.readinto(buf)
        if self._first and n:
            self._first = False
            buf[0] ^= 0xFF
        return n


class CorruptingStorage(ModelStorage):
    """Real storage whose ranged GETs of one key deliver a corrupted byte."""

    corrupt_key = ""
    wrapper: type[_FlipFirstByteReadOnly] = _FlipFirstByte

    def get_range(self, bucket: str, key: str, offset: int, length: int) -> Any:
        resp = super().get_range(bucket, key, offset, length)
        return self.wrapper(resp) if key == self.corrupt_key else resp


class ReadOnlyStorage(ModelStorage):
    """Real storage whose responses offer only ``read`` (no ``readinto``)."""

    def get_range(self, bucket: str, key: str, offset: int, length: int) -> Any:
        return _ReadOnly(super().get_range(bucket, key, offset, length))


class _ReadOnly:
    def __init__(self, resp: Any) -> None:
        self._resp = resp
        self.headers = resp.headers
        self.read = resp.read
        self.close = resp.close
        self.release_conn = resp.release_conn


def storage_as(cls: type[ModelStorage], server: SeaweedFS,
               identity: Identity = ADMIN) -> ModelStorage:
    return cls.from_env(server.env(identity))


def numeric_dirs(models: Path, name: str) -> list[str]:
    return sorted(p.name for p in (models / name).iterdir() if p.name.isdigit())


def local_versions(models_dir: Path, model_name: str) -> list[int]:
    """Numeric version folders TF Serving would see under ``models_dir/model_name``."""
    base = models_dir / model_name
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and p.is_dir())


# -- happy paths -----------------------------------------------------------------------


def test_large_objects_are_fetched_by_parallel_ranged_gets(
    seaweedfs, s3, bucket, half_plus_two, tmp_path
):
    from support.seaweedfs import ADMIN

    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 16 * MiB})
    upload(s3, bucket, "par", 1, src)
    storage = OverlapStorage.from_env(seaweedfs.env(ADMIN))
    try:
        result = load_model_version(storage, bucket, "par", 1, tmp_path / "models", "par",
                                    part_size=1 * MiB, workers=4)
    finally:
        storage.close()
    assert result.downloaded and same_tree(src, result.path)
    # 16 ranges of one object with 4 workers: several were open at the same time.
    assert storage.most >= 2, f"at most {storage.most} ranged GET open at once"
    assert storage.most <= 4  # and never more than the worker bound


def test_fresh_load_publishes_a_verified_copy(s3, bucket, half_plus_two, tmp_path):
    # One multipart object (12 MiB in 5 MiB parts) and one plain object cut
    # into several ranges (3 MiB with 1 MiB ranges): both checksum paths.
    src = make_model(tmp_path / "src", half_plus_two,
                     {"variables/big.bin": 12 * MiB, "assets/vocab.bin": 3 * MiB})
    upload(s3, bucket, "hpt", 1, src)

    result = load_model_version(s3, bucket, "hpt", 1, tmp_path / "models", "hpt",
                                part_size=1 * MiB, workers=3)

    assert isinstance(result, LoadResult)
    assert result.downloaded and result.version == 1
    assert result.path == tmp_path / "models" / "hpt" / "1"
    assert result.files == 6
    assert result.bytes == result.fetched_bytes == sum(
        p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert result.checksummed_files == result.files  # every object had a checkable ETag
    assert same_tree(src, result.path)
    # Only the published version is visible; no partial folder is left behind.
    assert [p.name for p in (tmp_path / "models" / "hpt").iterdir()
            if not p.name.startswith(".lock")] == ["1"]
    manifest = json.loads((result.path / MANIFEST_NAME).read_text())
    assert {o["path"] for o in manifest["objects"]} == {
        str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}


def test_second_load_of_same_version_downloads_nothing(seaweedfs, bucket, half_plus_two,
                                                       tmp_path, s3):
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "src", half_plus_two))
    storage = storage_as(CountingStorage, seaweedfs)
    first = load_model_version(storage, bucket, "hpt", 1, tmp_path / "models", "hpt")
    gets_after_first = storage.gets
    mtime = (first.path / "saved_model.pb").stat().st_mtime_ns

    second = load_model_version(storage, bucket, "hpt", 1, tmp_path / "models", "hpt")

    assert first.downloaded and gets_after_first == first.files
    assert not second.downloaded and second.fetched_bytes == 0
    assert storage.gets == gets_after_first  # not one GET more
    assert (second.path / "saved_model.pb").stat().st_mtime_ns == mtime
    assert (second.bytes, second.files) == (first.bytes, first.files)


def test_cached_copy_is_served_while_storage_is_down(seaweedfs, s3, bucket, half_plus_two,
                                                     tmp_path):
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "src", half_plus_two))
    load_model_version(s3, bucket, "hpt", 1, tmp_path / "models", "hpt")
    seaweedfs.kill()
    try:
        again = load_model_version(s3, bucket, "hpt", 1, tmp_path / "models", "hpt",
                                   retries=1, backoff=0.05)
    finally:
        seaweedfs.start()
    assert not again.downloaded


def test_damaged_local_copy_is_downloaded_again(s3, bucket, half_plus_two, tmp_path):
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "src", half_plus_two))
    first = load_model_version(s3, bucket, "hpt", 1, tmp_path / "models", "hpt")
    (first.path / "variables" / "variables.index").write_bytes(b"truncated")

    again = load_model_version(s3, bucket, "hpt", 1, tmp_path / "models", "hpt")

    assert again.downloaded
    assert same_tree(tmp_path / "src", again.path)


def test_replaced_version_in_store_replaces_local_copy(s3, bucket, half_plus_two, tmp_path):
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "a", half_plus_two, {"extra.bin": 1000}))
    load_model_version(s3, bucket, "hpt", 1, tmp_path / "models", "hpt")
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "b", half_plus_two, {"extra.bin": 2000}))

    again = load_model_version(s3, bucket, "hpt", 1, tmp_path / "models", "hpt")

    assert again.downloaded
    assert (again.path / "extra.bin").stat().st_size == 2000
    assert numeric_dirs(tmp_path / "models", "hpt") == ["1"]


# -- versions ----------------------------------------------------------------------------


def test_resolve_version_picks_highest_number_not_highest_string(s3, bucket, half_plus_two,
                                                                 tmp_path):
    src = make_model(tmp_path / "src", half_plus_two)
    for version in (1, 2, 10):
        upload(s3, bucket, "hpt", version, src)
    assert resolve_version(s3, bucket, "hpt", None) == 10
    assert resolve_version(s3, bucket, "hpt", 2) == 2
    with pytest.raises(ModelLoadError) as info:
        resolve_version(s3, bucket, "hpt", 7)
    assert info.value.reason == "VersionNotFound" and info.value.permanent
    assert "1, 2, 10" in info.value.message


def test_resolve_version_skips_a_version_still_being_pushed(s3, bucket, half_plus_two, tmp_path):
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "src", half_plus_two))
    # Version 2 has its variables but not yet saved_model.pb (push uploads it last).
    s3.client.fput_object(bucket, "hpt/2/variables/variables.index",
                          str(half_plus_two / "variables" / "variables.index"))
    assert resolve_version(s3, bucket, "hpt", None) == 1


def test_switching_versions_then_removing_the_old_one(s3, bucket, half_plus_two, tmp_path):
    src = make_model(tmp_path / "src", half_plus_two)
    upload(s3, bucket, "hpt", 1, src)
    upload(s3, bucket, "hpt", 2, src)
    models = tmp_path / "models"
    load_model_version(s3, bucket, "hpt", 1, models, "hpt")
    load_model_version(s3, bucket, "hpt", resolve_version(s3, bucket, "hpt", None), models, "hpt")
    # Both exist until the companion sees version 2 AVAILABLE in TF Serving.
    assert local_versions(models, "hpt") == [1, 2]

    assert remove_other_versions(models, "hpt", keep=2) == [2 - 1]

    assert local_versions(models, "hpt") == [2]
    assert not [p for p in (models / "hpt").iterdir() if p.name.startswith(".trash")]
    assert remove_other_versions(models, "hpt", keep=2) == []


# -- interruption and resume -----------------------------------------------------------


def _kill_after(server: SeaweedFS, threshold: int) -> tuple[Any, threading.Event]:
    """A progress callback that SIGKILLs the server once ``threshold`` bytes arrived."""
    received = 0
    lock = threading.Lock()
    killed = threading.Event()

    def progress(n: int) -> None:
        nonlocal received
        with lock:
            received += n
            if received >= threshold and not killed.is_set():
                server.kill()
                killed.set()  # only now: a restarter waits for this

    return progress, killed


def test_killed_server_leaves_no_partial_version_and_reload_resumes(
        seaweedfs, s3, bucket, half_plus_two, tmp_path):
    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 60 * MiB})
    upload(s3, bucket, "big", 1, src)
    models = tmp_path / "models"
    workers = 2
    # With 2 ranges in flight (< 2 parts unfinished), killing after 3 parts'
    # worth of bytes guarantees at least one finished part to resume from.
    progress, killed = _kill_after(seaweedfs, (workers + 1) * PART)
    storage = storage_as(CountingStorage, seaweedfs)

    with pytest.raises(ModelLoadError) as info:
        load_model_version(storage, bucket, "big", 1, models, "big", workers=workers,
                           part_size=PART, retries=1, backoff=0.05, progress=progress)

    assert killed.is_set()
    assert info.value.reason == "StorageUnavailable" and not info.value.permanent
    assert numeric_dirs(models, "big") == []  # TF Serving sees nothing
    journal = json.loads((models / "big" / ".partial-1" / JOURNAL_NAME).read_text())
    finished = sum(entry["ranges"][int(i)][1] for entry in journal["files"].values()
                   for i in entry["done"])
    assert finished >= PART

    seaweedfs.start()
    result = load_model_version(storage, bucket, "big", 1, models, "big", workers=workers,
                                part_size=PART)

    assert result.downloaded
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    # Exactly the unfinished ranges were fetched again, nothing that was done.
    assert result.fetched_bytes == total - finished
    assert result.checksummed_files == result.files
    assert same_tree(src, result.path)
    assert numeric_dirs(models, "big") == ["1"]
    assert not (models / "big" / ".partial-1").exists()


def test_download_survives_server_restart_without_refetching_a_byte(
        seaweedfs, s3, bucket, half_plus_two, tmp_path):
    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 40 * MiB})
    upload(s3, bucket, "big", 1, src)
    progress, killed = _kill_after(seaweedfs, 12 * MiB)
    restarter = threading.Thread(target=lambda: killed.wait(60) and seaweedfs.start())
    restarter.start()
    try:
        result = load_model_version(s3, bucket, "big", 1, tmp_path / "models", "big",
                                    workers=2, retries=12, backoff=0.2, max_backoff=3,
                                    progress=progress)
    finally:
        restarter.join()
    assert killed.is_set()
    assert result.downloaded
    # Interrupted ranges continued from their last byte: nothing was fetched twice.
    assert result.fetched_bytes == result.bytes
    assert result.checksummed_files == result.files
    assert same_tree(src, result.path)


# -- permanent failures --------------------------------------------------------------------


def _load_error(storage: ModelStorage, bucket: str, prefix: str, version: int,
                models: Path) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_model_version(storage, bucket, prefix, version, models, "m", retries=1,
                           backoff=0.01)
    return info.value


def test_missing_bucket_model_and_version_have_distinct_reasons(s3, bucket, half_plus_two,
                                                                tmp_path):
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "src", half_plus_two))
    models = tmp_path / "models"
    cases = {
        "BucketNotFound": ("no-such-bucket-x", "hpt", 1),
        "ModelNotFound": (bucket, "nothing-here", 1),
        "VersionNotFound": (bucket, "hpt", 3),
    }
    for reason, (b, prefix, version) in cases.items():
        err = _load_error(s3, b, prefix, version, models)
        assert (err.reason, err.permanent) == (reason, True), err
        with pytest.raises(ModelLoadError) as info:
            resolve_version(s3, b, prefix, None if reason != "VersionNotFound" else version)
        assert info.value.reason == reason
    assert local_versions(models, "m") == []


def test_bad_credentials_are_a_permanent_access_denied(seaweedfs, bucket, half_plus_two,
                                                       tmp_path, s3):
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "src", half_plus_two))
    intruder = Identity("intruder", "not-a-key", "not-a-secret-at-all-000000", ())
    storage = storage_as(ModelStorage, seaweedfs, intruder)

    err = _load_error(storage, bucket, "hpt", 1, tmp_path / "models")

    assert (err.reason, err.permanent) == ("AccessDenied", True)
    assert "not-a-secret" not in str(err) and "not-a-secret" not in repr(storage)


def test_read_only_identity_can_load(s3_reader, s3, bucket, half_plus_two, tmp_path):
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "src", half_plus_two))
    result = load_model_version(s3_reader, bucket, "hpt", 1, tmp_path / "models", "hpt")
    assert result.downloaded


def test_folder_without_saved_model_is_refused_before_downloading(seaweedfs, s3, bucket,
                                                                  tmp_path):
    s3.client.put_object(bucket, "notamodel/1/weights.bin", __import__("io").BytesIO(b"x"), 1)
    storage = storage_as(CountingStorage, seaweedfs)

    err = _load_error(storage, bucket, "notamodel", 1, tmp_path / "models")

    assert (err.reason, err.permanent) == ("NotASavedModel", True)
    assert storage.gets == 0


@pytest.mark.parametrize("extra", [
    pytest.param({"assets": b"a file", "assets/vocab.txt": b"and a folder"},
                 id="a-file-and-a-folder-of-one-name"),
    pytest.param({".mulambda-journal.json": b"{}"}, id="named-like-the-journal"),
    pytest.param({".mulambda-manifest.json": b"{}"}, id="named-like-the-manifest"),
])
def test_names_a_folder_cannot_hold_are_refused_before_downloading(
        seaweedfs, s3, bucket, half_plus_two, tmp_path, extra):
    # Uploaded by another tool (no push manifest): raw OS errors or a journal overwriting
    # an object retried for ever before; now a permanent InvalidObjectKey naming them.
    for rel, data in {**extra, "saved_model.pb": (half_plus_two / "saved_model.pb")
                      .read_bytes()}.items():
        s3.client.put_object(bucket, f"odd/1/{rel}", io.BytesIO(data), len(data))
    storage = storage_as(CountingStorage, seaweedfs)
    err = _load_error(storage, bucket, "odd", 1, tmp_path / "models")
    assert (err.reason, err.permanent) == ("InvalidObjectKey", True), err
    assert min(extra) in err.message
    assert storage.gets == 0


def upload_raw(s3: ModelStorage, bucket: str, prefix: str, src: Path, part_size: int) -> None:
    """Upload like another tool would: plain SDK calls, no mulambda metadata."""
    for path in sorted(src.rglob("*"), key=lambda p: p.name.startswith("saved_model")):
        if path.is_file():
            s3.client.fput_object(bucket, f"{prefix}/1/{path.relative_to(src).as_posix()}",
                                  str(path), part_size=part_size)


def test_objects_uploaded_by_other_tools_are_md5_verified(s3, bucket, half_plus_two, tmp_path):
    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 11 * MiB})
    upload_raw(s3, bucket, "multi", src, PART)  # multipart ETag, part size from the store
    upload_raw(s3, bucket, "single", src, 64 * MiB)  # plain MD5 ETag over several ranges
    for prefix in ("multi", "single"):
        result = load_model_version(s3, bucket, prefix, 1, tmp_path / "models", prefix,
                                    part_size=1 * MiB)
        assert result.checksummed_files == result.files, prefix
        assert same_tree(src, result.path)


@pytest.mark.parametrize("uploader, target", [
    ("push", "saved_model.pb"),       # small: CRC-32 from the push manifest
    ("push", "variables/big.bin"),    # CRC-32 from the push manifest, combined over ranges
    ("multipart", "variables/big.bin"),  # multipart ETag: MD5 of part MD5s
    ("single", "variables/big.bin"),  # single-part ETag over several ranges: whole-file MD5
])
def test_corrupted_bytes_fail_the_checksum_and_are_not_published(
        seaweedfs, s3, bucket, half_plus_two, tmp_path, uploader, target):
    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 11 * MiB})
    if uploader == "push":
        upload(s3, bucket, "hpt", 1, src)
    else:
        upload_raw(s3, bucket, "hpt", src, PART if uploader == "multipart" else 64 * MiB)
    storage = storage_as(CorruptingStorage, seaweedfs)
    storage.corrupt_key = f"hpt/1/{target}"  # type: ignore[attr-defined]

    with pytest.raises(ModelLoadError) as info:
        load_model_version(storage, bucket, "hpt", 1, tmp_path / "models", "m", retries=1,
                           part_size=1 * MiB)

    err = info.value
    assert (err.reason, err.permanent) == ("ChecksumMismatch", True)
    assert target in err.message
    assert numeric_dirs(tmp_path / "models", "m") == []
    # Bytes that failed verification are never resumed from.
    assert not (tmp_path / "models" / "m" / ".partial-1").exists()


def test_etag_of_fixture_matches_md5(s3, bucket, half_plus_two):
    """Sanity check of the premise: the store's single-part ETag is the MD5."""
    s3.client.fput_object(bucket, "x/saved_model.pb", str(half_plus_two / "saved_model.pb"))
    etag = s3.client.stat_object(bucket, "x/saved_model.pb").etag
    assert etag == hashlib.md5((half_plus_two / "saved_model.pb").read_bytes()).hexdigest()


@pytest.mark.parametrize("target", ["saved_model.pb", "variables/big.bin"])
def test_corruption_is_caught_through_read_only_responses_too(
        seaweedfs, s3, bucket, half_plus_two, tmp_path, target):
    # Responses without readinto (wrapped or foreign ones) take the read()
    # fallback; it must verify exactly like the readinto path.
    upload(s3, bucket, "hpt", 1,
           make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 11 * MiB}))
    storage = storage_as(CorruptingStorage, seaweedfs)
    storage.corrupt_key = f"hpt/1/{target}"  # type: ignore[attr-defined]
    storage.wrapper = _FlipFirstByteReadOnly  # type: ignore[attr-defined]

    with pytest.raises(ModelLoadError) as info:
        load_model_version(storage, bucket, "hpt", 1, tmp_path / "models", "m", retries=1,
                           part_size=1 * MiB)

    assert info.value.reason == "ChecksumMismatch" and target in info.value.message


def test_read_only_responses_load_a_verified_copy(seaweedfs, s3, bucket, half_plus_two,
                                                  tmp_path):
    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 3 * MiB + 7})
    upload(s3, bucket, "hpt", 1, src)
    result = load_model_version(storage_as(ReadOnlyStorage, seaweedfs), bucket, "hpt", 1,
                                tmp_path / "models", "hpt", part_size=1 * MiB, workers=2)
    assert result.checksummed_files == result.files
    assert same_tree(src, result.path)


# -- the push manifest: bytes changed in storage after the push --------------------------------


def _overwrite(s3: ModelStorage, bucket: str, key: str, data: bytes) -> None:
    """Replace an object the way a stray tool or a mistaken copy would: a plain PUT."""
    s3.client.put_object(bucket, key, io.BytesIO(data), len(data))


def _same_size_garbage(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("change", [
    "small-file-same-size", "big-file-same-size", "file-added", "file-removed", "file-resized",
])
def test_a_file_changed_after_the_push_is_refused_and_the_verified_copy_kept(
        seaweedfs, s3, bucket, half_plus_two, tmp_path, change):
    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 11 * MiB})
    upload(s3, bucket, "hpt", 1, src)
    models = tmp_path / "models"
    first = load_model_version(s3, bucket, "hpt", 1, models, "hpt", part_size=1 * MiB)
    assert first.downloaded

    if change == "small-file-same-size":  # under one part: the ETag alone would pass it
        _overwrite(s3, bucket, "hpt/1/variables/variables.index",
                   _same_size_garbage(src / "variables" / "variables.index"))
    elif change == "big-file-same-size":
        _overwrite(s3, bucket, "hpt/1/variables/big.bin",
                   _same_size_garbage(src / "variables" / "big.bin"))
    elif change == "file-added":
        _overwrite(s3, bucket, "hpt/1/assets/extra.txt", b"not pushed")
    elif change == "file-removed":
        s3.client.remove_object(bucket, "hpt/1/variables/variables.index")
    else:
        _overwrite(s3, bucket, "hpt/1/fingerprint.pb", b"short")
    storage = storage_as(CountingStorage, seaweedfs)

    with pytest.raises(ModelLoadError) as info:
        load_model_version(storage, bucket, "hpt", 1, models, "hpt", part_size=1 * MiB,
                           retries=1)

    assert (info.value.reason, info.value.permanent) == ("ChecksumMismatch", True)
    assert same_tree(src, first.path)  # the verified copy is untouched
    assert numeric_dirs(models, "hpt") == ["1"]
    assert not (models / "hpt" / ".partial-1").exists()
    gets = storage.gets

    # Asked again (the companion retries permanent errors every minute), nothing is
    # downloaded: the same listing already failed.
    with pytest.raises(ModelLoadError) as again:
        load_model_version(storage, bucket, "hpt", 1, models, "hpt", part_size=1 * MiB)
    assert again.value.reason == "ChecksumMismatch" and "not downloaded again" in \
        again.value.message
    assert storage.gets == gets

    # A new push of the version is loaded (or, byte for byte the copy already
    # published, kept).
    upload(s3, bucket, "hpt", 1, src)
    assert load_model_version(storage, bucket, "hpt", 1, models, "hpt").path == first.path
    assert same_tree(src, first.path)


def test_every_file_is_checked_against_the_manifest_whatever_its_size(s3, bucket,
                                                                      half_plus_two, tmp_path):
    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 3 * MiB})
    upload(s3, bucket, "hpt", 1, src)
    result = load_model_version(s3, bucket, "hpt", 1, tmp_path / "models", "hpt",
                                part_size=1 * MiB)
    assert result.checksummed_files == result.files == 5


def test_a_malformed_push_manifest_is_a_permanent_checksum_mismatch(s3, bucket, half_plus_two,
                                                                     tmp_path):
    upload(s3, bucket, "hpt", 1, make_model(tmp_path / "src", half_plus_two))
    _overwrite(s3, bucket, f"hpt/1/{PUSH_MANIFEST_NAME}", b"{not json")
    err = _load_error(s3, bucket, "hpt", 1, tmp_path / "models")
    assert (err.reason, err.permanent) == ("ChecksumMismatch", True)
    assert "malformed push manifest" in err.message


def test_a_saved_model_pb_that_does_not_decode_is_not_published(s3, bucket, half_plus_two,
                                                                 tmp_path):
    src = make_model(tmp_path / "src", half_plus_two)
    (src / "saved_model.pb").write_bytes(b"<html>an error page, saved by mistake</html>")
    upload_raw(s3, bucket, "hpt", src, 64 * MiB)  # another tool: push would refuse it

    err = _load_error(s3, bucket, "hpt", 1, tmp_path / "models")

    assert (err.reason, err.permanent) == ("NotASavedModel", True)
    assert "does not decode as a SavedModel" in err.message
    assert numeric_dirs(tmp_path / "models", "m") == []
    assert not (tmp_path / "models" / "m" / ".partial-1").exists()


def _corrupt_on_disk(server: SeaweedFS, bucket: str, data: bytes) -> None:
    """Flip bytes of ``data``'s stored copy in the volume files (bit rot, a bad disk)."""
    needle = data[4096:4096 + 64]
    for volume in (server.data_dir / "data").rglob(f"{bucket}_*.dat"):
        raw = volume.read_bytes()
        at = raw.find(needle)
        if at >= 0:
            with volume.open("r+b") as f:
                f.seek(at + 10)
                f.write(b"\xff\x00\xff\x00")
            return
    raise AssertionError("object bytes not found in any volume file")


def test_corruption_the_store_reports_is_permanent_not_retried_as_unavailable(
        seaweedfs, s3, bucket, half_plus_two, tmp_path):
    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 2 * MiB})
    upload(s3, bucket, "hpt", 1, src)
    _corrupt_on_disk(seaweedfs, bucket, (src / "variables" / "big.bin").read_bytes())

    # SeaweedFS checks each needle's CRC on read and answers 500 InternalError,
    # like a transient fault; the loader sees that HEAD still works.
    err = _load_error(s3, bucket, "hpt", 1, tmp_path / "models")

    assert (err.reason, err.permanent) == ("ObjectUnreadable", True), err
    assert "variables/big.bin" in err.message and "damaged" in err.message
    assert numeric_dirs(tmp_path / "models", "m") == []


# -- ranged reads and CRC-32 arithmetic -------------------------------------------------


def _pooled_connections(storage: ModelStorage) -> list[Any]:
    pool = storage._http.connection_from_url(f"http://{storage.endpoint}")
    return list(pool.pool.queue)  # type: ignore[union-attr]


def test_range_reads_fill_the_buffer_and_keep_or_drop_the_connection(seaweedfs, s3, bucket):
    data = os.urandom(3 * MiB + 5)
    s3.client.put_object(bucket, "blob", io.BytesIO(data), len(data))
    # One pooled connection, so every GET below goes over the same one.
    storage = storage_for_one_connection(seaweedfs)

    def read_all(offset: int, length: int) -> bytes:
        buf = memoryview(bytearray(length + 100))  # larger than the body: must stop at its end
        resp = storage.get_range(bucket, "blob", offset, length)
        got = 0
        while n := resp.readinto(buf[got:]):
            got += n
        resp.close()
        return bytes(buf[:got])

    assert read_all(0, MiB) == data[:MiB]
    first = [c.sock for c in _pooled_connections(storage)]
    assert read_all(MiB, 2 * MiB + 5) == data[MiB:]
    # Read to its end, the connection went back to the pool open (keep-alive).
    assert [c.sock for c in _pooled_connections(storage)] == first and first[0] is not None

    # Abandoned half-way, it must not be reused with the rest of the body unread.
    resp = storage.get_range(bucket, "blob", 0, 3 * MiB)
    assert resp.readinto(memoryview(bytearray(1000))) == 1000
    resp.close()
    assert all(c.sock is None for c in _pooled_connections(storage))
    assert read_all(5, 10) == data[5:15]
    assert storage.get_range(bucket, "blob", 7, 3).read(100) == data[7:10]


def storage_for_one_connection(server: SeaweedFS) -> ModelStorage:
    return ModelStorage.from_env(server.env(ADMIN), max_connections=1)


def test_encoded_bodies_fall_back_to_urllib3_decoding():
    # A Content-Encoding must be decoded by urllib3, not read raw from the socket.
    import gzip

    import urllib3

    from mulambda.storage.s3 import RangeResponse

    body = os.urandom(5000)
    resp = RangeResponse(urllib3.HTTPResponse(
        body=io.BytesIO(gzip.compress(body)), headers={"Content-Encoding": "gzip"},
        preload_content=False))
    buf = memoryview(bytearray(len(body)))
    got = 0
    while got < len(body) and (n := resp.readinto(buf[got:])):
        got += n
    assert bytes(buf[:got]) == body


@pytest.mark.parametrize("sizes", [
    [0, 0], [1, 0], [0, 1], [1, 1], [7, 3, 1], [MiB, MiB, 5], [3, MiB + 17, 2 * MiB, 1],
])
def test_crc32_combine_equals_crc32_of_the_concatenation(sizes):
    pieces = [os.urandom(n) for n in sizes]
    crc = 0
    for piece in pieces:
        crc = crc32_combine(crc, crc32(piece), len(piece))
    assert crc == zlib.crc32(b"".join(pieces))
    assert crc32(b"".join(pieces)) == zlib.crc32(b"".join(pieces))
    assert crc32(memoryview(b"".join(pieces))[1:]) == zlib.crc32(b"".join(pieces)[1:])


def test_crc32_combine_is_cheap_enough_to_run_after_every_load():
    # The pure-Python version rebuilt zlib's operator tables per call (~3 ms,
    # serial after the download); cached operators make it microseconds.
    import time

    started = time.perf_counter()
    for i in range(1000):
        crc32_combine(i * 2654435761 & 0xFFFFFFFF, i, 16 * MiB - i)
    assert time.perf_counter() - started < 1.0


# -- the model volume ------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["known-before", "found-while-writing"])
def test_a_model_larger_than_the_volume_is_insufficient_disk_and_gives_its_room_back(
        s3, bucket, half_plus_two, tmp_path, monkeypatch, when):
    # Not "cannot reach S3" retried for ever with a full volume: a permanent
    # InsufficientDisk (the companion retries those every MULAMBDA_FAILED_RETRY_SECONDS),
    # and the partial download deleted.
    from mulambda.companion.loader import download, load

    src = make_model(tmp_path / "src", half_plus_two, {"variables/big.bin": 3 * MiB})
    upload(s3, bucket, "hpt", 1, src)
    models = tmp_path / "models"
    if when == "known-before":
        real_usage = shutil.disk_usage
        monkeypatch.setattr(load.shutil, "disk_usage",
                            lambda path: real_usage(path)._replace(free=1 * MiB))
    else:  # the free space the check saw was taken meanwhile
        def full(fd, data, offset):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(download.os, "pwrite", full)
    err = _load_error(s3, bucket, "hpt", 1, models)
    assert (err.reason, err.permanent) == ("InsufficientDisk", True), err
    assert "S3" not in err.message
    if when == "known-before":
        assert "more bytes; the model volume has 1048576 free" in err.message
    assert not (models / "m" / ".partial-1").exists()
    assert local_versions(models, "m") == []


class FailsFrom(ModelStorage):
    """Real storage whose ranged GETs of ``big.bin`` at or past ``fail_from`` fail."""

    fail_from = 0

    def get_range(self, bucket: str, key: str, offset: int, length: int) -> Any:
        if key.endswith("big.bin") and offset >= self.fail_from:
            raise ConnectionError("network cut")
        return super().get_range(bucket, key, offset, length)


def test_a_resumed_download_fetches_again_a_finished_range_whose_bytes_changed(
        seaweedfs, s3, bucket, half_plus_two, tmp_path):
    # The journal records a range's checksum as it is written; the bytes on disk can
    # still differ when the download resumes (a crash before writeback, a bad disk):
    # such a range is fetched again, and what is published is what was pushed.
    data = os.urandom(3 * MiB)
    src = make_model(tmp_path / "src", half_plus_two)
    (src / "variables" / "big.bin").write_bytes(data)
    upload(s3, bucket, "hpt", 1, src)
    cut = storage_as(FailsFrom, seaweedfs)
    cut.fail_from = 2 * MiB  # type: ignore[attr-defined]
    models = tmp_path / "models"
    with pytest.raises(ModelLoadError):
        load_model_version(cut, bucket, "hpt", 1, models, "m", part_size=MiB, retries=0,
                           workers=1)
    partial = models / "m" / ".partial-1" / "variables" / "big.bin"
    with partial.open("r+b") as f:  # one byte of the first, finished, range changes
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    counting = storage_as(CountingStorage, seaweedfs)
    result = load_model_version(counting, bucket, "hpt", 1, models, "m", part_size=MiB)
    assert (result.path / "variables" / "big.bin").read_bytes() == data
    # The changed range and the one never fetched again, not the one still intact.
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert 2 * MiB <= result.fetched_bytes <= total - MiB
