"""The input pipeline: a rank's share of the shards → records → decoded, augmented batches.

Each rank streams its pieces of the shards (one GET per piece, from S3 or a local file)
in a background thread, shuffles records in a buffer, and decodes and augments them in a
thread pool straight into a preallocated float32 batch; finished batches wait in a short
queue so the training step never waits for the next one while there is work ahead.

Every rank runs the same number of steps per epoch (Horovod's allreduce needs it): the
count comes from the manifest, and a rank whose share runs short (skipped corrupt records)
starts its share again to fill the last batches.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import posixpath
import queue
import random
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, TypeGuard, TypeVar

import numpy as np

from job import augment
from job import storage as st
from job.errors import DataError, InputError, JobError
from job.records import Corruption, Record, RecordStream, read_index
from job.storage import Storage, StorageError, StreamError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    uri: str
    idx_uri: str
    count: int
    sha256: str = ""
    size: int = -1  # bytes of the .rec, from the manifest (-1: an older manifest, unchecked)


@dataclass(frozen=True)
class Piece:
    """Records [start, stop) of one shard."""

    shard: Shard
    start: int
    stop: int


@dataclass(frozen=True)
class Dataset:
    root: str
    classes: list[str]
    resize: int
    splits: dict[str, list[Shard]]

    def count(self, split: str) -> int:
        return sum(s.count for s in self.splits[split])


def load_dataset(root: str, storage: Storage) -> Dataset:
    uri = st.join(root, "manifest.json")
    try:
        if not storage.exists(uri):
            storage.check_bucket(uri)  # a missing bucket is named as such
            raise InputError(f"{uri}: no dataset manifest (run `finetune-job prepare` first)")
        doc = json.loads(storage.read_bytes(uri))
    except StorageError as e:
        raise InputError(str(e)) from e
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{uri}: not a dataset manifest (not JSON: {e})") from e
    dataset = parse_manifest(doc, root, uri)
    if not dataset.count("train"):
        raise InputError(f"{uri}: the dataset has no training images")
    return dataset


def parse_manifest(doc: Any, root: str, uri: str) -> Dataset:
    """The Dataset a manifest describes; anything that would misbehave later (a shard path
    outside the dataset root, a count that is not a whole number, ...) is an InputError
    naming the manifest and the entry."""

    def bad(what: str) -> InputError:
        return InputError(f"{uri}: not a valid dataset manifest: {what}")

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    classes = doc.get("classes")
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise bad(f"'classes' must list 2 or more distinct names, got {classes!r:.200}")
    resize = doc.get("resize")
    if not _whole(resize) or resize < 1:
        raise bad(f"'resize' must be a positive integer, got {resize!r}")
    splits_doc = doc.get("splits")
    if not isinstance(splits_doc, dict) or "train" not in splits_doc:
        raise bad("'splits' must hold at least 'train'")
    splits = {name: _shards(split, name, root, bad) for name, split in splits_doc.items()}
    splits.setdefault("val", [])
    return Dataset(root, list(classes), int(resize), splits)


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _shards(split: Any, name: str, root: str, bad: Any) -> list[Shard]:
    if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
        raise bad(f"split '{name}' has no list of shards")
    shards = []
    for i, s in enumerate(split["shards"]):
        where = f"split '{name}' shard {i}"
        if not isinstance(s, dict):
            raise bad(f"{where} is not an object")
        count = s.get("count")
        if not _whole(count) or count < 0:
            raise bad(f"{where}: 'count' must be a whole number >= 0, got {count!r}")
        sha = s.get("sha256", "")
        if not isinstance(sha, str):
            raise bad(f"{where}: 'sha256' must be a string, got {sha!r}")
        size = s.get("bytes", -1)  # absent in manifests written before sizes were recorded
        if not _whole(size) or size < -1:
            raise bad(f"{where}: 'bytes' must be a whole number >= 0, got {size!r}")
        paths = [_inside(root, s.get(key), f"{where} '{key}'", bad) for key in ("rec", "idx")]
        shards.append(Shard(paths[0], paths[1], count, sha, size))
    return shards


def _inside(root: str, rel: Any, where: str, bad: Any) -> str:
    """``root``/``rel``, where rel must stay inside the dataset root: a relative path with
    no '..' part, no scheme and no control characters."""
    ok = (
        isinstance(rel, str)
        and rel
        and not rel.startswith(("/", "\\"))
        and "://" not in rel
        and ".." not in posixpath.normpath(rel).split("/")
        and not any(ord(ch) < 32 or ord(ch) == 127 for ch in rel)
    )
    if not ok:
        raise bad(f"{where} must be a path inside the dataset root, got {rel!r:.200}")
    return st.join(root, rel)


def assign_shards(
    shards: list[Shard], rank: int, size: int, epoch: int, seed: int, shuffle: bool = True
) -> list[Piece]:
    """This rank's disjoint share of the records.

    The shards, in an order shuffled by (seed, epoch), are laid end to end and cut into
    ``size`` runs whose lengths differ by at most one record; rank r takes run r. Shards are
    cut only where a run ends, so most pieces are whole shards, and more ranks than shards
    still get balanced shares.
    """
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}/{epoch}").shuffle(order)
    total = sum(s.count for s in order)
    lo, hi = rank * total // size, (rank + 1) * total // size
    pieces, first = [], 0
    for shard in order:
        start, stop = max(lo, first), min(hi, first + shard.count)
        if start < stop:
            pieces.append(Piece(shard, start - first, stop - first))
        first += shard.count
    return pieces


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


class background(Iterator[T]):  # noqa: N801 - used like the generator function it replaces
    """Iterate ``items`` in a daemon thread, ``depth`` ahead; errors reach the consumer.

    The thread starts at once, not at the first ``next()``, so an epoch can be prepared while
    the previous one is still being evaluated and checkpointed."""

    _DONE = object()

    def __init__(self, items: Iterable[T], depth: int) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        thread = threading.Thread(
            target=self._produce, args=(items,), daemon=True, name="finetune-data"
        )
        thread.start()

    def _produce(self, items: Iterable[T]) -> None:
        try:
            for item in items:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            self._q.put(e)

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._q.get()
        if item is self._DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        self._finished = True
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


def shuffled(items: Iterable[T], buffer: int, rng: random.Random) -> Iterator[T]:
    """A streaming shuffle: each item leaves from a random place in a ``buffer``-sized pool."""
    pool: list[T] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        pool[i], item = item, pool[i]
        yield item
    rng.shuffle(pool)
    yield from pool


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    image_size: int
    seed: int = 0
    flip_prob: float = 0.5
    jitter: augment.Jitter = augment.Jitter()
    shuffle_buffer: int = 1024
    workers: int = 2
    prefetch_batches: int = 3
    tta: bool = False
    strict_data: bool = False  # a shard whose sha256 differs from the manifest is an error
    read_retries: int = 5  # resumed reads per piece before a DataError


@dataclass
class Batch:
    data: np.ndarray  # (B, 3, S, S) float32
    label: np.ndarray  # (B,) float32
    valid: int  # rows that hold real images (the rest pad a short last eval batch)
    five: np.ndarray | None = None  # (B, 5, 3, S, S) for test-time augmentation
    ids: np.ndarray | None = None  # (B,) record ids (evaluation batches only)


class Loader:
    """Batches of one split for one rank."""

    def __init__(
        self,
        dataset: Dataset,
        split: str,
        settings: LoaderSettings,
        rank: int,
        size: int,
        storage: Storage,
        stats: DataStats,
        train: bool | None = None,
    ) -> None:
        self.dataset, self.split, self.s = dataset, split, settings
        self.rank, self.size = rank, size
        self.train = split == "train" if train is None else train
        self.stats = stats
        self.reader = ShardReader(storage, stats, settings.read_retries, settings.strict_data)
        self._pool = ThreadPoolExecutor(max(1, settings.workers), thread_name_prefix="finetune-aug")
        self._buffers = BufferPool(keep=settings.prefetch_batches + 5)
        # Decode straight from the DCT at 1/2, 1/4, 1/8 size when that is still big enough.
        need = settings.image_size if self.train else augment.eval_resize(settings.image_size)
        self.reduce = max([r for r in (1, 2, 4, 8) if dataset.resize // r >= need] or [1])
        if self.train:
            self.steps_per_epoch = self._steps(size)
            if self.steps_per_epoch < 1:
                raise InputError(
                    f"{dataset.root}: {dataset.count(split) // size} training images per "
                    f"worker is less than one batch of {settings.batch_size}"
                )

    def _steps(self, size: int) -> int:
        """Training batches per epoch on each of ``size`` ranks."""
        return self.dataset.count(self.split) // size // self.s.batch_size

    def steps_left(self, skip: int, trained_by: int = 0) -> int:
        """Batches this rank has left in an epoch whose first ``skip`` batches were trained
        by ``trained_by`` ranks (a restart may run on another number; 0: this one). The
        images those ranks had left are shared out again; a remainder smaller than one
        global batch is dropped, as at the end of every epoch."""
        if trained_by in (0, self.size):
            return self.steps_per_epoch - skip
        left = trained_by * (self._steps(trained_by) - skip) * self.s.batch_size
        return left // self.size // self.s.batch_size

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _records(
        self, epoch: int, rank: int | None = None, size: int | None = None
    ) -> Iterator[Sample]:
        """The samples of one rank's share (this rank's, or ``rank`` of ``size``)."""
        from mxnet import recordio

        rank = self.rank if rank is None else rank
        size = self.size if size is None else size
        pieces = assign_shards(
            self.dataset.splits[self.split], rank, size, epoch, self.s.seed, shuffle=self.train
        )
        rng = random.Random(f"{self.s.seed}/{epoch}/{rank}")
        while True:
            raw: Iterator[tuple[Piece, Record]] = self.reader.stream(pieces)
            if self.train:
                raw = shuffled(raw, self.s.shuffle_buffer, rng)
            yielded = 0
            for piece, record in raw:
                try:
                    header, jpeg = recordio.unpack(record.payload)
                except struct.error:
                    self.stats.corrupt(
                        Corruption(piece.shard.uri, record.offset, "record shorter than a header")
                    )
                    continue
                label = float(np.ravel(header.label)[0])  # a scalar, or the first of a vector
                self._check_label(label, piece, record)
                yielded += 1
                yield Sample(int(label), jpeg, piece.shard.uri, record.offset, int(header.id))
            if not self.train:
                return
            if not yielded:
                raise DataError(
                    f"{self.dataset.root}: no readable {self.split} records in the "
                    f"share of rank {rank}"
                )
            # Training: fill the epoch's last batches with the share's first records again.

    def _check_label(self, label: float, piece: Piece, record: Record) -> None:
        """A label must name one of the manifest's classes; one that does not means the
        class list and the shards disagree, and training on it would be silently wrong."""
        classes = len(self.dataset.classes)
        if not (label.is_integer() and 0 <= label < classes):
            raise InputError(
                f"{piece.shard.uri}: the record at byte {record.offset} has label {label:g}, "
                f"but the manifest lists {classes} classes (labels 0..{classes - 1}); the "
                "class list disagrees with the shards: run finetune-job prepare again"
            )

    def epoch(self, epoch: int, skip_batches: int = 0, trained_by: int = 0) -> Iterator[Batch]:
        """Training batches of ``epoch`` (``steps_per_epoch`` of them) or all eval batches;
        a resumed epoch leaves out the first ``skip_batches`` that ``trained_by`` ranks
        trained (0: this many ranks)."""
        if self.train and trained_by not in (0, self.size) and skip_batches:
            records: Iterator[Sample] = background(
                self._rest_of_epoch(epoch, skip_batches, trained_by), 4 * self.s.batch_size
            )
            left = self.steps_left(skip_batches, trained_by)
            first = trained_by * skip_batches  # past every batch seed the old layout used
            return background(
                self._batches(records, epoch, first, left), depth=self.s.prefetch_batches
            )
        steps = self.steps_per_epoch - skip_batches if self.train else None
        records = background(self._records(epoch), depth=4 * self.s.batch_size)
        for _ in range(skip_batches * self.s.batch_size):  # resume mid-epoch: same order
            next(records)
        batches = self._batches(records, epoch, skip_batches, steps)
        return background(batches, depth=self.s.prefetch_batches)

    def _rest_of_epoch(self, epoch: int, skip: int, old_size: int) -> Iterator[Sample]:
        """What ``old_size`` ranks had not trained of ``epoch`` after ``skip`` batches each,
        dealt out to this layout's ranks: every image of it once, on one rank."""
        b, steps = self.s.batch_size, self._steps(old_size)
        rest = (
            itertools.islice(self._records(epoch, old_rank, old_size), skip * b, steps * b)
            for old_rank in range(old_size)
        )
        for i, sample in enumerate(itertools.chain.from_iterable(rest)):
            if i % self.size == self.rank:
                yield sample

    def _batches(
        self, records: Iterator[Sample], epoch: int, first: int, steps: int | None
    ) -> Iterator[Batch]:
        """Fill batches in the decode pool, two batches in flight so the pool never idles
        between them; a sample that fails to decode is replaced by the next record."""
        in_flight: collections.deque[_Pending] = collections.deque()
        step, exhausted = first, False
        while True:
            while not exhausted and len(in_flight) < 2 and (steps is None or step < first + steps):
                pending = self._start_batch(epoch, step)
                for slot in range(self.s.batch_size):
                    if not self._submit(pending, slot, records):
                        exhausted = True
                        break
                step += 1
                if pending.futures:
                    in_flight.append(pending)
            if not in_flight:
                return
            pending = in_flight.popleft()
            while pending.futures:
                slot, future = pending.futures.popitem()
                if future.result():
                    pending.filled[slot] = True
                elif not exhausted and not self._submit(pending, slot, records):
                    exhausted = True
            if pending.filled.any():  # an eval tail of only undecodable images yields none
                yield self._finish(pending.batch, pending.filled)

    def _start_batch(self, epoch: int, step: int) -> _Pending:
        b, size = self.s.batch_size, self.s.image_size
        five = self.s.tta and not self.train
        batch = Batch(  # recycled arrays: every row is written by a sample or zeroed in _finish
            self._buffers.get((b, 3, size, size)),
            np.zeros(b, np.float32),
            0,
            self._buffers.get((b, 5, 3, size, size)) if five else None,
            None if self.train else np.full(b, -1, np.int64),
        )
        return _Pending(batch, (self.s.seed, epoch, self.rank, step), np.zeros(b, bool))

    def _submit(self, pending: _Pending, slot: int, records: Iterator[Sample]) -> bool:
        sample = next(records, None)
        if sample is None:
            return False
        seed = (*pending.seed, slot)
        pending.futures[slot] = self._pool.submit(self._sample, pending.batch, slot, sample, seed)
        return True

    def _finish(self, batch: Batch, filled: np.ndarray) -> Batch:
        batch.valid = int(filled.sum())
        self.stats.add("records", batch.valid)
        if batch.valid < len(filled):  # eval's short last batch: real rows first, zeros after
            order = np.argsort(~filled, kind="stable")
            batch.data, batch.label = batch.data[order], batch.label[order]
            if batch.ids is not None:
                batch.ids = batch.ids[order]
            batch.data[batch.valid :] = 0
            batch.label[batch.valid :] = 0
            if batch.five is not None:
                batch.five = batch.five[order]
                batch.five[batch.valid :] = 0
        return batch

    def _sample(self, batch: Batch, slot: int, sample: Sample, seed: tuple[int, ...]) -> bool:
        img = augment.decode(sample.jpeg, self.reduce)
        if img is None:
            self.stats.corrupt(Corruption(sample.shard, sample.offset, "image does not decode"))
            return False
        batch.label[slot] = sample.label
        if batch.ids is not None:
            batch.ids[slot] = sample.id
        if self.train:
            augment.train_sample(
                img,
                self.s.image_size,
                self.s.flip_prob,
                self.s.jitter,
                np.random.default_rng(seed),
                batch.data[slot],
            )
        else:
            augment.eval_sample(
                img,
                self.s.image_size,
                batch.data[slot],
                None if batch.five is None else batch.five[slot],
            )
        return True


def to_ndarray(array: np.ndarray, ctx: Any) -> Any:
    """A batch array as an NDArray on ``ctx``: on the CPU it shares the memory (a copy of a
    38 MB batch takes ~17 ms, a core's worth at 3000 img/s); to a GPU it is the one copy."""
    import mxnet as mx

    if ctx.device_type == "cpu" and array.flags.c_contiguous:
        return mx.nd.from_numpy(array, zero_copy=True)
    return mx.nd.array(array, ctx=ctx)


class BufferPool:
    """Batch arrays, handed out again once nothing else refers to them.

    A fresh 38 MB batch costs ~10 000 page faults when first written (~60 ms on a VM, as
    much as decoding the batch); a recycled one costs none. An array is reused only when
    the pool holds the sole reference (CPython's reference count), so a batch (or a view of
    it) that the consumer keeps is never overwritten.
    """

    _UNUSED_REFS = 3  # the pool's list, the loop variable, getrefcount's argument

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._arrays: list[np.ndarray] = []

    def get(self, shape: tuple[int, ...]) -> np.ndarray:
        for array in self._arrays:
            if array.shape == shape and sys.getrefcount(array) <= self._UNUSED_REFS:
                array.flags.writeable = True  # mx.nd.from_numpy(zero_copy=True) clears it
                return array
        array = np.empty(shape, np.float32)
        if len(self._arrays) < self.keep:
            self._arrays.append(array)
        return array


@dataclass
class _Pending:
    """A batch being filled: its decode futures by slot and the slots done."""

    batch: Batch
    seed: tuple[int, ...]
    filled: np.ndarray
    futures: dict[int, Future[bool]] = field(default_factory=dict)


class SyntheticLoader:
    """Random in-memory batches (as Horovod's SyntheticDataIter): no data, no S3."""

    def __init__(self, classes: int, images: int, settings: LoaderSettings, size: int) -> None:
        rng = np.random.default_rng(settings.seed)
        shape = (settings.batch_size, 3, settings.image_size, settings.image_size)
        self.batch = Batch(
            rng.standard_normal(shape, np.float32),
            rng.integers(0, classes, settings.batch_size).astype(np.float32),
            settings.batch_size,
        )
        self.images, self.size, self.batch_size = images, size, settings.batch_size
        self.steps_per_epoch = self._steps(size)

    def _steps(self, size: int) -> int:
        return max(1, self.images // (self.batch_size * size))

    def steps_left(self, skip: int, trained_by: int = 0) -> int:
        if trained_by in (0, self.size):
            return self.steps_per_epoch - skip
        left = trained_by * (self._steps(trained_by) - skip) * self.batch_size
        return left // self.size // self.batch_size

    def epoch(self, epoch: int, skip_batches: int = 0, trained_by: int = 0) -> Iterator[Batch]:
        for _ in range(self.steps_left(skip_batches, trained_by)):
            yield self.batch

    def close(self) -> None:
        pass
