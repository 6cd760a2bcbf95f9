"""The step watchdog: a rank on which no step completes within ``step_timeout`` exits.

A stalled rank (a wedged GPU, a hung NFS or S3 read, a stopped process, a network partition)
leaves every other rank waiting in the next allreduce, forever: nothing exits, so nothing
restarts the job. Each rank runs this thread. The loop tells it the phase it is in
(``with dog.phase(...)``) and when a step completes (``beat``). When no beat came for
``timeout`` seconds, the thread prints one line naming the rank, the phase and, where
that can be known, the rank that stalled, and ends the process with ``os._exit``: the main
thread may be blocked inside C code (an allreduce, a device wait) where no Python exception
can reach it. Nothing is cleaned up on the way out; the last checkpoint is complete (the
``latest`` pointer is written last), so a restart resumes from it.

Horovod's own stall check and the Gloo timeouts are set from the same ``step_timeout``
(``distributed.stall_environment``); this thread also covers what they cannot see: a data
wait, a checkpoint write, evaluation, and the start before the first collective.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from job.exitcodes import ExitCode

# Phases, as the line names them. Collective phases wait on other ranks: when one of them
# times out, the stalled rank is another one.
STARTUP = "startup (waiting for every worker to join)"
LOADING = "startup (loading the dataset's manifest and the model)"
BROADCAST = "startup (the broadcast of rank 0's weights)"
DATA = "data wait"
COMPUTE = "forward/backward"
ALLREDUCE = "allreduce"
EVALUATION = "evaluation"
EVALUATION_ALLREDUCE = "evaluation (the allreduce of its results)"
CHECKPOINT = "checkpoint"
EXPORT = "export (rank 0 exports, checks and evaluates the model)"
NONE_YET = "none yet"
COLLECTIVE = {STARTUP, BROADCAST, ALLREDUCE, EVALUATION_ALLREDUCE}


class Watchdog:
    """One rank's step watchdog; ``timeout`` 0 turns it off (``phase``/``beat`` stay cheap).

    ``current`` is the phase the line names; ``with dog.phase(...)`` sets it for a block.
    """

    def __init__(
        self,
        timeout: float,
        rank: int | None = None,
        size: int | None = None,
        stream: IO[str] | None = None,
        exit: Callable[[int], object] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout, self.rank, self.size = timeout, rank, size
        self.stream, self._exit, self._clock = stream, exit, clock
        self.current = STARTUP
        self.last_beat = clock()
        self.steps = 0
        self.checkpoint = NONE_YET  # where a restart resumes from (known on rank 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.timeout > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="finetune-dog")
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def joined(self, rank: int, size: int) -> None:
        """Every worker joined (``hvd.init()`` returned): the start's first stage is done."""
        self.rank, self.size = rank, size
        self.beat(step=False)
        self.current = LOADING

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """The block runs in phase ``name``; the phase before it comes back after it."""
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.current = before

    def beat(self, step: bool = True) -> None:
        """A step (training or evaluation batch) completed on this rank; ``step`` False:
        another kind of progress (a stage of the start, a checkpoint written)."""
        self.last_beat = self._clock()
        self.steps += step

    def seconds_since_beat(self) -> float:
        return self._clock() - self.last_beat

    def _watch(self) -> None:
        period = min(1.0, self.timeout / 10)
        while not self._stop.wait(period):
            if self._watch_once():
                return

    def _watch_once(self) -> bool:
        if self.seconds_since_beat() <= self.timeout:
            return False
        self.fire()
        return True

    def message(self) -> str:
        """The one line: who waited, in which phase, and who stalled where that is known."""
        rank = "?" if self.rank is None else str(self.rank)
        waited = f"no step completed on rank {rank} for {self.timeout:g} s (step_timeout)"
        where = f"stuck in {self.current}"
        if self.steps == 0:
            where += " before the first step"
        if self.current in COLLECTIVE:
            where += f", waiting for {self._others()}"
        else:
            where += f": rank {rank} itself stalled"
        if self.rank in (0, None) or self.checkpoint != NONE_YET:
            resume = f"last checkpoint: {self.checkpoint}"
        else:  # only rank 0 writes checkpoints
            resume = "a restart resumes from the last checkpoint rank 0 wrote"
        return (
            f"finetune-job: error: stalled: {waited}, {where}; exiting so the job can be "
            f"restarted; {resume}"
        )

    def _others(self) -> str:
        what = "which never joined" if self.current == STARTUP else "which stopped responding"
        if self.size == 2 and self.rank is not None:
            return f"rank {1 - self.rank}, {what}"
        return f"a rank {what} (one that printed no such line)"

    def fire(self) -> None:
        stream = self.stream or sys.stderr
        try:
            stream.write(self.message() + "\n")
            stream.flush()
        finally:
            self._exit(ExitCode.FAILED)  # the line says why
