"""Streaming reads and writes of MXNet RecordIO shards (the format ``mx.recordio`` writes).

``mx.recordio.MXRecordIO`` reads and writes only local files, so records are framed here
from and into any byte stream (a local file, an S3 GET or a multipart upload) and unpacked
with ``mx.recordio.unpack``. Writing needs no MXNet: :func:`pack` and :func:`frame` give
byte for byte what ``mx.recordio.pack`` and ``MXRecordIO.write`` give. Framing, per
dmlc-core: a little-endian ``uint32`` magic, a ``uint32`` whose top 3 bits are a
continuation flag and low 29 bits the length, the payload, then padding to 4 bytes. A
payload containing the magic is split into parts (flag 1 start, 2 middle, 3 end) that are
joined with the magic re-inserted.

A bad magic, an impossible length or a truncated tail is not fatal: the reader counts it,
reports it once per shard, and resynchronises on the next magic it finds.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
MAX_RECORD_BYTES = 64 << 20  # larger lengths are corruption, not images
CHUNK = 1 << 20
# mx.recordio.IRHeader: flag, label, id, id2 (the struct "IfQQ", little-endian on every
# platform MXNet ships for).
_IR_HEADER = struct.Struct("<IfQQ")


def pack(label: float, record_id: int, payload: bytes) -> bytes:
    """``mx.recordio.pack(IRHeader(0, label, record_id, 0), payload)``."""
    return _IR_HEADER.pack(0, label, record_id, 0) + payload


def frame(record: bytes) -> bytes:
    """``record`` framed as dmlc-core's ``RecordIOWriter::WriteRecord`` frames it: split at
    every 4-byte-aligned magic in it (the magic itself dropped), each part behind a magic
    and its flag/length word, the last part padded to 4 bytes."""
    if len(record) > _LENGTH_MASK:
        raise ValueError(f"a record holds at most {_LENGTH_MASK} bytes, got {len(record)}")
    parts, start = [], 0
    at = record.find(MAGIC_BYTES)
    while at != -1:
        if at % 4:
            at = record.find(MAGIC_BYTES, at + 1)
            continue
        parts.append(record[start:at])
        start = at + 4
        at = record.find(MAGIC_BYTES, start)
    pad = b"\0" * (-len(record) % 4)
    if not parts:
        return _word(0, len(record)) + record + pad
    out = [_word(1 if i == 0 else 2, len(part)) + part for i, part in enumerate(parts)]
    return b"".join(out) + _word(3, len(record) - start) + record[start:] + pad


def _word(flag: int, length: int) -> bytes:
    return struct.pack("<II", MAGIC, flag << 29 | length)


@dataclass
class Corruption:
    shard: str
    offset: int
    reason: str


@dataclass
class Record:
    offset: int  # byte offset of the record's first frame in the shard
    payload: bytes


class RecordStream:
    """Yields the records of ``stream`` from byte ``start`` on.

    ``on_corrupt`` is called for every skipped region; ``reopen(offset, error)`` (optional)
    gives a fresh stream positioned at ``offset`` after a read raised one of ``retry_on``, so
    a dropped connection costs one ranged request, never a record. The stream is always
    reopened at the first byte not yet read, so the bytes read (``on_bytes``) are exactly the
    shard's bytes in order: a checksum over them needs no second read.
    """

    def __init__(
        self,
        name: str,
        stream: IO[bytes],
        start: int = 0,
        end: int | None = None,
        on_corrupt: Callable[[Corruption], None] | None = None,
        reopen: Callable[[int, Exception], IO[bytes]] | None = None,
        retry_on: tuple[type[BaseException], ...] = (OSError,),
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        self.name = name
        self._stream = stream
        self._buf = bytearray()
        self._buf_offset = start  # shard offset of self._buf[0]
        self._end = end
        self._eof = False
        self._on_corrupt = on_corrupt or (lambda c: None)
        self._reopen = reopen
        self._retry_on = retry_on
        self._on_bytes = on_bytes

    def __iter__(self) -> Iterator[Record]:
        while True:
            record = self._next()
            if record is None:
                return
            yield record

    def close(self) -> None:
        self._stream.close()

    # Buffer handling: the buffer always starts at a frame boundary we have not consumed.
    def _fill(self, need: int) -> bool:
        """Make ``need`` bytes available; False at the end of the stream."""
        while len(self._buf) < need and not self._eof:
            limit = CHUNK
            if self._end is not None:
                limit = min(limit, self._end - self._buf_offset - len(self._buf))
                if limit <= 0:
                    self._eof = True
                    break
            try:
                chunk = self._stream.read(
                    max(limit, need - len(self._buf)) if self._end is None else limit
                )
            except self._retry_on as e:  # a dropped connection: resume after the last byte read
                if self._reopen is None:
                    raise
                self._resume(e)
                continue
            if not chunk:
                self._eof = True
            elif self._on_bytes is not None:
                self._on_bytes(chunk)
            self._buf += chunk
        return len(self._buf) >= need

    def _resume(self, error: BaseException) -> None:
        assert self._reopen is not None
        with contextlib.suppress(*self._retry_on):  # the old stream is broken anyway
            self._stream.close()
        offset = self._buf_offset + len(self._buf)
        self._stream = self._reopen(offset, error)  # type: ignore[arg-type]

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._buf_offset += n

    def _next(self) -> Record | None:
        parts: list[bytes] = []
        record_offset = self._buf_offset
        while True:
            if not self._fill(8):
                if self._buf or parts:
                    self._corrupt(
                        record_offset, f"truncated shard: {len(self._buf)} trailing bytes"
                    )
                    self._consume(len(self._buf))
                return None
            magic, lrec = struct.unpack_from("<II", self._buf)
            flag, length = lrec >> 29, lrec & _LENGTH_MASK
            if magic != MAGIC or flag > 3 or length > MAX_RECORD_BYTES:
                reason = "bad magic" if magic != MAGIC else f"bad length/flag {length}/{flag}"
                self._corrupt(self._buf_offset, reason)
                self._resync()
                parts, record_offset = [], self._buf_offset
                continue
            padded = 8 + length + (-length % 4)
            if not self._fill(padded):
                self._corrupt(
                    self._buf_offset,
                    f"truncated record: needs {padded} bytes, {len(self._buf)} left",
                )
                self._consume(len(self._buf))
                return None
            if flag in (0, 1):
                if parts:  # a started multi-part record never finished
                    self._corrupt(record_offset, "unterminated multi-part record")
                parts, record_offset = [], self._buf_offset
            payload = bytes(self._buf[8 : 8 + length])
            self._consume(padded)
            if flag == 0:
                return Record(record_offset, payload)
            if flag > 1 and not parts:
                self._corrupt(record_offset, "multi-part record without its start")
                record_offset = self._buf_offset
                continue
            parts.append(payload)
            if flag == 3:
                return Record(record_offset, MAGIC_BYTES.join(parts))

    def _resync(self) -> None:
        """Drop bytes up to the next 4-byte-aligned magic (records are 4-byte aligned)."""
        self._consume(4)
        while True:
            at = self._buf.find(MAGIC_BYTES)
            while at != -1 and (self._buf_offset + at) % 4:
                at = self._buf.find(MAGIC_BYTES, at + 1)
            if at != -1:
                self._consume(at)
                return
            keep = 3  # a magic may straddle the chunk boundary
            drop = max(0, len(self._buf) - keep)
            drop -= (self._buf_offset + drop) % 4
            self._consume(max(drop, 0))
            if not self._fill(len(self._buf) + 4):
                self._consume(len(self._buf))
                return

    def _corrupt(self, offset: int, reason: str) -> None:
        self._on_corrupt(Corruption(self.name, offset, reason))


def index_line(key: int, offset: int) -> str:
    """One line of an ``.idx`` file, as ``MXIndexedRecordIO.write_idx`` writes it."""
    return f"{key}\t{offset}\n"


def read_index(text: str) -> list[int]:
    """Byte offsets of records from an ``.idx`` file (``key\\toffset`` lines)."""
    pairs = sorted(
        (int(k), int(v)) for k, v in (line.split("\t") for line in text.split("\n") if line)
    )
    return [offset for _, offset in pairs]
