"""``mulambda models push/list/rm`` against a real SeaweedFS S3 server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mulambda.cli import main
from mulambda.storage.s3 import ModelStorage

from support.seaweedfs import ADMIN, READER, SeaweedFS

pytestmark = pytest.mark.integration


@pytest.fixture
def cli(seaweedfs: SeaweedFS, s3: ModelStorage, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    """Run ``mulambda models ...`` in-process as the admin; returns (code, stdout, stderr)."""
    for key, value in seaweedfs.env(ADMIN).items():
        monkeypatch.setenv(key, value)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["models", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_push_list_rm_round_trip(cli, s3, bucket, half_plus_two):
    code, out, _ = cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")
    assert code == 0 and f"pushed s3://{bucket}/hpt/1/: 4 files" in out
    local = {p.relative_to(half_plus_two).as_posix(): p.stat().st_size
             for p in half_plus_two.rglob("*") if p.is_file()}
    stored = {o.relpath: o.size for o in s3.list_version_objects(bucket, "hpt", 1)}
    assert stored == local

    assert cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "3")[0] == 0
    code, out, _ = cli("list", f"s3://{bucket}/hpt")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("1", "4", str(sum(local.values()))), ("3", "4", str(sum(local.values())))]

    code, out, _ = cli("rm", f"s3://{bucket}/hpt", "--version", "1")
    assert code == 0 and "removed" in out and "(4 objects)" in out
    assert s3.list_versions(bucket, "hpt") == [3]


def test_push_refuses_to_overwrite_without_force(cli, s3, bucket, half_plus_two, tmp_path):
    assert cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")[0] == 0
    changed = tmp_path / "v1"
    shutil.copytree(half_plus_two, changed)
    (changed / "variables" / "variables.index").unlink()
    (changed / "assets").mkdir(exist_ok=True)
    (changed / "assets" / "vocab.txt").write_text("hello\n")

    code, _, err = cli("push", str(changed), f"s3://{bucket}/hpt", "--version", "1")
    assert code == 1
    assert "already exists" in err and "--force" in err
    before = {o.relpath for o in s3.list_version_objects(bucket, "hpt", 1)}
    assert "assets/vocab.txt" not in before

    code, out, _ = cli("push", str(changed), f"s3://{bucket}/hpt", "--version", "1", "--force")
    assert code == 0 and out.startswith("replaced")
    after = {o.relpath for o in s3.list_version_objects(bucket, "hpt", 1)}
    # Exactly the new folder: added file present, removed file gone.
    assert after == {p.relative_to(changed).as_posix() for p in changed.rglob("*") if p.is_file()}


def test_push_uploads_saved_model_pb_last(cli, s3, bucket, half_plus_two, monkeypatch):
    order: list[str] = []
    real_put = ModelStorage.put_file

    def spy(self, bucket_, key, *args, **kwargs):
        order.append(key.rsplit("/", 1)[-1])
        return real_put(self, bucket_, key, *args, **kwargs)

    monkeypatch.setattr(ModelStorage, "put_file", spy)
    assert cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")[0] == 0
    assert order[-1] == "saved_model.pb" and len(order) == 4


@pytest.mark.parametrize("make_dir, message", [
    (lambda tmp: tmp / "does-not-exist", "is not a directory"),
    (lambda tmp: tmp, "is not a SavedModel folder"),
], ids=["missing", "no-saved-model"])
def test_push_rejects_a_folder_that_is_not_a_saved_model(cli, s3, bucket, tmp_path, make_dir,
                                                         message):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    code, _, err = cli("push", str(make_dir(tmp_path)), f"s3://{bucket}/hpt", "--version", "1")
    assert code == 2 and message in err
    assert s3.list_versions(bucket, "hpt") == []


def test_usage_and_store_errors_are_one_clear_line(cli, bucket, half_plus_two):
    code, _, err = cli("list", "http://not-s3/x")
    assert code == 2 and "s3://BUCKET/NAME" in err
    code, _, err = cli("list", "s3://no-such-bucket-zz/hpt")
    assert code == 1 and "does not exist" in err
    code, _, err = cli("list", f"s3://{bucket}/nothing")
    assert code == 1 and "no versions" in err
    code, _, err = cli("rm", f"s3://{bucket}/hpt", "--version", "9")
    assert code == 1 and "not found" in err
    code, _, err = cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "-1")
    assert code == 2 and ">= 0" in err
    assert "Traceback" not in err


def test_read_only_credentials_cannot_push(cli, seaweedfs, bucket, half_plus_two, monkeypatch):
    for key, value in seaweedfs.env(READER).items():
        monkeypatch.setenv(key, value)
    code, _, err = cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")
    assert code == 1 and "AccessDenied" in err
    assert READER.secret_key not in err


def test_missing_credentials_are_a_usage_error(cli, monkeypatch, bucket):
    monkeypatch.delenv("MULAMBDA_S3_SECRET_KEY")
    code, _, err = cli("list", f"s3://{bucket}/hpt")
    assert code == 2 and "MULAMBDA_S3_SECRET_KEY" in err


def test_console_entry_point_with_endpoint_flag(seaweedfs, s3, bucket, half_plus_two):
    """The real ``python -m mulambda models`` process, endpoint given by flag."""
    env = {**os.environ, **seaweedfs.env(ADMIN), "MULAMBDA_S3_ENDPOINT": "127.0.0.1:1"}
    args = [sys.executable, "-m", "mulambda", "models", "--endpoint", seaweedfs.endpoint]
    # cwd outside the repo: the source folder must not shadow the installed package.
    push = subprocess.run([*args, "push", str(half_plus_two), f"s3://{bucket}/hpt",
                           "--version", "2"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=Path(half_plus_two).anchor)
    assert push.returncode == 0, push.stderr
    listing = subprocess.run([*args, "list", f"s3://{bucket}/hpt"], env=env,
                             capture_output=True, text=True, timeout=60, cwd="/")
    assert listing.returncode == 0 and listing.stdout.splitlines()[1].split()[0] == "2"


def test_push_shows_a_progress_bar_on_a_terminal_and_none_in_pipes(
    seaweedfs, s3, bucket, half_plus_two
):
    """On a terminal (a real pseudo-terminal here) push draws a bar; piped, it stays quiet."""
    import fcntl
    import pty
    import struct
    import termios

    env = {**os.environ, **seaweedfs.env(ADMIN)}
    args = [sys.executable, "-m", "mulambda", "models", "push", str(half_plus_two),
            f"s3://{bucket}/bar", "--version", "1"]
    controller, terminal = pty.openpty()
    # A terminal has a size; tqdm draws nothing on a 0x0 one.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=terminal, timeout=60, cwd="/")
        os.close(terminal)
        drawn = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(controller)
    assert proc.returncode == 0, drawn.decode(errors="replace")
    text = drawn.decode(errors="replace")
    assert "push bar/1" in text and "100%" in text  # tqdm's bar, completed
    piped = subprocess.run([*args[:-1], "2"], env=env, capture_output=True, text=True,
                           timeout=60, cwd="/")
    assert piped.returncode == 0 and "%|" not in piped.stderr


def test_push_refuses_a_bucket_no_model_executor_could_reference(cli, half_plus_two):
    code, _, err = cli("push", str(half_plus_two), "s3://My_Bucket/hpt", "--version", "1")
    assert code == 2 and "lowercase" in err


def test_mb_creates_missing_buckets_and_keeps_existing_ones(cli, s3, bucket):
    fresh = f"made-{bucket}"
    code, out, _ = cli("mb", f"{bucket},{fresh}")  # one $(BUCKETS) argument, as a Job passes it
    assert code == 0
    assert out.splitlines() == [f"exists s3://{bucket}", f"created s3://{fresh}"]
    assert s3.bucket_exists(fresh)
    assert cli("mb", fresh)[:2] == (0, f"exists s3://{fresh}\n")  # idempotent


def test_mb_gives_up_after_waiting_for_an_unreachable_store(cli, monkeypatch):
    monkeypatch.setenv("MULAMBDA_S3_ENDPOINT", "127.0.0.1:1")
    code, _, err = cli("mb", "models", "--wait", "0")
    assert code == 1 and "StorageUnavailable" in err
    code, _, err = cli("mb", "Not_A_Bucket")
    assert code == 2 and "not a bucket name" in err
