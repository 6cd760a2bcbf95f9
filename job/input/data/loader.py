"""The loader: a rank's records → decoded, augmented float32 batches, one queue ahead."""

from __future__ import annotations

import collections
import itertools
import logging
import random
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from job.errors import DataError, InputError
from job.input import augment
from job.input.data.manifest import Dataset, Piece, assign_shards
from job.input.data.reader import Sample, ShardReader
from job.input.data.stats import DataStats
from job.input.data.streams import background, shuffled
from job.input.records import Corruption, Record
from job.storage import Storage

log = logging.getLogger(__name__)


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
