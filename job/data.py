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

import json
import logging
import queue
import random
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from job import augment
from job import storage as st
from job.errors import DataError, InputError
from job.records import Corruption, RecordStream, read_index
from job.storage import Storage, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    uri: str
    idx_uri: str
    count: int
    sha256: str = ""


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
            raise InputError(f"{uri}: no dataset manifest (run `finetune-job prepare` first)")
        doc = json.loads(storage.read_bytes(uri))
        splits = {
            name: [
                Shard(
                    st.join(root, s["rec"]),
                    st.join(root, s["idx"]),
                    int(s["count"]),
                    s.get("sha256", ""),
                )
                for s in split["shards"]
            ]
            for name, split in doc["splits"].items()
        }
        dataset = Dataset(root, list(doc["classes"]), int(doc["resize"]), splits)
    except StorageError as e:
        raise InputError(str(e)) from e
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{uri}: not a dataset manifest ({type(e).__name__}: {e})") from e
    if not dataset.count("train"):
        raise InputError(f"{uri}: the dataset has no training images")
    return dataset


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
    """Counts the pipeline keeps for logs and metrics (read from other threads)."""

    records: int = 0
    corrupt_records: int = 0
    bytes_read: int = 0
    read_retries: int = 0
    read_errors: int = 0
    reported_shards: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def corrupt(self, c: Corruption) -> None:
        with self.lock:
            self.corrupt_records += 1
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


class ShardReader:
    """Streams the records of pieces; resumes a dropped stream with a ranged request."""

    def __init__(self, storage: Storage, stats: DataStats, retries: int = 5) -> None:
        self.storage, self.stats, self.retries = storage, stats, retries
        self._offsets: dict[str, list[int]] = {}

    def offsets(self, shard: Shard) -> list[int]:
        if shard.uri not in self._offsets:
            self._offsets[shard.uri] = read_index(self.storage.read_bytes(shard.idx_uri).decode())
        return self._offsets[shard.uri]

    def records(self, piece: Piece) -> Iterator[bytes]:
        shard = piece.shard
        start = end = None
        if piece.start > 0:
            start = self.offsets(shard)[piece.start]
        if piece.stop < shard.count:
            end = self.offsets(shard)[piece.stop]
        start = start or 0
        failures = 0

        def reopen(offset: int, error: Exception) -> Any:
            nonlocal failures
            failures += 1
            self.stats.read_retries += 1
            if failures > self.retries:
                self.stats.read_errors += 1
                raise DataError(
                    f"{shard.uri}: read failed at byte {offset} after "
                    f"{self.retries} retries: {error}"
                ) from error
            log.info("%s: stream dropped at byte %d (%s); resuming", shard.uri, offset, error)
            return self.storage.open_read(shard.uri, offset, end)

        stream = RecordStream(
            shard.uri,
            self.storage.open_read(shard.uri, start, end),
            start,
            end,
            on_corrupt=self.stats.corrupt,
            reopen=reopen,
        )
        try:
            for record in stream:
                self.stats.bytes_read += len(record.payload) + 8
                yield record.payload
        finally:
            stream.close()


def background(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate ``items`` in a daemon thread, ``depth`` ahead; errors reach the consumer."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="finetune-data")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


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


@dataclass
class Batch:
    data: np.ndarray  # (B, 3, S, S) float32
    label: np.ndarray  # (B,) float32
    valid: int  # rows that hold real images (the rest pad a short last eval batch)
    five: np.ndarray | None = None  # (B, 5, 3, S, S) for test-time augmentation


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
        self.reader = ShardReader(storage, stats)
        self._pool = ThreadPoolExecutor(max(1, settings.workers), thread_name_prefix="finetune-aug")
        # Decode straight from the DCT at 1/2, 1/4, 1/8 size when that is still big enough.
        need = settings.image_size if self.train else augment.eval_resize(settings.image_size)
        self.reduce = max([r for r in (1, 2, 4, 8) if dataset.resize // r >= need] or [1])
        per_rank = dataset.count(split) // size
        if self.train:
            self.steps_per_epoch = per_rank // settings.batch_size
            if self.steps_per_epoch < 1:
                raise InputError(
                    f"{dataset.root}: {per_rank} training images per worker is less "
                    f"than one batch of {settings.batch_size}"
                )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _records(self, epoch: int) -> Iterator[tuple[int, bytes]]:
        from mxnet import recordio

        pieces = assign_shards(
            self.dataset.splits[self.split],
            self.rank,
            self.size,
            epoch,
            self.s.seed,
            shuffle=self.train,
        )
        rng = random.Random(f"{self.s.seed}/{epoch}/{self.rank}")
        while True:
            raw: Iterator[bytes] = (payload for p in pieces for payload in self.reader.records(p))
            if self.train:
                raw = shuffled(raw, self.s.shuffle_buffer, rng)
            yielded = 0
            for payload in raw:
                header, jpeg = recordio.unpack(payload)
                label = header.label if np.isscalar(header.label) else header.label[0]
                yielded += 1
                yield int(label), jpeg
            if not self.train:
                return
            if not yielded:
                raise DataError(
                    f"{self.dataset.root}: no readable {self.split} records in the "
                    f"share of rank {self.rank}"
                )
            # Training: fill the epoch's last batches with the share's first records again.

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        """Training batches of ``epoch`` (``steps_per_epoch`` of them) or all eval batches."""
        steps = self.steps_per_epoch - skip_batches if self.train else None
        records = background(self._records(epoch), depth=4 * self.s.batch_size)
        for _ in range(skip_batches * self.s.batch_size):  # resume mid-epoch: same order
            next(records)
        batches = self._batches(records, epoch, skip_batches, steps)
        return background(batches, depth=self.s.prefetch_batches)

    def _batches(
        self, records: Iterator[tuple[int, bytes]], epoch: int, first: int, steps: int | None
    ) -> Iterator[Batch]:
        b, size = self.s.batch_size, self.s.image_size
        step, exhausted = first, False
        while not exhausted and (steps is None or step < first + steps):
            five = self.s.tta and not self.train
            batch = Batch(
                np.zeros((b, 3, size, size), np.float32),
                np.zeros(b, np.float32),
                0,
                np.zeros((b, 5, 3, size, size), np.float32) if five else None,
            )
            filled = np.zeros(b, bool)
            while not exhausted and not filled.all():
                taken = []
                for slot in np.flatnonzero(~filled):
                    item = next(records, None)
                    if item is None:
                        exhausted = True
                        break
                    taken.append((int(slot), item))
                seeds = [(self.s.seed, epoch, self.rank, step, slot) for slot, _ in taken]
                for (slot, _), good in zip(
                    taken,
                    self._pool.map(self._sample, [batch] * len(taken), taken, seeds),
                    strict=True,
                ):
                    filled[slot] = good
            batch.valid = int(filled.sum())
            self.stats.records += batch.valid
            if batch.valid < b:  # eval's short last batch: real rows first
                order = np.argsort(~filled, kind="stable")
                batch.data, batch.label = batch.data[order], batch.label[order]
                batch.five = None if batch.five is None else batch.five[order]
            if batch.valid:
                yield batch
            step += 1

    def _sample(
        self, batch: Batch, item: tuple[int, tuple[int, bytes]], seed: tuple[int, ...]
    ) -> bool:
        slot, (label, jpeg) = item
        img = augment.decode(jpeg, self.reduce)
        if img is None:
            self.stats.corrupt(
                Corruption(
                    f"{self.dataset.root} ({self.split})", -1, "a record's image does not decode"
                )
            )
            return False
        batch.label[slot] = label
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
        self.steps_per_epoch = max(1, images // (settings.batch_size * size))

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
        for _ in range(self.steps_per_epoch - skip_batches):
            yield self.batch

    def close(self) -> None:
        pass
