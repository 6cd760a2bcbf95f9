"""The process around the training loop, on every rank: the step watchdog, Horovod, the
SIGTERM flag, the metrics server and build info, the output probe, the Pushgateway at the
end, and the summary and pipeline metrics. ``run(cfg)`` is the runbook's entrypoint."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mxnet as mx

from job import __version__
from job import storage as st
from job.config import Config
from job.errors import InputError, PreemptedError
from job.outputs import pipeline_metrics
from job.storage import S3Settings, Storage
from job.training import distributed, summary
from job.training.build import build
from job.training.distributed import Dist
from job.training.loop import Run
from job.training.metrics import Metrics, read_basic_auth
from job.training.rate import scaled_lr
from job.training.watchdog import Watchdog

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict[str, Any] | None:
    """Build the parts (Horovod, storage, metrics, data, model) and train; the runbook's
    entrypoint on every rank. Returns the summary on rank 0."""
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
    run_: Run | None = None
    outcome = "failed"
    push_auth: tuple[str, str] | None = None
    try:
        with sigterm_flag() as stop:
            push_auth = read_basic_auth(
                cfg.pushgateway_username_file, cfg.pushgateway_password_file
            )
            serve_metrics(cfg, dist, metrics)
            storage = Storage(S3Settings.from_config(cfg.to_dict()))
            check_output(cfg, dist, storage)
            run_ = build(cfg, dist, storage, metrics, stop, dog)
            dog.beat(step=False)
            if dist.is_primary:
                log_start(cfg, dist, run_)
            run_.resume()
            run_.fit()
            result = summary.finish(run_, time.perf_counter() - started)
        if result is not None and cfg.metrics_file:
            pipeline_metrics.write(cfg.metrics_file, result, storage)
            log.info("pipeline metrics written to %s", cfg.metrics_file)
        outcome = "succeeded"
        return result
    except PreemptedError:
        outcome = "preempted"  # not an end: the restarted job pushes when it ends
        raise
    except mx.base.MXNetError as e:
        if "shut down" in str(e):  # Horovod's own stall shutdown: the watchdog's line
            dog.fire()
        raise
    finally:
        dog.stop()
        # No push without the credentials the config asked for (they failed to read).
        authed = push_auth is not None or not cfg.pushgateway_username_file
        if cfg.pushgateway and outcome != "preempted" and authed:
            metrics.push(
                cfg.pushgateway, outcome == "succeeded", job=cfg.pushgateway_job, auth=push_auth
            )
        metrics.close()
        if run_ is not None:
            run_.close()


@contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """Kubernetes sends SIGTERM before it kills a pod: inside the block, SIGTERM only sets
    the flag, and the loop finishes the step, checkpoints and exits."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_metrics(cfg: Config, dist: Dist, metrics: Metrics) -> None:
    """The rank's /metrics endpoint (one port per local rank) and its build info."""
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
