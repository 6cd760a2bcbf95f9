"""A ranged reader of one shard piece (local or S3) with bounded retries, yielding records."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from job.errors import DataError, JobError
from job.input.data.manifest import Piece, Shard
from job.input.data.stats import DataStats
from job.input.records import Corruption, Record, RecordStream, read_index
from job.storage import Storage, StorageError, StreamError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One record on its way to the batch: where it came from, for error messages."""

    label: int
    jpeg: bytes
    shard: str
    offset: int
    id: int = -1  # the record header's id: the image's index in the manifest's split files


class ShardReader:
    """Streams the records of pieces with one GET each, the next piece's GET opened ahead.

    A stream that breaks off is resumed with a ranged GET at the first byte not yet read;
    after ``retries`` failures in a row with no byte gained it is a DataError naming the
    shard and byte.
    A whole shard is hashed as it streams and checked against the manifest's sha256: a
    mismatch is a warning, or a DataError when ``strict``.
    """

    def __init__(
        self, storage: Storage, stats: DataStats, retries: int = 5, strict: bool = False
    ) -> None:
        self.storage, self.stats, self.retries, self.strict = storage, stats, retries, strict
        self._offsets: dict[str, list[int]] = {}
        self._checked: set[str] = set()
        self._warned: set[str] = set()

    def offsets(self, shard: Shard) -> list[int]:
        if shard.uri not in self._offsets:
            try:
                text = self.storage.read_bytes(shard.idx_uri).decode()
                self._offsets[shard.uri] = read_index(text)
            except (StorageError, ValueError) as e:
                raise DataError(f"{shard.idx_uri}: cannot read the shard index: {e}") from e
        return self._offsets[shard.uri]

    def check_shard(self, shard: Shard) -> None:
        """Before a shard is read: its size and its index's record count must be the
        manifest's, else a DataError naming the shard (a dataset changed under its
        manifest would otherwise train on a mix, with only checksum warnings)."""
        if shard.uri in self._checked:
            return
        if shard.size >= 0:
            try:
                size = self.storage.size(shard.uri)
            except StorageError as e:
                raise DataError(f"{shard.uri}: cannot read the shard: {e}") from e
            if size != shard.size:
                raise DataError(
                    f"{shard.uri}: {size} bytes, the manifest says {shard.size}: the shard "
                    "does not belong to this manifest (re-run prepare with --overwrite)"
                )
        records = len(self.offsets(shard))
        if records != shard.count:
            raise DataError(
                f"{shard.idx_uri}: indexes {records} records, the manifest says {shard.count}: "
                "the shard does not belong to this manifest (re-run prepare with --overwrite)"
            )
        self._checked.add(shard.uri)

    def byte_range(self, piece: Piece) -> tuple[int, int | None]:
        shard = piece.shard
        start = self.offsets(shard)[piece.start] if piece.start > 0 else 0
        end = self.offsets(shard)[piece.stop] if piece.stop < shard.count else None
        return start, end

    def stream(self, pieces: list[Piece]) -> Iterator[tuple[Piece, Record]]:
        """Every record of ``pieces`` in order; the next piece's GET opens in the background
        while this one is read, so a shard boundary costs no round trip."""
        if not pieces:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="finetune-open") as opener:
            ahead: Future[tuple[_Attempts, IO[bytes]]] | None
            ahead = opener.submit(self._open_piece, pieces[0])
            try:
                for i, piece in enumerate(pieces):
                    assert ahead is not None
                    attempts, fh = ahead.result()
                    ahead = None
                    if i + 1 < len(pieces):
                        ahead = opener.submit(self._open_piece, pieces[i + 1])
                    for record in self._read(piece, fh, attempts):
                        yield piece, record
            finally:
                if ahead is not None:  # stopped early: close the stream opened ahead
                    with contextlib.suppress(JobError):
                        ahead.result()[1].close()

    def _open_piece(self, piece: Piece) -> tuple[_Attempts, IO[bytes]]:
        self.check_shard(piece.shard)
        start, end = self.byte_range(piece)
        attempts = _Attempts(self, piece.shard, end)
        return attempts, attempts.open(start, None)

    def _read(self, piece: Piece, fh: IO[bytes], attempts: _Attempts) -> Iterator[Record]:
        shard = piece.shard
        start, end = self.byte_range(piece)
        digest = hashlib.sha256() if start == 0 and end is None and shard.sha256 else None
        events = 0

        def on_corrupt(c: Corruption) -> None:
            nonlocal events
            events += 1
            self.stats.corrupt(c)

        stream = RecordStream(
            shard.uri,
            fh,
            start,
            end,
            on_corrupt=on_corrupt,
            reopen=attempts.open,
            retry_on=(StreamError, OSError),
            on_bytes=None if digest is None else digest.update,
        )
        yielded = 0
        try:
            for record in stream:
                self.stats.add("bytes_read", len(record.payload) + 8)
                yielded += 1
                yield record
        finally:
            stream.close()
        missing = (piece.stop - piece.start) - yielded
        if missing > events:  # a truncated shard loses every record after the cut
            lost = range(piece.stop - (missing - events), piece.stop)
            self.stats.corrupt(  # keyed by record number (negative: no byte offset to name)
                Corruption(shard.uri, -1, f"{missing} of {piece.stop - piece.start} missing"),
                [(shard.uri, -1 - i) for i in lost],
            )
        if digest is not None and digest.hexdigest() != shard.sha256:
            self._checksum_mismatch(shard, digest.hexdigest())

    def _checksum_mismatch(self, shard: Shard, actual: str) -> None:
        self.stats.add("checksum_mismatches")
        message = (
            f"{shard.uri}: sha256 {actual[:12]}… differs from the manifest's {shard.sha256[:12]}…"
        )
        if self.strict:
            raise DataError(message + " (--strict-data)")
        if shard.uri not in self._warned:
            self._warned.add(shard.uri)
            log.warning("%s; training goes on (use --strict-data to stop instead)", message)


class _Attempts:
    """Opens (and reopens) one piece's byte stream, counting failures against the limit."""

    BACKOFF_S = 0.2  # doubled after each failure, at most 2 s

    def __init__(self, reader: ShardReader, shard: Shard, end: int | None) -> None:
        self.reader, self.shard, self.end = reader, shard, end
        self.failures = 0  # in a row, without a byte of progress
        self.progress = 0

    def open(self, offset: int, error: BaseException | None) -> IO[bytes]:
        stats, uri = self.reader.stats, self.shard.uri
        if offset > self.progress:  # bytes arrived since the last failure: a fresh budget
            self.failures, self.progress = 0, offset
        while True:
            if error is not None:
                self.failures += 1
                stats.add("read_retries")
                if self.failures > self.reader.retries:
                    stats.add("read_errors")
                    raise DataError(
                        f"{uri}: read failed at byte {offset} after {self.reader.retries} "
                        f"retries: {str(error).removeprefix(uri + ': ')}"
                    ) from error
                log.warning("%s; resuming at byte %d (retry %d)", error, offset, self.failures)
                time.sleep(min(2.0, self.BACKOFF_S * 2 ** (self.failures - 1)))
            try:
                return self.reader.storage.open_read(uri, offset, self.end)
            except StorageError as e:
                error = e
