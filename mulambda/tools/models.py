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
from collections.abc import Iterable

from mulambda.storage.layout import is_bucket_name, parse_s3_uri

from .push import (
    DEFAULT_PART_SIZE_MIB,
    MAX_VERSION,
    StoreError,
    UsageError,
    logger,
    push_version,
    saved_model_files,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from mulambda.storage.s3 import ModelStorage

MIN_PART_SIZE_MIB = 5  # S3's minimum multipart part size
DEFAULT_WAIT_SECONDS = 180.0  # how long ``mb`` waits for the store to answer


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


def _fail(message: str, code: int) -> int:
    print(f"mulambda models: error: {message}", file=sys.stderr)
    return code


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # unreachable; keeps type checkers happy


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
                              part_size=args.part_size_mib * 1024 * 1024, progress=bar.update,
                              files=files)
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
                logger().warning("waiting for S3 bucket=%s reason=%s error=%s",
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
