"""Shards of a dataset: written record by record as ``prepare`` encodes the images (a local
file or an S3 multipart upload, hashed on the way, with its ``.idx``), and verified by
reading every one back against the manifest's sha256 and record count."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from typing import IO

from job import storage as st
from job.errors import InputError
from job.input import records
from job.storage import Storage

log = logging.getLogger(__name__)


class ShardWriter:
    """Streams records straight into the next shard of a split (a local file, or an S3
    multipart upload: no local copy), hashing them on the way; ``finish`` closes the shard,
    writes its ``.idx`` and starts a new one. Needs no MXNet: :mod:`job.input.records` frames the
    records as ``mx.recordio`` does."""

    def __init__(self, split: str, dest: str, storage: Storage, prefix: str) -> None:
        self.split, self.dest, self.storage, self.prefix = split, dest, storage, prefix
        self.shards: list[dict] = []
        self._stack = contextlib.ExitStack()  # holds the open shard's storage stream
        self._out: IO[bytes] | None = None
        self._index: list[str] = []  # the open shard's .idx lines, one per record
        self._offset = 0
        self._digest = hashlib.sha256()

    @property
    def count(self) -> int:
        """Records in the shard being written."""
        return len(self._index)

    def _name(self) -> str:
        return f"{self.split}/{self.prefix}{len(self.shards):05d}"

    def add(self, label: int, jpeg: bytes, record_id: int) -> None:
        if self._out is None:
            uri = st.join(self.dest, self._name() + ".rec")
            self._out = self._stack.enter_context(self.storage.open_write(uri))
            self._index, self._offset, self._digest = [], 0, hashlib.sha256()
        framed = records.frame(records.pack(label, record_id, jpeg))
        self._out.write(framed)
        self._digest.update(framed)
        self._index.append(records.index_line(self.count, self._offset))
        self._offset += len(framed)

    def finish(self) -> None:
        if self._out is None:
            return
        self._out = None
        self._stack.close()  # the .rec lands (the multipart upload completes)
        shard = self._name()
        self.storage.write_bytes(st.join(self.dest, shard + ".idx"), "".join(self._index).encode())
        self.shards.append(
            {
                "rec": shard + ".rec",
                "idx": shard + ".idx",
                "count": self.count,
                "bytes": self._offset,
                "sha256": self._digest.hexdigest(),
            }
        )

    def abort(self) -> None:
        """Called in an ``except`` block: the shard being written is dropped (a local
        temp file removed, an S3 multipart upload aborted)."""
        self._out = None
        self._stack.__exit__(*sys.exc_info())


def verify_dataset(root: str, manifest: dict, storage: Storage) -> None:
    """Re-read every shard; a checksum or record-count mismatch is an error naming the shard."""
    from job.input.records import RecordStream

    for split_ in manifest["splits"].values():
        for shard in split_["shards"]:
            uri = st.join(root, shard["rec"])
            digest, count = hashlib.sha256(), 0
            with storage.open_read(uri) as fh:
                stream = _Hashing(fh, digest)
                count = sum(1 for _ in RecordStream(uri, stream))  # type: ignore[arg-type,misc]
            if digest.hexdigest() != shard["sha256"] or count != shard["count"]:
                raise InputError(
                    f"prepare --verify: {uri}: sha256 or record count does not match "
                    f"({count} of {shard['count']} records)"
                )
    log.info("prepare: verified every shard's sha256 and record count")


class _Hashing:
    def __init__(self, fh, digest) -> None:
        self._fh, self._digest = fh, digest

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._digest.update(data)
        return data

    def close(self) -> None:
        self._fh.close()
