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
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from job import __version__, distributed, model, pipeline_metrics
from job import storage as st
from job.augment import Jitter
from job.checkpoint import Checkpointer, Progress
from job.config import Config
from job.data import DataStats, Loader, LoaderSettings, SyntheticLoader, load_dataset, to_ndarray
from job.distributed import Dist
from job.errors import DivergedError, PreemptedError
from job.evaluate import count_correct
from job.metrics import Metrics
from job.progress import ProgressLog
from job.storage import S3Settings, Storage

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: Config, steps_per_epoch: int, workers: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    1. Scale: the per-worker rate times the number of workers (the global batch grows so).
    2. Warmup: linear from ~0 to the scaled rate over ``warmup_epochs``.
    3. Decay: cosine to 0 at the last step, or ×``lr_decay`` at each of ``lr_steps``.
    """
    peak = cfg.lr * workers
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.lr_schedule == "step":
        passed = sum(1 for e in cfg.lr_steps if step >= e * steps_per_epoch)
        return peak * cfg.lr_decay**passed
    total = cfg.epochs * steps_per_epoch
    progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Window:
    """Sums over a log interval or an epoch, kept on the device until read."""

    loss: Any = 0.0
    correct: Any = 0.0
    images: int = 0
    data_s: float = 0.0
    seconds: float = 0.0

    def add(self, loss: Any, correct: Any, images: int, data_s: float, seconds: float) -> None:
        self.loss = self.loss + loss
        self.correct = self.correct + correct
        self.images += images
        self.data_s += data_s
        self.seconds += seconds

    def reduce(self, name: str) -> tuple[float, float, int]:
        """(mean loss, accuracy, images) over every rank."""
        loss = float(self.loss.asscalar()) if isinstance(self.loss, mx.nd.NDArray) else self.loss
        correct = (
            float(self.correct.asscalar())
            if isinstance(self.correct, mx.nd.NDArray)
            else self.correct
        )
        loss_sum, correct_sum, images = distributed.allreduce_sum(
            [loss, correct, self.images], name
        )
        return loss_sum / max(images, 1), correct_sum / max(images, 1), int(images)


class Run:
    """One training run: the pieces built once in ``run()`` and the loop over them."""

    def __init__(self, cfg: Config, dist: Dist, metrics: Metrics, stop: threading.Event) -> None:
        self.cfg, self.dist = cfg, dist
        self.ctx = dist.context()
        mx.random.seed(cfg.seed)  # the new head's (and a scratch model's) initial weights
        self.storage = Storage(S3Settings.from_config(cfg.to_dict()))
        self.stats = DataStats()
        self.metrics = metrics
        self.metrics.watch_data(self.stats)
        self.checkpointer = Checkpointer(self.storage, cfg.output, cfg.keep_checkpoints)
        self._build_data()
        self.net = model.build(cfg, len(self.classes), self.ctx, self.storage)
        self._warm_up()
        distributed.broadcast_parameters(self.net.collect_params())
        self.trainer = distributed.trainer(
            self.net.collect_params(),
            "sgd",
            {"learning_rate": cfg.lr * dist.size, "momentum": cfg.momentum, "wd": cfg.wd},
            cfg.fp16_allreduce,
        )
        self.loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        # ResNet v2 starts with a parameter-free BatchNorm on the input; MXNet updates its
        # running stats in backward, which only happens when the input asks for a gradient.
        self.input_grad = cfg.model.endswith("_v2") and not cfg.freeze_features
        self.progress = Progress()
        self.stop_requested = stop  # set by SIGTERM; acted on at a step boundary
        self._next_epoch: tuple[int, Iterator[Any]] | None = None
        self.log = ProgressLog(
            enabled=dist.is_primary,
            fmt=cfg.log_format,
            stream=sys.stderr,
            on_progress=metrics.set_progress,
        )

    def _build_data(self) -> None:
        cfg, dist = self.cfg, self.dist
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
        self.val: Loader | None = None
        if cfg.synthetic:
            self.classes = [f"class{i}" for i in range(cfg.synthetic_classes)]
            self.train: Loader | SyntheticLoader = SyntheticLoader(
                cfg.synthetic_classes, cfg.synthetic_images, settings, dist.size
            )
            return
        dataset = load_dataset(cfg.data, self.storage)
        self.classes = dataset.classes
        self.train = Loader(
            dataset, "train", settings, dist.rank, dist.size, self.storage, self.stats
        )
        if dataset.count("val"):
            self.val = Loader(
                dataset, "val", settings, dist.rank, dist.size, self.storage, self.stats
            )

    def _warm_up(self) -> None:
        # Run the first forward in training mode before the broadcast: an inference-mode
        # first pass leaves MKLDNN layouts that the broadcast cannot read.
        shape = (self.cfg.batch_size, 3, self.cfg.image_size, self.cfg.image_size)
        with autograd.train_mode():
            self.net(mx.nd.zeros(shape, ctx=self.ctx)).wait_to_read()

    # The loop.
    def resume(self) -> None:
        if self.cfg.resume != "auto":
            return
        folder = self.checkpointer.latest()
        if folder is None:
            return
        self.progress, _ = self.checkpointer.load(folder, self.net, self.trainer, self.ctx)
        log.info(
            "resumed from %s: epoch %d, step %d",
            folder,
            self.progress.epoch + 1,
            self.progress.step,
        )

    def fit(self) -> None:
        cfg, p = self.cfg, self.progress
        while p.epoch < cfg.epochs:
            self.metrics.epoch.labels(self.metrics.rank).set(p.epoch)
            epoch_started = time.perf_counter()
            epoch_window, seconds, stopped = self.train_epoch(p.epoch, p.batch)
            if stopped:
                self.sync_running_stats()
                self.checkpoint()
                distributed.barrier()  # no rank shuts Horovod down before the checkpoint is out
                raise PreemptedError(
                    f"stopped by SIGTERM at epoch {p.epoch + 1}, step {p.step} ({p.batch} of "
                    f"{self.train.steps_per_epoch} batches of the epoch done); that step is "
                    f"checkpointed in {self.checkpointer.root} and a restart resumes from it"
                )
            if p.epoch + 1 < cfg.epochs:  # read and decode ahead while evaluating
                self._next_epoch = (p.epoch + 1, self.train.epoch(p.epoch + 1))
            loss, acc, images = epoch_window.reduce("epoch_train")
            self.sync_running_stats()
            record: dict[str, Any] = {
                "epoch": p.epoch + 1,
                "train_loss": round(loss, 5),
                "train_top1": round(acc, 5),
                "images_per_second": round(images / max(seconds, 1e-9), 2),
                "train_seconds": round(seconds, 2),
            }
            record.update(self.evaluate())
            record["seconds"] = round(time.perf_counter() - epoch_started, 2)
            p.history.append(record)
            p.best_val_top1 = max(p.best_val_top1, record.get("val_top1", -1.0))
            p.epoch, p.batch = p.epoch + 1, 0
            self.log.epoch(record, cfg.epochs)
            self.checkpoint()

    def train_epoch(self, epoch: int, skip: int) -> tuple[Window, float, bool]:
        """Train the rest of ``epoch``; the flag says it stopped early on SIGTERM."""
        cfg, p = self.cfg, self.progress
        steps = self.train.steps_per_epoch
        epoch_window, window = Window(), Window()
        started = tick = time.perf_counter()
        prepared, self._next_epoch = self._next_epoch, None
        batches = prepared[1] if prepared and prepared[0] == epoch and not skip else None
        for batch in batches or self.train.epoch(epoch, skip_batches=skip):
            data_s = time.perf_counter() - tick
            lr = lr_at(p.step, cfg, steps, self.dist.size)
            self.trainer.set_learning_rate(lr)
            loss, correct, compute_s, allreduce_s = self.step(batch)
            p.step, p.batch = p.step + 1, p.batch + 1
            step_s = time.perf_counter() - tick
            for w in (window, epoch_window):
                w.add(loss, correct, cfg.batch_size, data_s, step_s)
            self.metrics.step(cfg.batch_size, data_s, compute_s, allreduce_s)
            if p.batch % cfg.log_interval == 0 or p.batch == steps:
                self.report(window, epoch, steps, lr)
                window = Window()
            if p.batch < steps and self.stop_agreed():
                return epoch_window, time.perf_counter() - started, True
            tick = time.perf_counter()
        return epoch_window, time.perf_counter() - started, False

    def stop_agreed(self) -> bool:
        """True on every rank, at the same step, once any rank got SIGTERM."""
        flag = float(self.stop_requested.is_set())
        if self.dist.size > 1:
            flag = distributed.allreduce_sum([flag], "stop")[0]
        return flag > 0

    def step(self, batch: Any) -> tuple[Any, Any, float, float]:
        """One optimizer step; returns loss sum, correct count and the phase seconds."""
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
        mx.nd.waitall()
        computed = time.perf_counter()
        self.trainer.step(self.cfg.batch_size)
        mx.nd.waitall()
        correct = (out.argmax(axis=1) == label).sum()
        return loss.sum(), correct, computed - start, time.perf_counter() - computed

    def report(self, window: Window, epoch: int, steps: int, lr: float) -> None:
        loss, acc, images = window.reduce("window")
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
            images_per_second=images / max(window.seconds, 1e-9),
            data_share=window.data_s / max(window.seconds, 1e-9),
        )

    def sync_running_stats(self) -> None:
        """Average BatchNorm running mean/var over ranks. Each rank updates them from its
        own batches; averaged, every rank evaluates, checkpoints and exports the same model."""
        if self.dist.size > 1:
            stats = self.net.collect_params(".*running_mean|.*running_var")
            distributed.average_in_place([p.data() for _, p in sorted(stats.items())], "bn_stats")

    def evaluate(self) -> dict[str, float]:
        """Validation top-1 (center crop; and five-crop TTA when asked), over all ranks."""
        if self.val is None:
            return {}
        correct, correct_tta, count = count_correct(self.net, self.val.epoch(0), self.ctx)
        correct, correct_tta, count = distributed.allreduce_sum(
            [correct, correct_tta, count], "eval"
        )
        result = {"val_top1": round(correct / max(count, 1), 5)}
        self.metrics.set_accuracy("val", result["val_top1"])
        if self.cfg.tta:
            result["val_top1_tta"] = round(correct_tta / max(count, 1), 5)
            self.metrics.set_accuracy("val_tta", result["val_top1_tta"])
        return result

    def checkpoint(self) -> None:
        if not self.dist.is_primary:
            return
        started = time.perf_counter()
        folder = self.checkpointer.save(self.net, self.trainer, self.progress, self.cfg.to_dict())
        self.metrics.checkpointed(time.perf_counter() - started)
        log.info("checkpoint %s (%.1f s)", folder, time.perf_counter() - started)

    def close(self) -> None:
        self.train.close()
        if self.val is not None:
            self.val.close()

    def finish(self, wall_seconds: float) -> dict[str, Any] | None:
        """Summary on every rank's behalf; rank 0 exports the model and writes it."""
        digests = distributed.allgather_object(params_digest(self.net), "params_digest")
        peak_rss = distributed.allgather_object(peak_rss_bytes(), "peak_rss")
        corrupt = distributed.allreduce_sum([self.stats.corrupt_records], "corrupt")[0]
        if not self.dist.is_primary:
            return None
        history = self.progress.history
        last = history[-1] if history else {}
        cfg = self.cfg
        summary = {
            "model": cfg.model,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "pretrained": cfg.pretrained,
            "epochs": cfg.epochs,
            "workers": self.dist.size,
            "global_batch_size": cfg.batch_size * self.dist.size,
            "val_top1": last.get("val_top1"),
            "best_val_top1": self.progress.best_val_top1,
            "train_images_per_second": _mean([h["images_per_second"] for h in history]),
            "wall_seconds": round(wall_seconds, 2),
            "corrupt_records": int(corrupt),
            "params_sha256_per_rank": digests,
            "peak_rss_bytes_per_rank": peak_rss,
            "history": history,
            "config": cfg.to_dict(),
            "version": __version__,
        }
        if cfg.tta:
            summary["val_top1_tta"] = last.get("val_top1_tta")
        self.export(summary)
        return summary

    def export(self, summary: dict[str, Any]) -> None:
        out = self.cfg.output
        with tempfile.TemporaryDirectory(prefix="finetune-export-") as tmp:
            self.net.export(os.path.join(tmp, "model"), epoch=0)
            self.net.save_parameters(os.path.join(tmp, "model.params"))
            for name in ("model-symbol.json", "model-0000.params", "model.params"):
                self.storage.upload(os.path.join(tmp, name), st.join(out, name))
        # The summary goes last: its presence means the outputs are complete.
        self.storage.write_bytes(
            st.join(out, "summary.json"), json.dumps(summary, indent=1).encode()
        )
        log.info("exported model and summary to %s", out)


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


def run(cfg: Config) -> dict[str, Any] | None:
    started = time.perf_counter()
    dist = distributed.init()
    if not dist.is_primary:
        logging.getLogger().setLevel(logging.WARNING)
    metrics = Metrics(dist.rank)
    # Kubernetes sends SIGTERM before it kills a pod: finish the step, checkpoint, exit.
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    run_: Run | None = None
    outcome = "failed"
    try:
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
        run_ = Run(cfg, dist, metrics, stop)
        if dist.is_primary:
            log.info("config %s", json.dumps(cfg.to_dict(), sort_keys=True))
            log.info(
                "%d workers × batch %d = global batch %d; %d steps per epoch; lr %.4g "
                "(%.4g per worker × %d); %d classes",
                dist.size,
                cfg.batch_size,
                cfg.batch_size * dist.size,
                run_.train.steps_per_epoch,
                cfg.lr * dist.size,
                cfg.lr,
                dist.size,
                len(run_.classes),
            )
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
    finally:
        signal.signal(signal.SIGTERM, previous)
        if cfg.pushgateway and outcome != "preempted":
            metrics.push(cfg.pushgateway, outcome == "succeeded", job=cfg.pushgateway_job)
        metrics.close()
        if run_ is not None:
            run_.close()
