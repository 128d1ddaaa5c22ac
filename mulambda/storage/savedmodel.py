"""Is this folder a TensorFlow SavedModel? Decided without TensorFlow or protobuf installed.

TF Serving loads ``saved_model.pb`` (binary protocol buffer) or
``saved_model.pbtxt`` (text format). The message, from
tensorflow/core/protobuf/saved_model.proto::

    message SavedModel {
      int64 saved_model_schema_version = 1;
      repeated MetaGraphDef meta_graphs = 2;
    }

and a MetaGraphDef's fields 1-7 (meta_info_def, graph_def, saver_def,
collection_def, signature_def, asset_file_def, object_graph_def) are all
messages or map entries, i.e. length-delimited.

:func:`check_saved_model_pb` walks the protobuf wire format: every
top-level field must be well formed (a valid tag, a known wire type, a
length inside the file), field 1 a varint, field 2 length-delimited, and
there must be at least one field 2, not empty; inside each meta graph the same walk
runs one level deep (known fields length-delimited). Nested payloads such
as the graph itself are skipped by their length, so a walk costs a few
seeks whatever the file's size. Unknown fields are allowed, as protobuf
parsers allow them. Any other file, even one named ``saved_model.pb``, is
refused: random bytes, text and truncated files fail the walk almost
always at the first few bytes.

The text format gets a lighter check (:func:`check_saved_model_pbtxt`):
UTF-8, and a ``meta_graphs`` block at the top level.

Standard library only (``mulambda models --help`` imports nothing heavy).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["NotASavedModel", "SavedModelInfo", "check_saved_model", "check_saved_model_pb",
           "check_saved_model_pbtxt"]

SAVED_MODEL_PB = "saved_model.pb"
SAVED_MODEL_PBTXT = "saved_model.pbtxt"

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_META_GRAPH_FIELDS = range(1, 8)
_MAX_VARINT_BYTES = 10


class NotASavedModel(ValueError):
    """The file is not a SavedModel; the message says what was wrong and where."""


@dataclass(frozen=True)
class SavedModelInfo:
    """What the walk learned: the schema version (0 when absent) and the meta graph count."""

    schema_version: int
    meta_graphs: int


class _Reader:
    """A bounded view of a seekable binary file: varints, skips, the current offset."""

    def __init__(self, f: BinaryIO, start: int, end: int) -> None:
        self.f, self.pos, self.end = f, start, end

    def varint(self, what: str) -> int:
        value, shift, start = 0, 0, self.pos
        for _ in range(_MAX_VARINT_BYTES):
            if self.pos >= self.end:
                raise NotASavedModel(f"{what} at byte {start} runs past the end")
            self.f.seek(self.pos)
            byte = self.f.read(1)
            if not byte:
                raise NotASavedModel(f"{what} at byte {start} runs past the end of the file")
            self.pos += 1
            value |= (byte[0] & 0x7F) << shift
            if not byte[0] & 0x80:
                return value
            shift += 7
        raise NotASavedModel(f"{what} at byte {start} is longer than 10 bytes")

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise NotASavedModel(f"{what} of {n} bytes at byte {self.pos} runs past its end "
                                 f"(byte {self.end})")
        self.pos += n

    def fields(self, where: str):  # type: ignore[no-untyped-def]
        """(field number, wire type, value for varints or the payload's (start, length))."""
        while self.pos < self.end:
            at = self.pos
            tag = self.varint(f"{where}: tag")
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise NotASavedModel(f"{where}: field number 0 at byte {at}")
            if wire == _VARINT:
                yield number, wire, self.varint(f"{where}: field {number}")
            elif wire == _I64:
                self.skip(8, f"{where}: field {number}")
                yield number, wire, None
            elif wire == _I32:
                self.skip(4, f"{where}: field {number}")
                yield number, wire, None
            elif wire == _LEN:
                length = self.varint(f"{where}: length of field {number}")
                start = self.pos
                self.skip(length, f"{where}: field {number}")
                yield number, wire, (start, length)
            else:  # 3/4 are proto2 groups (never in SavedModel), 6/7 do not exist
                raise NotASavedModel(f"{where}: wire type {wire} of field {number} at byte {at}")


def _walk(f: BinaryIO, size: int) -> SavedModelInfo:
    top = _Reader(f, 0, size)
    version, graphs = 0, 0
    for number, wire, value in top.fields("SavedModel"):
        if number == 1:
            if wire != _VARINT:
                raise NotASavedModel("SavedModel: saved_model_schema_version is not an integer")
            version = int(value)  # type: ignore[arg-type]
        elif number == 2:
            if wire != _LEN:
                raise NotASavedModel("SavedModel: meta_graphs is not a message")
            start, length = value  # type: ignore[misc]
            if length == 0:
                raise NotASavedModel(f"meta graph {graphs} is empty")
            graph = _Reader(f, start, start + length)
            for inner, inner_wire, _ in graph.fields(f"meta graph {graphs}"):
                if inner in _META_GRAPH_FIELDS and inner_wire != _LEN:
                    raise NotASavedModel(f"meta graph {graphs}: field {inner} is not a message")
            graphs += 1
    if graphs == 0:
        raise NotASavedModel("no meta graph in it (SavedModel.meta_graphs is empty)")
    return SavedModelInfo(version, graphs)


def check_saved_model_pb(source: str | os.PathLike[str] | bytes) -> SavedModelInfo:
    """Raise :class:`NotASavedModel` unless ``source`` (a path or the bytes) decodes as a
    SavedModel with at least one meta graph."""
    if isinstance(source, bytes):
        return _walk(io.BytesIO(source), len(source))
    with open(source, "rb") as f:
        return _walk(f, os.fstat(f.fileno()).st_size)


_TEXT_META_GRAPHS = re.compile(r"^meta_graphs\s*:?\s*[{<]", re.M)


def check_saved_model_pbtxt(source: str | os.PathLike[str] | bytes) -> SavedModelInfo:
    """Raise :class:`NotASavedModel` unless ``source`` is UTF-8 text with a top-level
    ``meta_graphs`` block (the text format of the same message)."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotASavedModel(f"not UTF-8 text (byte {exc.start})") from None
    graphs = len(_TEXT_META_GRAPHS.findall(text))
    if not graphs:
        raise NotASavedModel("no top-level meta_graphs block in it")
    version = re.search(r"^saved_model_schema_version\s*:\s*(\d+)", text, re.M)
    return SavedModelInfo(int(version.group(1)) if version else 0, graphs)


def check_saved_model(folder: str | os.PathLike[str]) -> tuple[str, SavedModelInfo]:
    """The SavedModel file of a version folder (``saved_model.pb`` preferred, as TF Serving
    does) and what it holds; :class:`NotASavedModel` when there is none or it does not decode."""
    base = Path(folder)
    if (base / SAVED_MODEL_PB).is_file():
        try:
            return SAVED_MODEL_PB, check_saved_model_pb(base / SAVED_MODEL_PB)
        except NotASavedModel as exc:
            raise NotASavedModel(f"{SAVED_MODEL_PB} does not decode as a SavedModel protocol "
                                 f"buffer: {exc}") from None
    if (base / SAVED_MODEL_PBTXT).is_file():
        try:
            return SAVED_MODEL_PBTXT, check_saved_model_pbtxt(base / SAVED_MODEL_PBTXT)
        except NotASavedModel as exc:
            raise NotASavedModel(f"{SAVED_MODEL_PBTXT} is not a SavedModel in text format: "
                                 f"{exc}") from None
    raise NotASavedModel(f"no {SAVED_MODEL_PB} or {SAVED_MODEL_PBTXT} in it")
