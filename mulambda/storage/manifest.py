"""The push manifest: what ``mulambda models push`` uploaded, written last, checked by loaders.

``s3://BUCKET/PREFIX/VERSION/.mulambda-push-manifest.json`` names every file
of the version with its size and CRC-32, computed from the local file before
upload. Push writes it after every file, so its presence also says "this
push finished". The loader checks every file of every size against it
before a version is published: a file changed in storage after the push
(overwritten, truncated, rotted), a file added or a file missing is a
``ChecksumMismatch``, whatever the store's own ETag says.

It protects against accidents and faults, not against someone who can write
the bucket: such a writer can rewrite the manifest too (it is not signed).

Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .layout import PUSH_MANIFEST_NAME

__all__ = ["MANIFEST_FORMAT", "PUSH_MANIFEST_NAME", "ManifestFile", "PushManifest"]

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ManifestFile:
    """One file of a pushed version: its path below the version folder, size and CRC-32."""

    path: str
    size: int
    crc32: int


@dataclass(frozen=True)
class PushManifest:
    """Every file of one pushed version, and what the SavedModel check found."""

    version: int
    files: tuple[ManifestFile, ...]
    saved_model: str = "saved_model.pb"
    meta_graphs: int = 1
    pushed_at: str = ""
    tool: str = ""

    def by_path(self) -> dict[str, ManifestFile]:
        return {f.path: f for f in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        return json.dumps({
            "format": MANIFEST_FORMAT, "version": self.version, "tool": self.tool,
            "pushed_at": self.pushed_at,
            "saved_model": {"file": self.saved_model, "meta_graphs": self.meta_graphs},
            "files": [{"path": f.path, "size": f.size, "crc32": f"{f.crc32:08x}"}
                      for f in self.files],
        }, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PushManifest:
        """Parse; ValueError (saying what is wrong) for anything but a well-formed manifest."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"not a format {MANIFEST_FORMAT} push manifest")
            files = []
            for entry in data["files"]:
                crc = entry["crc32"]
                if not (isinstance(crc, str) and len(crc) == 8):
                    raise ValueError(f"bad crc32 {crc!r} for {entry.get('path')!r}")
                size = entry["size"]
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise ValueError(f"bad size {size!r} for {entry.get('path')!r}")
                files.append(ManifestFile(str(entry["path"]), size, int(crc, 16)))
            saved = data.get("saved_model") or {}
            return cls(version=int(data["version"]), files=tuple(files),
                       saved_model=str(saved.get("file", "saved_model.pb")),
                       meta_graphs=int(saved.get("meta_graphs", 0)),
                       pushed_at=str(data.get("pushed_at", "")), tool=str(data.get("tool", "")))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed push manifest: {type(exc).__name__}: {exc}") from None
        except ValueError as exc:  # JSON errors included
            raise ValueError(f"malformed push manifest: {exc}") from None
