"""``mulambda models``: push, list and remove model versions in S3 storage; create buckets.

    mulambda models push DIR s3://BUCKET/NAME --version N [--force]
    mulambda models list s3://BUCKET/NAME
    mulambda models rm   s3://BUCKET/NAME --version N
    mulambda models mb   BUCKET... [--wait SECONDS]

Endpoint and credentials come from ``MULAMBDA_S3_ENDPOINT``,
``MULAMBDA_S3_ACCESS_KEY``, ``MULAMBDA_S3_SECRET_KEY`` (and
``MULAMBDA_S3_SECURE`` / ``MULAMBDA_S3_REGION``); ``--endpoint`` overrides
the endpoint. Exit codes: 0 success, 1 the store refused or failed, 2 bad
usage (not a SavedModel, bad URI, missing credentials).

``push`` checks that DIR is a SavedModel (``saved_model.pb`` decodes as
one, with at least one meta graph: :mod:`mulambda.storage.savedmodel`),
uploads every file with its CRC-32 as metadata, ``saved_model.pb`` after the
others (companions resolving "the latest version" only pick folders that
hold it), and the push manifest (:mod:`mulambda.storage.manifest`: every
file's size and CRC-32) last; loaders verify every file against it. An
interrupted push is resumed by running it again: files already uploaded
with the same size and CRC-32 are kept, multipart uploads the interrupted
run left open are aborted (also on Ctrl-C). ``mb`` creates buckets that do
not exist yet, waiting for the store to answer first (the dev install's
bucket Job runs it while MinIO starts).

Importing this module costs next to nothing beyond argparse: the S3 client,
checksums, logging, pathlib and typing are imported when a subcommand runs,
so ``mulambda models --help`` starts within 3x a bare ``python -c pass``
(tests/unit/test_layout.py measures it).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable

from mulambda.storage.layout import (
    JOURNAL_NAME,
    MANIFEST_NAME,
    PUSH_MANIFEST_NAME,
    is_bucket_name,
    parse_s3_uri,
    unholdable,
    version_prefix,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import logging
    from pathlib import Path

    from mulambda.storage.s3 import ModelStorage, StoredObject

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
# mulambda's own files in a version folder: never pushed as part of a model.
OWN_FILES = (PUSH_MANIFEST_NAME, MANIFEST_NAME, JOURNAL_NAME)
# Versions readers take: 1 up (what a ModelExecutor may pin), and fewer than 16 digits
# (a JSON number of 16 or more is read as a float, and such a heartbeat is dropped).
MAX_VERSION = 10 ** 15 - 1
# Multipart part size of pushes. Loaders fetch multipart objects range by
# range along these parts (to verify each part's MD5 in parallel), so this is
# also their download granularity; see bench/model_load.py.
DEFAULT_PART_SIZE_MIB = 16
MIN_PART_SIZE_MIB = 5  # S3's minimum multipart part size
DEFAULT_WAIT_SECONDS = 180.0  # how long ``mb`` waits for the store to answer


class UsageError(Exception):
    """Bad input from the user (exit code 2)."""


class StoreError(Exception):
    """The store refused or failed (exit code 1)."""


class PushResult:
    """What ``push_version`` did (a plain class: dataclasses would import inspect).

    ``kept``: files a resumed push found already uploaded; ``aborted``:
    multipart uploads an interrupted push had left open.
    """

    __slots__ = ("aborted", "bytes", "files", "kept", "replaced")

    def __init__(self, files: int, bytes: int, replaced: bool, kept: int = 0,
                 aborted: int = 0) -> None:
        self.files, self.bytes, self.replaced = files, bytes, replaced
        self.kept, self.aborted = kept, aborted


def _log() -> logging.Logger:
    import logging

    return logging.getLogger(__name__)


CREDENTIALS_HELP = """\
credentials and endpoint (environment only, never arguments):
  MULAMBDA_S3_ENDPOINT    host:port of the S3 store (--endpoint overrides it)
  MULAMBDA_S3_ACCESS_KEY  access key
  MULAMBDA_S3_SECRET_KEY  secret key
  MULAMBDA_S3_SECURE      true: talk TLS (default false)
  MULAMBDA_S3_REGION      region, if the store needs one

exit codes: 0 done, 1 the store refused or failed, 2 bad usage"""

PUSH_HELP = """\
Upload the SavedModel folder DIR (the folder holding saved_model.pb, e.g.
examples/models/half_plus_two/1) as version N of model s3://BUCKET/NAME.

layout written:
  s3://BUCKET/NAME/N/<every file of DIR, same relative paths>
                     each with x-amz-meta-mulambda-crc32 (its CRC-32)
  s3://BUCKET/NAME/N/saved_model.pb             uploaded after the other files
  s3://BUCKET/NAME/N/.mulambda-push-manifest.json
                     written last: every file's size and CRC-32; companions
                     verify every downloaded file against it

Give the model's URI without a version (s3://BUCKET/NAME, not
s3://BUCKET/NAME/1): the version comes from --version only.

DIR must be a SavedModel: saved_model.pb must decode as a SavedModel protocol
buffer with at least one meta graph (or saved_model.pbtxt hold one in text).
An existing complete version is replaced only with --force; its manifest and
saved_model.pb go first, so until the new push is done the version is
incomplete (no executor takes it as the latest; one pinned to it retries). An interrupted
push is resumed by running the same command again: files already uploaded
unchanged are kept, and multipart uploads the interrupted run left open are
aborted."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``models`` subcommands to ``parser``."""
    raw = argparse.RawDescriptionHelpFormatter
    parser.formatter_class = raw
    parser.epilog = CREDENTIALS_HELP
    parser.add_argument("--endpoint", help="S3 endpoint host:port (default: $MULAMBDA_S3_ENDPOINT)")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    push = sub.add_parser("push", help="upload a SavedModel folder as one version",
                          description=PUSH_HELP, epilog=CREDENTIALS_HELP, formatter_class=raw)
    push.add_argument("dir", help="SavedModel folder (holds saved_model.pb)")
    push.add_argument("uri", help="s3://BUCKET/NAME (without the version)")
    push.add_argument("--version", type=int, required=True,
                      help=f"version number (1 to {MAX_VERSION})")
    push.add_argument("--force", action="store_true", help="replace an existing version")
    push.add_argument("--part-size-mib", type=int, default=DEFAULT_PART_SIZE_MIB,
                      help=f"multipart part size in MiB (default {DEFAULT_PART_SIZE_MIB})")

    lst = sub.add_parser("list", help="list versions with their sizes", epilog=CREDENTIALS_HELP,
                         formatter_class=raw)
    lst.add_argument("uri", help="s3://BUCKET/NAME")

    rm = sub.add_parser("rm", help="remove one version", epilog=CREDENTIALS_HELP,
                        formatter_class=raw)
    rm.add_argument("uri", help="s3://BUCKET/NAME (without the version)")
    rm.add_argument("--version", type=int, required=True, help="version number")

    mb = sub.add_parser("mb", help="create buckets unless they exist, waiting for the store",
                        epilog=CREDENTIALS_HELP, formatter_class=raw)
    mb.add_argument("buckets", nargs="+", metavar="BUCKET",
                    help="bucket name; a comma-separated list counts as several")
    mb.add_argument("--wait", type=float, default=DEFAULT_WAIT_SECONDS, metavar="SECONDS",
                    help="how long to retry while the store does not answer "
                         f"(default {DEFAULT_WAIT_SECONDS:g})")
    # Also after the action (`models push ... --endpoint X` was "unrecognized"); not given
    # there, the one before the action stands.
    for action in (push, lst, rm, mb):
        action.add_argument("--endpoint", default=argparse.SUPPRESS,
                            help="S3 endpoint host:port (default: $MULAMBDA_S3_ENDPOINT)")


def refuse_version_in_uri(uri: str, prefix: str, version: int | None) -> None:
    """UsageError when ``uri`` already ends in a version number and ``--version`` is given.

    ``push .../half_plus_two/1 --version 1`` would write ``half_plus_two/1/1/``,
    a model named "1" inside the model folder.
    """
    parent, _, last = prefix.rpartition("/")
    if version is None or not last.isdigit():
        return
    fixed = uri.rstrip("/").rsplit("/", 1)[0]
    hint = (f"use {fixed} --version {version}" if parent else
            "give the model's folder, s3://BUCKET/NAME, with --version")
    raise UsageError(
        f"{uri} already ends in a version number ({last}) and --version {version} is given: "
        f"this would address {uri.rstrip('/')}/{version}/. {hint}")


def bucket_names(args: Iterable[str]) -> list[str]:
    """Bucket names from ``BUCKET`` arguments (each may be a comma-separated list)."""
    names = [b for arg in args for b in arg.split(",") if b]
    if not names:
        raise UsageError("no bucket name given")
    bad = [b for b in names if not is_bucket_name(b)]
    if bad:
        raise UsageError(f"not a bucket name (3-63 lowercase letters, digits, dots or dashes): "
                         f"{', '.join(map(repr, bad))}")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    """Run one ``models`` subcommand; returns the exit code."""
    # The S3 client (minio, urllib3) only once a subcommand really runs.
    from mulambda.storage.s3 import ModelStorage, classify_error

    command = args.models_command
    try:
        if command == "mb":
            buckets, bucket, prefix = bucket_names(args.buckets), "", ""
        else:
            buckets, (bucket, prefix) = [], parse_s3_uri(args.uri)
        if getattr(args, "version", None) is not None and not 1 <= args.version <= MAX_VERSION:
            raise UsageError(f"--version must be from 1 to {MAX_VERSION}")
        if command in ("push", "rm"):
            refuse_version_in_uri(args.uri, prefix, args.version)
        storage = ModelStorage.from_env(endpoint=args.endpoint)
    except (ValueError, UsageError) as exc:
        return _fail(str(exc), 2)
    try:
        if command == "push":
            return _push(storage, args, bucket, prefix)
        if command == "list":
            return _list(storage, bucket, prefix)
        if command == "mb":
            return _mb(storage, buckets, args.wait)
        return _rm(storage, bucket, prefix, args.version)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except StoreError as exc:
        return _fail(str(exc), 1)
    except Exception as exc:  # store/network errors: one clear line, no traceback
        info = classify_error(exc)
        return _fail(f"{info.reason}: {info.message}", 1)
    finally:
        storage.close()


def _note(message: str) -> None:
    print(f"mulambda models: note: {message}", file=sys.stderr)


def _fail(message: str, code: int) -> int:
    print(f"mulambda models: error: {message}", file=sys.stderr)
    return code


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable; keeps type checkers happy


def saved_model_files(src: Path) -> list[Path]:
    """Files of a SavedModel folder, ``saved_model.pb*`` last. Raises UsageError if not one."""
    from mulambda.storage.savedmodel import NotASavedModel, check_saved_model

    if not src.is_dir():
        raise UsageError(f"{src} is not a directory")
    if not any((src / name).is_file() for name in SAVED_MODEL_FILES):
        raise UsageError(
            f"{src} is not a SavedModel folder: no saved_model.pb or saved_model.pbtxt in it "
            f"(pass the version folder itself, e.g. .../half_plus_two/1)")
    try:
        check_saved_model(src)
    except NotASavedModel as exc:
        raise UsageError(f"{src} is not a SavedModel: {exc}") from None
    files = []
    for path in _walk(src):
        rel = path.relative_to(src).as_posix()
        if rel in OWN_FILES:
            # A folder downloaded from a bucket or a companion's cache holds mulambda's
            # own manifest: uploaded as a model file, the version could never load.
            _note(f"skipped {path}: mulambda's own file, not part of the model")
        else:
            files.append(path)
    unsafe, clashing = unholdable(p.relative_to(src).as_posix() for p in files)
    if unsafe or clashing:
        # What the loader refuses (InvalidObjectKey), refused before anything is uploaded.
        names = ", ".join(repr(n) for n in [*unsafe, *clashing][:5])
        raise UsageError(f"{src} holds files a model version cannot have: {names} (names "
                         "must be UTF-8 without control characters or backslashes, and a "
                         "name cannot be both a file and a folder)")
    # The marker goes last so a half-pushed version is never "the latest".
    return sorted(files, key=lambda p: p.relative_to(src).as_posix() in SAVED_MODEL_FILES)


def _walk(src: Path) -> list[Path]:
    """Every file under ``src``, through links to files and to folders alike (the
    folders were skipped, a SavedModel whose ``variables`` was a link was pushed without
    it), in name order; a link back to a folder above is refused."""
    top = src.resolve()
    found: list[Path] = []
    outside: list[str] = []
    above: set[Path] = set()

    def visit(folder: Path) -> None:
        real = folder.resolve()
        if real in above:
            raise UsageError(f"{folder} links back to a folder above it")
        above.add(real)
        for entry in sorted(folder.iterdir()):
            if entry.is_symlink() and not entry.resolve().is_relative_to(top):
                outside.append(f"{entry.relative_to(src)} -> {entry.resolve()}")
            if entry.is_dir():
                visit(entry)
            elif entry.is_file():
                found.append(entry)
            elif entry.is_symlink():
                raise UsageError(f"{entry} is a link to nothing")
        above.discard(real)

    visit(src)
    if outside:
        _note(f"pushing files through links out of {src}: {', '.join(outside)}")
    return found


def push_version(
    storage: ModelStorage, src: Path, bucket: str, prefix: str, version: int, *,
    force: bool = False, part_size: int = DEFAULT_PART_SIZE_MIB * 1024 * 1024,
    progress: Callable[[int], object] | None = None,
) -> PushResult:
    """Upload SavedModel folder ``src`` to ``s3://bucket/prefix/version/``, manifest last.

    Without ``force`` a complete version (one with a push manifest) or a
    folder some other tool uploaded (a SavedModel without a manifest) is
    refused; a folder an interrupted push left behind (no manifest, no
    ``saved_model.pb`` yet) is resumed: files already there with the same
    size and CRC-32 are kept. Multipart uploads left open under the version
    are aborted first, and on any failure or interruption of this push.
    """
    from datetime import UTC, datetime

    from mulambda import __version__
    from mulambda.storage.checksums import file_crc32
    from mulambda.storage.manifest import ManifestFile, PushManifest
    from mulambda.storage.savedmodel import check_saved_model

    files = saved_model_files(src)
    saved_name, saved_info = check_saved_model(src)
    if not storage.bucket_exists(bucket):
        raise StoreError(f"bucket {bucket!r} does not exist on {storage.endpoint}")
    base = version_prefix(prefix, version)
    target = f"s3://{bucket}/{base}"
    aborted = storage.abort_unfinished_uploads(bucket, base)
    if aborted:
        _log().warning("aborted unfinished uploads of an interrupted push target=%s keys=%d",
                       target, len(aborted))
    existing = storage.list_version_objects(bucket, prefix, version)
    complete = _has_manifest(storage, bucket, prefix, version)
    if existing and not force:
        if complete:
            raise StoreError(f"{target} already exists ({len(existing)} objects); "
                             "pass --force to replace it")
        if any(o.relpath in SAVED_MODEL_FILES for o in existing):
            raise StoreError(f"{target} already holds a SavedModel without a push manifest "
                             "(uploaded by another tool, or a push interrupted at its very "
                             "end); pass --force to replace it")
    if complete:
        # Replacing: the old version must stop looking complete before any file changes.
        storage.client.remove_object(bucket, base + PUSH_MANIFEST_NAME)
    if force:
        # Its SavedModel too: loaders take a version with one and no manifest as whole
        # (another tool's upload), so a replacement that died, or is still running, left
        # old and new files served together. It is uploaded again last, the manifest after.
        for old in existing:
            if old.relpath in SAVED_MODEL_FILES:
                storage.client.remove_object(bucket, old.key)
    resumable = {} if force else {o.relpath: o for o in existing}
    pushed: list[ManifestFile] = []
    uploaded: set[str] = set()
    kept = total = 0
    try:
        for path in files:
            rel = path.relative_to(src).as_posix()
            key = base + rel
            size = path.stat().st_size
            crc = file_crc32(path)  # a second read, from the page cache; loaders check it
            pushed.append(ManifestFile(rel, size, crc))
            uploaded.add(key)
            total += size
            if _already_there(storage, bucket, resumable.get(rel), size, crc):
                kept += 1
                if progress is not None:
                    progress(size)
                continue
            with path.open("rb") as stream:
                storage.put_file(bucket, key, stream, size, part_size=part_size,
                                 progress=progress, crc32=crc)
    except BaseException:
        # Ctrl-C or a failed upload: do not leave parts in the store; the files
        # already uploaded stay, and the next run of the same push keeps them.
        try:
            storage.abort_unfinished_uploads(bucket, base)
        except Exception as exc:  # the store may be what failed
            _log().warning("could not abort unfinished uploads target=%s error=%s", target, exc)
        raise
    # Objects of the replaced (or interrupted) version that the new one does not have.
    stale = [o for o in existing if o.key not in uploaded]
    if stale:
        from minio.deleteobjects import DeleteObject

        errors = list(storage.client.remove_objects(bucket, (DeleteObject(o.key) for o in stale)))
        if errors:
            raise StoreError(f"pushed, but could not delete {len(errors)} stale object(s)")
    storage.put_push_manifest(bucket, prefix, PushManifest(
        version=version, files=tuple(pushed), saved_model=saved_name,
        meta_graphs=saved_info.meta_graphs, tool=f"mulambda {__version__}",
        pushed_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")))
    _log().info("pushed model version target=%s files=%d bytes=%d replaced=%s kept=%d",
                target, len(files), total, complete, kept)
    return PushResult(files=len(files), bytes=total, replaced=bool(existing) and force,
                      kept=kept, aborted=len(aborted))


def _has_manifest(storage: ModelStorage, bucket: str, prefix: str, version: int) -> bool:
    """True if the version holds a push manifest (a malformed one counts: it is replaced)."""
    try:
        return storage.push_manifest(bucket, prefix, version)[0] is not None
    except ValueError:
        return True


def _already_there(storage: ModelStorage, bucket: str, stored: StoredObject | None, size: int,
                   crc: int) -> bool:
    """True if an interrupted push already uploaded this file unchanged (same size and the
    CRC-32 it recorded)."""
    if stored is None or stored.size != size:
        return False
    return storage.object_checksums(bucket, stored.key).crc32 == crc


def _push(storage: ModelStorage, args: argparse.Namespace, bucket: str, prefix: str) -> int:
    if args.part_size_mib < MIN_PART_SIZE_MIB:
        raise UsageError(f"--part-size-mib must be at least {MIN_PART_SIZE_MIB}")
    from pathlib import Path

    src = Path(args.dir)
    files = saved_model_files(src)
    total = sum(p.stat().st_size for p in files)
    from tqdm import tqdm

    # disable=None: a bar on a terminal, silence in pipes and CI logs.
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              desc=f"push {prefix}/{args.version}", disable=None) as bar:
        result = push_version(storage, src, bucket, prefix, args.version, force=args.force,
                              part_size=args.part_size_mib * 1024 * 1024, progress=bar.update)
    verb = "replaced" if result.replaced else "pushed"
    notes = []
    if result.kept:
        notes.append(f"resumed: {result.kept} already uploaded")
    if result.aborted:
        notes.append(f"aborted {result.aborted} unfinished upload(s)")
    extra = f" ({'; '.join(notes)})" if notes else ""
    print(f"{verb} s3://{bucket}/{prefix}/{args.version}/: {result.files} files, "
          f"{_human(result.bytes)}, manifest written{extra}")
    return 0


def _list(storage: ModelStorage, bucket: str, prefix: str) -> int:
    if not storage.bucket_exists(bucket):
        raise StoreError(f"bucket {bucket!r} does not exist on {storage.endpoint}")
    versions = storage.version_summaries(bucket, prefix)
    if not versions:
        last = prefix.rpartition("/")[2]
        hint = (f" ({last} looks like a version: list s3://{bucket}/"
                f"{prefix.rpartition('/')[0]})" if last.isdigit() and "/" in prefix else "")
        raise StoreError(f"no versions under s3://{bucket}/{prefix}/{hint}")
    print(f"{'VERSION':>8}  {'FILES':>6}  {'SIZE':>10}  {'STATUS':<10}  BYTES")
    for version, v in versions.items():
        # complete: pushed with a manifest; unverified: a SavedModel another tool
        # uploaded (loaders check ETags only); incomplete: no saved_model.pb yet.
        status = "complete" if v.pushed else "unverified" if v.saved_model else "incomplete"
        print(f"{version:>8}  {v.files:>6}  {_human(v.bytes):>10}  {status:<10}  {v.bytes}")
    return 0


def _rm(storage: ModelStorage, bucket: str, prefix: str, version: int) -> int:
    if not storage.bucket_exists(bucket):
        raise StoreError(f"bucket {bucket!r} does not exist on {storage.endpoint}")
    removed = storage.remove_version(bucket, prefix, version)
    if removed == 0:
        raise StoreError(f"s3://{bucket}/{prefix}/{version}/ not found")
    print(f"removed s3://{bucket}/{prefix}/{version}/ ({removed} files)")
    return 0


def make_buckets(storage: ModelStorage, buckets: Iterable[str], *,
                 wait: float = DEFAULT_WAIT_SECONDS, retry_every: float = 2.0) -> dict[str, bool]:
    """Create each bucket unless it exists; ``{bucket: created?}``.

    While the store does not answer (connection refused, 5xx: it may still
    be starting) each bucket is retried for up to ``wait`` seconds in all;
    an answer that retrying cannot change (access denied) raises at once.
    """
    from mulambda.storage.s3 import classify_error

    deadline = time.monotonic() + wait
    done: dict[str, bool] = {}
    for bucket in buckets:
        while bucket not in done:
            try:
                done[bucket] = bool(storage.make_bucket(bucket))
            except Exception as exc:
                info = classify_error(exc)
                if info.permanent or time.monotonic() >= deadline:
                    raise
                _log().warning("waiting for S3 bucket=%s reason=%s error=%s",
                            bucket, info.reason, info.message)
                time.sleep(retry_every)
    return done


def _mb(storage: ModelStorage, buckets: list[str], wait: float) -> int:
    for bucket, created in make_buckets(storage, buckets, wait=wait).items():
        print(f"{'created' if created else 'exists'} s3://{bucket}")
    return 0


if __name__ == "__main__":  # pragma: no cover - convenience: python -m mulambda.tools.models
    parser = argparse.ArgumentParser(prog="mulambda models")
    configure(parser)
    raise SystemExit(run(parser.parse_args()))
