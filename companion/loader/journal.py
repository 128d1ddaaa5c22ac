"""The journal of a partial download: finished ranges, persisted next to the data.

A later attempt (even from a restarted process) adopts the ranges of the
same objects cut the same way, so a cut download resumes instead of
starting over.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from mulambda.storage.layout import JOURNAL_NAME

from .plan import FilePlan

log = logging.getLogger(__name__)

# Persist the journal at most this often; losing the last half second of
# progress on a crash costs little, rewriting it per range costs more.
JOURNAL_INTERVAL = 0.5


def _still_there(path: Path, plan: FilePlan, index: int, digest: str) -> bool:
    """Range ``index`` of ``path`` hashes to ``digest`` (True when ranges are not hashed
    one by one: their check is the whole file's, after the download)."""
    hasher = plan.range_hasher()
    if hasher is None:
        return True
    start, left = plan.ranges[index]
    with path.open("rb") as f:
        f.seek(start)
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                return False
            hasher.update(chunk)
            left -= len(chunk)
    return bool(hasher.hexdigest() == digest)


class Journal:
    """Finished ranges of a partial download, persisted next to the data."""

    def __init__(self, partial: Path, plans: dict[str, FilePlan]) -> None:
        self.partial = partial
        self.path = partial / JOURNAL_NAME
        self.plans = plans
        self.lock = threading.Lock()
        self._saved_at = 0.0

    def restore(self) -> int:
        """Adopt finished ranges from a previous attempt; returns bytes already there."""
        try:
            old = json.loads(self.path.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return 0
        kept = 0
        for rel, plan in self.plans.items():
            entry = old.get(rel)
            target = self.partial / rel
            if entry is None or not target.is_file():
                continue
            # Reuse only if it is the same object, cut the same way.
            same = (entry.get("key"), entry.get("size"), entry.get("etag"), entry.get("check"),
                    [tuple(r) for r in entry.get("ranges", [])], entry.get("crc32")) == (
                plan.obj.key, plan.obj.size, plan.obj.etag, plan.check, plan.ranges, plan.crc32)
            if not same or target.stat().st_size != plan.obj.size:
                continue
            recorded = {int(k): v for k, v in entry.get("done", {}).items()
                        if int(k) < len(plan.ranges)}
            # The digests were taken as the bytes were written, but the journal may have
            # reached the disk when the data did not (a crash before writeback), or the
            # bytes changed since: only ranges that still hash as recorded are kept.
            plan.done = {i: d for i, d in recorded.items() if _still_there(target, plan, i, d)}
            if len(plan.done) < len(recorded):
                log.warning("resumed download: ranges changed on disk fetched again file=%s "
                            "ranges=%d", rel, len(recorded) - len(plan.done))
            kept += sum(plan.ranges[i][1] for i in plan.done)
        return kept

    def mark(self, rel: str, index: int, digest: str) -> None:
        """Record range ``index`` of ``rel`` as finished with its checksum."""
        with self.lock:
            self.plans[rel].done[index] = digest
        self.save()

    def save(self, force: bool = False) -> None:
        """Persist (atomically), unless saved less than JOURNAL_INTERVAL ago and not forced."""
        now = time.monotonic()
        with self.lock:
            if not force and now - self._saved_at < JOURNAL_INTERVAL:
                return
            self._saved_at = now
            data = {"files": {rel: p.journal_entry() for rel, p in self.plans.items()}}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.path)

    def remove(self) -> None:
        """The download is verified: nothing left to resume."""
        self.path.unlink(missing_ok=True)
