"""Random in-memory batches: smoke runs need neither S3 nor data."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from job.input.data.loader import Batch, LoaderSettings

log = logging.getLogger(__name__)


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
