"""Atomic, resumable, verified download of one model version for TF Serving.

TF Serving watches ``MODELS_DIR/NAME/`` and loads any numeric folder it
finds, so a version must appear there complete or not at all.
:func:`load_model_version` (``load.py``):

1. lists ``s3://BUCKET/PREFIX/VERSION/`` (one LIST call gives keys, sizes
   and ETags) and refuses early what is not a SavedModel;
2. returns at once if ``NAME/VERSION/`` already holds this exact listing
   (a manifest file in the folder records keys, sizes and ETags;
   ``publish.py``);
3. plans each object (``plan.py``): its ranges and the cheapest checksum
   the store offers: the CRC-32 ``mulambda models push`` records as
   metadata (cheapest, end to end), else the MD5 ETag of single-part
   uploads, else a multipart ETag whose part size the store reveals;
4. downloads into ``NAME/.partial-VERSION/`` on the same volume, by ranged
   GETs on a bounded thread pool, each range streamed into the file at its
   offset and checksummed by the worker that fetched it (``download.py``);
5. verifies every byte count and checksum (``verify.py``);
6. renames the folder to ``NAME/VERSION/`` (atomic on one filesystem;
   ``publish.py``).

Transient failures are retried with exponential back-off and resumed
(``errors.py``): finished ranges are recorded in a journal inside the
partial folder (``journal.py``), and a range cut off half-way continues
from its last written byte. The journal survives a failed call, so the
next call (even from a restarted process) picks up where this one stopped.

Everything here is synchronous; the companion runs it in a worker thread.
"""

from .errors import ModelLoadError
from .journal import JOURNAL_NAME
from .load import LoadResult, load_model_version, resolve_version
from .publish import MANIFEST_NAME, remove_other_versions

__all__ = [
    "JOURNAL_NAME",
    "MANIFEST_NAME",
    "LoadResult",
    "ModelLoadError",
    "load_model_version",
    "remove_other_versions",
    "resolve_version",
]
