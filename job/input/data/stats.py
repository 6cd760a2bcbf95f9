"""Counts of the input pipeline: corrupt records skipped (each once per job), bytes read."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from job.input.records import Corruption

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    """Counts the pipeline keeps for logs and metrics (read from other threads).

    ``corrupt_records`` counts distinct records: a corrupt record is read again in every
    epoch (and maybe by another rank), but it is one bad record of the dataset, so it counts
    once per job. ``corrupt_keys`` names them; a resumed job starts from the checkpoint's.
    """

    records: int = 0
    corrupt_records: int = 0
    bytes_read: int = 0
    read_retries: int = 0
    read_errors: int = 0
    checksum_mismatches: int = 0
    reported_shards: set[str] = field(default_factory=set)
    corrupt_keys: set[tuple[str, int]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def corrupt(self, c: Corruption, keys: list[tuple[str, int]] | None = None) -> None:
        """Count skipped records not counted before (``keys``, default the record at
        ``c.offset``); log the first corruption of each shard."""
        keys = [(c.shard, c.offset)] if keys is None else keys
        with self.lock:
            new = set(keys) - self.corrupt_keys
            self.corrupt_keys |= new
            self.corrupt_records += len(new)
            first = c.shard not in self.reported_shards
            self.reported_shards.add(c.shard)
        if first:  # once per shard; the count carries the rest
            log.warning(
                "corrupt data in %s at byte %d: %s (skipped; later ones in this shard "
                "are counted, not logged)",
                c.shard,
                c.offset,
                c.reason,
            )

    def seed_corrupt(self, keys: Iterable[Iterable[Any]]) -> None:
        """Records a previous run of this job already counted (from its checkpoint)."""
        with self.lock:
            self.corrupt_keys |= {(str(shard), int(at)) for shard, at in keys}
            self.corrupt_records = len(self.corrupt_keys)
