"""The training loop: epochs of steps on every rank, an evaluation and a checkpoint after each,
and checkpoints every ``checkpoint_interval`` minutes in between (``job.training.saver``).

Runbook: see ``job/cli.py``. The parts come in built (``job.training.build``) and the process around
the loop (watchdog, SIGTERM, metrics server, Pushgateway, summary) is ``job.training.lifecycle``.
Only rank 0 logs progress and writes checkpoints; every rank decides when, together.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mxnet as mx
from mxnet import autograd, gluon

from job.config import Config
from job.errors import DivergedError, PreemptedError
from job.input.data import DataStats, to_ndarray
from job.outputs.evaluate import count_correct
from job.outputs.export import RunOutputs
from job.storage import Storage
from job.training import resume, watchdog
from job.training.checkpoint import Checkpointer, Progress
from job.training.distributed import Dist
from job.training.metrics import Metrics
from job.training.progress import ProgressLog
from job.training.rate import lr_at
from job.training.saver import Saver
from job.training.watchdog import Watchdog

log = logging.getLogger(__name__)


@dataclass
class Window:
    """Sums over a log interval or an epoch; loss and hits stay on the device until read."""

    loss: Any = 0.0
    correct: Any = 0.0
    images: int = 0
    data_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: Any, correct: Any, images: int, data_s: float) -> None:
        self.loss = self.loss + loss
        self.correct = self.correct + correct
        self.images += images
        self.data_s += data_s

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def reduce(self, dist: Dist, name: str) -> tuple[float, float, int]:
        """(mean loss, accuracy, images) over every rank; reads the device (a sync)."""
        loss, correct = (
            float(v.asscalar()) if isinstance(v, mx.nd.NDArray) else float(v)
            for v in (self.loss, self.correct)
        )
        loss_sum, correct_sum, images = dist.allreduce_sum([loss, correct, self.images], name)
        return loss_sum / max(images, 1), correct_sum / max(images, 1), int(images)


@dataclass
class Queued:
    """A step queued on the device and not yet known to be done."""

    loss: Any
    correct: Any
    flags: Any  # [SIGTERM, checkpoint due] summed over ranks, also in flight
    done: Any  # an array the step's last update writes: ready once the step is over


@dataclass(frozen=True)
class Flags:
    """What every rank learned from a step's flags: stop (a rank had SIGTERM), save (rank 0's
    checkpoint interval ran out)."""

    stop: bool = False
    save: bool = False

    def __or__(self, other: Flags) -> Flags:
        return Flags(self.stop or other.stop, self.save or other.save)


class Run:
    """One training run over parts built elsewhere (``job.training.build``): no I/O, no setup here.

    ``train``/``val`` yield batches, ``dist`` is the distributed backend (Horovod, or one
    process), ``metrics`` the Prometheus sink, ``storage`` where outputs go, ``watchdog``
    the step watchdog, ``fingerprint`` what makes the run this run. A unit test passes
    in-memory ones.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        dist: Dist,
        net: gluon.HybridBlock,
        trainer: Any,
        train: Any,
        val: Any | None,
        classes: list[str],
        storage: Storage,
        metrics: Metrics,
        stats: DataStats | None = None,
        stop: threading.Event | None = None,
        watchdog: Watchdog | None = None,
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.dist, self.ctx = cfg, dist, dist.context()
        self.net, self.trainer = net, trainer
        self.train, self.val, self.classes = train, val, classes
        self.storage, self.metrics = storage, metrics
        self.stats = stats or DataStats()
        self.stop_requested = stop or threading.Event()  # SIGTERM; acted on at a step boundary
        self.watchdog = watchdog or Watchdog(0)
        self.checkpointer = Checkpointer(storage, cfg.output, cfg.keep_checkpoints)
        self.saver = Saver(
            self.checkpointer,
            metrics,
            cfg.checkpoint_interval if dist.is_primary else 0,  # rank 0 keeps the time
            background=cfg.async_checkpoints,
            on_written=self._written,
        )
        # What makes this run this run (job.training.fingerprint): saved with every checkpoint and
        # compared before one is resumed.
        self.fingerprint = fingerprint or {}
        # What the run hands over; rank 0 evaluates the export alone, each batch progress.
        self.outputs = RunOutputs(cfg, storage, beat=lambda: self.watchdog.beat(step=False))
        self.lr = 0.0  # of the last step
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        # ResNet v2 starts with a parameter-free BatchNorm on the input; MXNet updates its
        # running stats in backward, which only happens when the input asks for a gradient.
        self.input_grad = cfg.model.endswith("_v2") and not cfg.freeze_features
        # The first trainable parameter gets its gradient last in backward, so its update is
        # among the last of a step: once it is written, the step is done.
        self.last_updated = next(p for p in net.collect_params().values() if p.grad_req != "null")
        self.progress = Progress(workers=dist.size)
        self.resumed_from: str | None = None  # the checkpoint folder this run continued
        self._next_epoch: tuple[int, Iterator[Any]] | None = None
        self.log = ProgressLog(
            enabled=dist.is_primary,
            fmt=cfg.log_format,
            stream=sys.stderr,
            on_progress=metrics.set_progress,
        )

    def fit(self) -> None:
        """Epochs of steps; after each, the epoch's numbers, an evaluation and a checkpoint."""
        cfg, p, dog = self.cfg, self.progress, self.watchdog
        while p.epoch < cfg.epochs:
            self.metrics.epoch.labels(self.metrics.rank).set(p.epoch)
            started = time.perf_counter()
            window, stopped = self.train_epoch(p.epoch)
            if stopped:
                self.preempted()
            if p.epoch + 1 < cfg.epochs:  # read and decode ahead while evaluating
                self._next_epoch = (p.epoch + 1, self.train.epoch(p.epoch + 1))
            seconds = window.seconds()
            with dog.phase(watchdog.ALLREDUCE):
                loss, acc, images = window.reduce(self.dist, "epoch_train")
                self.sync_running_stats()
            record: dict[str, Any] = {
                "epoch": p.epoch + 1,
                "train_loss": round(loss, 5),
                "train_top1": round(acc, 5),
                "images_per_second": round(images / max(seconds, 1e-9), 2),
                "train_seconds": round(seconds, 2),
                "lr": float(f"{self.lr:.6g}"),  # of the epoch's last step
                **self.evaluate(),
                "seconds": round(time.perf_counter() - started, 2),
            }
            p.history.append(record)
            if self.dist.is_primary:  # history.csv, and the best epoch's parameters
                with dog.phase(watchdog.CHECKPOINT):
                    self.outputs.epoch_done(self.net, p.history)
            p.best_val_top1 = max(p.best_val_top1, record.get("val_top1", -1.0))
            p.epoch, p.batch, p.images, p.workers = p.epoch + 1, 0, 0, self.dist.size
            self.log.epoch(record, cfg.epochs)
            self.checkpoint()
        with dog.phase(watchdog.CHECKPOINT):  # the last checkpoint is written before the exports
            self.saver.finish()

    def train_epoch(self, epoch: int) -> tuple[Window, bool]:
        """Train the rest of ``epoch``; the flag says it stopped early on SIGTERM.

        One step stays queued on the device while the next batch is fetched and queued, so
        the device never waits for Python: step k-1 is waited for only after step k is
        queued. Once per log interval a sampled step runs alone, to time its phases, and
        the loop reads its numbers back: the interval's one sync.
        """
        cfg, p, dog = self.cfg, self.progress, self.watchdog
        global_batch = cfg.batch_size * self.dist.size
        left = self.train.steps_left(p.batch, p.workers)
        epoch_images = p.images + left * global_batch  # a resumed epoch keeps its fractions
        batches = self._epoch_batches(epoch, p.batch, p.workers)
        p.batch, p.workers = p.images // global_batch, self.dist.size
        steps = p.batch + left
        epoch_window, window = Window(), Window()
        queued: Queued | None = None  # the step still in flight on the device
        while True:
            tick = time.perf_counter()
            with dog.phase(watchdog.DATA):
                batch = next(batches, None)
            if batch is None:
                break
            data_s = time.perf_counter() - tick
            position, step_epochs = epoch + p.images / epoch_images, global_batch / epoch_images
            self.lr = lr_at(position, cfg, self.dist.size, step_epochs)
            self.trainer.set_learning_rate(self.lr)
            sampled = (p.batch + 1) % cfg.log_interval == 0 or p.batch + 1 == steps
            with dog.phase(watchdog.COMPUTE):
                computed, compute_s = self.forward_backward(batch, timed=sampled)
            flags = self.finish_step(queued)  # step k-1, while the device runs step k
            with dog.phase(watchdog.ALLREDUCE):
                queued, allreduce_s = self.update(computed, timed=sampled)
            p.step, p.batch, p.images = p.step + 1, p.batch + 1, p.images + global_batch
            for w in (window, epoch_window):
                w.add(queued.loss, queued.correct, cfg.batch_size, data_s)
            self.metrics.step(cfg.batch_size)
            if sampled:  # the log interval's one sync: this step's flags, times and numbers
                flags, queued = self.finish_step(queued) | flags, None
                self.metrics.phases(data_s, compute_s, allreduce_s)
                with dog.phase(watchdog.ALLREDUCE):
                    self.report(window, epoch, steps)
                window = Window()
            self.saver.check()  # a checkpoint write that failed stops the run here
            if flags.stop and p.batch < steps:  # every rank read the same flags: all stop here
                self.finish_step(queued)
                return epoch_window, True
            if flags.save and p.batch < steps:  # the same on every rank: all checkpoint here
                self.checkpoint()
        self.finish_step(queued)
        return epoch_window, False

    def _epoch_batches(self, epoch: int, skip: int, trained_by: int) -> Iterator[Any]:
        prepared, self._next_epoch = self._next_epoch, None
        if prepared and prepared[0] == epoch and not skip:
            return prepared[1]
        return iter(self.train.epoch(epoch, skip_batches=skip, trained_by=trained_by))

    def forward_backward(self, batch: Any, timed: bool) -> tuple[Any, float]:
        """Queue forward and backward of one batch: (output, label, loss), and the seconds.

        A timed step starts on an idle device (the step before it done) and waits for its
        own work, so the seconds are its alone."""
        if timed:
            with self.watchdog.phase(watchdog.ALLREDUCE):  # the step before is in flight
                mx.nd.waitall()
        start = time.perf_counter()
        data = to_ndarray(batch.data, self.ctx)  # shares the batch's memory on the CPU
        label = mx.nd.array(batch.label, ctx=self.ctx)
        if self.cfg.freeze_features:  # frozen features run as a fixed extractor
            features = self.net.features(data)
            with autograd.record():
                out = self.net.output(features)
                loss = self.loss_fn(out, label)
        else:
            if self.input_grad:
                data.attach_grad()
            with autograd.record():
                out = self.net(data)
                loss = self.loss_fn(out, label)
        loss.backward()
        if timed:
            mx.nd.waitall()
        return (out, label, loss), time.perf_counter() - start

    def update(self, computed: Any, timed: bool) -> tuple[Queued, float]:
        """Queue the gradient allreduce, the optimizer update and this step's SIGTERM flag
        sum; a timed step waits for them.

        The flag is summed over ranks at every step, not only at sampled ones: Kubernetes
        kills a pod a grace period after SIGTERM, and a rank that learned of it only at the
        next log interval could be killed first. Summed per step, every rank reads the same
        sum of the same step, so all stop after the same step, which the checkpoint holds
        exactly. The sum is one float, queued behind the gradients, and read one step late.
        """
        out, label, loss = computed
        start = time.perf_counter()
        self.trainer.step(self.cfg.batch_size)  # Horovod: allreduce of the gradients
        if timed:
            mx.nd.waitall()
        seconds = time.perf_counter() - start
        # Horovod: a non-blocking allreduce of this rank's SIGTERM flag and, on rank 0,
        # whether a checkpoint is due.
        mine = [float(self.stop_requested.is_set()), float(self.saver.due())]
        flags = self.dist.allreduce_sum_async(mine, "flags")
        correct = (out.argmax(axis=1) == label).sum()
        done = self.last_updated.data(self.ctx)
        return Queued(loss.sum(), correct, flags, done), seconds

    def finish_step(self, queued: Queued | None) -> Flags:
        """Wait until a queued step is done (its update written, its flags summed over
        ranks): whether any rank had SIGTERM by then, and whether a checkpoint is due."""
        if queued is None:
            return Flags()
        with self.watchdog.phase(watchdog.ALLREDUCE):
            queued.done.wait_to_read()
            stop, save = (float(v) > 0 for v in queued.flags.asnumpy())
        self.watchdog.beat()
        return Flags(stop, save)

    def report(self, window: Window, epoch: int, steps: int) -> None:
        """The log interval's numbers, averaged over ranks: metrics, one log line; a loss
        that is no number stops the run."""
        seconds = window.seconds()
        loss, acc, images = window.reduce(self.dist, "window")
        self.metrics.loss.labels(self.metrics.rank).set(loss)  # NaN too: the alert's signal
        self.metrics.observe_gpu_memory(self.ctx)
        if not math.isfinite(loss):
            latest = self.checkpointer.latest() or "none"
            raise DivergedError(
                f"training loss is {loss} at epoch {epoch + 1} step "
                f"{self.progress.step}; stopped. Last good checkpoint: {latest}"
            )
        self.metrics.set_accuracy("train", acc)
        self.metrics.lr.labels(self.metrics.rank).set(self.lr)
        self.log.step(
            epoch=epoch + 1,
            epochs=self.cfg.epochs,
            batch=self.progress.batch,
            steps=steps,
            loss=loss,
            acc=acc,
            lr=self.lr,
            images_per_second=images / max(seconds, 1e-9),
            data_share=window.data_s / max(seconds, 1e-9),
        )

    def preempted(self) -> None:
        p = self.progress
        self.checkpoint(wait=True)
        with self.watchdog.phase(watchdog.ALLREDUCE):
            self.dist.barrier()  # no rank shuts Horovod down before the checkpoint is out
        raise PreemptedError(
            f"stopped by SIGTERM at epoch {p.epoch + 1}, step {p.step} ({p.batch} of "
            f"{self.train.steps_per_epoch} batches of the epoch done); that step is "
            f"checkpointed in {self.checkpointer.root} and a restart resumes from it"
        )

    def sync_running_stats(self) -> None:
        """Average BatchNorm running mean/var over ranks. Each rank updates them from its
        own batches; averaged, every rank evaluates, checkpoints and exports the same model."""
        stats = self.net.collect_params(".*running_mean|.*running_var")
        self.dist.average_in_place([p.data() for _, p in sorted(stats.items())], "bn_stats")

    def evaluate(self) -> dict[str, float]:
        """Validation top-1 (center crop; and five-crop TTA when asked), over all ranks."""
        if self.val is None:
            return {}
        with self.watchdog.phase(watchdog.EVALUATION):
            correct, correct_tta, count = count_correct(self.net, self._eval_batches(), self.ctx)
        with self.watchdog.phase(watchdog.EVALUATION_ALLREDUCE):
            correct, correct_tta, count = self.dist.allreduce_sum(
                [correct, correct_tta, count], "eval"
            )
        result = {"val_top1": round(correct / max(count, 1), 5)}
        self.metrics.set_accuracy("val", result["val_top1"])
        if self.cfg.tta:
            result["val_top1_tta"] = round(correct_tta / max(count, 1), 5)
            self.metrics.set_accuracy("val_tta", result["val_top1_tta"])
        return result

    def _eval_batches(self) -> Iterator[Any]:
        """The validation batches; asking for the next one means the last one is evaluated
        (``count_correct`` reads each result back first): an evaluation step done."""
        assert self.val is not None
        for batch in self.val.epoch(0):
            yield batch
            self.watchdog.beat()

    def checkpoint(self, wait: bool = False) -> None:
        """Take a checkpoint after this step; rank 0 writes it (``wait``: before returning).

        Every rank takes part in naming the corrupt records and in averaging the BatchNorm
        running statistics over ranks. The checkpoint stores the averages, and each rank
        keeps its own: the update of a running statistic is affine, so the mean over ranks
        at the next epoch's end is the same whether a rank resumed from the averages or kept
        its own, and a checkpoint changes nothing in the run it is taken from."""
        self.progress.corrupt = [list(k) for k in sorted(self.corrupt_keys())]
        stats = [
            p for _, p in sorted(self.net.collect_params(".*running_mean|.*running_var").items())
        ]
        averaged = [p.data().copy() for p in stats]
        with self.watchdog.phase(watchdog.ALLREDUCE):
            self.dist.average_in_place(averaged, "bn_stats_checkpoint")
        if not self.dist.is_primary:
            return

        def take() -> Any:
            return self.checkpointer.snapshot(
                self.net,
                self.trainer,
                self.progress,
                self.cfg.to_dict(),
                self.fingerprint,
                replace={id(p): a for p, a in zip(stats, averaged, strict=True)},
            )

        with self.watchdog.phase(watchdog.CHECKPOINT):
            self.saver.save(take, wait=wait)
        self.watchdog.beat(step=False)  # a checkpoint is progress too

    def _written(self, folder: str) -> None:
        self.watchdog.checkpoint = folder  # where a restart resumes from

    def corrupt_keys(self) -> set[tuple[str, int]]:
        """The corrupt records every rank skipped so far (another rank may have read a bad
        record in an earlier epoch: the union counts it once)."""
        with self.watchdog.phase(watchdog.ALLREDUCE):
            per_rank = self.dist.allgather_object(sorted(self.stats.corrupt_keys), "corrupt")
        return {(str(shard), int(at)) for keys in per_rank for shard, at in keys}

    def resume(self) -> None:
        """Continue from the newest checkpoint of this run (or of ``resume_from``), if any."""
        resume.resume(self)

    def close(self) -> None:
        self.train.close()
        if self.val is not None:
            self.val.close()
