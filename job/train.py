"""The training loop: fine-tune on every rank, evaluate, checkpoint, export.

Runbook: see ``job/cli.py``. Only rank 0 logs progress, writes checkpoints and exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from job import __version__, distributed, fingerprint, model, pipeline_metrics, watchdog
from job import storage as st
from job.augment import Jitter
from job.checkpoint import Checkpointer, Progress
from job.config import Config
from job.data import DataStats, Loader, LoaderSettings, SyntheticLoader, load_dataset, to_ndarray
from job.distributed import Dist
from job.errors import DivergedError, InputError, PreemptedError
from job.evaluate import count_correct
from job.metrics import Metrics, read_basic_auth
from job.outputs import RunOutputs
from job.progress import ProgressLog
from job.storage import S3Settings, Storage
from job.watchdog import Watchdog

log = logging.getLogger(__name__)


def scaled_lr(cfg: Config, workers: int) -> float:
    """The scaling rule: the per-worker rate times the workers (the global batch grows so)."""
    return cfg.lr * workers


def lr_at(position: float, cfg: Config, workers: int, step_epochs: float) -> float:
    """Learning rate of the step that starts ``position`` epochs into training (2.5: halfway
    through the third epoch) and covers ``step_epochs`` of an epoch.

    Counted in epochs (images seen / images per epoch), not steps: steps per epoch change
    with the number of workers, and a job resumed on another number keeps its place.
    1. Scale: the per-worker rate times the number of workers (the global batch grows so).
    2. Warmup: linear from ~0 to the scaled rate over ``warmup_epochs``.
    3. Decay: cosine to 0 at the end, or ×``lr_decay`` at each of ``lr_steps``.
    """
    peak = scaled_lr(cfg, workers)
    if position < cfg.warmup_epochs:
        return peak * min(1.0, (position + step_epochs) / cfg.warmup_epochs)
    if cfg.lr_schedule == "step":
        passed = sum(1 for e in cfg.lr_steps if position >= e - 1e-9)
        return peak * cfg.lr_decay**passed
    span = max(step_epochs, cfg.epochs - cfg.warmup_epochs)
    progress = min(1.0, (position - cfg.warmup_epochs) / span)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


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
    stop: Any  # the SIGTERM flags summed over ranks, also in flight
    done: Any  # an array the step's last update writes: ready once the step is over


class Run:
    """One training run over parts built elsewhere (``build``): no I/O, no collective here.

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
        # What makes this run this run (job.fingerprint): saved with every checkpoint and
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

    def resume(self) -> None:
        if self.cfg.resume == "never":
            return
        # A checkpoint of another run (other model, classes, data or hyper-parameters) is
        # refused before anything is loaded, unless the operator forces it.
        check = None if self.cfg.resume == "force" else self._check_fingerprint
        restored = self.checkpointer.restore(
            self.net, self.trainer, self.ctx, warn=self.dist.is_primary, check=check
        )
        if restored is None and self.cfg.resume_from:
            # An earlier attempt of this run (a failed scheduled run) left its checkpoints
            # in another output: continue from there, under the same fingerprint check.
            earlier = Checkpointer(self.storage, self.cfg.resume_from, self.cfg.keep_checkpoints)
            restored = earlier.restore(
                self.net, self.trainer, self.ctx, warn=self.dist.is_primary, check=check
            )
            self.checkpointer.run_id = earlier.run_id
        if restored is None:
            return
        folder, self.progress, _ = restored
        self.resumed_from = folder
        if not self.progress.workers:  # written before checkpoints counted images
            self.progress.workers = self.dist.size
            self.progress.images = self.progress.batch * self.cfg.batch_size * self.dist.size
        self.stats.seed_corrupt(self.progress.corrupt)
        self.watchdog.checkpoint = folder
        p = self.progress
        moved = f" (trained by {p.workers} workers, now {self.dist.size})"
        log.info(
            "resumed from %s: epoch %d, step %d%s",
            folder,
            p.epoch + 1,
            p.step,
            moved if p.workers not in (0, self.dist.size) else "",
        )

    def _check_fingerprint(self, state: dict[str, Any], folder: str) -> None:
        fingerprint.check(state, self.fingerprint, folder)

    # The loop: epochs of steps, an evaluation and a checkpoint after each epoch.
    def fit(self) -> None:
        cfg, p = self.cfg, self.progress
        while p.epoch < cfg.epochs:
            self.metrics.epoch.labels(self.metrics.rank).set(p.epoch)
            epoch_started = time.perf_counter()
            window, stopped = self.train_epoch(p.epoch)
            if stopped:
                self.preempted()
            if p.epoch + 1 < cfg.epochs:  # read and decode ahead while evaluating
                self._next_epoch = (p.epoch + 1, self.train.epoch(p.epoch + 1))
            seconds = window.seconds()
            loss, acc, images = window.reduce(self.dist, "epoch_train")
            self.sync_running_stats()
            record: dict[str, Any] = {
                "epoch": p.epoch + 1,
                "train_loss": round(loss, 5),
                "train_top1": round(acc, 5),
                "images_per_second": round(images / max(seconds, 1e-9), 2),
                "train_seconds": round(seconds, 2),
                "lr": float(f"{self.lr:.6g}"),  # of the epoch's last step
            }
            record.update(self.evaluate())
            record["seconds"] = round(time.perf_counter() - epoch_started, 2)
            p.history.append(record)
            if self.dist.is_primary:  # history.csv, and the best epoch's parameters
                self.outputs.epoch_done(self.net, p.history)
            p.best_val_top1 = max(p.best_val_top1, record.get("val_top1", -1.0))
            p.epoch, p.batch, p.images, p.workers = p.epoch + 1, 0, 0, self.dist.size
            self.log.epoch(record, cfg.epochs)
            self.checkpoint()

    def train_epoch(self, epoch: int) -> tuple[Window, bool]:
        """Train the rest of ``epoch``; the flag says it stopped early on SIGTERM.

        One step stays queued on the device while the next batch is fetched and queued, so
        the device never waits for Python; the loop waits for step k-1 only after queuing
        step k. Once per log interval a sampled step syncs around its phases to time them.
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
        dog.phase = watchdog.DATA
        tick = time.perf_counter()
        for batch in batches:
            data_s = time.perf_counter() - tick
            position = epoch + p.images / epoch_images
            lr = lr_at(position, cfg, self.dist.size, global_batch / epoch_images)
            self.trainer.set_learning_rate(lr)
            self.lr = lr
            sampled = (p.batch + 1) % cfg.log_interval == 0 or p.batch + 1 == steps
            stop = False
            if sampled:  # the previous step finishes first, so this one is timed alone
                stop, queued = self.finish_step(queued), None
            out, compute_s = self.forward_backward(batch, sampled)
            if not sampled:  # wait for the previous step while the device runs this one
                stop = self.finish_step(queued)
            queued, allreduce_s = self.update(out, sampled)
            p.step, p.batch, p.images = p.step + 1, p.batch + 1, p.images + global_batch
            for w in (window, epoch_window):
                w.add(queued.loss, queued.correct, cfg.batch_size, data_s)
            self.metrics.step(cfg.batch_size)
            if sampled:  # the log interval's one sync
                stop, queued = self.finish_step(queued) or stop, None
                self.metrics.phases(data_s, compute_s, allreduce_s)
                self.report(window, epoch, steps, lr)
                window = Window()
            if stop and p.batch < steps:  # every rank read the same flags: all stop here
                self.finish_step(queued)
                return epoch_window, True
            dog.phase = watchdog.DATA
            tick = time.perf_counter()
        self.finish_step(queued)
        return epoch_window, False

    def _epoch_batches(self, epoch: int, skip: int, trained_by: int) -> Iterator[Any]:
        prepared, self._next_epoch = self._next_epoch, None
        if prepared and prepared[0] == epoch and not skip:
            return prepared[1]
        return self.train.epoch(epoch, skip_batches=skip, trained_by=trained_by)

    def forward_backward(self, batch: Any, sampled: bool) -> tuple[Any, float]:
        """Queue forward and backward of one batch; a sampled step waits for them, to time
        them. Returns (output, label, loss) and the seconds."""
        self.watchdog.phase = watchdog.COMPUTE
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
        if sampled:
            mx.nd.waitall()
        return (out, label, loss), time.perf_counter() - start

    def update(self, computed: Any, sampled: bool) -> tuple[Queued, float]:
        """Queue the gradient allreduce, the optimizer update and this step's SIGTERM flag
        sum; a sampled step waits for them, to time them."""
        out, label, loss = computed
        self.watchdog.phase = watchdog.ALLREDUCE
        start = time.perf_counter()
        self.trainer.step(self.cfg.batch_size)  # Horovod: allreduce of the gradients
        if sampled:
            mx.nd.waitall()
        seconds = time.perf_counter() - start
        stop = self.dist.allreduce_sum_async([float(self.stop_requested.is_set())], "stop")
        correct = (out.argmax(axis=1) == label).sum()
        done = self.last_updated.data(self.ctx)
        return Queued(loss.sum(), correct, stop, done), seconds

    def finish_step(self, queued: Queued | None) -> bool:
        """Wait until a queued step is done (its update written, its SIGTERM flags summed
        over ranks); True when any rank had SIGTERM by then."""
        if queued is None:
            return False
        self.watchdog.phase = watchdog.ALLREDUCE
        queued.done.wait_to_read()
        stop = float(queued.stop.asnumpy()[0]) > 0
        self.watchdog.beat()
        return stop

    def preempted(self) -> None:
        p = self.progress
        self.sync_running_stats()
        self.checkpoint()
        self.dist.barrier()  # no rank shuts Horovod down before the checkpoint is out
        raise PreemptedError(
            f"stopped by SIGTERM at epoch {p.epoch + 1}, step {p.step} ({p.batch} of "
            f"{self.train.steps_per_epoch} batches of the epoch done); that step is "
            f"checkpointed in {self.checkpointer.root} and a restart resumes from it"
        )

    def report(self, window: Window, epoch: int, steps: int, lr: float) -> None:
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
        self.metrics.lr.labels(self.metrics.rank).set(lr)
        self.log.step(
            epoch=epoch + 1,
            epochs=self.cfg.epochs,
            batch=self.progress.batch,
            steps=steps,
            loss=loss,
            acc=acc,
            lr=lr,
            images_per_second=images / max(seconds, 1e-9),
            data_share=window.data_s / max(seconds, 1e-9),
        )

    def sync_running_stats(self) -> None:
        """Average BatchNorm running mean/var over ranks. Each rank updates them from its
        own batches; averaged, every rank evaluates, checkpoints and exports the same model."""
        self.watchdog.phase = watchdog.ALLREDUCE
        stats = self.net.collect_params(".*running_mean|.*running_var")
        self.dist.average_in_place([p.data() for _, p in sorted(stats.items())], "bn_stats")

    def evaluate(self) -> dict[str, float]:
        """Validation top-1 (center crop; and five-crop TTA when asked), over all ranks."""
        if self.val is None:
            return {}
        correct, correct_tta, count = count_correct(self.net, self._eval_batches(), self.ctx)
        self.watchdog.phase = watchdog.EVALUATION_ALLREDUCE
        correct, correct_tta, count = self.dist.allreduce_sum([correct, correct_tta, count], "eval")
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
        self.watchdog.phase = watchdog.EVALUATION
        for batch in self.val.epoch(0):
            yield batch
            self.watchdog.beat()

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; every rank takes part in naming the corrupt records."""
        self.progress.corrupt = [list(k) for k in sorted(self.corrupt_keys())]
        if not self.dist.is_primary:
            return
        self.watchdog.phase = watchdog.CHECKPOINT
        started = time.perf_counter()
        folder = self.checkpointer.save(
            self.net, self.trainer, self.progress, self.cfg.to_dict(), self.fingerprint
        )
        self.metrics.checkpointed(time.perf_counter() - started)
        self.watchdog.checkpoint = folder
        self.watchdog.beat(step=False)  # a checkpoint is progress too
        log.info("checkpoint %s (%.1f s)", folder, time.perf_counter() - started)

    def corrupt_keys(self) -> set[tuple[str, int]]:
        """The corrupt records every rank skipped so far (another rank may have read a bad
        record in an earlier epoch: the union counts it once)."""
        self.watchdog.phase = watchdog.ALLREDUCE
        per_rank = self.dist.allgather_object(sorted(self.stats.corrupt_keys), "corrupt")
        return {(str(shard), int(at)) for keys in per_rank for shard, at in keys}

    def close(self) -> None:
        self.train.close()
        if self.val is not None:
            self.val.close()

    def finish(self, wall_seconds: float) -> dict[str, Any] | None:
        """Summary on every rank's behalf; rank 0 exports the model and writes it."""
        self.watchdog.phase = watchdog.ALLREDUCE
        digests = self.dist.allgather_object(params_digest(self.net), "params_digest")
        peak_rss = self.dist.allgather_object(peak_rss_bytes(), "peak_rss")
        corrupt = self.corrupt_keys()
        if not self.dist.is_primary:
            return None
        history = self.progress.history
        cfg = self.cfg
        exported = self.outputs.choose_epoch(self.net, history, self.ctx)  # export: best|last
        last = next((h for h in history if h["epoch"] == exported), {})
        summary = {
            "model": cfg.model,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "pretrained": cfg.pretrained,
            "epochs": cfg.epochs,
            "workers": self.dist.size,
            "global_batch_size": cfg.batch_size * self.dist.size,
            "exported_epoch": exported,
            "val_top1": last.get("val_top1"),  # of the exported epoch: what the gate judges
            "last_val_top1": history[-1].get("val_top1") if history else None,
            "best_val_top1": self.progress.best_val_top1,
            "train_images_per_second": _mean([h["images_per_second"] for h in history]),
            "wall_seconds": round(wall_seconds, 2),
            "corrupt_records": len(corrupt),
            "corrupt_records_counts": CORRUPT_RECORDS_COUNTS,
            "params_sha256_per_rank": digests,
            "peak_rss_bytes_per_rank": peak_rss,
            "history": history,
            "resumed_from": self.resumed_from,
            "config": cfg.to_dict(),
            "version": __version__,
        }
        if cfg.tta:
            summary["val_top1_tta"] = last.get("val_top1_tta")
        self.watchdog.phase = watchdog.EXPORT
        self.export(summary)
        return summary

    def export(self, summary: dict[str, Any]) -> None:
        """Model files, ONNX, Triton repository, eval.json, report; summary.json last."""
        self.outputs.hand_over(self.net, self.classes, summary, self.ctx)


CORRUPT_RECORDS_COUNTS = (
    "distinct corrupt records skipped over the whole job (all ranks, all epochs, restarts "
    "included): each bad record counts once per job, however often it was read"
)


def build(
    cfg: Config,
    dist: Dist,
    storage: Storage,
    metrics: Metrics,
    stop: threading.Event | None = None,
    dog: Watchdog | None = None,
) -> Run:
    """Read the dataset's manifest, build and load the model, broadcast it from rank 0 and
    wrap the optimizer: everything a Run needs that does I/O or talks to other ranks."""
    ctx = dist.context()
    mx.random.seed(cfg.seed)  # the new head's (and a scratch model's) initial weights
    stats = DataStats()
    metrics.watch_data(stats)
    train_data, val_data, classes = build_data(cfg, dist, storage, stats)
    run_fingerprint = fingerprint.of_run(cfg, classes, fingerprint.manifest_digest(cfg, storage))
    net = model.build(cfg, len(classes), ctx, storage)
    # Run the first forward in training mode before the broadcast: an inference-mode
    # first pass leaves MKLDNN layouts that the broadcast cannot read.
    shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    with autograd.train_mode():
        net(mx.nd.zeros(shape, ctx=ctx)).wait_to_read()
    if dog is not None:  # the dataset's manifest and the model are loaded
        dog.beat(step=False)
        dog.phase = watchdog.BROADCAST
    dist.broadcast_parameters(net.collect_params())
    trainer = dist.trainer(
        net.collect_params(),
        "sgd",
        {"learning_rate": scaled_lr(cfg, dist.size), "momentum": cfg.momentum, "wd": cfg.wd},
        cfg.fp16_allreduce,
    )
    return Run(
        cfg,
        dist=dist,
        net=net,
        trainer=trainer,
        train=train_data,
        val=val_data,
        classes=classes,
        storage=storage,
        metrics=metrics,
        stats=stats,
        stop=stop,
        watchdog=dog,
        fingerprint=run_fingerprint,
    )


def build_data(
    cfg: Config, dist: Dist, storage: Storage, stats: DataStats
) -> tuple[Loader | SyntheticLoader, Loader | None, list[str]]:
    """The training and validation loaders of this rank, and the class names."""
    workers = cfg.data_workers or max(1, (os.cpu_count() or 1) // dist.local_size)
    settings = LoaderSettings(
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        seed=cfg.seed,
        flip_prob=cfg.flip_prob,
        jitter=Jitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue),
        shuffle_buffer=cfg.shuffle_buffer,
        workers=workers,
        tta=cfg.tta,
        strict_data=cfg.strict_data,
    )
    if cfg.synthetic:
        classes = [f"class{i}" for i in range(cfg.synthetic_classes)]
        images = cfg.synthetic_images
        return SyntheticLoader(cfg.synthetic_classes, images, settings, dist.size), None, classes
    dataset = load_dataset(cfg.data, storage)
    train_data = Loader(dataset, "train", settings, dist.rank, dist.size, storage, stats)
    val_data = None
    if dataset.count("val"):
        val_data = Loader(dataset, "val", settings, dist.rank, dist.size, storage, stats)
    return train_data, val_data, dataset.classes


def params_digest(net: gluon.Block) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(net._collect_params_with_prefix().items()):  # noqa: SLF001
        digest.update(name.encode())
        digest.update(param.data().asnumpy().tobytes())
    return digest.hexdigest()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 2) if values else None


def check_output(cfg: Config, dist: Dist, storage: Storage) -> None:
    """Before any work: rank 0 writes and deletes a probe object in the output, and every
    rank learns the outcome, so all stop together with the same one line (no rank is left
    waiting in a collective for a rank that already exited)."""
    problem: str | None = None
    if dist.is_primary:
        try:
            storage.probe_writable(cfg.output)
        except st.StorageError as e:
            problem = str(e)
    if dist.size > 1:
        problem = dist.allgather_object(problem, "output_probe")[0]
    if problem is not None:
        raise InputError(problem)


def run(cfg: Config) -> dict[str, Any] | None:
    """Build the parts (Horovod, storage, metrics, data, model) and train; the runbook's
    entrypoint on every rank."""
    started = time.perf_counter()
    # The watchdog runs from the start: a worker that never joins leaves hvd.init() waiting.
    dog = Watchdog(cfg.step_timeout, *distributed.launcher_rank(os.environ)).start()
    distributed.stall_environment(cfg.step_timeout, os.environ)  # read by hvd.init()
    dist = distributed.init()
    dog.joined(dist.rank, dist.size)  # progress too: the start has stages, each bounded
    if not dist.is_primary:
        logging.getLogger().setLevel(logging.WARNING)
    metrics = Metrics(dist.rank)
    metrics.watch_steps(dog.seconds_since_beat, cfg.step_timeout)
    # Kubernetes sends SIGTERM before it kills a pod: finish the step, checkpoint, exit.
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    run_: Run | None = None
    outcome = "failed"
    push_auth: tuple[str, str] | None = None
    try:
        push_auth = read_basic_auth(cfg.pushgateway_username_file, cfg.pushgateway_password_file)
        if cfg.metrics_port:
            port = metrics.serve(cfg.metrics_address, cfg.metrics_port + dist.local_rank)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics_address, port)
        metrics.info.info(
            {
                "model": cfg.model,
                "workers": str(dist.size),
                "batch_size": str(cfg.batch_size),
                "version": __version__,
            }
        )
        storage = Storage(S3Settings.from_config(cfg.to_dict()))
        check_output(cfg, dist, storage)
        run_ = build(cfg, dist, storage, metrics, stop, dog)
        dog.beat(step=False)
        if dist.is_primary:
            log_start(cfg, dist, run_)
        run_.resume()
        run_.fit()
        summary = run_.finish(time.perf_counter() - started)
        if summary is not None and cfg.metrics_file:
            pipeline_metrics.write(cfg.metrics_file, summary, run_.storage)
            log.info("pipeline metrics written to %s", cfg.metrics_file)
        outcome = "succeeded"
        return summary
    except PreemptedError:
        outcome = "preempted"  # not an end: the restarted job pushes when it ends
        raise
    except mx.base.MXNetError as e:
        if "shut down" in str(e):  # Horovod's own stall shutdown: the watchdog's line
            dog.fire()
        raise
    finally:
        dog.stop()
        signal.signal(signal.SIGTERM, previous)
        # No push without the credentials the config asked for (they failed to read).
        authed = push_auth is not None or not cfg.pushgateway_username_file
        if cfg.pushgateway and outcome != "preempted" and authed:
            metrics.push(
                cfg.pushgateway, outcome == "succeeded", job=cfg.pushgateway_job, auth=push_auth
            )
        metrics.close()
        if run_ is not None:
            run_.close()


def log_start(cfg: Config, dist: Dist, run_: Run) -> None:
    """The resolved config and the derived numbers, once."""
    log.info("config %s", json.dumps(cfg.to_dict(), sort_keys=True))
    log.info(
        "%d workers × batch %d = global batch %d; %d steps per epoch; lr %.4g "
        "(%.4g per worker × %d); %d classes; step_timeout %s",
        dist.size,
        cfg.batch_size,
        cfg.batch_size * dist.size,
        run_.train.steps_per_epoch,
        scaled_lr(cfg, dist.size),
        cfg.lr,
        dist.size,
        len(run_.classes),
        f"{cfg.step_timeout:g} s" if cfg.step_timeout else "off",
    )
