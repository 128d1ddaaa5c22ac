"""Atomic, resumable, verified download of one model version for TF Serving.

TF Serving watches ``MODELS_DIR/NAME/`` and loads any numeric folder it
finds, so a version must appear there complete or not at all.
:func:`load_model_version` (``load.py``):

1. lists ``s3://BUCKET/PREFIX/VERSION/`` (one LIST call gives keys, sizes
   and ETags) and refuses early what is not a SavedModel;
2. reads the version's push manifest (``mulambda.storage.manifest``:
   every file's size and CRC-32, written last by ``mulambda models push``);
3. returns at once if ``NAME/VERSION/`` already holds this exact listing
   and manifest (a local manifest records them; ``publish.py``), and
   refuses at once, without downloading, bytes that already failed
   verification (remembered by listing digest);
4. plans each object (``plan.py``): with a push manifest, every file of
   every size is checked against it (a file added, missing or resized is a
   ``ChecksumMismatch`` before any download); without one (other tools),
   the CRC-32 push recorded as object metadata, else the MD5 ETag of
   single-part uploads, else a multipart ETag whose part size the store
   reveals;
5. downloads into ``NAME/.partial-VERSION/`` on the same volume, by ranged
   GETs on a bounded thread pool, each range streamed into the file at its
   offset and checksummed by the worker that fetched it (``download.py``);
6. verifies every byte count and checksum (``verify.py``), and that
   ``saved_model.pb`` decodes as a SavedModel (``mulambda.storage.savedmodel``);
7. renames the folder to ``NAME/VERSION/`` (atomic on one filesystem;
   ``publish.py``). A failed check deletes the partial folder and never
   touches a published copy.

Transient failures are retried with exponential back-off and resumed
(``errors.py``): finished ranges are recorded in a journal inside the
partial folder (``journal.py``), and a range cut off half-way continues
from its last written byte. The journal survives a failed call, so the
next call (even from a restarted process) picks up where this one stopped.
An object the store keeps failing to read (a 5xx on every GET while it
answers a HEAD for it: a damaged object) is the permanent
``ObjectUnreadable``, not a transient error retried forever.

Everything here is synchronous; the companion runs it in a worker thread.
"""

from .errors import ModelLoadError
from .journal import JOURNAL_NAME
from .load import LOAD_RETRIES, LoadResult, load_model_version, resolve_version
from .publish import MANIFEST_NAME, cached_version, remove_other_versions

__all__ = [
    "JOURNAL_NAME",
    "LOAD_RETRIES",
    "MANIFEST_NAME",
    "LoadResult",
    "ModelLoadError",
    "cached_version",
    "load_model_version",
    "remove_other_versions",
    "resolve_version",
]
