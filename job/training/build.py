"""The parts of a run, built on every rank: the data loaders, the model (loaded, broadcast
from rank 0), the distributed optimizer and the run's fingerprint. Everything here does I/O
or talks to other ranks; ``job.training.loop.Run`` gets the results and does neither."""

from __future__ import annotations

import os
import threading

import mxnet as mx
from mxnet import autograd

from job.config import Config
from job.input.augment import Jitter
from job.input.data import DataStats, Loader, LoaderSettings, SyntheticLoader, load_dataset
from job.storage import Storage
from job.training import fingerprint, model, watchdog
from job.training.distributed import Dist
from job.training.loop import Run
from job.training.metrics import Metrics
from job.training.rate import scaled_lr
from job.training.watchdog import Watchdog


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
    dog = dog or Watchdog(0)
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
    dog.beat(step=False)  # the dataset's manifest and the model are loaded
    with dog.phase(watchdog.BROADCAST):
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
