"""When checkpoints are taken, and their writing on a background thread.

A checkpoint is taken at the end of every epoch, on SIGTERM, and every ``checkpoint_interval``
minutes of training in between. Taking one is a copy into memory (``Checkpointer.snapshot``):
the only pause of training, observed as ``finetune_checkpoint_stall_seconds``. One background
thread writes the copy, checks what storage holds and only then moves ``latest``
(``Checkpointer.write``), while training goes on.

At most one write is in flight. An interval checkpoint that falls due while one is still
being written is deferred (counted in ``finetune_checkpoints_deferred_total``) and taken at
the first step after that write ends; the others (epoch end, SIGTERM) wait for it, and that
wait is stall too. A write that failed is raised in the training thread at its next step.
Only rank 0 writes; every rank takes part in deciding when (``due`` is summed over ranks
with the SIGTERM flag, so all ranks take a checkpoint after the same step).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from job.training.checkpoint import Checkpointer, Snapshot
from job.training.metrics import Metrics

log = logging.getLogger(__name__)


class Saver:
    """Rank 0's checkpoint writer and interval clock (``interval`` minutes; 0: epoch ends and
    SIGTERM only). ``background`` False writes in the training thread, as before."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        metrics: Metrics,
        interval: float,
        background: bool = True,
        on_written: Callable[[str], None] = lambda folder: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.checkpointer, self.metrics = checkpointer, metrics
        self.interval_s, self.background = interval * 60.0, background
        self.on_written, self.clock = on_written, clock
        self.last = clock()  # when the last checkpoint was taken
        self.requested = False  # an interval checkpoint was asked of every rank, not yet taken
        self.deferred = False  # one fell due while a write was in flight (counted once)
        self._idle = threading.Event()
        self._idle.set()
        self._failure: BaseException | None = None

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def due(self) -> bool:
        """True once per interval: ask every rank to checkpoint after this step."""
        if self.requested or self.interval_s <= 0 or self.clock() - self.last < self.interval_s:
            return False
        if self.busy:
            if not self.deferred:
                self.deferred = True
                self.metrics.checkpoint_deferred.labels(self.metrics.rank).inc()
            return False
        self.requested = True
        return True

    def save(self, take: Callable[[], Snapshot], wait: bool = False) -> None:
        """Wait for the write in flight, take a snapshot (``take``) and write it; ``wait``:
        return only once it is written (SIGTERM). What training waited is stall."""
        started = time.perf_counter()
        self.finish()
        snap = take()
        self.last, self.requested, self.deferred = self.clock(), False, False
        self.metrics.checkpoint_stall.labels(self.metrics.rank).observe(
            time.perf_counter() - started
        )
        self._idle.clear()
        if not self.background:
            self._write(snap)
            self.check()
            return
        threading.Thread(
            target=self._write, args=(snap,), name="checkpoint-writer", daemon=True
        ).start()
        if wait:
            self.finish()

    def _write(self, snap: Snapshot) -> None:
        started = time.perf_counter()
        try:
            folder = self.checkpointer.write(snap)
            seconds = time.perf_counter() - started
            self.metrics.checkpointed(seconds)
            log.info("checkpoint %s (written in %.1f s)", folder, seconds)
            self.on_written(folder)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by check()
            self._failure = e
        finally:
            self._idle.set()

    def check(self) -> None:
        """Raise, in the training thread, the failure of the last write, once."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def finish(self, timeout: float | None = None) -> bool:
        """Wait for the write in flight (``timeout`` seconds at most) and raise its failure;
        False when it is still being written."""
        idle = self._idle.wait(timeout)
        self.check()
        return idle
