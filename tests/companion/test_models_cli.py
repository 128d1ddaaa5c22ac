"""``mulambda models push/list/rm`` against a real SeaweedFS S3 server."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mulambda.cli import main
from mulambda.storage.checksums import file_crc32
from mulambda.storage.manifest import PUSH_MANIFEST_NAME
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
    assert code == 0 and "removed" in out and "(4 files)" in out
    assert s3.list_versions(bucket, "hpt") == [3]
    assert s3.list_version_objects(bucket, "hpt", 1, include_manifest=True) == []


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


def test_push_uploads_saved_model_pb_after_the_files_and_the_manifest_last(
        cli, s3, bucket, half_plus_two, monkeypatch):
    order: list[str] = []
    real_put, real_manifest = ModelStorage.put_file, ModelStorage.put_push_manifest

    def spy(self, bucket_, key, *args, **kwargs):
        order.append(key.rsplit("/", 1)[-1])
        return real_put(self, bucket_, key, *args, **kwargs)

    def spy_manifest(self, *args, **kwargs):
        order.append(PUSH_MANIFEST_NAME)
        return real_manifest(self, *args, **kwargs)

    monkeypatch.setattr(ModelStorage, "put_file", spy)
    monkeypatch.setattr(ModelStorage, "put_push_manifest", spy_manifest)
    assert cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")[0] == 0
    assert order[-2:] == ["saved_model.pb", PUSH_MANIFEST_NAME] and len(order) == 5


def test_manifest_names_every_file_with_its_size_and_crc32(cli, s3, bucket, half_plus_two):
    assert cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")[0] == 0
    manifest, etag = s3.push_manifest(bucket, "hpt", 1)
    assert manifest is not None and etag
    local = {p.relative_to(half_plus_two).as_posix(): p for p in half_plus_two.rglob("*")
             if p.is_file()}
    assert {f.path: (f.size, f.crc32) for f in manifest.files} == {
        rel: (p.stat().st_size, file_crc32(p)) for rel, p in local.items()}
    assert (manifest.version, manifest.saved_model, manifest.meta_graphs) == (
        1, "saved_model.pb", 1)


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
    for version in ("-1", "0", "1000000000000000"):  # readers drop 16 digits and more
        code, _, err = cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version",
                           version)
        assert code == 2 and "--version must be from 1 to 999999999999999" in err, version
    for uri in (f"s3://{bucket}/a/../b", f"s3://{bucket}/x//y"):  # was exit 1, or stored
        code, _, err = cli("list", uri)  # under another name
        assert code == 2 and "path parts without" in err, uri
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


# -- what push accepts ----------------------------------------------------------------------


@pytest.mark.parametrize("content, why", [
    (b"", "no meta graph"),
    (b"not a protocol buffer at all\n", "wire type"),
    (b"\x08\x01\x12\x00", "meta graph 0 is empty"),
    (bytes(range(256)) * 8, ""),
], ids=["empty", "text", "empty-meta-graph", "binary-noise"])
def test_push_refuses_a_saved_model_pb_that_is_not_a_saved_model(
        cli, s3, bucket, half_plus_two, tmp_path, content, why):
    fake = tmp_path / "fake"
    shutil.copytree(half_plus_two, fake)
    (fake / "saved_model.pb").write_bytes(content)
    code, _, err = cli("push", str(fake), f"s3://{bucket}/hpt", "--version", "1")
    assert code == 2, err
    assert "does not decode as a SavedModel protocol buffer" in err and why in err
    assert s3.list_version_objects(bucket, "hpt", 1, include_manifest=True) == []


def test_push_accepts_a_text_saved_model(cli, s3, bucket, half_plus_two, tmp_path):
    text = tmp_path / "text"
    shutil.copytree(half_plus_two, text)
    (text / "saved_model.pb").unlink()
    (text / "saved_model.pbtxt").write_text(
        "saved_model_schema_version: 1\nmeta_graphs {\n  meta_info_def { tags: 'serve' }\n}\n")
    assert cli("push", str(text), f"s3://{bucket}/txt", "--version", "1")[0] == 0
    (text / "saved_model.pbtxt").write_text("hello: 1\n")
    code, _, err = cli("push", str(text), f"s3://{bucket}/txt", "--version", "2")
    assert code == 2 and "no top-level meta_graphs" in err


@pytest.mark.parametrize("action", ["push", "rm"])
def test_a_uri_ending_in_a_version_with_version_is_refused(cli, s3, bucket, half_plus_two,
                                                           action):
    uri = f"s3://{bucket}/half_plus_two/1/"
    args = [str(half_plus_two), uri] if action == "push" else [uri]
    code, _, err = cli(action, *args, "--version", "1")
    assert code == 2
    assert "already ends in a version number (1)" in err
    assert f"s3://{bucket}/half_plus_two --version 1" in err
    assert s3.version_sizes(bucket, "half_plus_two") == {}


def test_list_hints_at_a_uri_that_ends_in_a_version(cli, bucket, half_plus_two):
    assert cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")[0] == 0
    code, _, err = cli("list", f"s3://{bucket}/hpt/1")
    assert code == 1 and f"list s3://{bucket}/hpt" in err


def test_help_documents_credentials_and_the_layout_written(capsys):
    with pytest.raises(SystemExit) as done:
        main(["models", "push", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for needle in ("MULAMBDA_S3_ACCESS_KEY", "MULAMBDA_S3_SECRET_KEY", "MULAMBDA_S3_ENDPOINT",
                   "s3://BUCKET/NAME/N/", PUSH_MANIFEST_NAME, "written last",
                   "x-amz-meta-mulambda-crc32", "without a version", "--force", "resumed"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        main(["models", "--help"])
    assert "MULAMBDA_S3_SECRET_KEY" in capsys.readouterr().out


def test_list_shows_complete_unverified_and_incomplete_versions(cli, s3, bucket, half_plus_two):
    assert cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")[0] == 0
    for path in half_plus_two.rglob("*"):  # version 2 as another tool would upload it
        if path.is_file():
            s3.client.fput_object(bucket, f"hpt/2/{path.relative_to(half_plus_two)}", str(path))
    s3.client.fput_object(bucket, "hpt/3/variables/variables.index",
                          str(half_plus_two / "variables" / "variables.index"))
    code, out, _ = cli("list", f"s3://{bucket}/hpt")
    assert code == 0
    status = {line.split()[0]: line.split()[-2] for line in out.splitlines()[1:]}
    assert status == {"1": "complete", "2": "unverified", "3": "incomplete"}


# -- interrupted pushes -------------------------------------------------------------------------


class _Interrupt(io.RawIOBase):
    """A file that raises KeyboardInterrupt (Ctrl-C) after ``limit`` bytes were read."""

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream, self.left = stream, limit

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise KeyboardInterrupt
        data: bytes = self.stream.read(min(size, self.left) if size >= 0 else self.left)
        self.left -= len(data)
        return data


def _open_uploads(s3: ModelStorage, bucket: str, prefix: str) -> list[str]:
    return [u.object_name for u in
            s3.client._list_multipart_uploads(bucket, prefix=prefix).uploads]


def test_interrupted_push_aborts_its_upload_and_is_resumed(cli, s3, bucket, half_plus_two,
                                                           tmp_path, monkeypatch):
    MiB = 1024 * 1024
    src = tmp_path / "big"
    shutil.copytree(half_plus_two, src)
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(13 * MiB))
    real_put = ModelStorage.put_file
    calls: list[str] = []

    def ctrl_c_in_the_big_file(self, bucket_, key, stream, size, **kwargs):
        calls.append(key.rsplit("/", 1)[-1])
        if size > 10 * MiB:  # two 5 MiB parts get through, then Ctrl-C
            stream = _Interrupt(stream, 11 * MiB)
        return real_put(self, bucket_, key, stream, size, **kwargs)

    monkeypatch.setattr(ModelStorage, "put_file", ctrl_c_in_the_big_file)
    with pytest.raises(KeyboardInterrupt):
        cli("push", str(src), f"s3://{bucket}/hpt", "--version", "1", "--part-size-mib", "5")
    assert _open_uploads(s3, bucket, "hpt/1/") == []  # no parts left behind in the store
    assert s3.push_manifest(bucket, "hpt", 1) == (None, "")  # not complete
    assert cli("list", f"s3://{bucket}/hpt")[1].splitlines()[1].split()[-2] == "incomplete"
    done_before = {o.relpath for o in s3.list_version_objects(bucket, "hpt", 1)}
    assert "saved_model.pb" not in done_before

    calls.clear()
    monkeypatch.setattr(ModelStorage, "put_file", real_put)
    spy: list[str] = []

    def counting_put(self, bucket_, key, *args, **kwargs):
        spy.append(key.rsplit("/", 1)[-1])
        return real_put(self, bucket_, key, *args, **kwargs)

    monkeypatch.setattr(ModelStorage, "put_file", counting_put)
    code, out, err = cli("push", str(src), f"s3://{bucket}/hpt", "--version", "1",
                         "--part-size-mib", "5")
    assert code == 0, err
    assert f"resumed: {len(done_before)} already uploaded" in out
    assert not set(spy) & {p.rsplit("/", 1)[-1] for p in done_before}  # kept, not re-sent
    assert s3.push_manifest(bucket, "hpt", 1)[0] is not None


def test_push_aborts_uploads_a_killed_push_left_open(cli, s3, bucket, half_plus_two):
    # A push killed with SIGKILL cannot clean up: its upload stays open in the store.
    key = "hpt/1/variables/variables.data-00000-of-00001"
    upload_id = s3.client._create_multipart_upload(bucket, key, {})
    s3.client._upload_part(bucket, key, os.urandom(5 * 1024 * 1024), None, upload_id, 1)
    assert _open_uploads(s3, bucket, "hpt/1/") == [key]

    code, out, _ = cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")
    assert code == 0 and "aborted 1 unfinished upload(s)" in out
    assert _open_uploads(s3, bucket, "hpt/1/") == []


def test_a_version_another_tool_uploaded_is_replaced_only_with_force(cli, s3, bucket,
                                                                     half_plus_two):
    s3.client.fput_object(bucket, "hpt/1/saved_model.pb", str(half_plus_two / "saved_model.pb"))
    code, _, err = cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")
    assert code == 1 and "without a push manifest" in err and "--force" in err
    code, out, _ = cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1",
                       "--force")
    assert code == 0 and out.startswith("replaced")


def test_a_replacement_that_dies_half_way_leaves_no_version_that_looks_whole(
        cli, s3, bucket, half_plus_two, tmp_path, monkeypatch):
    # Version 1 pushed; a --force push of other bytes dies after its first file. What is
    # left mixes old and new files: it must not look like a whole version to loaders
    # (a SavedModel without a manifest is taken as another tool's complete upload).
    assert cli("push", str(half_plus_two), f"s3://{bucket}/hpt", "--version", "1")[0] == 0
    changed = tmp_path / "v1"
    shutil.copytree(half_plus_two, changed)
    for path in changed.rglob("variables.*"):
        path.write_bytes(os.urandom(path.stat().st_size + 7))
    real_put = ModelStorage.put_file
    sent: list[str] = []

    def dies_after_one(self, bucket_, key, *args, **kwargs):
        if sent:
            raise KeyboardInterrupt
        sent.append(key)
        return real_put(self, bucket_, key, *args, **kwargs)

    monkeypatch.setattr(ModelStorage, "put_file", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        cli("push", str(changed), f"s3://{bucket}/hpt", "--version", "1", "--force")
    assert len(sent) == 1
    left = {o.relpath for o in s3.list_version_objects(bucket, "hpt", 1)}
    assert not left & {"saved_model.pb", "saved_model.pbtxt"}
    assert s3.push_manifest(bucket, "hpt", 1) == (None, "")
    assert not s3.has_saved_model(bucket, "hpt", 1)  # never "the latest version"
    monkeypatch.setattr(ModelStorage, "put_file", real_put)
    code, _, err = cli("push", str(changed), f"s3://{bucket}/hpt", "--version", "1",
                         "--force")
    assert code == 0, err
    assert s3.has_saved_model(bucket, "hpt", 1) and s3.push_manifest(bucket, "hpt", 1)[0]



def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_push_follows_links_to_files_and_folders_alike(cli, s3, bucket, half_plus_two,
                                                       tmp_path):
    # A SavedModel whose variables/ is a link (a DVC or download cache): the folder was
    # skipped, and the version was listed complete without its variables.
    model = tmp_path / "linked"
    model.mkdir()
    shutil.copy(half_plus_two / "saved_model.pb", model / "saved_model.pb")
    cache = _copy(half_plus_two / "variables", tmp_path / "cache-variables")
    (model / "variables").symlink_to(cache, target_is_directory=True)
    code, _, err = cli("push", str(model), f"s3://{bucket}/linked", "--version", "1")
    assert code == 0, err
    assert "through links out of" in err and "cache-variables" in err
    pushed = {o.relpath for o in s3.list_version_objects(bucket, "linked", 1)}
    assert pushed == {"saved_model.pb", *(f"variables/{p.name}" for p in cache.iterdir())}
    loop = _copy(half_plus_two, tmp_path / "loop")
    (loop / "assets" / "back").mkdir(parents=True)
    (loop / "assets" / "back" / "up").symlink_to(loop, target_is_directory=True)
    code, _, err = cli("push", str(loop), f"s3://{bucket}/loop", "--version", "1")
    assert code == 2 and "links back to a folder above it" in err


@pytest.mark.parametrize("name", ["assets/back\\slash", "assets/new\nline",
                                  "assets/" + os.fsdecode(b"latin\xff")])
def test_push_refuses_names_the_loader_would_refuse(cli, bucket, half_plus_two, tmp_path,
                                                    name):
    # They were uploaded, and the version listed complete, which no companion could load.
    model = _copy(half_plus_two, tmp_path / "odd")
    (model / "assets").mkdir(exist_ok=True)
    (model / name).write_text("x")
    code, _, err = cli("push", str(model), f"s3://{bucket}/odd", "--version", "1")
    assert code == 2 and "holds files a model version cannot have" in err


def test_push_skips_mulambdas_own_manifest_in_a_downloaded_folder(cli, bucket, half_plus_two,
                                                                  tmp_path):
    # A version downloaded from the bucket holds the push manifest: pushed as a model
    # file, the new version failed every load (in the manifest, missing from storage).
    model = _copy(half_plus_two, tmp_path / "resync")
    (model / ".mulambda-push-manifest.json").write_text("{}")
    code, _, err = cli("push", str(model), f"s3://{bucket}/resync", "--version", "1")
    assert code == 0 and "skipped" in err and "mulambda's own file" in err


def test_the_endpoint_may_come_before_or_after_the_action(cli, seaweedfs, bucket,
                                                         half_plus_two, monkeypatch):
    monkeypatch.setenv("MULAMBDA_S3_ENDPOINT", "127.0.0.1:9")  # nothing listens there
    assert cli("push", str(half_plus_two), f"s3://{bucket}/ep", "--version", "1",
               "--endpoint", seaweedfs.endpoint)[0] == 0
    code, out, _ = cli("--endpoint", seaweedfs.endpoint, "list", f"s3://{bucket}/ep")
    assert code == 0 and "complete" in out
